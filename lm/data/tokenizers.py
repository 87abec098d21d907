"""SentencePiece tokenizers: train on a corpus, save beside the run, load; and
:class:`PretrainedTokenizer`, the adapter for imported models' own vocabularies.

Models trained here use fixed special ids (pad 0, unk 1, bos 2, eos 3), then
``'\\n'`` and any T5 sentinels ``<extra_id_i>`` as user-defined pieces, then 256
byte-fallback pieces, so any UTF-8 text round-trips exactly:
``tok.decode(tok.encode(s)) == s``. Normalisation is the identity (no NFKC, no
whitespace folding) so that bits-per-byte is measured on the real text.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import sentencepiece as spm

from lm import storage

if TYPE_CHECKING:  # `tokenizers` is only imported when an imported model needs it.
    import tokenizers

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
NEWLINE = "\n"
_MAX_LINE_BYTES = 4000  # SentencePiece skips training sentences over 4192 bytes.


def sentinel(i: int) -> str:
    """The text of T5 sentinel ``i``: ``'<extra_id_i>'``."""
    return f"<extra_id_{i}>"


class Tokenizer:
    """A SentencePiece model with the ids this project relies on.

    Attributes:
      path: the ``.model`` file ('' if built from bytes).
      vocab_size: number of pieces (ids are ``0 .. vocab_size-1``).
      pad_id, unk_id, bos_id, eos_id: special ids (0, 1, 2, 3 for models trained here).
      add_bos: documents start with bos (always, for models trained here).
    """

    add_bos = True

    def __init__(self, model_proto: bytes, path: str | os.PathLike = ""):
        self.path = str(path)
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.vocab_size = self._sp.get_piece_size()
        self.pad_id = _id_or(self._sp.pad_id(), PAD_ID)
        self.unk_id = _id_or(self._sp.unk_id(), UNK_ID)
        self.bos_id = _id_or(self._sp.bos_id(), BOS_ID)
        self.eos_id = _id_or(self._sp.eos_id(), EOS_ID)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos added)."""
        return self._sp.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text (multi-threaded inside SentencePiece)."""
        return self._sp.encode(list(texts))

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``; pad ids are dropped, bos/eos decode to ''."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1) if int(i) != self.pad_id]
        return self._sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        """The piece string of id ``i``."""
        return self._sp.id_to_piece(int(i))

    def sentinel_id(self, i: int) -> int:
        """Id of T5 sentinel ``<extra_id_i>``; ValueError if the model lacks it."""
        piece = sentinel(i)
        sid = self._sp.piece_to_id(piece)
        if sid == self.unk_id:
            raise ValueError(
                f"Tokenizer {self.path or '<in memory>'} has no sentinel {piece}: train it with "
                f'num_sentinels > {i} (pipeline does this for task="span_corruption").'
            )
        return sid

    def serialized_model(self) -> bytes:
        """The model file's bytes."""
        return self._proto

    def fingerprint(self) -> str:
        """A hash of what this tokenizer makes of a text (its model and special ids)."""
        specials = f"{self.bos_id} {self.eos_id} {self.add_bos}".encode()
        return hashlib.sha256(self._proto + specials).hexdigest()[:16]

    def __getstate__(self):
        return {"model_proto": self._proto, "path": self.path}

    def __setstate__(self, state):
        self.__init__(state["model_proto"], state["path"])

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


