"""Building blocks shared by every model: embeddings, positions, norms and MLPs.

Every parameter is created through `param_init(...)`, which attaches logical axis
names (`vocab`, `embed`, `mlp`, `heads`, `kv_heads`, `kv`, `length`, `expert`), and the
activations that decide memory are pinned with `constrain(x, names)` (`activation_batch`,
`activation_length`, `activation_embed`, `activation_heads`, ...). `lm.parallel` maps those
names onto mesh axes; model code never names a mesh axis.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name
from jax.extend import backend as jax_backend

from lm.utils import logical_to_mesh_spec

Initializer = jax.nn.initializers.Initializer

DEFAULT_INIT_STD = 0.02


def param_init(init: Initializer, axes: Sequence[str | None]) -> Initializer:
    """Wraps an initializer so that the parameter carries logical axis names."""
    return nn.with_logical_partitioning(init, tuple(axes))


# Logical layouts of the activations that decide memory (names mapped by lm.parallel's rules).
RESIDUAL_LAYOUT = ("activation_batch", "activation_length", "activation_embed")
HEADS_LAYOUT = ("activation_batch", "activation_length", "activation_heads", None)
KV_HEADS_LAYOUT = ("activation_batch", "activation_length", "activation_kv_heads", None)
MLP_LAYOUT = ("activation_batch", "activation_length", "activation_mlp")
LOGITS_LAYOUT = ("activation_batch", "activation_length", "activation_vocab")


# The rules table `constrain` maps names with, set only while a step is traced.
_ACTIVATION_RULES: contextvars.ContextVar[tuple] = contextvars.ContextVar(
    "activation_rules", default=()
)


@contextlib.contextmanager
def activation_rules(rules):
    """Within: `constrain` maps logical names by `rules` ((name, mesh axes) pairs) over the
    abstract mesh in force (`jax.sharding.use_abstract_mesh`). Entered by
    `lm.parallel.with_activation_layout`; flax's own `nn.logical_axis_rules` is not used,
    since flax would then also constrain parameters as it creates them."""
    token = _ACTIVATION_RULES.set(tuple(rules))
    try:
        yield
    finally:
        _ACTIVATION_RULES.reset(token)


def activation_spec(names: Sequence[str | None], shape: Sequence[int]):
    """The PartitionSpec that logical `names` (one per dimension of `shape`) get under the
    rules and abstract mesh in force (see `activation_rules`), or None outside them."""
    rules = _ACTIVATION_RULES.get()
    mesh = jax.sharding.get_abstract_mesh()
    if not rules or mesh.empty:
        return None
    return logical_to_mesh_spec(tuple(names), tuple(shape), mesh.shape, rules)


def traced_backend() -> str:
    """The platform the model is traced for: that of the abstract mesh in force (a step
    compiled ahead of time for a TPU slice from a CPU host), else jax.default_backend();
    a GPU without CUDA (ROCm: no cuDNN) is 'rocm'."""
    mesh = jax.sharding.get_abstract_mesh()
    device = None if mesh.empty else mesh.abstract_device
    if device is not None and device.platform != "cpu":
        return device.platform
    backend = jax.default_backend()
    if backend == "gpu" and "cuda" not in jax_backend.get_backend().platform_version.lower():
        return "rocm"
    return backend


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """x laid out by its logical axis names (one per dimension), e.g. a residual stream
    [batch, length, embed] as RESIDUAL_LAYOUT; returns x (same shape and values).

    Inside `activation_rules` and an abstract mesh the names map to mesh axes as parameters'
    names do (`lm.utils.logical_to_mesh_spec`); outside them (one device, decoding, a bare
    model) this is the identity. Without these pins the compiler may follow a weight's FSDP
    split into the activations and hold the whole batch on every device.
    """
    spec = activation_spec(names, x.shape)
    return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


def normal(std: float = DEFAULT_INIT_STD) -> Initializer:
    return jax.nn.initializers.normal(stddev=std)


DROPOUT_BITS = 16  # random bits per element (a rate is rounded to a multiple of 2**-16)


def dropout(x: jax.Array, rate: float, rng: jax.Array) -> jax.Array:
    """Inverted dropout of `x` (any shape): zeroes each element with probability `rate` and
    scales the rest by 1 / (1 - rate); returns an array of x's shape and dtype.

    Why not `flax.linen.Dropout`: it draws one 32-bit word per element (a whole Threefry
    hash under JAX's partitionable PRNG), which on CPU cost a third of a nanoGPT-sized
    train step with dropout 0.2. Here each 32-bit word serves two elements (16 bits each),
    halving the hashing; the rate is rounded to a multiple of 2**-16 (0.1 -> 0.0999908) and
    the scale uses the rounded rate, so the expectation of the output is exactly x. The bits
    are drawn along the last axis in pairs, so a sharded array draws its own shard's bits.
    The keep mask is named "dropout_keep" (`jax.ad_checkpoint.checkpoint_name`): the
    'dots_saveable' remat policy keeps it rather than drawing the bits again.
    """
    levels = 1 << DROPOUT_BITS
    threshold = round(rate * levels)
    if threshold == 0:
        return x
    per_word = 32 // DROPOUT_BITS
    *lead, last = x.shape
    words = jax.random.bits(rng, (*lead, -(-last // per_word)), jnp.uint32)
    parts = [(words >> (DROPOUT_BITS * i)) & (levels - 1) for i in range(per_word)]
    draws = jnp.stack(parts, axis=-1).reshape(*lead, -1)[..., :last]
    scale = jnp.asarray(levels / (levels - threshold), x.dtype)
    keep = checkpoint_name(draws >= threshold, "dropout_keep")
    return jnp.where(keep, x * scale, jnp.zeros((), x.dtype))


class Dropout(nn.Module):
    """`dropout` as a module: its key comes from the `dropout` rng stream."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        return dropout(x, self.rate, self.make_rng("dropout"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _kernel_dot(x: jax.Array, kernel: jax.Array, n: int, precision) -> jax.Array:
    contract = (tuple(range(x.ndim - n, x.ndim)), tuple(range(n)))
    return jax.lax.dot_general(x, kernel, (contract, ((), ())), precision=precision)


def _kernel_dot_fwd(x, kernel, n, precision):
    return _kernel_dot(x, kernel, n, precision), (x, kernel)


def _kernel_dot_bwd(n, precision, residuals, g):
    x, kernel = residuals
    lead = x.ndim - n
    # d x [..., *in] = g [..., *out] . kernel [*in, *out], contracting *out.
    dx = jax.lax.dot_general(
        g,
        kernel,
        ((tuple(range(lead, g.ndim)), tuple(range(n, kernel.ndim))), ((), ())),
        precision=precision,
    )
    # d kernel [*in, *out] = x [..., *in] . g [..., *out], contracting the token axes `...`:
    # x first, so that XLA transposes x (d_model wide) for the matmul rather than g, which is
    # as wide as the MLP and would be transposed inside the fused elementwise backward.
    dkernel = jax.lax.dot_general(
        x, g, ((tuple(range(lead)), tuple(range(lead))), ((), ())), precision=precision
    )
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_kernel_dot.defvjp(_kernel_dot_fwd, _kernel_dot_bwd)


def kernel_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    """`lax.dot_general` for dense layers (the `dot_general` of nn.Dense / nn.DenseGeneral):
    inputs [..., *in] times a kernel [*in, *out] -> [..., *out], with the kernel gradient
    computed as x^T g instead of JAX's (g^T x)^T.

    Why: on CPU, XLA fuses the elementwise backward of the MLP (SwiGLU, GELU) with a
    transpose of g [tokens, mlp] for JAX's operand order, a strided loop that costs a large
    share of a small model's train step; with x first it transposes the narrower input
    instead. Used where it is faster (`python -m lm.bench train`): gated MLPs and the
    attention projections (a plain GELU MLP keeps lax.dot_general, see `MLP`). Only the dense-layer pattern (the lhs's trailing
    axes against the kernel's leading ones, no batch axes) is accepted.
    """
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    n = len(lhs_contract)
    if (
        lhs_batch
        or rhs_batch
        or preferred_element_type is not None
        or tuple(lhs_contract) != tuple(range(lhs.ndim - n, lhs.ndim))
        or tuple(rhs_contract) != tuple(range(n))
    ):
        raise ValueError(
            f"kernel_dot_general: expected inputs' trailing axes against the kernel's leading "
            f"axes, got dimension_numbers={dimension_numbers} for shapes {lhs.shape}, {rhs.shape}"
        )
    return _kernel_dot(lhs, rhs, n, precision)


class Embed(nn.Module):
    """Token embedding whose transpose can also produce logits (tied embeddings).

    Attributes:
      num_embeddings: vocabulary size.
      features: model width.
      scale: multiply embeddings by this after lookup (e.g. sqrt(d_model) for Gemma/T5-style).
    """

    num_embeddings: int
    features: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = DEFAULT_INIT_STD

    def setup(self):
        self.embedding = self.param(
            "embedding",
            param_init(normal(self.init_std), ("vocab", "embed")),
            (self.num_embeddings, self.features),
            self.param_dtype,
        )

    def __call__(self, ids: jax.Array) -> jax.Array:
        """ids [batch, length] int -> [batch, length, features]."""
        # The table gathered over its embed split first, as FSDP gathers any weight: a
        # lookup into a table split along embed cannot be partitioned like the batch.
        table = constrain(self.embedding, ("vocab", None))
        return jnp.take(table, ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x [batch, length, features] -> logits [batch, length, num_embeddings]."""
        return jnp.einsum("bld,vd->blv", x, self.embedding.astype(self.dtype))


def sinusoidal_positions(positions: jax.Array, features: int, max_timescale: float = 10_000.0):
    """Vaswani et al. sinusoids. positions [batch, length] -> [batch, length, features]."""
    half = features // 2
    inv_freq = max_timescale ** (-jnp.arange(half, dtype=jnp.float32) / max(half - 1, 1))
    angles = positions[..., None].astype(jnp.float32) * inv_freq
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def apply_rotary(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
    """Rotary position embedding (Su et al.), half-split layout as in Llama/HF.

    x [batch, length, heads, head_dim], positions [batch, length] -> same shape as x.
    """
    head_dim = x.shape[-1]
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (jnp.arange(0, half, dtype=jnp.float32) * 2.0 / head_dim))
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [b, l, half]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich), computed in float32."""

    epsilon: float = 1e-6
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    axis_name: str = "embed"  # logical axis of the normalised features

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param(
            "scale",
            param_init(jax.nn.initializers.ones, (self.axis_name,)),
            (x.shape[-1],),
            self.param_dtype,
        )
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.epsilon)
        return (normed * scale.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
    """LayerNorm (Ba et al.) with scale and bias, computed in float32."""

    epsilon: float = 1e-5
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = x.shape[-1]
        scale = self.param(
            "scale", param_init(jax.nn.initializers.ones, ("embed",)), (features,), self.param_dtype
        )
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon) * scale.astype(jnp.float32)
        if self.use_bias:
            bias = self.param(
                "bias",
                param_init(jax.nn.initializers.zeros, ("embed",)),
                (features,),
                self.param_dtype,
            )
            y = y + bias.astype(jnp.float32)
        return y.astype(self.dtype)


def make_norm(kind: str, epsilon: float, dtype, param_dtype, name: str | None = None) -> nn.Module:
    if kind == "layernorm":
        return LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name)
    if kind == "rmsnorm":
        return RMSNorm(epsilon=epsilon, dtype=dtype, param_dtype=param_dtype, name=name)
    raise ValueError(f"unknown norm kind {kind!r}: use 'layernorm' or 'rmsnorm'")


ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


