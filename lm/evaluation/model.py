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


def bucket_length(n: int, limit: int | None) -> int:
    """The padded length for a row of `n` tokens: the next power of two >= 32, capped at limit."""
    length = max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())
    return min(length, limit) if limit else length


@functools.partial(jax.jit, static_argnames=("model",))
def _score(model, params, tokens, targets, weights):
    """tokens/targets/weights [b, L] -> (sum of target log-probs [b], all targets greedy [b])."""
    logits = model.apply({"params": params}, tokens, segment_ids=(weights >= 0).astype(jnp.int32))
    logprobs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    scored = weights > 0
    greedy = (logits.argmax(-1) == targets) | ~scored
    return jnp.sum(jnp.where(scored, picked, 0.0), axis=-1), jnp.all(greedy, axis=-1)


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
                             "is evaluated with generate_seq2seq")
        self.model, self.params, self.tokenizer = model, params, tokenizer
        self.batch_size = batch_size
        self.max_length = max_length or model.config.max_len
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

    def _score_rows(self, rows: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """rows: (token ids, number of trailing ids to score) -> (sum log-prob, greedy?)."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            length = bucket_length(max(len(rows[i][0]) - 1 for i in chunk), self.max_length)
            tokens = np.zeros((self.batch_size, length), np.int32)
            targets = np.zeros((self.batch_size, length), np.int32)
            weights = np.full((self.batch_size, length), -1, np.int32)  # -1: padding
            for r, i in enumerate(chunk):
                ids, n_scored = rows[i]
                ids = ids[-(length + 1):]  # keep the end of inputs longer than the context
                n = len(ids) - 1
                tokens[r, :n], targets[r, :n] = ids[:-1], ids[1:]
                weights[r, :n] = 0
                weights[r, n - min(n_scored, n):n] = 1
            sums, greedy = _score(self.model, self.params, jnp.asarray(tokens),
                                  jnp.asarray(targets), jnp.asarray(weights))
            sums, greedy = np.asarray(sums), np.asarray(greedy)
            for r, i in enumerate(chunk):
                results[i] = (float(sums[r]), bool(greedy[r]))
        return results

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """For each (context, continuation): log p(continuation | context) and whether every
        continuation token is the model's argmax."""
        rows = []
        for context, continuation in requests:
            context_ids, continuation_ids = self.encode_pair(context, continuation)
            if not continuation_ids:
                raise ValueError(f"empty continuation after tokenisation: {continuation!r}")
            rows.append((context_ids + continuation_ids, len(continuation_ids)))
        return self._score_rows(rows)

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
                continuations = decode.generate(self.model, self.params, prompts,
                                                max_new_tokens=max_tokens,
                                                eos_id=self.tokenizer.eos_id)
                for i, ids in zip(chunk, continuations, strict=True):
                    out[i] = decode.cut_at_stop(self.tokenizer.decode(ids), requests[i][1])
        return out
