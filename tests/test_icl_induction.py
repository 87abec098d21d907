"""Induction-head scores on hand-built attention, the repeated-span data, and a tiny run."""

import json
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm.icl import induction, scores
from lm.models.transformer import ModelConfig, build_model

ROOT = pathlib.Path(__file__).resolve().parents[1]


def repeated(batch=3, span=5, vocab=50, seed=0):
    """[A][A] with distinct tokens inside A, so every second-copy token has one earlier match."""
    rng = np.random.default_rng(seed)
    a = np.stack([rng.permutation(vocab)[:span] for _ in range(batch)])
    return np.concatenate([a, a], axis=1)


def pattern(tokens, heads, where):
    """attn [batch, heads, L, L] with weight 1 on where(b, t) (or uniform if it returns None)."""
    b, n = tokens.shape
    attn = np.zeros((b, heads, n, n), np.float32)
    for i in range(b):
        for t in range(n):
            k = where(i, t)
            if k is None:
                attn[i, :, t, : t + 1] = 1.0 / (t + 1)
            else:
                attn[i, :, t, k] = 1.0
    return attn


def induction_target(tokens, i, t):
    earlier = [s for s in range(t) if tokens[i, s] == tokens[i, t]]
    return earlier[-1] + 1 if earlier else 0  # no earlier occurrence: look at the first token


