"""Command line: train | sample | eval | icl | convert.

    python -m lm.main --config experiments/shakespeare_gpt.py --workdir /tmp/gpt
    python -m lm.main --config experiments/shakespeare_gpt.py --workdir /tmp/gpt --config.train.steps=100
    python -m lm.main sample --workdir /tmp/gpt --prompt "ROMEO:"
    python -m lm.main sample --model smollm2 --prompt "The capital of France is" --temperature 0
    python -m lm.main eval --workdir /tmp/gpt --split test
    python -m lm.main eval --model smollm2 --tasks arc_easy,piqa --num_fewshot 0 --limit 100
    python -m lm.main eval --workdir /tmp/gpt --tasks heldout,heldout_order
    python -m lm.main icl --workdir /tmp/gpt --tasks heldout_order --shots 0,2,4  # few-shot curves
    python -m lm.main convert --model smollm2 --out /tmp/smollm2_hf     # or --workdir /tmp/gpt
    python -m lm.main --config experiments/shakespeare_gpt.py --workdir gs://bucket/gpt  # a bucket workdir

Rerunning the training command on a workdir resumes from its latest checkpoint.

Fine-tuning: `--config.train.init_from=/tmp/gpt` starts a new workdir from that run's
parameters (and tokenizer), `--config.train.init_from=smollm2` (or gemma3, gguf:PATH,
hf:DIR) from an imported checkpoint; `--config.train.lora_rank=8` trains LoRA adapters only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import sys
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from lm import checkpoint, lora, parallel, storage
from lm import config as config_lib
from lm.data import assets, pipeline
from lm.decode import (
    beam_search,
    beam_search_seq2seq,
    context_limit,
    cut_at_stop,
    generate,
    generate_seq2seq,
)
from lm.models.transformer import ModelConfig, build_model, dummy_inputs, for_inference
from lm.train import TrainConfig, Trainer, create_trainer, train_loop

COMMANDS = ("train", "sample", "eval", "icl", "convert")

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file (experiments/NAME.py[:arg])."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, tokenizer.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "sample: prompt(s) to continue.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "sample: tokens to generate.", lower_bound=0)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "sample: 0 = greedy.", lower_bound=0.0)
_TOP_K = flags.DEFINE_integer(
    "top_k", 0, "sample: keep the k most likely tokens (0 = all).", lower_bound=0
)
_TOP_P = flags.DEFINE_float(
    "top_p", 1.0, "sample: nucleus probability.", lower_bound=0.0, upper_bound=1.0
)
_SEED = flags.DEFINE_integer("seed", 0, "sample: random seed.")
_STOP = flags.DEFINE_multi_string(
    "stop", [], "sample: cut the continuation at this string (repeatable)."
)
_BEAMS = flags.DEFINE_integer(
    "beams", 0, "sample: beam search with this many beams (0 = sample).", lower_bound=0
)
_SPLIT = flags.DEFINE_string(
    "split", "validation", "eval without --tasks: the split whose loss to report."
)
_TASKS = flags.DEFINE_list(
    "tasks", [], "eval: harness tasks (lm.evaluation.tasks), e.g. arc_easy,piqa."
)
_NUM_FEWSHOT = flags.DEFINE_integer(
    "num_fewshot", None, "eval: examples per prompt (default: each task's).", lower_bound=0
)
_LIMIT = flags.DEFINE_integer(
    "limit", None, "eval: the first N documents of each task (per MMLU subject).", lower_bound=1
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 16, "eval: rows per compiled batch.", lower_bound=1
)
_MAX_LENGTH = flags.DEFINE_integer(
    "max_length", 2048, "eval: longest input (capped at the model's max_len).", lower_bound=1
)
_SHOTS = flags.DEFINE_list(
    "shots", ["0", "1", "2", "4", "8", "16"], "icl: numbers of demonstrations k."
)
_SEEDS = flags.DEFINE_integer(
    "seeds", 3, "icl: draws of the demonstrations per k (mean and spread).", lower_bound=1
)
_NO_CONTROL = flags.DEFINE_boolean("no_control", False, "icl: skip the random-label control.")
_PRECISION = flags.DEFINE_enum(
    "precision",
    None,
    ["fp32", "bf16"],
    "sample, eval, icl: bf16 runs bfloat16 weights and compute (default: the run's model.precision; "
    "fp32 for imported models).",
)
_MODEL = flags.DEFINE_string(
    "model",
    None,
    "sample, eval, convert: an imported model instead of a workdir: smollm2, gemma3, gguf:PATH, hf:DIR.",
)
_OUT = flags.DEFINE_string(
    "out",
    None,
    "convert: new directory for the Hugging Face layout; eval: directory for "
    "results.json and results.md (default: WORKDIR/eval, or eval/MODEL for --model).",
)


# ---------------------------------------------------------------------------------- build


def model_config_for(model_values: dict, tokenizer) -> ModelConfig:
    """The model's vocabulary is the tokenizer's unless the config pins it."""
    values = dict(model_values)
    if not values.get("vocab_size"):
        values["vocab_size"] = tokenizer.vocab_size
    elif values["vocab_size"] < tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size={values['vocab_size']} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} pieces; set model.vocab_size=0 to follow the tokenizer"
        )
    return ModelConfig.from_dict(values)


def shared_tokenizer(data_cfg, workdir: pathlib.Path):
    """Process 0 prepares the data and trains the tokenizer; the others then load them."""
    if jax.process_count() == 1:
        return pipeline.get_tokenizer(data_cfg, str(workdir))
    from jax.experimental import multihost_utils

    tokenizer = pipeline.get_tokenizer(data_cfg, str(workdir)) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("tokenizer ready")
    return tokenizer or pipeline.get_tokenizer(data_cfg, str(workdir))


# ------------------------------------------------------------------------------ init_from


@dataclasses.dataclass(frozen=True)
class InitSource:
    """Where a fine-tune's first parameters come from (`train.init_from`).

    spec: the init_from value. model: the source model's config values (vocab_size resolved),
    checked against the new model before anything is loaded. tokenizer: the source's
    tokenizer file, which a fresh workdir adopts so that token ids keep their embeddings
    (None: the source has none). load: -> host (numpy) pytree of the source's parameters.
    """

    spec: str
    model: dict[str, Any]
    tokenizer: pathlib.Path | None
    load: Callable[[], Any]


def is_lm_workdir(path: pathlib.Path) -> bool:
    """A workdir of ours: config.json with our sections, or a checkpoints folder. (A Hugging Face
    model folder also holds a config.json, but without 'model' and 'train' in it.)"""
    if (path / "checkpoints").is_dir():
        return True
    try:
        saved = checkpoint.read_config(path)
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and "model" in saved and "train" in saved


def init_source(spec: str) -> InitSource:
    """Dispatches an init_from spec: a workdir of ours, or an imported foreign checkpoint
    ('smollm2', 'gemma3', 'gguf:PATH', 'hf:DIR'; see `lm.convert`)."""
    from lm import convert

    # Workdirs of ours are recognised first: they hold a config.json too.
    if not is_lm_workdir(storage.as_path(spec)) and convert.is_pretrained_spec(spec):
        return _pretrained_source(spec)
    return _workdir_source(spec)


def _pretrained_source(spec: str) -> InitSource:
    """An imported checkpoint as an init_from source; its tokenizer is written to a temporary
    tokenizer.json that the fine-tune's workdir adopts."""
    import tempfile

    from lm import convert

    pretrained = convert.load_pretrained(spec)
    if pretrained.tokenizer is None:
        raise ValueError(
            f"train.init_from={spec!r} has no tokenizer.json; add the model's tokenizer "
            "to its directory"
        )
    tokenizer = pathlib.Path(tempfile.mkdtemp(prefix="lm-init-")) / "tokenizer.json"
    pretrained.tokenizer.save(tokenizer)
    return InitSource(
        spec=spec,
        model=dataclasses.asdict(pretrained.config),
        tokenizer=tokenizer,
        load=lambda: pretrained.params,
    )


