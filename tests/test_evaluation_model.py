"""The harness model interface: exact log-likelihoods, batch-size invariance, rolling windows."""

import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm import decode
from lm.evaluation import LanguageModel
from lm.evaluation import model as model_mod
from lm.evaluation.model import bucket_length
from lm.models import transformer as T


class CharTokenizer:
    """One id per character (a-z and space), enough to test the bookkeeping."""

    bos_id, eos_id, pad_id, add_bos = 1, 2, 0, True
    alphabet = " abcdefghijklmnopqrstuvwxyz"

    def encode(self, text):
        return [3 + self.alphabet.index(c) for c in text]

    def decode(self, ids):
        return "".join(self.alphabet[i - 3] for i in ids if i >= 3)


@pytest.fixture(scope="module")
def lm():
    config = T.preset("llama", **T.TINY, num_kv_heads=2)
    model = T.build_model(config)
    params = nn.meta.unbox(model.init(jax.random.key(0), **T.dummy_inputs(config))["params"])
    return model, params


def reference_logprob(model, params, ids, n_scored):
    """Sum of log p over the last n_scored tokens of ids, from one unpadded forward pass."""
    logits = model.apply({"params": params}, jnp.asarray([ids[:-1]]))[0]
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    picked = logprobs[jnp.arange(len(ids) - 1), jnp.asarray(ids[1:])]
    return float(picked[-n_scored:].sum()), bool(
        (logits.argmax(-1)[-n_scored:] == jnp.asarray(ids[1:])[-n_scored:]).all()
    )


REQUESTS = [
    ("the cat sat on the", " mat"),
    ("a", " b c"),
    ("hello there ", "friend"),
    ("", "start of text"),
    ("one two three four five six seven", " eight"),
]


def test_loglikelihood_equals_an_unpadded_forward_pass(lm):
    model, params = lm
    tok = CharTokenizer()
    evaluator = LanguageModel(model, params, tok, batch_size=4)
    for (context, continuation), (logprob, greedy) in zip(
        REQUESTS, evaluator.loglikelihood(REQUESTS), strict=True
    ):
        context_ids, continuation_ids = evaluator.encode_pair(context, continuation)
        expected, expected_greedy = reference_logprob(
            model, params, context_ids + continuation_ids, len(continuation_ids)
        )
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == expected_greedy


def test_trailing_context_spaces_move_to_the_continuation(lm):
    model, params = lm
    evaluator = LanguageModel(model, params, CharTokenizer())
    context, continuation = evaluator.encode_pair("hello there ", "friend")
    tok = CharTokenizer()
    assert context == [tok.bos_id] + tok.encode("hello there")
    assert continuation == tok.encode(" friend")


def test_results_do_not_depend_on_batch_size(lm):
    model, params = lm
    requests = REQUESTS * 4
    one = LanguageModel(model, params, CharTokenizer(), batch_size=1).loglikelihood(requests)
    sixteen = LanguageModel(model, params, CharTokenizer(), batch_size=16).loglikelihood(requests)
    assert [g for _, g in one] == [g for _, g in sixteen]
    np.testing.assert_allclose([p for p, _ in one], [p for p, _ in sixteen], atol=1e-5)


def test_rolling_loglikelihood_windows(lm):
    model, params = lm
    tok = CharTokenizer()
    text = "the quick brown fox jumps over the lazy dog"
    ids = [tok.bos_id] + tok.encode(text)
    whole = LanguageModel(model, params, tok, max_length=64).loglikelihood_rolling([text])[0]
    assert whole == pytest.approx(reference_logprob(model, params, ids, len(ids) - 1)[0], abs=1e-4)
    # Windows of 16 predictions: disjoint, each conditioned on the tokens inside it; the last,
    # shorter window keeps a full 16-token context.
    windowed = LanguageModel(model, params, tok, max_length=16).loglikelihood_rolling([text])[0]
    expected, done = 0.0, 0
    while done < len(ids) - 1:
        count = min(16, len(ids) - 1 - done)
        end = done + count + 1
        expected += reference_logprob(model, params, ids[max(0, end - 17) : end], count)[0]
        done += count
    assert windowed == pytest.approx(expected, abs=1e-4)
    assert windowed != pytest.approx(whole, abs=1e-3)  # the windows really cut the context


def test_generate_until_is_greedy_decoding_cut_at_stop(lm):
    model, params = lm
    tok = CharTokenizer()
    evaluator = LanguageModel(model, params, tok, batch_size=2)
    requests = [("the cat", ["z"], 12), ("a b", [], 12), ("hello", ["q"], 5)]
    outs = evaluator.generate_until(requests)
    for (context, stops, n), out in zip(requests, outs, strict=True):
        ids = decode.generate(
            model, params, [[tok.bos_id] + tok.encode(context)], max_new_tokens=n, eos_id=tok.eos_id
        )[0]
        assert out == decode.cut_at_stop(tok.decode(ids), stops)


def test_buckets_are_few():
    assert [bucket_length(n, 1024) for n in (1, 31, 32, 33, 48, 49, 96, 100, 700, 900, 5000)] == [
        32,
        32,
        32,
        48,
        48,
        64,
        96,
        112,
        768,
        1024,
        1024,
    ]


