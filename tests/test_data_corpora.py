"""Corpora read in place (`lm.data.corpora`): one corpus written in every format, in several
shards, plain, gzip and zstd, gives the same records and the same batches from each."""

import dataclasses
import gzip
import json
import os
import pathlib
import pickle
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from lm.data import pipeline, sources

FORMATS = ["jsonl", "jsonl.gz", "jsonl.zst", "parquet", "datasets"]


def documents(n=900, seed=0):
    """Documents of 0 to ~60 words: unicode, quotes, tabs and newlines inside, some empty."""
    rng = np.random.default_rng(seed)
    words = ["thou", "art", "Hamlet", "naïve", 'say "hi"', "tab\there", "line\nbreak", "日本"]
    return [" ".join(rng.choice(words, size=rng.integers(0, 60))) for _ in range(n)]


def write_corpus(root, docs, fmt, shards=4):
    """`docs` in `shards` files of format `fmt` under root; returns the data.source."""
    parts = np.array_split(np.arange(len(docs)), shards)
    rows = [
        [{"id": int(i), "text": docs[i], "meta": {"n": len(docs[i])}} for i in p] for p in parts
    ]
    out = root / fmt.replace(".", "_")
    out.mkdir(parents=True)
    if fmt == "datasets":
        # save_to_disk names them data-0000K-of-0000N.arrow; named as the other formats'
        # files here, they hold out the same documents.
        names = [f"part-{k:02d}.arrow" for k in range(shards)]
        for name, part in zip(names, rows, strict=True):
            table = pa.Table.from_pylist(part)
            with pa.ipc.new_stream(str(out / name), table.schema) as writer:
                writer.write_table(table, max_chunksize=64)
        (out / "state.json").write_text(
            json.dumps({"_data_files": [{"filename": n} for n in names]})
        )
        return f"datasets:{out}"
    for k, part in enumerate(rows):
        path = out / f"part-{k:02d}.{fmt}"
        if fmt == "parquet":
            pq.write_table(pa.Table.from_pylist(part), str(path), row_group_size=50)
            continue
        # Blank lines and CRLF endings are not records.
        data = "".join(json.dumps(r) + ("\r\n" if r["id"] % 7 == 0 else "\n\n") for r in part)
        data = data.encode()
        if fmt.endswith(".gz"):
            data = gzip.compress(data)
        elif fmt.endswith(".zst"):
            data = zstandard.ZstdCompressor().compress(data)
        path.write_bytes(data)
    suffix = "parquet" if fmt == "parquet" else fmt
    return f"{fmt.split('.')[0]}:{out}/*.{suffix}"


def config(source, tmp_path, **kw):
    values = dict(source=source, seq_len=32, batch_size=8, vocab_size=290, data_dir=str(tmp_path))
    return pipeline.DataConfig(**(values | kw))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    docs = documents()
    return root, docs, {fmt: write_corpus(root, docs, fmt) for fmt in FORMATS}


def texts(cfg, split):
    return [r["text"] for r in sources.get_source(cfg, split)]


def test_every_format_holds_the_same_records(corpus):
    root, docs, sources_by_format = corpus
    want = None
    for fmt, source in sources_by_format.items():
        got = {split: texts(config(source, root), split) for split in sources.SPLITS}
        assert want is None or got == want, fmt
        want = got
    # Four files: whole files are held out (one each for test and validation), rows in order.
    parts = [list(p) for p in np.array_split(docs, 4)]
    held = sources.holdout_split([f"part-{k:02d}" for k in range(4)], 1)
    for split in sources.SPLITS:
        assert want[split] == [
            d for k, p in enumerate(parts) for d in p if held[f"part-{k:02d}"] == split
        ]


def test_every_format_gives_the_same_batches(corpus, caplog):
    root, _, sources_by_format = corpus
    tokenizer = pipeline.get_tokenizer(config(sources_by_format["jsonl"], root), None)

    def batches(source, split, **kw):
        # Training as the second of two processes; evaluation on one (225 held-out records
        # are a single chunk, which one data shard holds).
        processes = dict(process_count=2, process_index=1) if split == "train" else {}
        ds = pipeline.make_dataset(
            config(source, root), split, tokenizer, seed=3, **processes, **kw
        )
        return [b["inputs"] for b, _ in zip(ds, range(12), strict=False)]

    want = batches(sources_by_format["jsonl"], "train")
    held_out = batches(sources_by_format["jsonl"], "validation", repeat=False)
    assert len(want) == 12 and held_out
    for fmt in FORMATS[1:]:
        np.testing.assert_array_equal(batches(sources_by_format[fmt], "train"), want, err_msg=fmt)
        got = batches(sources_by_format[fmt], "validation", repeat=False)
        np.testing.assert_array_equal(got, held_out, err_msg=fmt)
    # Shuffled training from .zst files says that it decompresses them again and again.
    warned = [r.getMessage() for r in caplog.records if "read forward only" in r.getMessage()]
    assert warned and all(sources_by_format["jsonl.zst"] in m for m in warned)


