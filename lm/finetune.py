"""Fine-tuning sources (`train.init_from`): where a new run's first parameters and tokenizer come
from, checked against the new model before the new workdir is written.

    --config.train.init_from=/tmp/gpt        another run's workdir (its latest readable checkpoint)
    --config.train.init_from=smollm2         an imported checkpoint (gemma3, gguf:PATH, hf:DIR)

`lm.run.build_run` asks for the source (`init_source`), checks it (`check_init_source`), adopts
its tokenizer into the fresh workdir (`adopt_tokenizer`) and hands its parameters to the trainer.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pathlib
import tempfile
from typing import Any

import flax.linen as nn
import jax

from lm import checkpoint, convert, storage
from lm.data.pipeline import DataConfig
from lm.models.transformer import ModelConfig, build_model, dummy_inputs
from lm.train import TrainConfig
from lm.utils import tree_differences


@dataclasses.dataclass(frozen=True)
class InitSource:
    """Where a fine-tune's first parameters come from (`train.init_from`).

    spec: the init_from value. model: the source model's config values (vocab_size resolved),
    checked against the new model before any of its parameters are used. tokenizer: the
    source's tokenizer file, which a fresh workdir adopts so that token ids keep their
    embeddings (None: the source has none). params: host (numpy) tree of the source's
    parameters (a LoRA source's adapters merged into its base).
    """

    spec: str
    model: dict[str, Any]
    tokenizer: pathlib.Path | None
    params: Any


def init_source(spec: str) -> InitSource:
    """The source an init_from spec names: a workdir of ours, or an imported checkpoint
    ('smollm2', 'gemma3', 'gguf:PATH', 'hf:DIR'; see `lm.convert`). ValueError (or
    FileNotFoundError for a missing import) naming the spec and the fix."""
    # Workdirs of ours are recognised first: they hold a config.json too.
    if not checkpoint.is_lm_workdir(spec) and convert.is_pretrained_spec(spec):
        return _pretrained_source(spec)
    return _workdir_source(spec)


def _pretrained_source(spec: str) -> InitSource:
    """An imported checkpoint; its tokenizer is written to a temporary tokenizer.json that the
    fine-tune's workdir adopts. A Hugging Face directory's params stay unread until the trainer
    places them, each device's block read from the files (`lm.convert.hf.load_hf`)."""
    saved = convert.load_model(model=spec, lazy=True)
    if saved.tokenizer is None:
        raise ValueError(
            f"train.init_from={spec!r} has no tokenizer.json; add the model's tokenizer "
            "to its directory"
        )
    tokenizer = pathlib.Path(tempfile.mkdtemp(prefix="lm-init-")) / "tokenizer.json"
    saved.tokenizer.save(tokenizer)
    return InitSource(spec, saved.sections["model"], tokenizer, saved.params)


def _workdir_source(spec: str) -> InitSource:
    """A trained workdir of ours, checked with init_from's own messages before it is read."""
    path = storage.as_path(spec)
    if not path.is_dir():
        raise ValueError(
            f"train.init_from={spec!r}: no such workdir; pass the --workdir of a run that has "
            "saved a checkpoint"
        )
    if checkpoint.read_config(path) is None:
        raise ValueError(
            f"train.init_from={spec!r} has no config.json, so it is not the workdir of a run of "
            "lm; pass the --workdir of a trained run"
        )
    if not checkpoint.has_checkpoint(path):
        raise ValueError(
            f"train.init_from={spec!r} has no checkpoint yet; train it first (runs save every "
            "train.checkpoint_every steps and at the end)"
        )
    saved = convert.load_model(workdir=path)
    tokenizer = storage.as_path(saved.tokenizer.path) if saved.tokenizer.path else None
    return InitSource(spec, saved.sections["model"], tokenizer, saved.params)


def _abstract_params(model_values: dict):
    """The parameter tree (ShapeDtypeStructs) of a model config, in the unrolled layout, so
    that sources of either layout compare. Nothing is allocated."""
    config = dataclasses.replace(ModelConfig.from_dict(model_values), scan_layers=False)
    model = build_model(config)
    return jax.eval_shape(
        lambda: nn.meta.unbox(model.init(jax.random.PRNGKey(0), **dummy_inputs(config))["params"])
    )


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
        old_params = _abstract_params(old)
    except ValueError as e:
        raise ValueError(
            f"train.init_from={source.spec!r}: cannot read the source's model config ({e})"
        ) from e
    changed = tree_differences(old_params, _abstract_params(new))
    if changed:
        path, was, now = changed[0]
        raise checkpoint.CheckpointMismatchError(
            f"train.init_from={source.spec!r} holds parameters of another shape ({len(changed)} differ, e.g. "
            f"{path}: source {was}, now {now}). "
            f"Differences: {differences}. Drop those overrides or pass the source's values "
            "(see its config.json), or init_from a run of this model."
        )
    logging.warning(
        "init_from %s: the model config differs in %s; the parameter shapes match",
        source.spec,
        differences,
    )


def adopt_tokenizer(source: InitSource, data_cfg: DataConfig, workdir: pathlib.Path) -> None:
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


def check_lora_unchanged(saved: dict | None, values: dict) -> None:
    """Refuses to continue a workdir with other LoRA settings than its first run's (its
    checkpoints hold those adapters): CheckpointMismatchError naming them."""
    if saved is None:
        return
    defaults = dataclasses.asdict(TrainConfig())
    keys = ("lora_rank", "lora_alpha", "lora_targets")
    pick = lambda v: {"train": {k: v.get("train", {}).get(k, defaults[k]) for k in keys}}
    checkpoint.check_compatible(pick(saved), pick(values), sections=("train",))
