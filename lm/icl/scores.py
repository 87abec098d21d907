"""Scores of in-context learning and of induction heads (Olsson et al. 2022).

Pure functions on arrays (numpy or jax; they run under `jax.jit`). Conventions:

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

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax


def per_token_loss(logits, tokens):
    """Next-token cross-entropy aligned with the predicted token.

    logits [batch, length - 1, vocab]: the model's outputs on tokens[:, :-1];
    tokens [batch, length] -> [batch, length] float32, column 0 NaN.
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), tokens[:, 1:])
    return jnp.concatenate([jnp.full((ce.shape[0], 1), jnp.nan, ce.dtype), ce], axis=1)


def _batched(attn, tokens):
    attn = jnp.asarray(attn, jnp.float32)
    tokens = jnp.asarray(tokens)
    q, k = attn.shape[-2:]
    if q != k:
        raise ValueError(f"self-attention weights need q_len == k_len, got [.., {q}, {k}]")
    if tokens.ndim != 2 or tokens.shape[0] != attn.shape[-4] or tokens.shape[1] < q:
        raise ValueError(
            f"tokens {tuple(tokens.shape)} do not fit attention {tuple(attn.shape)} "
            "([.., batch, heads, q, k] over tokens [batch, >= q])")
    return attn, tokens[:, :q]


def induction_targets(tokens, occurrence: str = "all"):
    """Where an induction head attends: [batch, q, k] float mask.

    target[b, t, k] = 1 when tokens[b, k - 1] == tokens[b, t] for 1 <= k <= t, i.e. k is the
    token right after an earlier occurrence s = k - 1 < t of the query's token.
    occurrence: 'all' (every earlier occurrence) or 'last' (only the most recent one).
    """
    tokens = jnp.asarray(tokens)
    n = tokens.shape[1]
    t = jnp.arange(n)[:, None]
    k = jnp.arange(n)[None, :]
    prev = jnp.concatenate([jnp.full_like(tokens[:, :1], -1), tokens[:, :-1]], axis=1)
    match = (prev[:, None, :] == tokens[:, :, None]) & (k >= 1) & (k <= t)  # [b, q, k]
    if occurrence == "last":
        last = jnp.max(jnp.where(match, k, -1), axis=-1, keepdims=True)
        match = match & (k == last)
    elif occurrence != "all":
        raise ValueError(f"occurrence={occurrence!r}: use 'all' or 'last'")
    return match.astype(jnp.float32)


def _pooled(attn, targets, valid):
    """Mean over (batch, query) with valid[b, t] of the attention mass on targets[b, t, :]."""
    mass = jnp.einsum("...bhqk,bqk->...bhq", attn, targets)
    total = jnp.einsum("...bhq,bq->...h", mass, valid)
    return total / jnp.maximum(valid.sum(), 1.0)


def induction_score(attn, tokens, *, occurrence: str = "all"):
    """Mean attention from a repeated token to the token after its earlier occurrence(s).

    attn [..., batch, heads, q, k], tokens [batch, length >= q] -> [..., heads].

    Over every query position t whose token appeared before (at some s < t), the attention
    weight from t to s + 1, summed over the earlier occurrences s ('all', the default: a head
    that splits its attention among several earlier occurrences still scores 1) or taken at
    the most recent one only ('last'), then averaged over all such (sequence, t). A perfect
    induction head scores 1; attention spread uniformly over the t + 1 visible keys scores the
    mean of (number of targets) / (t + 1). On a random span repeated twice ([A][A]) the
    positions counted are essentially the second copy, and the target of its i-th token is
    the (i + 1)-th token of the first copy.
    """
    attn, tokens = _batched(attn, tokens)
    targets = induction_targets(tokens, occurrence)
    valid = (targets.sum(-1) > 0).astype(jnp.float32)
    return _pooled(attn, targets, valid)


def previous_token_score(attn, tokens=None):
    """Mean attention from each position t >= 1 to t - 1.

    attn [..., batch, heads, q, k] -> [..., heads]; `tokens` is accepted for symmetry with
    `induction_score` and not used. Uniform causal attention scores mean_t 1 / (t + 1).
    """
    attn = jnp.asarray(attn, jnp.float32)
    q = attn.shape[-2]
    prev = jnp.diagonal(attn, offset=-1, axis1=-2, axis2=-1)  # [..., batch, heads, q - 1]
    del tokens
    return prev.mean(axis=(-1, -3)) if q > 1 else jnp.zeros(attn.shape[:-4] + attn.shape[-3:-2])


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
    return jnp.where((i >= start) & (i < start + span), 1,
                     jnp.where((i >= start + span) & (i < start + 2 * span), 2, 0))


def _segments(shape, span, start):
    if isinstance(span, int):
        return jnp.broadcast_to(copy_segments(shape[1], span, start), shape)
    segments = jnp.asarray(span)
    if segments.shape not in (tuple(shape), tuple(shape[1:])):
        raise ValueError(f"segment markers {segments.shape} must match the losses {tuple(shape)} "
                         "(or one row of them)")
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


def attention_weights(intermediates: Mapping[str, Any]):
    """The sown self-attention weights of a DecoderOnly, stacked by layer.

    intermediates: the `intermediates` collection returned by
    `model.apply({'params': p}, tokens, mutable=['intermediates'])` on a model built with
    `capture_attention=True` (the whole returned variables dict is accepted too) ->
    [layers, batch, heads, q, k], layer_0 first.
    """
    tree = intermediates.get("intermediates", intermediates)
    if "decoder" not in tree:
        raise ValueError("no decoder attention in intermediates: build the model with "
                         "capture_attention=True and apply it with mutable=['intermediates']")
    layers = tree["decoder"]
    names = sorted((n for n in layers if n.startswith("layer_")), key=lambda n: int(n[6:]))
    if not names:
        raise ValueError("the intermediates hold no layer_i entries")
    weights = []
    for name in names:
        sown = layers[name]["self_attention"]["attention_weights"]
        weights.append(sown[-1] if isinstance(sown, tuple | list) else sown)
    return jnp.stack(weights)


def head_scores(attn, tokens) -> dict[str, jax.Array]:
    """{'induction': [..., heads], 'previous_token': [..., heads]} for attention over tokens."""
    return {"induction": induction_score(attn, tokens),
            "previous_token": previous_token_score(attn, tokens)}
