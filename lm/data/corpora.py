"""Pretraining corpora read in place: JSON Lines, Parquet, and Hugging Face ``datasets``
directories, on a local disk or an object store (``gs://``, ``s3://``).

``data.source`` names them (see `lm.data.sources` for the others):

``'jsonl:GLOB'``
    JSON Lines files, plain, ``.gz`` or ``.zst`` (Dolma, RedPajama, The Pile). One record per
    non-blank line; the text is the field ``data.text_key`` (``'a/b'`` if nested).
``'parquet:GLOB'``
    Parquet files (FineWeb, DCLM: every Hugging Face dataset's format); the text is the
    column ``data.text_key``.
``'datasets:DIR'``
    A directory written by ``datasets.Dataset.save_to_disk`` (Arrow stream files and
    ``state.json``), or by ``DatasetDict.save_to_disk`` (one such directory per split, whose
    names are the splits). Local only: the files are memory-mapped.

Nothing is copied. Each JSON Lines file gets an index once, the offsets of its lines in the
(decompressed) stream, kept as a small ``.npy`` under ``DATA_DIR/index`` and keyed by the
file's name, size and modification time; a ``.gz`` file gets gzip seek points beside it
(``indexed_gzip``), so any row is reached without decompressing from the start. A ``.zst`` file
is read forward, and restarted from its start when a read goes back (zstd streams have no seek
points). Parquet and Arrow files are their own indexes.

Records are numbered in file order (files sorted by path), rows in order. Splits: with three
files or more, whole files are held out (`lm.data.records.holdout_split` on the file names
without their format extensions, so one corpus in several formats splits alike); with one or
two files every file keeps its first 90% of rows for train, the next 5% for validation and
the last 5% for test. A ``datasets:`` dictionary has its own splits.

Rows are grouped into chunks of ``CHUNK_ROWS`` consecutive records: data shards take whole
chunks (shard ``k`` of ``n``: chunks ``k, k + n, ...``), and the epoch shuffle permutes the
chunks and the rows inside each, so a reader decodes a chunk once for all its rows.
"""

from __future__ import annotations

import collections
import collections.abc
import hashlib
import io
import json
import os
import pathlib
import re
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from lm import storage
from lm.data import records

KINDS = ("jsonl", "parquet", "datasets")
CHUNK_ROWS = 256  # records a reader decodes together (one range read, one row-group slice)
_FORMAT_SUFFIX = re.compile(r"(\.(jsonl|json|ndjson|parquet|arrow))?(\.(gz|zst))?$")
_INDEX_BLOCK = 1 << 23  # bytes scanned at a time while indexing lines
_GZIP_SPACING = 1 << 22  # uncompressed bytes between gzip seek points (32 KiB of window each)


def corpus_files(kind: str, pattern: str) -> list[str]:
    """Sorted files matching `pattern` (local with ``~`` and ``**``, or gs:// / s3://).
    ValueError naming the glob when none match."""
    if storage.is_remote(pattern):
        scheme, _, rest = pattern.partition("://")
        bucket, _, glob = rest.partition("/")
        root = storage.as_path(f"{scheme}://{bucket}")
        files = sorted(f"{scheme}://{bucket}/{p.relative_to(root)}" for p in root.glob(glob))
    else:
        import glob

        paths = glob.glob(os.path.expanduser(pattern), recursive=True)
        files = sorted(p for p in paths if os.path.isfile(p))
    if not files:
        raise ValueError(
            f"No files match the {kind} source glob {pattern!r} (cwd {os.getcwd()}); fix the "
            f'path in data.source="{kind}:GLOB".'
        )
    return files


def document_name(path: str) -> str:
    """A file's name without its directory and format extensions: 'part-00' for
    'a/part-00.jsonl.gz' (the key that holds out whole files alike in every format)."""
    return _FORMAT_SUFFIX.sub("", os.path.basename(path))


