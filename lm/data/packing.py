"""Documents packed into LM rows a window at a time, with numpy over the whole window.

A document of ``n`` tokens is cut into pieces ``tokens[k*L : k*L + L + 1]`` (consecutive
pieces share one token, so every token after the first is a target exactly once); piece ``p``
gives ``inputs = p[:-1]``, ``targets = p[1:]``. The documents of a window (at least
``window_tokens`` tokens) give pieces that are shuffled, then packed first-fit into rows of
``L`` (a piece goes into the first row with room for it, a new row when none has), and the
rows, shuffled again, are given out one by one as ``{'inputs', 'targets', 'segment_ids',
'positions', 'weights'}`` (``segment_ids`` 1.. in each row in the order its pieces went in, 0
on padding; ``positions`` 0.. in each piece; ``weights`` float32, 1 on real positions).

Grain's packers hand one piece at a time through Python (about 1M tokens/s on one core); here
only the first-fit choice of the pieces shorter than a row is a Python step, the rest is array
work over the window.

The iterator's state is the documents' iterator state at the start of the window, the
window's number and the rows of it given out: a restore reads that window again and goes on
from the same row, so a resumed stream equals an unbroken one.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np


def cut_pieces(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pieces of documents of ``lengths`` tokens: (document, first token, inputs length),
    each int64 [pieces], in document order. Documents of under 2 tokens give none."""
    lengths = np.asarray(lengths, np.int64)
    counts = np.maximum(0, -(-(lengths - 1) // seq_len))
    doc = np.repeat(np.arange(len(lengths)), counts)
    first_piece = np.cumsum(counts) - counts
    start = (np.arange(len(doc)) - np.repeat(first_piece, counts)) * seq_len
    return doc, start, np.minimum(seq_len, lengths[doc] - 1 - start)


def first_fit(lengths: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pieces of ``lengths`` (each <= seq_len) packed first-fit in order into rows of
    ``seq_len``: (row, offset in the row, segment id 1..), each int64 [pieces]. A full piece
    fits no row already open, so it opens its own; only the shorter ones are searched for."""
    lengths = np.asarray(lengths, np.int64)
    row, offset, segment = (np.zeros(len(lengths), np.int64) for _ in range(3))
    partial = np.flatnonzero(lengths < seq_len)
    room = np.full(len(partial) + 1, seq_len, np.int64)  # unopened rows are empty
    count = np.zeros(len(partial) + 1, np.int64)
    for i in partial.tolist():
        n = lengths[i]
        r = int(np.argmax(room >= n))
        row[i], offset[i], segment[i] = r, seq_len - room[r], count[r] + 1
        room[r] -= n
        count[r] += 1
    partial_rows = int(np.count_nonzero(count))
    full = np.flatnonzero(lengths == seq_len)
    row[full] = partial_rows + np.arange(len(full))
    segment[full] = 1
    return row, offset, segment


def pack_window(
    documents: list[np.ndarray], seq_len: int, rng: np.random.Generator | None
) -> dict[str, np.ndarray]:
    """The packed rows of a window of documents, ``[rows, seq_len]`` each (module docstring):
    pieces and rows shuffled with ``rng``, or in document order (rows by their first piece)
    when it is None."""
    lengths = np.asarray([len(d) for d in documents], np.int64)
    tokens = np.concatenate(documents) if documents else np.zeros([0], np.int32)
    doc, start, size = cut_pieces(lengths, seq_len)
    order = rng.permutation(len(doc)) if rng is not None else np.arange(len(doc))
    source = (np.cumsum(lengths) - lengths)[doc[order]] + start[order]
    size = size[order]
    row, offset, segment = first_fit(size, seq_len)
    rows = int(row.max()) + 1 if len(row) else 0
    if rng is None:
        first = np.full(rows, len(row), np.int64)
        np.minimum.at(first, row, np.arange(len(row)))
        rank = np.argsort(first, kind="stable")
    else:
        rank = rng.permutation(rows)
    place = np.empty(rows, np.int64)
    place[rank] = np.arange(rows)
    position = np.arange(int(size.sum())) - np.repeat(np.cumsum(size) - size, size)
    read = np.repeat(source, size) + position
    write = np.repeat(place[row] * seq_len + offset, size) + position
    out = {k: np.zeros(rows * seq_len, np.int32) for k in ("inputs", "targets", "segment_ids")}
    out["positions"] = np.zeros(rows * seq_len, np.int32)
    out["inputs"][write] = tokens[read]
    out["targets"][write] = tokens[read + 1]
    out["segment_ids"][write] = np.repeat(segment, size)
    out["positions"][write] = position
    out["weights"] = (out["segment_ids"] > 0).astype(np.float32)
    return {k: v.reshape(rows, seq_len) for k, v in out.items()}


class PackedRowsIterator(grain.DatasetIterator):
    """Rows of `pack_window` over consecutive windows of the parent's documents."""

    def __init__(self, parent, seq_len: int, window_tokens: int, seed: int, shuffle: bool):
        super().__init__(parent)
        self._seq_len, self._window_tokens = seq_len, window_tokens
        self._seed, self._shuffle = seed, shuffle
        self._window, self._given, self._start = -1, 0, None
        self._rows: dict[str, np.ndarray] = {}

    def _open(self, window: int) -> None:
        """Reads window number ``window`` from the parent's position and packs it."""
        self._window, self._given, self._start = window, 0, self._parent.get_state()
        documents, tokens = [], 0
        while tokens < self._window_tokens:
            try:
                document = next(self._parent)
            except StopIteration:
                break
            documents.append(np.asarray(document))
            tokens += len(document)
        rng = np.random.default_rng([self._seed, self._window]) if self._shuffle else None
        self._rows = pack_window(documents, self._seq_len, rng)

    def _rows_left(self) -> int:
        return len(self._rows["inputs"]) - self._given if self._rows else 0

    def __next__(self) -> dict[str, np.ndarray]:
        if not self._rows_left():
            self._open(self._window + 1)
            if not self._rows_left():
                self._rows = {}
                raise StopIteration
        r = self._given
        self._given += 1
        return {k: v[r] for k, v in self._rows.items()}

    def get_state(self) -> dict[str, Any]:
        if not self._rows_left():  # between windows: the next one starts where the parent is
            return {"parent": self._parent.get_state(), "window": self._window + 1, "given": 0}
        return {"parent": self._start, "window": self._window, "given": self._given}

    def set_state(self, state: dict[str, Any]) -> None:
        if not {"parent", "window", "given"} <= set(state):
            raise ValueError(
                "the data-iterator state was saved by another packing of LM rows (grain's "
                "FirstFitPack, before lm.data.packing); resume that run with the lm version "
                "it was saved with, or start the data afresh with a new workdir."
            )
        self._parent.set_state(state["parent"])
        self._window, self._given, self._rows = state["window"] - 1, 0, {}
        if state["given"]:
            self._open(state["window"])
            self._given = state["given"]


class PackedRows(grain.IterDataset):
    """LM rows packed from an IterDataset of int32 [n] documents (see the module docstring)."""

    def __init__(
        self,
        parent: grain.IterDataset,
        seq_len: int,
        *,
        window_tokens: int,
        seed: int,
        shuffle: bool,
    ):
        super().__init__(parent)
        self._args = seq_len, window_tokens, seed, shuffle

    def __str__(self) -> str:
        seq_len, window_tokens, seed, shuffle = self._args
        return f"PackedRows(seq_len={seq_len}, window_tokens={window_tokens}, shuffle={shuffle})"

    def __iter__(self) -> PackedRowsIterator:
        return PackedRowsIterator(self._parent.__iter__(), *self._args)