def _checkpoint_manager(workdir: pathlib.Path):
    """A manager that only reads `<workdir>/checkpoints`: it creates and cleans up nothing, so it
    is safe on the workdir of a run that is still training. None if there is no such folder."""
    import orbax.checkpoint as ocp

    directory = checkpoint.checkpoints_dir(workdir)
    if not directory.is_dir():
        return None
    return ocp.CheckpointManager(
        directory,
        options=ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False),
        # Handlers for both items, so that Orbax does not warn about the one not read.
        item_handlers={
            "state": ocp.PyTreeCheckpointHandler(),
            "data": checkpoint.DataStateHandler(),
        },
    )


def has_checkpoint(workdir: pathlib.Path) -> bool:
    manager = _checkpoint_manager(workdir)
    if manager is None:
        return False
    try:
        return bool(manager.all_steps())
    finally:
        manager.close()


def _workdir_source(spec: str) -> InitSource:
    path = storage.as_path(spec)
    if not path.is_dir():
        raise ValueError(
            f"train.init_from={spec!r}: no such workdir; pass the --workdir of a run that has "
            "saved a checkpoint"
        )
    saved = checkpoint.read_config(path)
    if saved is None:
        raise ValueError(
            f"train.init_from={spec!r} has no config.json, so it is not the workdir of a run of "
            "lm; pass the --workdir of a trained run"
        )
    if not has_checkpoint(path):
        raise ValueError(
            f"train.init_from={spec!r} has no checkpoint yet; train it first (runs save every "
            "train.checkpoint_every steps and at the end)"
        )
    tokenizer = path / "tokenizer.model"
    if not tokenizer.exists():
        named = saved.get("data", {}).get("tokenizer")
        tokenizer = storage.as_path(named) if named else None
    return InitSource(
        spec=spec, model=saved["model"], tokenizer=tokenizer, load=lambda: read_params(path, saved)
    )


