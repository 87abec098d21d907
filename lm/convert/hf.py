"""Import and export of Hugging Face layouts (``config.json`` + ``model.safetensors``).

Four families map onto `ModelConfig` options of the modules that train here, one entry of
the `FAMILIES` table each (which models it holds, its config.json both ways, its tensors):

- ``gpt2``: learned positions, LayerNorm with biases, GELU (tanh) MLP, biases everywhere.
  GPT-2's ``Conv1D`` weights are already ``[in, out]`` like our kernels; its fused
  ``c_attn`` holds query, key and value side by side.
- ``llama``: rotary positions in the half-split layout (ours: no permutation), RMSNorm,
  SwiGLU, grouped-query attention, optional biases (``attention_bias`` / ``mlp_bias``).
- ``mixtral``: Llama's layers without biases, an optional sliding window on every layer, and
  a mixture of SwiGLU experts for the MLP: a float32 softmax router over all experts, top-k,
  gates renormalised to sum to 1 (`ModelConfig.num_experts` / ``experts_per_token``). HF
  stores each expert's ``w1`` (gate), ``w3`` (up) and ``w2`` (down) as its own ``[out, in]``
  linear; ours stack them as ``[expert, in, out]`` kernels.
- ``t5`` (T5 and T5 v1.1): pre-norm RMSNorm, no biases, unscaled query-key logits,
  relative-position buckets (one table per stack, stored in its first layer), ReLU or
  gated-GELU MLP, shared embeddings; a tied head multiplies the decoder output by
  ``d_model ** -0.5`` (``scale_decoder_outputs``).

``torch.nn.Linear`` stores ``[out, in]``; our kernels are ``[in, ...out]`` (attention
projections split ``out`` into ``[heads, head_dim]``, the output projection splits
``in``). Every tensor goes through its family's table (`Family.tensors`) in both directions, so
import -> export -> import is bit-identical. Params come back as nested dicts of float32
numpy arrays, or of `LazyArray`s that read each block from the files when it is placed on a
device (``lazy=True``: sharded checkpoints larger than host memory), and are checked leaf by
leaf against ``jax.eval_shape(model.init, ...)``.

No torch or transformers is needed: tensors are read and written with
``safetensors.numpy`` (bfloat16 checkpoints load through ``ml_dtypes``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np

from lm import storage
from lm.convert.gguf import CheckpointFormatError, Pretrained
from lm.models.transformer import EXECUTION_FIELDS, ModelConfig, to_layout, unstack_layers
from lm.utils import LazyArray

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"

# Hugging Face activation names (transformers' ACT2FN) -> ours.
_ACTIVATIONS = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}
_HF_ACTIVATION = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu", "silu": "silu"}

# Fields that do not change what a checkpoint computes; export does not need to express them.
_RUNTIME_FIELDS = (
    "capture_attention",
    "dtype",
    "param_dtype",
    "init_std",
    "dropout",
    "attention_dropout",
    *EXECUTION_FIELDS,  # attention_impl, scan_layers, remat, precision, logits_chunk, ...
)
# Mixture-of-experts options, meaningless for a dense MLP (num_experts=0).
_EXPERT_FIELDS = ("experts_per_token", "router_aux_loss")
_DEFAULTS = ModelConfig()


# ----------------------------------------------------------------------------- configs


def _get(hf: dict, key: str, default: Any = None, *, family: str) -> Any:
    value = hf.get(key, default)
    if value is None:
        raise ValueError(f"Hugging Face {family} config has no {key!r}; config.json is incomplete.")
    return value


def _activation(name: str, family: str, key: str) -> str:
    if name not in _ACTIVATIONS:
        raise ValueError(
            f"Hugging Face {family} config: {key}={name!r} is not supported "
            f"(supported: {sorted(_ACTIVATIONS)})."
        )
    return _ACTIVATIONS[name]


def _unsupported(family: str, key: str, value: Any, why: str = "") -> ValueError:
    return ValueError(
        f"Hugging Face {family} config: {key}={value!r} is not supported"
        f"{': ' + why if why else ''}."
    )


def _first_id(value: Any) -> int:
    if isinstance(value, list | tuple):
        value = value[0] if value else None
    return -1 if value is None else int(value)


def config_from_hf(hf_config: dict[str, Any]) -> ModelConfig:
    """The `ModelConfig` of a Hugging Face ``config.json`` (model_type gpt2, llama, mixtral or t5).

    Raises:
      ValueError: an unsupported model_type, an option our modules cannot express
        (e.g. ``rope_scaling``), or a missing required field; the message names it.
    """
    family = hf_config.get("model_type")
    if family not in FAMILIES:
        raise ValueError(
            f"Hugging Face model_type {family!r} is not supported; supported: {SUPPORTED}."
        )
    return FAMILIES[family].config_from_hf(hf_config)


def _gpt2_config(hf: dict) -> ModelConfig:
    get = lambda key, default=None: _get(hf, key, default, family="gpt2")  # noqa: E731
    for key in ("add_cross_attention", "scale_attn_by_inverse_layer_idx"):
        if hf.get(key):
            raise _unsupported("gpt2", key, hf[key])
    d_model = int(get("n_embd"))
    resid = float(hf.get("resid_pdrop") or 0.0)
    return ModelConfig(
        architecture="decoder",
        vocab_size=int(get("vocab_size")),
        d_model=d_model,
        num_layers=int(get("n_layer")),
        num_heads=int(get("n_head")),
        mlp_dim=int(hf.get("n_inner") or 4 * d_model),
        mlp_activation=_activation(
            get("activation_function", "gelu_new"), "gpt2", "activation_function"
        ),
        norm="layernorm",
        norm_eps=float(get("layer_norm_epsilon", 1e-5)),
        position="learned",
        max_len=int(get("n_positions", hf.get("n_ctx"))),
        use_bias=True,
        attention_scale=0.0 if hf.get("scale_attn_weights", True) else 1.0,
        tied_embeddings=bool(hf.get("tie_word_embeddings", True)),
        dropout=resid,
        attention_dropout=float(hf.get("attn_pdrop") or 0.0),
        init_std=float(hf.get("initializer_range") or _DEFAULTS.init_std),
    )


def _rope_base(hf: dict, family: str, default: float) -> float:
    """rope_theta from transformers 5's ``rope_parameters`` or 4's ``rope_theta``."""
    params = hf.get("rope_parameters")
    scaling = hf.get("rope_scaling")
    if params is not None:
        kind = params.get("rope_type", params.get("type", "default"))
        if kind != "default":
            raise _unsupported(
                family, "rope_parameters.rope_type", kind, "only unscaled RoPE is implemented"
            )
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise _unsupported(
                family, "rope_parameters.partial_rotary_factor", params["partial_rotary_factor"]
            )
        theta = params.get("rope_theta", hf.get("rope_theta", default))
    else:
        theta = hf.get("rope_theta", default)
    if (
        scaling is not None
        and scaling.get("rope_type", scaling.get("type", "default")) != "default"
    ):
        raise _unsupported(family, "rope_scaling", scaling, "only unscaled RoPE is implemented")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise _unsupported(family, "partial_rotary_factor", hf["partial_rotary_factor"])
    return float(theta)


def _rotary_decoder(hf: dict, family: str, rope_base: float, max_len: int) -> dict[str, Any]:
    """The `ModelConfig` fields that Llama and Mixtral configs spell alike (their own defaults
    for rope_theta and max_position_embeddings where a key is absent)."""
    get = lambda key, default=None: _get(hf, key, default, family=family)  # noqa: E731
    d_model, heads = int(get("hidden_size")), int(get("num_attention_heads"))
    return dict(
        architecture="decoder",
        vocab_size=int(get("vocab_size")),
        d_model=d_model,
        num_layers=int(get("num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or d_model // heads),
        mlp_dim=int(get("intermediate_size")),
        mlp_activation=_activation(get("hidden_act", "silu"), family, "hidden_act"),
        mlp_gated=True,
        norm="rmsnorm",
        norm_eps=float(get("rms_norm_eps", 1e-6)),
        position="rotary",
        rope_base=_rope_base(hf, family, rope_base),
        max_len=int(get("max_position_embeddings", max_len)),
        tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_dropout=float(hf.get("attention_dropout") or 0.0),
        init_std=float(hf.get("initializer_range") or _DEFAULTS.init_std),
    )


def _llama_config(hf: dict) -> ModelConfig:
    attention_bias, mlp_bias = (
        bool(hf.get("attention_bias", False)),
        bool(hf.get("mlp_bias", False)),
    )
    if attention_bias != mlp_bias:
        raise _unsupported(
            "llama",
            "attention_bias/mlp_bias",
            (attention_bias, mlp_bias),
            "our modules have one use_bias switch for attention and MLP",
        )
    fields = _rotary_decoder(hf, "llama", rope_base=10_000.0, max_len=2048)
    return ModelConfig(**fields, use_bias=attention_bias)


def _mixtral_config(hf: dict) -> ModelConfig:
    # Absent keys take MixtralConfig's defaults.
    get = lambda key, default=None: _get(hf, key, default, family="mixtral")  # noqa: E731
    experts, k = int(get("num_local_experts", 8)), int(get("num_experts_per_tok", 2))
    if k > experts:
        raise _unsupported(
            "mixtral", "num_experts_per_tok", k, f"more than num_local_experts={experts}"
        )
    if k < 2:
        raise _unsupported(
            "mixtral",
            "num_experts_per_tok",
            k,
            "Mixtral renormalises even a single expert's gate to 1; our router keeps a lone "
            "expert's probability, as Switch does (use 2 or more)",
        )
    window = hf.get("sliding_window")
    # Mistral's window (query i sees keys j with i - j < window, on every layer) is ours.
    if window is not None and (
        isinstance(window, bool) or not isinstance(window, int) or window < 1
    ):
        raise _unsupported(
            "mixtral", "sliding_window", window, "use null (no window) or a positive length"
        )
    # router_jitter_noise multiplies the router's inputs by U(1 - j, 1 + j) noise in training
    # only (`self.training`): the checkpoint computes the same logits whatever its value, so
    # it is accepted and not represented (training here adds no jitter; an export keeps the
    # source config.json's value). router_aux_loss_coef is carried as our load-balancing
    # coefficient; transformers adds its loss only with output_router_logits=True and counts
    # k assignments per token over all layers at once (k when balanced), ours per layer (1
    # when balanced), so the two training objectives weight it differently.
    return ModelConfig(
        **_rotary_decoder(hf, "mixtral", rope_base=1_000_000.0, max_len=4096 * 32),
        use_bias=False,
        sliding_window=int(window or 0),
        num_experts=experts,
        experts_per_token=k,
        router_aux_loss=float(get("router_aux_loss_coef", 0.001)),
    )


def _t5_feed_forward(value: str) -> tuple[str, bool]:
    parts = value.split("-")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "gated"):
        raise _unsupported(
            "t5", "feed_forward_proj", value, "use 'ACT' or 'gated-ACT' (e.g. 'relu', 'gated-gelu')"
        )
    act = "gelu_new" if value == "gated-gelu" else parts[-1]  # as transformers' T5Config
    return _activation(act, "t5", "feed_forward_proj"), parts[0] == "gated"


def _t5_config(hf: dict) -> ModelConfig:
    get = lambda key, default=None: _get(hf, key, default, family="t5")  # noqa: E731
    activation, gated = _t5_feed_forward(get("feed_forward_proj", "relu"))
    tied = bool(hf.get("tie_word_embeddings", True))
    # transformers 5 saves `scale_decoder_outputs`; older configs scale iff the head is tied.
    scaled = bool(hf.get("scale_decoder_outputs", tied))
    if scaled and not tied:
        raise _unsupported(
            "t5",
            "scale_decoder_outputs",
            True,
            "our modules scale the decoder output only before a tied head",
        )
    buckets = int(get("relative_attention_num_buckets", 32))
    max_distance = int(get("relative_attention_max_distance", 128))
    if buckets < 4 or max_distance <= buckets // 4:
        raise _unsupported(
            "t5",
            "relative_attention_num_buckets/max_distance",
            (buckets, max_distance),
            "need buckets >= 4 and max_distance > buckets/4",
        )
    encoder_layers = int(get("num_layers"))
    decoder_layers = int(hf.get("num_decoder_layers") or encoder_layers)
    dropout = float(hf.get("dropout_rate") or 0.0)
    return ModelConfig(
        architecture="encoder_decoder",
        vocab_size=int(get("vocab_size")),
        d_model=int(get("d_model")),
        num_layers=decoder_layers,
        num_encoder_layers=0 if encoder_layers == decoder_layers else encoder_layers,
        num_heads=int(get("num_heads")),
        head_dim=int(get("d_kv")),
        mlp_dim=int(get("d_ff")),
        mlp_activation=activation,
        mlp_gated=gated,
        norm="rmsnorm",
        norm_eps=float(get("layer_norm_epsilon", 1e-6)),
        position="relative",
        relative_buckets=buckets,
        relative_max_distance=max_distance,
        attention_scale=1.0,
        scale_tied_logits=tied and scaled,
        max_len=int(hf.get("n_positions") or _DEFAULTS.max_len),
        use_bias=False,
        tied_embeddings=tied,
        shared_embeddings=True,
        dropout=dropout,
        attention_dropout=dropout,
    )


def family_of(config: ModelConfig) -> str:
    """The Hugging Face model_type whose layout can hold `config`'s model (the first entry of
    `FAMILIES` whose `holds` says so)."""
    for name, family in FAMILIES.items():
        if family.holds(config):
            return name
    raise ValueError(
        f"a decoder-only model with position={config.position!r} has no Hugging Face "
        "layout here: gpt2 needs 'learned' positions, llama and mixtral 'rotary'."
    )


def _canonical(c: ModelConfig) -> dict[str, Any]:
    """`c`'s fields, with equivalent spellings made equal and unused options dropped."""
    values = dataclasses.asdict(c)
    for name in _RUNTIME_FIELDS + (() if c.num_experts else _EXPERT_FIELDS):
        values.pop(name, None)
    values.update(
        num_kv_heads=c.kv_heads,
        head_dim=c.dim_per_head,
        attention_scale=c.attention_scale or c.dim_per_head**-0.5,
        num_encoder_layers=c.encoder_layers if c.architecture == "encoder_decoder" else 0,
    )
    if c.architecture == "decoder":
        values.pop("shared_embeddings")
    if not c.tied_embeddings:
        values.pop("scale_tied_logits")
    if c.position != "relative":
        values.pop("relative_buckets"), values.pop("relative_max_distance")
    if c.position != "rotary":
        values.pop("rope_base")
    if not c.sliding_window:
        values.pop("rope_local_base"), values.pop("global_every")
    return values


