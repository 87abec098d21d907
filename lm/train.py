"""TrainState, loss, train/eval steps (jit over a mesh, or pmap) and the training loop.

The loop knows nothing about where batches or evaluations come from: `lm.main` hands it
a data iterator and evaluators (`state -> metrics` callables).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import logging
import math
import signal
import statistics
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lm import lora, parallel, storage
from lm.checkpoint import Checkpointer
from lm.models.transformer import (
    ModelConfig,
    dummy_inputs,
    to_layout,
    unstack_layers,
)
from lm.utils import config_from_dict, count_params, longest_prefix_entry, tree_differences

# ------------------------------------------------------------------------------ configs

NONFINITE_POLICIES = ("abort", "skip", "rollback")


def check_nonfinite_policy(value: str) -> None:
    if value not in NONFINITE_POLICIES:
        raise ValueError(
            f"train.nonfinite={value!r}: use one of {', '.join(map(repr, NONFINITE_POLICIES))}"
        )


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = "adamw"  # adamw | adafactor
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    decay_steps: int = 0  # 0 = the run's total steps
    end_learning_rate_fraction: float = 0.1  # cosine decays to this fraction of the peak
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # global-norm clipping; 0 disables
    grad_accum_steps: int = 1

    def __post_init__(self):
        if self.name not in ("adamw", "adafactor"):
            raise ValueError(f"optimizer.name={self.name!r}: use 'adamw' or 'adafactor'")
        if self.grad_accum_steps < 1:
            raise ValueError("optimizer.grad_accum_steps must be >= 1")
        for key in (
            "learning_rate",
            "warmup_steps",
            "decay_steps",
            "weight_decay",
            "eps",
            "clip_norm",
        ):
            if getattr(self, key) < 0:
                raise ValueError(f"optimizer.{key}={getattr(self, key)} must be >= 0")
        for key in ("b1", "b2"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(
                    f"optimizer.{key}={getattr(self, key)} must be in [0, 1): Adam's decay "
                    "rate of its moment estimates (e.g. b1=0.9, b2=0.95)"
                )
        if not 0 <= self.end_learning_rate_fraction <= 1:
            raise ValueError(
                f"optimizer.end_learning_rate_fraction={self.end_learning_rate_fraction} "
                "must be in [0, 1]"
            )

    @classmethod
    def from_dict(cls, values):
        return config_from_dict(cls, dict(values), prefix="optimizer")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    seed: int = 0
    log_every: int = 50
    eval_every: int = 500  # 0 = only at the end
    eval_batches: int = 0  # evaluate on the first n batches of the split; 0 = all of it
    eval_at_start: bool = False  # also evaluate before the first step (fine-tuning baselines)
    # Harness tasks (lm.evaluation, comma-separated, e.g. "heldout_order,lambada") run with
    # every evaluation, on the first eval_tasks_limit documents of each (0 = all).
    eval_tasks: str = ""
    eval_tasks_limit: int = 200
    eval_tasks_fewshot: int = -1  # -1 = each task's default k
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    # A step with a non-finite loss, gradient or update: 'abort' (stop, naming the step, exit
    # non-zero), 'skip' (that step changes nothing) or 'rollback' (back to the last checkpoint,
    # the step's batch dropped for good). See train_loop.
    nonfinite: str = "abort"
    sample_prompt: str = ""
    sample_tokens: int = 100
    sample_temperature: float = 0.8
    peak_flops_per_device: float = 0.0  # 0 = guess from the device kind (for MFU)
    progress: bool = True
    # Fine-tuning. init_from: start from another run's parameters (a workdir; see
    # lm.main.init_source) when this workdir has no checkpoint of its own yet.
    init_from: str = ""
    # LoRA (lm.lora): rank 0 = off (train every parameter); else only adapters on the
    # kernels named in lora_targets (comma-separated module names) are trained.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_targets: str = ",".join(lora.DEFAULT_TARGETS)

    def __post_init__(self):
        for key, low in [
            ("steps", 1),
            ("log_every", 1),
            ("checkpoint_every", 1),
            ("keep_checkpoints", 1),
            ("eval_every", 0),
            ("eval_batches", 0),
            ("eval_tasks_limit", 0),
            ("eval_tasks_fewshot", -1),
            ("sample_tokens", 0),
            ("sample_temperature", 0),
        ]:
            if getattr(self, key) < low:
                raise ValueError(f"train.{key}={getattr(self, key)} must be >= {low}")
        self.lora  # noqa: B018 - validates the LoRA values now, with their config names
        check_nonfinite_policy(self.nonfinite)

    @property
    def lora(self) -> lora.LoraConfig:
        return lora.LoraConfig.from_strings(self.lora_rank, self.lora_alpha, self.lora_targets)

    @classmethod
    def from_dict(cls, values):
        return config_from_dict(cls, dict(values), prefix="train")


# --------------------------------------------------------------------------- train state


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


def learning_rate_schedule(config: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warmup to the peak, then cosine decay to `end_learning_rate_fraction` of it."""
    decay_steps = max(config.decay_steps or total_steps, config.warmup_steps + 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        decay_steps=decay_steps,
        end_value=config.learning_rate * config.end_learning_rate_fraction,
    )


