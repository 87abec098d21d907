"""Grain pipelines: config checks, tokenizer reuse, LM packing, sharding, exact resume."""

import collections
import dataclasses
import json
import math
import sys

import jax
import numpy as np
import pytest
from lm.data import pipeline, sources
from lm.data.pipeline import DataConfig

SYLLABLES = "ka lo mi ra su te vo na shi ge bu da ri po me".split()


def write_corpus(root, n_docs=9, seed=0):
    """Documents of very different lengths (a few longer than seq_len)."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        n_words = int(rng.choice([3, 20, 60, 200]))
        words = ["".join(rng.choice(SYLLABLES, size=rng.integers(1, 4))) for _ in range(n_words)]
        lines = [" ".join(words[j : j + 8]) + "." for j in range(0, n_words, 8)]
        (root / f"doc{i:02d}.txt").write_text("\n".join(lines))
    return f"text:{root}/*.txt"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(cfg, tokenizer) for a small text corpus, tokenizer trained once."""
    root = tmp_path_factory.mktemp("pipe")
    cfg = DataConfig(
        source=write_corpus(root / "corpus", n_docs=40),
        data_dir=str(root / "tfds"),
        seq_len=32,
        batch_size=4,
        vocab_size=320,
    )
    tok = pipeline.get_tokenizer(cfg, str(root / "work"))
    return cfg, tok


def doc_tokens(cfg, split, tok):
    """Each record's [bos] + tokens + [eos], in source order."""
    return [
        [tok.bos_id, *tok.encode(r["text"]), tok.eos_id] for r in sources.get_source(cfg, split)
    ]


def take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ---------------------------------------------------------------------------
# DataConfig.


def test_config_defaults_and_from_dict():
    cfg = DataConfig.from_dict({"seq_len": 128, "noise_density": 0.5, "mean_noise_span_length": 2})
    assert cfg.seq_len == 128 and cfg.source == "shakespeare" and cfg.batch_size == 32
    assert cfg.mean_noise_span_length == 2.0 and isinstance(cfg.mean_noise_span_length, float)
    ml_collections = pytest.importorskip("ml_collections")
    cd = ml_collections.ConfigDict({"task": "translation", "source": "bible:4-l"})
    assert DataConfig.from_dict(cd).task == "translation"


def test_config_unknown_key_names_it_and_lists_valid():
    with pytest.raises(ValueError) as err:
        DataConfig.from_dict({"seq_length": 64})
    assert "data.seq_length" in str(err.value) and "seq_len" in str(err.value)


@pytest.mark.parametrize(
    "key, value",
    [
        ("seq_len", "256"),
        ("seq_len", 256.0),
        ("shuffle", 1),
        ("batch_size", True),
        ("source", None),
        ("noise_density", "0.1"),
    ],
)
def test_config_wrong_type_names_key(key, value):
    with pytest.raises(ValueError, match=f"data.{key} must be"):
        DataConfig.from_dict({key: value})


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"task": "classify"}, "task"),
        ({"seq_len": 0}, "seq_len"),
        ({"noise_density": 1.5}, "noise_density"),
        ({"source": "text:"}, "Unknown data source"),
        ({"worker_count": -1}, "worker_count"),
    ],
)
def test_config_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DataConfig(**kwargs)


# ---------------------------------------------------------------------------
# Tokenizer.


def test_get_tokenizer_trains_once_then_loads(setup, tmp_path, monkeypatch):
    cfg, _ = setup
    tok = pipeline.get_tokenizer(cfg, str(tmp_path))
    assert (tmp_path / "tokenizer.model").exists() and tok.vocab_size == 320
    text = sources.get_source(cfg, "train")[0]["text"]
    assert tok.decode(tok.encode(text)) == text

    def fail(*a, **k):
        raise AssertionError("must not train again")

    monkeypatch.setattr(pipeline, "train_tokenizer", fail)
    again = pipeline.get_tokenizer(cfg, str(tmp_path))
    assert again.serialized_model() == tok.serialized_model()
    # An explicit tokenizer path wins over the workdir.
    explicit = pipeline.get_tokenizer(dataclasses.replace(cfg, tokenizer=tok.path), None)
    assert explicit.path == tok.path
    with pytest.raises(ValueError, match="vocab_size"):
        pipeline.get_tokenizer(dataclasses.replace(cfg, vocab_size=100), str(tmp_path))


def test_span_corruption_tokenizer_has_sentinels(setup, tmp_path):
    cfg, _ = setup
    cfg = dataclasses.replace(cfg, task="span_corruption", vocab_size=480)
    tok = pipeline.get_tokenizer(cfg, str(tmp_path))
    assert tok.id_to_piece(tok.sentinel_id(99)) == "<extra_id_99>"


