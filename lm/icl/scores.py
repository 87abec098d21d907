"""Scores of in-context learning and of induction heads (Olsson et al. 2022).

Pure functions on arrays (numpy or jax; they run under `jax.jit`). The attention-pattern
scores (induction, previous token, gathering sown weights) are `lm.inspect`'s, re-exported
here; the loss-based ones are below. Conventions:

- `tokens` [batch, length] int: the sequences the model read.
- `attn` [..., batch, heads, q, k]: softmax attention weights of a causal self-attention
  over those tokens, so q == k <= length and query t sees keys 0..t. Leading axes (e.g.
  layers) are kept: `attn` [layers, batch, heads, q, k] gives scores [layers, heads].
- `per_token_loss` [batch, length]: column t is the loss of predicting token t from the
  tokens before it, -log p(tokens[t] | tokens[:t]); column 0 (no context) is NaN and
  ignored. `per_token_loss(logits, tokens)` builds it from the logits of tokens[:, :-1].
- A repeated span is described either by an int `span` (the copies sit at
  [start, start + span) and [start + span, start + 2 span)) or by segment markers
  [batch, length] (or [length], the same for every row): 0 = other tokens, 1 = first copy,
  2 = second copy.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

# Attention-pattern scores live with the rest of the model instrumentation in lm.inspect.
from lm.inspect import (  # noqa: F401 - re-exported: lm.icl.scores.induction_score etc.
    attention_weights,
    head_scores,
    induction_score,
    induction_targets,
    previous_token_score,
)


def per_token_loss(logits, tokens):
    """Next-token cross-entropy aligned with the predicted token.

    logits [batch, length - 1, vocab]: the model's outputs on tokens[:, :-1];
    tokens [batch, length] -> [batch, length] float32, column 0 NaN.
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:])
    return jnp.concatenate([jnp.full((ce.shape[0], 1), jnp.nan, ce.dtype), ce], axis=1)


def in_context_score(per_token_loss, early: int | None = None, late: int | None = None):
    """Olsson et al.'s in-context learning score: loss at a late token minus at an early one.

    per_token_loss [batch, length] (column t = loss of predicting token t) -> scalar, the mean
    over the batch of loss[:, late] - loss[:, early]. Olsson et al. use tokens 500 and 50 of
    512-token contexts; the defaults here scale that to the sequence: early = max(1, length
    // 10), late = length - 1. Negative = the model predicts later tokens better, i.e. it
    uses its context.
    """
    loss = jnp.asarray(per_token_loss, jnp.float32)
    length = loss.shape[1]
    early = max(1, length // 10) if early is None else early
    late = length - 1 if late is None else late
    if not 1 <= early < length or not 1 <= late < length:
        raise ValueError(f"early={early}, late={late} must lie in [1, {length - 1}]")
    return jnp.mean(loss[:, late] - loss[:, early])


def copy_segments(length: int, span: int, start: int = 0):
    """Segment markers [length] of the layout [.. start ..][span][span][..]: 1 / 2 = copies."""
    if span < 1 or start < 0 or start + 2 * span > length:
        raise ValueError(f"two copies of span={span} from start={start} do not fit length={length}")
    i = jnp.arange(length)
    return jnp.where(
        (i >= start) & (i < start + span),
        1,
        jnp.where((i >= start + span) & (i < start + 2 * span), 2, 0),
    )


def _segments(shape, span, start):
    if isinstance(span, int):
        return jnp.broadcast_to(copy_segments(shape[1], span, start), shape)
    segments = jnp.asarray(span)
    if segments.shape not in (tuple(shape), tuple(shape[1:])):
        raise ValueError(
            f"segment markers {segments.shape} must match the losses {tuple(shape)} "
            "(or one row of them)"
        )
    return jnp.broadcast_to(segments, shape)


def _skip_copy_starts(segments, skip_first: int):
    """Marks as 0 the first `skip_first` tokens of every copy."""
    keep = segments
    for _ in range(skip_first):
        before = jnp.concatenate([jnp.zeros_like(keep[:, :1]), segments[:, :-1]], axis=1)
        shifted_keep = jnp.concatenate([jnp.zeros_like(keep[:, :1]), keep[:, :-1]], axis=1)
        # a token stays if the token before it is in the same copy and itself kept
        keep = jnp.where((before == segments) & (shifted_keep == segments), segments, 0)
    return keep


def copy_losses(per_token_loss, span, *, start: int = 0, skip_first: int = 1):
    """Mean loss on the first and on the second copy of a repeated span: (first, second).

    per_token_loss [batch, length]; span: an int (copies at [start, start + span) and
    [start + span, start + 2 span) in every row) or segment markers [batch, length] or
    [length] (1 = first copy, 2 = second copy). skip_first: leave out the first tokens of each copy (by
    default 1): the first token of the second copy is a fresh random draw as far as the
    model can tell, so no mechanism predicts it; the tokens after it are what induction
    predicts. Column 0 (NaN) is never counted.
    """
    loss = jnp.asarray(per_token_loss, jnp.float32)
    segments = _skip_copy_starts(_segments(loss.shape, span, start), skip_first)
    segments = segments.at[:, 0].set(0)
    loss = jnp.where(jnp.isnan(loss), 0.0, loss)

    def mean(which):
        w = (segments == which).astype(jnp.float32)
        return (loss * w).sum() / jnp.maximum(w.sum(), 1.0)

    return mean(1), mean(2)


def repeat_loss_ratio(per_token_loss, span, *, start: int = 0, skip_first: int = 1):
    """Mean loss on the second copy of a repeated span / mean loss on the first copy.

    Arguments as in `copy_losses`. About 1 for a model that does not use the repetition;
    near 0 for one that copies the continuation of the earlier occurrence (induction).
    """
    first, second = copy_losses(per_token_loss, span, start=start, skip_first=skip_first)
    return second / first
