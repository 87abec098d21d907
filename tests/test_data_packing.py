"""Window packing of LM rows (`lm.data.packing`): against plain-Python references, every token
kept, rows as full as grain's first-fit packer makes them, and exact resume from any row."""

import json

import grain
import numpy as np
import pytest
from lm.data import packing


def random_documents(n, seed, longest=200):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, longest, size=n)
    return [rng.integers(1, 1000, size=k).astype(np.int32) for k in lengths]


def reference_first_fit(lengths, seq_len):
    """First-fit over every open row, one piece at a time: (row, offset, segment) lists."""
    room, count, out = [], [], []
    for n in lengths:
        r = next((i for i, left in enumerate(room) if left >= n), len(room))
        if r == len(room):
            room.append(seq_len)
            count.append(0)
        out.append((r, seq_len - room[r], count[r] + 1))
        room[r] -= n
        count[r] += 1
    return out


def test_cut_pieces_are_the_documents_windows():
    lengths = np.array([0, 1, 2, 5, 9, 10, 11])
    doc, start, size = packing.cut_pieces(lengths, 4)
    expected = [
        (d, s, min(4, n - 1 - s)) for d, n in enumerate(lengths) for s in range(0, n - 1, 4)
    ]
    assert list(zip(doc.tolist(), start.tolist(), size.tolist(), strict=True)) == expected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_first_fit_places_pieces_as_one_at_a_time_first_fit_does(seed):
    rng = np.random.default_rng(seed)
    lengths = np.where(rng.random(300) < 0.3, 16, rng.integers(1, 17, size=300))
    row, offset, segment = packing.first_fit(lengths, 16)
    reference = reference_first_fit(lengths.tolist(), 16)
    # The same rows up to their numbering: full pieces are numbered after the others here.
    assert sorted(zip(offset.tolist(), segment.tolist(), strict=True)) == sorted(
        (o, s) for _, o, s in reference
    )
    groups = lambda rows: sorted(
        tuple(np.flatnonzero(np.asarray(rows) == r).tolist()) for r in set(rows)
    )
    assert groups(row.tolist()) == groups([r for r, _, _ in reference])


@pytest.mark.parametrize("shuffle", [False, True])
def test_window_rows_hold_every_token_once_as_slices_of_documents(shuffle):
    docs = random_documents(60, seed=3)
    rng = np.random.default_rng(0) if shuffle else None
    rows = packing.pack_window(docs, 32, rng)
    assert {k: v.shape[1] for k, v in rows.items()} == dict.fromkeys(rows, 32)
    np.testing.assert_array_equal(rows["weights"], (rows["segment_ids"] > 0).astype(np.float32))
    pieces = []
    for r in range(len(rows["inputs"])):
        seg = rows["segment_ids"][r]
        ids = [s for s in dict.fromkeys(seg.tolist()) if s]
        assert ids == list(range(1, len(ids) + 1))
        assert not rows["inputs"][r][seg == 0].any()
        for s in ids:
            at = np.flatnonzero(seg == s)
            np.testing.assert_array_equal(at, np.arange(at[0], at[-1] + 1))
            np.testing.assert_array_equal(rows["positions"][r, at], np.arange(len(at)))
            pieces.append(np.append(rows["inputs"][r, at], rows["targets"][r, at[-1]]))
    doc_pieces = [d[s : s + 33] for d in docs for s in range(0, len(d) - 1, 32)]
    key = lambda p: p.tobytes()
    assert sorted(map(key, pieces)) == sorted(map(key, doc_pieces))
    if not shuffle:  # rows in document order: the first row opens with the first document
        np.testing.assert_array_equal(
            rows["inputs"][0, :5], next(d for d in docs if len(d) > 1)[:5]
        )


def documents_dataset(docs):
    return grain.MapDataset.source(docs).to_iter_dataset()


def test_rows_are_at_least_as_full_as_grains_first_fit_packer():
    docs = random_documents(800, seed=5, longest=300)
    seq_len, bins = 64, 8
    ours = packing.PackedRows(
        documents_dataset(docs), seq_len, window_tokens=1 << 15, seed=0, shuffle=True
    )
    pieces = [
        {"inputs": p[:-1], "targets": p[1:]}
        for d in docs
        for p in (d[s : s + seq_len + 1] for s in range(0, len(d) - 1, seq_len))
    ]
    theirs = grain.experimental.FirstFitPackIterDataset(
        grain.MapDataset.source(pieces).to_iter_dataset(),
        length_struct={"inputs": seq_len, "targets": seq_len},
        num_packing_bins=bins,
        shuffle_bins=False,
    )
    our_rows = [r["weights"] for r in ours]
    their_rows = [r["inputs_segment_ids"] > 0 for r in theirs]
    assert sum(r.sum() for r in our_rows) == sum(r.sum() for r in their_rows)  # every token
    assert len(our_rows) <= len(their_rows)


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_from_any_row_equals_the_unbroken_stream(shuffle):
    docs = random_documents(120, seed=7)
    make = lambda: packing.PackedRows(
        documents_dataset(docs), 24, window_tokens=1500, seed=4, shuffle=shuffle
    )
    reference = list(make())
    assert len(reference) > 3 * 1500 // 24 / 2, "the stream spans several windows"
    for n in range(0, len(reference) + 1, 13):
        it = iter(make())
        for _ in range(n):
            next(it)
        resumed = iter(make())
        next(resumed)
        resumed.set_state(json.loads(json.dumps(it.get_state())))
        rest = list(resumed)
        assert len(rest) == len(reference) - n
        for a, b in zip(rest, reference[n:], strict=True):
            assert all(np.array_equal(a[k], b[k]) for k in b)


def test_a_state_of_grains_packer_is_a_clear_error():
    it = iter(packing.PackedRows(documents_dataset([]), 8, window_tokens=64, seed=0, shuffle=True))
    with pytest.raises(ValueError, match="another packing"):
        it.set_state({"parent": {}, "current_index": 3})
