"""Generation: cached greedy equals step-by-step argmax of full forwards; padding; sampling."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm import decode
from lm.models import transformer as T

from tests import slow_except


@pytest.fixture(scope="module", params=slow_except(["gpt2", "llama"], "gpt2"))
def model_and_params(request):
    config = T.preset(
        request.param, **T.TINY, **({"num_kv_heads": 2} if request.param == "llama" else {})
    )
    model = T.build_model(config)
    params = nn.meta.unbox(model.init(jax.random.key(0), **T.dummy_inputs(config))["params"])
    return model, params


def reference_greedy(model, params, prompt, n):
    tokens = list(prompt)
    for _ in range(n):
        logits = model.apply({"params": params}, jnp.array([tokens]))
        tokens.append(int(jnp.argmax(logits[0, -1])))
    return tokens[len(prompt) :]


def test_greedy_matches_full_recomputation_with_ragged_prompts(model_and_params):
    model, params = model_and_params
    prompts = [[5, 9, 3, 7, 11], [4, 2], [8]]
    out = decode.generate(model, params, prompts, max_new_tokens=6)
    for prompt, got in zip(prompts, out, strict=True):
        assert got == reference_greedy(model, params, prompt, 6)


def test_sampling_is_reproducible_and_seed_dependent(model_and_params):
    model, params = model_and_params
    kwargs = dict(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.95)
    a = decode.generate(model, params, [[1, 2, 3]] * 2, seed=1, **kwargs)
    b = decode.generate(model, params, [[1, 2, 3]] * 2, seed=1, **kwargs)
    c = decode.generate(model, params, [[1, 2, 3]] * 2, seed=2, **kwargs)
    assert a == b and a != c


def test_top_k_one_is_greedy():
    logits = jax.random.normal(jax.random.key(0), (4, 50))
    sampled = decode.sample_logits(logits, jax.random.key(1), temperature=1.0, top_k=1)
    np.testing.assert_array_equal(sampled, jnp.argmax(logits, -1))
    nucleus = decode.sample_logits(logits * 100, jax.random.key(1), temperature=1.0, top_p=0.5)
    np.testing.assert_array_equal(nucleus, jnp.argmax(logits, -1))


def test_eos_stops_and_length_guard(model_and_params):
    model, params = model_and_params
    full = decode.generate(model, params, [[3, 4]], max_new_tokens=8)[0]
    eos = full[2]
    cut = decode.generate(model, params, [[3, 4]], max_new_tokens=8, eos_id=eos)[0]
    assert cut == full[: full.index(eos)]
    if model.config.position in ("learned", "rotary"):
        with pytest.raises(ValueError, match="64-token context"):
            decode.generate(model, params, [[1] * 60], max_new_tokens=10)


SOURCES = [[5, 6, 7, 8], [9, 10]]


@pytest.fixture(scope="module")
def seq2seq_model_and_params():
    config = T.preset("t5", **T.TINY, head_dim=8)
    model = T.build_model(config)
    return model, nn.meta.unbox(model.init(jax.random.key(0), **T.dummy_inputs(config))["params"])


@pytest.mark.slow
def test_seq2seq_greedy_matches_teacher_forced_argmax(seq2seq_model_and_params):
    model, params = seq2seq_model_and_params
    sources = SOURCES
    out = decode.generate_seq2seq(model, params, sources, max_new_tokens=5, bos_id=2, eos_id=-1)
    for src, got in zip(sources, out, strict=True):
        tokens = [2]
        for _ in range(5):
            logits = model.apply(
                {"params": params}, jnp.array([tokens]), encoder_inputs=jnp.array([src])
            )
            tokens.append(int(jnp.argmax(logits[0, -1])))
        assert got == tokens[1:]


def sequence_logprob(model, params, prompt, continuation):
    tokens = jnp.array([list(prompt) + list(continuation)])
    logp = jax.nn.log_softmax(model.apply({"params": params}, tokens)[0], axis=-1)
    start = len(prompt) - 1
    return float(sum(logp[start + i, t] for i, t in enumerate(continuation)))


def test_beam_of_one_is_greedy(model_and_params):
    model, params = model_and_params
    prompts = [[5, 9, 3, 7, 11], [4, 2], [8]]
    greedy = decode.generate(model, params, prompts, max_new_tokens=6)
    beam, _ = decode.beam_search(model, params, prompts, max_new_tokens=6, beams=1)
    assert beam == greedy


def test_beam_search_scores_are_exact_and_beat_greedy(model_and_params):
    model, params = model_and_params
    prompts = [[5, 9, 3], [4, 2, 6, 1]]
    greedy = decode.generate(model, params, prompts, max_new_tokens=5)
    beam, scores = decode.beam_search(
        model, params, prompts, max_new_tokens=5, beams=4, length_penalty_alpha=0.0
    )
    for prompt, g, b, score in zip(prompts, greedy, beam, scores, strict=True):
        assert score == pytest.approx(sequence_logprob(model, params, prompt, b), abs=1e-4)
        assert score >= sequence_logprob(model, params, prompt, g) - 1e-4


def test_beam_search_stops_finished_beams_at_eos(model_and_params):
    model, params = model_and_params
    greedy = decode.generate(model, params, [[3, 4]], max_new_tokens=8)[0]
    eos = greedy[1]
    beam, _ = decode.beam_search(model, params, [[3, 4]], max_new_tokens=8, beams=1, eos_id=eos)
    assert beam[0] == greedy[: greedy.index(eos)]


@pytest.mark.slow
def test_seq2seq_beam_search_of_one_is_greedy_and_wider_beams_score_higher(
    seq2seq_model_and_params,
):
    model, params = seq2seq_model_and_params
    sources = SOURCES
    greedy = decode.generate_seq2seq(model, params, sources, max_new_tokens=5, bos_id=2, eos_id=-1)
    one, _ = decode.beam_search_seq2seq(
        model, params, sources, max_new_tokens=5, bos_id=2, eos_id=-1, beams=1
    )
    assert one == greedy
    wide, scores = decode.beam_search_seq2seq(
        model,
        params,
        sources,
        max_new_tokens=5,
        bos_id=2,
        eos_id=-1,
        beams=4,
        length_penalty_alpha=0.0,
    )
    for src, g, w, score in zip(sources, greedy, wide, scores, strict=True):

        def logprob(out, src=src):
            tokens = jnp.array([[2] + out[:-1]])
            logp = jax.nn.log_softmax(
                model.apply({"params": params}, tokens, encoder_inputs=jnp.array([src]))[0]
            )
            return float(sum(logp[i, t] for i, t in enumerate(out)))

        assert score == pytest.approx(logprob(w), abs=1e-4)
        assert score >= logprob(g) - 1e-4


def test_cut_at_stop_uses_the_earliest_stop():
    assert decode.cut_at_stop("Hello.\nWorld\n\nmore", ["\n\n", "\n"]) == "Hello."
    assert decode.cut_at_stop("no stop here", ["###", ""]) == "no stop here"
    assert decode.cut_at_stop("a###b", ["###"]) == "a"


def test_unrolled_inference_layout_decodes_the_same(model_and_params):
    """for_inference(unroll_layers=True) (what sample and the decode benchmark use) converts
    the scanned parameters and gives the same logits and greedy tokens."""
    model, params = model_and_params
    assert model.config.scan_layers
    unrolled, unrolled_params = T.for_inference(model.config, params, unroll_layers=True)
    assert not unrolled.config.scan_layers and "layer_0" in unrolled_params["decoder"]
    tokens = jnp.array([[5, 9, 3, 7, 11]])
    np.testing.assert_allclose(
        unrolled.apply({"params": unrolled_params}, tokens),
        model.apply({"params": params}, tokens),
        rtol=1e-5,
        atol=1e-5,
    )
    prompts = [[5, 9, 3, 7, 11], [4, 2]]
    assert decode.generate(unrolled, unrolled_params, prompts, max_new_tokens=6) == (
        decode.generate(model, params, prompts, max_new_tokens=6)
    )
