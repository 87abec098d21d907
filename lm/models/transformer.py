"""ModelConfig, the decoder-only and encoder-decoder Transformers, and family presets.

One set of modules covers GPT-2 (learned positions, LayerNorm, GELU MLP, multi-head
attention), Llama (rotary positions, RMSNorm, SwiGLU, grouped-query attention), the
original Transformer (sinusoids, post-norm, ReLU) and T5-style encoder-decoders: the
families differ only in `ModelConfig` values.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm.models import layers, moe
from lm.models.attention import (
    ATTENTION_RESIDUALS,
    Attention,
    causal_mask,
    padding_mask,
    prefix_tree_mask,
    segment_mask,
)
from lm.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from lm.utils import LazyArray, config_from_dict

# ModelConfig fields that say how the model runs, not what it computes: a run may resume (and
# a model may be imported or exported) with other values.
EXECUTION_FIELDS = (
    "attention_impl",
    "scan_layers",
    "remat",
    "precision",
    "logits_chunk",
    "moe_grouped_matmul",
    "moe_exchange",
)
PRECISIONS = ("fp32", "bf16")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# model.remat -> what a layer saves for the backward pass (jax.checkpoint policies); the rest
# is recomputed. 'none' saves everything (no rematerialisation).
REMAT_POLICIES = {
    "none": None,
    # Matmul outputs kept, dropout's keep masks (one byte per element; none without
    # dropout): redrawing them in the backward pass would hash the random bits twice, and a
    # fused attention kernel's residuals (its output and log-sum-exp), without which its
    # forward would run again in the backward pass.
    "dots_saveable": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_saveable,
        jax.checkpoint_policies.save_only_these_names("dropout_keep", ATTENTION_RESIDUALS),
    ),
    "full": jax.checkpoint_policies.nothing_saveable,  # only the layer's inputs kept
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyperparameters of every model in `lm`. Built once from the experiment config."""

    architecture: str = "decoder"  # 'decoder' (decoder-only) | 'encoder_decoder'
    vocab_size: int = 4096
    d_model: int = 256
    num_layers: int = 4  # decoder layers (and encoder layers unless num_encoder_layers is set)
    num_encoder_layers: int = 0  # 0 = same as num_layers
    num_heads: int = 4
    num_kv_heads: int = 0  # 0 = num_heads (multi-head); 1 = multi-query; else grouped-query
    head_dim: int = 0  # 0 = d_model // num_heads
    mlp_dim: int = 1024  # 0 = attention-only layers (no MLP sublayer; Olsson et al. 2022)
    mlp_activation: str = "gelu"  # relu | gelu | gelu_tanh | silu
    mlp_gated: bool = False  # SwiGLU (silu) / GeGLU (gelu)
    # Mixture of experts (lm.models.moe.MoeMLP): num_experts > 0 replaces every MLP by that
    # many experts of width mlp_dim, each token using its top experts_per_token of them.
    num_experts: int = 0  # 0 = dense MLP
    experts_per_token: int = 2
    moe_dispatch: str = "dropless"  # dense (every expert on every token) | dropless | capacity
    moe_capacity_factor: float = 1.25  # capacity: assignments an expert takes, x the mean
    moe_grouped_matmul: str = "auto"  # auto | ragged_dot | blocks (how dropless multiplies)
    moe_exchange: str = "auto"  # auto | ragged | padded (all-to-all of expert parallelism)
    router_aux_loss: float = 0.01  # Switch load-balancing loss coefficient (0 = none)
    router_z_loss: float = 0.0  # ST-MoE router z-loss coefficient (0 = none; ST-MoE: 1e-3)
    router_normalize_gates: bool = True  # top-k gates renormalised to 1 (Mixtral; not OLMoE)
    shared_expert_dim: int = 0  # > 0: a dense MLP this wide on every token (DeepSeekMoE)
    shared_expert_gate: bool = False  # the shared MLP scaled by a sigmoid gate (Qwen-MoE)
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    norm_placement: str = "pre"  # pre (GPT-2, Llama, T5) | post (Vaswani et al.)
    position: str = "learned"  # learned | sinusoidal | rotary | relative (T5 buckets) | none
    rope_base: float = 10_000.0
    rope_local_base: float = 0.0  # RoPE base of sliding-window layers; 0 = rope_base (Gemma 3)
    relative_buckets: int = 32  # position='relative': buckets of T5's bias table
    relative_max_distance: int = 128
    sliding_window: int = 0  # > 0: local layers see only this many recent positions
    global_every: int = 0  # with sliding_window: every n-th layer (n-1, 2n-1, ...) sees all
    qk_norm: bool = False  # RMSNorm of each head's queries and keys (Gemma 3)
    sublayer_output_norm: bool = False  # also normalise attention / MLP outputs (Gemma 2/3)
    attention_scale: float = 0.0  # query-key logit scale; 0 = head_dim^-1/2 (T5 uses 1)
    scale_tied_logits: bool = False  # T5: final hidden * d_model^-1/2 before tied logits
    max_len: int = 1024  # size of the learned position table
    use_bias: bool = True
    dropout: float = 0.0
    attention_dropout: float = 0.0
    tied_embeddings: bool = True  # output projection = transposed token embedding
    shared_embeddings: bool = True  # encoder-decoder: one token embedding for both sides
    scale_embeddings: bool = False  # multiply token embeddings by sqrt(d_model)
    init_std: float = 0.02
    capture_attention: bool = False
    # precision='bf16': bfloat16 matmuls and activations; float32 master weights, optimizer
    # state, norms, softmax and loss; inference (`for_inference`) runs bfloat16 weights too.
    # `dtype` / `param_dtype` are the low-level knobs it sets (compute dtype; storage dtype).
    precision: str = "fp32"  # fp32 | bf16
    dtype: str = "float32"  # compute dtype (bfloat16 when precision='bf16')
    param_dtype: str = "float32"
    # How the model runs, not what it is: none of these change the parameters' values, so a
    # run may resume with other settings (checkpoints convert between the layouts on load).
    attention_impl: str = "auto"  # auto | xla | cudnn | reference (lm.models.attention)
    scan_layers: bool = True  # identical layers (or repeating periods) under nn.scan
    # What a layer keeps for the backward pass: none (everything; remat off) | dots_saveable
    # (matmul outputs; elementwise work is recomputed) | full (only its input). Under scan,
    # 'dots_saveable' is the fastest on a CPU (python -m lm.bench step) and needs less memory
    # than 'none'.
    remat: str = "dots_saveable"
    # Positions of each row whose logits the training loss computes at a time (0 = the whole
    # row): a chunk's float32 [batch, chunk, vocab] logits are made, reduced to the loss and
    # made again in the backward pass, never the whole [batch, length, vocab] at once.
    logits_chunk: int = 0

    def __post_init__(self):
        for key, low in [
            ("vocab_size", 1),
            ("d_model", 1),
            ("num_layers", 1),
            ("num_heads", 1),
            ("max_len", 1),
            ("num_encoder_layers", 0),
            ("num_kv_heads", 0),
            ("head_dim", 0),
            ("mlp_dim", 0),
            ("relative_buckets", 1),
            ("relative_max_distance", 1),
            ("sliding_window", 0),
            ("global_every", 0),
            ("num_experts", 0),
            ("experts_per_token", 1),
            ("logits_chunk", 0),
        ]:
            if getattr(self, key) < low:
                raise ValueError(f"model.{key}={getattr(self, key)} must be >= {low}")
        for key in ("dropout", "attention_dropout"):
            if not 0 <= getattr(self, key) < 1:
                raise ValueError(
                    f"model.{key}={getattr(self, key)} must be in [0, 1): the fraction "
                    "of activations dropped in training (0 = no dropout)"
                )
        if self.norm_eps <= 0:
            raise ValueError(f"model.norm_eps={self.norm_eps} must be > 0")
        if self.num_experts and self.experts_per_token > self.num_experts:
            raise ValueError(
                f"model.experts_per_token={self.experts_per_token} must be <= "
                f"model.num_experts={self.num_experts}"
            )
        if self.num_experts and not self.mlp_dim:
            raise ValueError("model.num_experts > 0 needs model.mlp_dim > 0 (each expert's width)")
        for key in ("router_aux_loss", "router_z_loss", "shared_expert_dim"):
            if getattr(self, key) < 0:
                raise ValueError(f"model.{key}={getattr(self, key)} must be >= 0 (0 = off)")
        if self.moe_capacity_factor <= 0:
            raise ValueError(
                f"model.moe_capacity_factor={self.moe_capacity_factor} must be > 0 (1.0 = each "
                "expert takes its even share of the assignments; 1.25 is GShard's)"
            )
        for key, allowed in [
            ("architecture", ("decoder", "encoder_decoder")),
            ("norm", ("layernorm", "rmsnorm")),
            ("norm_placement", ("pre", "post")),
            ("position", ("learned", "sinusoidal", "rotary", "relative", "none")),
            ("mlp_activation", tuple(layers.ACTIVATIONS)),
            ("dtype", tuple(DTYPES)),
            ("param_dtype", tuple(DTYPES)),
            ("attention_impl", ATTENTION_IMPLEMENTATIONS),
            ("moe_dispatch", moe.DISPATCHES),
            ("moe_grouped_matmul", moe.GROUPED_MATMULS),
            ("moe_exchange", moe.EXCHANGES),
            ("remat", tuple(REMAT_POLICIES)),
            ("precision", PRECISIONS),
        ]:
            if getattr(self, key) not in allowed:
                raise ValueError(f"model.{key}={getattr(self, key)!r} is not one of {allowed}")
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads={self.kv_heads}"
            )
        if self.logits_chunk and self.architecture != "decoder":
            raise ValueError("model.logits_chunk is for decoder-only models: set it to 0")
        if self.sublayer_output_norm and self.norm_placement != "pre":
            raise ValueError("model.sublayer_output_norm needs model.norm_placement='pre'")
        if self.head_dim == 0 and self.d_model % self.num_heads:
            raise ValueError(
                f"model.d_model={self.d_model} is not divisible by num_heads={self.num_heads}: set head_dim"
            )

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def is_local_layer(self, index: int) -> bool:
        """Whether layer `index` attends within the sliding window only."""
        if not self.sliding_window:
            return False
        return not (self.global_every and (index + 1) % self.global_every == 0)

    @property
    def layer_period(self) -> int:
        """Layers per repeating unit: 1, or Gemma 3's five local layers and one global."""
        return self.global_every if self.sliding_window and self.global_every else 1

    @property
    def encoder_layers(self) -> int:
        return self.num_encoder_layers or self.num_layers

    def active_params(self, num_params: int) -> int:
        """How many of a model's `num_params` parameters one token's forward pass uses: all of
        them for a dense model; for a mixture of experts, all but the num_experts -
        experts_per_token expert MLPs of each layer that the token is not routed to (the router
        and every other parameter count in full)."""
        if not self.num_experts:
            return num_params
        projections = 3 if self.mlp_gated else 2
        per_expert = projections * self.d_model * self.mlp_dim
        if self.use_bias:
            per_expert += (projections - 1) * self.mlp_dim + self.d_model
        layers = self.num_layers
        if self.architecture == "encoder_decoder":
            layers += self.encoder_layers
        return num_params - layers * (self.num_experts - self.experts_per_token) * per_expert

    @property
    def compute_dtype(self):
        return jnp.bfloat16 if self.precision == "bf16" else DTYPES[self.dtype]

    @property
    def weight_dtype(self):
        return DTYPES[self.param_dtype]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        """Builds a config, rejecting unknown keys with the list of valid ones."""
        return config_from_dict(cls, values, prefix="model")


