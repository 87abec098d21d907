"""Import (and export) of foreign checkpoints into `lm`'s own modules.

    >>> from lm.convert import load_pretrained
    >>> pretrained = load_pretrained('smollm2')        # registry name, fetched on first use
    >>> pretrained.config, pretrained.tokenizer        # ModelConfig, PretrainedTokenizer
    >>> model = build_model(pretrained.config)
    >>> logits = model.apply({'params': pretrained.params}, tokens)

Specs understood by :func:`load_pretrained` (and by ``--model`` / ``train.init_from``):
``smollm2`` and ``gemma3`` (GGUF checkpoints in the assets registry), ``gguf:PATH``
or any ``*.gguf`` path, ``hf:DIR`` or any directory holding ``config.json``.
"""

from __future__ import annotations

import pathlib

from lm.convert.gguf import CheckpointFormatError, Pretrained, load_gguf

# Registry assets that are GGUF checkpoints, by the name users type.
PRETRAINED_ASSETS = {"smollm2": "smollm2", "gemma3": "gemma3"}

__all__ = ["CheckpointFormatError", "Pretrained", "is_pretrained_spec", "load_pretrained"]


def is_pretrained_spec(spec: str) -> bool:
    """Whether ``spec`` names a foreign checkpoint (as opposed to a workdir of ours)."""
    if spec in PRETRAINED_ASSETS or spec.startswith(("gguf:", "hf:")) or spec.endswith(".gguf"):
        return True
    return (pathlib.Path(spec) / "config.json").is_file()


def load_pretrained(spec: str) -> Pretrained:
    """Loads a foreign checkpoint as float32 params of our modules, with its tokenizer.

    Raises:
      ValueError: an unknown spec (the message lists the accepted forms).
      FileNotFoundError / CheckpointFormatError: see :func:`lm.convert.gguf.load_gguf`
        and :func:`lm.convert.hf.load_hf`.
    """
    if spec in PRETRAINED_ASSETS:
        from lm.data.assets import fetch

        return load_gguf(fetch(PRETRAINED_ASSETS[spec]))
    if spec.startswith("gguf:") or spec.endswith(".gguf"):
        return load_gguf(spec.removeprefix("gguf:"))
    if spec.startswith("hf:") or (pathlib.Path(spec) / "config.json").is_file():
        from lm.convert.hf import load_hf

        return load_hf(spec.removeprefix("hf:"))
    raise ValueError(
        f"Unknown pretrained model {spec!r}: use one of {sorted(PRETRAINED_ASSETS)}, "
        "'gguf:PATH' (a .gguf file) or 'hf:DIR' (config.json + model.safetensors)."
    )
