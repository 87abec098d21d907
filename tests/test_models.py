"""Model behaviour: causality, padding invariance, KV-cache equality, GQA, overfitting."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from lm.models import transformer as T

from tests import slow_except

FAMILIES = {
    "gpt2": T.preset("gpt2", **T.TINY),
    "llama": T.preset("llama", **T.TINY, num_kv_heads=2),
    "llama_mqa": T.preset("llama", **T.TINY, num_kv_heads=1, tied_embeddings=False),
    # Local layers see 3 positions, so 10-token tests cross the window.
    "gemma3": T.preset(
        "gemma3", **T.TINY, num_kv_heads=1, head_dim=16, sliding_window=3, global_every=2
    ),
}
SEQ2SEQ = {
    "transformer_base": T.preset("transformer_base", **T.TINY, dropout=0.0),
    "t5": T.preset("t5", **T.TINY, head_dim=8, shared_embeddings=False),
    # Original T5: relative position buckets, unscaled logits, tied head scaled by d^-1/2.
    "t5_relative": T.preset(
        "t5",
        **T.TINY,
        head_dim=8,
        position="relative",
        relative_buckets=8,
        relative_max_distance=16,
        attention_scale=1.0,
        tied_embeddings=True,
        scale_tied_logits=True,
        init_std=0.1,
    ),
}


def init(config, batch=2, length=8, seed=0):
    model = T.build_model(config)
    variables = model.init(jax.random.key(seed), **T.dummy_inputs(config, batch, length))
    return model, nn.meta.unbox(variables["params"])


def random_tokens(shape, vocab, seed):
    return jax.random.randint(jax.random.key(seed), shape, 1, vocab)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_decoder_is_causal(name):
    config = FAMILIES[name]
    model, params = init(config)
    tokens = random_tokens((2, 12), config.vocab_size, 1)
    changed = tokens.at[:, 7:].set(random_tokens((2, 5), config.vocab_size, 2))
    a = model.apply({"params": params}, tokens)
    b = model.apply({"params": params}, changed)
    np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not np.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_padding_and_packing_do_not_leak(name):
    config = FAMILIES[name]
    model, params = init(config)
    doc = random_tokens((1, 6), config.vocab_size, 3)
    alone = model.apply({"params": params}, doc)
    # Same document followed by padding (segment 0) and by a second packed document.
    other = random_tokens((1, 5), config.vocab_size, 4)
    padded = jnp.concatenate([doc, jnp.zeros((1, 5), jnp.int32)], axis=1)
    packed = jnp.concatenate([doc, other], axis=1)
    seg_pad = jnp.array([[1] * 6 + [0] * 5])
    seg_pack = jnp.array([[1] * 6 + [2] * 5])
    pos = jnp.array([list(range(6)) + list(range(5))])
    out_pad = model.apply({"params": params}, padded, segment_ids=seg_pad, positions=pos)
    out_pack = model.apply({"params": params}, packed, segment_ids=seg_pack, positions=pos)
    np.testing.assert_allclose(out_pad[:, :6], alone, atol=1e-5)
    np.testing.assert_allclose(out_pack[:, :6], alone, atol=1e-5)
    other_alone = model.apply({"params": params}, other)
    np.testing.assert_allclose(out_pack[:, 6:], other_alone, atol=1e-5)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_kv_cache_matches_full_forward(name):
    config = FAMILIES[name]
    model, params = init(config)
    tokens = random_tokens((2, 10), config.vocab_size, 5)
    full = model.apply({"params": params}, tokens)
    cache = T.init_cache(model, params, batch=2, max_len=16)
    # Prefill 4 tokens at once, then one token at a time.
    step = jax.jit(
        lambda cache, toks, pos: model.apply(
            {"params": params, "cache": cache}, toks, positions=pos, decode=True, mutable=["cache"]
        )
    )
    logits, mut = step(cache, tokens[:, :4], jnp.broadcast_to(jnp.arange(4), (2, 4)))
    outs = [logits]
    cache = mut["cache"]
    for i in range(4, 10):
        logits, mut = step(cache, tokens[:, i : i + 1], jnp.full((2, 1), i))
        cache = mut["cache"]
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)


@pytest.mark.slow
def test_sliding_window_limits_what_a_local_layer_sees():
    """One local layer with window 3: position t depends on tokens t-2..t only."""
    config = T.preset(
        "gemma3", **{**T.TINY, "num_layers": 1}, num_kv_heads=1, head_dim=16, sliding_window=3
    )
    model, params = init(config)
    tokens = random_tokens((1, 10), config.vocab_size, 8)
    base = model.apply({"params": params}, tokens)
    changed = model.apply({"params": params}, tokens.at[:, 4].set((tokens[0, 4] + 1) % 97))
    np.testing.assert_allclose(base[:, 7:], changed[:, 7:], atol=1e-6)
    assert not np.allclose(base[:, 4:7], changed[:, 4:7])
    # A global layer (every layer when global_every=1) sees everything.
    wide = T.preset(
        "gemma3",
        **{**T.TINY, "num_layers": 1},
        num_kv_heads=1,
        head_dim=16,
        sliding_window=3,
        global_every=1,
    )
    assert not wide.is_local_layer(0) and config.is_local_layer(0)
    model, params = T.build_model(wide), T.to_layout(params, wide)  # period 6 unscanned -> period 1
    a = model.apply({"params": params}, tokens)
    b = model.apply({"params": params}, tokens.at[:, 4].set((tokens[0, 4] + 1) % 97))
    assert not np.allclose(a[:, 7:], b[:, 7:])


def test_local_layers_use_their_own_rope_base():
    config = T.preset(
        "gemma3", **T.TINY, num_kv_heads=1, head_dim=16, sliding_window=64, global_every=2
    )
    model, params = init(config)
    tokens = random_tokens((1, 8), config.vocab_size, 9)
    same_base = T.build_model(dataclasses.replace(config, rope_local_base=config.rope_base))
    assert not np.allclose(
        model.apply({"params": params}, tokens), same_base.apply({"params": params}, tokens)
    )


def test_relative_position_buckets():
    from lm.models.attention import relative_position_bucket

    rel = jnp.arange(-20, 21)
    both = relative_position_bucket(rel, bidirectional=True, num_buckets=8, max_distance=16)
    # 4 buckets per direction: distances 0, 1 exact, then log-spaced up to 16, then saturated.
    assert both[20] == 0 and both[19] == 1 and both[21] == 5
    assert both[0] == 3 and both[-1] == 7  # beyond max_distance: last bucket of each side
    assert (np.diff(np.asarray(both[:21])) <= 0).all()  # farther in the past: higher bucket
    causal = relative_position_bucket(rel, bidirectional=False, num_buckets=8, max_distance=16)
    assert (causal[20:] == 0).all() and causal[19] == 1 and causal[0] == 7


@pytest.mark.parametrize("name", slow_except(sorted(SEQ2SEQ), "t5"))
def test_encoder_decoder_cache_and_padding(name):
    config = SEQ2SEQ[name]
    model, params = init(config)
    src = random_tokens((2, 7), config.vocab_size, 6)
    tgt = random_tokens((2, 9), config.vocab_size, 7)
    full = model.apply({"params": params}, tgt, encoder_inputs=src)
    # Encoder padding does not change the outputs.
    src_padded = jnp.concatenate([src, jnp.zeros((2, 3), jnp.int32)], axis=1)
    enc_seg = jnp.array([[1] * 7 + [0] * 3] * 2)
    padded = model.apply(
        {"params": params}, tgt, encoder_inputs=src_padded, encoder_segment_ids=enc_seg
    )
    np.testing.assert_allclose(padded, full, atol=1e-5)
    # Decoder causality.
    changed = model.apply({"params": params}, tgt.at[:, 5:].set(1), encoder_inputs=src)
    np.testing.assert_allclose(changed[:, :5], full[:, :5], atol=1e-6)
    # Cached decoding equals teacher forcing.
    encoded = model.apply({"params": params}, src, method=T.EncoderDecoder.encode)
    cache = T.init_cache(model, params, batch=2, max_len=12, encoder_len=7)
    outs = []
    for i in range(9):
        logits, mut = model.apply(
            {"params": params, "cache": cache},
            encoded,
            tgt[:, i : i + 1],
            positions=jnp.full((2, 1), i),
            decode=True,
            mutable=["cache"],
            method=T.EncoderDecoder.decode,
        )
        cache = mut["cache"]
        outs.append(logits)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5)


def test_grouped_query_attention_shapes_and_capture():
    config = T.preset("llama", **T.TINY, num_kv_heads=2, capture_attention=True)
    model, params = init(config)
    layer = params["decoder"]["layers"]["block_0"]["self_attention"]  # [layers, ...] (scanned)
    assert layer["query"]["kernel"].shape == (2, 32, 4, 8)
    assert layer["key"]["kernel"].shape == (2, 32, 2, 8)
    tokens = random_tokens((2, 6), config.vocab_size, 8)
    _, state = model.apply({"params": params}, tokens, mutable=["intermediates"])
    sown = state["intermediates"]["decoder"]["layers"]["block_0"]["self_attention"][
        "attention_weights"
    ][0]
    assert sown.shape == (2, 2, 4, 6, 6)  # [layers, batch, heads, q, k]
    unstacked = T.unstack_layers(state["intermediates"])
    weights = unstacked["decoder"]["layer_1"]["self_attention"]["attention_weights"][0]
    np.testing.assert_array_equal(weights, sown[1])
    assert weights.shape == (2, 4, 6, 6)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    assert float(jnp.abs(jnp.triu(weights, k=1)).max()) == 0.0


def test_parameters_carry_logical_axes():
    config = FAMILIES["llama"]
    model = T.build_model(config)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), **T.dummy_inputs(config)))
    specs = nn.get_partition_spec(boxed)["params"]
    assert tuple(specs["token_embedding"]["embedding"]) == ("vocab", "embed")
    block = specs["decoder"]["layers"]["block_0"]  # scanned: a leading 'layers' axis
    assert tuple(block["mlp"]["wi_gate"]["kernel"]) == ("layers", "embed", "mlp")
    assert tuple(block["self_attention"]["key"]["kernel"]) == ("layers", "embed", "kv_heads", "kv")
    unrolled = dataclasses.replace(config, scan_layers=False)
    boxed = jax.eval_shape(
        lambda: T.build_model(unrolled).init(jax.random.key(0), **T.dummy_inputs(config))
    )
    specs = nn.get_partition_spec(boxed)["params"]
    assert tuple(specs["decoder"]["layer_0"]["mlp"]["wi_gate"]["kernel"]) == ("embed", "mlp")


def test_bf16_precision_computes_in_bf16_with_float32_weights():
    """model.precision='bf16': float32 parameters, bfloat16 matmuls, float32 logits; for
    inference the weights themselves become bfloat16."""
    config = T.preset("llama", **T.TINY, num_kv_heads=2, precision="bf16")
    model, params = init(config)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    tokens = random_tokens((2, 9), config.vocab_size, 9)
    jaxpr = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, tokens))(params))
    assert "dot_general" in jaxpr and "bf16[2,9,4,8]" in jaxpr  # bf16 queries [b, t, h, d]
    logits = model.apply({"params": params}, tokens)
    assert logits.dtype == jnp.float32
    ref = T.build_model(dataclasses.replace(config, precision="fp32")).apply(
        {"params": params}, tokens
    )
    # bf16 keeps 8 bits of mantissa: measured max difference 2.2e-3 on logits of scale 0.7.
    np.testing.assert_allclose(logits, ref, atol=0.02)
    assert not np.allclose(logits, ref, atol=1e-5)  # it really ran in bf16

    fp32_model, same = T.for_inference(config, params, "fp32")
    np.testing.assert_array_equal(fp32_model.apply({"params": same}, tokens), ref)
    bf16_model, cast = T.for_inference(
        dataclasses.replace(config, precision="fp32"), params, "bf16"
    )
    assert all(p.dtype == jnp.bfloat16 for p in jax.tree.leaves(cast))
    np.testing.assert_allclose(bf16_model.apply({"params": cast}, tokens), ref, atol=0.02)
    with pytest.raises(ValueError, match="model.precision='fp16'"):
        T.preset("gpt2", **T.TINY, precision="fp16")


def test_unknown_and_mistyped_config_keys_are_named():
    with pytest.raises(ValueError, match="model.num_layer"):
        T.ModelConfig.from_dict({"num_layer": 3})
    with pytest.raises(ValueError, match="model.d_model must be an int"):
        T.ModelConfig.from_dict({"d_model": "big"})
    with pytest.raises(ValueError, match="num_kv_heads"):
        T.ModelConfig(num_heads=4, num_kv_heads=3)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_tiny_model_overfits_one_batch(name):
    config = FAMILIES[name]
    model, params = init(config)
    tokens = random_tokens((4, 16), config.vocab_size, 10)
    opt = optax.adam(1e-2)
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state):
        def loss_fn(p):
            logits = model.apply({"params": p}, tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    first = None
    for _ in range(150):
        params, opt_state, loss = step(params, opt_state)
        first = float(loss) if first is None else first
    assert first > 4.0 and float(loss) < 0.05, (first, float(loss))


def test_attention_only_layers_have_no_mlp():
    """mlp_dim=0: attention-only layers (Olsson et al.), still causal."""
    config = T.preset("gpt2", **{**T.TINY, "mlp_dim": 0})
    model = T.build_model(config)
    params = nn.meta.unbox(model.init(jax.random.key(0), **T.dummy_inputs(config))["params"])
    layer = T.unstack_layers(params)["decoder"]["layer_0"]
    assert "mlp" not in layer and "pre_mlp_norm" not in layer and "self_attention" in layer
    tokens = jax.random.randint(jax.random.key(1), (1, 12), 0, config.vocab_size)
    changed = tokens.at[0, 8].set((tokens[0, 8] + 1) % config.vocab_size)
    a, b = model.apply({"params": params}, tokens), model.apply({"params": params}, changed)
    assert jnp.allclose(a[0, :8], b[0, :8]) and not jnp.allclose(a[0, 8:], b[0, 8:])


SCAN_CASES = {
    "gpt2": FAMILIES["gpt2"],
    "llama": FAMILIES["llama"],
    # Period 3 (two local layers, one global) over 7 layers: two scanned periods + 1 unrolled.
    "gemma3_remainder": T.preset(
        "gemma3",
        **{**T.TINY, "num_layers": 7},
        num_kv_heads=1,
        head_dim=8,
        sliding_window=3,
        global_every=3,
    ),
    "t5": SEQ2SEQ["t5"],
}


@pytest.mark.parametrize("name", slow_except(sorted(SCAN_CASES), "gpt2"))
def test_scanned_layers_equal_unrolled_layers(name):
    """nn.scan over layers (and over Gemma 3's local/global period), with every remat policy,
    computes what the unrolled stack computes; the parameters convert both ways exactly."""
    unrolled = dataclasses.replace(SCAN_CASES[name], scan_layers=False)
    model, params = init(unrolled)
    inputs = T.dummy_inputs(unrolled, 2, 10)
    inputs = {k: random_tokens(v.shape, unrolled.vocab_size, 3) for k, v in inputs.items()}

    def loss(model, params):
        return jnp.sum(jnp.sin(model.apply({"params": params}, **inputs)))

    want, want_grad = jax.value_and_grad(loss, argnums=1)(model, params)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want_grad))
    for remat in ("none", "dots_saveable", "full"):
        scanned = dataclasses.replace(unrolled, scan_layers=True, remat=remat)
        stacked = T.to_layout(params, scanned)
        assert T.scanned_period(stacked) == scanned.layer_period
        abstract = jax.eval_shape(lambda s=scanned: init(s)[1])
        assert jax.tree.structure(abstract) == jax.tree.structure(stacked)
        jax.tree.map(np.testing.assert_array_equal, T.unstack_layers(stacked), params)
        got, got_grad = jax.value_and_grad(loss, argnums=1)(T.build_model(scanned), stacked)
        # Measured: values to 6e-7 relative, gradients to 7e-7 of their largest entry.
        np.testing.assert_allclose(got, want, rtol=6e-6)
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=7e-6 * scale),
            T.unstack_layers(got_grad),
            want_grad,
        )


@pytest.mark.parametrize("shape", [(64, 128, 256), (3, 1001, 7)])
def test_dropout_drops_the_rate_and_keeps_the_expectation(shape):
    """16-bit dropout: the dropped fraction is the rate (within 5 standard deviations), kept
    elements are scaled by exactly 1 / (1 - rounded rate), odd last axes work, and the mask
    is a pure function of the key."""
    from lm.models.layers import DROPOUT_BITS, dropout

    rate = 0.2
    x = jnp.ones(shape, jnp.float32)
    y = np.asarray(dropout(x, rate, jax.random.key(1)))
    levels = 1 << DROPOUT_BITS
    kept_scale = levels / (levels - round(rate * levels))
    assert set(np.unique(y)) == {0.0, np.float32(kept_scale)}
    n = y.size
    dropped = (y == 0).mean()
    assert abs(dropped - rate) < 5 * np.sqrt(rate * (1 - rate) / n)
    np.testing.assert_array_equal(y, np.asarray(dropout(x, rate, jax.random.key(1))))
    assert (y != np.asarray(dropout(x, rate, jax.random.key(2)))).mean() > 0.1
    # Neighbouring elements (the two halves of one random word) are independent.
    flat = (y.reshape(-1)[: n // 2 * 2].reshape(-1, 2) == 0).astype(np.float64)
    both = flat.prod(axis=1).mean()
    assert abs(both - rate**2) < 5 * np.sqrt(rate**2 * (1 - rate**2) / len(flat))


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: nn.Dense(7), (2, 5, 8)),
        (lambda: nn.DenseGeneral((3, 4)), (2, 5, 8)),
        (lambda: nn.DenseGeneral(6, axis=(-2, -1)), (2, 5, 3, 4)),
    ],
)
def test_kernel_dot_general_equals_lax_dot_general(make, shape):
    """The dense layers' dot_general (kernel gradient as x^T g) gives JAX's values and
    gradients; other contractions are refused."""
    from lm.models.layers import kernel_dot_general

    x = jax.random.normal(jax.random.key(0), shape)
    plain = make()
    ours = plain.clone(dot_general=kernel_dot_general)
    params = plain.init(jax.random.key(1), x)

    def loss(p, x, module):
        return jnp.sum(jnp.sin(module.apply(p, x)))

    np.testing.assert_allclose(ours.apply(params, x), plain.apply(params, x), rtol=1e-6)
    want = jax.grad(loss, argnums=(0, 1))(params, x, plain)
    got = jax.grad(loss, argnums=(0, 1))(params, x, ours)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="trailing axes"):
        kernel_dot_general(x, x, (((0,), (0,)), ((), ())))


@pytest.mark.parametrize(
    "remat, redrawn", [("dots_saveable", False), ("none", False), ("full", True)]
)
def test_backward_pass_redraws_dropout_bits_only_under_full_remat(remat, redrawn):
    """dots_saveable keeps dropout's keep masks (named dropout_keep): the gradient's program
    draws random bits exactly where the forward pass does; `full` remat draws them again."""
    config = T.preset(
        "gpt2",
        d_model=32,
        num_layers=2,
        num_heads=2,
        mlp_dim=64,
        vocab_size=50,
        max_len=16,
        dropout=0.1,
        attention_dropout=0.1,
        remat=remat,
    )
    model, tokens = T.build_model(config), jnp.zeros((2, 16), jnp.int32)
    params = model.init(jax.random.key(0), tokens)["params"]

    def loss(p):
        rngs = {"dropout": jax.random.key(1)}
        return model.apply({"params": p}, tokens, deterministic=False, rngs=rngs).sum()

    forward = str(jax.make_jaxpr(loss)(params)).count("random_bits")
    backward = str(jax.make_jaxpr(jax.grad(loss))(params)).count("random_bits")
    assert forward >= 4  # residual, attention-weight and MLP dropout of the scanned layer
    assert (backward > forward) == redrawn, (forward, backward)
