"""lm: language-model research in JAX/Flax. The names a researcher reaches for, in one place:

    import lm
    pretrained = lm.load_pretrained("smollm2")              # or 'gguf:PATH', 'hf:DIR'
    model = lm.build_model(pretrained.config)
    tokens = lm.generate(model, pretrained.params, prompts, max_new_tokens=32)
    seen = lm.inspect_text(pretrained.config, pretrained.params, pretrained.tokenizer, "...")
    saved = lm.read_model("workdirs/shakespeare_gpt")       # a trained run, for inference

Each name is imported from its module when first used (`import lm` alone loads no JAX), and
is the same object as there: `lm.ModelConfig is lm.models.transformer.ModelConfig`.
"""

from __future__ import annotations

import importlib

# name -> the module that defines it.
_EXPORTS = {
    "ModelConfig": "lm.models.transformer",
    "build_model": "lm.models.transformer",
    "DataConfig": "lm.data.pipeline",
    "get_tokenizer": "lm.data.pipeline",
    "make_dataset": "lm.data.pipeline",
    "OptimizerConfig": "lm.train",
    "TrainConfig": "lm.train",
    "create_trainer": "lm.train",
    "train_loop": "lm.train",
    "load_pretrained": "lm.convert",
    "load_model": "lm.convert",
    "read_model": "lm.checkpoint",
    "generate": "lm.decode",
    "beam_search": "lm.decode",
    "samples": "lm.decode",
    "inspect_text": "lm.inspect",
    "evaluate": "lm.evaluation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lm' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
