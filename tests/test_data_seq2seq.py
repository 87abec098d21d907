"""Tests for lm.data.seq2seq: T5 span corruption and translation examples."""

import dataclasses
import itertools

import grain
import numpy as np
import pytest
from lm.data import seq2seq

PAD, BOS, EOS = 0, 2, 3
SENTINEL0 = 10_000  # sentinel_id(i) = SENTINEL0 + i


@dataclasses.dataclass(frozen=True)
class Cfg:
    seq_len: int = 32
    encoder_len: int = 64
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0


class FakeTokenizer:
    """Whitespace tokenizer over integer words: 'a b c' -> [a, b, c]."""

    pad_id, unk_id, bos_id, eos_id = PAD, 1, BOS, EOS
    vocab_size = SENTINEL0 + 100

    def __init__(self, num_sentinels=100):
        self.num_sentinels = num_sentinels

    def encode(self, text):
        return [int(w) for w in text.split()]

    def sentinel_id(self, i):
        if i >= self.num_sentinels:
            raise ValueError(f"no sentinel {i}")
        return SENTINEL0 + i


def make_docs(num_docs, rng, max_len=300):
    """Documents of random length whose tokens are 100..(100+len) (never special ids)."""
    return [
        {"text": " ".join(str(100 + t) for t in range(rng.integers(0, max_len)))}
        for _ in range(num_docs)
    ]


def examples_of(docs, cfg, seed, tokenizer=None):
    ds = grain.MapDataset.source(docs)
    return list(seq2seq.span_corruption_examples(ds, tokenizer or FakeTokenizer(), cfg, seed=seed))


def real_tokens(ids, segment_ids):
    return [int(t) for t in ids[segment_ids > 0]]


def uncorrupt(example, is_sentinel=lambda t: t >= SENTINEL0):
    """Original chunk from (encoder inputs, targets) by substituting sentinels."""
    enc = real_tokens(example["encoder_inputs"], example["encoder_segment_ids"])
    tgt = real_tokens(example["targets"], example["segment_ids"])
    assert enc[-1] == EOS and tgt[-1] == EOS
    spans, current = {}, None
    for t in tgt[:-1]:
        if is_sentinel(t):
            current = spans.setdefault(t, [])
        else:
            current.append(t)
    out = []
    for t in enc[:-1]:
        out += spans.pop(t) if is_sentinel(t) else [t]
    assert not spans, "every target sentinel appears in the inputs"
    return out


def expected_chunks(docs, cfg, encode=None):
    n = seq2seq.chunk_length(
        cfg.encoder_len, cfg.seq_len, cfg.noise_density, cfg.mean_noise_span_length
    )
    chunks = []
    for doc in docs:
        tokens = (encode or FakeTokenizer().encode)(doc["text"])
        chunks += [
            tokens[i : i + n] for i in range(0, len(tokens), n) if len(tokens[i : i + n]) >= 2
        ]
    return chunks


def test_uncorrupting_reproduces_the_original_tokens():
    cfg = Cfg()
    docs = make_docs(60, np.random.default_rng(0))
    examples = examples_of(docs, cfg, seed=1)
    chunks = expected_chunks(docs, cfg)
    assert len(examples) == len(chunks) > 60
    for example, chunk in zip(examples, chunks, strict=True):
        assert uncorrupt(example) == chunk


def test_sentinels_are_in_order_and_each_replaces_one_nonempty_span():
    for example in examples_of(make_docs(20, np.random.default_rng(1)), Cfg(), seed=3):
        enc = real_tokens(example["encoder_inputs"], example["encoder_segment_ids"])
        tgt = real_tokens(example["targets"], example["segment_ids"])
        enc_sent = [t for t in enc if t >= SENTINEL0]
        tgt_sent = [t for t in tgt if t >= SENTINEL0]
        assert enc_sent == tgt_sent == [SENTINEL0 + i for i in range(len(enc_sent))]
        assert len(enc_sent) >= 1
        # No two sentinels adjacent in the inputs (spans are separated by real tokens),
        # and no sentinel directly followed by another in the targets (spans are non-empty).
        assert all(not (a >= SENTINEL0 and b >= SENTINEL0) for a, b in itertools.pairwise(enc))
        assert all(
            not (a >= SENTINEL0 and (b >= SENTINEL0 or b == EOS))
            for a, b in itertools.pairwise(tgt)
        )