def _config_difference(ours: ModelConfig, theirs: ModelConfig, family: str) -> list[str]:
    a, b = _canonical(ours), _canonical(theirs)
    return [
        f"model.{key}={getattr(ours, key)!r} (the {family} layout can only say "
        f"{getattr(theirs, key)!r})"
        for key in sorted(set(a) | set(b))
        if a.get(key) != b.get(key)
    ]


def _hf_activation(ours: str, base_value: Any) -> str:
    """Our activation's HF name, keeping the base config's spelling when it means the same."""
    if isinstance(base_value, str) and _ACTIVATIONS.get(base_value) == ours:
        return base_value
    return _HF_ACTIVATION[ours]


def config_to_hf(
    config: ModelConfig, base: dict[str, Any] | None = None, *, dtype: str = "float32"
) -> dict[str, Any]:
    """The ``config.json`` dict that transformers reads as `config`'s model.

    `base` (e.g. the config.json a model was imported from) supplies the keys that do not
    describe the architecture (token ids, transformers_version, ...); every architecture key
    is written from `config`. Raises ValueError when the family's layout cannot express
    an option of `config` (e.g. a Llama with qk_norm), naming it.
    """
    family = family_of(config)
    base = dict(base or {})
    if base.get("model_type", family) != family:
        raise ValueError(
            f"the base config is a {base['model_type']!r} config but this model has "
            f"the {family!r} layout."
        )
    arch, defaults = FAMILIES[family].config_to_hf(config, base)
    out = {**defaults, **base, **arch}
    out["torch_dtype" if "torch_dtype" in base and "dtype" not in base else "dtype"] = dtype
    again = config_from_hf(out)
    difference = _config_difference(config, again, family)
    if difference:
        raise ValueError(
            f"the Hugging Face {family} layout cannot express this model: "
            + "; ".join(difference)
            + "."
        )
    return dict(sorted(out.items()))


