"""A training run assembled from a resolved experiment config, and the evaluators it uses.

`train(config, workdir)` is what `python -m lm.main --config FILE --workdir DIR` does: it
resolves the config, builds the tokenizer, model and trainer (`build_run`, honouring
`train.init_from` through `lm.finetune`), writes config.json, and runs `lm.train.train_loop`
with the periodic evaluators (`loss_evaluator`, `task_evaluator`), then writes samples.
`split_loss` is the same loss evaluation for a model read for inference (`lm.main eval`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
from typing import Any

import jax

from lm import checkpoint, finetune, history, parallel, storage
from lm import config as config_lib
from lm import lease as lease_lib
from lm.data import pipeline, sources
from lm.data.pipeline import DataConfig
from lm.decode import samples
from lm.evaluation import evaluate, get_tasks
from lm.evaluation.model import harness_model
from lm.icl import experiments
from lm.models.transformer import ModelConfig, build_model
from lm.train import (
    TrainConfig,
    Trainer,
    make_eval_step,
    mean_eval_metrics,
    read_metrics,
    train_loop,
)
from lm.train.goodput import format_ledger, read_ledger
from lm.utils import gather_full


def shared_tokenizer(data_cfg: DataConfig, workdir: pathlib.Path):
    """The run's tokenizer. Process 0 prepares the data and trains the tokenizer; the others then
    load them."""
    if jax.process_count() == 1:
        return pipeline.get_tokenizer(data_cfg, str(workdir))
    from jax.experimental import multihost_utils  # not loaded by `import jax`

    tokenizer = pipeline.get_tokenizer(data_cfg, str(workdir)) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("tokenizer ready")
    return tokenizer or pipeline.get_tokenizer(data_cfg, str(workdir))


@dataclasses.dataclass(frozen=True)
class Run:
    """Everything a training run needs.

    values: the resolved config as plain dicts, model.vocab_size resolved (what config.json
      holds). config: its sections as frozen dataclasses. model_config: the model's, vocabulary
      resolved. tokenizer: the run's. trainer: mesh, shardings and compiled steps.
      start: this start's `lm.history` entry (written when training begins).
    """

    values: dict[str, Any]
    config: config_lib.RunConfig
    model_config: ModelConfig
    tokenizer: Any
    trainer: Trainer
    start: dict[str, Any]


def build_run(values: dict[str, Any], workdir: pathlib.Path) -> Run:
    """The run a resolved config dict describes, checked against what the workdir holds.

    A workdir without checkpoints of its own honours train.init_from: it adopts the source's
    tokenizer and the trainer starts from the source's parameters. CheckpointMismatchError if
    the workdir holds a run of another model or LoRA layout; RunChangedError
    (`lm.history`) if resuming would change the run's data, batch, optimizer or schedule.
    """
    config = config_lib.build(values)
    parallel.initialize_distributed(config.parallel)
    saved, step = checkpoint.saved_run(workdir)
    source = None
    if config.train.init_from:
        if step is not None:
            logging.warning(
                "init_from %s ignored: %s has checkpoints of its own, resuming them",
                config.train.init_from,
                workdir,
            )
        else:
            source = finetune.init_source(config.train.init_from)
            # Before anything is written: the vocabulary will be the source tokenizer's.
            vocab = config.model.get("vocab_size") or source.model.get("vocab_size")
            finetune.check_init_source(source, {**config.model, "vocab_size": vocab})
            finetune.adopt_tokenizer(source, config.data, workdir)
    tokenizer = shared_tokenizer(config.data, workdir)
    model_cfg = config.model_config(tokenizer.vocab_size)
    values = {**values, "model": {**config.model, "vocab_size": model_cfg.vocab_size}}
    values = json.loads(json.dumps(values, default=str))  # as config.json holds them
    checkpoint.check_compatible(saved, values, sections=("model",))
    finetune.check_lora_unchanged(saved, values)
    entry = history.start_entry(workdir, values, fingerprints(config.data, tokenizer), step, saved)
    if source is not None:
        finetune.check_init_source(source, dataclasses.asdict(model_cfg))
    trainer = config.create_trainer(
        model_cfg, init_params=source.params if source is not None else None
    )
    return Run(values, config, model_cfg, tokenizer, trainer, entry)


def fingerprints(data_cfg: DataConfig, tokenizer) -> dict[str, str]:
    """What identifies a run's data beyond its config: its files' and its tokenizer's hashes."""
    return {
        history.DATA_FILES: sources.data_fingerprint(data_cfg),
        history.TOKENIZER: tokenizer.fingerprint(),
    }


def _bits_per_byte(metrics: dict, data_cfg: DataConfig, bytes_per_token: float) -> dict:
    """The metrics, with bits per byte of text added for language modelling."""
    if data_cfg.task == "lm":
        metrics["bits_per_byte"] = metrics["loss"] / math.log(2) / bytes_per_token
    return metrics


