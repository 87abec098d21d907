"""Look inside a model: attention per layer and head, log-probs, residual stream.

    from lm import convert, inspect
    pretrained = convert.load_pretrained("smollm2")
    seen = inspect.inspect_text(pretrained.config, pretrained.params, pretrained.tokenizer,
                                "The cat sat on the mat. The cat sat on the")
    seen.attention            # [layers, heads, q, k] softmax weights
    seen.log_probs            # [length] log p(token t | tokens before it), NaN at t = 0
    seen.residual             # [layers + 1, length, d_model]
    inspect.head_scores(seen.attention[:, None], seen.tokens[None])["induction"]  # [layers, heads]

Everything comes from one forward pass of the model's own modules: attention weights are
what `lm.models.attention` sows with `capture_attention=True` (no second implementation of
attention), and the residual stream is Flax's `capture_intermediates` of the embedding
dropout (the stream entering layer 0) and of each Block (the stream after it).

The per-head scores are pure functions on weights `attn` [..., batch, heads, q, k] of a
causal self-attention over `tokens` [batch, length >= q]; leading axes (e.g. layers) are
kept, so `attn` [layers, batch, heads, q, k] gives scores [layers, heads].
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm.models import layers
from lm.models.transformer import Block, ModelConfig, Stack, build_model, unstack_layers

# --------------------------------------------------------------------------- head scores


def _batched(attn, tokens):
    attn = jnp.asarray(attn, jnp.float32)
    tokens = jnp.asarray(tokens)
    q, k = attn.shape[-2:]
    if q != k:
        raise ValueError(f"self-attention weights need q_len == k_len, got [.., {q}, {k}]")
    if tokens.ndim != 2 or tokens.shape[0] != attn.shape[-4] or tokens.shape[1] < q:
        raise ValueError(
            f"tokens {tuple(tokens.shape)} do not fit attention {tuple(attn.shape)} "
            "([.., batch, heads, q, k] over tokens [batch, >= q])"
        )
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


def attention_entropy(attn, tokens=None):
    """Mean entropy (nats) of each query's attention distribution, over queries t >= 1.

    attn [..., batch, heads, q, k] -> [..., heads]. 0 = every query looks at one key;
    uniform causal attention gives mean_t log(t + 1). Query 0 (one visible key) is left out.
    """
    attn = jnp.asarray(attn, jnp.float32)
    del tokens
    plogp = jnp.where(attn > 0, attn * jnp.log(jnp.where(attn > 0, attn, 1.0)), 0.0)
    entropy = -plogp.sum(-1)[..., 1:]  # [..., batch, heads, q - 1]
    return entropy.mean(axis=(-1, -3))


def first_token_score(attn, tokens=None):
    """Mean attention from each query t >= 1 to position 0 (the 'attention sink').

    attn [..., batch, heads, q, k] -> [..., heads].
    """
    attn = jnp.asarray(attn, jnp.float32)
    del tokens
    return attn[..., 1:, 0].mean(axis=(-1, -3))


SCORES = {
    "induction": induction_score,
    "previous_token": previous_token_score,
    "entropy": attention_entropy,
    "first_token": first_token_score,
}


def head_scores(attn, tokens, names=("induction", "previous_token")) -> dict[str, jax.Array]:
    """{name: [..., heads]} for attention over tokens; names from SCORES (all with names=None)."""
    return {name: SCORES[name](attn, tokens) for name in (names or SCORES)}


def attention_weights(
    intermediates: Mapping[str, Any], stack: str = "decoder", kind: str = "self_attention"
):
    """The sown attention weights of one stack, stacked by layer.

    intermediates: the `intermediates` collection returned by
    `model.apply({'params': p}, tokens, mutable=['intermediates'])` on a model built with
    `capture_attention=True` (the whole returned variables dict is accepted too).
    stack: 'decoder' or (encoder-decoder models) 'encoder'; kind: 'self_attention' or
    (decoder of an encoder-decoder) 'cross_attention'.
    Returns [layers, batch, heads, q, k], layer_0 first (scanned layers are unstacked).
    """
    tree = unstack_layers(intermediates.get("intermediates", intermediates))
    if stack not in tree:
        raise ValueError(
            f"no {stack} attention in intermediates: build the model with "
            "capture_attention=True and apply it with mutable=['intermediates']"
        )
    layers = tree[stack]
    names = sorted((n for n in layers if n.startswith("layer_")), key=lambda n: int(n[6:]))
    if not names:
        raise ValueError("the intermediates hold no layer_i entries")
    weights = []
    for name in names:
        if kind not in layers[name]:
            raise ValueError(f"{stack} layer {name} has no {kind}")
        sown = layers[name][kind]["attention_weights"]
        weights.append(sown[-1] if isinstance(sown, tuple | list) else sown)
    return jnp.stack(weights)


# ----------------------------------------------------------------------------- capture


def _residual_filter(module: nn.Module, method_name: str) -> bool:
    """Block outputs, and the stream entering the first block (the Stack's dropout)."""
    if method_name != "__call__":
        return False
    if isinstance(module, Block):
        return True
    return isinstance(module, layers.Dropout) and isinstance(module.parent, Stack)


def _stacked_residual(intermediates, stack: str = "decoder") -> jax.Array:
    layers = unstack_layers(intermediates)[stack]
    names = sorted((n for n in layers if n.startswith("layer_")), key=lambda n: int(n[6:]))
    dropouts = [n for n in layers if n.startswith("Dropout")]
    streams = [layers[dropouts[0]]["__call__"][0]] if dropouts else []
    streams += [layers[n]["__call__"][0] for n in names]
    return jnp.stack(streams)


def _by_batch(x):
    """[layers, batch, ...] -> [batch, layers, ...]."""
    return jnp.moveaxis(x, 0, 1)


@functools.lru_cache(maxsize=8)
def _capture_fn(config: ModelConfig, keep_logits: bool):
    model = build_model(dataclasses.replace(config, capture_attention=True))
    seq2seq = config.architecture != "decoder"

    @jax.jit
    def run(params, tokens, encoder_tokens):
        inputs = {"encoder_inputs": encoder_tokens} if seq2seq else {}
        logits, state = model.apply(
            {"params": params},
            tokens,
            **inputs,
            mutable=["intermediates"],
            capture_intermediates=_residual_filter,
        )
        inter = state["intermediates"]
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        picked = jnp.take_along_axis(log_probs[:, :-1], tokens[:, 1:, None], axis=-1)[..., 0]
        token_log_probs = jnp.concatenate(
            [jnp.full((tokens.shape[0], 1), jnp.nan, picked.dtype), picked], axis=1
        )
        out = {
            "attention": _by_batch(attention_weights(inter)),
            "log_probs": token_log_probs,
            "residual": _by_batch(_stacked_residual(inter)).astype(jnp.float32),
        }
        if seq2seq:
            out["encoder_attention"] = _by_batch(attention_weights(inter, "encoder"))
            out["cross_attention"] = _by_batch(
                attention_weights(inter, "decoder", "cross_attention")
            )
            out["encoder_residual"] = _by_batch(_stacked_residual(inter, "encoder")).astype(
                jnp.float32
            )
        if keep_logits:
            out["logits"] = logits
        return out

    return run


def capture(
    config: ModelConfig, params, tokens, *, encoder_tokens=None, keep_logits: bool = True
) -> dict[str, np.ndarray]:
    """One forward pass over tokens [batch, length] (the decoder's inputs).

    Returns numpy arrays: attention [batch, layers, heads, length, length] (decoder
    self-attention); log_probs [batch, length] (column t: log p(tokens[t] | tokens[:t]), NaN
    at t = 0); residual [batch, layers + 1, length, d_model] (entry 0: embeddings plus
    positions entering layer 0; entry i: after layer i - 1; the final norm is not applied);
    logits [batch, length, vocab] float32 unless keep_logits=False (row t predicts token
    t + 1; a 262k vocabulary makes this the largest output).
    Encoder-decoder models also need encoder_tokens [batch, src_len] and add
    encoder_attention [batch, enc_layers, heads, src_len, src_len], cross_attention [batch,
    layers, heads, length, src_len] and encoder_residual [batch, enc_layers + 1, src_len, d_model].
    """
    tokens = jnp.asarray(np.asarray(tokens, np.int32))
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be [batch, length], got shape {tuple(tokens.shape)}")
    if tokens.shape[1] > config.max_len:
        raise ValueError(f"{tokens.shape[1]} tokens exceed the model's max_len {config.max_len}")
    seq2seq = config.architecture != "decoder"
    if seq2seq != (encoder_tokens is not None):
        raise ValueError(
            "an encoder-decoder model needs encoder_tokens [batch, src_len]"
            if seq2seq
            else "encoder_tokens are only for encoder-decoder models"
        )
    if seq2seq:
        encoder_tokens = jnp.asarray(np.asarray(encoder_tokens, np.int32))
        if encoder_tokens.ndim != 2 or encoder_tokens.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"encoder_tokens {tuple(encoder_tokens.shape)} must be [batch, src_len] with "
                f"the batch of tokens {tuple(tokens.shape)}"
            )
    return jax.tree.map(
        np.asarray, _capture_fn(config, keep_logits)(params, tokens, encoder_tokens)
    )