def test_perfect_induction_pattern():
    tokens = repeated()
    attn = pattern(tokens, 2, lambda i, t: induction_target(tokens, i, t))
    np.testing.assert_allclose(scores.induction_score(attn, tokens), [1.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(
        scores.induction_score(attn, tokens, occurrence="last"), 1.0, atol=1e-6
    )
    # only the first token of the second copy attends to position t - 1 (the end of copy one)
    prev = scores.previous_token_score(attn, tokens)
    assert np.all(np.asarray(prev) < 0.15)


def test_perfect_previous_token_pattern():
    tokens = repeated()
    attn = pattern(tokens, 3, lambda i, t: max(t - 1, 0))
    np.testing.assert_allclose(scores.previous_token_score(attn), 1.0, atol=1e-6)
    # s + 1 == t - 1 only if the token two back is the same: never with distinct tokens here
    np.testing.assert_allclose(scores.induction_score(attn, tokens), 0.0, atol=1e-6)


def test_uniform_attention_fractions():
    tokens = repeated(batch=2, span=4)
    n = tokens.shape[1]
    attn = pattern(tokens, 1, lambda i, t: None)
    np.testing.assert_allclose(
        scores.previous_token_score(attn), [np.mean([1 / (t + 1) for t in range(1, n)])], rtol=1e-6
    )
    # in [A][A] with distinct A, the queries with an earlier match are t = span..2 span - 1, one
    # target each
    expected = np.mean([1 / (t + 1) for t in range(4, 8)])
    np.testing.assert_allclose(scores.induction_score(attn, tokens), [expected], rtol=1e-6)


def test_induction_all_vs_last_occurrence():
    tokens = np.array([[1, 2, 1, 3, 1]])
    # the last query (token 1, earlier at 0 and 2) splits its attention over keys 1 and 3
    attn = np.zeros((1, 1, 5, 5), np.float32)
    attn[0, 0, np.arange(5), 0] = 1.0
    attn[0, 0, 2] = [0, 1, 0, 0, 0]
    attn[0, 0, 4] = [0, 0.5, 0, 0.5, 0]
    targets = scores.induction_targets(tokens)
    assert np.asarray(targets)[0, 4].tolist() == [0, 1, 0, 1, 0]
    np.testing.assert_allclose(scores.induction_score(attn, tokens), [1.0])
    np.testing.assert_allclose(scores.induction_score(attn, tokens, occurrence="last"), [0.75])


def test_scores_keep_leading_axes():
    tokens = repeated()
    attn = pattern(tokens, 4, lambda i, t: induction_target(tokens, i, t))
    stacked = np.stack([attn, pattern(tokens, 4, lambda i, t: max(t - 1, 0))])
    assert scores.induction_score(stacked, tokens).shape == (2, 4)
    np.testing.assert_allclose(scores.previous_token_score(stacked)[1], 1.0, atol=1e-6)


def test_loss_ratio_and_in_context_score():
    loss = np.full((2, 12), 4.0, np.float32)
    loss[:, 0] = np.nan
    loss[:, 6] = 4.0  # first token of the second copy: unpredictable, skipped by default
    loss[:, 7:12] = 0.4
    segments = np.asarray(scores.copy_segments(12, 6))
    assert segments.tolist() == [1] * 6 + [2] * 6
    np.testing.assert_allclose(scores.repeat_loss_ratio(loss, 6), 0.1, rtol=1e-6)
    np.testing.assert_allclose(
        scores.repeat_loss_ratio(loss, np.broadcast_to(segments, (2, 12))), 0.1, rtol=1e-6
    )
    np.testing.assert_allclose(
        scores.repeat_loss_ratio(loss, 6, skip_first=0), (4.0 + 5 * 0.4) / 6 / 4.0, rtol=1e-6
    )
    first, second = scores.copy_losses(loss, 6)
    np.testing.assert_allclose([first, second], [4.0, 0.4], rtol=1e-6)
    np.testing.assert_allclose(scores.in_context_score(loss, early=2, late=10), -3.6, rtol=1e-6)
    np.testing.assert_allclose(scores.in_context_score(loss), 0.4 - 4.0, rtol=1e-6)  # 1 and 11
    with pytest.raises(ValueError, match="early"):
        scores.in_context_score(loss, early=0)


def test_per_token_loss_alignment():
    tokens = jnp.array([[0, 1, 2]])
    logits = jnp.log(jnp.array([[[0.5, 0.5, 0.0], [0.0, 0.25, 0.75]]]) + 1e-30)
    loss = np.asarray(scores.per_token_loss(logits, tokens))
    assert np.isnan(loss[0, 0])
    np.testing.assert_allclose(loss[0, 1:], [np.log(2), -np.log(0.75)], rtol=1e-5)


def test_repeated_spans_sampler():
    def draw(seed):
        return induction.repeated_spans(
            np.random.default_rng(seed), 64, 40, 12, min_span=4, max_gap=5, vocab=30
        )

    batch = draw(0)
    tokens, seg = batch["tokens"], batch["segments"]
    assert tokens.shape == seg.shape == (64, 40) and tokens.dtype == np.int32
    assert tokens.min() >= 0 and tokens.max() < 30
    for b in range(64):
        first, second, n = batch["first"][b], batch["second"][b], batch["span_len"][b]
        assert 4 <= n <= 12 and 0 <= second - first - n <= 5 and second + n <= 40
        np.testing.assert_array_equal(tokens[b, first : first + n], tokens[b, second : second + n])
        assert (seg[b] == 1).sum() == n and (seg[b] == 2).sum() == n
        assert np.all(seg[b, first : first + n] == 1) and np.all(seg[b, second : second + n] == 2)
    assert len(set(batch["span_len"].tolist())) > 3  # the distance between copies varies
    again, other = draw(0), draw(1)
    np.testing.assert_array_equal(again["tokens"], tokens)
    assert not np.array_equal(other["tokens"], tokens)
    probe = induction.repeated_spans(
        np.random.default_rng(0), 4, 16, 8, token_ids=[3, 5, 7], start=0
    )
    np.testing.assert_array_equal(probe["tokens"][:, :8], probe["tokens"][:, 8:])
    assert set(np.unique(probe["tokens"])) <= {3, 5, 7}


def test_attention_weights_from_a_real_model():
    config = ModelConfig(
        vocab_size=20,
        d_model=16,
        num_layers=3,
        num_heads=2,
        mlp_dim=0,
        max_len=12,
        capture_attention=True,
    )
    model = build_model(config)
    tokens = jnp.asarray(repeated(batch=2, span=5, vocab=20))
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)["params"])
    _, state = model.apply({"params": params}, tokens, mutable=["intermediates"])
    attn = scores.attention_weights(state["intermediates"])
    assert attn.shape == (3, 2, 2, 10, 10)
    np.testing.assert_allclose(attn.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.asarray(attn)[..., np.triu_indices(10, 1)[0], np.triu_indices(10, 1)[1]] == 0)
    np.testing.assert_array_equal(scores.attention_weights(state), attn)  # whole dict accepted
    assert scores.induction_score(attn, tokens).shape == (3, 2)
    with pytest.raises(ValueError, match="capture_attention"):
        scores.attention_weights({})


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="icl.spam"):
        induction.InductionConfig.from_dict({"spam": 1})
    with pytest.raises(ValueError, match="model.d_modle"):
        induction.experiment(model={"d_modle": 3})
    with pytest.raises(ValueError, match="span"):
        induction.InductionConfig(length=16, span=9)
    with pytest.raises(ValueError, match="icl.steps"):  # steps are the train section's
        induction.experiment(icl={"steps": 5})
    config = induction.experiment(train={"steps": 5})
    config.icl.bogus = 1
    with pytest.raises(ValueError, match="icl.bogus"):
        induction.build_configs(config)