def _gpt2_to_hf(c: ModelConfig, base: dict[str, Any]) -> tuple[dict, dict]:
    """The gpt2 config.json keys that describe `c`'s architecture, and defaults for the
    other keys where `base` lacks them."""
    arch = {
        "activation_function": _hf_activation(c.mlp_activation, base.get("activation_function")),
        "add_cross_attention": False,
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": c.attention_dropout,
        "embd_pdrop": c.dropout,
        "layer_norm_epsilon": c.norm_eps,
        "model_type": "gpt2",
        "n_embd": c.d_model,
        "n_head": c.num_heads,
        "n_inner": None if c.mlp_dim == 4 * c.d_model else c.mlp_dim,
        "n_layer": c.num_layers,
        "n_positions": c.max_len,
        "reorder_and_upcast_attn": False,
        "resid_pdrop": c.dropout,
        "scale_attn_by_inverse_layer_idx": False,
        "scale_attn_weights": c.attention_scale != 1.0,
        "tie_word_embeddings": c.tied_embeddings,
        "vocab_size": c.vocab_size,
        "initializer_range": c.init_std,
    }
    if c.attention_scale not in (0.0, 1.0, c.dim_per_head**-0.5):
        raise ValueError(
            f"model.attention_scale={c.attention_scale} has no gpt2 equivalent "
            "(scale_attn_weights is head_dim^-1/2 or 1)."
        )
    defaults = {
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "summary_activation": None,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": True,
        "summary_type": "cls_index",
        "summary_use_proj": True,
        "use_cache": True,
    }
    return arch, defaults


def _rotary_to_hf(c: ModelConfig, base: dict[str, Any]) -> dict[str, Any]:
    """The config.json keys that Llama and Mixtral spell alike."""
    head_dim = c.dim_per_head
    if base.get("head_dim", 0) is None and head_dim * c.num_heads == c.d_model:
        head_dim = None  # a base that left it null (hidden_size / heads) keeps it null
    arch = {
        "attention_dropout": c.attention_dropout,
        "head_dim": head_dim,
        "hidden_act": _hf_activation(c.mlp_activation, base.get("hidden_act")),
        "hidden_size": c.d_model,
        "intermediate_size": c.mlp_dim,
        "max_position_embeddings": c.max_len,
        "num_attention_heads": c.num_heads,
        "num_hidden_layers": c.num_layers,
        "num_key_value_heads": c.kv_heads,
        "rms_norm_eps": c.norm_eps,
        "tie_word_embeddings": c.tied_embeddings,
        "vocab_size": c.vocab_size,
        "initializer_range": c.init_std,
    }
    # transformers 5 reads `rope_parameters`, 4 reads `rope_theta`; follow the base's
    # spelling, and write both when there is no base.
    if "rope_parameters" in base or "rope_theta" not in base:
        arch["rope_parameters"] = {"rope_theta": c.rope_base, "rope_type": "default"}
    if "rope_theta" in base or "rope_parameters" not in base:
        arch["rope_theta"] = c.rope_base
    if "rope_scaling" in base:
        arch["rope_scaling"] = None
    return arch


def _llama_to_hf(c: ModelConfig, base: dict[str, Any]) -> tuple[dict, dict]:
    """The llama config.json keys that describe `c`'s architecture, and defaults for the
    other keys where `base` lacks them."""
    arch = {
        **_rotary_to_hf(c, base),
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": c.use_bias,
        "mlp_bias": c.use_bias,
        "model_type": "llama",
    }
    defaults = {
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "pretraining_tp": 1,
        "use_cache": True,
    }
    return arch, defaults


def _mixtral_to_hf(c: ModelConfig, base: dict[str, Any]) -> tuple[dict, dict]:
    """The mixtral config.json keys that describe `c`'s architecture, and defaults for the
    other keys where `base` lacks them (router_jitter_noise and output_router_logits are
    training settings: the base's values are kept)."""
    arch = {
        **_rotary_to_hf(c, base),
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "num_experts_per_tok": c.experts_per_token,
        "num_local_experts": c.num_experts,
        "router_aux_loss_coef": c.router_aux_loss,
        "sliding_window": c.sliding_window or None,
    }
    defaults = {
        "bos_token_id": None,
        "eos_token_id": None,
        "output_router_logits": False,
        "pad_token_id": None,
        "router_jitter_noise": 0.0,
        "use_cache": True,
    }
    return arch, defaults