@pytest.mark.parametrize("density,mean_len", [(0.15, 3.0), (0.3, 5.0)])
def test_noise_density_and_mean_span_length(density, mean_len):
    cfg = Cfg(seq_len=64, encoder_len=128, noise_density=density, mean_noise_span_length=mean_len)
    examples = examples_of(make_docs(200, np.random.default_rng(2), max_len=600), cfg, seed=0)
    noise = spans = total = 0
    for example in examples:
        tgt = real_tokens(example["targets"], example["segment_ids"])[:-1]
        k = sum(t >= SENTINEL0 for t in tgt)
        noise += len(tgt) - k
        spans += k
        total += len(uncorrupt(example))
    assert noise / total == pytest.approx(density, abs=0.01)
    assert noise / spans == pytest.approx(mean_len, rel=0.1)


def test_span_positions_are_spread_over_the_chunk():
    """Noise may start at the first token and end at the last, and covers the inside evenly.

    (With exactly k spans the two end tokens are noise less often, ~k / non-noise, as for
    a uniformly rotated circular pattern; T5 never masks the first token.)
    """
    rng_hits = np.zeros(100)
    first = last = 0
    for i in range(2000):
        spans = seq2seq.noise_spans(100, 0.15, 3.0, np.random.default_rng((7, i)))
        for start, end in spans:
            rng_hits[start:end] += 1
        first += spans[0][0] == 0
        last += spans[-1][1] == 100
    assert first > 0 and last > 0
    rate = rng_hits / 2000
    assert 0.03 < rate[0] < 0.09 and 0.03 < rate[-1] < 0.09  # 5 / 90
    inside = rate[10:-10]
    assert inside.min() > 0.12 and inside.max() < 0.19  # ~0.15