@dataclasses.dataclass(frozen=True)
class Inspection:
    """What one prompt looks like inside the model (see `capture` for the arrays).

    tokens [length]; labels: a readable string per token (for plot axes); attention [layers,
    heads, length, length]; log_probs [length]; residual [layers + 1, length, d_model];
    logits [length, vocab] or None.
    """

    tokens: np.ndarray
    labels: list[str]
    attention: np.ndarray
    log_probs: np.ndarray
    residual: np.ndarray
    logits: np.ndarray | None

    def scores(self, names=None) -> dict[str, np.ndarray]:
        """Per-head scores on this prompt: {name: [layers, heads]} (all of SCORES by default)."""
        out = head_scores(self.attention[:, None], self.tokens[None], names)
        return {k: np.asarray(v) for k, v in out.items()}


def token_labels(tokenizer, tokens) -> list[str]:
    """A short printable label per token id: its text, with whitespace made visible."""
    labels = []
    for i in np.asarray(tokens).tolist():
        text = tokenizer.decode([i]) if tokenizer is not None else ""
        if not text.strip():
            text = tokenizer.id_to_piece(i) if tokenizer is not None else str(i)
        labels.append(text.replace("\n", "\\n").replace("\t", "\\t"))
    return labels


def inspect_tokens(
    config: ModelConfig, params, tokens, tokenizer=None, *, keep_logits: bool = True
) -> Inspection:
    """`Inspection` of one token sequence [length]; labels from the tokenizer if given."""
    tokens = np.asarray(tokens, np.int32).reshape(-1)
    out = capture(config, params, tokens[None], keep_logits=keep_logits)
    return Inspection(
        tokens=tokens,
        labels=token_labels(tokenizer, tokens)
        if tokenizer is not None
        else [str(t) for t in tokens],
        attention=out["attention"][0],
        log_probs=out["log_probs"][0],
        residual=out["residual"][0],
        logits=out["logits"][0] if keep_logits else None,
    )