# ----------------------------------------------------------------------------- presets

PRESETS: dict[str, dict[str, Any]] = {
    # GPT-2 small (Radford et al. 2019): 124M parameters with vocab 50257.
    "gpt2": dict(
        architecture="decoder",
        d_model=768,
        num_layers=12,
        num_heads=12,
        mlp_dim=3072,
        mlp_activation="gelu_tanh",
        norm="layernorm",
        position="learned",
        max_len=1024,
        use_bias=True,
        tied_embeddings=True,
        vocab_size=50257,
    ),
    # Llama family shape (Touvron et al. 2023), here at SmolLM2-135M size.
    "llama": dict(
        architecture="decoder",
        d_model=576,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        mlp_dim=1536,
        mlp_activation="silu",
        mlp_gated=True,
        norm="rmsnorm",
        norm_eps=1e-5,
        position="rotary",
        rope_base=100_000.0,
        use_bias=False,
        tied_embeddings=True,
        vocab_size=49152,
        max_len=8192,
    ),
    # Gemma 3 270M shape: 5 sliding-window layers (RoPE base 1e4) per global one (1e6),
    # query/key norms, norms on sublayer outputs, GeGLU, embeddings scaled by sqrt(d).
    "gemma3": dict(
        architecture="decoder",
        d_model=640,
        num_layers=18,
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        mlp_dim=2048,
        mlp_activation="gelu_tanh",
        mlp_gated=True,
        norm="rmsnorm",
        norm_eps=1e-6,
        position="rotary",
        rope_base=1_000_000.0,
        rope_local_base=10_000.0,
        sliding_window=512,
        global_every=6,
        qk_norm=True,
        sublayer_output_norm=True,
        scale_embeddings=True,
        use_bias=False,
        tied_embeddings=True,
        vocab_size=262144,
        max_len=32768,
    ),
    # Mixtral 8x7B (Jiang et al. 2024): the Llama block with each MLP replaced by 8 SwiGLU
    # experts of width 14336, every token routed to its top 2 (gates renormalised).
    "mixtral": dict(
        architecture="decoder",
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        mlp_dim=14336,
        mlp_activation="silu",
        mlp_gated=True,
        num_experts=8,
        experts_per_token=2,
        router_aux_loss=0.02,
        norm="rmsnorm",
        norm_eps=1e-5,
        position="rotary",
        rope_base=1_000_000.0,
        use_bias=False,
        tied_embeddings=False,
        vocab_size=32000,
        max_len=32768,
    ),
    # OLMoE-1B-7B's shape (Muennighoff et al. 2024), fine-grained experts: 64 experts of width
    # 1024, top 8, gates not renormalised, z-loss 1e-3. (OLMoE's query/key norms span the whole
    # projection, not each head: not modelled here.)
    "olmoe": dict(
        architecture="decoder",
        d_model=2048,
        num_layers=16,
        num_heads=16,
        mlp_dim=1024,
        mlp_activation="silu",
        mlp_gated=True,
        num_experts=64,
        experts_per_token=8,
        router_normalize_gates=False,
        router_aux_loss=0.01,
        router_z_loss=0.001,
        norm="rmsnorm",
        norm_eps=1e-5,
        position="rotary",
        rope_base=10_000.0,
        use_bias=False,
        tied_embeddings=False,
        vocab_size=50304,
        max_len=4096,
    ),
    # Transformer base (Vaswani et al. 2017): post-norm, sinusoids, ReLU, shared embeddings.
    "transformer_base": dict(
        architecture="encoder_decoder",
        d_model=512,
        num_layers=6,
        num_heads=8,
        mlp_dim=2048,
        mlp_activation="relu",
        norm="layernorm",
        norm_placement="post",
        position="sinusoidal",
        use_bias=True,
        dropout=0.1,
        tied_embeddings=True,
        shared_embeddings=True,
        scale_embeddings=True,
    ),
    # T5-style encoder-decoder: pre-norm RMSNorm, no biases, gated GELU (T5 v1.1).
    "t5": dict(
        architecture="encoder_decoder",
        d_model=512,
        num_layers=8,
        num_heads=6,
        head_dim=64,
        mlp_dim=1024,
        mlp_activation="gelu_tanh",
        mlp_gated=True,
        norm="rmsnorm",
        norm_eps=1e-6,
        position="rotary",
        use_bias=False,
        tied_embeddings=False,
        shared_embeddings=True,
    ),
}