@pytest.mark.slow
def test_tiny_run_writes_metrics_plots_summary(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "induction_heads", ROOT / "experiments" / "induction_heads.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for arg in ("two_layer", "one_layer", "text"):
        induction.build_configs(module.get_config(arg))  # every config validates
    config = module.get_config("tiny")
    summary = induction.run(config, tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    probes = [m for m in lines if "probe/repeat_loss_ratio" in m]
    assert [m["step"] for m in probes] == [0, 3, 6]
    assert "probe/induction/layer1/head0" in probes[-1]
    assert "probe/previous_token/layer0/head1" in probes[-1]
    assert "probe/in_context_score" in probes[-1]
    assert any("loss" in m for m in lines)
    for name in ("induction_scores.png", "in_context_score.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["max_induction"].keys() == {"layer0", "layer1"}
    assert 0 <= saved["max_induction"]["layer1"]["head"] < 2
    assert summary["repeat_loss_ratio"] == pytest.approx(saved["repeat_loss_ratio"])
    assert (tmp_path / "checkpoints" / "6").is_dir()
    # A finished run only rewrites its plots and summary: no step is trained again.
    again = induction.run(config, tmp_path)
    assert again["repeat_loss_ratio"] == summary["repeat_loss_ratio"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == len(lines)


@pytest.mark.slow
def test_text_run_on_a_small_corpus(tmp_path, monkeypatch):
    words = "the king queen lord lady sword crown night day love death".split()
    rng = np.random.default_rng(0)

    def works():
        def text(n):
            return " ".join(rng.choice(words, n)) + "\n"

        return {"train": [text(400), text(400)], "validation": [text(200)], "test": [text(50)]}

    monkeypatch.setattr(induction, "shakespeare_works", works)
    config = induction.experiment(
        icl=dict(
            data="text",
            length=24,
            batch_size=8,
            probe_batches=1,
        ),
        train=dict(steps=2, eval_every=2, log_every=1, progress=False),
        model=dict(d_model=16, num_heads=2),
    )
    summary = induction.run(config, tmp_path)
    chars = json.loads((tmp_path / "characters.json").read_text())["characters"]
    assert set(chars) == set("".join(words) + " \n")
    resolved = json.loads((tmp_path / "config.json").read_text())
    assert resolved["model"]["vocab_size"] == len(chars) + 1  # + the unknown character
    assert {"text_loss", "text_in_context_score", "text_repeat_loss_ratio"} <= summary.keys()
    assert summary["max_text_induction"].keys() == {"layer0", "layer1"}
    last = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert "probe/text_induction/layer1/head1" in last
