"""SentencePiece tokenizers: train on a corpus, save beside the run, load.

Models trained here use fixed special ids (pad 0, unk 1, bos 2, eos 3), then
``'\\n'`` and any T5 sentinels ``<extra_id_i>`` as user-defined pieces, then 256
byte-fallback pieces, so any UTF-8 text round-trips exactly:
``tok.decode(tok.encode(s)) == s``. Normalisation is the identity (no NFKC, no
whitespace folding) so that bits-per-byte is measured on the real text.
"""

from __future__ import annotations

import io
import os
import pathlib
import re
import tempfile
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
NEWLINE = '\n'
_MAX_LINE_BYTES = 4000  # SentencePiece skips training sentences over 4192 bytes.


def sentinel(i: int) -> str:
    """The text of T5 sentinel ``i``: ``'<extra_id_i>'``."""
    return f'<extra_id_{i}>'


class Tokenizer:
    """A SentencePiece model with the ids this project relies on.

    Attributes:
      path: the ``.model`` file ('' if built from bytes).
      vocab_size: number of pieces (ids are ``0 .. vocab_size-1``).
      pad_id, unk_id, bos_id, eos_id: special ids (0, 1, 2, 3 for models trained here).
    """

    def __init__(self, model_proto: bytes, path: str | os.PathLike = ''):
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
                f'Tokenizer {self.path or "<in memory>"} has no sentinel {piece}: train it with '
                f'num_sentinels > {i} (pipeline does this for task="span_corruption").')
        return sid

    def serialized_model(self) -> bytes:
        """The model file's bytes."""
        return self._proto

    def __getstate__(self):
        return {'model_proto': self._proto, 'path': self.path}

    def __setstate__(self, state):
        self.__init__(state['model_proto'], state['path'])

    def __repr__(self) -> str:
        return f'Tokenizer(path={self.path!r}, vocab_size={self.vocab_size})'


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
    if len(line.encode('utf-8')) <= _MAX_LINE_BYTES:
        yield line
        return
    step = _MAX_LINE_BYTES // 4  # Worst case 4 bytes per character.
    for start in range(0, len(line), step):
        yield line[start:start + step]


def train_tokenizer(texts: Iterable[str], model_path: str | os.PathLike, vocab_size: int, *,
                    model_type: str = 'unigram', max_sentences: int = 2_000_000,
                    num_sentinels: int = 0) -> Tokenizer:
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
    if model_type not in ('unigram', 'bpe'):
        raise ValueError(f"model_type must be 'unigram' or 'bpe', got {model_type!r}")
    user_symbols = [NEWLINE] + [sentinel(i) for i in range(num_sentinels)]
    reserved = 4 + len(user_symbols) + 256
    if vocab_size <= reserved:
        raise ValueError(f'vocab_size={vocab_size} leaves no room for learned pieces: '
                         f'{reserved} are reserved (4 specials, newline, {num_sentinels} '
                         f'sentinels, 256 bytes); use vocab_size > {reserved}.')
    lines = list(training_lines(texts, max_sentences))
    if not lines:
        raise ValueError('Cannot train a tokenizer: the training text is empty.')
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
            model_type=model_type, byte_fallback=True, character_coverage=1.0,
            pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
            user_defined_symbols=user_symbols, normalization_rule_name='identity',
            add_dummy_prefix=False, remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True, input_sentence_size=max_sentences,
            shuffle_input_sentence=False, num_threads=min(os.cpu_count() or 1, 8),
            minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f'SentencePiece could not train a {vocab_size}-piece {model_type} '
                         f'model on {len(lines)} lines: {_first_line(e)}. Use a smaller '
                         f'vocab_size or more text.') from e
    _atomic_write(pathlib.Path(model_path), model.getvalue())
    return Tokenizer(model.getvalue(), model_path)


def _first_line(e: Exception) -> str:
    return re.sub(r'\s+', ' ', str(e)).strip()[:300]


def _atomic_write(path: pathlib.Path, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary file and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Loads a SentencePiece ``.model`` file.

    Raises:
      FileNotFoundError: no such file.
      ValueError: the file is not a SentencePiece model.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'Tokenizer model {path} does not exist; set data.tokenizer to '
                                'an existing .model file or leave it empty to train one.')
    proto = path.read_bytes()
    try:
        return Tokenizer(proto, path)
    except (RuntimeError, OSError) as e:
        raise ValueError(f'{path} is not a SentencePiece model ({_first_line(e)}); '
                         'point data.tokenizer at a .model file written by SentencePiece.') from e
