"""Experiment configs: ml-collections ConfigDicts with every field filled from the dataclasses.

An experiment file fills only what it changes; `experiment(...)` adds every other field
with its default, so any value can be overridden from the command line
(`--config.model.d_model=512`) and a misspelt key is an error that names it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import pathlib
from typing import Any

import jax
import ml_collections

from lm import lora
from lm.data.pipeline import DataConfig
from lm.models.transformer import PRESETS, ModelConfig, build_model, dummy_inputs
from lm.parallel import ParallelConfig
from lm.train import OptimizerConfig, TrainConfig, create_trainer

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


def with_vocabulary(model_values, data_vocab: int | None) -> dict[str, Any]:
    """The model section with its vocabulary: ``model.vocab_size=0`` takes the data's (the
    tokenizer's; 1 when there is none, as for regression, or it is not known yet), a pinned
    one stays. ValueError when a pinned one is smaller than the data's."""
    values = dict(model_values)
    if not values.get("vocab_size"):
        values["vocab_size"] = data_vocab or 1
    elif data_vocab and values["vocab_size"] < data_vocab:
        raise ValueError(
            f"model.vocab_size={values['vocab_size']} is smaller than the data's vocabulary "
            f"({data_vocab}, the tokenizer's); set model.vocab_size=0 to take the data's"
        )
    return values