class PretrainedTokenizer:
    """An imported model's tokenizer (a `tokenizers.Tokenizer`) behind :class:`Tokenizer`'s API.

    Attributes:
      vocab_size: the model's vocabulary size (ids ``0 .. vocab_size-1``).
      pad_id, unk_id, bos_id, eos_id: the model's special ids (-1 when it has none).
      add_bos: whether the model was trained with BOS prepended to every text;
        :meth:`encode` never adds it, callers that build model inputs do.
      path: the ``tokenizer.json`` it was loaded from ('' if built in memory).
    """

    def __init__(
        self,
        tokenizer,
        *,
        vocab_size: int,
        pad_id: int,
        unk_id: int,
        bos_id: int,
        eos_id: int,
        add_bos: bool,
        path: str | os.PathLike = "",
    ):
        self._tok = tokenizer
        self.vocab_size = vocab_size
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = pad_id, unk_id, bos_id, eos_id
        self.add_bos = add_bos
        self.path = str(path)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no bos/eos added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Text of ``ids``; pad and other special tokens decode to ''."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1) if int(i) != self.pad_id]
        return self._tok.decode(ids, skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def sentinel_id(self, i: int) -> int:
        raise ValueError(
            f"{self!r} has no T5 sentinels; span corruption needs a tokenizer "
            "trained here (leave data.tokenizer empty)."
        )

    def to_json(self) -> str:
        """Everything needed to rebuild this tokenizer (see :func:`load_tokenizer`)."""
        return json.dumps(
            {
                "tokenizer": json.loads(self._tok.to_str()),
                "lm": {
                    "vocab_size": self.vocab_size,
                    "pad_id": self.pad_id,
                    "unk_id": self.unk_id,
                    "bos_id": self.bos_id,
                    "eos_id": self.eos_id,
                    "add_bos": self.add_bos,
                },
            }
        )

    def fingerprint(self) -> str:
        """A hash of what this tokenizer makes of a text (its model and special ids)."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]

    def save(self, path: str | os.PathLike) -> None:
        storage.write_atomic(path, self.to_json())
        self.path = str(path)

    @classmethod
    def from_json(cls, text: str, path: str | os.PathLike = "") -> PretrainedTokenizer:
        import tokenizers  # Only imported models need it.

        data = json.loads(text)
        return cls(
            tokenizers.Tokenizer.from_str(json.dumps(data["tokenizer"])), **data["lm"], path=path
        )

    def __getstate__(self):
        return {"json": self.to_json(), "path": self.path}

    def __setstate__(self, state):
        other = PretrainedTokenizer.from_json(state["json"], state["path"])
        self.__dict__.update(other.__dict__)

    def __repr__(self) -> str:
        return f"PretrainedTokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


def _gpt2_byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map, which byte-level BPE spells with."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("\xa1"), ord("\xac") + 1),
        *range(ord("\xae"), ord("\xff") + 1),
    ]
    mapping, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            mapping[byte] = chr(byte)
        else:
            mapping[byte] = chr(256 + extra)
            extra += 1
    return mapping


CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def _add_special_tokens(tok, tokens: Sequence[str], token_types: Sequence[int], allowed=None):
    """Control tokens (``<|endoftext|>``) match whole and are special; user-defined ones
    (``<start_of_turn>``-like) match whole but decode as text."""
    from tokenizers import AddedToken

    control, user = [], []
    for token, kind in zip(tokens, token_types, strict=True):
        if allowed is not None and not set(token) <= allowed:
            continue  # A mislabelled entry outside the byte alphabet; not a real token.
        if kind == CONTROL:
            control.append(AddedToken(token, normalized=False, special=True))
        elif kind == USER_DEFINED:
            user.append(AddedToken(token, normalized=False, special=False))
    tok.add_special_tokens(control)
    tok.add_tokens(user)


def byte_level_bpe(
    tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int], *, split_digits: bool
) -> tokenizers.Tokenizer:
    """GPT-2-style byte-level BPE from a vocabulary (GPT-2 byte alphabet) and ranked merges.

    ``split_digits``: every digit is its own pre-token first (SmolLM2's tokenizer, and
    llama.cpp's ``smollm`` pre-tokenizer), so numbers are spelled digit by digit.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = set(_gpt2_byte_alphabet().values())
    vocab = {token: i for i, token in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tok = Tokenizer(models.BPE(vocab, pairs))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (
        pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
        if split_digits
        else byte_level
    )
    tok.decoder = decoders.ByteLevel()
    _add_special_tokens(tok, tokens, token_types, allowed=alphabet)
    return tok


def sentencepiece_bpe(
    tokens: Sequence[str], token_types: Sequence[int], *, unk_token: str
) -> tokenizers.Tokenizer:
    """SentencePiece-style BPE with byte fallback from a vocabulary whose order is its merge
    order (Gemma's GGUF: the file has no merges, and its scores do not rank them).

    Merges are recovered from the vocabulary: every way of cutting a piece into two
    pieces of the vocabulary is a merge, ranked by the merged piece's position in the
    file, then longer left part first.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    # Whitespace-only pieces are stored with real spaces; the model spells a space U+2581.
    tokens = [t.replace(" ", "\u2581") if t and not t.strip() else t for t in tokens]
    vocab = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    ranked = []
    for rank, piece in enumerate(tokens):
        cuts = [
            (piece[:k], piece[k:])
            for k in range(1, len(piece))
            if piece[:k] in vocab and piece[k:] in vocab
        ]
        cuts.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        ranked.extend((rank, -len(left), -len(right), left, right) for left, right in cuts)
    ranked.sort(key=lambda m: m[:3])
    merges = [(left, right) for _, _, _, left, right in ranked]
    tok = Tokenizer(
        models.BPE(vocab, merges, unk_token=unk_token, fuse_unk=True, byte_fallback=True)
    )
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    _add_special_tokens(tok, tokens, token_types)
    return tok


def _id_or(value: int, default: int) -> int:
    return value if value >= 0 else default


def training_lines(texts: Iterable[str], max_sentences: int) -> Iterator[str]:
    """Splits documents into non-blank lines for SentencePiece training.

    Lines longer than ~4000 UTF-8 bytes are cut at spaces (SentencePiece would
    drop them); at most ``max_sentences`` lines are produced.
    """
    count = 0
    for text in texts:
        for line in text.split(NEWLINE):
            if not line.strip():
                continue
            for piece in _cut_long_line(line):
                yield piece
                count += 1
                if count >= max_sentences:
                    return


def _cut_long_line(line: str) -> Iterator[str]:
    """Yields ``line`` in pieces of at most ~``_MAX_LINE_BYTES`` bytes."""
    if len(line.encode("utf-8")) <= _MAX_LINE_BYTES:
        yield line
        return
    step = _MAX_LINE_BYTES // 4  # Worst case 4 bytes per character.
    for start in range(0, len(line), step):
        yield line[start : start + step]


def train_tokenizer(
    texts: Iterable[str],
    model_path: str | os.PathLike,
    vocab_size: int,
    *,
    model_type: str = "unigram",
    max_sentences: int = 2_000_000,
    num_sentinels: int = 0,
) -> Tokenizer:
    """Trains a SentencePiece model on ``texts`` and saves it to ``model_path``.

    Args:
      texts: documents (any length; split into lines here, in order).
      model_path: where the ``.model`` file is written (atomically).
      vocab_size: total pieces, including the 4 specials, ``'\\n'``, the
        sentinels and the 256 byte pieces.
      model_type: 'unigram' or 'bpe'.
      max_sentences: cap on training lines (the first ones are used).
      num_sentinels: adds ``<extra_id_0> .. <extra_id_{n-1}>`` (T5 span corruption).

    Deterministic: the same texts and arguments give a byte-identical model.

    Raises:
      ValueError: bad model_type, vocab too small for the reserved pieces, no
        text, or a vocabulary SentencePiece cannot reach on this corpus.
    """
    if model_type not in ("unigram", "bpe"):
        raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    user_symbols = [NEWLINE] + [sentinel(i) for i in range(num_sentinels)]
    reserved = 4 + len(user_symbols) + 256
    if vocab_size <= reserved:
        raise ValueError(
            f"vocab_size={vocab_size} leaves no room for learned pieces: "
            f"{reserved} are reserved (4 specials, newline, {num_sentinels} "
            f"sentinels, 256 bytes); use vocab_size > {reserved}."
        )
    lines = list(training_lines(texts, max_sentences))
    if not lines:
        raise ValueError("Cannot train a tokenizer: the training text is empty.")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            character_coverage=1.0,
            pad_id=PAD_ID,
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            user_defined_symbols=user_symbols,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            input_sentence_size=max_sentences,
            shuffle_input_sentence=False,
            num_threads=min(os.cpu_count() or 1, 8),
            minloglevel=2,
        )
    except RuntimeError as e:
        raise ValueError(
            f"SentencePiece could not train a {vocab_size}-piece {model_type} "
            f"model on {len(lines)} lines: {_first_line(e)}. Use a smaller "
            f"vocab_size or more text."
        ) from e
    storage.write_atomic(model_path, model.getvalue())
    return Tokenizer(model.getvalue(), model_path)


def _first_line(e: Exception) -> str:
    return re.sub(r"\s+", " ", str(e)).strip()[:300]


def load_tokenizer(path: str | os.PathLike) -> Tokenizer | PretrainedTokenizer:
    """Loads a SentencePiece ``.model`` file, or an imported model's ``tokenizer.json``
    (written by :meth:`PretrainedTokenizer.save`).

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file is not a SentencePiece model (or not our tokenizer JSON).
    """
    path = storage.as_path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"Tokenizer model {path} does not exist; set data.tokenizer to "
            "an existing .model file or leave it empty to train one."
        )
    if path.suffix == ".json":
        try:
            return PretrainedTokenizer.from_json(path.read_text(), path)
        except Exception as e:  # json, tokenizers and key errors alike
            raise ValueError(
                f"{path} is not a tokenizer written by lm ({_first_line(e)}); "
                "point data.tokenizer at a .model or lm tokenizer.json file."
            ) from e
    proto = path.read_bytes()
    try:
        return Tokenizer(proto, path)
    except (RuntimeError, OSError) as e:
        raise ValueError(
            f"{path} is not a SentencePiece model ({_first_line(e)}); "
            "point data.tokenizer at a .model file written by SentencePiece."
        ) from e