def _decay_mask(params):
    """Weight decay on matrices only (not on norms, biases)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(
    config: OptimizerConfig, schedule: optax.Schedule
) -> optax.GradientTransformation:
    if config.name == "adamw":
        opt = optax.adamw(
            schedule,
            b1=config.b1,
            b2=config.b2,
            eps=config.eps,
            weight_decay=config.weight_decay,
            mask=_decay_mask,
        )
    else:
        opt = optax.adafactor(
            schedule,
            weight_decay_rate=config.weight_decay or None,
            weight_decay_mask=_decay_mask,
        )
    if config.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(config.clip_norm), opt)
    return opt


# --------------------------------------------------------------------------------- steps

MODEL_INPUT_KEYS = ("segment_ids", "positions", "encoder_inputs", "encoder_segment_ids")
AUX_LOSSES = "losses"  # the Flax collection models sow auxiliary losses into (see `forward`)


def forward(model: nn.Module, params, batch, *, deterministic=True, rng=None):
    """Logits [batch, length, vocab] for a data batch of either architecture."""
    return forward_with_aux(model, params, batch, deterministic=deterministic, rng=rng)[0]


def forward_with_aux(
    model: nn.Module, params, batch, *, deterministic=True, rng=None, method: str | None = None
):
    """(logits [batch, length, vocab], {name: auxiliary loss}) for a data batch; with
    method="features" (decoder-only models) the final hidden states [batch, length, embed]
    instead of the logits.

    A model adds a term to the objective by sowing a scalar, already multiplied by its
    coefficient, into the `AUX_LOSSES` collection (`self.sow("losses", name, value)`, e.g. a
    Mixture-of-Experts router's load-balancing loss). Every value sown under a name (one per
    layer, or a [layers] stack under scanned layers) is summed into that name's loss.
    """
    kwargs = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
    rngs = {"dropout": rng} if rng is not None else {}
    logits, sown = model.apply(
        {"params": params},
        batch["inputs"],
        deterministic=deterministic,
        rngs=rngs,
        mutable=[AUX_LOSSES],
        method=method,
        **kwargs,
    )
    return logits, sum_aux_losses(sown.get(AUX_LOSSES, {}))


def sum_aux_losses(sown) -> dict[str, jax.Array]:
    """The `AUX_LOSSES` collection -> {name: sum of every value sown under that name}."""
    totals: dict[str, jax.Array] = {}
    for path, value in jax.tree_util.tree_flatten_with_path(sown)[0]:
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        totals[name] = totals.get(name, 0.0) + jnp.sum(value.astype(jnp.float32))
    return totals


def cross_entropy(logits, targets):
    """Next-token cross-entropy and whether the target is the top prediction.

    logits [..., vocab], targets [...] int -> (cross-entropy [...], correct [...] float32: 1
    where the target's logit is the row's largest, ties counted as correct).
    Why not `argmax(logits) == targets`: on CPU that variadic value-and-index reduction over
    the vocabulary took a sixth of a train step at a 50k vocabulary (python -m lm.bench
    train, shape V); the target's logit against the row maximum says the same thing for the
    price of a max. (A hand-written backward for the softmax was slower: XLA fused its exp
    into a slower reduction.)
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    label = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = label >= jax.lax.stop_gradient(logits.max(axis=-1))
    return ce, jax.lax.stop_gradient(correct.astype(jnp.float32))


def loss_sums(logits, targets, weights):
    """Summed weighted cross-entropy and correct predictions; weights [batch, length]."""
    ce, correct = cross_entropy(logits, targets)
    return (ce * weights).sum(), (correct * weights).sum(), weights.sum()