def read_params(workdir: pathlib.Path, saved_config: dict | None = None):
    """The model parameters of a workdir's latest readable checkpoint, as host numpy arrays.

    Reads only the parameters (not the optimizer state). A LoRA run's adapters are merged into
    its frozen base, so a LoRA fine-tune can be the source of the next run. An unreadable
    latest checkpoint falls back to an earlier one, with a warning.
    """
    import orbax.checkpoint as ocp

    saved_config = (
        saved_config if saved_config is not None else checkpoint.read_config(workdir) or {}
    )
    manager = _checkpoint_manager(workdir)
    steps = sorted(manager.all_steps(), reverse=True) if manager is not None else []
    error = None
    try:
        for step in steps:
            try:
                tree = manager.item_metadata(step)["state"].tree
                wanted = [k for k in ("params", "frozen") if k in tree]
                item = {
                    k: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree[k])
                    for k in wanted
                }
                restore_args = {
                    k: jax.tree.map(lambda m: ocp.RestoreArgs(restore_type=np.ndarray), tree[k])
                    for k in wanted
                }
                restored = manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.PyTreeRestore(
                            item=item, restore_args=restore_args, partial_restore=True
                        )
                    ),
                )["state"]
            except Exception as e:  # noqa: BLE001 - unreadable files: try an older checkpoint
                error = e
                logging.warning(
                    "checkpoint %s of %s is unreadable (%s); trying an earlier one",
                    step,
                    workdir,
                    e,
                )
                continue
            logging.info("init_from: parameters of %s at step %d", workdir, step)
            if "frozen" not in restored:
                return restored["params"]
            train = {**dataclasses.asdict(TrainConfig()), **saved_config.get("train", {})}
            lora_config = lora.LoraConfig.from_strings(
                train["lora_rank"], train["lora_alpha"], train["lora_targets"]
            )
            return jax.device_get(lora.merge(restored["frozen"], restored["params"], lora_config))
    finally:
        if manager is not None:
            manager.close()
    raise ValueError(f"no readable checkpoint in {workdir}: {error}")


def _param_shapes(model_values: dict) -> dict[str, tuple]:
    """{path: shape} in the unrolled layout, so that sources of either layout compare."""
    config = dataclasses.replace(ModelConfig.from_dict(model_values), scan_layers=False)
    model = build_model(config)
    abstract = jax.eval_shape(
        lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), **dummy_inputs(config))["params"])
    )
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): tuple(x.shape)
        for path, x in jax.tree_util.tree_flatten_with_path(abstract)[0]
    }


def check_init_source(source: InitSource, model_values: dict) -> None:
    """Refuses a source whose parameter shapes differ from the new model's, naming the config keys
    that differ. Keys that leave the shapes alone (dropout, dtype) may differ: a warning lists them."""
    old = dict(source.model)
    known = set(old) | {f.name for f in dataclasses.fields(ModelConfig)}
    new = json.loads(
        json.dumps({**old, **{k: v for k, v in model_values.items() if k in known}})
    )  # as saved
    for values in (old, new):  # 0 means "derived": compare what the model actually uses
        if values.get("num_heads") and values.get("d_model"):
            values["head_dim"] = values.get("head_dim") or values["d_model"] // values["num_heads"]
            values["num_kv_heads"] = values.get("num_kv_heads") or values["num_heads"]
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if not keys:
        return
    differences = "; ".join(f"model.{k}: source {old.get(k)!r}, now {new.get(k)!r}" for k in keys)
    try:
        old_shapes = _param_shapes(old)
    except ValueError as e:
        raise ValueError(
            f"train.init_from={source.spec!r}: cannot read the source's model config ({e})"
        ) from e
    new_shapes = _param_shapes(new)
    if old_shapes != new_shapes:
        changed = sorted(
            k for k in set(old_shapes) | set(new_shapes) if old_shapes.get(k) != new_shapes.get(k)
        )
        raise checkpoint.CheckpointMismatchError(
            f"train.init_from={source.spec!r} holds parameters of another shape ({len(changed)} differ, e.g. "
            f"{changed[0]}: source {old_shapes.get(changed[0])}, now {new_shapes.get(changed[0])}). "
            f"Differences: {differences}. Drop those overrides or pass the source's values "
            "(see its config.json), or init_from a run of this model."
        )
    logging.warning(
        "init_from %s: the model config differs in %s; the parameter shapes match",
        source.spec,
        differences,
    )


