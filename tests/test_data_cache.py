"""The tokenized cache (`lm.data.cache`, `python -m lm.main prepare`): the same batches and
statistics as tokenizing on the fly, a killed prepare completed byte for byte, one-line errors
for a cache of another source or tokenizer."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from lm.data import cache, pipeline

from tests.test_data_corpora import documents, write_corpus
from tests.test_main import ROOT, TINY, metrics, run_cli

CFG = dict(seq_len=32, batch_size=8, vocab_size=290)


def config(source, root, **kw):
    return pipeline.DataConfig(**(CFG | dict(source=source, data_dir=str(root)) | kw))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A jsonl corpus (chunked) and a text corpus (record by record), each prepared once."""
    root = tmp_path_factory.mktemp("cache")
    text_dir = root / "text"
    text_dir.mkdir()
    for k, doc in enumerate(documents(40, seed=1)):
        (text_dir / f"doc{k:02d}.txt").write_text(doc * 3)
    out = {}
    for name, source in (
        ("jsonl", write_corpus(root, documents(2000), "jsonl.zst", shards=3)),
        ("text", f"text:{text_dir}/*.txt"),
    ):
        cfg = config(source, root, cache=str(root / f"cache_{name}"))
        tokenizer = pipeline.get_tokenizer(cfg, str(root / f"work_{name}"))
        cache.prepare(cfg, tokenizer, log=lambda _: None)
        out[name] = cfg, tokenizer
    return out


def batches(cfg, tokenizer, split, n=10, **kw):
    ds = pipeline.make_dataset(cfg, split, tokenizer, seed=4, **kw)
    return [b for b, _ in zip(ds, range(n), strict=False)]


@pytest.mark.parametrize("name", ["jsonl", "text"])
def test_the_cache_gives_the_batches_and_statistics_of_the_text(prepared, name):
    cfg, tokenizer = prepared[name]
    on_the_fly = pipeline.DataConfig(**{**cfg.__dict__, "cache": ""})
    for split, kw in (("train", {"process_count": 2, "process_index": 1}), ("validation", {})):
        kw |= {"repeat": False} if split == "validation" else {}
        if split == "train" and name == "text":
            kw = {}
        want, got = (
            batches(on_the_fly, tokenizer, split, **kw),
            batches(cfg, tokenizer, split, **kw),
        )
        assert len(want) == len(got) > 0
        for a, b in zip(want, got, strict=True):
            for key in a:
                np.testing.assert_array_equal(a[key], b[key], err_msg=f"{split} {key}")
    assert pipeline.bytes_per_token(cfg, "validation", tokenizer) == pipeline.bytes_per_token(
        on_the_fly, "validation", tokenizer
    )
    assert pipeline.unigram_entropy(cfg, tokenizer) == pipeline.unigram_entropy(
        on_the_fly, tokenizer
    )


def test_the_cache_reads_no_text(prepared, monkeypatch):
    from lm.data import sources

    cfg, tokenizer = prepared["jsonl"]
    monkeypatch.setattr(sources, "get_source", lambda *a: pytest.fail("read the text"))
    assert len(batches(cfg, tokenizer, "train", n=3)) == 3
    assert pipeline.bytes_per_token(cfg, "validation", tokenizer) > 1


def test_a_cache_of_another_source_or_tokenizer_is_refused(prepared, tmp_path):
    cfg, tokenizer = prepared["jsonl"]
    _, other_tokenizer = prepared["text"]
    with pytest.raises(ValueError, match=r"another source or tokenizer \(the tokenizer differ"):
        cache.open_split(cfg, other_tokenizer, "train")
    with pytest.raises(ValueError, match=r"another source or tokenizer \(the tokenizer differ"):
        cache.prepare(cfg, other_tokenizer, log=lambda _: None)
    text_cfg, _ = prepared["text"]
    moved = pipeline.DataConfig(**{**text_cfg.__dict__, "cache": cfg.cache})
    with pytest.raises(ValueError, match=r"\(source, the source's files differ\)"):
        cache.open_split(moved, tokenizer, "train")
    empty = pipeline.DataConfig(**{**cfg.__dict__, "cache": str(tmp_path / "none")})
    with pytest.raises(ValueError, match=r"holds no tokenized cache yet; run `python -m lm.main"):
        cache.open_split(empty, tokenizer, "train")


def test_workers_write_the_same_cache(prepared, tmp_path):
    cfg, tokenizer = prepared["jsonl"]
    other = pipeline.DataConfig(**{**cfg.__dict__, "cache": str(tmp_path / "two")})
    cache.prepare(other, tokenizer, workers=2, log=lambda _: None)
    assert tree_bytes(tmp_path / "two") == tree_bytes(cfg.cache)


def tree_bytes(root):
    root = str(root)
    return {
        os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
        for d, _, files in os.walk(root)
        for f in files
    }


def prepare_cli(root, source, cache_dir, workdir):
    return [
        sys.executable,
        "-m",
        "lm.main",
        "prepare",
        "--config=experiments/shakespeare_gpt.py:tiny",
        f"--workdir={workdir}",
        f"--config.data.source={source}",
        f"--config.data.cache={cache_dir}",
        f"--config.data.data_dir={root}",
        "--config.data.vocab_size=290",
        "--config.data.tokenizer_max_chars=200000",
    ]


@pytest.mark.slow
def test_a_killed_prepare_completes_byte_for_byte_and_trains_as_the_text(tmp_path):
    source = write_corpus(tmp_path, documents(120_000, seed=2), "jsonl", shards=2)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    whole = tmp_path / "whole"
    subprocess.run(
        prepare_cli(tmp_path, source, whole, tmp_path / "w"),
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
    )
    manifest = json.loads((whole / "manifest.json").read_text())
    assert manifest["splits"]["train"]["shards"] >= 4
    # The same command, killed once the ledger lists a finished shard, then run again.
    broken = tmp_path / "broken"
    proc = subprocess.Popen(
        prepare_cli(tmp_path, source, broken, tmp_path / "w"), cwd=ROOT, env=env
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (broken / "manifest.json").exists():
            ledger = json.loads((broken / "manifest.json").read_text())
            if ledger["splits"].get("train", {}).get("finished"):
                break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    ledger = json.loads((broken / "manifest.json").read_text())["splits"]["train"]
    assert 0 < len(ledger["finished"]) < ledger["shards"]  # killed midway
    out = subprocess.run(
        prepare_cli(tmp_path, source, broken, tmp_path / "w"),
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    assert f"{ledger['shards'] - len(ledger['finished'])} to write" in out.stdout
    assert tree_bytes(broken) == tree_bytes(whole)
    # Training from the cache logs the losses of training on the text, tokenizer and all.
    losses = {}
    for name, extra in (("text", []), ("cache", [f"--config.data.cache={whole}"])):
        run_cli(
            TINY,
            "--config.train.steps=4",
            "--config.train.eval_every=2",
            f"--config.data.tokenizer={tmp_path / 'w' / 'tokenizer.model'}",
            *extra,
            workdir=tmp_path / f"train_{name}",
            source=source,
            data_dir=tmp_path,
            vocab="--config.data.vocab_size=290",
        )
        losses[name] = [
            (m["step"], m.get("loss"), m.get("eval/loss"), m.get("eval/bits_per_byte"))
            for m in metrics(tmp_path / f"train_{name}")
        ]
    assert losses["cache"] == losses["text"]
    assert any(m[1] is not None for m in losses["text"]) and any(m[2] for m in losses["text"])