def _fingerprint(path: str) -> str:
    """The cache key of a file's index: its name, size and modification time."""
    if storage.is_remote(path):
        info = storage.as_path(path).stat()
        size, mtime = info.length, info.mtime
    else:
        info = os.stat(path)
        path, size, mtime = os.path.abspath(path), info.st_size, info.st_mtime_ns
    return hashlib.sha256(f"{path}\t{size}\t{mtime}".encode()).hexdigest()[:24]


def _open(path: str):
    """A binary file object of `path` (local or remote); the caller closes it."""
    return open(path, "rb") if not storage.is_remote(path) else storage.as_path(path).open("rb")


def _lookup(record: Any, path: str, where: str) -> str:
    """The text at field path 'a/b' of a record, as str; ValueError naming `where`."""
    try:
        value = records.lookup(record, path)
    except KeyError as e:
        raise ValueError(f"{where}: {e.args[0]}") from None
    return value if isinstance(value, str) else str(value)


# ---------------------------------------------------------------------------------- JSON Lines


class ProcessLocal:
    """A picklable reader whose lock, open files and caches belong to the process that uses it:
    `_fresh()` makes them, at construction and again after unpickling (grain's worker
    processes), and pickling leaves them out."""

    def _fresh(self) -> dict[str, Any]:
        return {"_lock": threading.Lock()}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in self._fresh()}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.__dict__.update(self._fresh())


def _line_starts(stream) -> np.ndarray:
    """int64 [rows + 1]: where each non-blank line of a binary stream starts, then the
    stream's length. A line is blank when it is empty or a lone carriage return."""
    newlines, before, offset, last = [], [], 0, b"\n"
    while block := stream.read(_INDEX_BLOCK):
        data = np.frombuffer(block, np.uint8)
        found = np.flatnonzero(data == 10)
        newlines.append(found + offset)
        previous = np.empty(found.shape, np.uint8)
        previous[found > 0] = data[found[found > 0] - 1]
        previous[found == 0] = last[0]
        before.append(previous)
        offset, last = offset + len(block), block[-1:]
    ends = np.concatenate(newlines + [np.array([offset], np.int64)]).astype(np.int64)
    before = np.concatenate(before + [np.array([0], np.uint8)])
    starts = np.concatenate([[0], ends[:-1] + 1])
    length = ends - starts
    blank = (length == 0) | ((length == 1) & (before == ord("\r")))
    return np.concatenate([starts[~blank], [offset]]).astype(np.int64)


