"""Multi-head attention with grouped-query heads, explicit masks and a KV cache.

Shapes: queries [batch, q_len, heads, head_dim], keys/values [batch, k_len, kv_heads,
head_dim]; masks are boolean [batch, 1, q_len, k_len] with True meaning "may attend".
With `capture_attention=True` the softmax weights [batch, heads, q_len, k_len] are sown
into the `intermediates` collection under the name `attention_weights`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.models.layers import DEFAULT_INIT_STD, RMSNorm, apply_rotary, normal, param_init

NEG_INF = -1e30


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
    return jnp.broadcast_to(k_valid[:, None, None, :] != 0, (k_valid.shape[0], 1, 1, k_valid.shape[1]))


def dot_product_attention(
    q, k, v, mask, *, bias=None, scale=None, dropout_rng=None, dropout_rate=0.0, deterministic=True
):
    """Grouped-query attention core.

    q [b, t, h, d], k/v [b, s, kv, d], mask [b, 1, t, s], bias [b or 1, h, t, s] added to the
    logits (T5's relative positions) -> (out [b, t, h, d], weights [b, h, t, s]).
    `scale` multiplies the logits (default d^-1/2; T5 folds it into its weights and uses 1).
    Logits and softmax are computed in float32.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    if h % kv:
        raise ValueError(f"heads ({h}) must be a multiple of kv_heads ({kv})")
    q = q.reshape(b, t, kv, h // kv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    logits = logits * jnp.float32(d**-0.5 if scale is None else scale)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32).reshape(bias.shape[0], kv, h // kv, t, -1)
    if mask is not None:
        logits = jnp.where(mask[:, :, None], logits, NEG_INF)
    weights = jax.nn.softmax(logits, axis=-1)
    if not deterministic and dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", weights.astype(v.dtype), v)
    return out.reshape(b, t, h, d), weights.reshape(b, h, t, -1)


def relative_position_bucket(relative_position, *, bidirectional: bool, num_buckets: int,
                             max_distance: int):
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
        max_distance / max_exact)
    large = jnp.minimum(max_exact + (ratio * (num_buckets - max_exact)).astype(distance.dtype),
                        num_buckets - 1)
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
    ) -> jax.Array:
        """x [batch, q_len, embed] -> [batch, q_len, embed].

        mask: [batch, 1, q_len, k_len] (ignored when decoding: the cache builds its own).
        positions: [batch, q_len] absolute positions, for rotary embeddings, the sliding
          window and relative positions.
        segment_ids: [batch, q_len] (0 = padding); when decoding, marks which new keys are real.
        relative_table: [buckets, heads] T5 relative-position biases (self-attention only).
        """
        is_cross = kv_inputs is not None
        kv_in = kv_inputs if is_cross else x
        q = self._proj(self.num_heads, ("heads", "kv"), "query")(x)
        k = self._proj(self.num_kv_heads, ("kv_heads", "kv"), "key")(kv_in)
        v = self._proj(self.num_kv_heads, ("kv_heads", "kv"), "value")(kv_in)
        if self.qk_norm:
            q = RMSNorm(self.norm_eps, self.dtype, self.param_dtype, axis_name="kv", name="query_norm")(q)
            k = RMSNorm(self.norm_eps, self.dtype, self.param_dtype, axis_name="kv", name="key_norm")(k)
        if self.rotary and not is_cross:
            q = apply_rotary(q, positions, self.rope_base)
            k = apply_rotary(k, positions, self.rope_base)

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
                    relative, bidirectional=self.relative_bidirectional,
                    num_buckets=relative_table.shape[0], max_distance=self.relative_max_distance)
                bias = jnp.take(relative_table, buckets, axis=0).transpose(0, 3, 1, 2)

        dropout_rng = None
        if not deterministic and self.dropout > 0.0:
            dropout_rng = self.make_rng("dropout")
        out, weights = dot_product_attention(
            q, k, v, mask, bias=bias, scale=self.scale or None, dropout_rng=dropout_rng,
            dropout_rate=self.dropout, deterministic=deterministic,
        )
        if self.capture_attention:
            self.sow("intermediates", "attention_weights", weights)
        return nn.DenseGeneral(
            x.shape[-1],
            axis=(-2, -1),
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=param_init(normal(self.out_init_std), ("heads", "kv", "embed")),
            bias_init=param_init(jax.nn.initializers.zeros, ("embed",)),
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
            cached_position.value, positions.astype(jnp.int32), (0, index))
        cache_index.value = index + t
        max_len = cached_key.value.shape[1]
        key_slot = jnp.arange(max_len)[None, :]
        query_slot = index + jnp.arange(t)[:, None]
        mask = (key_slot <= query_slot)[None, None] & cached_valid.value[:, None, None, :]
        return cached_key.value, cached_value.value, mask, cached_position.value
