"""Encoder-decoder examples: T5 span corruption and translation pairs.

Both builders turn a grain dataset of records into a ``grain.IterDataset`` of
unbatched examples (numpy; int32 unless said), which ``pipeline`` batches:

* ``encoder_inputs`` [Le]: encoder tokens, ending with eos, then 0 (pad);
* ``encoder_segment_ids`` [Le]: 1 on real tokens, 0 on padding;
* ``inputs`` [Ld]: decoder inputs, ``[bos] + targets[:-1]``;
* ``targets`` [Ld]: target tokens followed by eos, then 0;
* ``segment_ids`` [Ld]: 1 on real target positions, 0 on padding;
* ``positions`` [Ld]: 0, 1, 2, ... on real positions, 0 on padding;
* ``weights`` [Ld] float32: 1.0 on real target positions, 0.0 on padding;

with ``Le = cfg.encoder_len`` and ``Ld = cfg.seq_len``.  Longer sequences are
truncated (the eos is then cut off); one example per row, no packing.

``cfg`` is anything with the ``DataConfig`` fields used here (``seq_len``,
``encoder_len``, ``noise_density``, ``mean_noise_span_length``); the tokenizer
anything with ``encode(str) -> list[int]``, ``bos_id``, ``eos_id`` and (span
corruption) ``sentinel_id(i)``.

Span corruption (Raffel et al. 2020, "T5"), written here from the description:
a document is tokenized and cut into chunks of ``n`` tokens, ``n`` the largest
length whose corrupted inputs fit ``encoder_len`` and targets fit ``seq_len``.
In a chunk, ``round(n * noise_density)`` tokens are noise, grouped into
``round(noise / mean_noise_span_length)`` spans.  Span lengths are a uniformly
random composition of the noise count; the non-noise tokens are split likewise
into the gaps between spans (the gaps before the first and after the last span
may be empty, so a chunk may start or end with noise; with exactly k spans the
first and last tokens are noise less often than the others, about k / non-noise,
where T5 never masks the first token and always masks the last).  Each noise span is
replaced in the encoder input by one sentinel (``sentinel_id(0)``,
``sentinel_id(1)``, ... in order), and the target is every sentinel followed by
the tokens it replaced, then eos.  The random numbers of a chunk come from
``numpy.random.default_rng((seed, record index, chunk index))``: no global
state, so the stream is a pure function of the seed and the record order, and a
grain iterator restored with ``set_state`` continues exactly.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Protocol

import grain
import numpy as np


class Seq2SeqConfig(Protocol):
    seq_len: int
    encoder_len: int
    noise_density: float
    mean_noise_span_length: float


class Seq2SeqTokenizer(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def sentinel_id(self, i: int) -> int: ...


# ---------------------------------------------------------------------------
# Example format.


def _pad(tokens: np.ndarray, length: int) -> np.ndarray:
    """``tokens`` [<= length] -> int32 [length], right-padded with 0."""
    out = np.zeros(length, np.int32)
    out[: len(tokens)] = tokens
    return out


def make_example(
    encoder_tokens: Sequence[int],
    target_tokens: Sequence[int],
    *,
    encoder_len: int,
    seq_len: int,
    bos_id: int,
) -> dict[str, np.ndarray]:
    """One seq2seq example in the format of the module docstring.

    Args:
      encoder_tokens: [n] the full encoder sequence (eos included).
      target_tokens: [m] the full target sequence (eos included).
      encoder_len, seq_len: output lengths Le, Ld; longer sequences are truncated.
      bos_id: first decoder input.
    Returns:
      dict of 'encoder_inputs', 'encoder_segment_ids' [Le] and 'inputs',
      'targets', 'segment_ids', 'positions' [Ld] int32, 'weights' [Ld] float32.
    """
    enc = np.asarray(encoder_tokens, np.int32)[:encoder_len]
    tgt = np.asarray(target_tokens, np.int32)[:seq_len]
    dec_in = np.concatenate([np.asarray([bos_id], np.int32), tgt[:-1]])
    real = np.arange(seq_len) < len(tgt)
    return {
        "encoder_inputs": _pad(enc, encoder_len),
        "encoder_segment_ids": _pad(np.ones(len(enc), np.int32), encoder_len),
        "inputs": _pad(dec_in, seq_len),
        "targets": _pad(tgt, seq_len),
        "segment_ids": real.astype(np.int32),
        "positions": np.where(real, np.arange(seq_len), 0).astype(np.int32),
        "weights": real.astype(np.float32),
    }


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _as_iter(ds: grain.MapDataset | grain.IterDataset) -> grain.IterDataset:
    return ds.to_iter_dataset() if isinstance(ds, grain.MapDataset) else ds


# ---------------------------------------------------------------------------
# Translation.


class _TranslationExample(grain.transforms.Map):
    """{'source': str, 'target': str, ...} -> seq2seq example (source -> target)."""

    def __init__(self, tokenizer: Seq2SeqTokenizer, cfg: Seq2SeqConfig):
        self._tokenizer = tokenizer
        self._encoder_len = cfg.encoder_len
        self._seq_len = cfg.seq_len

    def map(self, element: dict[str, Any]) -> dict[str, np.ndarray]:
        tok = self._tokenizer
        source = list(tok.encode(_text(element["source"]))) + [tok.eos_id]
        target = list(tok.encode(_text(element["target"]))) + [tok.eos_id]
        return make_example(
            source, target, encoder_len=self._encoder_len, seq_len=self._seq_len, bos_id=tok.bos_id
        )


def translation_examples(
    ds: grain.MapDataset | grain.IterDataset, tokenizer: Seq2SeqTokenizer, cfg: Seq2SeqConfig
) -> grain.IterDataset:
    """Records {'source', 'target'} -> IterDataset of seq2seq examples.

    Encoder: ``encode(source) + [eos]``; targets: ``encode(target) + [eos]``;
    both truncated to ``cfg.encoder_len`` / ``cfg.seq_len``.  Deterministic (no
    randomness).  A MapDataset is mapped, then turned into an IterDataset with
    default read options (pass an IterDataset to choose them).
    """
    if isinstance(ds, grain.MapDataset):
        return ds.map(_TranslationExample(tokenizer, cfg)).to_iter_dataset()
    return ds.map(_TranslationExample(tokenizer, cfg))


# ---------------------------------------------------------------------------
# Span corruption.


def span_counts(
    length: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int]:
    """(noise tokens, noise spans) for a chunk of ``length`` >= 2 tokens.

    At least one noise token and one non-noise token; at least one span, and
    no more spans than noise tokens or than non-noise tokens + 1.
    """
    num_noise = int(np.clip(round(length * noise_density), 1, length - 1))
    num_spans = round(num_noise / mean_noise_span_length)
    num_spans = int(np.clip(num_spans, 1, min(num_noise, length - num_noise + 1)))
    return num_noise, num_spans


def _corrupted_lengths(
    length: int, noise_density: float, mean_noise_span_length: float
) -> tuple[int, int]:
    """(encoder length, target length) after corrupting ``length`` tokens, eos included."""
    num_noise, num_spans = span_counts(length, noise_density, mean_noise_span_length)
    return length - num_noise + num_spans + 1, num_noise + num_spans + 1


@functools.lru_cache(maxsize=64)
def chunk_length(
    encoder_len: int, seq_len: int, noise_density: float, mean_noise_span_length: float
) -> int:
    """Largest n such that every chunk of 2..n tokens, corrupted, fits both lengths."""
    if not 0.0 < noise_density < 1.0:
        raise ValueError(f"noise_density must be in (0, 1), got {noise_density}.")
    if mean_noise_span_length < 1.0:
        raise ValueError(f"mean_noise_span_length must be >= 1, got {mean_noise_span_length}.")
    n = 1
    while True:
        enc, tgt = _corrupted_lengths(n + 1, noise_density, mean_noise_span_length)
        if enc > encoder_len or tgt > seq_len:
            break
        n += 1
    if n < 2:
        raise ValueError(
            f"encoder_len={encoder_len}, seq_len={seq_len} are too short for span corruption."
        )
    return n


def _composition(rng: np.random.Generator, total: int, parts: int) -> np.ndarray:
    """Uniformly random split of ``total`` into ``parts`` positive integers [parts]."""
    cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [total]]))


def noise_spans(
    length: int, noise_density: float, mean_noise_span_length: float, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """Random noise spans of a chunk: sorted, disjoint, non-adjacent (start, end) pairs."""
    num_noise, num_spans = span_counts(length, noise_density, mean_noise_span_length)
    noise = _composition(rng, num_noise, num_spans)
    # num_spans + 1 gaps; inner gaps >= 1, the two outer gaps >= 0.
    gaps = _composition(rng, length - num_noise + 2, num_spans + 1)
    gaps[0] -= 1
    gaps[-1] -= 1
    spans, pos = [], 0
    for gap, size in zip(gaps[:-1], noise, strict=True):
        pos += int(gap)
        spans.append((pos, pos + int(size)))
        pos += int(size)
    return spans


def corrupt(
    tokens: Sequence[int], spans: Sequence[tuple[int, int]], sentinels: Sequence[int], eos_id: int
) -> tuple[list[int], list[int]]:
    """Applies noise spans: (encoder tokens, target tokens), each ending with eos.

    Args:
      tokens: [n] the chunk.
      spans: k sorted disjoint (start, end) noise spans.
      sentinels: >= k sentinel ids; span i is replaced by sentinels[i].
    """
    inputs, targets, pos = [], [], 0
    for i, (start, end) in enumerate(spans):
        inputs += list(tokens[pos:start]) + [sentinels[i]]
        targets += [sentinels[i]] + list(tokens[start:end])
        pos = end
    inputs += list(tokens[pos:])
    return inputs + [eos_id], targets + [eos_id]


def _seed_word(seed: int) -> int:
    return int(seed) % (1 << 64)


class _SpanCorruption(grain.experimental.FlatMapTransform):
    """(record index, {'text': str}) -> list of span-corrupted examples, one per chunk."""

    max_fan_out = 1 << 20  # unused by FlatMapIterDataset; a document may make many chunks

    def __init__(self, tokenizer: Seq2SeqTokenizer, cfg: Seq2SeqConfig, seed: int):
        self._tokenizer = tokenizer
        self._cfg = cfg
        self._seed = _seed_word(seed)
        self._chunk = chunk_length(
            cfg.encoder_len, cfg.seq_len, cfg.noise_density, cfg.mean_noise_span_length
        )
        max_spans = max(
            span_counts(n, cfg.noise_density, cfg.mean_noise_span_length)[1]
            for n in range(2, self._chunk + 1)
        )
        try:
            self._sentinels = [tokenizer.sentinel_id(i) for i in range(max_spans)]
        except ValueError as e:
            raise ValueError(
                f"Span corruption needs {max_spans} sentinel pieces (<extra_id_0>...) for "
                f"chunks of {self._chunk} tokens; the tokenizer lacks them ({e}). Train it "
                "with num_sentinels > 0."
            ) from e

    def flat_map(self, element: tuple[int, dict[str, Any]]) -> list[dict[str, np.ndarray]]:
        index, record = element
        tokens = list(self._tokenizer.encode(_text(record["text"])))
        examples = []
        for c, start in enumerate(range(0, len(tokens), self._chunk)):
            chunk = tokens[start : start + self._chunk]
            if len(chunk) >= 2:
                examples.append(self._example(chunk, np.random.default_rng((self._seed, index, c))))
        return examples

    def _example(self, chunk: list[int], rng: np.random.Generator) -> dict[str, np.ndarray]:
        cfg, tok = self._cfg, self._tokenizer
        spans = noise_spans(len(chunk), cfg.noise_density, cfg.mean_noise_span_length, rng)
        inputs, targets = corrupt(chunk, spans, self._sentinels, tok.eos_id)
        return make_example(
            inputs, targets, encoder_len=cfg.encoder_len, seq_len=cfg.seq_len, bos_id=tok.bos_id
        )


def _with_index(index: int, element: Any) -> tuple[int, Any]:
    return index, element


def span_corruption_examples(
    ds: grain.MapDataset | grain.IterDataset,
    tokenizer: Seq2SeqTokenizer,
    cfg: Seq2SeqConfig,
    *,
    seed: int,
) -> grain.IterDataset:
    """Records {'text'} -> IterDataset of span-corrupted seq2seq examples.

    Each record is tokenized, cut into chunks (``chunk_length``) and each chunk
    of >= 2 tokens gives one example; an empty record gives none.  The noise of
    chunk c of the record at index i (its index in ``ds``: a MapDataset's index,
    which keeps growing across ``repeat`` epochs, or an IterDataset's element
    count) is drawn from ``default_rng((seed, i, c))``.  Use a different seed
    per process when each process reads its own shard.
    """
    indexed = ds.map_with_index(_with_index)
    return grain.experimental.FlatMapIterDataset(
        _as_iter(indexed), _SpanCorruption(tokenizer, cfg, seed)
    )