class _JsonlFile(ProcessLocal):
    """One JSON Lines file: its line index and reads of row ranges, from any thread."""

    def __init__(self, path: str, index_dir: pathlib.Path, text_key: str):
        self.path, self.text_key = path, text_key
        self.compression = {".gz": "gz", ".zst": "zst"}.get(os.path.splitext(path)[1], "")
        key = _fingerprint(path)
        self._index = index_dir / f"{key}.npy"
        self._seek_points = index_dir / f"{key}.gzidx"
        self.starts = self._load_index()
        self.rows = len(self.starts) - 1
        self.__dict__.update(self._fresh())

    def _fresh(self) -> dict[str, Any]:
        return {"_lock": threading.Lock(), "_stream": None}

    def _load_index(self) -> np.ndarray:
        from lm.data import assets

        if not self._index.exists():
            self._index.parent.mkdir(parents=True, exist_ok=True)
            with assets.file_lock(self._index.with_suffix(".lock")):
                if not self._index.exists():
                    self._build_index()
        return np.load(self._index, mmap_mode="r")

    def _build_index(self) -> None:
        with self._decompressed(build=True) as stream:
            starts = _line_starts(stream)
            if self.compression == "gz":
                stream.seek(0)  # the seek points are complete after the full pass
                buffer = io.BytesIO()
                stream.export_index(fileobj=buffer)
                storage.write_atomic(self._seek_points, buffer.getvalue())
        buffer = io.BytesIO()
        np.save(buffer, starts)
        storage.write_atomic(self._index, buffer.getvalue())

    def _decompressed(self, build: bool = False):
        """A seekable (.gz) or forward-only (.zst) decompressed stream, or the file itself."""
        raw = _open(self.path)
        if self.compression == "gz":
            import indexed_gzip

            stream = indexed_gzip.IndexedGzipFile(fileobj=raw, spacing=_GZIP_SPACING)
            if not build:
                stream.import_index(filename=str(self._seek_points))
            return stream
        if self.compression == "zst":
            import zstandard

            return zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
        return raw

    def _read(self, begin: int, end: int) -> bytes:
        """Bytes [begin, end) of the decompressed stream."""
        with self._lock:
            if self._stream is None or (self.compression == "zst" and self._stream.tell() > begin):
                if self._stream is not None:
                    self._stream.close()
                self._stream = self._decompressed()
            if self.compression == "zst":
                self._stream.read(begin - self._stream.tell())  # forward only
            else:
                self._stream.seek(begin)
            return self._stream.read(end - begin)

    def texts(self, start: int, stop: int) -> list[str]:
        data = self._read(int(self.starts[start]), int(self.starts[stop]))
        lines = [line for line in data.split(b"\n") if line not in (b"", b"\r")]
        if len(lines) != stop - start:
            raise ValueError(
                f"{self.path} changed after it was indexed (rows {start}..{stop} do not "
                f"match); delete {self._index} to index it again."
            )
        out = []
        for row, line in enumerate(lines, start):
            where = f"{self.path}: row {row}"
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{where} is not JSON ({e}); fix or remove that line.") from e
            out.append(_lookup(record, self.text_key, where))
        return out


# ---------------------------------------------------------------------------- Parquet, Arrow


class _ParquetFile(ProcessLocal):
    """One Parquet file: rows by row group (its footer is the index), the text column read
    from the row groups a range covers; the last few decoded groups are kept."""

    _CACHED_GROUPS = 2

    def __init__(self, path: str, text_key: str):
        import pyarrow.parquet as pq

        self.path, self.text_key = path, text_key
        self.column, _, self.inner = text_key.partition("/")
        with _open(path) as f:
            meta = pq.ParquetFile(f).metadata
            names = meta.schema.to_arrow_schema().names
        if self.column not in names:
            raise ValueError(
                f"{path} has no column {self.column!r} (it has {names}); set data.text_key to "
                "the column that holds the text."
            )
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.group_starts = np.cumsum([0] + sizes)
        self.rows = int(self.group_starts[-1])
        self.__dict__.update(self._fresh())

    def _fresh(self) -> dict[str, Any]:
        return {"_lock": threading.Lock(), "_groups": collections.OrderedDict()}

    def _group(self, g: int) -> list:
        import pyarrow.parquet as pq

        with self._lock:
            if g not in self._groups:
                with _open(self.path) as f:
                    table = pq.ParquetFile(f).read_row_group(g, columns=[self.column])
                self._groups[g] = table.column(0).to_pylist()
                while len(self._groups) > self._CACHED_GROUPS:
                    self._groups.popitem(last=False)
            return self._groups[g]

    def texts(self, start: int, stop: int) -> list[str]:
        out = []
        first = int(np.searchsorted(self.group_starts, start, side="right")) - 1
        for g in range(first, len(self.group_starts) - 1):
            begin = int(self.group_starts[g])
            if begin >= stop:
                break
            values = self._group(g)[max(start, begin) - begin : stop - begin]
            out += [self._text(v, row) for row, v in enumerate(values, max(start, begin))]
        return out

    def _text(self, value: Any, row: int) -> str:
        if self.inner:
            return _lookup(value, self.inner, f"{self.path}: row {row}, column {self.column!r}")
        return value if isinstance(value, str) else str(value)


