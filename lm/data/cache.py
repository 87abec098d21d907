"""A tokenized cache: a source's splits tokenized once, read by training instead of text.

    python -m lm.main prepare --config EXP --workdir W [--workers 8] --config.data.cache=DIR

``DIR`` (local or ``gs://``/``s3://``) holds ``manifest.json`` and, per split, shards of
``SHARD_RECORDS`` records: ``SPLIT/NNNNN.tokens.npy`` (every record's ids, ``[bos] + ids +
[eos]`` as the pipeline encodes a document, concatenated; uint16 when the vocabulary allows)
and ``SPLIT/NNNNN.index.npy`` (int64 [3, records + 1]: the offsets of each record's tokens,
then each record's UTF-8 bytes and characters, padded with a 0, so that bits per byte and the unigram baseline come out as from
the text). The manifest is the ledger: its key names the source (spec, text field, a hash of
its files) and the tokenizer (a hash of its model), and it lists the finished shards. Shards
are written whole (a file appears complete or not at all) and entered in the ledger after, so
a prepare that is killed loses only the shards being written, and running it again writes just
those, byte for byte as an unbroken run would.

Records read from the cache are ``{'tokens', 'bytes', 'chars'}`` in the source's order, with
its ``chunk_rows``, so batches, losses and evaluation equal those of tokenizing on the fly.
"""

from __future__ import annotations

import collections
import collections.abc
import concurrent.futures
import io
import json
import multiprocessing
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lm import storage
from lm.data import corpora, sources

SHARD_RECORDS = 1 << 14  # a multiple of every source's chunk_rows
MANIFEST = "manifest.json"
FORMAT = 1
SPLITS = ("train", "validation", "test")


def _document(tokenizer, ids: Sequence[int]) -> np.ndarray:
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []  # imported models may not use it
    return np.asarray([*bos, *ids, tokenizer.eos_id], np.int32)


def encode_document(tokenizer, text: str) -> np.ndarray:
    """A text as the LM pipeline encodes a document: int32 ``[bos] + ids + [eos]`` (no bos for
    tokenizers whose model was trained without it); an empty text gives no tokens."""
    return _document(tokenizer, tokenizer.encode(text)) if text else np.zeros([0], np.int32)


def document_tokens(tokenizer, texts: Sequence[str]) -> list[np.ndarray]:
    """`encode_document` of each text, the texts encoded as one batch (SentencePiece's threads
    pay off on a batch; on one text they cost more than they save)."""
    full = [t for t in texts if t]
    ids = iter(tokenizer.encode_batch(full) if full else [])
    return [_document(tokenizer, next(ids)) if t else np.zeros([0], np.int32) for t in texts]


def cache_key(cfg, tokenizer) -> dict[str, Any]:
    """What a cache was made from: the source and the tokenizer (and this module's format)."""
    return {
        "format": FORMAT,
        "source": cfg.source,
        "text_key": cfg.text_key,
        "source_fingerprint": sources.source_fingerprint(cfg),
        "tokenizer": tokenizer.fingerprint(),
        "shard_records": SHARD_RECORDS,
    }


def _read_manifest(root) -> dict[str, Any] | None:
    path = root / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def _check_key(manifest: dict[str, Any], key: dict[str, Any], root) -> None:
    if manifest["key"] != key:
        differs = [k for k in key if manifest["key"].get(k) != key[k]]
        what = {"source_fingerprint": "the source's files", "tokenizer": "the tokenizer"}
        named = ", ".join(what.get(k, k) for k in differs)
        raise ValueError(
            f"data.cache={root} was made from another source or tokenizer ({named} differ); "
            "point data.cache at a new directory and run `python -m lm.main prepare` for it, "
            "or delete that one."
        )


def _shard_files(root, split: str, shard: int):
    return root / split / f"{shard:05d}.tokens.npy", root / split / f"{shard:05d}.index.npy"


