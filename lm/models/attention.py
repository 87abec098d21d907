"""Multi-head attention with grouped-query heads, explicit masks and a KV cache.

Shapes: queries [batch, q_len, heads, head_dim], keys/values [batch, k_len, kv_heads,
head_dim] (kv_heads divides heads: grouped-query, multi-query when 1); masks are boolean,
broadcastable to [batch, 1, q_len, k_len], True meaning "may attend"; an optional bias
broadcastable to [batch, heads, q_len, k_len] is added to the logits (T5's relative
positions).

All attention in the models goes through `attend`, which runs one of
  'reference'  `dot_product_attention`: einsums with float32 logits and softmax. The
               parity reference, and the only path with attention dropout.
  'xla'        `jax.nn.dot_product_attention(implementation='xla')`: mask and bias
               handled inside, grouped heads without repeating k/v.
  'cudnn'      the same call with implementation='cudnn': cuDNN flash attention on CUDA
               GPUs, bf16/fp16 only; jax folds the dense mask into its bias.
  'splash'     Pallas splash attention, the TPU flash kernel, for causal self-attention
               within packed segments at lengths that are multiples of 128 (never a
               [t, s] matrix in memory); XLA's for every other attention. Off a TPU the
               kernel runs in the Pallas interpreter (slow; for the parity tests).
  'auto'       cuDNN or splash where they apply (see `resolve_implementation`), else XLA.
They agree up to rounding (tests/test_attention_parity.py). Query rows with no key to
attend to (padding) get finite outputs whose values depend on the implementation.

With `capture_attention=True` the softmax weights [batch, heads, q_len, k_len] (before
attention dropout) are sown into the `intermediates` collection under the name
`attention_weights`. A fused kernel does not return them, so they are then recomputed
from the same q/k by `attention_weights`, the one definition the reference core uses too.
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lm.models.layers import (
    DEFAULT_INIT_STD,
    HEADS_LAYOUT,
    KV_HEADS_LAYOUT,
    RMSNorm,
    activation_spec,
    apply_rotary,
    constrain,
    dropout,
    kernel_dot_general,
    normal,
    param_init,
    traced_backend,
)

NEG_INF = -1e30
# The name of what a fused attention kernel's backward pass reads (its output, log-sum-exp and
# inputs): remat policies that keep it (the 'dots_saveable' default) do not run the kernel's
# forward again in the backward pass. See `keep_residuals`.
ATTENTION_RESIDUALS = "attention_residuals"
IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash", "reference")
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def causal_mask(q_len: int, k_len: int | None = None, offset: int = 0) -> jax.Array:
    """[1, 1, q_len, k_len] lower-triangular mask; query i sits at key position i + offset."""
    k_len = q_len if k_len is None else k_len
    q_pos = jnp.arange(q_len)[:, None] + offset
    return (jnp.arange(k_len)[None, :] <= q_pos)[None, None]


def segment_mask(q_segments: jax.Array, k_segments: jax.Array) -> jax.Array:
    """Attend only within the same (non-padding) segment.

    q_segments [batch, q_len], k_segments [batch, k_len] (0 = padding) -> [batch, 1, q_len, k_len].
    """
    same = q_segments[:, :, None] == k_segments[:, None, :]
    return (same & (k_segments[:, None, :] != 0))[:, None]


def prefix_tree_mask(segments: jax.Array) -> jax.Array:
    """Causal mask of rows that hold one shared prefix and several branches after it.

    segments [batch, length]: 1 = the shared prefix, 2, 3, ... = branches (each continues
    the prefix on its own), 0 = padding -> [batch, 1, length, length]: a token sees the
    prefix and the earlier tokens of its own branch. Scoring several continuations of one
    context this way computes the context once.
    """
    q, k = segments[:, :, None], segments[:, None, :]
    visible = (k != 0) & ((k == q) | (k == 1))
    return causal_mask(segments.shape[1]) & visible[:, None]


def padding_mask(q_valid: jax.Array, k_valid: jax.Array) -> jax.Array:
    """Keys must be real tokens; q_valid [batch, q_len], k_valid [batch, k_len] -> [b, 1, q, k]."""
    del q_valid  # padded queries produce ignored outputs; masking them only risks NaNs.
    return jnp.broadcast_to(
        k_valid[:, None, None, :] != 0, (k_valid.shape[0], 1, 1, k_valid.shape[1])
    )


def segment_offsets(segment_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cuDNN's packed layout of rows of contiguous segments: segment_ids [b, t] (0 = padding)
    -> (lengths [b, t] int32, offsets [b, t + 1] int32).

    Row r's m-th segment starts at offsets[r, m] and holds lengths[r, m] tokens; entries past
    the row's last segment are -1 in both (t bounds the number of segments in a row). Causal
    attention within these segments is exactly causal_mask & segment_mask(ids, ids)
    (`mask_from_offsets` rebuilds it), without a [b, 1, t, t] mask in memory.
    """
    b, t = segment_ids.shape
    real = segment_ids != 0
    before = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=0)
    after = jnp.pad(segment_ids[:, 1:], ((0, 0), (0, 1)), constant_values=0)
    first = real & (segment_ids != before)
    last = real & (segment_ids != after)
    rows = lambda flags, size: jax.vmap(lambda f: jnp.nonzero(f, size=size, fill_value=-1)[0])(
        flags
    )
    starts, ends = rows(first, t + 1), rows(last, t)
    lengths = jnp.where(ends >= 0, ends - starts[:, :t] + 1, -1)
    return lengths.astype(jnp.int32), starts.astype(jnp.int32)


