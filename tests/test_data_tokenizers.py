"""SentencePiece training and loading."""

import hashlib
import pickle

import numpy as np
import pytest
from lm.data import tokenizers
from lm.data.tokenizers import load_tokenizer, train_tokenizer

WORDS = (
    "the king queen lord lady sword crown night day love death heart blood honour "
    "speak hear thou thee thy art hath doth noble gentle sweet fair foul good ill"
).split()


SYLLABLES = (
    "ba be bi bo bu ca ce co da de di do fa fe fi ga ge go ha he hi ka ke ko la le li "
    "lo ma me mi mo na ne ni no pa pe pi ra re ri ro sa se si so ta te ti to va ve vi "
    "ya ye za ze zo ar er ir or ur en on an in un st th sh ch"
).split()


def _words(rng, n=400):
    return ["".join(rng.choice(SYLLABLES, size=rng.integers(1, 4))) for _ in range(n)]


def corpus(n_docs=20, lines=40, seed=0):
    """Deterministic English-like documents with punctuation and blank lines."""
    rng = np.random.default_rng(seed)
    vocab = list(WORDS) + _words(np.random.default_rng(1234))
    docs = []
    for _ in range(n_docs):
        out = []
        for i in range(lines):
            words = rng.choice(vocab, size=rng.integers(3, 12))
            out.append(" ".join(words).capitalize() + rng.choice([".", ",", "!", "?", ";"]))
            if i % 7 == 6:
                out.append("")
        docs.append("\n".join(out))
    return docs


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.model"
    return train_tokenizer(corpus(), path, vocab_size=400, num_sentinels=5)


def test_special_ids_and_pieces(tok):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert [tok.id_to_piece(i) for i in range(4)] == ["<pad>", "<unk>", "<s>", "</s>"]
    assert tok.vocab_size == 400
    assert tok.encode("\n") == [tok._sp.piece_to_id("\n")]


@pytest.mark.parametrize(
    "text",
    [
        "The king doth speak.",
        "  Leading spaces,   runs of spaces\tand tabs\n\n\nand newlines\n",
        "Unseen: héllo ✓ 😀 日本語 — byte fallback",
        "",
    ],
)
def test_roundtrip_is_exact(tok, text):
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size for i in ids)


def test_roundtrip_documents_and_batch(tok):
    docs = corpus(n_docs=3, seed=1)
    assert tok.encode_batch(docs) == [tok.encode(d) for d in docs]
    assert [tok.decode(ids) for ids in tok.encode_batch(docs)] == docs
    # Learned pieces make text shorter than one token per byte.
    assert len(tok.encode(docs[0])) < 0.8 * len(docs[0].encode())


def test_decode_drops_pad_and_specials(tok):
    ids = tok.encode("good night")
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, 0, 0]) == "good night"
    assert tok.decode(np.asarray([[*ids, 0]])) == "good night"


def test_sentinels(tok, tmp_path):
    ids = [tok.sentinel_id(i) for i in range(5)]
    assert len(set(ids)) == 5
    assert [tok.id_to_piece(i) for i in ids] == [f"<extra_id_{i}>" for i in range(5)]
    assert tok.encode("<extra_id_3>") == [ids[3]]
    with pytest.raises(ValueError, match="extra_id_5"):
        tok.sentinel_id(5)
    plain = train_tokenizer(corpus(n_docs=5), tmp_path / "p.model", vocab_size=360)
    with pytest.raises(ValueError, match="num_sentinels"):
        plain.sentinel_id(0)


def test_training_is_deterministic_and_saved(tmp_path):
    docs = corpus(n_docs=8, seed=3)
    a = train_tokenizer(docs, tmp_path / "a.model", vocab_size=350)
    b = train_tokenizer(docs, tmp_path / "sub" / "b.model", vocab_size=350)
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    assert digest(tmp_path / "a.model") == digest(tmp_path / "sub" / "b.model")
    assert a.serialized_model() == (tmp_path / "a.model").read_bytes()
    loaded = load_tokenizer(tmp_path / "a.model")
    assert loaded.encode(docs[0]) == a.encode(docs[0]) == b.encode(docs[0])
    assert loaded.path == str(tmp_path / "a.model")
    # No stray temporary files next to the model.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.model", "sub"]


def test_bpe_model_type(tmp_path):
    tok = train_tokenizer(
        corpus(n_docs=5), tmp_path / "bpe.model", vocab_size=360, model_type="bpe"
    )
    assert tok.decode(tok.encode("Sweet lady, good night.")) == "Sweet lady, good night."


def test_training_is_quiet(tmp_path, capfd):
    train_tokenizer(corpus(n_docs=4), tmp_path / "q.model", vocab_size=360)
    out, err = capfd.readouterr()
    assert out == "" and err == ""


def test_long_lines_and_sentence_cap():
    long_line = " ".join(["noble lord"] * 2000)  # 21,999 bytes: over SentencePiece's limit.
    lines = list(tokenizers.training_lines([long_line, "a\n\n  \nb"], max_sentences=100))
    assert all(len(x.encode()) <= 4000 for x in lines)
    assert "".join(lines[:-2]) == long_line and lines[-2:] == ["a", "b"]
    assert len(list(tokenizers.training_lines(["x\n"] * 50, max_sentences=7))) == 7


def test_pickle_roundtrip(tok):
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("thou art") == tok.encode("thou art")
    assert clone.vocab_size == tok.vocab_size and clone.path == tok.path


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer(["", "  \n\n"], tmp_path / "e.model", vocab_size=360)
    with pytest.raises(ValueError, match="reserved"):
        train_tokenizer(corpus(n_docs=1), tmp_path / "e.model", vocab_size=200)
    with pytest.raises(ValueError, match="smaller vocab_size"):
        train_tokenizer(["tiny text"], tmp_path / "e.model", vocab_size=5000)
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer(corpus(n_docs=1), tmp_path / "e.model", vocab_size=360, model_type="wp")
    assert not (tmp_path / "e.model").exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")
    junk = tmp_path / "junk.model"
    junk.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        load_tokenizer(junk)