def chunked_loss_sums(project, x, targets, weights, chunk: int):
    """`loss_sums` of `project(x)` computed `chunk` positions of every row at a time.

    project: hidden states [batch, chunk, embed] -> float32 logits [batch, chunk, vocab].
    x [batch, length, embed]; targets, weights [batch, length]; length a multiple of chunk.
    Each chunk's logits live only inside its scan step and are made again in the backward
    pass (jax.checkpoint), so memory holds [batch, chunk, vocab], not [batch, length, vocab].
    Returns the three sums of `loss_sums`.
    """
    batch, length = targets.shape
    if length % chunk:
        raise ValueError(
            f"model.logits_chunk={chunk} does not divide the sequence length {length}: "
            f"use a divisor of it (or 0 for the whole row)"
        )

    def split(a):  # [batch, length, ...] -> [length // chunk, batch, chunk, ...]
        return jnp.moveaxis(a.reshape(batch, length // chunk, chunk, *a.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_sums(xc, tc, wc):
        return loss_sums(project(xc), tc, wc)

    def body(totals, xs):
        return jax.tree.map(jnp.add, totals, chunk_sums(*xs)), None

    zeros = (jnp.zeros((), jnp.float32),) * 3
    totals, _ = jax.lax.scan(body, zeros, (split(x), split(targets), split(weights)))
    return totals


def language_model_sums(model, params, batch, *, deterministic=True, rng=None):
    """The objective of text models: next-token cross-entropy (see `Objective`), with the
    logits made `model.logits_chunk` positions at a time where the config says so."""
    targets, weights = batch["targets"], batch["weights"]
    chunk = model.config.logits_chunk
    if chunk and chunk < targets.shape[1]:
        x, aux = forward_with_aux(
            model, params, batch, deterministic=deterministic, rng=rng, method="features"
        )
        project = lambda h: model.apply({"params": params}, h, method="project")
        loss, correct, weight = chunked_loss_sums(project, x, targets, weights, chunk)
    else:
        logits, aux = forward_with_aux(model, params, batch, deterministic=deterministic, rng=rng)
        loss, correct, weight = loss_sums(logits, targets, weights)
    sums = {"loss": loss, "accuracy": correct, "weight": weight}
    for name, value in aux.items():  # a mean over the batch: weighted like the loss
        sums[f"aux/{name}"] = value * weight
    return sums


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a train step minimises: how a model turns a batch into summed losses.

    sums: (model, params, batch, *, deterministic, rng) -> {name: scalar sum over the batch}.
      "loss" is the summed loss and "weight" what it is summed over (target tokens, predicted
      points); every other entry is a sum reported divided by the weight (e.g. "accuracy": the
      correct predictions). Entries named "aux/NAME" are auxiliary losses times the weight:
      they join the objective, (loss + sum of aux) / weight, and are logged as aux/NAME.
      Sums (not means) so that micro-batches, devices and processes add up exactly.
    init_inputs: ModelConfig -> keyword inputs for `model.init` (shapes only matter).

    Text models use `LANGUAGE_MODELLING`; experiments with other inputs (lm.icl's in-context
    regression) bring their own and train through the same step and loop.
    """

    sums: Callable[..., dict[str, jax.Array]] = language_model_sums
    init_inputs: Callable[[ModelConfig], dict[str, Any]] = dummy_inputs


LANGUAGE_MODELLING = Objective()


def _objective_value(sums) -> jax.Array:
    """The summed loss the gradient is taken of: the loss plus the auxiliary losses."""
    return sums["loss"] + sum(v for k, v in sums.items() if k.startswith("aux/"))


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


# ------------------------------------------------------------------------ state creation


@dataclasses.dataclass
class Trainer:
    """A model, optimizer and layout, with compiled steps. Built by `create_trainer`."""

    model: nn.Module
    model_config: ModelConfig
    optimizer: optax.GradientTransformation
    schedule: optax.Schedule
    mesh: jax.sharding.Mesh
    use_pmap: bool
    state_shardings: Any
    abstract_state: Any  # ShapeDtypeStructs with shardings, for restoring
    init_fn: Callable[[int], TrainState]
    train_step: Callable
    eval_step: Callable
    num_params: int  # the model's parameters
    num_trainable: int  # what the optimizer updates: num_params, or the LoRA adapters
    param_shardings: (
        Any  # of the model's parameters (with LoRA: of the frozen base, not the adapters)
    )
    lora: lora.LoraConfig | None = None
    merge_fn: Callable | None = None  # LoRA: jitted (frozen, adapters) -> model params
    skip_nonfinite: bool = False  # train_step keeps the previous state on a non-finite step
    build_step: Callable[[bool], Callable] | None = None  # skip_nonfinite -> a compiled train_step

    def with_nonfinite(self, policy: str) -> Trainer:
        """This trainer with the step that `train.nonfinite=policy` needs: 'skip' undoes a
        non-finite update inside the step; 'abort' and 'rollback' share the plain step (it
        reports, and the loop acts). The other step is compiled on its first call."""
        check_nonfinite_policy(policy)
        skip = policy == "skip"
        if skip == self.skip_nonfinite:
            return self
        return dataclasses.replace(self, train_step=self.build_step(skip), skip_nonfinite=skip)

    def put_batch(self, local_batch):
        """Process-local numpy batch -> device arrays laid out for the step."""
        if self.use_pmap:
            return jax.device_put(parallel.split_for_pmap(local_batch))
        return parallel.global_batch(local_batch, self.mesh)

    def to_device_state(self, state):
        return parallel.replicate(state) if self.use_pmap else state

    def host_state(self, state):
        """The state as the checkpoint and evaluators see it (not replicated)."""
        return parallel.unreplicate(state) if self.use_pmap else state

    def parameter_summary(self) -> str:
        """'N parameters, all trainable', or with LoRA the trainable (adapter) share of the total."""
        if self.lora is None:
            return f"{self.num_params:,} parameters, all trainable"
        total = self.num_params + self.num_trainable
        kernels = len(jax.tree.leaves(self.abstract_state.params)) // 2
        return (
            f"{self.num_trainable:,} trainable of {total:,} parameters "
            f"({100 * self.num_trainable / total:.2f}%: LoRA rank {self.lora.rank} on {kernels} kernels)"
        )

    def model_params(self, state):
        """The parameters the model runs with, from a host state: with LoRA the frozen base
        with the adapters merged in (laid out like the base), else `state.params`."""
        if self.lora is None:
            return state.params
        return self.merge_fn(state.frozen, state.params)

    def evaluate(self, state, batches: Iterator[dict]) -> dict[str, float]:
        """Mean loss / accuracy / perplexity over all batches (sums, so exact for any batching).

        state: a host state (as evaluators and restores get it, never the pmap-replicated one).
        """
        params = self.model_params(state)
        if self.use_pmap:
            params = jax.device_put(params, self.param_shardings)
        totals = {"loss_sum": 0.0, "correct": 0.0, "tokens": 0.0}
        for local in batches:
            out = self.eval_step(params, parallel.global_batch(local, self.mesh))
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


def check_params_fit(params, abstract_params, what: str = "init params") -> None:
    """Raises ValueError naming the parameters whose presence or shape differs from the model's."""
    problems = [
        f"{k}: missing"
        if have is None
        else f"{k}: not in the model"
        if want is None
        else f"{k}: shape {have}, the model's {want}"
        for k, have, want in tree_differences(params, abstract_params)
    ]
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise ValueError(f"{what} do not fit the model: {'; '.join(problems[:8])}{more}")


def create_trainer(
    model_config: ModelConfig,
    model: nn.Module,
    opt_config: OptimizerConfig,
    total_steps: int,
    parallel_config: parallel.ParallelConfig,
    seed: int = 0,
    devices=None,
    *,
    init_params=None,
    lora_config: lora.LoraConfig | None = None,
    nonfinite: str = "abort",
    objective: Objective = LANGUAGE_MODELLING,
) -> Trainer:
    """Builds the mesh, shardings and jit-compiled (or pmapped) steps for a model.

    init_params: a host pytree with the model's parameter structure (e.g. another run's, for
      fine-tuning); `init_fn` then builds the state from them, laid out with the model's
      shardings, instead of a random init. Checked against the model's shapes here.
    lora_config: with rank > 0, train LoRA adapters only (see `lm.lora`): the state is a
      `LoraTrainState` whose `params` are the adapters and `frozen` the base parameters
      (`init_params`, or a random init).
    nonfinite: the train.nonfinite policy the step is compiled for ('skip' keeps the previous
      state on a non-finite step; see `make_train_step`). `train_loop` switches the step to its
      config's policy (`Trainer.with_nonfinite`), so callers of the loop need not pass it.
    objective: what the step minimises (`Objective`); next-token cross-entropy by default.
    """
    check_nonfinite_policy(nonfinite)
    if lora_config is not None and not lora_config.enabled:
        lora_config = None
    schedule = learning_rate_schedule(opt_config, total_steps)
    optimizer = make_optimizer(opt_config, schedule)
    mesh = parallel.make_mesh(parallel_config.mesh, devices)
    inputs = objective.init_inputs(model_config)
    replicated = NamedSharding(mesh, P())

    def boxed_params(rng):
        return model.init(rng, **inputs)["params"]

    abstract_boxed = jax.eval_shape(boxed_params, jax.random.PRNGKey(0))
    parallel.check_rules_apply(parallel_config, abstract_boxed)
    rules = parallel_config.logical_rules
    p_shardings = parallel.param_shardings(abstract_boxed, mesh, rules)
    abstract_params = nn.meta.unbox(abstract_boxed)
    num_params = count_params(abstract_params)
    if init_params is not None:
        # Checked layer by layer (the names a user can find in the source), then laid out as
        # this model's layers are (imports and older runs come unrolled).
        check_params_fit(unstack_layers(init_params), unstack_layers(abstract_params))
        init_params = to_layout(init_params, model_config)

    if lora_config is None:
        trainable_shardings = p_shardings
        abstract_trainable = abstract_params
    else:
        abstract_boxed_adapters = jax.eval_shape(
            lambda rng: lora.init(rng, abstract_boxed, lora_config), jax.random.PRNGKey(0)
        )
        trainable_shardings = parallel.param_shardings(abstract_boxed_adapters, mesh, rules)
        abstract_trainable = nn.meta.unbox(abstract_boxed_adapters)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_trainable)
    opt_shardings = parallel.matching_shardings(
        abstract_opt, abstract_trainable, trainable_shardings, mesh
    )
    if lora_config is None:
        state_shardings = TrainState(
            step=replicated, params=p_shardings, opt_state=opt_shardings, rng=replicated
        )
    else:
        state_shardings = LoraTrainState(
            step=replicated,
            params=trainable_shardings,
            opt_state=opt_shardings,
            rng=replicated,
            frozen=p_shardings,
        )

    def init(seed_value, params=None):
        init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed_value))
        if params is None:
            params = nn.meta.unbox(boxed_params(init_rng))
        step = jnp.array(0, jnp.int32)
        if lora_config is None:
            return TrainState(
                step=step, params=params, opt_state=optimizer.init(params), rng=train_rng
            )
        # fold_in: the base's random init (without init_params) stays that of full training.
        adapters = nn.meta.unbox(
            lora.init(jax.random.fold_in(init_rng, 1), abstract_boxed, lora_config)
        )
        return LoraTrainState(
            step=step,
            params=adapters,
            opt_state=optimizer.init(adapters),
            rng=train_rng,
            frozen=params,
        )

    abstract_state = jax.eval_shape(init, seed)
    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        abstract_state,
        state_shardings,
    )
    # The params argument is a fresh device copy made by init_fn: donate it to the state.
    jit_init = jax.jit(init, static_argnums=0, out_shardings=state_shardings, donate_argnums=1)
    if init_params is None:
        init_fn = jit_init
    else:
        abstract_model_params = (
            abstract_state.params if lora_config is None else abstract_state.frozen
        )

        def init_fn(seed_value):
            return jit_init(seed_value, parallel.put_params(init_params, abstract_model_params))

    eval_step = jax.jit(
        parallel.with_activation_layout(make_eval_step(model, objective), mesh, rules),
        in_shardings=(p_shardings, parallel.batch_sharding(mesh)),
    )

    @functools.cache  # one compiled step per policy, however often with_nonfinite asks
    def build_step(skip_nonfinite: bool):
        step_fn = make_train_step(
            model,
            optimizer,
            schedule,
            opt_config,
            lora_config=lora_config,
            axis_name="batch" if parallel_config.use_pmap else None,
            skip_nonfinite=skip_nonfinite,
            objective=objective,
        )
        if parallel_config.use_pmap:
            step = jax.pmap(step_fn, axis_name="batch", donate_argnums=0)
            return step if lora_config is None else _frozen_beside(step)
        step_fn = parallel.with_activation_layout(step_fn, mesh, rules)
        if lora_config is None:
            return jax.jit(
                step_fn,
                in_shardings=(state_shardings, parallel.batch_sharding(mesh)),
                out_shardings=(state_shardings, replicated),
                donate_argnums=0,
            )
        trainable_state_shardings = state_shardings.replace(frozen=None)
        step = jax.jit(
            step_fn,
            in_shardings=(trainable_state_shardings, parallel.batch_sharding(mesh), p_shardings),
            out_shardings=(trainable_state_shardings, replicated),
            donate_argnums=0,
        )
        return _frozen_beside(step)

    train_step = build_step(nonfinite == "skip")
    merge_fn = None
    if lora_config is not None:
        merge_fn = jax.jit(
            lambda frozen, adapters: lora.merge(frozen, adapters, lora_config),
            out_shardings=p_shardings,
        )
    return Trainer(
        model=model,
        model_config=model_config,
        optimizer=optimizer,
        schedule=schedule,
        mesh=mesh,
        use_pmap=parallel_config.use_pmap,
        state_shardings=state_shardings,
        abstract_state=abstract_state,
        init_fn=init_fn,
        train_step=train_step,
        eval_step=eval_step,
        num_params=num_params,
        num_trainable=count_params(abstract_trainable),
        param_shardings=p_shardings,
        lora=lora_config,
        merge_fn=merge_fn,
        skip_nonfinite=nonfinite == "skip",
        build_step=build_step,
    )