class _ArrowFile(ProcessLocal):
    """One Arrow stream file of a `datasets` directory, memory-mapped (nothing is read until
    a row range is sliced)."""

    def __init__(self, path: str, text_key: str):
        self.path, self.text_key = path, text_key
        self.column, _, self.inner = text_key.partition("/")
        table = self._table()
        if self.column not in table.column_names:
            raise ValueError(
                f"{path} has no column {self.column!r} (it has {table.column_names}); set "
                "data.text_key to the column that holds the text."
            )
        self.rows = table.num_rows
        self.__dict__.update(self._fresh())

    def _fresh(self) -> dict[str, Any]:
        return {"_lock": threading.Lock(), "_cached": None}

    def _table(self):
        import pyarrow as pa

        return pa.ipc.open_stream(pa.memory_map(self.path)).read_all()

    def texts(self, start: int, stop: int) -> list[str]:
        with self._lock:
            if self._cached is None:
                self._cached = self._table()
            table = self._cached
        values = table.slice(start, stop - start).column(self.column).to_pylist()
        if not self.inner:
            return [v if isinstance(v, str) else str(v) for v in values]
        where = f"{self.path}, column {self.column!r}"
        return [_lookup(v, self.inner, f"{where}, row {r}") for r, v in enumerate(values, start)]


# ---------------------------------------------------------------------------------- records


class CorpusRecords(ProcessLocal, collections.abc.Sequence):
    """The records of one split of a corpus, ``{'text': str}``, in file order.

    segments: (file, first row, stop row) ranges that make up the split. Rows are decoded a
    chunk (`chunk_rows` records) at a time and the last few chunks kept, so the chunked
    sharding and shuffle of `lm.data.pipeline` read every chunk once. Picklable (for grain
    worker processes): files reopen in the process that reads them.
    """

    chunk_rows = CHUNK_ROWS
    _CACHED_CHUNKS = 8

    def __init__(self, files: Sequence[Any], segments: Sequence[tuple[int, int, int]], name: str):
        self._files, self._segments, self._name = list(files), list(segments), name
        self._offsets = np.cumsum([0] + [stop - start for _, start, stop in self._segments])
        self.__dict__.update(self._fresh())

    def _fresh(self) -> dict[str, Any]:
        return {"_lock": threading.Lock(), "_chunks": collections.OrderedDict()}

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def forward_only(self) -> list[str]:
        """The files that are read forward only (.zst): a read that goes back in one decompresses
        it again from its start."""
        return [f.path for f in self._files if getattr(f, "compression", "") == "zst"]

    def __getitem__(self, index):  # pytype: disable=signature-mismatch
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"record index {index} out of range [0, {n})")
        chunk, row = divmod(int(index) % n, self.chunk_rows)
        return {"text": self._chunk(chunk)[row]}

    def _chunk(self, chunk: int) -> list[str]:
        with self._lock:
            if chunk in self._chunks:
                self._chunks.move_to_end(chunk)
                return self._chunks[chunk]
        begin, end = chunk * self.chunk_rows, min(len(self), (chunk + 1) * self.chunk_rows)
        texts = []
        first = int(np.searchsorted(self._offsets, begin, side="right")) - 1
        for (file, start, stop), offset in zip(
            self._segments[first:], self._offsets[first:-1], strict=True
        ):
            if offset >= end:
                break
            lo, hi = start + max(0, begin - offset), min(stop, start + end - offset)
            texts += self._files[file].texts(lo, hi)
        with self._lock:
            self._chunks[chunk] = texts
            while len(self._chunks) > self._CACHED_CHUNKS:
                self._chunks.popitem(last=False)
        return texts

    def __repr__(self) -> str:
        return f"CorpusRecords({self._name}, {len(self)} records in {len(self._files)} files)"