TINY = dict(d_model=32, num_layers=2, num_heads=4, mlp_dim=64, vocab_size=97, max_len=64)


def preset(name: str, **overrides) -> ModelConfig:
    """A family preset with overrides, e.g. preset('llama', **TINY, num_kv_heads=2)."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}: use one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


# ----------------------------------------------------------------------------- modules


def _positions_or_default(positions, tokens):
    if positions is not None:
        return positions
    return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)


class Block(nn.Module):
    """One Transformer layer: self-attention, optional cross-attention, MLP, with residuals."""

    config: ModelConfig
    causal: bool
    cross: bool = False
    local: bool = False  # sliding-window layer

    def _norm(self, name):
        c = self.config
        return layers.make_norm(c.norm, c.norm_eps, c.compute_dtype, c.weight_dtype, name=name)

    def _attention(self, name, is_self=True):
        c = self.config
        local = self.local and is_self
        return Attention(
            num_heads=c.num_heads,
            num_kv_heads=c.kv_heads,
            head_dim=c.dim_per_head,
            use_bias=c.use_bias,
            rotary=c.position == "rotary",
            rope_base=(c.rope_local_base or c.rope_base) if local else c.rope_base,
            qk_norm=c.qk_norm,
            norm_eps=c.norm_eps,
            window=c.sliding_window if local else 0,
            scale=c.attention_scale,
            relative_bidirectional=not self.causal,
            relative_max_distance=c.relative_max_distance,
            dropout=c.attention_dropout,
            capture_attention=c.capture_attention,
            implementation=c.attention_impl,
            dtype=c.compute_dtype,
            param_dtype=c.weight_dtype,
            init_std=c.init_std,
            out_init_std=c.init_std / math.sqrt(2 * c.num_layers),
            name=name,
        )

    def _residual(self, x, sublayer, norm_name, deterministic, output_norm_name=None):
        """Pre-norm: x + f(norm(x)); post-norm: norm(x + f(x)).

        With `sublayer_output_norm` (Gemma 2/3), pre-norm becomes x + norm'(f(norm(x))).
        """
        c = self.config
        drop = layers.Dropout(c.dropout)
        if c.norm_placement == "pre":
            h = sublayer(self._norm(norm_name)(x))
            if c.sublayer_output_norm and output_norm_name:
                h = self._norm(output_norm_name)(h)
            return x + drop(h, deterministic=deterministic)
        return self._norm(norm_name)(x + drop(sublayer(x), deterministic=deterministic))

    @nn.compact
    def __call__(
        self,
        x,
        mask,
        positions,
        segment_ids=None,
        encoded=None,
        cross_mask=None,
        relative_table=None,
        deterministic=True,
        decode=False,
    ):
        """x [batch, length, embed] -> [batch, length, embed].

        Positional-only friendly (the remat wrapper marks `deterministic` and `decode`, the last
        two, as static by position): see `_layer`.
        """
        c = self.config
        x = layers.constrain(x, layers.RESIDUAL_LAYOUT)
        self_attention = self._attention("self_attention")
        x = self._residual(
            x,
            lambda h: self_attention(
                h,
                mask,
                positions=positions,
                segment_ids=segment_ids,
                relative_table=relative_table,
                deterministic=deterministic,
                decode=decode,
                causal=self.causal,
            ),
            "pre_attention_norm" if c.norm_placement == "pre" else "post_attention_norm",
            deterministic,
            "attention_output_norm",
        )
        if self.cross:
            cross_attention = self._attention("cross_attention", is_self=False)
            x = self._residual(
                x,
                lambda h: cross_attention(
                    h, cross_mask, kv_inputs=encoded, deterministic=deterministic
                ),
                "pre_cross_attention_norm"
                if c.norm_placement == "pre"
                else "post_cross_attention_norm",
                deterministic,
            )
        if c.mlp_dim == 0:
            return layers.constrain(x, layers.RESIDUAL_LAYOUT)
        mlp_options = dict(
            hidden=c.mlp_dim,
            activation=c.mlp_activation,
            gated=c.mlp_gated,
            use_bias=c.use_bias,
            dropout=c.dropout,
            dtype=c.compute_dtype,
            param_dtype=c.weight_dtype,
            init_std=c.init_std,
            out_init_std=c.init_std / math.sqrt(2 * c.num_layers),
            name="mlp",
        )
        if c.num_experts:
            mlp = moe.MoeMLP(
                num_experts=c.num_experts,
                experts_per_token=c.experts_per_token,
                aux_loss=c.router_aux_loss,
                z_loss=c.router_z_loss,
                normalize_gates=c.router_normalize_gates,
                dispatch=c.moe_dispatch,
                capacity_factor=c.moe_capacity_factor,
                grouped_matmul=c.moe_grouped_matmul,
                exchange=c.moe_exchange,
                shared_hidden=c.shared_expert_dim,
                shared_gate=c.shared_expert_gate,
                **mlp_options,
            )
            # Padding (segment id 0) counts in no router statistic and takes no capacity.
            valid = None if segment_ids is None else segment_ids > 0
            run_mlp = lambda h: mlp(h, deterministic=deterministic, valid=valid, decode=decode)
        else:
            mlp = layers.MLP(**mlp_options)
            run_mlp = lambda h: mlp(h, deterministic=deterministic)
        x = self._residual(
            x,
            run_mlp,
            "pre_mlp_norm" if c.norm_placement == "pre" else "post_mlp_norm",
            deterministic,
            "mlp_output_norm",
        )
        return layers.constrain(x, layers.RESIDUAL_LAYOUT)


def _layer(c: ModelConfig, scanned: bool):
    """Block, rematerialised as `model.remat` says. Inside nn.scan common-subexpression
    elimination cannot undo the remat, so `prevent_cse` (which costs speed) is off there."""
    if c.remat == "none":
        return Block
    return nn.remat(
        Block, policy=REMAT_POLICIES[c.remat], prevent_cse=not scanned, static_argnums=(8, 9)
    )  # deterministic, decode (self is 0)


class _Period(nn.Module):
    """One repeating unit of layers (`block_0` .. `block_{period-1}`), the body of the scan.

    Returns (x, None): the scan's carry and (empty) per-step output.
    """

    config: ModelConfig
    causal: bool
    cross: bool
    deterministic: bool
    decode: bool

    @nn.compact
    def __call__(self, x, *inputs):
        c = self.config
        for j in range(c.layer_period):
            x = _layer(c, scanned=True)(
                c,
                causal=self.causal,
                cross=self.cross,
                local=c.is_local_layer(j),
                name=f"block_{j}",
            )(x, *inputs, self.deterministic, self.decode)
        return x, None


class Stack(nn.Module):
    """Embedded tokens -> positions -> N blocks -> final norm (pre-norm only).

    Parameter layout: with `scan_layers`, `layers/block_j/...` with a leading [N / period]
    axis (logical name `layers`) and `layer_i` for any remainder; without, `layer_0 ..
    layer_{N-1}`. `stack_layers` / `unstack_layers` convert between the two.
    """

    config: ModelConfig
    num_layers: int
    causal: bool
    cross: bool = False

    @nn.compact
    def __call__(
        self,
        x,
        mask,
        *,
        positions,
        segment_ids=None,
        encoded=None,
        cross_mask=None,
        deterministic=True,
        decode=False,
    ):
        c = self.config
        if c.position == "learned":
            table = self.param(
                "position_embedding",
                layers.param_init(layers.normal(c.init_std), ("length", "embed")),
                (c.max_len, c.d_model),
                c.weight_dtype,
            )
            x = x + jnp.take(table, positions, axis=0).astype(x.dtype)
        elif c.position == "sinusoidal":
            x = x + layers.sinusoidal_positions(positions, c.d_model).astype(x.dtype)
        relative_table = None
        if c.position == "relative":
            # T5: one bias table per stack, shared by all its layers' self-attention.
            relative_table = self.param(
                "relative_attention_bias",
                layers.param_init(layers.normal(1.0), (None, "heads")),
                (c.relative_buckets, c.num_heads),
                c.weight_dtype,
            )
        x = layers.Dropout(c.dropout)(x, deterministic=deterministic)
        inputs = (mask, positions, segment_ids, encoded, cross_mask, relative_table)
        period = c.layer_period
        repeats = self.num_layers // period if c.scan_layers else 0
        if repeats:
            # Parameters (and caches, sown weights and auxiliary losses) of block_j gain a
            # leading [repeats] axis: layer r * period + j. One compiled layer body, whatever
            # the depth.
            scanned = nn.scan(
                _Period,
                variable_axes={
                    "params": 0,
                    "cache": 0,
                    "intermediates": 0,
                    "losses": 0,
                    moe.STATS: 0,
                },
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,) * len(inputs),
                length=repeats,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, _ = scanned(c, self.causal, self.cross, deterministic, decode, name="layers")(
                x, *inputs
            )
        for i in range(repeats * period, self.num_layers):  # unscanned: all, or a remainder
            x = _layer(c, scanned=False)(
                c,
                causal=self.causal,
                cross=self.cross,
                local=c.is_local_layer(i),
                name=f"layer_{i}",
            )(x, *inputs, deterministic, decode)
        if c.norm_placement == "pre":
            x = layers.make_norm(
                c.norm, c.norm_eps, c.compute_dtype, c.weight_dtype, name="final_norm"
            )(x)
        return x


def _embedder(c: ModelConfig, name: str) -> layers.Embed:
    # Scaled embeddings (Vaswani et al.) start at std d^-1/2 so that, times sqrt(d), they have
    # unit scale like the sinusoids they are added to.
    std = c.d_model**-0.5 if c.scale_embeddings else c.init_std
    return layers.Embed(
        c.vocab_size,
        c.d_model,
        dtype=c.compute_dtype,
        param_dtype=c.weight_dtype,
        init_std=std,
        name=name,
    )


def _embed(embedder: layers.Embed, c: ModelConfig, tokens):
    x = layers.constrain(embedder(tokens), layers.RESIDUAL_LAYOUT)
    return x * jnp.sqrt(c.d_model).astype(x.dtype) if c.scale_embeddings else x


def _logits(c: ModelConfig, embedder, head, x):
    """x [batch, length, embed] -> float32 logits [batch, length, vocab]."""
    if c.tied_embeddings:
        if c.scale_tied_logits:
            x = x * jnp.asarray(c.d_model**-0.5, x.dtype)
        logits = embedder.attend(x)
    else:
        logits = head(x)
    logits = logits.astype(jnp.float32)
    return layers.constrain(logits, layers.LOGITS_LAYOUT) if logits.ndim == 3 else logits


def _lm_head(c: ModelConfig):
    if c.tied_embeddings:
        return None
    return nn.Dense(
        c.vocab_size,
        use_bias=False,
        dtype=c.compute_dtype,
        param_dtype=c.weight_dtype,
        kernel_init=layers.param_init(layers.normal(c.init_std), ("embed", "vocab")),
        name="lm_head",
    )


class DecoderOnly(nn.Module):
    """GPT / Llama-style decoder-only language model."""

    config: ModelConfig

    def setup(self):
        c = self.config
        self.embedder = _embedder(c, "token_embedding")
        self.decoder = Stack(c, c.num_layers, causal=True, name="decoder")
        self.head = _lm_head(c)

    def __call__(
        self,
        tokens,
        *,
        segment_ids=None,
        positions=None,
        deterministic=True,
        decode=False,
        **unused,
    ):
        """tokens [batch, length] int -> logits [batch, length, vocab] float32.

        segment_ids [batch, length]: packed-document ids, 0 = padding (default: all ones).
        positions [batch, length]: absolute positions (default: 0..length-1; pass them when
        decoding with a cache, where the default would restart at 0).
        """
        if unused:
            raise TypeError(f"DecoderOnly got unexpected inputs {sorted(unused)}")
        x = self.features(
            tokens,
            segment_ids=segment_ids,
            positions=positions,
            deterministic=deterministic,
            decode=decode,
        )
        return self.project(x)

    def features(
        self,
        tokens,
        *,
        segment_ids=None,
        positions=None,
        deterministic=True,
        decode=False,
        prefix_tree=False,
        mask=None,
    ):
        """tokens [batch, length] -> final hidden states [batch, length, embed] (after the
        final norm, before the vocabulary projection).

        prefix_tree: segment_ids mark a shared prefix (1) and branches after it (2, 3, ...;
        see attention.prefix_tree_mask) instead of packed documents; pass each branch's
        positions continuing the prefix's.
        mask: a boolean attention mask [batch, 1, length, length] (True: may attend) to use
        instead of the one segment_ids and prefix_tree imply (the evaluation harness packs
        several prefix trees per row).
        """
        c = self.config
        positions = _positions_or_default(positions, tokens)
        seg = jnp.ones_like(tokens) if segment_ids is None else segment_ids
        # The layers get segment ids when decoding (the cache marks real keys by them) and
        # when the mask is causal within segments (a fused kernel may build it from them).
        segmented = mask is None and not prefix_tree
        if mask is None and not decode:  # decoding masks by the cache's filled positions
            if prefix_tree:
                mask = prefix_tree_mask(seg)
            else:
                mask = causal_mask(tokens.shape[1]) & segment_mask(seg, seg)
        x = _embed(self.embedder, c, tokens)
        return self.decoder(
            x,
            mask,
            positions=positions,
            segment_ids=seg if decode or segmented else None,
            deterministic=deterministic,
            decode=decode,
        )

    def project(self, x):
        """Hidden states [..., embed] -> float32 logits [..., vocab]. Apart from __call__, so
        that a scorer can project only the positions it reads (a 262k vocabulary costs more
        than the network below it)."""
        return _logits(self.config, self.embedder, self.head, x)


class EncoderDecoder(nn.Module):
    """Vaswani et al. / T5-style encoder-decoder."""

    config: ModelConfig

    def setup(self):
        c = self.config
        self.embedder = _embedder(c, "token_embedding")
        self.decoder_embedder = (
            self.embedder if c.shared_embeddings else _embedder(c, "decoder_token_embedding")
        )
        self.encoder = Stack(c, c.encoder_layers, causal=False, name="encoder")
        self.decoder = Stack(c, c.num_layers, causal=True, cross=True, name="decoder")
        self.head = _lm_head(c)

    def encode(self, encoder_inputs, *, encoder_segment_ids=None, deterministic=True):
        """encoder_inputs [batch, src_len] -> encoded [batch, src_len, embed]."""
        seg = jnp.ones_like(encoder_inputs) if encoder_segment_ids is None else encoder_segment_ids
        positions = _positions_or_default(None, encoder_inputs)
        x = _embed(self.embedder, self.config, encoder_inputs)
        return self.encoder(
            x, segment_mask(seg, seg), positions=positions, deterministic=deterministic
        )

    def decode(
        self,
        encoded,
        tokens,
        *,
        encoder_segment_ids=None,
        segment_ids=None,
        positions=None,
        deterministic=True,
        decode=False,
    ):
        """encoded [batch, src_len, embed], tokens [batch, tgt_len] -> logits [batch, tgt_len, vocab]."""
        c = self.config
        positions = _positions_or_default(positions, tokens)
        seg = jnp.ones_like(tokens) if segment_ids is None else segment_ids
        enc_seg = (
            jnp.ones(encoded.shape[:2], jnp.int32)
            if encoder_segment_ids is None
            else encoder_segment_ids
        )
        mask = None if decode else causal_mask(tokens.shape[1]) & padding_mask(seg, seg)
        cross = padding_mask(seg, enc_seg)
        x = _embed(self.decoder_embedder, c, tokens)
        x = self.decoder(
            x,
            mask,
            positions=positions,
            segment_ids=seg if decode else None,  # the mask is not segment_mask's: see features
            encoded=encoded,
            cross_mask=cross,
            deterministic=deterministic,
            decode=decode,
        )
        return _logits(c, self.decoder_embedder, self.head, x)

    def __call__(
        self,
        tokens,
        *,
        encoder_inputs,
        encoder_segment_ids=None,
        segment_ids=None,
        positions=None,
        deterministic=True,
        decode=False,
    ):
        """Teacher-forced logits [batch, tgt_len, vocab] for decoder inputs `tokens`."""
        encoded = self.encode(
            encoder_inputs, encoder_segment_ids=encoder_segment_ids, deterministic=deterministic
        )
        return self.decode(
            encoded,
            tokens,
            encoder_segment_ids=encoder_segment_ids,
            segment_ids=segment_ids,
            positions=positions,
            deterministic=deterministic,
            decode=decode,
        )


def build_model(config: ModelConfig) -> nn.Module:
    """The module for a config's architecture."""
    return DecoderOnly(config) if config.architecture == "decoder" else EncoderDecoder(config)


