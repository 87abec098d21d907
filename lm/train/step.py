"""The train state and the pure train and eval steps (gradient accumulation, the finiteness flag)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from lm import lora
from lm.train.objective import LANGUAGE_MODELLING, Objective, _objective_value
from lm.train.optim import OptimizerConfig


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; a pytree."""

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # raw uint32[2] key: the dropout stream is fold_in(rng, step)


@flax.struct.dataclass
class LoraTrainState(TrainState):
    """With LoRA: `params` are the adapters (all the optimizer sees) and `frozen` the base
    model's parameters, saved with the state so that a run resumes without its source.
    A subclass rather than a field of TrainState, so that full-training checkpoints keep
    the tree they always had."""

    frozen: Any


def _accumulated_grads(
    model, params, batch, rng, accum_steps, to_model=None, objective=LANGUAGE_MODELLING
):
    """(gradient of the summed objective wrt `params`, the objective's sums), over
    `accum_steps` micro-batches scanned in sequence.

    to_model: trainable params -> the model's params (LoRA: merge the adapters into the frozen
      base); None = the trainable params are the model's.
    """

    def micro(params, micro_batch, micro_rng):
        def loss_fn(p):
            model_params = p if to_model is None else to_model(p)
            sums = objective.sums(
                model, model_params, micro_batch, deterministic=False, rng=micro_rng
            )
            return _objective_value(sums), sums

        (_, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return grads, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), sums)

    if accum_steps == 1:
        return micro(params, batch, rng)
    split = jax.tree.map(lambda x: x.reshape((accum_steps, -1) + x.shape[1:]), batch)

    def body(carry, xs):
        grads, sums = carry
        i, micro_batch = xs
        g, s = micro(params, micro_batch, jax.random.fold_in(rng, i))
        return (jax.tree.map(jnp.add, grads, g), jax.tree.map(jnp.add, sums, s)), None

    first = jax.tree.map(lambda x: x[0], split)
    shapes = jax.eval_shape(lambda: micro(params, first, rng))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    (grads, sums), _ = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), split))
    return grads, sums


def _all_finite(tree) -> jax.Array:
    """A scalar bool: every floating-point element of `tree` is finite (a reduction on device)."""
    leaves = [
        jnp.isfinite(x).all() for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)


def _update_count(opt_state) -> jax.Array:
    """The optimizer's count of applied updates (the first `count` in its state: Adam's,
    Adafactor's, the schedule's; all equal)."""
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
        if path and getattr(path[-1], "name", None) == "count":
            return leaf
    raise ValueError(
        "train.nonfinite='skip' counts skipped steps with the optimizer's update count, "
        "and this optimizer's state has none"
    )


def make_train_step(
    model,
    optimizer,
    schedule,
    opt_config: OptimizerConfig,
    axis_name: str | None = None,
    lora_config: lora.LoraConfig | None = None,
    skip_nonfinite: bool = False,
    objective: Objective = LANGUAGE_MODELLING,
):
    """`(state, batch) -> (state, metrics)`. With `axis_name`, gradients are summed across it (pmap).

    With `lora_config` the step is `(state, batch, frozen) -> (state, metrics)`: `state.params`
    are the adapters, `frozen` the base parameters (a separate argument, so that donating the
    state never donates the base; `Trainer` wraps it back into `(state, batch)`).

    metrics['finite'] (1.0 or 0.0, a float so that loops summing metrics over a window get the
    fraction) says the step was sound: its loss and gradient norm are finite, and so are the
    parameters and optimizer state it produced (a finite gradient can still overflow them). The
    loop reads it where it syncs anyway (see `train_loop`).
    skip_nonfinite (train.nonfinite='skip'): a step that is not finite keeps the previous
    parameters and optimizer state (bit for bit; the step counter still advances, so the data
    order is unchanged), and metrics['nonfinite_skipped'] counts such steps since the start of
    training: the step counter minus the optimizer's update count, both checkpointed, so the
    count survives a resume.
    """

    def train_step(state: TrainState, batch, frozen=None):
        rng = jax.random.fold_in(state.rng, state.step)
        if axis_name is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        to_model = None
        if lora_config is not None:  # differentiate wrt the adapters through the merged kernels
            to_model = lambda adapters: lora.merge(frozen, adapters, lora_config)
        grads, sums = _accumulated_grads(
            model, state.params, batch, rng, opt_config.grad_accum_steps, to_model, objective
        )
        if axis_name is not None:
            grads, sums = jax.lax.psum((grads, sums), axis_name)
        loss_sum, weight = sums["loss"], sums["weight"]
        denom = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss, grad_norm = loss_sum / denom, optax.tree_utils.tree_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & _all_finite((params, opt_state))
        if skip_nonfinite:
            params, opt_state = jax.tree.map(
                lambda new, old: jnp.where(finite, new, old),
                (params, opt_state),
                (state.params, state.opt_state),
            )
        metrics = {
            "loss": loss,
            **{k: v / denom for k, v in sums.items() if k not in ("loss", "weight")},
            "tokens": weight,
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step),
            "finite": finite.astype(jnp.float32),
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        if skip_nonfinite:
            metrics["nonfinite_skipped"] = new_state.step - _update_count(opt_state)
        return new_state, metrics

    return train_step


def make_eval_step(model, objective: Objective = LANGUAGE_MODELLING):
    """`(params, batch) -> {'loss_sum', 'correct', 'tokens', <the objective's other sums>}`
    (sums, so batches add up exactly; 'correct' is the objective's "accuracy" sum, 0 if none)."""

    def eval_step(params, batch):
        sums = dict(objective.sums(model, params, batch, deterministic=True))
        out = {
            "loss_sum": sums.pop("loss"),
            "correct": sums.pop("accuracy", jnp.zeros(())),
            "tokens": sums.pop("weight"),
        }
        return {**out, **sums}

    return eval_step


def mean_eval_metrics(outputs: Iterable[dict]) -> dict[str, float]:
    """{loss, accuracy, perplexity, tokens} over eval-step outputs (`make_eval_step`'s sums),
    so exact for any batching."""
    totals = {"loss_sum": 0.0, "correct": 0.0, "tokens": 0.0}
    for out in outputs:
        for k in totals:
            totals[k] += float(out[k])
    tokens = max(totals["tokens"], 1.0)
    loss = totals["loss_sum"] / tokens
    return {
        "loss": loss,
        "accuracy": totals["correct"] / tokens,
        "perplexity": math.exp(min(loss, 50.0)),
        "tokens": totals["tokens"],
    }
