"""lm.inspect: captured attention equals attention recomputed by hand, the residual stream and
log-probs agree with the model's logits, and the per-head scores on hand-built patterns."""

import flax.linen as nn
import jax
import numpy as np
import pytest
from lm import inspect
from lm.models import transformer as T

GPT = T.preset("gpt2", **T.TINY)
LLAMA = T.preset("llama", **T.TINY, num_kv_heads=2)


def init(config, seed=0):
    model = T.build_model(config)
    return nn.meta.unbox(model.init(jax.random.PRNGKey(seed), **T.dummy_inputs(config))["params"])


def layer_norm(x, scale, bias, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def test_layer0_attention_and_residual_equal_a_hand_computation():
    params = init(GPT)
    tokens = np.random.default_rng(0).integers(0, GPT.vocab_size, (2, 12))
    out = inspect.capture(GPT, params, tokens)
    length = tokens.shape[1]
    # The stream entering layer 0: token embedding + learned position embedding.
    embed = np.asarray(params["token_embedding"]["embedding"])[tokens]
    stream = embed + np.asarray(params["decoder"]["position_embedding"])[:length]
    np.testing.assert_allclose(out["residual"][:, 0], stream, rtol=1e-5, atol=1e-6)
    # Layer 0 attention: softmax(q k^T / sqrt(d)) under the causal mask, from the params.
    layer = T.unstack_layers(params)["decoder"]["layer_0"]  # the model scans its layers
    norm = layer["pre_attention_norm"]
    h = layer_norm(stream, np.asarray(norm["scale"]), np.asarray(norm["bias"]), GPT.norm_eps)
    attn_params = layer["self_attention"]
    q = np.einsum("ble,ehd->blhd", h, attn_params["query"]["kernel"]) + attn_params["query"]["bias"]
    k = np.einsum("ble,ehd->blhd", h, attn_params["key"]["kernel"]) + attn_params["key"]["bias"]
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(np.tril(np.ones((length, length), bool)), logits, -np.inf)
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    assert out["attention"].shape == (2, GPT.num_layers, GPT.num_heads, length, length)
    np.testing.assert_allclose(out["attention"][:, 0], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("config", [GPT, LLAMA], ids=["gpt2", "llama-gqa"])
def test_logits_log_probs_and_last_residual_agree_with_the_model(config):
    params = init(config, seed=1)
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (1, 10))
    out = inspect.capture(config, params, tokens)
    model = T.build_model(config)
    np.testing.assert_allclose(
        out["logits"], model.apply({"params": params}, tokens), rtol=1e-5, atol=1e-5
    )
    log_softmax = jax.nn.log_softmax(out["logits"], axis=-1)
    picked = np.take_along_axis(np.asarray(log_softmax)[0, :-1], tokens[0, 1:, None], axis=-1)[:, 0]
    assert np.isnan(out["log_probs"][0, 0])
    np.testing.assert_allclose(out["log_probs"][0, 1:], picked, rtol=1e-5, atol=1e-6)
    # The last stream, through the final norm and the vocabulary projection, gives the logits.
    final = (
        nn.RMSNorm(epsilon=config.norm_eps)
        if config.norm == "rmsnorm"
        else nn.LayerNorm(epsilon=config.norm_eps)
    )
    normed = final.apply({"params": params["decoder"]["final_norm"]}, out["residual"][:, -1])
    projected = model.apply({"params": params}, normed, method=T.DecoderOnly.project)
    np.testing.assert_allclose(projected, out["logits"], rtol=1e-4, atol=1e-4)
    assert out["residual"].shape == (1, config.num_layers + 1, 10, config.d_model)
    weights = out["attention"]
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(weights, k=1) == 0)  # causal


def test_inspect_text_labels_and_scores():
    class Chars:  # a tokenizer: one id per character, bos 1
        bos_id = 1

        def encode(self, text):
            return [ord(c) % 90 + 2 for c in text]

        def decode(self, ids):
            return "".join(chr((i - 2) + 32) if i >= 2 else "" for i in ids)

        def id_to_piece(self, i):
            return f"<{i}>"

    seen = inspect.inspect_text(GPT, init(GPT), Chars(), "ab\nb")
    assert seen.tokens.tolist()[0] == 1 and len(seen.tokens) == 5
    assert seen.labels[0] == "<1>" and len(seen.labels) == 5
    assert seen.attention.shape == (GPT.num_layers, GPT.num_heads, 5, 5)
    scores = seen.scores()
    assert set(scores) == {"induction", "previous_token", "entropy", "first_token"}
    assert all(v.shape == (GPT.num_layers, GPT.num_heads) for v in scores.values())
    with pytest.raises(ValueError, match="max_len"):
        inspect.capture(GPT, init(GPT), np.zeros((1, GPT.max_len + 1), np.int32))


