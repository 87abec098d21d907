"""What a step minimises: the forward pass, cross-entropy sums (chunked over the vocabulary or
not), auxiliary losses, and `Objective`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from lm.models.moe import STATS
from lm.models.transformer import (
    ModelConfig,
    dummy_inputs,
)

MODEL_INPUT_KEYS = ("segment_ids", "positions", "encoder_inputs", "encoder_segment_ids")


AUX_LOSSES = "losses"  # the Flax collection models sow auxiliary losses into (see `forward`)


def forward(model: nn.Module, params, batch, *, deterministic=True, rng=None):
    """Logits [batch, length, vocab] for a data batch of either architecture."""
    return forward_with_aux(model, params, batch, deterministic=deterministic, rng=rng)[0]


def forward_with_aux(
    model: nn.Module, params, batch, *, deterministic=True, rng=None, method: str | None = None
):
    """(logits [batch, length, vocab], {name: auxiliary loss or statistic}) for a data batch;
    with method="features" (decoder-only models) the final hidden states [batch, length, embed]
    instead of the logits.

    A model adds a term to the objective by sowing a scalar, already multiplied by its
    coefficient, into the `AUX_LOSSES` collection (`self.sow("losses", name, value)`, e.g. a
    Mixture-of-Experts router's load-balancing loss). Every value sown under a name (one per
    layer, or a [layers] stack under scanned layers) is summed into that name's loss.
    A scalar sown into the `STATS` collection (e.g. the share of assignments capacity
    dispatch drops) is reported, not optimised: `stats/NAME`, the mean over its layers.
    """
    kwargs = {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}
    rngs = {"dropout": rng} if rng is not None else {}
    logits, sown = model.apply(
        {"params": params},
        batch["inputs"],
        deterministic=deterministic,
        rngs=rngs,
        mutable=[AUX_LOSSES, STATS],
        method=method,
        **kwargs,
    )
    stats = {f"stats/{k}": v for k, v in mean_stats(sown.get(STATS, {})).items()}
    return logits, {**sum_aux_losses(sown.get(AUX_LOSSES, {})), **stats}


def _by_name(sown) -> dict[str, list[jax.Array]]:
    """A sown collection -> {name: every value sown under that name}."""
    values: dict[str, list[jax.Array]] = {}
    for path, value in jax.tree_util.tree_flatten_with_path(sown)[0]:
        name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
        values.setdefault(name, []).append(value.astype(jnp.float32))
    return values


def mean_stats(sown) -> dict[str, jax.Array]:
    """The `STATS` collection -> {name: mean of every value sown under that name}."""
    return {
        name: sum(jnp.sum(v) for v in values) / sum(v.size for v in values)
        for name, values in _by_name(sown).items()
    }


def sum_aux_losses(sown) -> dict[str, jax.Array]:
    """The `AUX_LOSSES` collection -> {name: sum of every value sown under that name}."""
    return {name: sum(jnp.sum(v) for v in values) for name, values in _by_name(sown).items()}


def cross_entropy(logits, targets):
    """Next-token cross-entropy and whether the target is the top prediction.

    logits [..., vocab], targets [...] int -> (cross-entropy [...], correct [...] float32: 1
    where the target's logit is the row's largest, ties counted as correct).
    Why not `argmax(logits) == targets`: on CPU that variadic value-and-index reduction over
    the vocabulary costs a large share of a train step at a 50k vocabulary (python -m
    lm.bench train, shape V); the target's logit against the row maximum says the same thing
    for the price of a max. (A hand-written backward for the softmax is slower: XLA fuses its
    exp into a slower reduction.)
    """
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    label = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    correct = label >= jax.lax.stop_gradient(logits.max(axis=-1))
    return ce, jax.lax.stop_gradient(correct.astype(jnp.float32))


def loss_sums(logits, targets, weights):
    """Summed weighted cross-entropy and correct predictions; weights [batch, length]."""
    ce, correct = cross_entropy(logits, targets)
    return (ce * weights).sum(), (correct * weights).sum(), weights.sum()


def chunked_loss_sums(project, x, targets, weights, chunk: int):
    """`loss_sums` of `project(x)` computed `chunk` positions of every row at a time.

    project: hidden states [batch, chunk, embed] -> float32 logits [batch, chunk, vocab].
    x [batch, length, embed]; targets, weights [batch, length]; length a multiple of chunk.
    Each chunk's logits live only inside its scan step and are made again in the backward
    pass (jax.checkpoint), so memory holds [batch, chunk, vocab], not [batch, length, vocab].
    Returns the three sums of `loss_sums`.
    """
    batch, length = targets.shape
    if length % chunk:
        raise ValueError(
            f"model.logits_chunk={chunk} does not divide the sequence length {length}: "
            f"use a divisor of it (or 0 for the whole row)"
        )

    def split(a):  # [batch, length, ...] -> [length // chunk, batch, chunk, ...]
        return jnp.moveaxis(a.reshape(batch, length // chunk, chunk, *a.shape[2:]), 1, 0)

    @jax.checkpoint
    def chunk_sums(xc, tc, wc):
        return loss_sums(project(xc), tc, wc)

    def body(totals, xs):
        return jax.tree.map(jnp.add, totals, chunk_sums(*xs)), None

    zeros = (jnp.zeros((), jnp.float32),) * 3
    totals, _ = jax.lax.scan(body, zeros, (split(x), split(targets), split(weights)))
    return totals


def language_model_sums(model, params, batch, *, deterministic=True, rng=None):
    """The objective of text models: next-token cross-entropy (see `Objective`), with the
    logits made `model.logits_chunk` positions at a time where the config says so."""
    targets, weights = batch["targets"], batch["weights"]
    chunk = model.config.logits_chunk
    if chunk and chunk < targets.shape[1]:
        x, aux = forward_with_aux(
            model, params, batch, deterministic=deterministic, rng=rng, method="features"
        )
        project = lambda h: model.apply({"params": params}, h, method="project")
        loss, correct, weight = chunked_loss_sums(project, x, targets, weights, chunk)
    else:
        logits, aux = forward_with_aux(model, params, batch, deterministic=deterministic, rng=rng)
        loss, correct, weight = loss_sums(logits, targets, weights)
    sums = {"loss": loss, "accuracy": correct, "weight": weight}
    for name, value in aux.items():  # a mean over the batch: weighted like the loss
        sums[name if name.startswith("stats/") else f"aux/{name}"] = value * weight
    return sums


@dataclasses.dataclass(frozen=True)
class Objective:
    """What a train step minimises: how a model turns a batch into summed losses.

    sums: (model, params, batch, *, deterministic, rng) -> {name: scalar sum over the batch}.
      "loss" is the summed loss and "weight" what it is summed over (target tokens, predicted
      points); every other entry is a sum reported divided by the weight (e.g. "accuracy": the
      correct predictions). Entries named "aux/NAME" are auxiliary losses times the weight:
      they join the objective, (loss + sum of aux) / weight, and are logged as aux/NAME.
      Sums (not means) so that micro-batches, devices and processes add up exactly.
    init_inputs: ModelConfig -> keyword inputs for `model.init` (shapes only matter).

    Text models use `LANGUAGE_MODELLING`; experiments with other inputs (lm.icl's in-context
    regression) bring their own and train through the same step and loop.
    """

    sums: Callable[..., dict[str, jax.Array]] = language_model_sums
    init_inputs: Callable[[ModelConfig], dict[str, Any]] = dummy_inputs


LANGUAGE_MODELLING = Objective()


def _objective_value(sums) -> jax.Array:
    """The summed loss the gradient is taken of: the loss plus the auxiliary losses."""
    return sums["loss"] + sum(v for k, v in sums.items() if k.startswith("aux/"))
