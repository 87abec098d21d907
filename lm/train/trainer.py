"""`Trainer` and `create_trainer`: the model, optimizer and steps compiled for a mesh (jit) or for
pmap, with or without LoRA.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from lm import lora, parallel
from lm.models.transformer import (
    ModelConfig,
    to_layout,
    unstack_layers,
)
from lm.train.config import check_nonfinite_policy
from lm.train.objective import LANGUAGE_MODELLING, Objective
from lm.train.optim import OptimizerConfig, learning_rate_schedule, make_optimizer
from lm.train.step import (
    LoraTrainState,
    TrainState,
    make_eval_step,
    make_train_step,
    mean_eval_metrics,
)
from lm.utils import count_params, tree_differences


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

    # Where jit and pmap differ, these say how (the loop and evaluators call only these).

    def put_batch(self, local_batch):
        """Process-local numpy batch -> device arrays laid out for the step."""
        if self.use_pmap:
            return jax.device_put(parallel.split_for_pmap(local_batch))
        return parallel.global_batch(local_batch, self.mesh)

    def to_device_state(self, state):
        """A host state as the step takes it (replicated on every device under pmap)."""
        return parallel.replicate(state) if self.use_pmap else state

    def host_state(self, state):
        """The state as the checkpoint and evaluators see it (not replicated)."""
        return parallel.unreplicate(state) if self.use_pmap else state

    def host_metrics(self, metrics):
        """A step's fetched metrics, one value each (pmap gives one per device, all equal)."""
        return jax.tree.map(lambda x: x[0], metrics) if self.use_pmap else metrics

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
        return mean_eval_metrics(
            self.eval_step(params, parallel.global_batch(local, self.mesh)) for local in batches
        )


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
    lora_config = lora_config if lora_config is not None and lora_config.enabled else None
    schedule = learning_rate_schedule(opt_config, total_steps)
    optimizer = make_optimizer(opt_config, schedule)
    mesh = parallel.make_mesh(parallel_config.mesh, devices)
    inputs = objective.init_inputs(model_config)
    replicated = NamedSharding(mesh, P())
    abstract_boxed = jax.eval_shape(
        lambda rng: model.init(rng, **inputs)["params"], jax.random.PRNGKey(0)
    )
    parallel.check_rules_apply(parallel_config, abstract_boxed)
    rules = parallel_config.logical_rules
    p_shardings = parallel.param_shardings(abstract_boxed, mesh, rules)
    abstract_params = nn.meta.unbox(abstract_boxed)
    init_params = _fitted(init_params, abstract_params, model_config)
    trained = _Trained(model, inputs, abstract_boxed, lora_config)
    abstract_trainable, trainable_shardings = trained.abstract(mesh, rules, p_shardings)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_trainable)
    opt_shardings = parallel.matching_shardings(
        abstract_opt, abstract_trainable, trainable_shardings, mesh
    )
    shardings = dict(params=trainable_shardings, opt_state=opt_shardings, frozen=p_shardings)
    state_shardings = trained.state(step=replicated, rng=replicated, **shardings)
    init = functools.partial(trained.init_state, optimizer)
    abstract_state = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        jax.eval_shape(init, seed),
        state_shardings,
    )
    init_fn = _init_fn(init, state_shardings, init_params, trained.model_params(abstract_state))
    eval_step = jax.jit(
        parallel.with_activation_layout(make_eval_step(model, objective), mesh, rules),
        in_shardings=(p_shardings, parallel.batch_sharding(mesh)),
    )
    step_shardings = _StepShardings(mesh, rules, state_shardings, p_shardings, replicated)

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
        return _compile_step(step_fn, parallel_config.use_pmap, lora_config, step_shardings)

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
        train_step=build_step(nonfinite == "skip"),
        eval_step=eval_step,
        num_params=count_params(abstract_params),
        num_trainable=count_params(abstract_trainable),
        param_shardings=p_shardings,
        lora=lora_config,
        merge_fn=trained.merge_fn(p_shardings),
        skip_nonfinite=nonfinite == "skip",
        build_step=build_step,
    )


def _fitted(init_params, abstract_params, model_config: ModelConfig):
    """`init_params` checked layer by layer against the model's (the names a user can find in
    the source), then laid out as this model's layers are (imports and older runs come
    unrolled); None stays None."""
    if init_params is None:
        return None
    check_params_fit(unstack_layers(init_params), unstack_layers(abstract_params))
    return to_layout(init_params, model_config)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: jit holds its methods