def _row_split(rows: int, split: str) -> tuple[int, int]:
    """A file's rows for `split` when files are too few to hold out whole: the first 90% for
    train, the next 5% validation, the last 5% test (files under 3 rows: all train)."""
    k = max(1, rows // 20) if rows >= 3 else 0
    bounds = {"train": (0, rows - 2 * k), "validation": (rows - 2 * k, rows - k)}
    return bounds.get(split, (rows - k, rows))


def _split_segments(files: Sequence[Any], paths: Sequence[str], split: str):
    if len(paths) >= 3:
        held = records.holdout_split(paths, max(1, len(paths) // 20), key=document_name)
        return [
            (i, 0, f.rows)
            for i, (f, p) in enumerate(zip(files, paths, strict=True))
            if held[p] == split
        ]
    return [(i, *_row_split(f.rows, split)) for i, f in enumerate(files)]


def datasets_splits(arg: str) -> list[str] | None:
    """The splits of a saved DatasetDict at ``arg`` (None: a single saved Dataset, whose rows
    or files are held out as any corpus's)."""
    listing = pathlib.Path(os.path.expanduser(arg)) / "dataset_dict.json"
    return json.loads(listing.read_text())["splits"] if listing.is_file() else None


def _datasets_files(directory: pathlib.Path, split: str) -> tuple[list[str], bool]:
    """The Arrow files of a saved Dataset, or of a DatasetDict's `split` (and whether the
    directory is a DatasetDict, whose splits are its own)."""
    if storage.is_remote(directory):
        raise ValueError(
            f"datasets:{directory}: saved datasets are memory-mapped and must be local; copy "
            "the directory to a local disk, or use parquet:GLOB on the bucket."
        )
    if (directory / "dataset_dict.json").is_file():
        names = json.loads((directory / "dataset_dict.json").read_text())["splits"]
        if split not in names:
            raise ValueError(
                f"datasets:{directory} has no split {split!r} (it has {names}); name one of "
                "them, or save the dataset with that split."
            )
        return _datasets_files(directory / split, split)[0], True
    state = directory / "state.json"
    if not state.is_file():
        raise ValueError(
            f"datasets:{directory} holds neither state.json nor dataset_dict.json: it is not a "
            "directory written by datasets' save_to_disk."
        )
    files = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    return [str(directory / f) for f in files], False


def corpus_fingerprint(kind: str, arg: str) -> str:
    """A hash of the corpus's files (names, sizes, modification times): it changes when any
    file is added, removed or rewritten."""
    if kind == "datasets":
        root = pathlib.Path(os.path.expanduser(arg))
        paths = sorted(str(p) for p in root.rglob("*") if p.is_file())
    else:
        paths = corpus_files(kind, arg)
    return hashlib.sha256(" ".join(_fingerprint(p) for p in paths).encode()).hexdigest()[:16]


def get_records(kind: str, arg: str, split: str, text_key: str, data_dir: pathlib.Path):
    """The records of `split` of a corpus read in place (module docstring). ValueError for
    no files, a missing field or column, an empty split."""
    if kind == "datasets":
        paths, own_splits = _datasets_files(pathlib.Path(os.path.expanduser(arg)), split)
        files = [_ArrowFile(p, text_key) for p in paths]
        if own_splits:
            segments = [(i, 0, f.rows) for i, f in enumerate(files)]
            return CorpusRecords(files, segments, f"{kind}:{arg}[{split}]")
    else:
        paths = corpus_files(kind, arg)
        if kind == "jsonl":
            index_dir = data_dir / "index"
            files = [_JsonlFile(p, index_dir, text_key) for p in paths]
        else:
            files = [_ParquetFile(p, text_key) for p in paths]
    if split not in ("train", "validation", "test"):
        raise ValueError(
            f"{kind}:{arg} has the splits train, validation and test (held out by file or by "
            f"rows), not {split!r}."
        )
    return CorpusRecords(files, _split_segments(files, paths, split), f"{kind}:{arg}[{split}]")