def test_imported_smollm2_scores_like_transformers():
    """log p(first greedy token | prompt) from transformers' logits in the GGUF goldens."""
    from lm.convert import load_pretrained

    golden = np.load(pathlib.Path(__file__).parent / "goldens" / "gguf" / "smollm2.npz")
    pretrained = load_pretrained("smollm2")
    evaluator = LanguageModel(
        T.build_model(pretrained.config), pretrained.params, pretrained.tokenizer, batch_size=4
    )
    requests, expected = [], []
    for i, prompt in enumerate(golden["prompts"]):
        first = int(golden["greedy"][i][0])
        requests.append((str(prompt), pretrained.tokenizer.decode([first])))
        column = int(np.flatnonzero(golden["vocab_ids"] == first)[0])
        expected.append(golden["logits"][i][-1][column] - golden["logsumexp"][i][-1])
    results = evaluator.loglikelihood(requests)
    checked = 0
    for (context, continuation), (logprob, greedy), want in zip(
        requests, results, expected, strict=True
    ):
        ids = evaluator.encode_pair(context, continuation)[1]
        if len(ids) == 1:  # the continuation re-encodes to that one token
            assert logprob == pytest.approx(float(want), abs=1e-3) and greedy
            checked += 1
    assert checked >= 3


MANY = [  # multiple-choice groups (one tree each) and single requests of varied lengths
    *[("which animal says moo", c) for c in (" cow", " a cat", " the big dog", " owl")],
    *[("pick a colour ", c) for c in ("red", "green", "blue")],
    ("a", " b"),
    ("the quick brown fox jumps over the lazy dog", " and runs away"),
    ("", "an empty context"),
    *[("z" * n, " yes") for n in range(1, 40, 7)],
]


@pytest.mark.parametrize(
    "name, overrides",
    [
        ("llama", dict(num_kv_heads=2)),
        ("gpt2", {}),  # learned positions: each packed tree restarts at position 0
        ("gemma3", dict(num_kv_heads=1, head_dim=8, sliding_window=8, global_every=2)),
    ],
)
def test_packing_trees_into_rows_keeps_each_requests_loglikelihood(name, overrides):
    """Requests packed several to a row (any row length, any batch size) score exactly as each
    request alone in an unpadded forward pass: the mask keeps trees apart and positions
    restart with each tree (Gemma: scaled embeddings, sliding window)."""
    config = T.preset(name, **{**T.TINY, **overrides})
    model = T.build_model(config)
    params = nn.meta.unbox(model.init(jax.random.key(1), **T.dummy_inputs(config))["params"])
    tok = CharTokenizer()
    # The reference: each request alone, right-padded to max_len (causal: padding after the
    # request changes nothing before it), so that one compiled forward pass serves them all.
    forward = jax.jit(lambda tokens: model.apply({"params": params}, tokens))
    expected = []
    for context, continuation in MANY:
        context_ids, ids = LanguageModel(model, params, tok).encode_pair(context, continuation)
        whole = context_ids + ids
        padded = np.zeros((1, config.max_len), np.int32)
        padded[0, : len(whole) - 1] = whole[:-1]
        logits = forward(padded)[0, : len(whole) - 1]
        logprobs = jax.nn.log_softmax(logits, axis=-1)[-len(ids) :]
        wanted = np.asarray(whole[-len(ids) :])
        expected.append(
            (
                float(logprobs[np.arange(len(ids)), wanted].sum()),
                bool((logits[-len(ids) :].argmax(-1) == wanted).all()),
            )
        )
    settings = [(32, 1), (64, 3), (256, 16)] if name == "llama" else [(64, 3)]
    for row_length, batch_size in settings:
        evaluator = LanguageModel(model, params, tok, batch_size=batch_size, row_length=row_length)
        got = evaluator.loglikelihood(MANY)
        np.testing.assert_allclose([p for p, _ in got], [p for p, _ in expected], atol=1e-4)
        assert [g for _, g in got] == [g for _, g in expected]


def test_rows_hold_every_tree_once_within_their_length(lm):
    model, params = lm
    evaluator = LanguageModel(model, params, CharTokenizer(), row_length=48, max_length=64)
    rng = np.random.default_rng(0)
    trees = []
    for i in range(60):
        context = [1] + list(rng.integers(3, 29, int(rng.integers(1, 30))))
        branches = [(list(rng.integers(3, 29, int(rng.integers(1, 6)))), 1)] * int(
            rng.integers(1, 5)
        )
        trees.append(model_mod._Tree(context, branches, [i]))
    rows = evaluator._rows(trees)
    placed = sorted(t for _, members in rows for t in members)
    assert placed == list(range(len(trees)))
    for length, members in rows:
        assert sum(max(trees[t].length, trees[t].num_reads) for t in members) <= length
        assert length in (48, 64)  # row_length, or a longer tree's bucket
    used = sum(trees[t].length for t in placed)
    assert used / sum(length for length, _ in rows) > 0.9  # first fit leaves little padding
