"""How an in-context-learning experiment trains: through `lm.train`'s one loop.

An ICL experiment's config is an ordinary one (sections model, optimizer, train, parallel)
plus an `icl` section whose `kind` names the experiment (`regression`, `induction`) and whose
other fields are that experiment's dataclass. Each kind's module turns a resolved config into
an `IclRun`: a `Trainer` built for its model and objective (lm.train.Objective), a batch
source (lm.train.IndexedBatches: batches are a pure function of their position), evaluators
(`state -> metrics`, logged as `<name>/<metric>` every train.eval_every steps and at the end)
and an `on_end` hook that writes its results. `run_experiment` then trains it with
`lm.train.train_loop`, so an ICL run saves on SIGTERM, resumes exactly after a crash, runs on
a mesh, shows progress and can be swept like any other run.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

import jax
import ml_collections

from lm import checkpoint, history, lease, parallel, storage
from lm.config import filled_sections
from lm.models.transformer import ModelConfig
from lm.parallel import ParallelConfig
from lm.train import (
    IndexedBatches,
    Objective,
    OptimizerConfig,
    TrainConfig,
    Trainer,
    create_trainer,
    train_loop,
)

SECTIONS = ("icl", "model", "optimizer", "train", "parallel")
# TrainConfig fields that belong to text runs: an ICL config must leave them at their defaults.
TEXT_ONLY_TRAIN_FIELDS = ("eval_tasks", "init_from", "lora_rank", "sample_prompt")


@dataclasses.dataclass(frozen=True)
class IclConfigs:
    """The resolved sections of an ICL experiment."""

    icl: Any  # the kind's dataclass (RegressionConfig, InductionConfig)
    model: ModelConfig
    optimizer: OptimizerConfig
    train: TrainConfig
    parallel: ParallelConfig

    def as_dict(self) -> dict[str, Any]:
        """{section: values}, as config.json holds them."""
        return {
            name: json.loads(json.dumps(dataclasses.asdict(getattr(self, name)), default=str))
            for name in SECTIONS
        }


@dataclasses.dataclass(frozen=True)
class IclRun:
    """Everything `run_experiment` hands to `train_loop`, built by a kind's `build_run`.

    on_end: final host state -> the experiment's results (also written to the workdir); it is
      called when the run reaches train.steps, also on a rerun of a finished run.
    seq_len: positions per example (for the FLOPs estimate).
    """

    configs: IclConfigs
    trainer: Trainer
    batches: IndexedBatches
    evaluators: dict[str, Callable[[Any], dict[str, float]]]
    on_end: Callable[[Any], dict[str, Any]]
    seq_len: int


def experiment(
    icl_cls: type, defaults: dict[str, dict[str, Any]], **overrides: dict[str, Any] | None
) -> ml_collections.ConfigDict:
    """A complete ICL config: sections icl (`icl_cls`), model, optimizer, train and parallel
    with every field present (so each can be overridden from the command line): the
    dataclasses' defaults, then the kind's `defaults` {section: values}, then `overrides`
    {section: values}. A misspelt section or key is an error that names it."""
    unknown = sorted(set(overrides) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; use {list(SECTIONS)}")
    classes = {
        "icl": icl_cls,
        "model": ModelConfig,
        "optimizer": OptimizerConfig,
        "train": TrainConfig,
        "parallel": ParallelConfig,
    }
    return filled_sections(
        {name: (cls, defaults.get(name, {}), overrides.get(name)) for name, cls in classes.items()}
    )


def section_values(config) -> dict[str, dict[str, Any]]:
    """ConfigDict (or dict) -> {section: values}, refusing sections an ICL run does not have."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    unknown = sorted(set(values) - set(SECTIONS))
    if unknown:
        raise ValueError(
            f"unknown config section(s) {unknown} for an in-context-learning experiment; "
            f"it has {list(SECTIONS)}"
        )
    return {name: dict(values.get(name, {})) for name in SECTIONS}


def build_common(
    values: dict[str, dict[str, Any]],
) -> tuple[OptimizerConfig, TrainConfig, ParallelConfig]:
    """The optimizer, train and parallel sections, validated; text-only train fields refused."""
    train = TrainConfig.from_dict(values["train"])
    defaults = TrainConfig()
    changed = [k for k in TEXT_ONLY_TRAIN_FIELDS if getattr(train, k) != getattr(defaults, k)]
    if changed:
        raise ValueError(
            f"train.{changed[0]} applies to text runs only; an in-context-learning experiment "
            "trains its own data from scratch: remove the override"
        )
    return (
        OptimizerConfig.from_dict(values["optimizer"]),
        train,
        ParallelConfig.from_dict(values["parallel"]),
    )


def make_trainer(configs: IclConfigs, model, objective: Objective) -> Trainer:
    """The run's Trainer: mesh, shardings, compiled step for `model` and `objective`.
    Refuses an icl.batch_size that the mesh's batch axes cannot split evenly."""
    parallel.initialize_distributed(configs.parallel)
    parallel.check_batch_split("icl.batch_size", configs.icl.batch_size, configs.parallel)
    trainer = create_trainer(
        configs.model,
        model,
        configs.optimizer,
        configs.train.steps,
        configs.parallel,
        seed=configs.train.seed,
        objective=objective,
    )
    return trainer


def check_workdir(workdir, resolved: dict[str, Any], icl_keys: tuple[str, ...]) -> None:
    """Refuses a workdir that holds a run of another model or another task (`icl_keys`)."""
    saved, _ = checkpoint.saved_run(workdir)
    checkpoint.check_compatible(saved, resolved, sections=("model",))
    if saved is None:
        return
    for key in ("kind", *icl_keys):
        old, new = saved.get("icl", {}).get(key), resolved["icl"][key]
        if old != new:
            raise checkpoint.CheckpointMismatchError(
                f"this workdir holds a run with icl.{key}={old!r}, not {new!r}; use a new --workdir"
            )


def process_rows(batch_size: int):
    """The rows of a global batch that this process feeds (`lm.parallel.global_batch` takes
    process-local rows): a slice, checked to divide evenly."""
    count, index = jax.process_count(), jax.process_index()
    if batch_size % count:
        raise ValueError(f"icl.batch_size={batch_size} must be divisible by the {count} processes")
    local = batch_size // count
    return slice(index * local, (index + 1) * local)


def train_run(build_run, config, workdir, started_at: float | None = None) -> dict[str, Any]:
    """Trains (or resumes) the ICL run that ``build_run(config, workdir)`` assembles (an
    `IclRun`) in ``workdir``, holding its lease (`lm.lease`), then writes and returns its
    results (see the kind's module). A resume that changes the run is refused (`lm.history`;
    the prompts are synthetic: there are no data files to fingerprint). started_at: when the
    process started, for the goodput ledger (None: when training begins)."""
    workdir = storage.as_path(workdir)
    _, train, par = build_common(section_values(config))
    parallel.initialize_distributed(par)
    with lease.hold_workdir(workdir, train.lease_timeout_s) as held:
        saved, step = checkpoint.saved_run(workdir)
        run = build_run(config, workdir)
        values = run.configs.as_dict()
        entry = history.start_entry(workdir, values, {}, step, saved)
        history.write_start(workdir, values, entry)
        results: dict[str, Any] = {}

        def on_end(state):
            results.update(run.on_end(state))

        train_loop(
            run.trainer,
            run.configs.train,
            workdir,
            run.batches,
            evaluators=run.evaluators,
            seq_len=run.seq_len,
            on_end=on_end,
            lease=held,
            record=values,
            started_at=started_at,
        )
    return results