@pytest.mark.parametrize("content", [b"\x00\x01\x02binary", b""])
def test_bad_corpus_fails_before_writing(tmp_path, content):
    (tmp_path / "c").mkdir()
    for i in range(3):
        (tmp_path / "c" / f"{i}.txt").write_bytes(
            content if i == 1 else b"" if not content else b"ok text\n"
        )
    cfg = DataConfig(source=f"text:{tmp_path}/c/*.txt", data_dir=str(tmp_path / "tfds"))
    work = tmp_path / "work"
    with pytest.raises(ValueError, match="NUL byte" if content else "empty"):
        pipeline.get_tokenizer(cfg, str(work))
    assert not work.exists()


# ---------------------------------------------------------------------------
# LM packing.


def segments(batch):
    """Yields (row, segment id, slice) for every segment of a batch."""
    for r, seg in enumerate(batch["segment_ids"]):
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "segment not contiguous"
            yield r, s, slice(idx[0], idx[-1] + 1)


@pytest.mark.parametrize("shuffle", [False, True])
def test_lm_packing_invariants_and_no_data_loss(setup, shuffle):
    cfg, tok = setup
    cfg = dataclasses.replace(cfg, shuffle=shuffle)
    batches = list(pipeline.make_dataset(cfg, "train", tok, seed=3, repeat=False))
    docs = doc_tokens(cfg, "train", tok)
    assert max(len(d) for d in docs) > 2 * cfg.seq_len, "corpus must exercise splitting"
    doc_strings = [" ".join(map(str, d)) for d in docs]
    inputs, targets = collections.Counter(), collections.Counter()
    for b in batches:
        assert set(b) == {"inputs", "targets", "segment_ids", "positions", "weights"}
        for k, v in b.items():
            assert v.shape == (4, 32) and v.dtype == (np.float32 if k == "weights" else np.int32)
        pad = b["segment_ids"] == 0
        np.testing.assert_array_equal(b["weights"], (~pad).astype(np.float32))
        for k in ("inputs", "targets", "positions"):
            assert not b[k][pad].any(), f"{k} not zero on padding"
        for r, _, sl in segments(b):
            ins, tgt = b["inputs"][r, sl], b["targets"][r, sl]
            np.testing.assert_array_equal(b["positions"][r, sl], np.arange(len(ins)))
            np.testing.assert_array_equal(tgt[:-1], ins[1:])  # targets[i] == inputs[i+1]
            piece = " ".join(map(str, [*ins, tgt[-1]]))
            assert any(piece in d for d in doc_strings), "segment is not a slice of one document"
            inputs.update(ins.tolist())
            targets.update(tgt.tolist())
        # Segment ids count up from 1 within each row.
        for row in b["segment_ids"]:
            ids = [s for s in dict.fromkeys(row.tolist()) if s]
            assert ids == list(range(1, len(ids) + 1))
    # Every token is an input once and every token after a document's first a target once.
    assert inputs == collections.Counter(t for d in docs for t in d[:-1])
    assert targets == collections.Counter(t for d in docs for t in d[1:])
    # Padding only where needed: rows are well filled.
    fill = np.mean([b["weights"].mean() for b in batches[:-1]])
    assert fill > 0.8


def test_long_document_pieces_continue_without_bos(setup):
    cfg, tok = setup
    batches = list(
        pipeline.make_dataset(
            dataclasses.replace(cfg, shuffle=False), "train", tok, seed=0, repeat=False
        )
    )
    first_tokens = [b["inputs"][r, sl][0] for b in batches for r, _, sl in segments(b)]
    n_docs = len(sources.get_source(cfg, "train"))
    assert first_tokens.count(tok.bos_id) == n_docs
    assert len(first_tokens) > n_docs  # Long documents made several pieces.


def test_repeat_false_pads_last_batch(setup):
    cfg, tok = setup
    cfg = dataclasses.replace(cfg, batch_size=64)
    batches = list(pipeline.make_dataset(cfg, "validation", tok, seed=0, repeat=False))
    assert all(b["inputs"].shape == (64, 32) for b in batches)
    empty_rows = (batches[-1]["segment_ids"] == 0).all(axis=1)
    assert empty_rows.any() and not empty_rows.all()
    assert not batches[-1]["weights"][empty_rows].any()
    assert sum(b["weights"].sum() for b in batches) == sum(
        len(d) - 1 for d in doc_tokens(cfg, "validation", tok)
    )


