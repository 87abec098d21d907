"""Experiment configs: ml-collections ConfigDicts with every field filled from the dataclasses.

An experiment file fills only what it changes; `experiment(...)` adds every other field
with its default, so any value can be overridden from the command line
(`--config.model.d_model=512`) and a misspelt key is an error that names it.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections

from lm import lora
from lm.data.pipeline import DataConfig
from lm.models.transformer import PRESETS, ModelConfig, build_model, dummy_inputs
from lm.parallel import ParallelConfig
from lm.train import OptimizerConfig, TrainConfig

SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "optimizer": OptimizerConfig,
    "train": TrainConfig,
    "parallel": ParallelConfig,
}


def field_defaults(cls) -> dict[str, Any]:
    """Every field of a config dataclass with its default value."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        else:
            out[f.name] = f.default_factory()
    return out


def filled_sections(sections: dict[str, tuple[type, dict[str, Any], dict[str, Any] | None]]
                    ) -> ml_collections.ConfigDict:
    """{name: (dataclass, base values, overrides)} -> a ConfigDict whose every section holds
    every field of its dataclass: the defaults, then the base values, then the overrides.
    An override key the dataclass lacks is an error that names it."""
    config = ml_collections.ConfigDict()
    for name, (cls, base, overrides) in sections.items():
        values = {**field_defaults(cls), **base}
        overrides = dict(overrides or {})
        bad = sorted(set(overrides) - set(values))
        if bad:
            raise ValueError(f"unknown key(s) {[name + '.' + k for k in bad]}; valid: {sorted(values)}")
        config[name] = {**values, **overrides}
    return config


def experiment(*, preset: str | None = None, **sections: dict[str, Any]) -> ml_collections.ConfigDict:
    """A complete experiment config.

    preset: a model family from `lm.models.transformer.PRESETS`, overridden by `model=...`.
    sections: model=, data=, optimizer=, train=, parallel= dicts of overrides.
    """
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown config section(s) {sorted(unknown)}; use {sorted(SECTIONS)}")
    # vocab_size 0 = take the tokenizer's size (a preset's vocabulary belongs to its tokenizer)
    model_base = {**(PRESETS[preset] if preset is not None else {}), "vocab_size": 0}
    return filled_sections({name: (cls, model_base if name == "model" else {}, sections.get(name))
                            for name, cls in SECTIONS.items()})


def resolve(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """ConfigDict -> plain dict, checking that exactly the known sections are present."""
    values = config.to_dict()
    unknown = set(values) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown config section(s) {sorted(unknown)}; use {sorted(SECTIONS)}")
    return values


def build(values: dict[str, Any]):
    """-> (ModelConfig or None if vocab unresolved, DataConfig, OptimizerConfig, TrainConfig, ParallelConfig)."""
    data = DataConfig.from_dict(values.get("data", {}))
    optimizer = OptimizerConfig.from_dict(values.get("optimizer", {}))
    train = TrainConfig.from_dict(values.get("train", {}))
    par = ParallelConfig.from_dict(values.get("parallel", {}))
    model_values = dict(values.get("model", {}))
    # Validate the keys now even if the vocabulary comes from the tokenizer later.
    model = ModelConfig.from_dict({**model_values, "vocab_size": model_values.get("vocab_size") or 1})
    if train.lora.enabled:
        check_lora_targets(model, train.lora)
    return model_values, data, optimizer, train, par


def check_lora_targets(model: ModelConfig, lora_config: lora.LoraConfig) -> None:
    """Raises ValueError if train.lora_targets names no kernel of the model (or a misspelt one),
    before a run writes anything. Shapes only: nothing is initialised."""
    module = build_model(model)
    boxed = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), **dummy_inputs(model))["params"])
    lora.find_targets(boxed, lora_config)