def _npy_bytes(write: Callable[[io.BytesIO], None]) -> bytes:
    buffer = io.BytesIO()
    write(buffer)
    return buffer.getvalue()


def write_shard(root: str, split: str, shard: int, records, tokenizer, dtype: str) -> dict:
    """Tokenizes records [shard * SHARD_RECORDS, ...) of a split and writes the shard's two
    files, each whole. Returns its counts: records, tokens, bytes."""
    root = storage.as_path(root)
    begin, end = shard * SHARD_RECORDS, min(len(records), (shard + 1) * SHARD_RECORDS)
    texts = [records[i]["text"] for i in range(begin, end)]
    tokens = document_tokens(tokenizer, texts)
    offsets = np.cumsum([0] + [len(t) for t in tokens]).astype(np.int64)
    text_bytes = np.asarray([len(t.encode("utf-8")) for t in texts], np.int64)
    chars = np.asarray([len(t) for t in texts], np.int64)
    flat = np.concatenate(tokens or [np.zeros([0], np.int32)]).astype(dtype)
    tokens_file, index_file = _shard_files(root, split, shard)
    storage.write_atomic(tokens_file, _npy_bytes(lambda f: np.save(f, flat)))
    index = np.stack([offsets, np.append(text_bytes, 0), np.append(chars, 0)])
    storage.write_atomic(index_file, _npy_bytes(lambda f: np.save(f, index)))
    return {"records": end - begin, "tokens": int(offsets[-1]), "bytes": int(text_bytes.sum())}