def inspect_text(
    config: ModelConfig, params, tokenizer, text: str, *, bos: bool = True, keep_logits: bool = True
) -> Inspection:
    """`Inspection` of a prompt: encoded by the tokenizer, after a bos token if `bos` and the
    tokenizer has one."""
    ids = tokenizer.encode(text)
    bos_id = getattr(tokenizer, "bos_id", -1)
    if bos and bos_id is not None and bos_id >= 0:
        ids = [bos_id, *ids]
    return inspect_tokens(config, params, ids, tokenizer, keep_logits=keep_logits)


def repeated_random_tokens(
    vocab: int, span: int, *, batch: int = 1, seed: int = 0, prefix=(), low: int = 0
) -> np.ndarray:
    """[batch, len(prefix) + 2 * span]: `prefix`, then a random span of ids in [low, vocab)
    written twice, the probe on which induction heads show (Olsson et al. 2022)."""
    rng = np.random.default_rng(seed)
    spans = rng.integers(low, vocab, size=(batch, span))
    prefix = np.broadcast_to(np.asarray(prefix, np.int64), (batch, len(prefix)))
    return np.concatenate([prefix, spans, spans], axis=1).astype(np.int32)


# ------------------------------------------------------------------------------- plots
# Matplotlib figures for notebooks: each function returns the Figure (shown inline by
# Jupyter; `fig.savefig(path)` to keep it). The backend is left as the caller set it.