def _frozen_beside(step):
    """`(state, batch, frozen)` step -> `(state, batch)` step for a LoraTrainState: the frozen
    base goes in as its own (undonated) argument and comes back into the new state untouched."""

    def train_step(state: LoraTrainState, batch):
        new_state, metrics = step(state.replace(frozen=None), batch, state.frozen)
        return new_state.replace(frozen=state.frozen), metrics

    # Ahead-of-time lowering as for a jitted step: `.lower(abstract state, abstract batch)`.
    train_step.lower = lambda state, batch: step.lower(
        state.replace(frozen=None), batch, state.frozen
    )
    return train_step


# --------------------------------------------------------------------------- throughput

PEAK_FLOPS = {  # dense bf16 FLOP/s per device
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p's device_kind
    "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def matmul_peak(dtype=jnp.float32, size: int = 0, repeats: int = 10) -> float:
    """Measured FLOP/s of one square matrix product on the first device (median of `repeats`
    after a warm-up). size 0: 8192 on an accelerator, 1024 on CPU."""
    size = size or (1024 if jax.default_backend() == "cpu" else 8192)
    a = b = jnp.ones((size, size), dtype)  # the values do not change a product's speed
    product = jax.jit(jnp.matmul)
    jax.block_until_ready(product(a, b))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(product(a, b))
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def peak_flops_for_kind(kind: str) -> float:
    """The datasheet's dense bf16 FLOP/s of a device kind (`Device.device_kind`); 0 if not
    listed. The longest matching name wins: 'TPU v5 lite' (v5e) before 'TPU v5' (v5p)."""
    return longest_prefix_entry(PEAK_FLOPS, kind, 0.0)


def peak_flops_per_device(override: float = 0.0) -> float:
    """Peak FLOP/s of one device: the datasheet's for known accelerators; on CPU a float32
    matrix product measured now (about 0.1 s), since clock boost and vector width make any
    formula wrong (2 EPYC cores: 32 FLOP/cycle x 2.5 GHz said 160 GFLOP/s, they do 450)."""
    if override > 0:
        return override
    flops = peak_flops_for_kind(jax.devices()[0].device_kind)
    if flops:
        return flops
    if jax.default_backend() == "cpu":  # forced host devices share the cores
        return _cpu_peak() / jax.local_device_count()
    return 0.0


@functools.cache
def _cpu_peak() -> float:
    """The CPU's measured float32 peak, once per process (every run of a test session asks)."""
    return matmul_peak(jnp.float32)


def flops_per_token(config: ModelConfig, num_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights a token uses plus attention (Kaplan et al.,
    PaLM appendix). N counts active parameters (`ModelConfig.active_params`): a mixture of
    experts' token pays for its experts_per_token experts, not all of them. Model FLOPs, so
    the dense dispatch of `layers.MoeMLP`, which runs every expert, computes more than this."""
    attention = 12 * config.num_layers * config.num_heads * config.dim_per_head * seq_len
    return 6 * config.active_params(num_params) + attention


# ------------------------------------------------------------------------------ the loop


class _StoreRecordWriter:
    """tensorboardX's record writer for gs:// and s3:// logdirs, through epath (and so through
    the same credentials and endpoints as every other file of the workdir): an object store
    cannot append, so each flush uploads the event file whole (as tensorboardX's own S3 writer
    does; event files of a run are small)."""

    def __init__(self, path: str):
        self.path, self.buffer, self.closed = storage.as_path(path), bytearray(), False

    def write(self, data: bytes) -> None:
        self.buffer += data

    def flush(self) -> None:
        self.path.write_bytes(bytes(self.buffer))

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self.closed = True


class _StoreRecordWriterFactory:
    def open(self, path: str) -> _StoreRecordWriter:
        return _StoreRecordWriter(path)

    def directory_check(self, path: str) -> None:
        pass  # object stores have no directories to create


def _register_store_writers() -> None:
    from tensorboardX import record_writer

    for scheme in storage.REMOTE_SCHEMES:
        record_writer.register_writer_factory(scheme.split(":")[0], _StoreRecordWriterFactory())


class MetricWriter:
    """metrics.jsonl (one JSON object per logged step) and TensorBoard events, process 0 only."""

    def __init__(self, workdir: storage.PathLike):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        _register_store_writers()
        self.jsonl = storage.LineLog(storage.as_path(workdir) / "metrics.jsonl")
        if self.jsonl.dropped is not None:
            logging.warning(
                "%s ended in a partly written line (the run was killed while writing it): "
                "dropped %r",
                self.jsonl.path,
                self.jsonl.dropped[:80],
            )
        self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]):
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}))
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        self.tb.flush()

    def close(self):
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


class _Preemption:
    """Whether the loop should save a checkpoint and stop because of a preemption notice.

    One process: SIGTERM sets a flag. Several processes (`jax.distributed`): a checkpoint save
    is collective, so a SIGTERM to any one of them must stop all of them at the same step.
    JAX's preemption service (started by `jax.distributed.initialize`) catches SIGTERM in
    every process and agrees on a step through the coordinator in the background;
    `multihost_utils.reached_preemption_sync_point(step)` turns True in every process at that
    step. It is a host-side check of local state (no communication unless a notice came),
    called once per step by every process, as the service requires. Installing a Python
    SIGTERM handler there would replace the service's, so none is installed.
    """

    def __init__(self):
        self.coordinated = jax.process_count() > 1
        self._signalled = False
        self._previous = None

    def __enter__(self):
        if self.coordinated:
            if not jax.config.jax_enable_preemption_service:
                raise ValueError(
                    "a multi-process run needs JAX's preemption service to stop every process at "
                    "the same step on SIGTERM: do not set jax_enable_preemption_service=False"
                )
        elif threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM: saving a checkpoint and stopping")
        self._signalled = True

    def reached(self, step: int) -> bool:
        """True: save `step` and stop (the same step in every process)."""
        if not self.coordinated:
            return self._signalled
        from jax.experimental import multihost_utils

        if multihost_utils.reached_preemption_sync_point(step):
            logging.warning(
                "preemption notice (SIGTERM to a process of this run): every process saves step "
                "%d and stops",
                step,
            )
            return True
        return False

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class IndexedBatches:
    """A batch source for data that is a pure function of its position in the stream:
    `batch_at(0)`, `batch_at(1)`, ... Its state (saved with every checkpoint, like a Grain
    iterator's) is the next position, so a resumed run draws exactly the batches an unbroken
    run would. For synthetic data (lm.icl's regression prompts, induction sequences).

    batch_at: position -> this process's batch (numpy arrays with a leading batch axis).
    """

    def __init__(self, batch_at: Callable[[int], dict[str, np.ndarray]]):
        self._batch_at = batch_at
        self._next = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = self._batch_at(self._next)
        self._next += 1
        return batch

    def get_state(self) -> dict[str, int]:
        return {"next": self._next}

    def set_state(self, state: dict[str, int]) -> None:
        self._next = int(state["next"])


class NonFiniteError(ValueError):
    """A training step was not finite (its loss, gradient norm, or the state it produced) and
    `train.nonfinite` says to stop, or rollbacks did not get past it. A ValueError, so that
    `lm.main` reports it in one line and exits non-zero."""


SKIPPED_BATCHES = "skipped_batches.json"
ROLLBACK_LIMIT = 3  # rollbacks with no checkpoint saved in between: the run diverges; stop
SKIP_LIMIT = 10  # steps skipped in a row: the state, not a batch, is broken; stop


def read_skipped_batches(workdir: storage.PathLike) -> list[dict]:
    """The batches that rollbacks dropped (WORKDIR/skipped_batches.json), in the order dropped:
    `{"position": p, "step": s, "restored_step": r}`: the batch at position p of the run's
    data stream (0 = the first batch the run drew) made step s non-finite, and the run went
    back to step r."""
    path = storage.as_path(workdir) / SKIPPED_BATCHES
    if not path.exists():
        return []
    try:
        batches = json.loads(path.read_text())["batches"]
        for entry in batches:
            entry["position"] = int(entry["position"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            f"{path} is unreadable ({e!r}): it lists the data batches this run drops; "
            "restore it, or delete it to train on every batch"
        ) from e
    return batches


def _write_skipped_batches(workdir, batches: list[dict]) -> None:
    """Atomically and durably (before any checkpoint that depends on it), on process 0."""
    if jax.process_index() == 0:
        storage.write_atomic(
            storage.as_path(workdir) / SKIPPED_BATCHES,
            json.dumps({"batches": batches}, indent=1) + "\n",
        )


def _data_position(step: int, dropped) -> int:
    """Batches drawn from the data stream to train `step` steps, `dropped` positions discarded."""
    position = step
    for p in sorted(dropped):
        if p >= position:
            break
        position += 1
    return position


_LOWER_LR = "Lower optimizer.learning_rate or clip gradients (optimizer.clip_norm)"


def _describe_nonfinite(step: int, metrics) -> str:
    loss, norm = (float(np.asarray(metrics[k]).reshape(-1)[0]) for k in ("loss", "grad_norm"))
    if math.isfinite(loss) and math.isfinite(norm):
        return (
            f"step {step} made the parameters or optimizer state non-finite (loss {loss:.4g}, "
            f"gradient norm {norm:.4g})"
        )
    return f"step {step} was not finite (loss {loss:.4g}, gradient norm {norm:.4g})"


def train_loop(
    trainer: Trainer,
    train_config: TrainConfig,
    workdir: storage.PathLike,
    data_iterator,
    *,
    evaluators: dict[str, Callable[[TrainState], dict[str, float]]] | None = None,
    seq_len: int = 0,
    on_end: Callable[[TrainState], None] | None = None,
) -> TrainState:
    """Trains to `train_config.steps`, resuming from the workdir's latest checkpoint.

    data_iterator: a checkpointable Grain iterator of process-local numpy batches.
    evaluators: name -> callable(state) -> metrics, run every `eval_every` steps and at the end;
      their metrics are logged as `<name>/<metric>`.
    on_end: called with the final state (e.g. to print samples).

    Non-finite steps (`train.nonfinite`). Every step reports whether it was finite: its loss,
    its gradient norm, and the parameters and optimizer state it produced (`make_train_step`).
    The loop reads those flags only where it syncs with the device anyway: when it logs (with
    the metrics it reads there) and before every checkpoint save (the scheduled ones, the last
    one, a preemption's). So detection costs no sync per step, a bad step is found within
    `log_every` (or `checkpoint_every`) steps, and no state after a non-finite step is saved.
    - abort: stop with NonFiniteError naming the first bad step. Saves in flight finish (their
      states are from before it); nothing later is saved, so the last checkpoint is good.
    - skip: the step itself keeps the previous parameters and optimizer state; metrics.jsonl
      counts the skipped steps (`nonfinite_skipped`, since the start of training). SKIP_LIMIT
      skipped steps in a row mean the state itself is broken (e.g. finite but diverged): the
      run stops as abort does (found at a log).
    - rollback: restore the last checkpoint (the initial state if none was saved yet) with its
      data-iterator state and train on from there without the first bad step's batch. Batches
      are named by their position in the run's data stream (0 = the first batch it drew). The
      dropped positions go to WORKDIR/skipped_batches.json before training goes on, and every
      run of the workdir, whatever its policy, draws and discards them when it reaches them: a
      checkpoint of step S sits at position S plus the dropped positions before it, so a
      resumed run trains on exactly the batches of an unbroken one. The steps after the
      restored checkpoint are retrained (and logged again). `nonfinite_skipped` in
      metrics.jsonl counts the dropped batches. After ROLLBACK_LIMIT rollbacks with no
      checkpoint saved in between the run is diverging, not meeting bad batches: it stops as
      abort does, and the batches those rollbacks dropped are taken off the list again.
    """
    workdir = storage.as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    evaluators = evaluators or {}
    policy = train_config.nonfinite
    trainer = trainer.with_nonfinite(policy)
    skipped_batches = read_skipped_batches(workdir)
    dropped = {entry["position"] for entry in skipped_batches}
    checkpointer = Checkpointer(
        workdir, keep=train_config.keep_checkpoints, async_save=train_config.async_checkpoints
    )
    if checkpointer.latest_step() is not None:
        try:
            start, state = checkpointer.restore(trainer.abstract_state, data_iterator)
        except Exception:
            checkpointer.close()
            raise
        logging.info("resumed from step %d", start)
    else:
        state = trainer.init_fn(train_config.seed)
        start = 0
    # Rolling back before the first checkpoint returns to the start: the data stream's too.
    initial_data = (
        copy.deepcopy(data_iterator.get_state()) if policy == "rollback" and start == 0 else None
    )
    position = _data_position(start, dropped)  # of the next batch in the data stream
    logging.info("%s", trainer.parameter_summary())
    state = trainer.to_device_state(state)
    writer = MetricWriter(workdir)
    flops = flops_per_token(trainer.model_config, trainer.num_params, seq_len or 1)
    peak = peak_flops_per_device(train_config.peak_flops_per_device) * jax.device_count()
    total = train_config.steps
    progress = None
    if train_config.progress and jax.process_index() == 0:
        from tqdm import tqdm

        progress = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True)

    def run_evaluators(state):
        results = {}
        host = trainer.host_state(state)
        for name, fn in evaluators.items():
            for k, v in fn(host).items():
                results[f"{name}/{k}"] = float(v)
        return results

    rollbacks = []  # the batches dropped since the last save (ROLLBACK_LIMIT)

    def save(state, step, force=False):
        nonlocal rollbacks
        if step not in checkpointer.all_steps():
            if checkpointer.save(step, trainer.host_state(state), data_iterator, force=force):
                rollbacks = []

    def next_batch():
        """(batch, its position), drawing and discarding the batches that rollbacks dropped."""
        nonlocal position
        while position in dropped:
            next(data_iterator)
            position += 1
        position += 1
        return next(data_iterator), position - 1

    unchecked = []  # (step, batch position, metrics) whose `finite` flag the loop has not read

    def first_nonfinite():
        """(step, batch position, host metrics) of the first unchecked step that was not
        finite, or None. Reads the flags (called where the loop syncs anyway)."""
        nonlocal unchecked
        checking, unchecked = unchecked, []
        if policy == "skip" or not checking:  # skip: the step undid it; nothing to do here
            return None
        for (s, p, m), flag in zip(
            checking, jax.device_get([m["finite"] for _, _, m in checking]), strict=True
        ):
            if not np.all(flag):  # pmap: one per device, all equal
                return s, p, jax.device_get(m)
        return None

    def last_good_checkpoint():
        """(its step or None, a phrase for messages), after the saves in flight have landed
        (they hold states from before any non-finite step)."""
        checkpointer.wait()
        last = checkpointer.latest_step()
        return last, (
            f"the last checkpoint (step {last}) is kept"
            if last is not None
            else "no checkpoint had been saved"
        )

    def handle_nonfinite(bad):
        """abort: raise. rollback: restore the last good state, drop the bad step's batch;
        -> (state, step) to continue from."""
        nonlocal position, skipped_batches, rollbacks
        bad_step, bad_position, metrics = bad
        last, kept = last_good_checkpoint()
        what = _describe_nonfinite(bad_step, metrics)
        lower = _LOWER_LR
        if policy == "abort":
            raise NonFiniteError(
                f"{what}. Stopped (train.nonfinite=abort), saving nothing after it: {kept}. "
                f"{lower}; or set train.nonfinite=skip or rollback to train past bad batches."
            )
        if last is None and initial_data is None:  # resumed, and the checkpoints are gone since
            raise NonFiniteError(
                f"{what}, and there is no checkpoint in {workdir} to roll back to. {lower}."
            )
        if len(rollbacks) >= ROLLBACK_LIMIT:
            again = {entry["position"] for entry in rollbacks}
            skipped_batches = [entry for entry in skipped_batches if entry["position"] not in again]
            dropped.difference_update(again)
            _write_skipped_batches(workdir, skipped_batches)
            raise NonFiniteError(
                f"{what}, after {len(rollbacks)} rollbacks (train.nonfinite=rollback) with no checkpoint "
                f"saved in between: the run diverges rather than meeting bad batches. Stopped: {kept}, and "
                f"the batches those rollbacks dropped ({sorted(again)}) are not recorded in {SKIPPED_BATCHES}. "
                f"{lower}."
            )
        if last is not None:
            restored_step, host = checkpointer.restore(trainer.abstract_state, data_iterator)
        else:
            restored_step, host = 0, trainer.init_fn(train_config.seed)
            data_iterator.set_state(copy.deepcopy(initial_data))
        entry = {"position": bad_position, "step": bad_step, "restored_step": restored_step}
        skipped_batches.append(entry)
        rollbacks.append(entry)
        dropped.add(bad_position)
        _write_skipped_batches(workdir, skipped_batches)
        position = _data_position(restored_step, dropped)
        logging.warning(
            "%s. Rolled back to step %d (train.nonfinite=rollback); batch %d of the data "
            "stream is dropped, recorded in %s",
            what,
            restored_step,
            bad_position,
            workdir / SKIPPED_BATCHES,
        )
        return trainer.to_device_state(host), restored_step

    if start == 0 and train_config.eval_at_start and evaluators:
        initial = run_evaluators(state)
        writer.write(0, initial)
        logging.info("before training: %s", initial)
        if jax.process_index() == 0:
            print("step 0: " + ", ".join(f"{k} {v:.4f}" for k, v in initial.items()), flush=True)

    window_tokens, window_start, window_steps, window_wait = 0.0, time.perf_counter(), 0, 0.0
    pending = []  # (step, metrics) since the last log
    skips_in_a_row = 0  # skip: steps skipped up to the last logged one (SKIP_LIMIT)
    step = start
    stop = False  # a preemption notice: save and stop
    try:
        with _Preemption() as preemption:
            while step < total and not (stop := preemption.reached(step)):
                waited = time.perf_counter()
                batch, batch_position = next_batch()
                window_wait += time.perf_counter() - waited
                state, metrics = trainer.train_step(state, trainer.put_batch(batch))
                step += 1
                pending.append((step, metrics))
                unchecked.append((step, batch_position, metrics))
                window_steps += 1
                is_eval = train_config.eval_every and step % train_config.eval_every == 0
                is_log = step % train_config.log_every == 0 or is_eval or step == total
                is_save = step % train_config.checkpoint_every == 0 or step == total
                if is_log or is_save:
                    bad = first_nonfinite()
                    if bad is not None:  # abort raises; rollback goes back to a good state
                        state, step = handle_nonfinite(bad)
                        pending = []
                        window_tokens, window_start, window_steps, window_wait = (
                            0.0,
                            time.perf_counter(),
                            0,
                            0.0,
                        )
                        if progress is not None:
                            progress.n = step
                            progress.refresh()
                        continue
                if is_log:
                    steps, host_metrics = zip(*jax.device_get(pending), strict=True)
                    if trainer.use_pmap:
                        host_metrics = [jax.tree.map(lambda x: x[0], m) for m in host_metrics]
                    pending = []
                    window_tokens += sum(
                        t for t in (float(m["tokens"]) for m in host_metrics) if math.isfinite(t)
                    )
                    elapsed = time.perf_counter() - window_start
                    last = host_metrics[-1]
                    tokens_per_sec = window_tokens / max(elapsed, 1e-9)
                    logged = {"loss": float(last["loss"])}  # then the step's other metrics
                    logged |= {
                        k: float(v)
                        for k, v in last.items()
                        if k not in ("loss", "tokens", "finite", "nonfinite_skipped")
                    }
                    logged |= {
                        "tokens_per_sec": tokens_per_sec,
                        "steps_per_sec": window_steps / max(elapsed, 1e-9),
                        # The share of the window spent waiting for batches: a starving run.
                        "data_wait_fraction": window_wait / max(elapsed, 1e-9),
                    }
                    if hasattr(data_iterator, "data_metrics"):  # the LM pipeline's: a mixture's
                        logged |= data_iterator.data_metrics()
                    if peak > 0:
                        logged["mfu"] = tokens_per_sec * flops / peak
                    if policy == "skip":
                        logged["nonfinite_skipped"] = int(last["nonfinite_skipped"])
                        skipped_now = [
                            s for s, m in zip(steps, host_metrics, strict=True) if not m["finite"]
                        ]
                        if skipped_now:
                            logging.warning(
                                "steps %s were not finite and changed nothing (train.nonfinite=skip); "
                                "%d skipped in all",
                                skipped_now,
                                logged["nonfinite_skipped"],
                            )
                        for m in host_metrics:
                            skips_in_a_row = 0 if m["finite"] else skips_in_a_row + 1
                    elif policy == "rollback" or dropped:
                        logged["nonfinite_skipped"] = sum(p < position for p in dropped)
                    if is_eval or step == total:
                        logged.update(run_evaluators(state))
                    writer.write(step, logged)
                    if skips_in_a_row >= SKIP_LIMIT:
                        raise NonFiniteError(
                            f"steps {step - skips_in_a_row + 1} to {step} were all not finite and changed nothing "
                            f"(train.nonfinite=skip): {SKIP_LIMIT} or more in a row mean the state, not a batch, "
                            f"is broken. Stopped: {last_good_checkpoint()[1]}. {_LOWER_LR}."
                        )
                    if progress is not None:
                        progress.set_postfix(
                            loss=f"{logged['loss']:.3f}",
                            tok_s=f"{tokens_per_sec:,.0f}",
                            mfu=f"{logged.get('mfu', 0):.1%}",
                            refresh=False,
                        )
                    else:
                        logging.info("step %d %s", step, logged)
                    window_tokens, window_start, window_steps, window_wait = (
                        0.0,
                        time.perf_counter(),
                        0,
                        0.0,
                    )
                if progress is not None:
                    progress.update(1)
                if is_save:
                    save(state, step)
            if stop and step < total:
                bad = first_nonfinite()
                if bad is not None:  # rollback: back at a saved step, which is not saved again
                    state, step = handle_nonfinite(bad)
                save(state, step, force=True)
        checkpointer.wait()
    finally:  # also on errors: saves in flight (all of finite states) land
        checkpointer.close()
        writer.close()
        if progress is not None:
            progress.close()
    host = trainer.host_state(state)
    if on_end is not None and step == total:
        on_end(host)
    return host
