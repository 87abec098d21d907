"""Multi-head attention with grouped-query heads, explicit masks and a KV cache.

Shapes: queries [batch, q_len, heads, head_dim], keys/values [batch, k_len, kv_heads,
head_dim]; masks are boolean [batch, 1, q_len, k_len] with True meaning "may attend".
With `capture_attention=True` the softmax weights [batch, heads, q_len, k_len] are sown
into the `intermediates` collection under the name `attention_weights`.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.models.layers import DEFAULT_INIT_STD, apply_rotary, normal, param_init

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


def padding_mask(q_valid: jax.Array, k_valid: jax.Array) -> jax.Array:
    """Keys must be real tokens; q_valid [batch, q_len], k_valid [batch, k_len] -> [b, 1, q, k]."""
    del q_valid  # padded queries produce ignored outputs; masking them only risks NaNs.
    return jnp.broadcast_to(k_valid[:, None, None, :] != 0, (k_valid.shape[0], 1, 1, k_valid.shape[1]))


def dot_product_attention(q, k, v, mask, *, dropout_rng=None, dropout_rate=0.0, deterministic=True):
    """Grouped-query attention core.

    q [b, t, h, d], k/v [b, s, kv, d], mask [b, 1, t, s] -> (out [b, t, h, d], weights [b, h, t, s]).
    Logits and softmax are computed in float32.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    if h % kv:
        raise ValueError(f"heads ({h}) must be a multiple of kv_heads ({kv})")
    q = q.reshape(b, t, kv, h // kv, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    logits = logits / jnp.sqrt(d).astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask[:, :, None], logits, NEG_INF)
    weights = jax.nn.softmax(logits, axis=-1)
    if not deterministic and dropout_rate > 0.0:
        keep = jax.random.bernoulli(dropout_rng, 1.0 - dropout_rate, weights.shape)
        weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
    out = jnp.einsum("bkgts,bskd->btkgd", weights.astype(v.dtype), v)
    return out.reshape(b, t, h, d), weights.reshape(b, h, t, -1)


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
        deterministic: bool = True,
        decode: bool = False,
    ) -> jax.Array:
        """x [batch, q_len, embed] -> [batch, q_len, embed].

        mask: [batch, 1, q_len, k_len] (ignored when decoding: the cache builds its own).
        positions: [batch, q_len] absolute positions, for rotary embeddings.
        segment_ids: [batch, q_len] (0 = padding); when decoding, marks which new keys are real.
        """
        is_cross = kv_inputs is not None
        kv_in = kv_inputs if is_cross else x
        q = self._proj(self.num_heads, ("heads", "kv"), "query")(x)
        k = self._proj(self.num_kv_heads, ("kv_heads", "kv"), "key")(kv_in)
        v = self._proj(self.num_kv_heads, ("kv_heads", "kv"), "value")(kv_in)
        if self.rotary and not is_cross:
            q = apply_rotary(q, positions, self.rope_base)
            k = apply_rotary(k, positions, self.rope_base)

        if decode and not is_cross:
            k, v, mask = self._update_cache(k, v, segment_ids)

        dropout_rng = None
        if not deterministic and self.dropout > 0.0:
            dropout_rng = self.make_rng("dropout")
        out, weights = dot_product_attention(
            q, k, v, mask, dropout_rng=dropout_rng, dropout_rate=self.dropout, deterministic=deterministic
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

    def _update_cache(self, k, v, segment_ids):
        """Writes k/v [b, t, kv, d] at the cache index; returns full k/v and the decode mask."""
        initialized = self.has_variable("cache", "cached_key")
        b, t, kvh, d = k.shape
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        cached_valid = self.variable("cache", "cached_valid", jnp.zeros, (b, t), jnp.bool_)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        if not initialized:
            # `init` call: the input length sets the cache size; attend causally as usual.
            valid = jnp.ones((b, t), jnp.bool_) if segment_ids is None else segment_ids != 0
            return k, v, causal_mask(t) & padding_mask(valid, valid)
        index = cache_index.value
        valid = jnp.ones((b, t), jnp.bool_) if segment_ids is None else segment_ids != 0
        cached_key.value = jax.lax.dynamic_update_slice(cached_key.value, k, (0, index, 0, 0))
        cached_value.value = jax.lax.dynamic_update_slice(cached_value.value, v, (0, index, 0, 0))
        cached_valid.value = jax.lax.dynamic_update_slice(cached_valid.value, valid, (0, index))
        cache_index.value = index + t
        max_len = cached_key.value.shape[1]
        key_pos = jnp.arange(max_len)[None, :]
        query_pos = index + jnp.arange(t)[:, None]
        mask = (key_pos <= query_pos)[None, None] & cached_valid.value[:, None, None, :]
        return cached_key.value, cached_value.value, mask