def for_inference(
    config: ModelConfig, params, precision: str | None = None, *, unroll_layers: bool = False
):
    """(model, params) to sample and evaluate with. precision (default: the config's) 'bf16'
    casts the floating-point weights to bfloat16 once, halving what each decoded token reads;
    'fp32' keeps them as they are.

    unroll_layers: the unrolled layout (`scan_layers=False`, params converted), for token by
    token decoding: a scanned stack slices each layer's weights out of the stacked arrays at
    every step, a copy of the whole model per token. Unrolled, SmolLM2 decodes 1.6x faster at
    batch 1 on the 2-core CPU, for about twice the compile time (python -m lm.bench decode).
    """
    config = dataclasses.replace(
        config,
        precision=precision or config.precision,
        scan_layers=config.scan_layers and not unroll_layers,
    )
    params = to_layout(params, config)
    if config.precision == "bf16":
        params = jax.tree.map(
            lambda x: x.astype(jnp.bfloat16) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
        )
    return build_model(config), params


def dummy_inputs(config: ModelConfig, batch: int = 1, length: int = 8) -> dict[str, jax.Array]:
    """Inputs that `init` accepts for either architecture."""
    tokens = jnp.zeros((batch, length), jnp.int32)
    if config.architecture == "decoder":
        return {"tokens": tokens}
    return {"tokens": tokens, "encoder_inputs": tokens}