def filled_sections(
    sections: dict[str, tuple[type, dict[str, Any], dict[str, Any] | None]],
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
            raise ValueError(
                f"unknown key(s) {[name + '.' + k for k in bad]}; valid: {sorted(values)}"
            )
        config[name] = {**values, **overrides}
    return config


def experiment(
    *, preset: str | None = None, **sections: dict[str, Any]
) -> ml_collections.ConfigDict:
    """A complete experiment config.

    preset: a model family from `lm.models.transformer.PRESETS`, overridden by `model=...`.
    sections: model=, data=, optimizer=, train=, parallel= dicts of overrides.
    """
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown config section(s) {sorted(unknown)}; use {sorted(SECTIONS)}")
    # vocab_size 0 = take the tokenizer's size (a preset's vocabulary belongs to its tokenizer)
    model_base = {**(PRESETS[preset] if preset is not None else {}), "vocab_size": 0}
    return filled_sections(
        {
            name: (cls, model_base if name == "model" else {}, sections.get(name))
            for name, cls in SECTIONS.items()
        }
    )


def config_of(path: str | pathlib.Path, arg: str | None = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the experiment file at `path`, loaded by its path (experiments/ is
    not a package): for an experiment that varies another one, e.g.
    `config_of(pathlib.Path(__file__).with_name("shakespeare_gpt.py"), arg)`."""
    path = pathlib.Path(path)
    spec = importlib.util.spec_from_file_location(f"experiment_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def experiment_args(arg: str | None, *known: str) -> set[str]:
    """The words of an experiment file's `:arg` (comma-separated, e.g. `:lora,tiny`), each one of
    `known`. Every get_config(arg) calls this first, so that a misspelt arg (`:tyni`) is an
    error instead of silently running the full-size config."""
    words = {w.strip() for w in (arg or "").split(",") if w.strip()}
    unknown = sorted(words - set(known))
    if unknown:
        several = " (several: comma-separated)" if len(known) > 1 else ""
        raise ValueError(
            f"unknown experiment arg {','.join(unknown)!r}: this experiment takes "
            f"{' or '.join(':' + k for k in known)}{several}, or no arg"
        )
    return words


def resolve(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """ConfigDict -> plain dict, checking that exactly the known sections are present."""
    values = config.to_dict()
    unknown = set(values) - set(SECTIONS)
    if unknown:
        raise ValueError(f"unknown config section(s) {sorted(unknown)}; use {sorted(SECTIONS)}")
    return values


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A resolved experiment config, one frozen dataclass per section (`build` makes it).

    model: the model section's values. Its vocab_size may still be 0 (= the tokenizer's, known
    only once the tokenizer is built), so the ModelConfig comes from `model_config`.
    """

    model: dict[str, Any]
    data: DataConfig
    optimizer: OptimizerConfig
    train: TrainConfig
    parallel: ParallelConfig

    def model_config(self, tokenizer_vocab: int) -> ModelConfig:
        """The ModelConfig, its vocabulary the tokenizer's unless the config pins a larger one.
        ValueError if the pinned one is smaller than the tokenizer's."""
        return ModelConfig.from_dict(with_vocabulary(self.model, tokenizer_vocab))

    def create_trainer(self, model_cfg: ModelConfig, *, devices=None, init_params=None):
        """The run's `lm.train.Trainer` for `model_cfg` (`model_config`'s): its optimizer,
        steps, mesh and rules, seed and LoRA, over `devices` (default: all attached)."""
        return create_trainer(
            model_cfg,
            build_model(model_cfg),
            self.optimizer,
            self.train.steps,
            self.parallel,
            seed=self.train.seed,
            devices=devices,
            init_params=init_params,
            lora_config=self.train.lora,
        )


def build(values: dict[str, Any]) -> RunConfig:
    """Plain config dicts (`resolve`'s) -> a RunConfig, every section validated now (the model's
    keys too, although its vocabulary may come from the tokenizer later; LoRA targets are
    checked against the model's kernels). ValueError naming a bad key or value."""
    data = DataConfig.from_dict(values.get("data", {}))
    optimizer = OptimizerConfig.from_dict(values.get("optimizer", {}))
    train = TrainConfig.from_dict(values.get("train", {}))
    par = ParallelConfig.from_dict(values.get("parallel", {}))
    model_values = dict(values.get("model", {}))
    model = ModelConfig.from_dict(
        {**model_values, "vocab_size": model_values.get("vocab_size") or 1}
    )
    if train.lora.enabled:
        check_lora_targets(model, train.lora)
    check_lengths(model, data)
    return RunConfig(model_values, data, optimizer, train, par)


def check_lengths(model: ModelConfig, data: DataConfig) -> None:
    """ValueError unless the data's sequences fit the model's learned position table: a
    position past it reads no embedding, and the run would train into a non-finite loss."""
    if model.position != "learned":
        return
    lengths = [("data.seq_len", data.seq_len)]
    if model.architecture == "encoder_decoder":
        lengths.append(("data.encoder_len", data.encoder_len))
    for name, length in lengths:
        if length > model.max_len:
            raise ValueError(
                f"{name}={length} is longer than the model's {model.max_len} learned positions "
                f"(model.max_len={model.max_len}): lower {name} or raise model.max_len"
            )


def check_lora_targets(model: ModelConfig, lora_config: lora.LoraConfig) -> None:
    """Raises ValueError if train.lora_targets names no kernel of the model (or a misspelt one),
    before a run writes anything. Shapes only: nothing is initialised."""
    module = build_model(model)
    boxed = jax.eval_shape(
        lambda: module.init(jax.random.PRNGKey(0), **dummy_inputs(model))["params"]
    )
    lora.find_targets(boxed, lora_config)


# ------------------------------------------------------------------------------------ sweeps
# A sweep is a list of override dicts, each mapping dotted config keys to values
# ({"optimizer.learning_rate": 1e-3, "model.d_model": 64}); an experiment file's optional
# `get_sweep(arg)` returns one, and `python -m launch.sweep` trains one run per dict. The key
# "name", if present, names the run's workdir instead of the name made from the overrides.


def _check_points(points, where: str) -> list[dict[str, Any]]:
    if isinstance(points, dict) or not isinstance(points, (list, tuple)):
        raise TypeError(f"{where}: expected a list of override dicts, got {type(points).__name__}")
    for i, point in enumerate(points):
        if not isinstance(point, dict):
            raise TypeError(f"{where}: item {i} is a {type(point).__name__}, not an override dict")
    return list(points)


def _merge(dicts: tuple[dict[str, Any], ...], where: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for d in dicts:
        for key, value in d.items():
            if key in merged:
                raise ValueError(
                    f"{where}: key {key!r} is set by more than one factor "
                    f"({merged[key]!r} and {value!r})"
                )
            merged[key] = value
    return merged


def sweep_axis(key: str, values) -> list[dict[str, Any]]:
    """One config key over values: sweep_axis("optimizer.learning_rate", [1e-3, 3e-3]) ->
    [{"optimizer.learning_rate": 0.001}, {"optimizer.learning_rate": 0.003}]."""
    if not isinstance(key, str) or not key:
        raise TypeError(f"sweep_axis: the key must be a dotted config key, got {key!r}")
    if isinstance(values, (str, bytes, dict)):
        raise TypeError(
            f"sweep_axis({key!r}, ...): values must be a list, got {type(values).__name__}"
        )
    return [{key: v} for v in values]


def sweep_product(*factors) -> list[dict[str, Any]]:
    """The cartesian product of lists of override dicts, each combination merged into one dict
    (the first factor varies slowest). A key set by two factors is an error.

    sweep_product(sweep_axis("a", [1, 2]), sweep_axis("b", [3, 4]))
      -> [{a: 1, b: 3}, {a: 1, b: 4}, {a: 2, b: 3}, {a: 2, b: 4}]
    """
    import itertools

    lists = [_check_points(f, f"sweep_product argument {i}") for i, f in enumerate(factors)]
    return [_merge(combo, "sweep_product") for combo in itertools.product(*lists)]


def sweep_zip(*factors) -> list[dict[str, Any]]:
    """Elementwise merge of equal-length lists of override dicts (keys that change together).

    sweep_zip(sweep_axis("model.d_model", [128, 256]), sweep_axis("model.mlp_dim", [512, 1024]))
      -> [{d_model: 128, mlp_dim: 512}, {d_model: 256, mlp_dim: 1024}]
    """
    lists = [_check_points(f, f"sweep_zip argument {i}") for i, f in enumerate(factors)]
    lengths = [len(x) for x in lists]
    if len(set(lengths)) > 1:
        raise ValueError(
            f"sweep_zip: the lists have different lengths {lengths}; zip needs equal "
            "lengths (use sweep_product for all combinations)"
        )
    return [_merge(row, "sweep_zip") for row in zip(*lists, strict=True)]