def test_chunked_shards_and_shuffle_cover_each_record_once_per_epoch(corpus):
    root, _, sources_by_format = corpus
    records = sources.get_source(config(sources_by_format["jsonl.zst"], root), "train")
    rows = records.chunk_rows
    shards = [pipeline._ShardChunks(records, rows, k, 3) for k in range(3)]
    positions = [[s._chunks[i // rows] * rows + i % rows for i in range(len(s))] for s in shards]
    assert sorted(p for shard in positions for p in shard) == list(range(len(records)))
    shuffled = pipeline._ChunkShuffle(grain_source(records), rows, seed=5)
    n = len(records)
    for epoch in range(2):
        order = [shuffled[epoch * n + i]["text"] for i in range(n)]
        assert sorted(order) == sorted(records[i]["text"] for i in range(n))
        first_chunk = {records[i]["text"] for i in range(rows)}
        assert order[:rows] != [records[i]["text"] for i in range(rows)]
        slots = [
            k for k in range(-(-n // rows)) if set(order[k * rows : (k + 1) * rows]) == first_chunk
        ]
        assert len(slots) == 1  # a chunk's rows stay together, in a new order


def grain_source(records):
    import grain

    return grain.MapDataset.source(records)


def test_records_pickle_and_resume(corpus):
    root, _, sources_by_format = corpus
    cfg = config(sources_by_format["jsonl.gz"], root)
    records = sources.get_source(cfg, "train")
    again = pickle.loads(pickle.dumps(records))
    assert [again[i] for i in (0, 300, len(again) - 1)] == [records[i] for i in (0, 300, -1)]
    tokenizer = pipeline.get_tokenizer(cfg, None)
    it = iter(pipeline.make_dataset(cfg, "train", tokenizer, seed=0))
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))
    want = [next(it)["inputs"] for _ in range(3)]
    resumed = iter(pipeline.make_dataset(cfg, "train", tokenizer, seed=0))
    resumed.set_state(state)
    np.testing.assert_array_equal([next(resumed)["inputs"] for _ in range(3)], want)


def test_lines_are_indexed_once_per_file_version(tmp_path):
    source = write_corpus(tmp_path, documents(50), "jsonl", shards=2)
    cfg = config(source, tmp_path)
    before = texts(cfg, "train")
    index = sorted((tmp_path / "index").glob("*.npy"))
    assert len(index) == 2
    stamps = [p.stat().st_mtime_ns for p in index]
    assert texts(cfg, "train") == before
    assert [p.stat().st_mtime_ns for p in index] == stamps  # read, not rebuilt
    first = sorted((tmp_path / "jsonl").glob("*.jsonl"))[0]
    first.write_text(json.dumps({"text": "new"}) + "\n" + first.read_text())
    assert texts(cfg, "train")[0] == "new"
    assert len(list((tmp_path / "index").glob("*.npy"))) == 3


def test_bad_corpora_are_one_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"No files match the jsonl source glob"):
        texts(config(f"jsonl:{tmp_path}/none/*.jsonl", tmp_path), "train")
    source = write_corpus(tmp_path / "a", documents(20), "jsonl", shards=1)
    with pytest.raises(
        ValueError, match=r"row 0: Record has no field 'body' .*available: \['id', 'meta'"
    ):
        texts(config(source, tmp_path, text_key="body"), "train")
    assert texts(config(source, tmp_path, text_key="meta/n"), "test") == [
        str(len(documents(20)[-1]))
    ]
    source = write_corpus(tmp_path / "b", documents(20), "parquet", shards=1)
    with pytest.raises(ValueError, match=r"has no column 'body' \(it has \['id', 'text', 'meta'"):
        texts(config(source, tmp_path, text_key="body"), "train")
    bad = tmp_path / "c" / "bad.jsonl"
    bad.parent.mkdir()
    bad.write_text('{"text": "fine"}\n{"text": broken\n{"text": "fine"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl: row 1 is not JSON"):
        texts(config(f"jsonl:{bad}", tmp_path), "validation")  # rows 0 | 1 | 2 by split
    with pytest.raises(ValueError, match=r"neither state\.json nor dataset_dict\.json"):
        texts(config(f"datasets:{tmp_path / 'c'}", tmp_path), "train")
    with pytest.raises(ValueError, match=r"splits train, validation and test.*not 'dev'"):
        texts(config(source, tmp_path), "dev")


def test_a_dataset_dict_has_its_own_splits(tmp_path):
    docs = documents(60)
    root = tmp_path / "dict"
    for split, part in (("train", docs[:50]), ("test", docs[50:])):
        write_corpus(root / "tmp", part, "datasets", shards=2)
        os.rename(root / "tmp" / "datasets", root / split)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    cfg = config(f"datasets:{root}", tmp_path)
    assert texts(cfg, "train") == docs[:50] and texts(cfg, "test") == docs[50:]
    with pytest.raises(ValueError, match=r"has no split 'validation' \(it has \['train', 'test'\]"):
        texts(cfg, "validation")
    # A cache of it holds the splits it has, and names the one it lacks.
    from lm.data import cache

    cached = dataclasses.replace(cfg, cache=str(tmp_path / "cache"))
    tokenizer = pipeline.get_tokenizer(cached, str(tmp_path / "work"))
    said = []
    manifest = cache.prepare(cached, tokenizer, log=said.append)
    assert sorted(manifest["splits"]) == ["test", "train"]
    assert "prepare validation: " + cfg.source + " has no such split" in said
    assert [len(r["tokens"]) for r in cache.open_split(cached, tokenizer, "test")] == [
        len(d) for d in cache.document_tokens(tokenizer, docs[50:])
    ]
    with pytest.raises(
        ValueError, match=r"has no split 'validation' \(it has \['train', 'test'\]\)"
    ):
        cache.open_split(cached, tokenizer, "validation")


def write_large_corpus(root, total_bytes, files=8):
    """`files` JSON Lines files of about total_bytes in all: a block of 2 KB documents of random
    words, repeated (what is measured is memory and disk, not what is learnt)."""
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = np.array(["".join(rng.choice(letters, size=rng.integers(2, 9))) for _ in range(3000)])
    docs = [
        " ".join(rng.choice(words, size=400)) for _ in range(min(8000, total_bytes // 2400 + 1))
    ]
    block = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    root.mkdir(parents=True)
    for k in range(files):
        with open(root / f"part-{k:02d}.jsonl", "wb") as f:
            for _ in range(max(1, total_bytes // files // len(block))):
                f.write(block)
    return f"jsonl:{root}/*.jsonl"


def train_peak_rss(source, data_dir, workdir):
    """The peak RSS (bytes) of a short training run of the tiny main job on `source`."""
    from tests.test_main import ROOT, TINY

    command = [sys.executable, "-m", "lm.main", TINY, f"--workdir={workdir}"]
    command += [f"--config.data.source={source}", f"--config.data.data_dir={data_dir}"]
    command += ["--config.train.steps=10", "--config.train.eval_batches=2"]
    measure = (
        "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
        "print('peak', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
    )
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run(
        [sys.executable, "-c", measure, *command],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return int(out.stdout.split("peak")[-1]) * 1024


def tree_size(root):
    return sum(p.stat().st_size for p in pathlib.Path(root).rglob("*") if p.is_file())


@pytest.mark.slow
def test_a_gigabyte_corpus_trains_in_bounded_memory_and_is_not_copied(tmp_path):
    big = write_large_corpus(tmp_path / "big", 1 << 30)
    small = write_large_corpus(tmp_path / "small", 1 << 20)
    assert tree_size(tmp_path / "big") > 1e9
    peaks = {
        name: train_peak_rss(source, tmp_path / f"data_{name}", tmp_path / f"work_{name}")
        for name, source in (("small", small), ("big", big))
    }
    # What a gigabyte of text adds to the run's memory, against the same run on a megabyte.
    assert peaks["big"] - peaks["small"] <= 2 << 30, peaks
    # Nothing of the text is copied: the index is a few bytes a record.
    assert tree_size(tmp_path / "data_big") < 0.01 * tree_size(tmp_path / "big")
    print(f"peak RSS {peaks}, index {tree_size(tmp_path / 'data_big'):,} bytes")