def _pattern(kind, n):
    """[1, 1, n, n] causal attention patterns."""
    a = np.zeros((n, n))
    for t in range(n):
        if kind == "uniform":
            a[t, : t + 1] = 1 / (t + 1)
        elif kind == "sink":
            a[t, 0] = 1
        elif kind == "previous":
            a[t, max(t - 1, 0)] = 1
    return a[None, None]


def test_entropy_and_first_token_scores_on_hand_built_patterns():
    n = 8
    tokens = np.arange(n)[None]
    uniform, sink, previous = (_pattern(k, n) for k in ("uniform", "sink", "previous"))
    np.testing.assert_allclose(
        inspect.attention_entropy(uniform), [np.mean(np.log(np.arange(2, n + 1)))], rtol=1e-6
    )
    np.testing.assert_allclose(inspect.attention_entropy(sink), [0.0], atol=1e-7)
    np.testing.assert_allclose(inspect.first_token_score(sink), [1.0])
    np.testing.assert_allclose(
        inspect.first_token_score(uniform), [np.mean(1 / np.arange(2, n + 1))], rtol=1e-6
    )
    np.testing.assert_allclose(inspect.first_token_score(previous), [1 / (n - 1)])  # only t = 1
    stacked = np.stack([uniform, sink])  # [layers, batch, heads, q, k]
    both = inspect.head_scores(stacked, tokens, names=None)
    assert both["entropy"].shape == (2, 1)


def test_repeated_random_tokens_layout():
    tokens = inspect.repeated_random_tokens(50, 6, batch=3, seed=2, prefix=[1], low=10)
    assert tokens.shape == (3, 13)
    assert np.all(tokens[:, 0] == 1)
    np.testing.assert_array_equal(tokens[:, 1:7], tokens[:, 7:])
    assert tokens[:, 1:].min() >= 10 and tokens.max() < 50


def test_a_copying_pattern_scores_as_induction():
    """On [prefix][A][A], attention from each second-copy token to the token after its first
    occurrence is exactly the induction target."""
    tokens = inspect.repeated_random_tokens(1000, 5, seed=0, prefix=[0])
    n = tokens.shape[1]
    attn = np.zeros((1, 1, n, n))
    for t in range(n):
        attn[0, 0, t, t] = 1.0  # attend to self by default
    for t in range(6, n):
        attn[0, 0, t] = 0
        attn[0, 0, t, t - 5 + 1] = 1.0  # the token after the earlier occurrence
    np.testing.assert_allclose(inspect.induction_score(attn, tokens), [1.0], atol=1e-6)


def test_plots_have_labels_titles_and_colour_bars():
    import matplotlib

    matplotlib.use("Agg")
    seen = inspect.inspect_tokens(GPT, init(GPT), np.arange(2, 10))
    fig = inspect.plot_attention(seen.attention[0, 1], seen.labels, title="layer 0, head 1")
    heat, bar = fig.axes
    assert heat.get_title() == "layer 0, head 1" and "query" in heat.get_ylabel()
    assert [t.get_text() for t in heat.get_xticklabels()] == seen.labels
    assert bar.get_ylabel() == "attention weight"
    grid = inspect.plot_layer_heads(seen.attention[1], seen.labels, layer=1, scores=np.arange(4.0))
    assert sum(ax.get_title().startswith("head") for ax in grid.axes) == GPT.num_heads
    scores = seen.scores()
    assert inspect.plot_head_scores(scores["induction"]).axes[0].get_xlabel() == "head"
    assert (
        inspect.plot_log_probs(seen.labels, seen.log_probs)
        .axes[0]
        .get_ylabel()
        .startswith("-log p")
    )
    best = inspect.top_heads(np.array([[0.1, 0.9], [0.7, 0.2]]), k=2)
    assert best == [(0, 1, 0.9), (1, 0, 0.7)]


def test_encoder_decoder_capture_gives_all_three_attentions():
    config = T.preset("t5", **T.TINY)
    params = init(config, seed=2)
    rng = np.random.default_rng(2)
    source, target = (
        rng.integers(2, config.vocab_size, (2, 9)),
        rng.integers(2, config.vocab_size, (2, 6)),
    )
    out = inspect.capture(config, params, target, encoder_tokens=source)
    layers, heads = config.num_layers, config.num_heads
    assert out["encoder_attention"].shape == (2, config.num_encoder_layers or layers, heads, 9, 9)
    assert out["attention"].shape == (2, layers, heads, 6, 6)
    assert out["cross_attention"].shape == (2, layers, heads, 6, 9)
    for key in ("encoder_attention", "attention", "cross_attention"):
        np.testing.assert_allclose(out[key].sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(out["attention"], k=1) == 0)  # the decoder is causal, the encoder not
    assert np.any(np.triu(out["encoder_attention"], k=1) > 0)
    model = T.build_model(config)
    np.testing.assert_allclose(
        out["logits"],
        model.apply({"params": params}, target, encoder_inputs=source),
        rtol=1e-5,
        atol=1e-5,
    )
    with pytest.raises(ValueError, match="encoder_tokens"):
        inspect.capture(config, params, target)