def _t5_to_hf(c: ModelConfig, base: dict[str, Any]) -> tuple[dict, dict]:
    """The t5 config.json keys that describe `c`'s architecture, and defaults for the
    other keys where `base` lacks them."""
    act = _HF_ACTIVATION[c.mlp_activation]
    if c.mlp_gated and c.mlp_activation == "gelu_tanh":
        feed_forward = "gated-gelu"  # transformers maps it to gelu_new
    else:
        feed_forward = f"gated-{act}" if c.mlp_gated else act
    arch = {
        "architectures": ["T5ForConditionalGeneration"],
        "d_ff": c.mlp_dim,
        "d_kv": c.dim_per_head,
        "d_model": c.d_model,
        "dense_act_fn": act,
        "dropout_rate": c.dropout,
        "feed_forward_proj": feed_forward,
        "is_encoder_decoder": True,
        "is_gated_act": c.mlp_gated,
        "layer_norm_epsilon": c.norm_eps,
        "model_type": "t5",
        "num_decoder_layers": c.num_layers,
        "num_heads": c.num_heads,
        "num_layers": c.encoder_layers,
        "relative_attention_max_distance": c.relative_max_distance,
        "relative_attention_num_buckets": c.relative_buckets,
        "scale_decoder_outputs": c.tied_embeddings and c.scale_tied_logits,
        "tie_word_embeddings": c.tied_embeddings,
        "vocab_size": c.vocab_size,
    }
    if c.max_len != _DEFAULTS.max_len or "n_positions" in base:
        arch["n_positions"] = c.max_len
    if c.attention_dropout != c.dropout:
        raise ValueError(
            f"model.attention_dropout={c.attention_dropout} differs from "
            f"model.dropout={c.dropout}; T5 has one dropout_rate for both."
        )
    defaults = {
        "classifier_dropout": 0.0,
        "decoder_start_token_id": 0,
        "eos_token_id": 1,
        "initializer_factor": 1.0,
        "is_decoder": False,
        "pad_token_id": 0,
        "use_cache": True,
    }
    return arch, defaults


# ----------------------------------------------------------------------------- tensor table


