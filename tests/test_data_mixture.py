"""Mixtures of sources (data.mixture, data.mixture_schedule): the drawn shares, exact resume,
weights changed at a resume, held-out splits and the tokenizer's text from every source."""

import dataclasses
import json
import logging

import numpy as np
import pytest
from lm.data import pipeline, sources

from tests.test_data_corpora import write_corpus


def corpus(root, word, n=300):
    rng = np.random.default_rng(len(word))
    docs = [" ".join([word] * int(rng.integers(1, 12))) for _ in range(n)]
    return write_corpus(root / word, docs, "jsonl", shards=3)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixture")
    a, b = corpus(root, "alpha"), corpus(root, "beta")
    cfg = pipeline.DataConfig(
        mixture=f"0.7 {a}; 0.3 {b}", seq_len=32, batch_size=50, vocab_size=270, data_dir=str(root)
    )
    tokenizer = pipeline.get_tokenizer(cfg, str(root / "work"))
    return cfg, tokenizer


def source_of_rows(batch, tokenizer):
    """0 for rows of alpha's tokens, 1 for beta's (each row is packed from one source)."""
    return [0 if "alpha" in tokenizer.decode(row) else 1 for row in batch["inputs"]]


def draw(cfg, tokenizer, batches, state=None):
    it = iter(pipeline.make_dataset(cfg, "train", tokenizer, seed=0))
    if state is not None:
        it.set_state(state)
    rows = [source_of_rows(next(it), tokenizer) for _ in range(batches)]
    return rows, it


def test_rows_are_drawn_in_the_mixtures_shares(mixed):
    cfg, tokenizer = mixed
    rows, it = draw(cfg, tokenizer, 200)  # 10,000 rows
    drawn = np.asarray(rows).reshape(-1)
    assert abs(np.mean(drawn == 0) - 0.7) <= 0.01
    metrics = it.data_metrics()
    assert metrics["mixture/tokens_0"] > 0 and abs(metrics["mixture/share_0"] - 0.7) < 0.05
    # Every batch is within a row of the shares: the choice is exact, not random.
    assert all(abs(sum(r == 0 for r in batch) - 35) <= 1 for batch in rows)


def test_a_mixture_resumes_exactly_and_applies_changed_weights(mixed, caplog):
    cfg, tokenizer = mixed
    _, it = draw(cfg, tokenizer, 10)
    state = json.loads(json.dumps(it.get_state()))
    want, _ = draw(cfg, tokenizer, 5)
    again, _ = draw(cfg, tokenizer, 5, state)
    continued = [source_of_rows(next(it), tokenizer) for _ in range(5)]
    assert again == continued
    changed = dataclasses.replace(
        cfg, mixture=cfg.mixture.replace("0.7", "0.2").replace("0.3", "0.8")
    )
    with caplog.at_level(logging.WARNING):
        after, _ = draw(changed, tokenizer, 20, state)
    assert "weights changed at the resume: [0.7, 0.3] at step 10, now [0.2, 0.8]" in caplog.text
    assert abs(np.mean(np.asarray(after) == 0) - 0.2) <= 0.01


def test_a_schedule_changes_the_weights_from_its_step(mixed):
    cfg, tokenizer = mixed
    scheduled = dataclasses.replace(cfg, mixture_schedule="4: 0 1; 8: 1 1")
    rows, _ = draw(scheduled, tokenizer, 12)
    shares = [np.mean(np.asarray(batch) == 0) for batch in rows]
    assert all(abs(s - 0.7) <= 0.02 for s in shares[:4])
    assert shares[4:8] == [0.0] * 4
    assert all(abs(s - 0.5) <= 0.02 for s in shares[8:])


def test_held_out_splits_and_the_tokenizer_take_every_source(mixed):
    cfg, tokenizer = mixed
    (a_weight, a), (b_weight, b) = sources.parse_mixture(cfg.mixture)
    texts = [r["text"] for r in sources.get_source(cfg, "validation")]
    alone = [dataclasses.replace(cfg, mixture="", source=s) for s in (a, b)]
    assert texts == [r["text"] for c in alone for r in sources.get_source(c, "validation")]
    budget = 1000
    chars = [
        sum(map(len, pipeline.training_texts(c, max_chars=int(budget * w))))
        for c, w in zip(alone, (0.7, 0.3), strict=True)
    ]
    assert sum(map(len, pipeline.training_texts(cfg, max_chars=budget))) == sum(chars)
    ds = pipeline.make_dataset(cfg, "validation", tokenizer, seed=0, repeat=False)
    kinds = {
        k
        for batch in ds
        for k, w in zip(source_of_rows(batch, tokenizer), batch["weights"].sum(1), strict=True)
        if w
    }
    assert kinds == {0, 1}


@pytest.mark.parametrize(
    "values,match",
    [
        (dict(mixture="0.7 jsonl:a/*.jsonl; heavy parquet:b"), r"entry 'heavy parquet:b' is not"),
        (dict(mixture="0.5 nonsense:x"), r"Unknown data source 'nonsense:x'"),
        (
            dict(mixture="1 jsonl:a", mixture_schedule="5: 1 1"),
            r"entry '5: 1 1' is not 'STEP: W1 \.\.\. W1'",
        ),
        (dict(mixture_schedule="5: 1"), r"mixture_schedule needs data.mixture"),
        (dict(mixture="1 jsonl:a", task="translation"), r"takes data.task='lm'"),
    ],
)
def test_bad_mixtures_are_one_clear_error(values, match):
    with pytest.raises(ValueError, match=match):
        pipeline.DataConfig(**values)


def test_a_mixtures_cache_gives_its_batches_one_cache_per_source(mixed, tmp_path):
    from lm.data import cache

    cfg, tokenizer = mixed
    cached = dataclasses.replace(cfg, cache=str(tmp_path / "cache"))
    made = cache.prepare_caches(cached, tokenizer, log=lambda _: None)
    assert [source for source, _ in made] == [s for _, s in sources.parse_mixture(cfg.mixture)]
    assert len(list((tmp_path / "cache").iterdir())) == 2
    for split, kw in (("train", {}), ("validation", {"repeat": False})):
        want = pipeline.make_dataset(cfg, split, tokenizer, seed=3, **kw)
        got = pipeline.make_dataset(cached, split, tokenizer, seed=3, **kw)
        for a, b, _ in zip(want, got, range(6), strict=False):
            assert all(np.array_equal(a[k], b[k]) for k in a)
    # The sources the other way round find the caches already made.
    (a_weight, a), (b_weight, b) = sources.parse_mixture(cfg.mixture)
    swapped = dataclasses.replace(cached, mixture=f"{b_weight} {b}; {a_weight} {a}")
    said = []
    cache.prepare_caches(swapped, tokenizer, log=said.append)
    counts = [line for line in said if "shards," in line]
    assert len(counts) == 6 and all(line.endswith(", 0 to write") for line in counts)
    assert len(list((tmp_path / "cache").iterdir())) == 2