def adopt_tokenizer(source: InitSource, data_cfg, workdir: pathlib.Path) -> None:
    """A fresh fine-tuning workdir takes the source's tokenizer: its token ids index the source's
    embeddings. An explicit data.tokenizer wins (with a warning if it is another file)."""
    same = lambda a, b: a.read_bytes() == b.read_bytes()
    if data_cfg.tokenizer:
        if source.tokenizer is not None and not same(
            storage.as_path(data_cfg.tokenizer), source.tokenizer
        ):
            logging.warning(
                "data.tokenizer=%s is not the tokenizer of init_from %s: token ids may not match "
                "the source's embeddings",
                data_cfg.tokenizer,
                source.spec,
            )
        return
    if source.tokenizer is None:
        raise ValueError(
            f"train.init_from={source.spec!r} has no tokenizer and names no "
            "data.tokenizer; set --config.data.tokenizer to the tokenizer the source was "
            "trained with"
        )
    target = workdir / (
        "tokenizer.json" if source.tokenizer.suffix == ".json" else "tokenizer.model"
    )
    if target.exists():
        if not same(target, source.tokenizer):
            raise checkpoint.CheckpointMismatchError(
                f"{workdir} already holds another tokenizer than init_from {source.spec!r}; "
                "use a new --workdir"
            )
        return
    if jax.process_index() == 0:
        storage.write_atomic(target, source.tokenizer.read_bytes())


def _check_lora_unchanged(saved: dict | None, values: dict) -> None:
    """A workdir's LoRA layout is fixed by its first run: its checkpoints hold those adapters."""
    if saved is None:
        return
    defaults = dataclasses.asdict(TrainConfig())
    keys = ("lora_rank", "lora_alpha", "lora_targets")
    pick = lambda v: {"train": {k: v.get("train", {}).get(k, defaults[k]) for k in keys}}
    checkpoint.check_compatible(pick(saved), pick(values), sections=("train",))


def build_run(values: dict, workdir: pathlib.Path, *, training: bool = False):
    """Everything a run needs, from a resolved config dict: (values, tokenizer, trainer, configs).

    training: honour train.init_from (when the workdir has no checkpoint of its own yet):
      adopt the source's tokenizer and start from its parameters.
    """
    model_values, data_cfg, opt_cfg, train_cfg, par_cfg = config_lib.build(values)
    parallel.initialize_distributed(par_cfg)
    saved = checkpoint.read_config(workdir)
    source = None
    if training and train_cfg.init_from:
        if has_checkpoint(workdir):
            logging.warning(
                "init_from %s ignored: %s has checkpoints of its own, resuming them",
                train_cfg.init_from,
                workdir,
            )
        else:
            source = init_source(train_cfg.init_from)
            # Before anything is written: the vocabulary will be the source tokenizer's.
            vocab = model_values.get("vocab_size") or source.model.get("vocab_size")
            check_init_source(source, {**model_values, "vocab_size": vocab})
            adopt_tokenizer(source, data_cfg, workdir)
    tokenizer = shared_tokenizer(data_cfg, workdir)
    model_cfg = model_config_for(model_values, tokenizer)
    values = {**values, "model": {**model_values, "vocab_size": model_cfg.vocab_size}}
    checkpoint.check_compatible(saved, json.loads(json.dumps(values)), sections=("model",))
    _check_lora_unchanged(saved, values)
    if saved is not None and saved.get("data", {}).get("source") != values["data"]["source"]:
        raise checkpoint.CheckpointMismatchError(
            f"this workdir was trained on data.source={saved['data'].get('source')!r}, not "
            f"{values['data']['source']!r}; use a new --workdir (or init_from, for fine-tuning)"
        )
    init_params = None
    if source is not None:
        check_init_source(source, dataclasses.asdict(model_cfg))
        init_params = source.load()
    trainer = create_trainer(
        model_cfg,
        build_model(model_cfg),
        opt_cfg,
        train_cfg.steps,
        par_cfg,
        seed=train_cfg.seed,
        init_params=init_params,
        lora_config=train_cfg.lora,
    )
    return values, tokenizer, trainer, (model_cfg, data_cfg, opt_cfg, train_cfg, par_cfg)