class _Trained:
    """What a step trains and what it leaves frozen: every parameter of the model (no LoRA),
    or LoRA adapters (`lm.lora`) beside the frozen base, and how to merge them back."""

    model: nn.Module
    inputs: dict
    abstract_boxed: Any  # the model's parameters as abstract boxed arrays
    lora: lora.LoraConfig | None

    def abstract(self, mesh, rules, p_shardings):
        """(the trained parameters as abstract arrays, their shardings)."""
        if self.lora is None:
            return nn.meta.unbox(self.abstract_boxed), p_shardings
        adapters = jax.eval_shape(
            lambda rng: lora.init(rng, self.abstract_boxed, self.lora), jax.random.PRNGKey(0)
        )
        return nn.meta.unbox(adapters), parallel.param_shardings(adapters, mesh, rules)

    def state(self, *, frozen, **fields):
        """The train state (or its shardings) of these fields, the frozen base's with LoRA."""
        return (
            TrainState(**fields) if self.lora is None else LoraTrainState(**fields, frozen=frozen)
        )

    def model_params(self, state):
        """The model's own parameters in a state: `params`, or LoRA's `frozen` base."""
        return state.params if self.lora is None else state.frozen

    def init_state(self, optimizer, seed_value, params=None):
        """The initial state from a seed (and the model's parameters, else a random init)."""
        init_rng, train_rng = jax.random.split(jax.random.PRNGKey(seed_value))
        if params is None:
            params = nn.meta.unbox(self.model.init(init_rng, **self.inputs)["params"])
        step = jnp.array(0, jnp.int32)
        if self.lora is None:
            return self.state(
                step=step,
                params=params,
                opt_state=optimizer.init(params),
                rng=train_rng,
                frozen=None,
            )
        # fold_in: the base's random init (without init_params) stays that of full training.
        adapters = nn.meta.unbox(
            lora.init(jax.random.fold_in(init_rng, 1), self.abstract_boxed, self.lora)
        )
        return self.state(
            step=step,
            params=adapters,
            opt_state=optimizer.init(adapters),
            rng=train_rng,
            frozen=params,
        )

    def merge_fn(self, p_shardings):
        """jit(frozen, adapters) -> merged parameters with LoRA, else None."""
        if self.lora is None:
            return None
        config = self.lora
        return jax.jit(
            lambda frozen, adapters: lora.merge(frozen, adapters, config), out_shardings=p_shardings
        )


def _init_fn(init, state_shardings, init_params, abstract_model_params):
    """seed -> the initial state laid out on the mesh (from `init_params` when given)."""
    # The params argument is a fresh device copy made by init_fn: donate it to the state.
    jit_init = jax.jit(init, static_argnums=0, out_shardings=state_shardings, donate_argnums=1)
    if init_params is None:
        return jit_init

    def init_fn(seed_value):
        return jit_init(seed_value, parallel.put_params(init_params, abstract_model_params))

    return init_fn


@dataclasses.dataclass(frozen=True, eq=False)
class _StepShardings:
    """Where a train step's arguments and results live."""

    mesh: Any
    rules: Any
    state: Any
    params: Any
    replicated: Any


def _compile_step(step_fn, use_pmap: bool, lora_config, shardings: _StepShardings):
    """The train step compiled: pmapped, or jitted over the mesh with the state donated; with
    LoRA it takes the frozen base as a third argument (`_frozen_beside` hides that)."""
    if use_pmap:
        step = jax.pmap(step_fn, axis_name="batch", donate_argnums=0)
        return step if lora_config is None else _frozen_beside(step)
    step_fn = parallel.with_activation_layout(step_fn, shardings.mesh, shardings.rules)
    batch = parallel.batch_sharding(shardings.mesh)
    if lora_config is None:
        return jax.jit(
            step_fn,
            in_shardings=(shardings.state, batch),
            out_shardings=(shardings.state, shardings.replicated),
            donate_argnums=0,
        )
    trainable = shardings.state.replace(frozen=None)
    step = jax.jit(
        step_fn,
        in_shardings=(trainable, batch, shardings.params),
        out_shardings=(trainable, shardings.replicated),
        donate_argnums=0,
    )
    return _frozen_beside(step)


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