def loss_evaluator(
    trainer: Trainer, data_cfg: DataConfig, tokenizer, split: str, seed: int, max_batches: int = 0
):
    """state -> {loss, perplexity, bits_per_byte (language modelling), accuracy, tokens} over a
    split (its first `max_batches` batches if > 0), for periodic evaluation."""
    bytes_per_token = pipeline.bytes_per_token(data_cfg, split, tokenizer)
    # Every process must run the same number of (collective) eval steps.
    num_batches = max_batches or None
    if jax.process_count() > 1:
        num_batches = pipeline.count_batches(
            data_cfg, split, tokenizer, seed=seed, process_count=jax.process_count()
        )
        num_batches = min(num_batches, max_batches) if max_batches else num_batches

    def evaluate_split(state):
        batches = pipeline.make_dataset(
            data_cfg,
            split,
            tokenizer,
            seed=seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            repeat=False,
            num_batches=num_batches,
        )
        return _bits_per_byte(trainer.evaluate(state, iter(batches)), data_cfg, bytes_per_token)

    return evaluate_split


def split_loss(saved: checkpoint.SavedModel, split: str) -> dict[str, float]:
    """{loss, accuracy, perplexity, tokens, bits_per_byte (language modelling)} of a model read
    for inference over a split of its run's data, in one process, with no optimizer built."""
    data_cfg = saved.data_config
    seed = TrainConfig.from_dict(saved.sections.get("train", {})).seed
    model = build_model(saved.config)
    step = jax.jit(make_eval_step(model))
    batches = pipeline.make_dataset(
        data_cfg, split, saved.tokenizer, seed=seed, process_index=0, process_count=1, repeat=False
    )
    params = jax.device_put(saved.params)  # once, not with every step
    metrics = mean_eval_metrics(step(params, batch) for batch in batches)
    bytes_per_token = pipeline.bytes_per_token(data_cfg, split, saved.tokenizer)
    return _bits_per_byte(metrics, data_cfg, bytes_per_token)


def task_evaluator(trainer: Trainer, tokenizer, data_cfg: DataConfig, train_cfg: TrainConfig):
    """state -> {<task>/<metric>: value} with the harness (train.eval_tasks), for periodic
    evaluation; process 0 evaluates, the others return {}."""
    tasks = get_tasks([t.strip() for t in train_cfg.eval_tasks.split(",") if t.strip()], data_cfg)
    fewshot = None if train_cfg.eval_tasks_fewshot < 0 else train_cfg.eval_tasks_fewshot

    def evaluate_tasks(state):
        params = gather_full(trainer.model_params(state))  # every process holds only shards
        if jax.process_index() != 0:
            return {}
        lm = harness_model(
            trainer.model, params, tokenizer, data_cfg, batch_size=16, max_length=data_cfg.seq_len
        )
        results = evaluate(lm, tasks, num_fewshot=fewshot, limit=train_cfg.eval_tasks_limit or None)
        return {
            f"{name}/{metric}": value
            for name, r in results["tasks"].items()
            for metric, value in r["metrics"].items()
            if not metric.endswith("_stderr")
        }

    return evaluate_tasks


def default_prompts(data_cfg: DataConfig, sample_prompt: str = "") -> list[str]:
    """What to sample from when no prompt is given: train.sample_prompt, else three validation
    sources (translation), else a newline."""
    if sample_prompt:
        return [sample_prompt]
    if data_cfg.task == "translation":
        from lm.data.sources import get_source

        source = get_source(data_cfg, "validation")
        return [source[i]["source"] for i in range(min(3, len(source)))]
    return ["\n"]


def train(config, workdir: pathlib.Path, started_at: float | None = None) -> None:
    """Trains (or resumes) the experiment `config` (a ConfigDict) in `workdir`, holding its
    lease (`lm.lease`); prints the model, the unigram baseline, the final validation loss and
    samples, which it also writes to WORKDIR/samples.txt. Every check of the config, the mesh
    and the workdir comes before any work. started_at: when the process started, where the
    goodput ledger's startup begins (None: when training begins)."""
    values = config_lib.resolve(config)
    checked = config_lib.build(values)
    parallel.initialize_distributed(checked.parallel)
    parallel.check_batch_split("data.batch_size", checked.data.batch_size, checked.parallel)
    with lease_lib.hold_workdir(workdir, checked.train.lease_timeout_s) as lease:
        _train(build_run(values, workdir), workdir, lease, started_at)


def _unigram_baseline(run: Run, workdir) -> float:
    """The unigram entropy of the validation split in nats per token, computed once per data
    and tokenizer (kept in WORKDIR/baseline.json with their fingerprints)."""
    path = workdir / "baseline.json"
    identity = {k: run.start[k] for k in (history.DATA_FILES, history.TOKENIZER)}
    if path.exists():
        saved = json.loads(path.read_text())
        if all(saved.get(k) == v for k, v in identity.items()):
            return saved["unigram_loss"]
    baseline = pipeline.unigram_entropy(run.config.data, run.tokenizer)
    storage.write_atomic(path, json.dumps({"unigram_loss": baseline, **identity}))
    return baseline