Path = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Tensor:
    """One Hugging Face tensor and the param(s) of ours it holds.

    kind: 'same' (identical array), 'vector' (our params flattened and concatenated),
      'linear' (HF [out, in] = transposed kernel) or 'conv1d' (HF [in, out] = kernel).
      Several params in `ours` sit side by side along HF's output axis (GPT-2's c_attn).
    in_axes: how many leading axes of our kernel are its input (2 for the attention output).
    expert: >= 0: the HF tensor is only this expert's block (row `expert` of the leading
      axis) of our one stacked [expert, ...] param, which the tensors of all experts fill.
    """

    name: str
    ours: tuple[Path, ...]
    kind: str
    in_axes: int = 1
    expert: int = -1

    def __post_init__(self):
        assert self.expert < 0 or len(self.ours) == 1, self

    def block_shapes(self, shapes: Sequence[tuple[int, ...]]) -> list[tuple[int, ...]]:
        """The shapes of the parts of our params that this HF tensor holds."""
        return [tuple(s[1:]) if self.expert >= 0 else tuple(s) for s in shapes]

    def hf_shape(self, shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
        shapes = self.block_shapes(shapes)
        if self.kind == "same":
            return tuple(shapes[0])
        if self.kind == "vector":
            return (sum(math.prod(s) for s in shapes),)
        ins = {math.prod(s[: self.in_axes]) for s in shapes}
        assert len(ins) == 1, (self.name, shapes)
        shape = (ins.pop(), sum(math.prod(s[self.in_axes :]) for s in shapes))
        return shape[::-1] if self.kind == "linear" else shape

    def to_hf(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        if self.expert >= 0:
            arrays = [a[self.expert] for a in arrays]
        if self.kind == "same":
            return arrays[0]
        if self.kind == "vector":
            return np.concatenate([a.reshape(-1) for a in arrays])
        flat = [a.reshape(math.prod(a.shape[: self.in_axes]), -1) for a in arrays]
        out = flat[0] if len(flat) == 1 else np.concatenate(flat, axis=1)
        return out.T if self.kind == "linear" else out

    def from_hf(self, array: LazyArray, shapes: Sequence[tuple[int, ...]]) -> list[LazyArray]:
        """Our params (float32, of `shapes`; for an expert's tensor, that expert's block of
        them) over the HF tensor, unread: a block of one reads only the box of HF elements
        that holds it."""
        shapes = self.block_shapes(shapes)
        sizes = [math.prod(s[self.in_axes :]) for s in shapes]
        if self.kind == "vector":
            sizes = [math.prod(s) for s in shapes]
        offsets = np.cumsum([0] + sizes[:-1]).tolist()
        if self.kind == "same":
            return [array.astype(np.float32)]
        if self.kind == "vector":
            return [_vector_part(array, o, s) for o, s in zip(offsets, shapes, strict=True)]
        transposed = self.kind == "linear"
        return [
            _matrix_part(array, o, s, self.in_axes, transposed)
            for o, s in zip(offsets, shapes, strict=True)
        ]


def _vector_part(vector: LazyArray, offset: int, shape: tuple[int, ...]) -> LazyArray:
    """The param of `shape` stored flat at vector[offset:] (read whole: vectors are small)."""

    def read(index):
        part = vector.read((slice(offset, offset + math.prod(shape), 1),))
        return part.reshape(shape)[index].astype(np.float32)

    return LazyArray(tuple(shape), np.dtype(np.float32), read)


def _positions(shape: tuple[int, ...], index) -> np.ndarray:
    """Flat (row-major) positions of the elements `index` picks from an array of `shape`."""
    return np.arange(math.prod(shape)).reshape(shape)[index]


def _matrix_part(
    matrix: LazyArray, offset: int, shape: tuple[int, ...], in_axes: int, transposed: bool
) -> LazyArray:
    """The kernel of `shape` ([in..., out...]) that a HF matrix holds at columns `offset`... of
    its [in, out] form (`transposed`: the matrix is [out, in], as torch.nn.Linear stores it)."""

    def read(index):
        ins = _positions(shape[:in_axes], index[:in_axes])
        outs = _positions(shape[in_axes:], index[in_axes:]) + offset
        if not ins.size or not outs.size:
            return np.zeros(ins.shape + outs.shape, np.float32)
        i0, o0 = int(ins.min()), int(outs.min())
        box_in, box_out = slice(i0, int(ins.max()) + 1, 1), slice(o0, int(outs.max()) + 1, 1)
        box = matrix.read((box_out, box_in)).T if transposed else matrix.read((box_in, box_out))
        block = box[np.ix_(ins.ravel() - i0, outs.ravel() - o0)]
        return block.reshape(ins.shape + outs.shape).astype(np.float32)

    return LazyArray(tuple(shape), np.dtype(np.float32), read)


@dataclasses.dataclass(frozen=True)
class _Layout:
    family: str
    tensors: list[_Tensor]
    aliases: dict[str, str]  # duplicate HF names (tied copies) -> the name they must equal
    ignore: re.Pattern | None  # non-parameter buffers some checkpoints carry
    prefix: str  # base-model prefix that checkpoints of the bare model lack ('' = none)


def _attention(hf: str, ours: Path, names: Sequence[str], use_bias: bool) -> list[_Tensor]:
    """Separate q/k/v/o linears `hf + name + '.weight'` (Llama, T5)."""
    out = []
    for name, ours_name in zip(names, ("query", "key", "value", "out"), strict=True):
        in_axes = 2 if ours_name == "out" else 1
        out.append(
            _Tensor(f"{hf}{name}.weight", (ours + (ours_name, "kernel"),), "linear", in_axes)
        )
        if use_bias:
            out.append(_Tensor(f"{hf}{name}.bias", (ours + (ours_name, "bias"),), "vector"))
    return out


def _linear(hf: str, ours: Path, use_bias: bool) -> list[_Tensor]:
    out = [_Tensor(f"{hf}.weight", (ours + ("kernel",),), "linear")]
    if use_bias:
        out.append(_Tensor(f"{hf}.bias", (ours + ("bias",),), "same"))
    return out


def _tensor_table(config: ModelConfig) -> _Layout:
    """Every tensor of `config`'s Hugging Face layout, with the param(s) of ours it holds."""
    return FAMILIES[family_of(config)].tensors(config)


def _head(c: ModelConfig) -> list[_Tensor]:
    """The untied output projection (none when tied to the token embedding)."""
    return (
        [] if c.tied_embeddings else [_Tensor("lm_head.weight", (("lm_head", "kernel"),), "linear")]
    )


def _gpt2_tensors(c: ModelConfig) -> _Layout:
    """Every tensor of the gpt2 layout of `c`, with the param(s) of ours it holds."""
    t = [
        _Tensor("transformer.wte.weight", (("token_embedding", "embedding"),), "same"),
        _Tensor("transformer.wpe.weight", (("decoder", "position_embedding"),), "same"),
    ]
    for i in range(c.num_layers):
        hf, ours = f"transformer.h.{i}.", ("decoder", f"layer_{i}")
        att = ours + ("self_attention",)
        qkv = [att + (n,) for n in ("query", "key", "value")]
        t += [
            _Tensor(hf + "ln_1.weight", (ours + ("pre_attention_norm", "scale"),), "same"),
            _Tensor(hf + "ln_1.bias", (ours + ("pre_attention_norm", "bias"),), "same"),
            _Tensor(hf + "attn.c_attn.weight", tuple(p + ("kernel",) for p in qkv), "conv1d"),
            _Tensor(hf + "attn.c_attn.bias", tuple(p + ("bias",) for p in qkv), "vector"),
            _Tensor(hf + "attn.c_proj.weight", (att + ("out", "kernel"),), "conv1d", 2),
            _Tensor(hf + "attn.c_proj.bias", (att + ("out", "bias"),), "same"),
            _Tensor(hf + "ln_2.weight", (ours + ("pre_mlp_norm", "scale"),), "same"),
            _Tensor(hf + "ln_2.bias", (ours + ("pre_mlp_norm", "bias"),), "same"),
            _Tensor(hf + "mlp.c_fc.weight", (ours + ("mlp", "wi", "kernel"),), "conv1d"),
            _Tensor(hf + "mlp.c_fc.bias", (ours + ("mlp", "wi", "bias"),), "same"),
            _Tensor(hf + "mlp.c_proj.weight", (ours + ("mlp", "wo", "kernel"),), "conv1d"),
            _Tensor(hf + "mlp.c_proj.bias", (ours + ("mlp", "wo", "bias"),), "same"),
        ]
    t += [
        _Tensor("transformer.ln_f.weight", (("decoder", "final_norm", "scale"),), "same"),
        _Tensor("transformer.ln_f.bias", (("decoder", "final_norm", "bias"),), "same"),
    ]
    aliases = {"lm_head.weight": "transformer.wte.weight"} if c.tied_embeddings else {}
    return _Layout(
        "gpt2", t + _head(c), aliases, re.compile(r"\.attn\.(bias|masked_bias)$"), "transformer."
    )


def _rotary_tensors(
    c: ModelConfig, family: str, mlp: Callable[[str, Path], list[_Tensor]]
) -> _Layout:
    """Every tensor of the llama-like layout of `c` (Llama, Mixtral), with `mlp(hf, ours)`
    giving each layer's MLP tensors."""
    t = [_Tensor("model.embed_tokens.weight", (("token_embedding", "embedding"),), "same")]
    for i in range(c.num_layers):
        hf, ours = f"model.layers.{i}.", ("decoder", f"layer_{i}")
        t += [
            _Tensor(
                hf + "input_layernorm.weight", (ours + ("pre_attention_norm", "scale"),), "same"
            )
        ]
        t += _attention(
            hf + "self_attn.",
            ours + ("self_attention",),
            ("q_proj", "k_proj", "v_proj", "o_proj"),
            c.use_bias,
        )
        t += [
            _Tensor(
                hf + "post_attention_layernorm.weight",
                (ours + ("pre_mlp_norm", "scale"),),
                "same",
            )
        ]
        t += mlp(hf, ours + ("mlp",))
    t += [_Tensor("model.norm.weight", (("decoder", "final_norm", "scale"),), "same")]
    aliases = {"lm_head.weight": "model.embed_tokens.weight"} if c.tied_embeddings else {}
    return _Layout(family, t + _head(c), aliases, re.compile(r"\.rotary_emb\.inv_freq$"), "model.")


def _llama_tensors(c: ModelConfig) -> _Layout:
    """Every tensor of the llama layout of `c`, with the param(s) of ours it holds."""

    def mlp(hf: str, ours: Path) -> list[_Tensor]:
        out = []
        for name, mine in (("gate_proj", "wi_gate"), ("up_proj", "wi_up"), ("down_proj", "wo")):
            out += _linear(hf + "mlp." + name, ours + (mine,), c.use_bias)
        return out

    return _rotary_tensors(c, "llama", mlp)


def _mixtral_tensors(c: ModelConfig) -> _Layout:
    """Every tensor of the mixtral layout of `c`, with the param(s) of ours it holds: the
    router's [experts, hidden] gate is our [embed, expert] kernel transposed; expert E's w1
    (gate) / w3 (up) [ffn, hidden] and w2 (down) [hidden, ffn] are row E of our stacked
    wi_gate / wi_up [expert, embed, mlp] and wo [expert, mlp, embed] kernels, transposed."""

    def mlp(hf: str, ours: Path) -> list[_Tensor]:
        moe = hf + "block_sparse_moe."
        out = [_Tensor(moe + "gate.weight", (ours + ("router", "kernel"),), "linear")]
        for e in range(c.num_experts):
            for name, mine in (("w1", "wi_gate"), ("w3", "wi_up"), ("w2", "wo")):
                path = (ours + (mine, "kernel"),)
                out.append(_Tensor(f"{moe}experts.{e}.{name}.weight", path, "linear", expert=e))
        return out

    return _rotary_tensors(c, "mixtral", mlp)


def _t5_tensors(c: ModelConfig) -> _Layout:
    """Every tensor of the t5 layout of `c`, with the param(s) of ours it holds."""
    t = [_Tensor("shared.weight", (("token_embedding", "embedding"),), "same")]
    for stack, layers in (("encoder", c.encoder_layers), ("decoder", c.num_layers)):
        t += [
            _Tensor(
                f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
                ((stack, "relative_attention_bias"),),
                "same",
            )
        ]
        for i in range(layers):
            hf, ours = f"{stack}.block.{i}.layer.", (stack, f"layer_{i}")
            t += [
                _Tensor(
                    hf + "0.layer_norm.weight", (ours + ("pre_attention_norm", "scale"),), "same"
                )
            ]
            t += _attention(hf + "0.SelfAttention.", ours + ("self_attention",), "qkvo", False)
            mlp = 1
            if stack == "decoder":
                t += [
                    _Tensor(
                        hf + "1.layer_norm.weight",
                        (ours + ("pre_cross_attention_norm", "scale"),),
                        "same",
                    )
                ]
                t += _attention(
                    hf + "1.EncDecAttention.", ours + ("cross_attention",), "qkvo", False
                )
                mlp = 2
            t += [
                _Tensor(f"{hf}{mlp}.layer_norm.weight", (ours + ("pre_mlp_norm", "scale"),), "same")
            ]
            dense = f"{hf}{mlp}.DenseReluDense."
            if c.mlp_gated:
                t += _linear(dense + "wi_0", ours + ("mlp", "wi_gate"), False)
                t += _linear(dense + "wi_1", ours + ("mlp", "wi_up"), False)
            else:
                t += _linear(dense + "wi", ours + ("mlp", "wi"), False)
            t += _linear(dense + "wo", ours + ("mlp", "wo"), False)
        t += [
            _Tensor(f"{stack}.final_layer_norm.weight", ((stack, "final_norm", "scale"),), "same")
        ]
    aliases = {
        "encoder.embed_tokens.weight": "shared.weight",
        "decoder.embed_tokens.weight": "shared.weight",
    }
    if c.tied_embeddings:
        aliases["lm_head.weight"] = "shared.weight"
    return _Layout("t5", t + _head(c), aliases, None, "")


# ----------------------------------------------------------------------------- families


@dataclasses.dataclass(frozen=True)
class Family:
    """One Hugging Face model_type: which of our models it holds, its config.json in both
    directions, and its tensor names. A new family is one more entry of `FAMILIES`.

    holds: whether a `ModelConfig`'s model has this layout (`family_of` asks each in turn).
    config_from_hf: config.json dict -> `ModelConfig`; ValueError naming an option it cannot take.
    config_to_hf: (`ModelConfig`, base config.json) -> (the keys that describe the architecture,
      defaults for other keys the base lacks); ValueError for an option the layout lacks.
    tensors: `ModelConfig` -> every tensor of the layout with the param(s) of ours it holds.
    decoder_start_is_pad: the decoder starts from the pad token (T5), so export writes the
      tokenizer's pad id as decoder_start_token_id.
    """

    holds: Callable[[ModelConfig], bool]
    config_from_hf: Callable[[dict[str, Any]], ModelConfig]
    config_to_hf: Callable[[ModelConfig, dict[str, Any]], tuple[dict, dict]]
    tensors: Callable[[ModelConfig], _Layout]
    decoder_start_is_pad: bool = False


FAMILIES: dict[str, Family] = {
    "gpt2": Family(
        holds=lambda c: c.architecture == "decoder" and c.position == "learned",
        config_from_hf=_gpt2_config,
        config_to_hf=_gpt2_to_hf,
        tensors=_gpt2_tensors,
    ),
    "llama": Family(
        holds=lambda c: (
            c.architecture == "decoder" and c.position == "rotary" and not c.num_experts
        ),
        config_from_hf=_llama_config,
        config_to_hf=_llama_to_hf,
        tensors=_llama_tensors,
    ),
    "mixtral": Family(
        holds=lambda c: (
            c.architecture == "decoder" and c.position == "rotary" and c.num_experts > 0
        ),
        config_from_hf=_mixtral_config,
        config_to_hf=_mixtral_to_hf,
        tensors=_mixtral_tensors,
    ),
    "t5": Family(
        holds=lambda c: c.architecture == "encoder_decoder",
        config_from_hf=_t5_config,
        config_to_hf=_t5_to_hf,
        tensors=_t5_tensors,
        decoder_start_is_pad=True,
    ),
}
SUPPORTED = tuple(FAMILIES)


# ----------------------------------------------------------------------------- params


def param_shapes(config: ModelConfig) -> dict[Path, tuple[int, ...]]:
    """Flat {path: shape} of the params `build_model(config).init` makes (no allocation), in
    the unrolled layout (`layer_i`) that the tensor tables name."""
    import flax.linen as nn

    from lm.models.transformer import build_model, dummy_inputs

    config = dataclasses.replace(config, scan_layers=False)
    model = build_model(config)

    def init():
        return nn.meta.unbox(model.init(jax.random.key(0), **dummy_inputs(config))["params"])

    tree = jax.eval_shape(init)
    return {path: tuple(leaf.shape) for path, leaf in _flatten(tree).items()}


def _flatten(tree: Any, prefix: Path = ()) -> dict[Path, Any]:
    if isinstance(tree, dict) or (hasattr(tree, "keys") and hasattr(tree, "items")):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, prefix + (str(key),)))
        return out
    return {prefix: tree}


