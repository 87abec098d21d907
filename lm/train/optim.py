"""The optimizer of a run: `OptimizerConfig`, a registry of optax optimizers by name (any other
optax optimizer by ``'optax:FUNCTION'``), and the learning-rate schedule.

A new optimizer is one entry of `OPTIMIZERS`: a function of (config, schedule) that returns the
optax transformation. Gradient clipping (``clip_norm``) and the loop's non-finite policy wrap
whatever it returns.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping

import jax
import optax

from lm.utils import config_from_dict


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer and its learning-rate schedule.

    name: an entry of `OPTIMIZERS` ('adamw', 'adafactor', 'lion'), or ``'optax:FUNCTION'``,
      any optax optimizer by its function (``'optax:sgd'``, ``'optax:contrib.muon'``), called
      with the schedule as its learning rate and ``args``.
    args: keyword arguments given to the optax function over the ones the entry derives from
      the fields below (e.g. ``{'b2': 0.99}`` for Lion, ``{'momentum': 0.9}`` for SGD).
    """

    name: str = "adamw"
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
    args: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        optax_function(self.name)  # names the problem if it is neither an entry nor optax's
        if not isinstance(self.args, Mapping):
            raise ValueError(
                f"optimizer.args must be a dict of keyword arguments, got {self.args!r}"
            )
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


def _adamw(config: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    return optax.adamw(
        schedule,
        **{
            "b1": config.b1,
            "b2": config.b2,
            "eps": config.eps,
            "weight_decay": config.weight_decay,
            "mask": _decay_mask,
        }
        | dict(config.args),
    )


def _adafactor(config: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    return optax.adafactor(
        schedule,
        **{"weight_decay_rate": config.weight_decay or None, "weight_decay_mask": _decay_mask}
        | dict(config.args),
    )


def _lion(config: OptimizerConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
    """Lion (Chen et al. 2023) with its own b1, b2 (0.9, 0.99): its update is a sign, so it
    wants a learning rate 3-10x below AdamW's and a weight decay as much higher."""
    return optax.lion(
        schedule, **{"weight_decay": config.weight_decay, "mask": _decay_mask} | dict(config.args)
    )


OPTIMIZERS: Mapping[
    str, Callable[[OptimizerConfig, optax.Schedule], optax.GradientTransformation]
] = {"adamw": _adamw, "adafactor": _adafactor, "lion": _lion}


def optax_function(name: str) -> Callable | None:
    """The optax function that ``'optax:PATH'`` names (None for an entry of `OPTIMIZERS`);
    ValueError naming the choices for anything else."""
    if name in OPTIMIZERS:
        return None
    kind, _, path = name.partition(":")
    found = functools.reduce(lambda obj, part: getattr(obj, part, None), path.split("."), optax)
    if kind != "optax" or not path or not callable(found):
        raise ValueError(
            f"optimizer.name={name!r} is neither one of {sorted(OPTIMIZERS)} nor an optax "
            "optimizer as 'optax:FUNCTION' (e.g. 'optax:sgd', 'optax:contrib.muon')"
        )
    return found


def make_optimizer(
    config: OptimizerConfig, schedule: optax.Schedule
) -> optax.GradientTransformation:
    """The optimizer `config` names, behind global-norm clipping when ``clip_norm > 0``."""
    function = optax_function(config.name)
    build = OPTIMIZERS[config.name] if function is None else None
    try:  # building only binds the arguments: a TypeError here is a bad optimizer.args
        opt = build(config, schedule) if build else function(schedule, **config.args)
    except TypeError as e:
        raise ValueError(
            f"optimizer.args={dict(config.args)} do not fit optimizer.name={config.name!r} ({e}); "
            "give the keyword arguments that its optax function takes"
        ) from e
    if config.clip_norm > 0:
        opt = optax.chain(optax.clip_by_global_norm(config.clip_norm), opt)
    return opt
