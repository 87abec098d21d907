"""One scoring interface over any decoder-only model of ours: lm-evaluation-harness's contract.

    lm = LanguageModel(model, params, tokenizer, batch_size=16)
    lm.loglikelihood([("Question: 2+2=", " 4"), ...])   # [(log p(continuation | context), greedy?)]
    lm.loglikelihood_rolling(["a whole document", ...])  # [log p(document)]
    lm.generate_until([("Q: ...\nA:", ["\n"], 32), ...])  # [continuation text]

Requests are sorted by length and cut into batches of `batch_size` rows whose length is
padded up to a bucket (powers of two from 32), so a whole task compiles a handful of
programs, not one per document; results come back in request order. Every row is
scored on its own (causal attention, right padding, float32 log-softmax), so results
do not depend on the batch size.

Tokenisation follows the harness: a context's trailing spaces move to the continuation,
the pair is encoded whole and split where the context's tokens end; the model's BOS is
prepended when it uses one (a model without BOS gets its EOS before an empty context and
before every rolling document); inputs longer than the model's context keep their last
tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lm import decode

MIN_BUCKET = 32
PROJECT_CHUNK = 128  # positions projected onto the vocabulary at a time (bounds memory)


def bucket_length(n: int, limit: int | None, minimum: int = MIN_BUCKET) -> int:
    """The padded length for a row of `n` tokens: the next power of two >= minimum, capped at
    limit."""
    length = max(minimum, 1 << max(n - 1, 0).bit_length())
    return min(length, limit) if limit else length


def _project_scores(model, params, hidden, targets):
    """hidden [b, c, d], targets [b, c] -> (target log-probs [b, c], target is argmax [b, c],
    log-probs of the last position [b, vocab])."""
    logits = model.apply({"params": params}, hidden, method=model.project)
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return picked, logits.argmax(-1) == targets, logprobs[:, -1]


@functools.partial(jax.jit, static_argnames=("model", "with_last"))
def _score(model, params, tokens, segment_ids, starts, targets, scored, *, with_last=False):
    """Sums of target log-probs over the scored positions of each row.

    tokens, segment_ids [b, L]: inputs, right-padded (segment 0).
    starts [b]: the first of each row's c read positions; targets, scored [b, c]: the targets
      at those positions and which of them count. Only these positions are projected onto
      the vocabulary, in chunks of PROJECT_CHUNK.
    -> (sum log-prob [b], all scored targets greedy [b], log-probs after the last read position
      [b, vocab] if with_last else None).
    """
    hidden = model.apply({"params": params}, tokens, segment_ids=segment_ids, method=model.features)
    b, c = targets.shape
    index = jnp.clip(starts[:, None] + jnp.arange(c)[None], 0, tokens.shape[1] - 1)
    read = jnp.take_along_axis(hidden, index[..., None], axis=1)  # [b, c, d]
    if c <= PROJECT_CHUNK:
        picked, greedy, last = _project_scores(model, params, read, targets)
    else:  # long rows (rolling windows): project a chunk of positions at a time
        chunks = c // PROJECT_CHUNK
        def one(xs):
            return _project_scores(model, params, *xs)[:2]
        picked, greedy = jax.lax.map(one, (
            read.reshape(b, chunks, PROJECT_CHUNK, -1).swapaxes(0, 1),
            targets.reshape(b, chunks, PROJECT_CHUNK).swapaxes(0, 1)))
        picked, greedy = picked.swapaxes(0, 1).reshape(b, c), greedy.swapaxes(0, 1).reshape(b, c)
        last = None
    total = jnp.sum(jnp.where(scored, picked, 0.0), axis=-1)
    return total, jnp.all(greedy | ~scored, axis=-1), (last if with_last else None)


class LanguageModel:
    """loglikelihood / loglikelihood_rolling / generate_until over a decoder-only model.

    model, params: a `DecoderOnly` and its params (trained here or imported).
    tokenizer: ours or an imported model's (`encode`, `decode`, `bos_id`, `eos_id`, `add_bos`).
    batch_size: rows per compiled call. max_length: the longest input (default: the
      model's `max_len`).
    """

    def __init__(self, model, params, tokenizer, *, batch_size: int = 16,
                 max_length: int | None = None):
        if model.config.architecture != "decoder":
            raise ValueError("LanguageModel scores decoder-only models; an encoder-decoder "
                             "is evaluated with Seq2SeqModel")
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.batch_size = batch_size
        self.max_length = min(max_length or model.config.max_len, model.config.max_len)
        self._prefix = [tokenizer.bos_id] if tokenizer.add_bos else [tokenizer.eos_id]

    # ------------------------------------------------------------------ tokenisation

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids), split as the harness does."""
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        context_ids = self.tokenizer.encode(context) if context else []
        # As the harness: BOS when the model uses one; otherwise a prefix only for an empty
        # context, which needs something to condition on.
        prefix = self._prefix if (self.tokenizer.add_bos or not context_ids) else []
        return prefix + whole[:len(context_ids)], whole[len(context_ids):]

    # ------------------------------------------------------------------ scoring

    def _score_rows(self, rows: list[tuple[list[int], int]], *, with_last: bool = False):
        """rows: (token ids, number of trailing ids to score) -> (sum log-prob, greedy?) per
        row, and with_last: the log-probs [vocab] after each row's last input token."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list = [None] * len(rows)
        lasts: list = [None] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            length = bucket_length(max(len(rows[i][0]) - 1 for i in chunk), self.max_length)
            read = bucket_length(max(min(rows[i][1], length) for i in chunk), length, minimum=1)
            if read > PROJECT_CHUNK:
                read = -(-read // PROJECT_CHUNK) * PROJECT_CHUNK
            tokens = np.zeros((self.batch_size, length), np.int32)
            segments = np.zeros((self.batch_size, length), np.int32)
            starts = np.zeros((self.batch_size,), np.int32)
            targets = np.zeros((self.batch_size, read), np.int32)
            scored = np.zeros((self.batch_size, read), bool)
            for r, i in enumerate(chunk):
                ids, n_scored = rows[i]
                ids = ids[-(length + 1):]  # keep the end of inputs longer than the context
                n = len(ids) - 1
                n_scored = min(n_scored, n)
                tokens[r, :n], segments[r, :n] = ids[:-1], 1
                # Read positions n-read .. n-1 (right-aligned); the last n_scored count.
                starts[r] = n - read
                take = min(read, n)
                targets[r, read - take:] = ids[1:][n - take:]
                scored[r, read - n_scored:] = True
            sums, greedy, last = _score(self.model, self.params, tokens, segments, starts,
                                        targets, scored, with_last=with_last)
            sums, greedy = np.asarray(sums), np.asarray(greedy)
            last = np.asarray(last) if with_last else None
            for r, i in enumerate(chunk):
                results[i] = (float(sums[r]), bool(greedy[r]))
                if with_last:
                    lasts[i] = last[r]
        return (results, lasts) if with_last else results

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """For each (context, continuation): log p(continuation | context) and whether every
        continuation token is the model's argmax.

        Requests that share a context and continue it with a single token (multiple-choice
        letters, yes/no) are scored from one row: the log-probs after the context serve
        them all."""
        encoded = [self.encode_pair(*request) for request in requests]
        for (_, continuation), (_, ids) in zip(requests, encoded, strict=True):
            if not ids:
                raise ValueError(f"empty continuation after tokenisation: {continuation!r}")
        shared: dict[tuple[int, ...], list[int]] = {}
        for i, (context_ids, ids) in enumerate(encoded):
            if len(ids) == 1:
                shared.setdefault(tuple(context_ids), []).append(i)
        grouped = {i for members in shared.values() if len(members) > 1 for i in members}
        results: list = [None] * len(requests)
        single = [i for i in range(len(requests)) if i not in grouped]
        for i, result in zip(single, self._score_rows(
                [(encoded[i][0] + encoded[i][1], len(encoded[i][1])) for i in single]), strict=True):
            results[i] = result
        groups = [members for members in shared.values() if len(members) > 1]
        if groups:
            rows = [(list(context) + encoded[members[0]][1], 1)
                    for context, members in shared.items() if len(members) > 1]
            _, lasts = self._score_rows(rows, with_last=True)
            for members, logprobs in zip(groups, lasts, strict=True):
                best = int(np.argmax(logprobs))
                for i in members:
                    token = encoded[i][1][0]
                    results[i] = (float(logprobs[token]), token == best)
        return results

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """log p(text) of whole documents, summed over windows of the model's context as the
        harness cuts them: disjoint windows of `max_length` predictions from the start; the
        last, shorter one keeps a full context of the tokens before it."""
        width = self.max_length
        rows, owner = [], []
        for d, text in enumerate(texts):
            ids = self._prefix + self.tokenizer.encode(text)
            targets, done = len(ids) - 1, 0
            while done < targets:
                count = min(width, targets - done)
                end = done + count + 1  # ids[done+1 : end] are this window's targets
                rows.append((ids[max(0, end - width - 1):end], count))
                owner.append(d)
                done += count
        totals = [0.0] * len(texts)
        for d, (logprob, _) in zip(owner, self._score_rows(rows), strict=True):
            totals[d] += logprob
        return totals

    def generate_until(self, requests: Sequence[tuple[str, Sequence[str], int]]) -> list[str]:
        """Greedy continuations of each (context, stop strings, max new tokens), cut at the
        first stop string; batched by identical max-new-tokens."""
        out: list[str] = [""] * len(requests)
        by_budget: dict[int, list[int]] = {}
        for i, (_, _, max_tokens) in enumerate(requests):
            by_budget.setdefault(int(max_tokens), []).append(i)
        for max_tokens, indices in by_budget.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                room = self.max_length - max_tokens
                prompts = [(self._prefix + self.tokenizer.encode(requests[i][0]))[-room:]
                           for i in chunk]
                continuations = decode.generate(
                    self.model, self.params, prompts, max_new_tokens=max_tokens,
                    eos_id=self.tokenizer.eos_id,
                    pad_to=bucket_length(max(map(len, prompts)), room))
                for i, ids in zip(chunk, continuations, strict=True):
                    out[i] = decode.cut_at_stop(self.tokenizer.decode(ids), requests[i][1])
        return out


class Seq2SeqModel:
    """generate_until over an encoder-decoder (translation): greedy decoding of each source.

    encoder_len: sources keep their first encoder_len - 1 tokens, then EOS (as in training).
    """

    def __init__(self, model, params, tokenizer, *, encoder_len: int, batch_size: int = 16):
        if model.config.architecture != "encoder_decoder":
            raise ValueError("Seq2SeqModel needs an encoder-decoder; score decoder-only models "
                             "with LanguageModel")
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.encoder_len, self.batch_size = encoder_len, batch_size

    def generate_until(self, requests: Sequence[tuple[str, Sequence[str], int]]) -> list[str]:
        """Greedy output for each (source text, stop strings, max new tokens)."""
        out: list[str] = [""] * len(requests)
        by_budget: dict[int, list[int]] = {}
        for i, (_, _, max_tokens) in enumerate(requests):
            by_budget.setdefault(int(max_tokens), []).append(i)
        for max_tokens, indices in by_budget.items():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                sources = [self.tokenizer.encode(requests[i][0])[:self.encoder_len - 1]
                           + [self.tokenizer.eos_id] for i in chunk]
                outputs = decode.generate_seq2seq(
                    self.model, self.params, sources, max_new_tokens=max_tokens,
                    bos_id=self.tokenizer.bos_id, eos_id=self.tokenizer.eos_id,
                    pad_to=bucket_length(max(map(len, sources)), self.encoder_len))
                for i, ids in zip(chunk, outputs, strict=True):
                    out[i] = decode.cut_at_stop(self.tokenizer.decode(ids), requests[i][1])
        return out