def _unflatten(flat: dict[Path, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def _names(paths, limit: int = 8) -> str:
    items = ["/".join(p) if isinstance(p, tuple) else str(p) for p in sorted(paths)]
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_params(params: Any, config: ModelConfig) -> dict[Path, tuple[int, ...]]:
    """Checks that `params` has exactly the paths and shapes of `config`'s model.

    Returns the flat {path: shape}. Raises CheckpointFormatError naming every missing,
    extra or misshapen param.
    """
    want = param_shapes(config)
    got = {path: tuple(np.shape(leaf)) for path, leaf in _flatten(unstack_layers(params)).items()}
    problems = []
    if missing := set(want) - set(got):
        problems.append(f"missing {_names(missing)}")
    if extra := set(got) - set(want):
        problems.append(f"unexpected {_names(extra)}")
    if bad := [p for p in set(want) & set(got) if want[p] != got[p]]:
        problems.append(
            "misshapen "
            + ", ".join(f"{'/'.join(p)} {got[p]} (want {want[p]})" for p in sorted(bad)[:8])
        )
    if problems:
        raise CheckpointFormatError("params do not fit the model config: " + "; ".join(problems))
    return want


def _layout_for(config: ModelConfig, shapes: dict[Path, tuple[int, ...]]) -> _Layout:
    layout = _tensor_table(config)
    covered = [p for t in layout.tensors for p in t.ours]
    if unplaced := set(shapes) - set(covered):
        raise ValueError(
            f"the Hugging Face {layout.family} layout has no place for the "
            f"params {_names(unplaced)} of this model config."
        )
    if unknown := set(covered) - set(shapes):  # a bug in the table, not in the checkpoint
        raise AssertionError(
            f"{layout.family} table names params the model lacks: {_names(unknown)}"
        )
    return layout


def _unread(array: np.ndarray | LazyArray) -> LazyArray:
    if isinstance(array, LazyArray):
        return array
    array = np.asarray(array)
    return LazyArray(array.shape, array.dtype, lambda index: array[index])


def _equal(a: LazyArray, b: LazyArray, block_bytes: int = 1 << 26) -> bool:
    """Whether two tensors are equal, compared a block of rows at a time."""
    if a.shape != b.shape:
        return False
    if not a.shape:
        return bool(np.array_equal(a[()], b[()]))
    rows = max(1, block_bytes // max(1, a.nbytes // max(1, a.shape[0])))
    return all(
        np.array_equal(a[start : start + rows], b[start : start + rows])
        for start in range(0, a.shape[0], rows)
    )


def params_from_hf(
    tensors: Mapping[str, np.ndarray | LazyArray],
    config: ModelConfig,
    source: str = "the checkpoint",
    *,
    lazy: bool = False,
) -> dict[str, Any]:
    """Our float32 params (nested dicts, in the layout `config` builds) from HF-named
    tensors (arrays, or `LazyArray`s as `open_tensors` gives), checked name by name.

    lazy: leave the params as float32 `LazyArray`s, read only where they are indexed: a
      sharded placement (`lm.train.create_trainer(init_params=...)`) then reads each device's
      block from the files, never the whole model into host memory.
    Raises CheckpointFormatError naming a missing, unexpected or misshapen tensor.
    """
    tensors = {name: _unread(array) for name, array in tensors.items()}
    shapes = param_shapes(config)
    layout = _layout_for(config, shapes)
    if layout.prefix and not any(k.startswith(layout.prefix) for k in tensors):
        # A checkpoint of the bare model (GPT2Model, LlamaModel): names lack the prefix.
        tensors = {
            (k if k.startswith("lm_head.") else layout.prefix + k): v for k, v in tensors.items()
        }
    needed = {t.name for t in layout.tensors}
    missing = sorted(needed - set(tensors))
    if missing:
        raise CheckpointFormatError(
            f"{source} has no tensor {missing[0]!r}"
            + (
                f" (nor {len(missing) - 1} more: {_names(missing[1:], 5)})"
                if len(missing) > 1
                else ""
            )
            + f", which the {layout.family} model described by config.json ({config.num_layers} "
            "layers) needs; the file is incomplete or does not match config.json."
        )
    extra = []
    for name in sorted(set(tensors) - needed):
        if layout.ignore is not None and layout.ignore.search(name):
            continue
        if name in layout.aliases:
            if not _equal(tensors[name], tensors[layout.aliases[name]]):
                raise CheckpointFormatError(
                    f"{source}: {name!r} differs from {layout.aliases[name]!r}, but config.json "
                    "says they are one tied tensor (tie_word_embeddings)."
                )
            continue
        extra.append(name)
    if extra:
        raise CheckpointFormatError(
            f"{source} has tensor(s) {_names(extra, 5)} that a {layout.family} model with this "
            "config.json does not use; the config does not describe these weights "
            "(e.g. more layers, biases or an untied head)."
        )
    flat, experts = {}, {}
    for t in layout.tensors:
        array = tensors[t.name]
        if array.dtype.kind not in "fV":  # float16/32/64; bfloat16 (ml_dtypes) is kind 'V'
            raise CheckpointFormatError(
                f"{source}: tensor {t.name!r} has dtype {array.dtype}, not a float type."
            )
        ours = [shapes[p] for p in t.ours]
        want = t.hf_shape(ours)
        if tuple(array.shape) != want:
            raise CheckpointFormatError(
                f"{source}: tensor {t.name!r} has shape {tuple(array.shape)} but config.json "
                f"implies {want}; the config does not match the weights."
            )
        parts = t.from_hf(array, ours)
        if t.expert >= 0:  # one expert's block: the experts' blocks are stacked below
            experts.setdefault(t.ours[0], {})[t.expert] = parts[0]
        else:
            flat.update(zip(t.ours, parts, strict=True))
    for path, blocks in experts.items():
        flat[path] = LazyArray.stack([blocks[e] for e in sorted(blocks)])
    # The table covers exactly the leaves of jax.eval_shape(model.init) (`_layout_for`).
    assert {p: a.shape for p, a in flat.items()} == shapes
    params = to_layout(_unflatten(flat), config)  # stacking LazyArrays reads nothing
    return params if lazy else jax.tree.map(np.asarray, params)


def params_to_hf(
    params: Any, config: ModelConfig, *, dtype: str = "float32"
) -> dict[str, np.ndarray]:
    """HF-named tensors from our params (checked against `config` first)."""
    shapes = check_params(params, config)
    layout = _layout_for(config, shapes)
    np_dtype = _numpy_dtype(dtype)
    flat = {path: np.asarray(leaf) for path, leaf in _flatten(unstack_layers(params)).items()}
    return {
        t.name: np.ascontiguousarray(t.to_hf([flat[p] for p in t.ours]).astype(np_dtype))
        for t in layout.tensors
    }


def _numpy_dtype(dtype: str):
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    if dtype in ("float32", "float16"):
        return np.dtype(dtype)
    raise ValueError(f"dtype={dtype!r}: use 'float32', 'bfloat16' or 'float16'.")


# ----------------------------------------------------------------------------- files


def _read_json(path: pathlib.Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(f"{path} is not readable JSON ({e}).") from e
    if not isinstance(value, dict):
        raise CheckpointFormatError(f"{path} does not hold a JSON object.")
    return value


def _safetensors_dtypes() -> dict[str, np.dtype]:
    import ml_dtypes

    names = {"F64": "float64", "F32": "float32", "F16": "float16", "I64": "int64"}
    names |= {"I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
    out = {k: np.dtype(v) for k, v in names.items()}
    out |= {"BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn)}
    return out | {"F8_E5M2": np.dtype(ml_dtypes.float8_e5m2)}


def _corrupt(path: pathlib.Path, error: Exception) -> CheckpointFormatError:
    return CheckpointFormatError(
        f"{path} could not be read as safetensors ({error}); the file is probably truncated or "
        f"corrupt ({path.stat().st_size:,} bytes): download or export it again."
    )


def _stored_tensor(path: pathlib.Path, name: str, shape, dtype: np.dtype) -> LazyArray:
    """One tensor of a safetensors file, read block by block. Each read opens the file anew, so
    no mapping of it outlives the read (mapped pages count as the process's memory)."""
    from safetensors import SafetensorError, safe_open

    def read(index):
        try:
            with safe_open(str(path), framework="np") as f:
                return f.get_slice(name)[index] if index else f.get_tensor(name)
        except SafetensorError as e:
            raise _corrupt(path, e) from e

    return LazyArray(tuple(shape), dtype, read)


def _list_safetensors(
    path: pathlib.Path, names: Sequence[str] | None = None
) -> dict[str, LazyArray]:
    """`names` (default: all) of a safetensors file, unread: only its header is parsed."""
    from safetensors import SafetensorError, safe_open

    dtypes = _safetensors_dtypes()
    try:
        with safe_open(str(path), framework="np") as f:
            names = list(f.keys()) if names is None else names
            found = {name: f.get_slice(name) for name in names}
            meta = {name: (t.get_shape(), t.get_dtype()) for name, t in found.items()}
    except SafetensorError as e:
        raise _corrupt(path, e) from e
    if unknown := {dtype for _, dtype in meta.values()} - set(dtypes):
        raise CheckpointFormatError(
            f"{path} holds tensors of dtype {sorted(unknown)}, unknown here."
        )
    return {n: _stored_tensor(path, n, shape, dtypes[d]) for n, (shape, d) in meta.items()}


def open_tensors(directory: str | os.PathLike) -> dict[str, LazyArray]:
    """Every tensor of a HF directory (``model.safetensors``, or the shards its index lists) as
    a `LazyArray`: the headers are read here, the data only where a tensor is indexed."""
    directory = pathlib.Path(directory)
    index = directory / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointFormatError(f'{index} has no "weight_map".')
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        tensors = {}
        for file, names in sorted(by_file.items()):
            shard = directory / file
            if not shard.is_file():
                raise FileNotFoundError(f"{index} lists shard {file}, which does not exist.")
            tensors.update(_list_safetensors(shard, names))
        return tensors
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        others = sorted(p.name for p in directory.glob("*.bin")) + sorted(
            p.name for p in directory.glob("*.safetensors")
        )
        hint = f" (it has {', '.join(others)}: only model.safetensors is read)" if others else ""
        raise FileNotFoundError(f"{directory} has no {WEIGHTS_FILE} or {INDEX_FILE}{hint}.")
    return _list_safetensors(path)


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer(
    directory: str | os.PathLike, config: ModelConfig, hf_config: dict[str, Any] | None = None
):
    """The directory's ``tokenizer.json`` as a PretrainedTokenizer (None when there is none).

    Special tokens come from tokenizer_config.json / special_tokens_map.json, else the ids
    in config.json; add_bos from ``add_bos_token``, else from whether the tokenizer's own
    post-processor prepends bos.
    """
    from lm.data.tokenizers import PretrainedTokenizer

    directory = pathlib.Path(directory)
    path = directory / TOKENIZER_FILE
    if not path.is_file():
        return None
    import tokenizers

    try:
        tok = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises plain Exceptions
        raise CheckpointFormatError(f"{path} is not a tokenizers JSON file ({e}).") from e
    settings: dict[str, Any] = {}
    for name in (SPECIAL_TOKENS_FILE, TOKENIZER_CONFIG_FILE):  # the later one wins
        if (directory / name).is_file():
            settings.update(_read_json(directory / name))
    hf_config = hf_config or {}
    ids = {}
    for kind in ("bos", "eos", "unk", "pad"):
        token = _token_content(settings.get(f"{kind}_token"))
        found = tok.token_to_id(token) if token is not None else None
        ids[kind] = found if found is not None else _first_id(hf_config.get(f"{kind}_token_id"))
    add_bos = settings.get("add_bos_token")
    if add_bos is None:
        with_special = tok.encode("a", add_special_tokens=True).ids
        add_bos = ids["bos"] >= 0 and bool(with_special) and with_special[0] == ids["bos"]
    return PretrainedTokenizer(
        tok,
        vocab_size=config.vocab_size,
        pad_id=ids["pad"],
        unk_id=ids["unk"],
        bos_id=ids["bos"],
        eos_id=ids["eos"],
        add_bos=bool(add_bos),
        path=path,
    )


def load_hf(directory: str | os.PathLike, *, lazy: bool = False) -> Pretrained:
    """Reads a Hugging Face directory (config.json + model.safetensors, or sharded
    model-*.safetensors with their index; optional tokenizer.json).

    lazy: the params are float32 `LazyArray`s over the files (see `params_from_hf`): checked
      against config.json here, read block by block when they are placed on devices.

    Raises:
      FileNotFoundError: no such directory, or no config.json / model.safetensors in it.
      ValueError: an unsupported model_type or option in config.json (see `config_from_hf`).
      CheckpointFormatError: unreadable or truncated files, or tensors that do not fit the
        config (the message names the missing / unexpected / misshapen tensor).
    """
    directory = pathlib.Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileNotFoundError(
            f"{directory} is a file, not a Hugging Face model directory; pass hf:DIR with a "
            f"directory of {CONFIG_FILE} and {WEIGHTS_FILE}, or gguf:FILE for a .gguf file."
        )
    if not directory.is_dir():
        raise FileNotFoundError(
            f"Hugging Face model directory {directory} does not exist; pass hf:DIR with a "
            f"directory of {CONFIG_FILE} and {WEIGHTS_FILE}."
        )
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(
            f"{directory} has no {CONFIG_FILE}; a Hugging Face model "
            f"directory needs {CONFIG_FILE} and {WEIGHTS_FILE}."
        )
    hf_config = _read_json(config_path)
    config = config_from_hf(hf_config)
    params = params_from_hf(open_tensors(directory), config, source=str(directory), lazy=lazy)
    return Pretrained(config, params, read_tokenizer(directory, config, hf_config), str(directory))


# ----------------------------------------------------------------------------- export


def _write_json(path: pathlib.Path, value: dict[str, Any], sort_keys: bool = True) -> None:
    text = json.dumps(value, indent=2, sort_keys=sort_keys, ensure_ascii=False) + "\n"
    storage.write_atomic(path, text)


def _tokenizer_files(tokenizer) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(tokenizer.json, tokenizer_config.json) for an imported tokenizer; None for others."""
    from lm.data.tokenizers import PretrainedTokenizer

    if not isinstance(tokenizer, PretrainedTokenizer):
        return None
    tok_json = json.loads(tokenizer.to_json())["tokenizer"]
    settings: dict[str, Any] = {
        "add_bos_token": tokenizer.add_bos,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    for kind in ("bos", "eos", "unk", "pad"):
        i = getattr(tokenizer, f"{kind}_id")
        if i >= 0:
            settings[f"{kind}_token"] = tokenizer.id_to_piece(i)
    return tok_json, settings


def export_hf(
    model: Pretrained | tuple[ModelConfig, Any],
    directory: str | os.PathLike,
    *,
    hf_config: dict[str, Any] | None = None,
    overwrite: bool = False,
    dtype: str = "float32",
) -> pathlib.Path:
    """Writes `model` as a Hugging Face directory that transformers loads.

    model: a `Pretrained` (its tokenizer is written too when it is an imported one) or a
      ``(ModelConfig, params)`` pair. The layout follows from the config: encoder-decoder
      -> t5, learned positions -> gpt2, rotary -> llama (mixtral with num_experts > 0).
    hf_config: a config.json dict whose non-architecture keys (token ids, ...) to keep;
      default: the source config.json of a `Pretrained` imported from a HF directory.
    overwrite: replace the files in an existing non-empty directory (otherwise an error).
    dtype: of the written tensors ('float32' keeps them bit-exact).

    Returns the directory. Raises FileExistsError, ValueError (a config option the layout
    cannot express) or CheckpointFormatError (params that do not fit the config).
    """
    tokenizer = None
    if isinstance(model, Pretrained):
        config, params, tokenizer = model.config, model.params, model.tokenizer
        source_config = pathlib.Path(model.source) / CONFIG_FILE
        if hf_config is None and model.source and source_config.is_file():
            hf_config = _read_json(source_config)
    else:
        config, params = model
    directory = pathlib.Path(directory)
    if directory.exists() and not directory.is_dir():
        raise FileExistsError(f"{directory} exists and is not a directory.")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{directory} is not empty; pass overwrite=True to replace its "
            "model files, or choose a new directory."
        )
    out_config = config_to_hf(config, hf_config, dtype=dtype)
    tensors = params_to_hf(params, config, dtype=dtype)
    tok_files = _tokenizer_files(tokenizer)
    if tok_files is not None:
        for kind in ("bos", "eos", "pad"):
            i = getattr(tokenizer, f"{kind}_id")
            if i >= 0:
                out_config[f"{kind}_token_id"] = i
        if FAMILIES[out_config["model_type"]].decoder_start_is_pad and tokenizer.pad_id >= 0:
            out_config["decoder_start_token_id"] = tokenizer.pad_id

    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    index = directory / INDEX_FILE
    if index.is_file():  # an old sharded checkpoint would shadow the new model.safetensors
        for shard in set(_read_json(index).get("weight_map", {}).values()):
            (directory / shard).unlink(missing_ok=True)
        index.unlink()
    storage.write_atomic(
        directory / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"})
    )
    _write_json(directory / CONFIG_FILE, out_config)
    if tok_files is not None:
        _write_json(directory / TOKENIZER_FILE, tok_files[0], sort_keys=False)
        _write_json(directory / TOKENIZER_CONFIG_FILE, tok_files[1])
    return directory