def prepare(cfg, tokenizer, *, workers: int = 0, log: Callable[[str], None] = print) -> dict:
    """Tokenizes every split of ``cfg.source`` into ``cfg.cache`` with ``workers`` processes
    (0: this one), skipping the shards its ledger lists as finished. Returns the manifest.
    ValueError when the cache there was made from another source or tokenizer."""
    root = storage.as_path(cfg.cache)
    key = cache_key(cfg, tokenizer)
    manifest = _read_manifest(root) or {"key": key, "splits": {}}
    _check_key(manifest, key, root)
    dtype = "uint16" if tokenizer.vocab_size <= 1 << 16 else "uint32"
    lock = threading.Lock()
    for split in SPLITS:
        if split not in sources.source_splits(cfg):
            log(f"prepare {split}: {cfg.source} has no such split")
            continue
        records = sources.get_source(cfg, split)
        shards = -(-len(records) // SHARD_RECORDS)
        entry = manifest["splits"].setdefault(
            split,
            {"records": len(records), "shards": shards, "dtype": dtype, "finished": {}},
        )
        entry["chunk_rows"] = getattr(records, "chunk_rows", 0)
        todo = [k for k in range(shards) if str(k) not in entry["finished"]]
        log(f"prepare {split}: {len(records):,} records, {shards} shards, {len(todo)} to write")

        def finished(shard: int, counts: dict, entry=entry) -> None:
            with lock:
                entry["finished"][str(shard)] = counts
                storage.write_atomic(root / MANIFEST, json.dumps(manifest, indent=1))

        args = (str(root), split)
        if workers:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
                jobs = {
                    pool.submit(write_shard, *args, k, records, tokenizer, dtype): k for k in todo
                }
                for job in concurrent.futures.as_completed(jobs):
                    finished(jobs[job], job.result())
        else:
            for k in todo:
                finished(k, write_shard(*args, k, records, tokenizer, dtype))
    storage.write_atomic(root / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def prepare_caches(cfg, tokenizer, *, workers: int = 0, log: Callable[[str], None] = print):
    """`prepare` for ``cfg.source``, or for each source of ``cfg.mixture`` into its own cache
    (`lm.data.sources.mixture_configs`). Returns [(the source, its manifest)]."""
    parts = [part for _, part in sources.mixture_configs(cfg)] or [cfg]
    out = []
    for part in parts:
        if len(parts) > 1:
            log(f"prepare {part.source} into {part.cache}")
        out.append((part.source, prepare(part, tokenizer, workers=workers, log=log)))
    return out


class TokenRecords(corpora.ProcessLocal, collections.abc.Sequence):
    """The records of one split of a cache, ``{'tokens': int32 [n], 'bytes', 'chars'}``, in
    the source's order and with its ``chunk_rows`` (0: none). A record is read from its shard
    (a local shard memory-mapped, a remote one by a ranged read); the last shards' indexes
    and maps are kept."""

    _CACHED_INDEXES = 8

    def __init__(self, root: str, split: str, entry: dict[str, Any]):
        self._root, self._split = root, split
        self._len, self.chunk_rows = entry["records"], entry["chunk_rows"]
        self.__dict__.update(self._fresh())

    def _fresh(self) -> dict[str, Any]:
        return {"_lock": threading.Lock(), "_indexes": collections.OrderedDict()}

    def __len__(self) -> int:
        return self._len

    def _shard(self, shard: int) -> tuple[np.ndarray, Any]:
        """(the shard's index, its tokens: a memory map, or the remote file's path)."""
        with self._lock:
            if shard not in self._indexes:
                tokens, index = _shard_files(storage.as_path(self._root), self._split, shard)
                local = not storage.is_remote(tokens)
                self._indexes[shard] = (
                    np.load(io.BytesIO(index.read_bytes())),
                    np.load(str(tokens), mmap_mode="r") if local else tokens,
                )
                while len(self._indexes) > self._CACHED_INDEXES:
                    self._indexes.popitem(last=False)
            return self._indexes[shard]

    @staticmethod
    def _read_remote(path, begin: int, end: int) -> np.ndarray:
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0}
            _, _, dtype = read_header.get(version, np.lib.format.read_array_header_2_0)(f)
            f.seek(f.tell() + begin * dtype.itemsize)
            return np.frombuffer(f.read((end - begin) * dtype.itemsize), dtype)

    def __getitem__(self, index):  # pytype: disable=signature-mismatch
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if not -self._len <= index < self._len:
            raise IndexError(f"record index {index} out of range [0, {self._len})")
        shard, row = divmod(int(index) % self._len, SHARD_RECORDS)
        (offsets, text_bytes, chars), tokens = self._shard(shard)
        begin, end = int(offsets[row]), int(offsets[row + 1])
        ids = tokens[begin:end] if isinstance(tokens, np.ndarray) else None
        ids = self._read_remote(tokens, begin, end) if ids is None else ids
        return {
            "tokens": ids.astype(np.int32),
            "bytes": int(text_bytes[row]),
            "chars": int(chars[row]),
        }


def open_split(cfg, tokenizer, split: str) -> TokenRecords:
    """The cached records of ``split``; ValueError (one line) when ``cfg.cache`` holds no
    finished cache of this source and tokenizer."""
    root = storage.as_path(cfg.cache)
    manifest = _read_manifest(root)
    prepare_hint = (
        f"run `python -m lm.main prepare` with the same --config and data.cache={cfg.cache}"
    )
    if manifest is None:
        raise ValueError(f"data.cache={cfg.cache} holds no tokenized cache yet; {prepare_hint}.")
    _check_key(manifest, cache_key(cfg, tokenizer), root)
    entry = manifest["splits"].get(split)
    if entry is None and split not in sources.source_splits(cfg):
        raise ValueError(
            f"{cfg.source} has no split {split!r} (it has {list(sources.source_splits(cfg))}), "
            f"so data.cache={cfg.cache} holds none; use a source that has it."
        )
    if entry is None or len(entry["finished"]) < entry["shards"]:
        done = 0 if entry is None else len(entry["finished"])
        total = "?" if entry is None else entry["shards"]
        raise ValueError(
            f"data.cache={cfg.cache} has {done} of {total} shards of split {split!r}; "
            f"{prepare_hint} to finish it."
        )
    return TokenRecords(str(root), split, entry)