def plot_attention(weights, labels, *, title: str = "", ax=None, colorbar: bool = True):
    """Heatmap of one head's attention weights [q, k]: queries down, keys across, tokens on
    both axes."""
    import matplotlib.pyplot as plt

    weights = np.asarray(weights)
    n = weights.shape[-1]
    if ax is None:
        size = min(12.0, 2.5 + 0.28 * n)
        fig, ax = plt.subplots(figsize=(size + 1.2, size))
    else:
        fig = ax.figure
    image = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    if labels is not None and n <= 80:
        ax.set_xticks(range(n), labels, rotation=90, fontsize=7)
        ax.set_yticks(range(n), labels, fontsize=7)
    ax.set_xlabel("key (attended-to token)")
    ax.set_ylabel("query (attending token)")
    if title:
        ax.set_title(title)
    if colorbar:
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
    return fig


def plot_layer_heads(layer_weights, labels, *, layer: int, columns: int = 4, scores=None):
    """A grid of every head of one layer: layer_weights [heads, q, k]; `scores` [heads] (e.g.
    induction scores) are added to the panel titles."""
    import matplotlib.pyplot as plt

    layer_weights = np.asarray(layer_weights)
    heads, n = layer_weights.shape[0], layer_weights.shape[-1]
    columns = min(columns, heads)
    rows = -(-heads // columns)
    show_labels = labels is not None and n <= 24
    height = 3.3 + (0.9 if show_labels else 0.0)  # room for the rotated key labels
    fig, axes = plt.subplots(
        rows,
        columns,
        figsize=(3.4 * columns + 1.0, height * rows),
        squeeze=False,
        layout="constrained",
    )
    for h in range(rows * columns):
        ax = axes[h // columns, h % columns]
        if h >= heads:
            ax.axis("off")
            continue
        image = ax.imshow(
            layer_weights[h], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest"
        )
        title = f"head {h}" + (f" ({scores[h]:.2f})" if scores is not None else "")
        ax.set_title(title, fontsize=9)
        if show_labels:
            ax.set_xticks(range(n), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(n), labels, fontsize=6)
        else:
            ax.set_xlabel("key position", fontsize=8)
            ax.set_ylabel("query position", fontsize=8)
    fig.suptitle(f"layer {layer}: attention of every head (rows: queries, columns: keys)")
    fig.colorbar(image, ax=axes, shrink=0.6, label="attention weight")
    return fig


def plot_head_scores(scores, *, name: str = "induction score", title: str = ""):
    """Heatmap of a per-head score [layers, heads], values written in the cells when few."""
    import matplotlib.pyplot as plt

    scores = np.asarray(scores)
    layers, heads = scores.shape
    fig, ax = plt.subplots(figsize=(1.6 + 0.55 * heads, 1.2 + 0.3 * layers))
    image = ax.imshow(
        scores,
        cmap="magma",
        aspect="auto",
        interpolation="nearest",
        vmin=0.0,
        vmax=max(1.0, float(np.nanmax(scores))),
    )
    ax.set_xticks(range(heads))
    ax.set_yticks(range(layers))
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    if layers * heads <= 400:
        for layer in range(layers):
            for head in range(heads):
                value = scores[layer, head]
                ax.text(
                    head,
                    layer,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if value < 0.6 else "black",
                )
    ax.set_title(title or f"{name} per head")
    fig.colorbar(image, ax=ax, label=name)
    fig.tight_layout()
    return fig


def plot_log_probs(labels, log_probs, *, title: str = ""):
    """Per-token surprise: a bar per token of -log p(token | tokens before it), in nats."""
    import matplotlib.pyplot as plt

    surprise = -np.asarray(log_probs, np.float64)
    n = len(surprise)
    fig, ax = plt.subplots(figsize=(min(16.0, 2.0 + 0.32 * n), 3.6))
    values = np.nan_to_num(surprise, nan=0.0)
    colors = plt.get_cmap("RdYlGn_r")(np.clip(values / max(values.max(), 1e-9), 0, 1))
    ax.bar(range(n), values, color=colors)
    ax.set_xticks(range(n), labels, rotation=90, fontsize=8)
    ax.set_ylabel("-log p(token | prefix) [nats]")
    ax.set_xlabel("token")
    ax.set_title(title or f"per-token surprise (mean {np.nanmean(surprise):.2f} nats)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def top_heads(scores, k: int = 5) -> list[tuple[int, int, float]]:
    """The k highest-scoring heads of a [layers, heads] score: [(layer, head, score), ...]."""
    scores = np.asarray(scores)
    order = np.argsort(scores, axis=None)[::-1][:k]
    return [
        (int(i // scores.shape[1]), int(i % scores.shape[1]), float(scores.flat[i])) for i in order
    ]