def loss_evaluator(
    trainer: Trainer, data_cfg, tokenizer, split: str, seed: int, max_batches: int = 0
):
    """state -> {loss, perplexity, bits_per_byte, accuracy} over a split (its first
    `max_batches` batches if > 0)."""
    bytes_per_token = pipeline.bytes_per_token(data_cfg, split, tokenizer)
    # Every process must run the same number of (collective) eval steps.
    num_batches = max_batches or None
    if jax.process_count() > 1:
        num_batches = pipeline.count_batches(
            data_cfg, split, tokenizer, seed=seed, process_count=jax.process_count()
        )
        num_batches = min(num_batches, max_batches) if max_batches else num_batches

    def evaluate(state):
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
        metrics = trainer.evaluate(state, iter(batches))
        if data_cfg.task == "lm":
            metrics["bits_per_byte"] = metrics["loss"] / math.log(2) / bytes_per_token
        return metrics

    return evaluate


def samples(
    model,
    params,
    tokenizer,
    data_cfg,
    prompts,
    *,
    max_new_tokens,
    temperature,
    top_k=0,
    top_p=1.0,
    seed=0,
    beams=0,
    stops=(),
) -> list[str]:
    """Decoded continuations (decoder-only) or translations (encoder-decoder) of text prompts.

    model: the Flax module (its `.config` says the architecture). beams > 0 uses beam search
    instead of sampling (decoder-only) or greedy (encoder-decoder).
    """
    if model.config.architecture == "decoder":
        bos = [tokenizer.bos_id] if tokenizer.add_bos else []
        ids = [bos + tokenizer.encode(p) for p in prompts]
        limit = context_limit(model.config)
        if limit is not None:
            longest = max(len(i) for i in ids)
            if longest >= limit:
                raise ValueError(
                    f"a prompt of {longest} tokens leaves no room in the model's {limit}-token "
                    "context (model.max_len); shorten the prompt"
                )
            max_new_tokens = min(max_new_tokens, limit - longest)
        if beams > 0:
            out, _ = beam_search(
                model,
                params,
                ids,
                max_new_tokens=max_new_tokens,
                beams=beams,
                eos_id=tokenizer.eos_id,
            )
        else:
            out = generate(
                model,
                params,
                ids,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
                eos_id=tokenizer.eos_id,
            )
        return [
            p + cut_at_stop(tokenizer.decode(o), stops) for p, o in zip(prompts, out, strict=True)
        ]
    ids = [tokenizer.encode(p)[: data_cfg.encoder_len - 1] + [tokenizer.eos_id] for p in prompts]
    max_new_tokens = min(max_new_tokens, data_cfg.seq_len)
    if beams > 0:
        out, _ = beam_search_seq2seq(
            model,
            params,
            ids,
            max_new_tokens=max_new_tokens,
            beams=beams,
            bos_id=tokenizer.bos_id,
            eos_id=tokenizer.eos_id,
        )
    else:
        out = generate_seq2seq(
            model,
            params,
            ids,
            max_new_tokens=max_new_tokens,
            bos_id=tokenizer.bos_id,
            eos_id=tokenizer.eos_id,
        )
    return [
        f"{p}\n  -> {cut_at_stop(tokenizer.decode(o), stops)}"
        for p, o in zip(prompts, out, strict=True)
    ]


def default_prompts(data_cfg, tokenizer, train_cfg) -> list[str]:
    if train_cfg.sample_prompt:
        return [train_cfg.sample_prompt]
    if data_cfg.task == "translation":
        from lm.data.sources import get_source

        source = get_source(data_cfg, "validation")
        return [source[i]["source"] for i in range(min(3, len(source)))]
    return ["\n"]


# ------------------------------------------------------------------------------- commands