def _train(run: Run, workdir, lease, started_at: float | None) -> None:
    trainer, tokenizer, data_cfg, train_cfg = (
        run.trainer,
        run.tokenizer,
        run.config.data,
        run.config.train,
    )
    history.write_start(workdir, run.values, run.start)
    if jax.process_index() == 0:
        print(
            f"model: {trainer.parameter_summary()} ({run.model_config.architecture}); "
            f"mesh {dict(trainer.mesh.shape)}; tokenizer: {tokenizer.vocab_size} pieces"
        )
    data = iter(
        pipeline.make_dataset(
            data_cfg,
            "train",
            tokenizer,
            seed=train_cfg.seed,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
            repeat=True,
        )
    )
    evaluators = {
        "eval": loss_evaluator(
            trainer, data_cfg, tokenizer, "validation", train_cfg.seed, train_cfg.eval_batches
        )
    }
    if train_cfg.eval_tasks:
        evaluators["tasks"] = task_evaluator(trainer, tokenizer, data_cfg, train_cfg)
    if data_cfg.task == "lm" and jax.process_index() == 0:
        baseline = _unigram_baseline(run, workdir)
        print(f"unigram baseline on validation: {baseline:.3f} nats/token")

    def on_end(state):
        params = gather_full(trainer.model_params(state))  # every process holds only shards
        if jax.process_index() != 0:
            return
        texts = samples(
            trainer.model,
            params,
            tokenizer,
            data_cfg,
            default_prompts(data_cfg, train_cfg.sample_prompt),
            max_new_tokens=train_cfg.sample_tokens,
            temperature=train_cfg.sample_temperature,
            seed=train_cfg.seed,
        )
        text = "\n\n".join(texts)
        storage.write_atomic(workdir / "samples.txt", text + "\n")
        print("\n===== samples =====\n" + text + "\n===================")

    state = train_loop(
        trainer,
        train_cfg,
        workdir,
        data,
        evaluators=evaluators,
        seq_len=data_cfg.seq_len,
        on_end=on_end,
        lease=lease,
        record=run.values,
        started_at=started_at,
    )
    final = read_metrics(workdir)
    evals = [m for m in final if "eval/loss" in m]
    if evals and jax.process_index() == 0:
        last = evals[-1]
        print(
            f"step {int(state.step)}: validation loss {last['eval/loss']:.4f}, "
            f"perplexity {last['eval/perplexity']:.2f}"
            + (
                f", bits/byte {last['eval/bits_per_byte']:.4f}"
                if "eval/bits_per_byte" in last
                else ""
            )
        )


def run_summary(workdir: pathlib.Path) -> str:
    """What a workdir's run has done, as text: steps saved of steps asked for, its starts
    (history.json), the last logged metrics, and where the wall time went (the goodput ledger,
    `lm.train.goodput`). Reads only; a workdir with none of these files is an error."""
    saved = checkpoint.read_config(workdir) if (workdir / history.CONFIG_FILE).exists() else None
    starts, rows, runs = history.read_history(workdir), read_metrics(workdir), read_ledger(workdir)
    if saved is None and not (starts or rows or runs):
        raise ValueError(f"{workdir} holds no run (no config.json): pass the workdir of a run")
    step = checkpoint.latest_saved_step(workdir)
    asked = (saved or {}).get("train", {}).get("steps", "?")
    lines = [f"{workdir}: {step or 0} of {asked} steps saved (the latest checkpoint)"]
    if starts:
        last = starts[-1]
        lines.append(f"{len(starts)} start(s); the last at step {last['step']}, {last['time']}")
    if rows:
        shown = {k: v for k, v in rows[-1].items() if k == "loss" or k.startswith("eval/")}
        values = ", ".join(f"{k} {v:.4f}" for k, v in shown.items())
        lines.append(f"last logged step {rows[-1]['step']}: {values}")
    if runs:
        lines.append(format_ledger(runs))
    return "\n".join(lines)


def experiment_kind(config) -> str:
    """'text' for a language-modelling experiment, else its ``icl.kind`` (an experiment file
    with an ``icl`` section: `lm.icl.experiments.KINDS`)."""
    return config["icl"].get("kind", "") if "icl" in config else "text"


def run(config, workdir: pathlib.Path, started_at: float | None = None) -> None:
    """Trains (or resumes) the experiment ``config`` in ``workdir``, whatever its kind
    (started_at: see `train`)."""
    if experiment_kind(config) == "text":
        train(config, workdir, started_at)
    else:
        experiments.run_experiment(config, workdir, started_at)