def init_cache(model: nn.Module, params, batch: int, max_len: int, encoder_len: int = 1):
    """Empty KV cache for decoding up to `max_len` tokens: a pytree for the `cache` collection."""
    tokens = jnp.zeros((batch, max_len), jnp.int32)
    if isinstance(model, EncoderDecoder):
        encoded = jnp.zeros((batch, encoder_len, model.config.d_model), model.config.compute_dtype)

        def init_fn():
            return model.apply(
                {"params": params},
                encoded,
                tokens,
                decode=True,
                method=EncoderDecoder.decode,
                mutable=["cache"],
            )[1]
    else:

        def init_fn():
            return model.apply({"params": params}, tokens, decode=True, mutable=["cache"])[1]

    shapes = jax.eval_shape(init_fn)["cache"]
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


# ----------------------------------------------------------------- scanned <-> unrolled layout

_LAYER_KEY = re.compile(r"layer_(\d+)$")
_BLOCK_KEY = re.compile(r"block_(\d+)$")


def _is_scanned_stack(node) -> bool:
    return (
        isinstance(node, Mapping)
        and isinstance(node.get("layers"), Mapping)
        and any(_BLOCK_KEY.match(str(k)) for k in node["layers"])
    )


def _is_unrolled_stack(node) -> bool:
    return (
        isinstance(node, Mapping)
        and "layers" not in node
        and any(_LAYER_KEY.match(str(k)) for k in node)
    )