def train_command(config, workdir: pathlib.Path) -> None:
    values = config_lib.resolve(config)
    values, tokenizer, trainer, cfgs = build_run(values, workdir, training=True)
    model_cfg, data_cfg, _, train_cfg, _ = cfgs
    checkpoint.write_config(workdir, values)
    if jax.process_index() == 0:
        print(
            f"model: {trainer.parameter_summary()} ({model_cfg.architecture}); "
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
        baseline_file = (
            workdir / "baseline.json"
        )  # computed once per workdir (same data and tokenizer)
        if baseline_file.exists():
            baseline = json.loads(baseline_file.read_text())["unigram_loss"]
        else:
            baseline = pipeline.unigram_entropy(data_cfg, tokenizer)
            storage.write_atomic(baseline_file, json.dumps({"unigram_loss": baseline}))
        print(f"unigram baseline on validation: {baseline:.3f} nats/token")

    def on_end(state):
        params = trainer.model_params(state)
        if jax.process_count() > 1:  # every process holds a shard: gather full copies first
            from jax.experimental import multihost_utils

            params = multihost_utils.process_allgather(params, tiled=True)
        if jax.process_index() != 0:
            return
        texts = samples(
            trainer.model,
            params,
            tokenizer,
            data_cfg,
            default_prompts(data_cfg, tokenizer, train_cfg),
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
    )
    final = (
        [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        if (workdir / "metrics.jsonl").exists()
        else []
    )
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


def restore_for_inference(workdir: pathlib.Path):
    """(trainer, params, tokenizer, data_cfg) from a trained workdir's config and latest checkpoint."""
    values = checkpoint.read_config(workdir)
    if values is None:
        raise ValueError(
            f"{workdir} has no config.json: train there first, or pass the right --workdir"
        )
    if not has_checkpoint(workdir):  # checked first: a Checkpointer would create checkpoints/
        raise ValueError(
            f"{workdir} has no checkpoint yet: train there first (a run saves every "
            "train.checkpoint_every steps and at the end)"
        )
    values = {
        **values,
        "parallel": {**values.get("parallel", {}), "mesh": (-1, 1, 1), "use_pmap": False},
    }
    values, tokenizer, trainer, cfgs = build_run(values, workdir)
    ckpt = checkpoint.Checkpointer(workdir, async_save=False)
    try:
        step, state = ckpt.restore(trainer.abstract_state)
    except RuntimeError as e:  # Checkpointer.restore tried every step and could read none
        raise ValueError(
            f"{str(e).splitlines()[0]} (tried steps {ckpt.all_steps()}); copy back a good "
            "checkpoint, or train again in a new --workdir"
        ) from e
    finally:
        ckpt.close()
    logging.info("restored step %d", step)
    return trainer, state, tokenizer, cfgs[1], cfgs[3]


def sample_command(workdir: pathlib.Path | None) -> None:
    if _MODEL.value:  # an imported model, no workdir needed
        from lm import convert
        from lm.data.pipeline import DataConfig

        pretrained = convert.load_pretrained(_MODEL.value)
        if pretrained.tokenizer is None:
            raise ValueError(
                f"--model {_MODEL.value!r} has no tokenizer.json to encode prompts with"
            )
        model, params = for_inference(pretrained.config, pretrained.params, _PRECISION.value)
        tokenizer, data_cfg, prompts = pretrained.tokenizer, DataConfig(), _PROMPT.value or ["The"]
    else:
        trainer, state, tokenizer, data_cfg, train_cfg = restore_for_inference(workdir)
        model, params = for_inference(
            trainer.model_config, trainer.model_params(state), _PRECISION.value
        )
        prompts = _PROMPT.value or default_prompts(data_cfg, tokenizer, train_cfg)
    for text in samples(
        model,
        params,
        tokenizer,
        data_cfg,
        prompts,
        max_new_tokens=_MAX_NEW.value,
        temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value,
        top_p=_TOP_P.value,
        seed=_SEED.value,
        beams=_BEAMS.value,
        stops=_STOP.value,
    ):
        print(text)
        print("-" * 40)


def harness_model(model, params, tokenizer, data_cfg, *, batch_size: int, max_length: int):
    """The lm.evaluation model for our module: LanguageModel (decoder-only) or Seq2SeqModel."""
    from lm.evaluation import LanguageModel, Seq2SeqModel

    if model.config.architecture == "decoder":
        return LanguageModel(model, params, tokenizer, batch_size=batch_size, max_length=max_length)
    return Seq2SeqModel(
        model, params, tokenizer, encoder_len=data_cfg.encoder_len, batch_size=batch_size
    )


def _model_to_evaluate(workdir: pathlib.Path | None):
    """--model NAME or --workdir DIR -> (model, params, tokenizer, data_cfg, described, step)."""
    from lm.data.pipeline import DataConfig

    if _MODEL.value:
        from lm import convert

        pretrained = convert.load_pretrained(_MODEL.value)
        if pretrained.tokenizer is None:
            raise ValueError(f"--model {_MODEL.value!r} has no tokenizer to encode prompts with")
        model, params = for_inference(pretrained.config, pretrained.params, _PRECISION.value)
        return model, params, pretrained.tokenizer, DataConfig(), _MODEL.value, None
    trainer, state, tokenizer, data_cfg, _ = restore_for_inference(workdir)
    model, params = for_inference(
        trainer.model_config, trainer.model_params(state), _PRECISION.value
    )
    return model, params, tokenizer, data_cfg, str(workdir), int(state.step)


def _default_out(workdir: pathlib.Path | None, kind: str) -> pathlib.Path:
    """WORKDIR/KIND for a workdir, KIND/MODEL for --model."""
    if _MODEL.value:
        return storage.as_path(kind) / pathlib.Path(_MODEL.value).name
    return workdir / kind


def eval_command(workdir: pathlib.Path | None) -> None:
    if not _TASKS.value:  # the loss of a split (the training data's own evaluation)
        if workdir is None:
            raise app.UsageError("eval --model needs --tasks (e.g. --tasks arc_easy,piqa)")
        trainer, state, tokenizer, data_cfg, train_cfg = restore_for_inference(workdir)
        metrics = loss_evaluator(trainer, data_cfg, tokenizer, _SPLIT.value, train_cfg.seed)(state)
        print(json.dumps({"split": _SPLIT.value, "step": int(state.step), **metrics}, indent=2))
        return
    from lm.evaluation import evaluate, format_table, get_tasks

    model, params, tokenizer, data_cfg, described, step = _model_to_evaluate(workdir)
    out = storage.as_path(_OUT.value or _default_out(workdir, "eval"))
    tasks = get_tasks(_TASKS.value, data_cfg)  # unknown names fail before any work
    lm = harness_model(
        model,
        params,
        tokenizer,
        data_cfg,
        batch_size=_BATCH_SIZE.value,
        max_length=_MAX_LENGTH.value,
    )
    results = evaluate(lm, tasks, num_fewshot=_NUM_FEWSHOT.value, limit=_LIMIT.value, progress=True)
    results = {"model": described, "step": step, **results}
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(results)
    storage.write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    storage.write_atomic(out / "results.md", table + "\n")
    print(table)
    print(f"wrote {out / 'results.json'}")


def icl_command(workdir: pathlib.Path | None) -> None:
    """Few-shot curves: accuracy against k demonstrations, seeds, random-label control."""
    from lm.evaluation import get_tasks
    from lm.icl import fewshot

    if not _TASKS.value:
        raise app.UsageError("icl needs --tasks (e.g. --tasks sst2,arc_easy)")
    model, params, tokenizer, data_cfg, described, step = _model_to_evaluate(workdir)
    out = storage.as_path(_OUT.value or _default_out(workdir, "icl"))
    tasks = get_tasks(_TASKS.value, data_cfg)
    bad = [t.name for t in tasks if t.kind != "multiple_choice"]
    if bad:
        raise ValueError(
            f"icl: tasks {bad} are not multiple-choice or classification tasks; "
            "few-shot curves need accuracy (e.g. sst2, boolq, arc_easy, piqa)"
        )
    lm = harness_model(
        model,
        params,
        tokenizer,
        data_cfg,
        batch_size=_BATCH_SIZE.value,
        max_length=_MAX_LENGTH.value,
    )
    shots = [int(k) for k in _SHOTS.value]
    curves = fewshot.fewshot_curves(
        lm,
        tasks,
        shots=shots,
        seeds=_SEEDS.value,
        limit=_LIMIT.value if _LIMIT.value is not None else 100,
        control=not _NO_CONTROL.value,
        progress=True,
    )
    chance = {t.name: sum(1 / d.num_options for d in t.load()) / len(t.load()) for t in tasks}
    curves = {"model": described, "step": step, "chance": chance, **curves}
    out.mkdir(parents=True, exist_ok=True)
    table = fewshot.format_curves(curves)
    storage.write_atomic(out / "curves.json", json.dumps(curves, indent=2) + "\n")
    storage.write_atomic(out / "curves.md", table + "\n")
    fewshot.plot_curves(curves, out / "fewshot.png", chance=chance, title=described)
    print(table)
    print(f"wrote {out / 'curves.json'} and {out / 'fewshot.png'}")


def task_evaluator(trainer: Trainer, tokenizer, data_cfg, train_cfg: TrainConfig):
    """state -> {tasks/<task>/<metric>: value} with the harness, for periodic evaluation."""
    from lm.evaluation import evaluate, get_tasks

    tasks = get_tasks([t.strip() for t in train_cfg.eval_tasks.split(",") if t.strip()], data_cfg)
    fewshot = None if train_cfg.eval_tasks_fewshot < 0 else train_cfg.eval_tasks_fewshot

    def evaluate_tasks(state):
        params = trainer.model_params(state)
        if jax.process_count() > 1:  # every process holds a shard: gather full copies first
            from jax.experimental import multihost_utils

            params = multihost_utils.process_allgather(params, tiled=True)
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


def convert_command(workdir: pathlib.Path | None) -> None:
    """Writes an imported model or a workdir's latest parameters in the Hugging Face layout
    (config.json + model.safetensors, + tokenizer.json for imported models)."""
    from lm import convert
    from lm.convert.hf import export_hf

    if _OUT.value is None:
        raise app.UsageError("convert needs --out DIR (a new or empty directory)")
    if _MODEL.value:
        model = convert.load_pretrained(_MODEL.value)
    else:
        trainer, state, _, _, _ = restore_for_inference(workdir)
        model = (trainer.model_config, jax.device_get(trainer.model_params(state)))
    if not storage.is_remote(_OUT.value):
        out = export_hf(model, _OUT.value)
        print(f"wrote {out}: " + ", ".join(sorted(p.name for p in out.iterdir())))
        return
    # safetensors writes local files: export beside us, then upload each file.
    import tempfile

    target = storage.as_path(_OUT.value)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} is not empty; choose a new --out directory")
    with tempfile.TemporaryDirectory(prefix="lm-convert-") as local:
        names = sorted(p.name for p in export_hf(model, local).iterdir())
        for name in names:
            storage.write_atomic(target / name, (pathlib.Path(local) / name).read_bytes())
    print(f"wrote {target}: " + ", ".join(names))


def main(argv):
    command = argv[1] if len(argv) > 1 else "train"
    if command not in COMMANDS or len(argv) > 2:
        raise app.UsageError(
            f"usage: python -m lm.main [{'|'.join(COMMANDS)}] --workdir DIR [--config FILE]"
        )
    if _WORKDIR.value is None and not (
        command in ("sample", "eval", "icl", "convert") and _MODEL.value
    ):
        raise app.UsageError(
            "--workdir is required (sample, eval, icl and convert also take --model NAME instead)"
        )
    workdir = storage.as_path(_WORKDIR.value) if _WORKDIR.value else None
    if workdir is not None:
        checkpoint.check_checkpoint_store(workdir)
        storage.check_reachable(workdir)  # a bucket that is missing or out of reach: one line, now
    if _OUT.value:
        storage.check_reachable(_OUT.value)
    if command == "train":
        if _CONFIG.value is None:
            raise app.UsageError("train needs --config experiments/NAME.py")
        if "icl" in _CONFIG.value:  # Garg et al. regression, induction heads: their own loops
            from lm.icl import run_experiment

            run_experiment(_CONFIG.value, workdir)
        else:
            train_command(_CONFIG.value, workdir)
    elif command == "sample":
        sample_command(workdir)
    elif command == "convert":
        convert_command(workdir)
    elif command == "icl":
        icl_command(workdir)
    else:
        eval_command(workdir)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag value (a value out of range, an unknown experiment
    arg) raised as a ValueError that `run` prints as one line."""
    try:
        return flags.FLAGS(argv)
    except (
        AttributeError,
        KeyError,
    ) as e:  # config_flags: an override names no field of the config
        if "--config." not in " ".join(argv):
            raise
        inner = e
        while inner.args and isinstance(
            inner.args[0], BaseException
        ):  # AttributeError(KeyError(text))
            inner = inner.args[0]
        text = str(inner.args[0]) if inner.args else str(inner)
        name, _, suggestion = text.partition(
            "\n"
        )  # 'stepz'\nDid you mean "steps" instead of "stepz"?
        hint = name.strip("'") + (f" ({suggestion.strip()})" if suggestion.strip() else "")
        raise ValueError(
            f"an override names a field the experiment's config does not have: {hint}. "
            "Fix the --config.SECTION.FIELD name (the fields are in config.json of any "
            "workdir, or the experiment file)"
        ) from e
    except flags.Error as e:
        message, marker = str(e), "Error whilst parsing config file"
        cause = e.__context__  # config_flags wraps an experiment file's error in a traceback
        while cause is not None and marker in str(cause):
            cause = cause.__context__
        if marker in message and cause is not None:
            message = message.split(marker)[0] + str(cause)
        raise ValueError(message) from e


# Bad input, an asset out of reach, or a checkpoint that cannot be written (disk full): one line that
# names the problem and the fix, exit status 2.
# Anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    assets.AssetUnavailableError,
    checkpoint.CheckpointSaveError,
)  # a failed save (disk full): one line too


def run():
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and TFDS are chatty at INFO
    try:
        app.run(main, flags_parser=parse_flags)
    except EXPECTED_ERRORS as e:
        if os.environ.get("LM_DEBUG"):
            raise
        print(
            "error: " + " ".join(str(e).split()), file=sys.stderr
        )  # one line; LM_DEBUG=1: traceback
        sys.exit(2)


if __name__ == "__main__":
    run()