def test_deterministic_given_seed_and_different_with_another_seed():
    docs = make_docs(30, np.random.default_rng(3))
    a, b, c = (examples_of(docs, Cfg(), seed=s) for s in (5, 5, 6))
    for x, y in zip(a, b, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    differ = sum(
        not np.array_equal(x["encoder_inputs"], z["encoder_inputs"])
        for x, z in zip(a, c, strict=True)
    )
    assert differ > len(a) // 2


def test_randomness_depends_on_record_index():
    docs = [{"text": " ".join(str(100 + t) for t in range(50))}] * 20
    examples = examples_of(docs, Cfg(), seed=0)
    distinct = {tuple(e["encoder_inputs"]) for e in examples}
    assert len(distinct) > 10


def test_iterator_resumes_exactly_from_its_state():
    docs = make_docs(40, np.random.default_rng(4))
    ds = seq2seq.span_corruption_examples(
        grain.MapDataset.source(docs).shuffle(seed=1).repeat(2), FakeTokenizer(), Cfg(), seed=9
    )
    it = iter(ds)
    for _ in range(37):
        next(it)
    state = it.get_state()
    rest = [next(it)["encoder_inputs"] for _ in range(25)]
    it2 = iter(ds)
    it2.set_state(state)
    for expected in rest:
        np.testing.assert_array_equal(next(it2)["encoder_inputs"], expected)


def test_long_documents_are_chunked_to_fit_without_truncation():
    cfg = Cfg(seq_len=16, encoder_len=48)
    n = seq2seq.chunk_length(
        cfg.encoder_len, cfg.seq_len, cfg.noise_density, cfg.mean_noise_span_length
    )
    enc, tgt = seq2seq._corrupted_lengths(n + 1, cfg.noise_density, cfg.mean_noise_span_length)
    assert enc > cfg.encoder_len or tgt > cfg.seq_len, "chunk_length is the largest that fits"
    docs = [{"text": " ".join(str(100 + t) for t in range(1000))}]
    examples = examples_of(docs, cfg, seed=0)
    assert len(examples) == -(-1000 // n)
    for e in examples:  # eos survives in both: nothing was truncated
        assert real_tokens(e["encoder_inputs"], e["encoder_segment_ids"])[-1] == EOS
        assert real_tokens(e["targets"], e["segment_ids"])[-1] == EOS
    rebuilt = sum((uncorrupt(e) for e in examples), [])
    assert rebuilt == list(range(100, 1100))


def test_span_corruption_example_format():
    cfg = Cfg()
    for e in examples_of(make_docs(10, np.random.default_rng(5)), cfg, seed=0):
        check_format(e, cfg)


def test_empty_and_one_token_documents_give_no_examples():
    docs = [{"text": ""}, {"text": "100"}, {"text": "100 101 102 103"}]
    assert len(examples_of(docs, Cfg(), seed=0)) == 1


def test_too_few_sentinels_is_a_clear_error():
    with pytest.raises(ValueError, match="sentinel"):
        examples_of(
            make_docs(3, np.random.default_rng(0)),
            Cfg(),
            seed=0,
            tokenizer=FakeTokenizer(num_sentinels=0),
        )


def test_bad_noise_density_is_refused():
    with pytest.raises(ValueError, match="noise_density"):
        examples_of([{"text": "100 101"}], Cfg(noise_density=0.0), seed=0)


def check_format(e, cfg):
    """Shapes, dtypes, padding and the decoder shift of one example."""
    assert set(e) == {
        "encoder_inputs",
        "encoder_segment_ids",
        "inputs",
        "targets",
        "segment_ids",
        "positions",
        "weights",
    }
    for key in ("encoder_inputs", "encoder_segment_ids"):
        assert e[key].shape == (cfg.encoder_len,) and e[key].dtype == np.int32
    for key in ("inputs", "targets", "segment_ids", "positions"):
        assert e[key].shape == (cfg.seq_len,) and e[key].dtype == np.int32
    assert e["weights"].shape == (cfg.seq_len,) and e["weights"].dtype == np.float32
    n_enc = int(e["encoder_segment_ids"].sum())
    n_dec = int(e["segment_ids"].sum())
    np.testing.assert_array_equal(e["encoder_segment_ids"], np.arange(cfg.encoder_len) < n_enc)
    assert (e["encoder_inputs"][:n_enc] != PAD).all() and (e["encoder_inputs"][n_enc:] == PAD).all()
    np.testing.assert_array_equal(e["segment_ids"], np.arange(cfg.seq_len) < n_dec)
    np.testing.assert_array_equal(e["weights"], e["segment_ids"].astype(np.float32))
    assert e["inputs"][0] == BOS
    np.testing.assert_array_equal(e["inputs"][1:n_dec], e["targets"][: n_dec - 1])
    assert (e["inputs"][n_dec:] == PAD).all() and (e["targets"][n_dec:] == PAD).all()
    np.testing.assert_array_equal(e["positions"][:n_dec], np.arange(n_dec))
    assert (e["positions"][n_dec:] == 0).all()


# --- translation ------------------------------------------------------------


PAIRS = [
    {"source": "100 101 102", "target": "200 201"},
    {"source": "100", "target": " ".join(str(300 + t) for t in range(50))},  # long target
    {"source": " ".join(str(400 + t) for t in range(80)), "target": "500"},  # long source
]


@pytest.mark.parametrize("as_iter", [False, True])
def test_translation_examples(as_iter):
    cfg = Cfg(seq_len=8, encoder_len=16)
    ds = grain.MapDataset.source(PAIRS)
    if as_iter:
        ds = ds.to_iter_dataset()
    examples = list(seq2seq.translation_examples(ds, FakeTokenizer(), cfg))
    assert len(examples) == 3
    for e in examples:
        check_format(e, cfg)
    first, long_target, long_source = examples
    np.testing.assert_array_equal(first["encoder_inputs"][:5], [100, 101, 102, EOS, PAD])
    np.testing.assert_array_equal(first["targets"][:4], [200, 201, EOS, PAD])
    np.testing.assert_array_equal(first["inputs"][:4], [BOS, 200, 201, PAD])
    np.testing.assert_array_equal(first["weights"][:4], [1, 1, 1, 0])
    # Truncated: no eos, every position real.
    np.testing.assert_array_equal(long_target["targets"], np.arange(300, 308))
    np.testing.assert_array_equal(long_target["inputs"], [BOS, *range(300, 307)])
    assert long_target["weights"].sum() == 8
    np.testing.assert_array_equal(long_source["encoder_inputs"], np.arange(400, 416))
    assert long_source["encoder_segment_ids"].sum() == 16


def test_with_a_real_sentencepiece_model(tmp_path):
    """Span corruption + translation on a tiny SentencePiece model with sentinel pieces."""
    spm = pytest.importorskip("sentencepiece")
    words = ["the", "cat", "sat", "on", "a", "mat", "le", "chat", "est", "assis", "sur", "tapis"]
    rng = np.random.default_rng(0)
    lines = [" ".join(rng.choice(words, size=12)) for _ in range(300)]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_prefix=str(tmp_path / "m"),
        vocab_size=125,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        unk_id=1,
        bos_id=2,
        eos_id=3,
        user_defined_symbols=[f"<extra_id_{i}>" for i in range(100)],
        minloglevel=2,
    )
    proc = spm.SentencePieceProcessor(model_file=str(tmp_path / "m.model"))

    class Tok:
        pad_id, bos_id, eos_id = 0, 2, 3
        encode = staticmethod(lambda text: proc.encode(text))

        @staticmethod
        def sentinel_id(i):
            return proc.piece_to_id(f"<extra_id_{i}>")

    cfg = Cfg(seq_len=24, encoder_len=48)
    docs = [{"text": " ".join(lines[i : i + 5])} for i in range(0, 50, 5)]
    examples = list(
        seq2seq.span_corruption_examples(grain.MapDataset.source(docs), Tok(), cfg, seed=0)
    )
    sentinels = {Tok.sentinel_id(i) for i in range(100)}
    assert len(sentinels) == 100 and not sentinels & {0, 1, 2, 3}
    chunks = expected_chunks(docs, cfg, encode=proc.encode)
    assert len(examples) == len(chunks) > len(docs)
    for e, chunk in zip(examples, chunks, strict=True):
        check_format(e, cfg)
        assert uncorrupt(e, is_sentinel=sentinels.__contains__) == chunk
    pair = list(
        seq2seq.translation_examples(
            grain.MapDataset.source([{"source": "the cat", "target": "le chat"}]), Tok(), cfg
        )
    )[0]
    n = int(pair["segment_ids"].sum())
    assert proc.decode([int(t) for t in pair["targets"][: n - 1]]) == "le chat"


def test_iter_dataset_input_counts_records_like_a_map_dataset():
    docs = make_docs(15, np.random.default_rng(6))
    from_map = examples_of(docs, Cfg(), seed=2)
    from_iter = list(
        seq2seq.span_corruption_examples(
            grain.MapDataset.source(docs).to_iter_dataset(), FakeTokenizer(), Cfg(), seed=2
        )
    )
    assert len(from_map) == len(from_iter)
    for x, y in zip(from_map, from_iter, strict=True):
        np.testing.assert_array_equal(x["encoder_inputs"], y["encoder_inputs"])
        np.testing.assert_array_equal(x["targets"], y["targets"])