def mask_from_offsets(lengths: jax.Array, offsets: jax.Array, length: int) -> jax.Array:
    """The [b, 1, length, length] causal mask within the segments that `segment_offsets`
    describes: query i sees key j <= i of its own segment. For the tests."""
    positions = jnp.arange(length)
    starts, sizes = offsets[:, : lengths.shape[1]], lengths
    inside = (positions[None, None] >= starts[..., None]) & (
        positions[None, None] < (starts + sizes)[..., None]
    )  # [b, segments, length]
    same = jnp.einsum("bmq,bmk->bqk", inside.astype(jnp.int32), inside.astype(jnp.int32)) > 0
    return (same & (positions[None, :] <= positions[:, None])[None])[:, None]


def resolve_implementation(
    implementation: str,
    dtype,
    head_dim: int,
    backend: str | None = None,
    *,
    lengths: tuple[int, int] | None = None,
    segmented: bool = False,
) -> str:
    """The implementation `attend` runs, 'reference', 'xla', 'cudnn' or 'splash', chosen at
    trace time.

    'auto' takes cuDNN where jax 0.10's cuDNN path accepts the inputs: backend 'gpu'
    (CUDA; default: the running one), bf16/fp16, head_dim a multiple of 8 and <= 128
    (Hopper would allow 256), and, when `lengths` (q_len, k_len) are given, both even:
    its backward pass with a bias - the folded mask always is one - needs that, and
    'auto' cannot know whether it will be differentiated. On backend 'tpu' it takes splash
    where it applies: `segmented` (causal self-attention within segments, no bias: see
    `attend`), q_len == k_len a multiple of 128, head_dim a multiple of 64. Anything else
    gets 'xla'. 'splash' takes splash where it applies whatever the backend and head_dim
    (interpreted off a TPU), and 'xla' for the rest: decoding with a cache, cross-attention,
    biases, sliding windows, custom masks, other lengths.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"model.attention_impl must be one of {IMPLEMENTATIONS}, got {implementation!r}"
        )
    backend = traced_backend() if backend is None else backend
    dtype = jnp.dtype(dtype)
    if implementation == "cudnn":
        if dtype not in _CUDNN_DTYPES:
            raise ValueError(
                f"model.attention_impl='cudnn' needs bfloat16 or float16 inputs, got {dtype}; "
                "use 'xla' or 'auto'"
            )
        if backend != "gpu":
            raise ValueError(
                f"model.attention_impl='cudnn' needs a CUDA GPU, the backend is {backend!r}; "
                "use 'xla' or 'auto'"
            )
    t, s = lengths if lengths is not None else (0, 1)
    splash_applies = segmented and t == s and t % SPLASH_BLOCK == 0
    if implementation == "splash":
        return "splash" if splash_applies else "xla"
    if implementation != "auto":
        return implementation
    if backend == "tpu":
        # head_dim 64 and 128 are what the kernel has been compiled for here.
        return "splash" if splash_applies and head_dim % 64 == 0 else "xla"
    fits = backend == "gpu" and dtype in _CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= 128
    if lengths is not None:
        fits = fits and all(n % 2 == 0 for n in lengths)
    return "cudnn" if fits else "xla"


def attention_weights(q, k, mask, bias=None, scale=None):
    """Softmax attention weights, float32 [b, h, t, s].

    q [b, t, h, d], k [b, s, kv, d]; mask broadcastable to [b, 1, t, s] or None; bias
    broadcastable to [b, h, t, s], added to the logits. `scale` multiplies the logits
    (default d^-1/2; T5 folds it into its weights and uses 1).
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    if h % kv:
        raise ValueError(f"heads ({h}) must be a multiple of kv_heads ({kv})")
    logits = jnp.einsum(
        "btkgd,bskd->bkgts", q.reshape(b, t, kv, h // kv, d), k, preferred_element_type=jnp.float32
    ).reshape(b, h, t, -1)
    logits = logits * jnp.float32(d**-0.5 if scale is None else scale)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        # Finite: a row with nothing to attend to becomes uniform, not NaN.
        logits = jnp.where(mask, logits, NEG_INF)
    return jax.nn.softmax(logits, axis=-1)


def dot_product_attention(
    q, k, v, mask, *, bias=None, scale=None, dropout_rng=None, dropout_rate=0.0, deterministic=True
):
    """Reference grouped-query attention: `attention_weights`, dropout, weighted sum of v.

    q [b, t, h, d], k/v [b, s, kv, d], mask/bias/scale as in `attention_weights`
    -> (out [b, t, h, d], weights [b, h, t, s] float32, before dropout).
    """
    b, t, h, _ = q.shape
    kv = k.shape[2]
    weights = attention_weights(q, k, mask, bias, scale)
    probs = weights
    if not deterministic and dropout_rate > 0.0:
        probs = dropout(probs, dropout_rate, dropout_rng)
    probs = probs.reshape(b, kv, h // kv, t, -1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, v.shape[-1]), weights


def attend(
    q,
    k,
    v,
    mask,
    *,
    bias=None,
    scale=None,
    causal=False,
    implementation="auto",
    dropout_rng=None,
    dropout_rate=0.0,
    deterministic=True,
    return_weights=False,
    segment_ids=None,
):
    """Attention by `implementation`: q [b, t, h, d], k/v [b, s, kv, d] -> [b, t, h, d].

    mask/bias/scale as in `attention_weights`. segment_ids [b, t], given with `causal`, say
    that the mask is exactly causal_mask & segment_mask(segment_ids, segment_ids) (what
    splash computes from the ids alone); leave them out for any other mask. `causal` says
    the mask already contains causality, so cuDNN may skip the blocks above the diagonal.
    It reaches cuDNN only when t == s (jax's causal mask is top-left, query i sees keys <= i:
    wrong for queries at the end of a cache) and never XLA (which would only rebuild the
    same mask); the dense mask is passed as well, so correctness never depends on the hint.
    With segment ids cuDNN takes the segments as lengths and offsets instead of the dense
    mask where it can (`cudnn_packed_attention`, `_cudnn_packs`). A fused kernel's
    residuals are named for the remat policy (`keep_residuals`).
    With attention dropout (not deterministic, rate > 0) the reference core runs whatever
    `implementation` says: the fused kernels cannot express dropout.
    With `return_weights`, returns (out, softmax weights [b, h, t, s]).
    """
    t, s = q.shape[1], k.shape[1]
    segmented = causal and segment_ids is not None and bias is None and t == s
    impl = resolve_implementation(
        implementation, q.dtype, q.shape[-1], lengths=(t, s), segmented=segmented
    )
    if not deterministic and dropout_rate > 0.0:
        impl = "reference"
    if impl == "splash" and implementation == "auto" and not _heads_split_alike(q, k):
        impl = "xla"  # the kernel needs each device's query heads beside their kv heads
    if impl == "reference":
        out, weights = dot_product_attention(
            q,
            k,
            v,
            mask,
            bias=bias,
            scale=scale,
            dropout_rng=dropout_rng,
            dropout_rate=dropout_rate,
            deterministic=deterministic,
        )
        return (out, weights) if return_weights else out
    if impl == "xla":
        out = jax.nn.dot_product_attention(q, k, v, bias, mask, scale=scale, implementation="xla")
    elif impl == "splash":
        out = keep_residuals(functools.partial(splash_attention, scale=scale))(q, k, v, segment_ids)
    else:
        # jax's cuDNN path rejects a folded mask/bias not spanning [.., t, s] (e.g. the
        # [b, 1, 1, s] padding mask); the kernel takes the bias in the inputs' dtype.
        def full(x):
            return None if x is None else jnp.broadcast_to(x, x.shape[:2] + (t, s))

        if segmented and _cudnn_packs(q, k):
            return _finish(
                keep_residuals(functools.partial(cudnn_packed_attention, scale=scale))(
                    q, k, v, segment_ids
                ),
                q,
                k,
                mask,
                bias,
                scale,
                return_weights,
            )
        fused_bias = None if bias is None else full(bias).astype(q.dtype)
        cudnn = functools.partial(
            jax.nn.dot_product_attention,
            scale=scale,
            is_causal=causal and t == s,
            implementation="cudnn",
        )
        out = keep_residuals(cudnn)(q, k, v, fused_bias, full(mask))
    return _finish(out, q, k, mask, bias, scale, return_weights)


def _finish(out, q, k, mask, bias, scale, return_weights):
    """out, or (out, the softmax weights) when the caller asked for them: a fused kernel
    does not return them, so they are computed from q and k as the reference core does."""
    if return_weights:
        return out, attention_weights(q, k, mask, bias, scale)
    return out


def _cudnn_packs(q, k) -> bool:
    """Whether cuDNN's packed layout (`cudnn_packed_attention`) serves this call: a Hopper
    or newer GPU (jax raises on older ones) and as many key/value heads as query heads (jax
    0.10 scales the key offsets by the query heads' stride, which is wrong under
    grouped-query heads: jax PR #39521)."""
    if q.shape[2] != k.shape[2]:
        return False
    device = jax.devices("gpu")[0]
    major, minor = (int(x) for x in device.compute_capability.split("."))
    return (major, minor) >= (9, 0)


def cudnn_packed_attention(q, k, v, segment_ids, *, scale=None):
    """Causal attention within segments by cuDNN's packed (ragged) layout: q, k, v
    [b, t, h, d] bf16/fp16, segment_ids [b, t] (contiguous runs, 0 = padding) -> [b, t, h, d].

    The segments go in as lengths and offsets (`segment_offsets`) with cuDNN's
    padding-causal mask, instead of a dense [b, 1, t, t] mask folded into a bias that the
    kernel reads in both passes. Only jax's cuDNN module takes offsets (`jax.nn`'s
    function does not expose them).
    """
    from jax._src.cudnn import fused_attention_stablehlo as cudnn  # offsets live only here

    lengths, offsets = segment_offsets(segment_ids)
    return cudnn.dot_product_attention(
        q,
        k,
        v,
        q_seqlen=lengths,
        kv_seqlen=lengths,
        q_offsets=offsets,
        kv_offsets=offsets,
        scale=q.shape[-1] ** -0.5 if scale is None else scale,
        mask_type=cudnn.MaskType.PADDING_CAUSAL,
    )


def keep_residuals(kernel):
    """`kernel` (a function of arrays, some of them None) with its backward pass's residuals
    named ATTENTION_RESIDUALS.

    A fused kernel is a custom call, not a `dot_general`: under a remat policy that saves only
    matmul outputs its forward would run again in the backward pass to rebuild what its
    backward reads (output, log-sum-exp). Here the forward is `jax.vjp` of the kernel, whose
    residuals (the leaves of the returned backward function) pass through `checkpoint_name`,
    so a policy that saves the name keeps them, and the backward is that function. Returns a
    function of the same arguments whose output is named too.
    """

    @jax.custom_vjp
    def run(*args):
        return kernel(*args)

    def forward(*args):
        out, backward = jax.vjp(kernel, *args)
        named = jax.tree.map(lambda r: checkpoint_name(r, ATTENTION_RESIDUALS), backward)
        return out, named

    def backward(residuals, cotangent):
        return residuals(cotangent)

    run.defvjp(forward, backward)
    # The output by name as well: the output projection's backward reads it too.
    return lambda *args: checkpoint_name(run(*args), ATTENTION_RESIDUALS)


SPLASH_BLOCK = 128  # splash's tile: the lengths it takes are multiples of it


def _splash_per_device(q, k, v, segment_ids, interpret: bool):
    """Splash on one device's shard: q [b, t, h, d], k/v [b, t, kv, d], segment_ids [b, t]."""
    from jax.experimental.pallas.ops.tpu import splash_attention as splash  # loaded when used

    t, heads = q.shape[1], q.shape[2]
    block = next(n for n in (512, 256, SPLASH_BLOCK) if t % n == 0)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_kv_compute=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_kv_dkv_compute=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    mask = splash.MultiHeadMask([splash.CausalMask((t, t))] * heads)
    kernel = splash.make_splash_mha(
        mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret
    )

    def one_row(q, k, v, ids):  # [heads, t, d] each
        return kernel(q, k, v, segment_ids=splash.SegmentIds(q=ids, kv=ids))

    heads_first = lambda x: x.transpose(0, 2, 1, 3)
    out = jax.vmap(one_row)(heads_first(q), heads_first(k), heads_first(v), segment_ids)
    return heads_first(out)


def _heads_split_alike(q, k) -> bool:
    """Whether the layout in force splits the query heads of q [b, t, h, d] and the kv heads
    of k [b, t, kv, d] over the same mesh axes (always, outside a laid-out step)."""
    q_spec = activation_spec(HEADS_LAYOUT, q.shape)
    return q_spec is None or q_spec[2] == activation_spec(KV_HEADS_LAYOUT, k.shape)[2]


def splash_attention(q, k, v, segment_ids, *, scale=None):
    """Causal attention within segments by the Pallas splash kernel (TPU flash attention).

    q [b, t, h, d], k/v [b, t, kv, d], segment_ids [b, t] -> [b, t, h, d] in q's dtype; t a
    multiple of SPLASH_BLOCK. Queries are scaled by `scale` (default d^-1/2) before the
    kernel, which takes none. Under a laid-out step (`layers.activation_rules`) the kernel
    runs per device by shard_map over the batch and head splits of q and k (the compiler
    cannot split a custom kernel itself); elsewhere on the whole arrays. Off a TPU it runs
    in the Pallas interpreter.
    """
    if q.shape[1] % SPLASH_BLOCK:
        raise ValueError(
            f"splash attention needs lengths that are multiples of {SPLASH_BLOCK}, got "
            f"{q.shape[1]}; use model.attention_impl='auto' or 'xla'"
        )
    q = q * jnp.asarray(q.shape[-1] ** -0.5 if scale is None else scale, q.dtype)
    run = functools.partial(_splash_per_device, interpret=traced_backend() != "tpu")
    q_spec = activation_spec(HEADS_LAYOUT, q.shape)
    kv_spec = activation_spec(KV_HEADS_LAYOUT, k.shape)
    if q_spec is None:
        return run(q, k, v, segment_ids)
    if not _heads_split_alike(q, k):
        raise ValueError(
            f"splash attention: the query heads ({q.shape[2]}) and key/value heads "
            f"({k.shape[2]}) split differently over the mesh ({q_spec[2]} vs {kv_spec[2]}); "
            f"use a tensor size that divides both, or model.attention_impl='xla'"
        )
    ids_spec = jax.sharding.PartitionSpec(q_spec[0], q_spec[1])
    return jax.shard_map(
        run,
        in_specs=(q_spec, kv_spec, kv_spec, ids_spec),
        out_specs=q_spec,
        check_vma=False,
    )(q, k, v, segment_ids)


def relative_position_bucket(
    relative_position, *, bidirectional: bool, num_buckets: int, max_distance: int
):
    """T5's bucketing of key_position - query_position (int array) into [0, num_buckets).

    Half the buckets (per direction) hold exact distances; the rest grow logarithmically
    up to `max_distance`, beyond which everything shares the last bucket. A causal
    decoder only sees the past, so it spends all buckets on one direction.
    """
    bucket = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).astype(relative_position.dtype) * num_buckets
        distance = jnp.abs(relative_position)
    else:
        distance = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(
        max_distance / max_exact
    )
    large = jnp.minimum(
        max_exact + (ratio * (num_buckets - max_exact)).astype(distance.dtype), num_buckets - 1
    )
    return bucket + jnp.where(distance < max_exact, distance, large)


class Attention(nn.Module):
    """Multi-head / grouped-query / multi-query attention.

    Self-attention when `kv_inputs` is None, cross-attention otherwise. With `decode=True`
    (self-attention only) keys and values are appended to a cache whose length is fixed by
    the input length at `init` time; see `lm.models.transformer.init_cache`.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    use_bias: bool = False
    rotary: bool = False
    rope_base: float = 10_000.0
    qk_norm: bool = False  # RMSNorm over head_dim of queries and keys (Gemma 3)
    norm_eps: float = 1e-6
    window: int = 0  # > 0: a query sees only keys less than `window` positions back
    scale: float = 0.0  # logit scale; 0 = head_dim^-1/2
    relative_bidirectional: bool = True  # bucketing direction when a relative table is given
    relative_max_distance: int = 128
    dropout: float = 0.0
    capture_attention: bool = False
    implementation: str = "auto"  # one of IMPLEMENTATIONS, see `attend`
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = DEFAULT_INIT_STD
    out_init_std: float = DEFAULT_INIT_STD

    def _proj(self, heads, axes, name):
        return nn.DenseGeneral(
            (heads, self.head_dim),
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=param_init(normal(self.init_std), ("embed",) + axes),
            bias_init=param_init(jax.nn.initializers.zeros, axes),
            dot_general=kernel_dot_general,
            name=name,
        )

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        mask: jax.Array | None,
        *,
        kv_inputs: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        relative_table: jax.Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        causal: bool = False,
    ) -> jax.Array:
        """x [batch, q_len, embed] -> [batch, q_len, embed].

        mask: [batch, 1, q_len, k_len] (ignored when decoding: the cache builds its own).
        positions: [batch, q_len] absolute positions, for rotary embeddings, the sliding
          window and relative positions.
        segment_ids: [batch, q_len] (0 = padding); when decoding, marks which new keys are real.
        relative_table: [buckets, heads] T5 relative-position biases (self-attention only).
        causal: the mask includes causality (a hint for cuDNN, see `attend`).
        """
        is_cross = kv_inputs is not None
        kv_in = kv_inputs if is_cross else x
        q = self._proj(self.num_heads, ("heads", "kv"), "query")(x)
        k = self._proj(self.num_kv_heads, ("kv_heads", "kv"), "key")(kv_in)
        v = self._proj(self.num_kv_heads, ("kv_heads", "kv"), "value")(kv_in)
        if self.qk_norm:
            q = RMSNorm(
                self.norm_eps, self.dtype, self.param_dtype, axis_name="kv", name="query_norm"
            )(q)
            k = RMSNorm(
                self.norm_eps, self.dtype, self.param_dtype, axis_name="kv", name="key_norm"
            )(k)
        if self.rotary and not is_cross:
            q = apply_rotary(q, positions, self.rope_base)
            k = apply_rotary(k, positions, self.rope_base)
        q = constrain(q, HEADS_LAYOUT)
        k = constrain(k, KV_HEADS_LAYOUT)
        v = constrain(v, KV_HEADS_LAYOUT)

        key_positions = positions
        if decode and not is_cross:
            k, v, mask, key_positions = self._update_cache(k, v, segment_ids, positions)
        bias = None
        if not is_cross and (self.window or relative_table is not None):
            relative = key_positions[:, None, :] - positions[:, :, None]  # [b, q, k]
            if self.window:
                mask = mask & (relative > -self.window)[:, None]
            if relative_table is not None:
                buckets = relative_position_bucket(
                    relative,
                    bidirectional=self.relative_bidirectional,
                    num_buckets=relative_table.shape[0],
                    max_distance=self.relative_max_distance,
                )
                bias = jnp.take(relative_table, buckets, axis=0).transpose(0, 3, 1, 2)

        dropout_rng = None
        if not deterministic and self.dropout > 0.0:
            dropout_rng = self.make_rng("dropout")
        # The mask is causal within segments exactly when the stack passes segment ids
        # without decoding (DecoderOnly.features leaves them out for any other mask).
        segmented = causal and not decode and not is_cross and not self.window
        out = attend(
            q,
            k,
            v,
            mask,
            bias=bias,
            scale=self.scale or None,
            causal=causal,
            segment_ids=segment_ids if segmented else None,
            implementation=self.implementation,
            dropout_rng=dropout_rng,
            dropout_rate=self.dropout,
            deterministic=deterministic,
            return_weights=self.capture_attention,
        )
        if self.capture_attention:
            out, weights = out
            self.sow("intermediates", "attention_weights", weights)
        out = constrain(out, HEADS_LAYOUT)
        return nn.DenseGeneral(
            x.shape[-1],
            axis=(-2, -1),
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=param_init(normal(self.out_init_std), ("heads", "kv", "embed")),
            bias_init=param_init(jax.nn.initializers.zeros, ("embed",)),
            dot_general=kernel_dot_general,
            name="out",
        )(out)

    def _update_cache(self, k, v, segment_ids, positions):
        """Writes k/v [b, t, kv, d] at the cache index.

        Returns the full cached k/v, the decode mask [b, 1, t, max_len] and the cached keys'
        positions [b, max_len] (left-padded prompts make them differ from the slot index).
        """
        initialized = self.has_variable("cache", "cached_key")
        b, t, kvh, d = k.shape
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        cached_valid = self.variable("cache", "cached_valid", jnp.zeros, (b, t), jnp.bool_)
        cached_position = self.variable("cache", "cached_position", jnp.zeros, (b, t), jnp.int32)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        valid = jnp.ones((b, t), jnp.bool_) if segment_ids is None else segment_ids != 0
        if not initialized:
            # `init` call: the input length sets the cache size; attend causally as usual.
            return k, v, causal_mask(t) & padding_mask(valid, valid), positions
        index = cache_index.value
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k, (0, index, 0, 0))
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v, (0, index, 0, 0))
        cached_valid.value = jax.lax.dynamic_update_slice(cached_valid.value, valid, (0, index))
        cached_position.value = jax.lax.dynamic_update_slice(
            cached_position.value, positions.astype(jnp.int32), (0, index)
        )
        cache_index.value = index + t
        max_len = cached_key.value.shape[1]
        key_slot = jnp.arange(max_len)[None, :]
        query_slot = index + jnp.arange(t)[:, None]
        mask = (key_slot <= query_slot)[None, None] & cached_valid.value[:, None, None, :]
        return cached_key.value, cached_value.value, mask, cached_position.value