def _take(x, r: int):
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
    return x.take(r) if isinstance(x, LazyArray) else x[r]


def _stack(*xs):
    if isinstance(xs[0], jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(xs),) + tuple(xs[0].shape), xs[0].dtype)
    if isinstance(xs[0], LazyArray):
        return LazyArray.stack(xs)
    return (jnp if isinstance(xs[0], jax.Array) else np).stack(xs)


def unstack_layers(tree):
    """Any tree in the scanned layout (params, optimizer moments, caches, sown intermediates)
    -> the unrolled one: `layers/block_j` [repeats, ...] becomes `layer_{r * period + j}`.
    Trees already unrolled pass through. Leaves may be arrays, ShapeDtypeStructs or LazyArrays (kept unread)."""

    def convert(node):
        if not _is_scanned_stack(node):
            return node
        blocks = node["layers"]
        period = sum(1 for k in blocks if _BLOCK_KEY.match(str(k)))
        repeats = jax.tree.leaves(blocks["block_0"])[0].shape[0]
        out = {k: v for k, v in node.items() if k != "layers"}
        for r in range(repeats):
            for j in range(period):
                out[f"layer_{r * period + j}"] = jax.tree.map(
                    lambda x, r=r: _take(x, r), blocks[f"block_{j}"]
                )
        return out

    return jax.tree.map(convert, tree, is_leaf=_is_scanned_stack)