def test_deterministic_and_seed_dependent(setup):
    cfg, tok = setup
    a = take(pipeline.make_dataset(cfg, "train", tok, seed=5), 6)
    b = take(pipeline.make_dataset(cfg, "train", tok, seed=5), 6)
    c = take(pipeline.make_dataset(cfg, "train", tok, seed=6), 6)
    assert_batches_equal(a, b)
    assert any(not np.array_equal(x["inputs"], y["inputs"]) for x, y in zip(a, c, strict=True))


def test_records_reshuffled_each_epoch(setup):
    cfg, tok = setup
    records = pipeline._records(cfg, "train", tok, seed=1, shard=0, num_shards=1, repeat=True)
    n = len(sources.get_source(cfg, "train"))
    epochs = [[records[e * n + i]["name"] for i in range(n)] for e in range(3)]
    assert all(sorted(e) == sorted(epochs[0]) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


# ---------------------------------------------------------------------------
# Sharding across processes.


def test_process_shards_are_disjoint_and_cover(setup):
    cfg, tok = setup
    docs = doc_tokens(cfg, "train", tok)
    seen = []
    for p in range(2):
        batches = list(
            pipeline.make_dataset(
                cfg, "train", tok, seed=0, process_index=p, process_count=2, repeat=False
            )
        )
        assert all(b["inputs"].shape == (2, 32) for b in batches)
        got = collections.Counter(int(t) for b in batches for t in b["targets"][b["weights"] > 0])
        want = collections.Counter(t for d in docs[p::2] for t in d[1:])
        assert got == want, f"process {p} must read exactly records[{p}::2]"
        seen.append(got)
    assert seen[0] + seen[1] == collections.Counter(t for d in docs for t in d[1:])


def test_batch_size_must_divide(setup):
    cfg, tok = setup
    with pytest.raises(ValueError, match="multiple of the number of processes"):
        pipeline.make_dataset(cfg, "train", tok, seed=0, process_index=0, process_count=3)


def _global_batches(cfg, tok, process_count, n, seed=0, states=None):
    """The first n global batches: every process's batch, rows stacked in process order."""
    its = [
        iter(
            pipeline.make_dataset(
                cfg, "train", tok, seed=seed, process_index=p, process_count=process_count
            )
        )
        for p in range(process_count)
    ]
    if states is not None:
        for it in its:
            it.set_state(states)
    batches = [[next(it) for it in its] for _ in range(n)]
    merged = {}
    for it in its:
        merged.update(json.loads(json.dumps(it.get_state())))
    return [{k: np.concatenate([b[k] for b in step]) for k in step[0]} for step in batches], merged


def test_fixed_data_shards_give_the_same_global_batches_on_any_process_count(setup):
    cfg, tok = setup
    cfg = dataclasses.replace(cfg, shards=4)
    one, _ = _global_batches(cfg, tok, 1, 6)
    assert one[0]["inputs"].shape == (cfg.batch_size, 32)
    for processes in (2, 4):
        assert_batches_equal(_global_batches(cfg, tok, processes, 6)[0], one)
    # Default (one shard per process): the layout changes with the process count.
    default_two, _ = _global_batches(dataclasses.replace(cfg, shards=0), tok, 2, 6)
    assert any(
        not np.array_equal(a["inputs"], b["inputs"]) for a, b in zip(default_two, one, strict=True)
    )


def test_data_state_saved_by_two_processes_resumes_in_one(setup):
    """The shards' states written by two processes continue in one process holding all shards."""
    cfg, tok = setup
    cfg = dataclasses.replace(cfg, shards=2)
    reference, _ = _global_batches(cfg, tok, 1, 7)
    _, states = _global_batches(cfg, tok, 2, 3)
    assert sorted(states) == ["shard_0-of-2", "shard_1-of-2"]
    resumed, _ = _global_batches(cfg, tok, 1, 4, states=states)
    assert_batches_equal(resumed, reference[3:])


def test_shards_must_be_a_multiple_of_processes(setup):
    cfg, tok = setup
    with pytest.raises(ValueError, match="multiple of 4"):
        pipeline.make_dataset(
            dataclasses.replace(cfg, shards=2),
            "train",
            tok,
            seed=0,
            process_index=0,
            process_count=4,
        )
    with pytest.raises(ValueError, match="divide"):
        dataclasses.replace(cfg, shards=3)


def test_one_pass_over_several_shards_covers_each_record_once(setup):
    cfg, tok = setup
    cfg = dataclasses.replace(cfg, shards=2)
    docs = doc_tokens(cfg, "train", tok)
    batches = list(pipeline.make_dataset(cfg, "train", tok, seed=0, repeat=False))
    got = collections.Counter(int(t) for b in batches for t in b["targets"][b["weights"] > 0])
    assert got == collections.Counter(t for d in docs for t in d[1:])


def test_count_batches_gives_lockstep_eval(setup):
    cfg, tok = setup
    n = pipeline.count_batches(cfg, "train", tok, seed=0, process_count=2)
    lengths = []
    for p in range(2):
        plain = list(
            pipeline.make_dataset(
                cfg, "train", tok, seed=0, process_index=p, process_count=2, repeat=False
            )
        )
        exact = list(
            pipeline.make_dataset(
                cfg,
                "train",
                tok,
                seed=0,
                process_index=p,
                process_count=2,
                repeat=False,
                num_batches=n,
            )
        )
        assert len(exact) == n
        assert_batches_equal(exact[: len(plain)], plain)
        assert all(b["weights"].sum() == 0 for b in exact[len(plain) :])
        lengths.append(len(plain))
    assert max(lengths) == n


# ---------------------------------------------------------------------------
# Checkpointable iteration.


@pytest.mark.parametrize("n, m", [(0, 5), (3, 4), (11, 9)])
def test_resume_exactly(setup, n, m):
    """n batches, save state (through JSON), fresh iterator, restore, m more == n+m in one go."""
    cfg, tok = setup
    make = lambda: pipeline.make_dataset(cfg, "train", tok, seed=7)
    reference = take(make(), n + m)  # 20 batches span several epochs of this corpus.
    it = iter(make())
    for _ in range(n):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    resumed = iter(make())
    next(resumed)  # Its own progress must be overwritten.
    resumed.set_state(state)
    assert_batches_equal([next(resumed) for _ in range(m)], reference[n:])


def test_resume_with_exact_batches(setup):
    cfg, tok = setup
    n_batches = pipeline.count_batches(cfg, "validation", tok, seed=0) + 2
    make = lambda: pipeline.make_dataset(
        cfg, "validation", tok, seed=0, repeat=False, num_batches=n_batches
    )
    reference = list(make())
    for n in range(len(reference) + 1):
        it = iter(make())
        for _ in range(n):
            next(it)
        resumed = iter(make())
        resumed.set_state(json.loads(json.dumps(it.get_state())))
        assert_batches_equal(list(resumed), reference[n:])


def test_worker_processes_resume(setup):
    cfg, tok = setup
    cfg = dataclasses.replace(cfg, worker_count=2)
    make = lambda: pipeline.make_dataset(cfg, "train", tok, seed=2)
    it = iter(make())
    first = [next(it) for _ in range(3)]
    state = json.loads(json.dumps(it.get_state()))
    rest = [next(it) for _ in range(3)]
    resumed = iter(make())
    resumed.set_state(state)
    assert_batches_equal([next(resumed) for _ in range(3)], rest)
    assert all(b["inputs"].shape == (4, 32) for b in first)


# ---------------------------------------------------------------------------
# Seq2seq dispatch.


def test_translation_batches(setup, monkeypatch):
    cfg, tok = setup
    from lm.data import bible

    pairs = [{"source": f"ka lo {i} mi", "target": f"ra su {i}"} for i in range(10)]
    monkeypatch.setattr(bible, "bible_source", lambda pair, split, data_dir, db_path=None: pairs)
    cfg = dataclasses.replace(cfg, source="bible:4-l", task="translation", encoder_len=16)
    batches = list(pipeline.make_dataset(cfg, "train", tok, seed=0, repeat=False))
    assert len(batches) == 3
    b = batches[0]
    assert b["encoder_inputs"].shape == (4, 16) and b["encoder_segment_ids"].shape == (4, 16)
    assert b["inputs"].shape == b["targets"].shape == b["weights"].shape == (4, 32)
    assert b["weights"].dtype == np.float32
    assert batches[-1]["weights"][2:].sum() == 0  # 10 = 4 + 4 + 2 real rows.
    targets = sorted(
        tok.decode(t[w > 0])
        for b in batches
        for t, w in zip(b["targets"], b["weights"], strict=True)
        if w.any()
    )
    assert targets == sorted(p["target"] for p in pairs)


def test_span_corruption_batches_resume(setup, tmp_path):
    cfg, _ = setup
    cfg = dataclasses.replace(cfg, task="span_corruption", vocab_size=480, encoder_len=32)
    tok = pipeline.get_tokenizer(cfg, str(tmp_path))
    make = lambda: pipeline.make_dataset(cfg, "train", tok, seed=1)
    reference = take(make(), 6)
    assert reference[0]["encoder_inputs"].shape == (4, 32)
    assert (reference[0]["encoder_inputs"] == tok.sentinel_id(0)).any()
    it = iter(make())
    for _ in range(2):
        next(it)
    resumed = iter(make())
    resumed.set_state(json.loads(json.dumps(it.get_state())))
    assert_batches_equal([next(resumed) for _ in range(4)], reference[2:])


# ---------------------------------------------------------------------------
# Statistics.


def test_bytes_per_token_and_unigram_entropy(setup):
    cfg, tok = setup
    texts = [r["text"] for r in sources.get_source(cfg, "validation")]
    n_bytes = sum(len(t.encode()) for t in texts)
    n_tokens = sum(len(tok.encode(t)) + 1 for t in texts)
    assert pipeline.bytes_per_token(cfg, "validation", tok) == pytest.approx(n_bytes / n_tokens)
    h = pipeline.unigram_entropy(cfg, tok)
    train = collections.Counter(t for d in doc_tokens(cfg, "train", tok) for t in d[1:])
    valid = [t for d in doc_tokens(cfg, "validation", tok) for t in d[1:]]
    total = sum(train.values()) + tok.vocab_size
    want = -np.mean([math.log((train[t] + 1) / total) for t in valid])
    assert h == pytest.approx(want)
    assert 0 < h < math.log(tok.vocab_size)


# ---------------------------------------------------------------------------
# Data state in checkpoints (lm.checkpoint.DataStateHandler).


def _save_and_reload(tmp_path, cfg, tok, restore_cfg, rename=None):
    """Saves a checkpoint after 3 batches of `cfg`, then restores it into an iterator of
    `restore_cfg`; returns (the next 2 batches after restoring, the checkpoint's files)."""
    import jax.numpy as jnp
    from lm.checkpoint import Checkpointer

    state = {"x": jnp.arange(3.0)}
    it = iter(pipeline.make_dataset(cfg, "train", tok, seed=4))
    for _ in range(3):
        next(it)
    saver = Checkpointer(tmp_path, async_save=False)
    saver.save(3, state, it)
    saver.close()
    data_dir = tmp_path / "checkpoints" / "3" / "data"
    if rename:
        (data_dir / rename[0]).rename(data_dir / rename[1])
    files = sorted(p.name for p in data_dir.iterdir())
    resumed = iter(pipeline.make_dataset(restore_cfg, "train", tok, seed=4))
    loader = Checkpointer(tmp_path, async_save=False)
    try:
        loader.restore(
            jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state), resumed
        )
    finally:
        loader.close()
    return [next(resumed) for _ in range(2)], files