class MLP(nn.Module):
    """Position-wise feed-forward block.

    Plain: wo(act(wi x)). Gated (SwiGLU / GeGLU): wo(act(wi_gate x) * wi_up x).
    x [batch, length, embed] -> [batch, length, embed].
    """

    hidden: int
    activation: str = "gelu"
    gated: bool = False
    use_bias: bool = True
    dropout: float = 0.0
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = DEFAULT_INIT_STD
    out_init_std: float = DEFAULT_INIT_STD

    def _dense(self, features, axes, std, name):
        return nn.Dense(
            features,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=param_init(normal(std), axes),
            bias_init=param_init(jax.nn.initializers.zeros, axes[1:]),
            # kernel_dot_general speeds up a gated (SwiGLU) MLP's step and slows a GELU one's
            # (python -m lm.bench train; the README has the numbers).
            dot_general=kernel_dot_general if self.gated else jax.lax.dot_general,
            name=name,
        )

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {self.activation!r}: use one of {sorted(ACTIVATIONS)}"
            )
        act = ACTIVATIONS[self.activation]
        features = x.shape[-1]
        if self.gated:
            h = act(self._dense(self.hidden, ("embed", "mlp"), self.init_std, "wi_gate")(x))
            h = h * self._dense(self.hidden, ("embed", "mlp"), self.init_std, "wi_up")(x)
        else:
            h = act(self._dense(self.hidden, ("embed", "mlp"), self.init_std, "wi")(x))
        h = constrain(h, MLP_LAYOUT)
        h = Dropout(self.dropout)(h, deterministic=deterministic)
        return self._dense(features, ("mlp", "embed"), self.out_init_std, "wo")(h)