def stack_layers(tree, period: int):
    """The inverse of `unstack_layers`: `layer_i` entries -> `layers/block_j` with a leading
    [num_layers // period] axis; the last num_layers % period layers stay unrolled (as
    `Stack` builds them)."""

    def convert(node):
        if not _is_unrolled_stack(node):
            return node
        count = sum(1 for k in node if _LAYER_KEY.match(str(k)))
        repeats = count // period
        if not repeats:
            return node
        out = {
            k: v
            for k, v in node.items()
            if not (_LAYER_KEY.match(str(k)) and int(str(k)[6:]) < repeats * period)
        }
        out["layers"] = {
            f"block_{j}": jax.tree.map(
                _stack, *[node[f"layer_{r * period + j}"] for r in range(repeats)]
            )
            for j in range(period)
        }
        return out

    return jax.tree.map(convert, tree, is_leaf=_is_unrolled_stack)


def scanned_period(tree) -> int:
    """The period of a tree in the scanned layout (blocks per scan step); 0 if unrolled."""
    stacks = [n for n in jax.tree.leaves(tree, is_leaf=_is_scanned_stack) if _is_scanned_stack(n)]
    return sum(1 for k in stacks[0]["layers"] if _BLOCK_KEY.match(str(k))) if stacks else 0


def _in_scanned_layout(tree, period: int) -> bool:
    """Whether every layer stack of `tree` is scanned with `period` blocks (none unrolled)."""
    nodes = jax.tree.leaves(tree, is_leaf=lambda n: _is_scanned_stack(n) or _is_unrolled_stack(n))
    scanned = [n for n in nodes if _is_scanned_stack(n)]
    return (
        bool(scanned)
        and not any(_is_unrolled_stack(n) for n in nodes)
        and all(sum(1 for k in n["layers"] if _BLOCK_KEY.match(str(k))) == period for n in scanned)
    )


def to_layout(tree, config: ModelConfig):
    """A tree in either layout -> the layout that `config` builds (old unrolled checkpoints and
    imported models load into scanned models, and back). A tree already in that layout is
    returned as it is (restacking it copied SmolLM2's weights for 0.9 s at every load)."""
    if config.scan_layers and _in_scanned_layout(tree, config.layer_period):
        return tree
    tree = unstack_layers(tree)
    return stack_layers(tree, config.layer_period) if config.scan_layers else tree


def gather_batch(tree, index: jax.Array):
    """Reorders the batch rows of a cache (or any tree of [batch, ...] leaves) by `index`.

    In the scanned layout a stack's leaves are [repeats, batch, ...]; scalars (and the scanned
    cache indices [repeats]) pass through."""

    def gather(path, x):
        scanned = any(getattr(k, "key", None) == "layers" for k in path)
        axis = 1 if scanned else 0
        return jnp.take(x, index, axis=axis) if x.ndim > axis else x

    return jax.tree_util.tree_map_with_path(gather, tree)