def test_checkpointed_data_state_resumes_and_reads_the_pre_shard_format(setup, tmp_path):
    cfg, tok = setup
    reference = take(pipeline.make_dataset(cfg, "train", tok, seed=4), 5)[3:]
    resumed, files = _save_and_reload(tmp_path / "a", cfg, tok, cfg)
    assert "shard_0-of-1.json" in files
    assert_batches_equal(resumed, reference)
    # Checkpoints written before data shards existed hold grain's process_0-of-1.json.
    resumed, files = _save_and_reload(
        tmp_path / "b", cfg, tok, cfg, rename=("shard_0-of-1.json", "process_0-of-1.json")
    )
    assert "process_0-of-1.json" in files
    assert_batches_equal(resumed, reference)


def test_data_state_of_other_shards_is_a_clear_error_and_kept(setup, tmp_path):
    from lm.checkpoint import CheckpointMismatchError

    cfg, tok = setup
    with pytest.raises(CheckpointMismatchError, match="data.shards"):
        _save_and_reload(tmp_path, dataclasses.replace(cfg, shards=2), tok, cfg)
    data_dir = tmp_path / "checkpoints" / "3" / "data"
    assert sorted(p.name for p in data_dir.glob("*.json")) == [
        "shard_0-of-2.json",
        "shard_1-of-2.json",
    ]
    assert not (tmp_path / "unreadable_checkpoints").exists()  # not set aside as corrupt


def test_epoch_shuffles_are_safe_across_read_threads():
    """Grain reads records in several threads, which share the shuffles' permutation caches
    (two threads may evict the same epoch at once)."""
    import concurrent.futures

    import grain

    n, epochs = 2, 3000
    source = grain.MapDataset.source(list(range(n)))
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch often enough to meet inside an eviction
    try:
        for shuffle in (pipeline._EpochShuffle(source, 3), pipeline._ChunkShuffle(source, 2, 3)):
            indices = range(epochs * n)
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                got = list(pool.map(shuffle.__getitem__, indices, chunksize=1))
            for e in range(epochs):
                assert sorted(got[e * n : (e + 1) * n]) == list(range(n))
    finally:
        sys.setswitchinterval(interval)
