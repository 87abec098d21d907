"""Autoregressive generation with the KV cache: greedy and temperature/top-k/top-p sampling.

Prompts of different lengths are left-padded; padded slots are masked out of attention
and positions count only real tokens, so each row decodes as if it were alone. The whole
generation (prefill plus a `lax.scan` over new tokens) is one jit-compiled program.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm.models.transformer import DecoderOnly, EncoderDecoder, gather_batch, init_cache
from lm.utils import first_argmax


def sample_logits(logits, rng, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0):
    """Draws one token per row. logits [batch, vocab] float32 -> [batch] int32.

    temperature 0 is greedy (argmax). top_k keeps the k most likely tokens; top_p keeps the
    smallest set whose probability reaches p (nucleus sampling).
    """
    if temperature == 0.0:
        return first_argmax(logits)
    logits = logits / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # The smallest logit still inside the nucleus: keep everything at or above it.
        cutoff_index = jnp.sum(cumulative < top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0, length: int | None = None):
    """-> tokens [batch, L], valid [batch, L] bool, positions [batch, L]; L = `length` (a
    bucket, so that a caller compiles few shapes) or the longest prompt."""
    length = max(length or 0, max(len(p) for p in prompts))
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    valid = np.zeros((len(prompts), length), bool)
    for i, p in enumerate(prompts):
        if len(p):
            tokens[i, length - len(p) :] = p
            valid[i, length - len(p) :] = True
    positions = np.maximum(np.cumsum(valid, axis=1) - 1, 0).astype(np.int32)
    return tokens, valid, positions


def check_prompts(model, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Non-empty prompts that, with the new tokens, fit the model's context: its learned
    positions, or the length a rotary model was trained for (`max_len`)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. the tokenizer's bos id)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    limit = context_limit(model.config)
    longest = max(len(p) for p in prompts)
    if limit is not None and longest + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({longest}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"{limit}-token context (model.max_len); shorten the prompt or ask for fewer tokens"
        )


def check_sampling(config, temperature: float, top_k: int, top_p: float) -> None:
    """Sampling settings that make sense for a model of `config` (ValueError naming the one that
    does not)."""
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if not 0 <= top_k <= config.vocab_size:
        raise ValueError(
            f"top_k={top_k} must be between 0 (all tokens) and the model's vocabulary size, "
            f"{config.vocab_size}"
        )
    if not 0 <= top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in [0, 1] (1 = all tokens)")


def context_limit(config) -> int | None:
    """How many positions a decoder may use: None for positions without a limit."""
    return config.max_len if config.position in ("learned", "rotary") else None


@functools.partial(
    jax.jit, static_argnames=("model", "max_new_tokens", "temperature", "top_k", "top_p", "eos_id")
)
def _generate(
    model,
    params,
    tokens,
    valid,
    positions,
    rng,
    *,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    eos_id,
):
    batch, prompt_len = tokens.shape
    cache = init_cache(model, params, batch, prompt_len + max_new_tokens)
    logits, mutated = model.apply(
        {"params": params, "cache": cache},
        tokens,
        segment_ids=valid.astype(jnp.int32),
        positions=positions,
        decode=True,
        mutable=["cache"],
    )
    next_position = positions[:, -1] + 1

    def step(carry, step_rng):
        cache, last_logits, position, done = carry
        token = sample_logits(last_logits, step_rng, temperature, top_k, top_p)
        token = jnp.where(done, 0, token)
        done = done | (token == eos_id) if eos_id is not None else done
        logits, mutated = model.apply(
            {"params": params, "cache": cache},
            token[:, None],
            positions=position[:, None],
            decode=True,
            mutable=["cache"],
        )
        return (mutated["cache"], logits[:, -1], position + 1, done), token

    carry = (mutated["cache"], logits[:, -1], next_position, jnp.zeros((batch,), bool))
    _, new_tokens = jax.lax.scan(step, carry, jax.random.split(rng, max_new_tokens))
    return new_tokens.T


def generate(
    model: DecoderOnly,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
    pad_to: int | None = None,
) -> list[list[int]]:
    """Continuations (token ids, without the prompt, cut after eos) for a batch of prompts.

    pad_to: left-pad the prompts to at least this length (fewer compiled shapes)."""
    check_prompts(model, prompts, max_new_tokens)
    check_sampling(model.config, temperature, top_k, top_p)
    tokens, valid, positions = left_pad(prompts, length=pad_to)
    out = _generate(
        model,
        params,
        tokens,
        valid,
        positions,
        jax.random.PRNGKey(seed),
        max_new_tokens=max_new_tokens,
        temperature=float(temperature),
        top_k=int(top_k),
        top_p=float(top_p),
        eos_id=eos_id,
    )
    return _cut_at_eos(out, eos_id)


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "bos_id", "eos_id"))
def _generate_seq2seq(model, params, source, source_valid, *, max_new_tokens, bos_id, eos_id):
    batch = source.shape[0]
    seg = source_valid.astype(jnp.int32)
    encoded = model.apply(
        {"params": params}, source, encoder_segment_ids=seg, method=EncoderDecoder.encode
    )
    cache = init_cache(model, params, batch, max_new_tokens, encoder_len=source.shape[1])

    def step(carry, index):
        cache, token, done = carry
        logits, mutated = model.apply(
            {"params": params, "cache": cache},
            encoded,
            token[:, None],
            encoder_segment_ids=seg,
            positions=jnp.full((batch, 1), index),
            decode=True,
            mutable=["cache"],
            method=EncoderDecoder.decode,
        )
        next_token = jnp.where(done, 0, first_argmax(logits[:, -1]))
        done = done | (next_token == eos_id)
        return (mutated["cache"], next_token, done), next_token

    start = jnp.full((batch,), bos_id, jnp.int32)
    _, out = jax.lax.scan(
        step, (cache, start, jnp.zeros((batch,), bool)), jnp.arange(max_new_tokens)
    )
    return out.T


def generate_seq2seq(
    model: EncoderDecoder,
    params,
    sources: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    bos_id: int,
    eos_id: int,
    pad_to: int | None = None,
) -> list[list[int]]:
    """Greedy outputs of an encoder-decoder for a batch of source token lists (cut at eos).

    pad_to: right-pad the sources to at least this length (fewer compiled shapes)."""
    tokens, valid = _right_pad(sources, pad_to)
    out = _generate_seq2seq(
        model, params, tokens, valid, max_new_tokens=max_new_tokens, bos_id=bos_id, eos_id=eos_id
    )
    return _cut_at_eos(out, eos_id)


# ------------------------------------------------------------------------------ beam search


def length_penalty(lengths, alpha: float):
    """GNMT length normalisation ((5 + length) / 6) ** alpha (Wu et al. 2016); alpha 0 = none."""
    return ((5.0 + lengths.astype(jnp.float32)) / 6.0) ** alpha


def _gather_beams(tree, beam_index, batch: int, beams: int):
    """Reorders the [batch * beams] rows of every leaf (the cache's too, whose scanned layers
    hold rows on axis 1) by beam_index [batch, beams]; scalars pass through."""
    flat = (beam_index + jnp.arange(batch)[:, None] * beams).reshape(-1)
    return gather_batch(tree, flat)


def _beam_loop(apply_step, cache, logits, position, *, batch, beams, max_new_tokens, eos_id, alpha):
    """The beam search shared by both architectures.

    apply_step(cache, token [rows], position [rows]) -> (logits [rows, vocab], cache), with
    rows = batch * beams; logits [rows, vocab] are the first step's. Beam state is flat over
    rows so that one gather reorders the cache and the history. Returns the best sequence
    [batch, max_new_tokens] and its summed log-probability [batch].
    """
    rows = batch * beams
    vocab = logits.shape[-1]
    # Only the first beam is live at the start, so the first step does not pick duplicates.
    first = jnp.tile(jnp.array([0.0] + [-1e9] * (beams - 1), jnp.float32), batch)
    state = dict(
        cache=cache,
        logits=logits,
        scores=first,
        finished=jnp.zeros((rows,), bool),
        lengths=jnp.zeros((rows,), jnp.int32),
        sequences=jnp.zeros((rows, max_new_tokens), jnp.int32),
        position=position,
    )
    # A finished beam can only continue with padding (id 0), at no cost.
    done_row = jnp.full((vocab,), -jnp.inf).at[0].set(0.0)

    def step(state, t):
        logp = jax.nn.log_softmax(state["logits"], axis=-1)
        logp = jnp.where(state["finished"][:, None], done_row, logp)
        candidates = (state["scores"][:, None] + logp).reshape(batch, beams * vocab)
        scores, flat_index = jax.lax.top_k(candidates, beams)
        token = (flat_index % vocab).astype(jnp.int32).reshape(rows)
        picked = _gather_beams(
            {k: state[k] for k in ("cache", "finished", "lengths", "sequences", "position")},
            flat_index // vocab,
            batch,
            beams,
        )
        ended = token == eos_id if eos_id is not None else jnp.zeros_like(picked["finished"])
        logits, cache = apply_step(picked["cache"], token, picked["position"])
        return dict(
            cache=cache,
            logits=logits,
            scores=scores.reshape(rows),
            finished=picked["finished"] | ended,
            lengths=picked["lengths"] + (~picked["finished"]).astype(jnp.int32),
            sequences=picked["sequences"].at[:, t].set(token),
            position=picked["position"] + 1,
        ), None

    state, _ = jax.lax.scan(step, state, jnp.arange(max_new_tokens))
    scores = state["scores"].reshape(batch, beams)
    normalised = scores / length_penalty(
        jnp.maximum(state["lengths"].reshape(batch, beams), 1), alpha
    )
    best = jnp.argmax(normalised, axis=-1)
    sequences = state["sequences"].reshape(batch, beams, max_new_tokens)
    return sequences[jnp.arange(batch), best], scores[jnp.arange(batch), best]


@functools.partial(jax.jit, static_argnames=("model", "beams", "max_new_tokens", "eos_id", "alpha"))
def _beam_search(model, params, tokens, valid, positions, *, beams, max_new_tokens, eos_id, alpha):
    batch, prompt_len = tokens.shape
    cache = init_cache(model, params, batch * beams, prompt_len + max_new_tokens)
    logits, mutated = model.apply(
        {"params": params, "cache": cache},
        jnp.repeat(tokens, beams, axis=0),
        segment_ids=jnp.repeat(valid, beams, axis=0).astype(jnp.int32),
        positions=jnp.repeat(positions, beams, axis=0),
        decode=True,
        mutable=["cache"],
    )

    def apply_step(cache, token, position):
        logits, mutated = model.apply(
            {"params": params, "cache": cache},
            token[:, None],
            positions=position[:, None],
            decode=True,
            mutable=["cache"],
        )
        return logits[:, -1], mutated["cache"]

    return _beam_loop(
        apply_step,
        mutated["cache"],
        logits[:, -1],
        jnp.repeat(positions[:, -1] + 1, beams),
        batch=batch,
        beams=beams,
        max_new_tokens=max_new_tokens,
        eos_id=eos_id,
        alpha=alpha,
    )


@functools.partial(
    jax.jit, static_argnames=("model", "beams", "max_new_tokens", "bos_id", "eos_id", "alpha")
)
def _beam_search_seq2seq(
    model, params, source, source_valid, *, beams, max_new_tokens, bos_id, eos_id, alpha
):
    batch = source.shape[0]
    seg = jnp.repeat(source_valid.astype(jnp.int32), beams, axis=0)
    # Beams of one example share its encoding, so reordering beams never needs to move it.
    encoded = model.apply(
        {"params": params},
        jnp.repeat(source, beams, axis=0),
        encoder_segment_ids=seg,
        method=EncoderDecoder.encode,
    )
    cache = init_cache(
        model, params, batch * beams, max_new_tokens + 1, encoder_len=source.shape[1]
    )

    def apply_step(cache, token, position):
        logits, mutated = model.apply(
            {"params": params, "cache": cache},
            encoded,
            token[:, None],
            encoder_segment_ids=seg,
            positions=position[:, None],
            decode=True,
            mutable=["cache"],
            method=EncoderDecoder.decode,
        )
        return logits[:, -1], mutated["cache"]

    rows = batch * beams
    logits, cache = apply_step(
        cache, jnp.full((rows,), bos_id, jnp.int32), jnp.zeros((rows,), jnp.int32)
    )
    return _beam_loop(
        apply_step,
        cache,
        logits,
        jnp.ones((rows,), jnp.int32),
        batch=batch,
        beams=beams,
        max_new_tokens=max_new_tokens,
        eos_id=eos_id,
        alpha=alpha,
    )


def beam_search(
    model: DecoderOnly,
    params,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    beams: int = 4,
    eos_id: int | None = None,
    length_penalty_alpha: float = 0.6,
) -> tuple[list[list[int]], list[float]]:
    """Beam search with the KV cache; returns the best continuation per prompt (cut after eos)
    and its summed log-probability. Beams are ranked at the end by score / GNMT length penalty."""
    if beams < 1:
        raise ValueError(f"beams must be >= 1, got {beams}")
    check_prompts(model, prompts, max_new_tokens)
    tokens, valid, positions = left_pad(prompts)
    out, scores = _beam_search(
        model,
        params,
        tokens,
        valid,
        positions,
        beams=beams,
        max_new_tokens=max_new_tokens,
        eos_id=eos_id,
        alpha=float(length_penalty_alpha),
    )
    return _cut_at_eos(out, eos_id), [float(s) for s in np.asarray(scores)]


def beam_search_seq2seq(
    model: EncoderDecoder,
    params,
    sources: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    bos_id: int,
    eos_id: int,
    beams: int = 4,
    length_penalty_alpha: float = 0.6,
) -> tuple[list[list[int]], list[float]]:
    """Beam search for an encoder-decoder: best output per source (cut at eos) and its log-prob."""
    if beams < 1:
        raise ValueError(f"beams must be >= 1, got {beams}")
    tokens, valid = _right_pad(sources)
    out, scores = _beam_search_seq2seq(
        model,
        params,
        tokens,
        valid,
        beams=beams,
        max_new_tokens=max_new_tokens,
        bos_id=bos_id,
        eos_id=eos_id,
        alpha=float(length_penalty_alpha),
    )
    return _cut_at_eos(out, eos_id), [float(s) for s in np.asarray(scores)]


def _right_pad(sources: Sequence[Sequence[int]], length: int | None = None):
    """-> tokens [batch, L], valid [batch, L] bool (encoder inputs are right-padded)."""
    length = max(length or 0, max(len(s) for s in sources))
    tokens = np.zeros((len(sources), length), np.int32)
    valid = np.zeros((len(sources), length), bool)
    for i, s in enumerate(sources):
        tokens[i, : len(s)] = s
        valid[i, : len(s)] = True
    return tokens, valid


def _cut_at_eos(out, eos_id: int | None) -> list[list[int]]:
    """Rows of token ids [batch, length] -> lists cut before the first eos."""
    results = []
    for row in np.asarray(out).tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id)]
        results.append(row)
    return results


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """The text before the earliest occurrence of any stop string (as lm-evaluation-harness's
    `until`); unchanged if none occurs."""
    cut = len(text)
    for stop in stops:
        if stop:
            index = text.find(stop)
            if index != -1:
                cut = min(cut, index)
    return text[:cut]


# ------------------------------------------------------------------------ text in, text out


def samples(
    model,
    params,
    tokenizer,
    data_cfg,
    prompts,
    *,
    max_new_tokens,
    temperature,
    top_k=0,
    top_p=1.0,
    seed=0,
    beams=0,
    stops=(),
) -> list[str]:
    """Text prompts -> one text per prompt: the prompt and its decoded continuation
    (decoder-only), or the prompt and its translation on the next line (encoder-decoder).

    model: the Flax module (its `.config` says the architecture); params: its parameters;
    tokenizer: encodes the prompts and decodes the output (its bos/eos ids are used);
    data_cfg: the run's DataConfig (encoder_len and seq_len bound an encoder-decoder's input
    and output). beams > 0 uses beam search instead of sampling (decoder-only) or greedy
    (encoder-decoder); each continuation is cut at the first of `stops`. ValueError for a
    prompt that leaves no room in the model's context.
    """
    if model.config.architecture == "decoder":
        bos = [tokenizer.bos_id] if tokenizer.add_bos else []
        ids = [bos + tokenizer.encode(p) for p in prompts]
        limit = context_limit(model.config)
        if limit is not None:
            longest = max(len(i) for i in ids)
            if longest >= limit:
                raise ValueError(
                    f"a prompt of {longest} tokens leaves no room in the model's {limit}-token "
                    "context (model.max_len); shorten the prompt"
                )
            max_new_tokens = min(max_new_tokens, limit - longest)
        if beams > 0:
            out, _ = beam_search(
                model,
                params,
                ids,
                max_new_tokens=max_new_tokens,
                beams=beams,
                eos_id=tokenizer.eos_id,
            )
        else:
            out = generate(
                model,
                params,
                ids,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                seed=seed,
                eos_id=tokenizer.eos_id,
            )
        return [
            p + cut_at_stop(tokenizer.decode(o), stops) for p, o in zip(prompts, out, strict=True)
        ]
    ids = [tokenizer.encode(p)[: data_cfg.encoder_len - 1] + [tokenizer.eos_id] for p in prompts]
    max_new_tokens = min(max_new_tokens, data_cfg.seq_len)
    if beams > 0:
        out, _ = beam_search_seq2seq(
            model,
            params,
            ids,
            max_new_tokens=max_new_tokens,
            beams=beams,
            bos_id=tokenizer.bos_id,
            eos_id=tokenizer.eos_id,
        )
    else:
        out = generate_seq2seq(
            model,
            params,
            ids,
            max_new_tokens=max_new_tokens,
            bos_id=tokenizer.bos_id,
            eos_id=tokenizer.eos_id,
        )
    return [
        f"{p}\n  -> {cut_at_stop(tokenizer.decode(o), stops)}"
        for p, o in zip(prompts, out, strict=True)
    ]
