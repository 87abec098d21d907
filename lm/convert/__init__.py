"""Import (and export) of foreign checkpoints into `lm`'s own modules.

    >>> from lm.convert import load_pretrained
    >>> pretrained = load_pretrained('smollm2')        # registry name, fetched on first use
    >>> pretrained.config, pretrained.tokenizer        # ModelConfig, PretrainedTokenizer
    >>> model = build_model(pretrained.config)
    >>> logits = model.apply({'params': pretrained.params}, tokens)

Specs understood by :func:`load_pretrained` (and by ``--model`` / ``train.init_from``):
``smollm2`` and ``gemma3`` (GGUF checkpoints in the assets registry), ``gguf:PATH``
or any ``*.gguf`` path, ``hf:DIR`` or any directory holding ``config.json``.

:func:`load_model` reads either an import or a trained workdir of ours (what ``sample``,
``eval``, ``icl``, ``convert`` and ``train.init_from`` start from), and :func:`export_model`
writes one in the Hugging Face layout, to a local directory or a bucket.
"""

from __future__ import annotations

import dataclasses
import pathlib
import tempfile

from lm import checkpoint, storage
from lm.convert.cache import cached_import, default_import_cache
from lm.convert.gguf import CheckpointFormatError, Pretrained, load_gguf

# Registry assets that are GGUF checkpoints, by the name users type.
PRETRAINED_ASSETS = {"smollm2": "smollm2", "gemma3": "gemma3"}

__all__ = [
    "CheckpointFormatError",
    "Pretrained",
    "export_model",
    "is_pretrained_spec",
    "load_model",
    "load_pretrained",
]


def is_pretrained_spec(spec: str) -> bool:
    """Whether ``spec`` names a foreign checkpoint (as opposed to a workdir of ours)."""
    if spec in PRETRAINED_ASSETS or spec.startswith(("gguf:", "hf:")) or spec.endswith(".gguf"):
        return True
    return (pathlib.Path(spec) / "config.json").is_file()


def load_pretrained(spec: str, *, cache: str | None = None, lazy: bool = False) -> Pretrained:
    """Loads a foreign checkpoint as float32 params of our modules, with its tokenizer.

    cache: where GGUF imports are kept for the next load (`lm.convert.cache`; 'off': not
      kept); default `default_import_cache()`. Hugging Face directories are read directly.
    lazy: a Hugging Face directory's params stay unread `LazyArray`s, read block by block
      where they are placed on devices (`lm.convert.hf.load_hf`); GGUF files load whole.

    Raises:
      ValueError: an unknown spec (the message lists the accepted forms).
      FileNotFoundError / CheckpointFormatError: see :func:`lm.convert.gguf.load_gguf`
        and :func:`lm.convert.hf.load_hf`.
    """
    if cache is None:
        cache = default_import_cache()
    if spec in PRETRAINED_ASSETS:
        from lm.data.assets import fetch

        return cached_import(fetch(PRETRAINED_ASSETS[spec]), load_gguf, cache)
    if spec.startswith("gguf:") or spec.endswith(".gguf"):
        return cached_import(spec.removeprefix("gguf:"), load_gguf, cache)
    if spec.startswith("hf:") or (pathlib.Path(spec) / "config.json").is_file():
        from lm.convert.hf import load_hf

        return load_hf(spec.removeprefix("hf:"), lazy=lazy)
    raise ValueError(
        f"Unknown pretrained model {spec!r}: use one of {sorted(PRETRAINED_ASSETS)}, "
        "'gguf:PATH' (a .gguf file) or 'hf:DIR' (config.json + model.safetensors)."
    )


def load_model(
    *, model: str | None = None, workdir: storage.PathLike | None = None, lazy: bool = False
) -> checkpoint.SavedModel:
    """The model, host parameters and tokenizer of an import (`model`: a spec as for
    :func:`load_pretrained`, `lazy` as there) or of a trained workdir's latest readable
    checkpoint (`workdir`, see `lm.checkpoint.read_model`); give exactly one. Compiles nothing."""
    if (model is None) == (workdir is None):
        raise TypeError("load_model takes exactly one of model= and workdir=")
    if workdir is not None:
        return checkpoint.read_model(workdir)
    pretrained = load_pretrained(model, lazy=lazy)
    return checkpoint.SavedModel(
        config=pretrained.config,
        params=pretrained.params,
        tokenizer=pretrained.tokenizer,
        sections={"model": dataclasses.asdict(pretrained.config)},
        step=None,
        source=model,
        imported=pretrained,
    )


def export_model(saved: checkpoint.SavedModel, out: storage.PathLike) -> tuple[str, list[str]]:
    """Writes `saved` in the Hugging Face layout (config.json + model.safetensors, and an
    import's tokenizer.json) to `out`, a new or empty local directory or bucket folder.
    Returns (the directory written, the names of the files in it)."""
    from lm.convert.hf import export_hf

    # An import is exported whole: its tokenizer files and the source's config.json keys.
    model = saved.imported if saved.imported is not None else (saved.config, saved.params)
    if not storage.is_remote(out):
        written = export_hf(model, out)
        return str(written), sorted(p.name for p in written.iterdir())
    # safetensors writes local files: export beside us, then upload each file.
    target = storage.as_path(out)
    if target.exists() and any(target.iterdir()):
        raise FileExistsError(f"{target} is not empty; choose a new --out directory")
    with tempfile.TemporaryDirectory(prefix="lm-convert-") as local:
        names = sorted(p.name for p in export_hf(model, local).iterdir())
        for name in names:
            storage.write_atomic(target / name, (pathlib.Path(local) / name).read_bytes())
    return str(target), names
