"""Grain input pipelines: config, tokenizer, LM packing, seq2seq batching, sharding.

    cfg = DataConfig.from_dict({'source': 'shakespeare', 'seq_len': 256, 'batch_size': 32})
    tok = get_tokenizer(cfg, workdir)                  # trains <workdir>/tokenizer.model once
    ds = make_dataset(cfg, 'train', tok, seed=0, process_index=jax.process_index(),
                      process_count=jax.process_count())
    it = iter(ds)
    batch = next(it)                                   # dict of numpy [B, L] arrays
    state = it.get_state()                             # JSON-able dict; it.set_state(state) resumes

Batch format, ``B = cfg.batch_size // process_count`` rows per process,
``L = cfg.seq_len`` (int32 unless said):

task ``'lm'``
    ``inputs``, ``targets`` (the next token, always from the same segment),
    ``segment_ids`` (1..n per row for the packed pieces, 0 = padding),
    ``positions`` (0.. restarting in each segment), ``weights`` float32 (1 on
    every real position, 0 on padding). A record is encoded as
    ``[bos] + tokens + [eos]``; a sequence of n tokens yields pieces
    ``tokens[k*L : k*L + L + 1]`` (consecutive pieces share one token, so every
    token after the first is a target exactly once); piece ``p`` gives
    ``inputs = p[:-1]``, ``targets = p[1:]``. The pieces of a window of documents
    (~256k tokens, or four batches' worth) are shuffled, packed first-fit into rows
    and the rows shuffled (`lm.data.packing`). Records with empty text are skipped.

tasks ``'span_corruption'`` / ``'translation'``
    examples from :mod:`lm.data.seq2seq` (``encoder_inputs``,
    ``encoder_segment_ids`` [B, Le] plus the decoder fields above), one per row.

Determinism: the stream is a pure function of (cfg, split, tokenizer, seed,
process_index, process_count). Records are sharded ``records[k::shards]`` into
data shards before shuffling (by default one shard per process); each epoch is
reshuffled. With a fixed ``cfg.shards`` the global batch (all processes' rows in
process order) does not depend on the number of processes. ``repeat=False`` makes one pass
and pads the last batch with all-padding rows.
"""

from __future__ import annotations

import atexit
import collections
import collections.abc
import dataclasses
import json
import logging
import math
import tempfile
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import grain
import numpy as np
from etils import epath

from lm import storage
from lm.data import cache, corpora, packing, sources
from lm.data.tokenizers import Tokenizer, load_tokenizer, train_tokenizer
from lm.utils import config_from_dict

log = logging.getLogger(__name__)

TASKS = ("lm", "span_corruption", "translation")
NUM_SENTINELS = 100  # T5's <extra_id_0..99>, added to tokenizers for span corruption.
_SHUFFLE_WINDOW_TOKENS = 1 << 18  # LM pieces are shuffled and packed in windows of ~256k tokens.


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What data to read and how to batch it (see the module docstring).

    Attributes:
      source: 'shakespeare' | 'text:GLOB' | 'jsonl:GLOB' | 'parquet:GLOB' | 'datasets:DIR' |
        'tfds:NAME[/CONFIG]' | 'bible:SRC-TGT' (`lm.data.sources`, `lm.data.corpora`).
      task: 'lm' | 'span_corruption' | 'translation'.
      text_key: the field or column holding the text for 'tfds:', 'jsonl:', 'parquet:' and
        'datasets:' sources ('a/b' if nested).
      data_dir: where TFDS data is prepared ('' -> assets.cache_dir()/'tfds').
      seq_len: LM row length / decoder length.
      encoder_len: seq2seq encoder length.
      batch_size: global batch size (all processes together).
      vocab_size: tokenizer size to train (and the most a loaded one may have).
      tokenizer: an existing .model to use ('' -> <workdir>/tokenizer.model, trained if absent).
      tokenizer_max_chars: cap on the training-split characters used to train
        the tokenizer and to fit :func:`unigram_entropy`.
      noise_density, mean_noise_span_length: T5 span corruption.
      shuffle: shuffle records (each epoch), LM pieces and packed rows.
      worker_count: grain worker processes per data shard (0 = a background thread).
      shards: independent data streams (0 = one per process). Shard ``k`` reads
        ``records[k::shards]`` and gives ``batch_size // shards`` rows of every
        batch; process ``p`` of ``n`` reads shards ``p*shards/n .. (p+1)*shards/n - 1``.
        A fixed value makes the global batches the same on any number of processes
        that divides it, so a checkpoint resumes on another number of hosts.
      cache: a tokenized cache of the source (`lm.data.cache`, made by ``python -m lm.main
        prepare``), local or on an object store: LM training and evaluation read token ids
        from it and tokenize nothing ('' = tokenize the text as it is read).
      mixture: several sources mixed by weight, ``'0.7 jsonl:web/*.gz; 0.3 parquet:code/*'``
        (then ``source`` is not read). Training rows are drawn from each source in those
        shares (deterministically, part of the iterator state); held-out splits and the
        tokenizer's text take every source (the tokenizer in those shares). With ``cache``,
        each source has its own cache under it (`lm.data.sources.mixture_configs`).
      mixture_schedule: weights from a step on, ``'1000: 0.5 0.5; 5000: 0.2 0.8'`` (one per
        mixture source; 0 leaves a source out from that step).
    """

    source: str = "shakespeare"
    task: str = "lm"
    text_key: str = "text"
    data_dir: str = ""
    seq_len: int = 256
    encoder_len: int = 256
    batch_size: int = 32
    vocab_size: int = 4096
    tokenizer: str = ""
    tokenizer_max_chars: int = 20_000_000
    noise_density: float = 0.15
    mean_noise_span_length: float = 3.0
    shuffle: bool = True
    worker_count: int = 0
    shards: int = 0
    cache: str = ""
    mixture: str = ""
    mixture_schedule: str = ""

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"data.task={self.task!r} is not one of {TASKS}.")
        sources.parse_source(self.source)
        for name in ("seq_len", "encoder_len", "batch_size", "vocab_size", "tokenizer_max_chars"):
            if getattr(self, name) <= 0:
                raise ValueError(f"data.{name} must be positive, got {getattr(self, name)}.")
        if self.worker_count < 0:
            raise ValueError(f"data.worker_count must be >= 0, got {self.worker_count}.")
        if self.shards < 0 or (self.shards and self.batch_size % self.shards):
            raise ValueError(
                f"data.shards={self.shards} must be 0 (one per process) or divide "
                f"data.batch_size={self.batch_size}."
            )
        if self.mixture:
            parts = sources.parse_mixture(self.mixture)
            if self.task != "lm":
                raise ValueError(
                    "data.mixture mixes language-modelling text sources; it takes data.task='lm'."
                )
            mixture_schedule(self.mixture_schedule, len(parts))
        elif self.mixture_schedule:
            raise ValueError("data.mixture_schedule needs data.mixture (the sources it weighs).")
        if self.cache and self.task != "lm":
            raise ValueError(
                f"data.cache holds language-modelling tokens; data.task={self.task!r} reads "
                "text: leave data.cache empty."
            )
        if not 0 < self.noise_density < 1:
            raise ValueError(f"data.noise_density must be in (0, 1), got {self.noise_density}.")
        if self.mean_noise_span_length < 1:
            raise ValueError(
                f"data.mean_noise_span_length must be >= 1, got {self.mean_noise_span_length}."
            )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DataConfig:
        """Builds a DataConfig from a dict / ConfigDict (`lm.utils.config_from_dict`).

        Raises:
          ValueError: a key that is not a field (naming it and listing the
            valid ones), or a value of the wrong type (naming the key).
        """
        return config_from_dict(cls, d, prefix="data")


# ---------------------------------------------------------------------------
# Tokenizer.


def mixture_schedule(text: str, sources_count: int) -> list[tuple[int, tuple[float, ...]]]:
    """``'1000: 0.5 0.5; 5000: 0.2 0.8'`` -> [(1000, (0.5, 0.5)), (5000, (0.2, 0.8))]: increasing
    steps, one weight per mixture source, not all 0. ValueError naming the entry."""
    out = []
    for entry in (e.strip() for e in text.split(";") if e.strip()):
        step, _, weights = entry.partition(":")
        try:
            parsed = (int(step), tuple(float(w) for w in weights.split()))
        except ValueError:
            parsed = (-1, ())
        ok = parsed[0] > (out[-1][0] if out else 0) and len(parsed[1]) == sources_count
        if not ok or min(parsed[1]) < 0 or sum(parsed[1]) <= 0:
            raise ValueError(
                f"data.mixture_schedule entry {entry!r} is not 'STEP: W1 ... W{sources_count}' "
                f"with increasing steps > 0 and {sources_count} weights >= 0, not all 0."
            )
        out.append(parsed)
    return out


def training_texts(
    cfg: DataConfig, split: str = "train", max_chars: int | None = None
) -> Iterator[str]:
    """Texts of ``split`` in source order ('source' and 'target' for pairs), at most
    ``max_chars`` characters in all (default ``cfg.tokenizer_max_chars``); the
    text that crosses the cap is cut. A mixture gives each source its share of the cap."""
    budget = cfg.tokenizer_max_chars if max_chars is None else max_chars
    if parts := sources.mixture_configs(cfg):
        total = sum(w for w, _ in parts)
        for weight, part in parts:
            yield from training_texts(part, split, int(budget * weight / total))
        return
    for record in sources.get_source(cfg, split):
        for key in ("text", "source", "target"):
            if key in record and budget > 0:
                text = record[key][:budget]
                budget -= len(text)
                yield text
        if budget <= 0:
            return


def saved_tokenizer_file(workdir: storage.PathLike) -> epath.Path | None:
    """The tokenizer file a run saved in its workdir: ``tokenizer.json`` (an imported model's,
    adopted by a fine-tune) before ``tokenizer.model``; None if it holds neither."""
    root = storage.as_path(workdir)
    for name in ("tokenizer.json", "tokenizer.model"):
        if (root / name).exists():
            return root / name
    return None


def saved_tokenizer(cfg: DataConfig, workdir: storage.PathLike) -> Tokenizer:
    """The tokenizer a trained run used, for commands that only read its workdir (sample,
    eval, icl, convert): found as `get_tokenizer` finds it (``cfg.tokenizer``, else the file the
    run saved), never trained and never written. Returns it loaded.

    Raises:
      ValueError: the file is gone, naming it and the fix (a tokenizer trained anew would not
        match the model's embeddings, and the samples would be garbage).
    """
    if cfg.tokenizer:
        if not storage.as_path(cfg.tokenizer).is_file():
            raise ValueError(
                f"the run's data.tokenizer {cfg.tokenizer} is missing: the model needs the "
                "tokenizer it was trained with; copy it back to that path"
            )
        return load_tokenizer(cfg.tokenizer)
    path = saved_tokenizer_file(workdir)
    if path is None:
        raise ValueError(
            f"{storage.as_path(workdir) / 'tokenizer.model'} is missing: the model needs the "
            "tokenizer it was trained with; copy it back from a copy of the run"
        )
    return load_tokenizer(path)


def get_tokenizer(cfg: DataConfig, workdir: str | None) -> Tokenizer:
    """The run's tokenizer.

    ``cfg.tokenizer`` set -> load it. Else ``<workdir>/tokenizer.json`` (an
    imported model's) or ``<workdir>/tokenizer.model`` exists -> load it (resume). Else train on the train split (at most
    ``cfg.tokenizer_max_chars`` characters; 100 sentinels for span corruption)
    and save it there. ``workdir=None`` uses a fresh temporary directory.
    The data source is checked before anything is written.

    Raises:
      ValueError: bad data (see ``sources.get_source``), or a tokenizer with
        more pieces than ``cfg.vocab_size``.
    """
    if cfg.tokenizer:
        tok = load_tokenizer(cfg.tokenizer)
    else:
        root = storage.as_path(workdir if workdir else tempfile.mkdtemp(prefix="lm-"))
        if (saved := saved_tokenizer_file(root)) is not None:  # a resume, or an adopted import's
            tok = load_tokenizer(saved)
        else:
            texts = list(training_texts(cfg))
            sentinels = NUM_SENTINELS if cfg.task == "span_corruption" else 0
            tok = train_tokenizer(
                texts, root / "tokenizer.model", cfg.vocab_size, num_sentinels=sentinels
            )
    if isinstance(tok, Tokenizer) and tok.vocab_size > cfg.vocab_size:
        raise ValueError(
            f"Tokenizer {tok.path} has {tok.vocab_size} pieces but "
            f"data.vocab_size={cfg.vocab_size}; raise vocab_size to at least "
            f"{tok.vocab_size} or use another tokenizer."
        )
    return tok


# ---------------------------------------------------------------------------
# Grain transforms (module-level classes so that grain workers can pickle them).


class _EncodeDocument(grain.transforms.Map):
    """{'text': str} -> int32 [n + 2] = [bos] + encode(text) + [eos] (empty text: []).

    The bos is left out for tokenizers whose model was trained without it.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer

    def map(self, record: Mapping[str, Any]) -> np.ndarray:
        if "tokens" in record:  # a tokenized cache's record
            return record["tokens"]
        return cache.encode_document(self._tok, record["text"])


class _PadRows(grain.transforms.Map):
    """Pads a batch [b <= B, ...] with all-zero rows to [B, ...]."""

    def __init__(self, batch_size: int):
        self._b = batch_size

    def map(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: _pad_rows(v, self._b) for k, v in batch.items()}


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    if x.shape[0] == rows:
        return x
    return np.concatenate([x, np.zeros((rows - x.shape[0], *x.shape[1:]), x.dtype)])


def empty_batch(cfg: DataConfig, batch_size: int) -> dict[str, np.ndarray]:
    """An all-padding batch of ``cfg.task``'s format (zeros, weights 0)."""
    shape = (batch_size, cfg.seq_len)
    batch = {
        k: np.zeros(shape, np.int32) for k in ("inputs", "targets", "segment_ids", "positions")
    }
    batch["weights"] = np.zeros(shape, np.float32)
    if cfg.task != "lm":
        batch["encoder_inputs"] = np.zeros((batch_size, cfg.encoder_len), np.int32)
        batch["encoder_segment_ids"] = np.zeros((batch_size, cfg.encoder_len), np.int32)
    return batch


class _ExactBatchesIterator(grain.DatasetIterator):
    """Yields the parent's batches, then all-padding batches, ``n`` in all."""

    def __init__(self, parent: grain.DatasetIterator, n: int, empty: dict[str, np.ndarray]):
        super().__init__(parent)
        self._n, self._empty = n, empty
        self._count, self._exhausted = 0, False

    def __next__(self) -> dict[str, np.ndarray]:
        if self._count >= self._n:
            raise StopIteration
        batch = None
        if not self._exhausted:
            try:
                batch = next(self._parent)
            except StopIteration:
                self._exhausted = True
        self._count += 1
        return batch if batch is not None else {k: v.copy() for k, v in self._empty.items()}

    def get_state(self) -> dict[str, Any]:
        return {
            "parent": self._parent.get_state(),
            "count": self._count,
            "exhausted": self._exhausted,
        }

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._count, self._exhausted = state["count"], state["exhausted"]


class _ExactBatches(grain.IterDataset):
    """``parent`` cut or padded (with ``empty``) to exactly ``n`` batches."""

    def __init__(self, parent: grain.IterDataset, n: int, empty: dict[str, np.ndarray]):
        super().__init__(parent)
        self._n, self._empty = n, empty

    def __iter__(self) -> _ExactBatchesIterator:
        return _ExactBatchesIterator(self._parent.__iter__(), self._n, self._empty)


_LIVE_PREFETCHERS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_prefetchers() -> None:
    """Stops prefetch threads before interpreter teardown.

    grain's iterator ``__del__`` calls ``close()``, which fails noisily when it
    runs during teardown (module globals already None) for an iterator still
    referenced then (e.g. a script's global): close now, make later calls no-ops.
    """
    for it in list(_LIVE_PREFETCHERS):
        it.close()
        it.close = lambda: None


class _ThreadPrefetch(grain.IterDataset):
    """grain's ThreadPrefetchIterDataset whose iterators are closed at exit.

    The iterator's state is its parent's, so checkpoints do not depend on it.
    """

    def __init__(self, parent: grain.IterDataset, buffer_size: int):
        super().__init__(parent)
        self._buffer_size = buffer_size

    def __iter__(self) -> grain.DatasetIterator:
        it = grain.experimental.ThreadPrefetchIterDataset(
            self._parent, prefetch_buffer_size=self._buffer_size
        ).__iter__()
        _LIVE_PREFETCHERS.add(it)
        return it


# ---------------------------------------------------------------------------
# Datasets.


def per_process_batch_size(cfg: DataConfig, process_count: int) -> int:
    """``cfg.batch_size // process_count``; ValueError unless it divides evenly."""
    if process_count <= 0 or cfg.batch_size % process_count:
        raise ValueError(
            f"data.batch_size={cfg.batch_size} must be a multiple of the number of "
            f"processes ({process_count})."
        )
    return cfg.batch_size // process_count


def process_shards(cfg: DataConfig, process_index: int, process_count: int) -> tuple[range, int]:
    """(the data shards process ``process_index`` reads, the number of shards).

    ``cfg.shards == 0`` means one shard per process (shard = process index).
    """
    per_process_batch_size(cfg, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, {process_count}).")
    num = cfg.shards or process_count
    if num % process_count:
        raise ValueError(
            f"data.shards={num} is not a multiple of the {process_count} processes; "
            f"set data.shards to a multiple of {process_count} (or 0: one per process)."
        )
    per = num // process_count
    return range(process_index * per, (process_index + 1) * per), num


def shard_name(shard: int, num_shards: int) -> str:
    """The key of one data shard's iterator state in checkpoints: 'shard_3-of-8'."""
    return f"shard_{shard}-of-{num_shards}"


def derive_seed(seed: int, *salt: int) -> int:
    """A 32-bit seed from ``seed`` and ``salt`` integers (independent streams)."""
    return int(np.random.SeedSequence([int(seed) % (1 << 63), *salt]).generate_state(1)[0])


def lm_source(cfg: DataConfig, split: str, tokenizer: Tokenizer):
    """The records of ``split`` that the LM reads: token records of ``cfg.cache`` when set
    (`lm.data.cache.open_split`), else the source's text records."""
    parts = [part for _, part in sources.mixture_configs(cfg)]
    if cfg.cache and parts:  # a mixture: its sources one after the other
        return sources.Chain([cache.open_split(part, tokenizer, split) for part in parts])
    if cfg.cache:
        return cache.open_split(cfg, tokenizer, split)
    return sources.get_source(cfg, split)


def _records(
    cfg: DataConfig,
    split: str,
    tokenizer: Tokenizer,
    *,
    seed: int,
    shard: int,
    num_shards: int,
    repeat: bool,
) -> grain.MapDataset:
    """One data shard of ``split`` (``records[shard::num_shards]``, or whole chunks of a
    chunked source), shuffled per epoch and repeated as asked."""
    source = lm_source(cfg, split, tokenizer)
    chunk_rows = getattr(source, "chunk_rows", 0)  # corpora read in place decode by chunks
    if cfg.shuffle and repeat and (zst := getattr(source, "forward_only", [])):
        log.warning(
            "%s: %d zstd files (%s, ...) are read forward only, so each shuffled chunk read in "
            "them decompresses from the file's start; run `python -m lm.main prepare` and "
            "train from data.cache for corpora larger than a few GB.",
            cfg.source,
            len(zst),
            zst[0],
        )
    if chunk_rows:
        records = grain.MapDataset.source(_ShardChunks(source, chunk_rows, shard, num_shards))
    else:
        records = grain.MapDataset.source(source)[shard::num_shards]
    if len(records) == 0 and repeat:  # one pass (evaluation): an empty shard only pads
        raise ValueError(
            f"Split {split!r} of {cfg.source!r} has {len(source)} records, fewer "
            f"than the {num_shards} data shards (data.shards, or one per process); "
            "use fewer shards or processes, or more data."
        )
    if cfg.shuffle and chunk_rows:
        records = _ChunkShuffle(records, chunk_rows, derive_seed(seed, shard, 0))
    elif cfg.shuffle:
        records = _EpochShuffle(records, derive_seed(seed, shard, 0))
    return records.repeat() if repeat else records


class _ShardChunks(collections.abc.Sequence):
    """Data shard ``shard`` of ``num_shards`` of chunked records: chunks ``shard``,
    ``shard + num_shards``, ... of ``chunk_rows`` consecutive records each, in order. Every
    chunk is whole but the corpus's last, which is the shard's last when it has it."""

    def __init__(self, records, chunk_rows: int, shard: int, num_shards: int):
        self._records, self._rows = records, chunk_rows
        self._chunks = range(shard, -(-len(records) // chunk_rows), num_shards)
        whole = len(self._chunks) * chunk_rows
        has_last = len(self._chunks) and (self._chunks[-1] + 1) * chunk_rows > len(records)
        self._len = whole - ((self._chunks[-1] + 1) * chunk_rows - len(records) if has_last else 0)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):  # pytype: disable=signature-mismatch
        if not 0 <= index < self._len:
            raise IndexError(f"record index {index} out of range [0, {self._len})")
        chunk, row = divmod(index, self._rows)
        return self._records[self._chunks[chunk] * self._rows + row]


class _ChunkShuffle(grain.MapDataset):
    """Each epoch a new order of the parent's chunks of ``chunk_rows`` records (the last,
    partial one stays last) and of the rows inside each chunk, so that consecutive records come
    from one chunk, which a corpus read in place decodes once. Same indexing contract as
    `_EpochShuffle`."""

    _MAX_CACHED = 16

    def __init__(self, parent: grain.MapDataset, chunk_rows: int, seed: int):
        super().__init__(parent)
        self._rows, self._seed = chunk_rows, seed
        self._perms: collections.OrderedDict = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"ChunkShuffle(chunk_rows={self._rows}, seed={self._seed})"

    def _perm(self, key: tuple[int, ...], n: int) -> np.ndarray:
        perm = self._perms.get(key)
        if perm is None:
            perm = np.random.default_rng([self._seed, *key]).permutation(n)
            self._perms[key] = perm
            while len(self._perms) > self._MAX_CACHED:
                self._perms.popitem(last=False)
        return perm

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        n = len(self._parent)
        epoch, i = divmod(int(index), n)
        whole = n // self._rows
        slot, row = divmod(i, self._rows)
        chunk = int(self._perm((epoch,), whole)[slot]) if slot < whole else slot
        size = self._rows if chunk < whole else n - whole * self._rows
        row = int(self._perm((epoch, chunk + 1), size)[row])
        return self._parent[epoch * n + chunk * self._rows + row]


class _EpochShuffle(grain.MapDataset):
    """A new random permutation of the parent for every epoch (``index // len``).

    Same contract as ``MapDataset.shuffle`` (element ``i`` of epoch ``e`` is
    ``parent[e * n + perm_e[i]]``), but with numpy permutations: grain's
    ``index_shuffle`` takes ~1 ms per index on datasets of a few dozen records.
    The last few permutations are cached (n int64 each).
    """

    _MAX_CACHED = 4

    def __init__(self, parent: grain.MapDataset, seed: int):
        super().__init__(parent)
        self._seed = seed
        self._perms: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._parent)

    def __str__(self) -> str:
        return f"EpochShuffle(seed={self._seed})"

    def _perm(self, epoch: int) -> np.ndarray:
        perm = self._perms.get(epoch)
        if perm is None:
            perm = np.random.default_rng([self._seed, epoch]).permutation(len(self._parent))
            if len(self._perms) >= self._MAX_CACHED:
                # Grain's read threads share this cache: another may evict the same epoch.
                self._perms.pop(min(list(self._perms), default=None), None)
            self._perms[epoch] = perm
        return perm

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        n = len(self._parent)
        epoch, i = divmod(int(index), n)
        return self._parent[epoch * n + int(self._perm(epoch)[i])]


def _read_options(cfg: DataConfig) -> grain.ReadOptions:
    """How records are read: in the pipeline's own thread when local (memory-mapped tokens
    and decoded text come faster than read threads hand them over, and SentencePiece holds the
    GIL), by 8 threads when they come from an object store, so that its latencies overlap."""
    kind, arg = sources.parse_source(cfg.source)
    remote = storage.is_remote(cfg.cache or (arg if kind in corpora.KINDS else ""))
    return grain.ReadOptions(num_threads=8, prefetch_buffer_size=16) if remote else _LOCAL_READ


_LOCAL_READ = grain.ReadOptions(num_threads=0)


def _lm_rows(
    records: grain.MapDataset, cfg: DataConfig, tokenizer: Tokenizer, rows: int, seed: int
) -> grain.IterDataset:
    """Records -> packed LM rows (unbatched, `lm.data.packing`), packed a window of at least
    ``4 * rows`` rows' tokens at a time."""
    tokens = records.map(_EncodeDocument(tokenizer)).to_iter_dataset(_read_options(cfg))
    window = max(4 * rows * cfg.seq_len, _SHUFFLE_WINDOW_TOKENS)
    return packing.PackedRows(
        tokens, cfg.seq_len, window_tokens=window, seed=derive_seed(seed, 1), shuffle=cfg.shuffle
    )


def _seq2seq_examples(
    records: grain.MapDataset, cfg: DataConfig, tokenizer: Tokenizer, seed: int
) -> grain.IterDataset:
    """Records -> unbatched seq2seq examples via :mod:`lm.data.seq2seq`."""
    from lm.data import seq2seq  # Lazy: owned by the seq2seq data module.

    read = records.to_iter_dataset(_read_options(cfg))
    if cfg.task == "translation":
        return seq2seq.translation_examples(read, tokenizer, cfg)
    examples = seq2seq.span_corruption_examples(read, tokenizer, cfg, seed=derive_seed(seed, 3))
    if cfg.shuffle:
        examples = grain.experimental.WindowShuffleIterDataset(
            examples, window_size=1024, seed=derive_seed(seed, 4)
        )
    return examples


def make_dataset(
    cfg: DataConfig,
    split: str,
    tokenizer: Tokenizer,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    repeat: bool = True,
    num_batches: int | None = None,
    prefetch: bool = True,
) -> grain.IterDataset:
    """This process's batches of ``split`` as a grain IterDataset.

    Args:
      cfg: the data config; ``cfg.task`` picks the format (module docstring).
      split: 'train', 'validation', 'test' (or a TFDS split string).
      tokenizer: from :func:`get_tokenizer`.
      seed: drives record shuffling, piece shuffling, packing and noise.
      process_index, process_count: this process reads its data shards
        (:func:`process_shards`; by default shard = process, ``records[index::count]``)
        and gets ``cfg.batch_size // process_count`` rows per batch, its shards' rows
        in shard order.
      repeat: True = endless, reshuffled each epoch; False = one pass, the last
        batch padded with all-padding rows (segment_ids 0, weights 0).
      num_batches: with ``repeat=False``, yield exactly this many batches
        (all-padding batches after the data runs out; use
        :func:`count_batches` so that every process runs the same number of
        steps in multi-host evaluation).
      prefetch: compute batches ahead in a background thread (or in
        ``cfg.worker_count`` processes) per shard.

    Returns:
      IterDataset of dicts of numpy arrays [B, L]. ``iter(ds)`` supports
      ``get_state()`` (a JSON-serialisable dict ``{shard_name(k, n): state of shard k}``)
      and ``set_state()``, which resumes exactly, mid-epoch included.
    """
    shards, num_shards = process_shards(cfg, process_index, process_count)
    rows = cfg.batch_size // num_shards
    if not repeat and num_batches is None and len(shards) > 1:
        num_batches = count_batches(cfg, split, tokenizer, seed=seed, process_count=num_shards)
    streams = {
        shard_name(k, num_shards): _shard_batches(
            cfg,
            split,
            tokenizer,
            seed=seed,
            shard=k,
            num_shards=num_shards,
            rows=rows,
            repeat=repeat,
            num_batches=num_batches,
            prefetch=prefetch,
        )
        for k in shards
    }
    return _ConcatShards(streams)


def _shard_batches(
    cfg: DataConfig,
    split: str,
    tokenizer: Tokenizer,
    *,
    seed: int,
    shard: int,
    num_shards: int,
    rows: int,
    repeat: bool,
    num_batches: int | None,
    prefetch: bool,
) -> grain.IterDataset:
    """Batches of ``rows`` rows from one data shard."""
    if not (cfg.mixture and repeat):
        records = _records(
            cfg, split, tokenizer, seed=seed, shard=shard, num_shards=num_shards, repeat=repeat
        )
    shard_seed = derive_seed(seed, shard)
    if cfg.task == "lm" and cfg.mixture and repeat:
        examples = _mixed_rows(cfg, split, tokenizer, seed, shard, num_shards, rows)
    elif cfg.task == "lm":
        examples = _lm_rows(records, cfg, tokenizer, rows, shard_seed)
    else:
        examples = _seq2seq_examples(records, cfg, tokenizer, shard_seed)
    batches = examples.batch(rows, drop_remainder=repeat)
    if not repeat:
        batches = batches.map(_PadRows(rows))
        if num_batches is not None:
            batches = _ExactBatches(batches, num_batches, empty_batch(cfg, rows))
    if prefetch and cfg.worker_count > 0:
        _ensure_flags_parsed()
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    elif prefetch:
        batches = _ThreadPrefetch(batches, buffer_size=2)
    return batches


def _mixed_rows(
    cfg: DataConfig,
    split: str,
    tokenizer: Tokenizer,
    seed: int,
    shard: int,
    num_shards: int,
    rows: int,
) -> grain.IterDataset:
    """One data shard's packed rows of every mixture source, drawn in the mixture's shares."""
    streams = []
    for i, (_, part) in enumerate(sources.mixture_configs(cfg)):
        part_seed = derive_seed(seed, 1 << 20, i)  # each source its own shuffle and packing
        records = _records(
            part, split, tokenizer, seed=part_seed, shard=shard, num_shards=num_shards, repeat=True
        )
        streams.append(_lm_rows(records, part, tokenizer, rows, derive_seed(part_seed, shard)))
    weights = [w for w, _ in sources.mixture_configs(cfg)]
    schedule = [(0, tuple(weights))] + mixture_schedule(cfg.mixture_schedule, len(weights))
    return _MixedRows(streams, schedule, rows_per_step=rows)


class _MixedRowsIterator(grain.DatasetIterator):
    """Rows drawn from several streams by weight: each row comes from the stream furthest
    behind its share of the rows drawn since the weights last changed (the shares are exact to
    a row at every point, and the choice is a pure function of the state). The state counts the
    rows and real tokens drawn from each stream."""

    def __init__(self, parents, schedule, rows_per_step: int):
        super().__init__(parents)
        self._streams, self._schedule, self._rows_per_step = parents, schedule, rows_per_step
        n = len(parents)
        self._mixture = {"row": 0, "phase_start": 0, "phase_rows": [0] * n}
        self._mixture |= {"weights": list(self._weights_at(0)), "rows": [0] * n, "tokens": [0] * n}

    def _weights_at(self, row: int) -> tuple[float, ...]:
        step = row // self._rows_per_step
        return [w for start, w in self._schedule if start <= step][-1]

    def __next__(self) -> dict[str, np.ndarray]:
        m = self._mixture
        weights = self._weights_at(m["row"])
        if list(weights) != m["weights"]:  # a scheduled change: new shares from this row
            m |= {
                "weights": list(weights),
                "phase_start": m["row"],
                "phase_rows": [0] * len(weights),
            }
        drawn = m["row"] - m["phase_start"] + 1
        total = sum(weights)
        behind = [w / total * drawn - c for w, c in zip(weights, m["phase_rows"], strict=True)]
        k = max(range(len(weights)), key=lambda i: (weights[i] > 0, behind[i], -i))
        row = next(self._streams[k])
        m["row"] += 1
        m["phase_rows"][k] += 1
        m["rows"][k] += 1
        m["tokens"][k] += int(np.count_nonzero(row["segment_ids"]))
        return row

    def get_state(self) -> dict[str, Any]:
        parents = {str(k): it.get_state() for k, it in enumerate(self._streams)}
        return {"parents": parents, "mixture": json.loads(json.dumps(self._mixture))}

    def set_state(self, state: dict[str, Any]) -> None:
        for k, it in enumerate(self._streams):
            it.set_state(state["parents"][str(k)])
        self._mixture = json.loads(json.dumps(state["mixture"]))
        now = list(self._weights_at(self._mixture["row"]))
        if now != self._mixture["weights"]:
            step = self._mixture["row"] // self._rows_per_step
            log.warning(
                "data.mixture weights changed at the resume: %s at step %d, now %s; the new "
                "weights apply from step %d",
                self._mixture["weights"],
                step,
                now,
                step,
            )


class _MixedRows(grain.IterDataset):
    """Packed-row streams mixed by a weight schedule [(first step, weights)], see
    `_MixedRowsIterator`."""

    def __init__(self, streams, schedule, rows_per_step: int):
        super().__init__(list(streams))
        self._args = schedule, rows_per_step

    def __iter__(self) -> _MixedRowsIterator:
        return _MixedRowsIterator([p.__iter__() for p in self._parents], *self._args)


def _mixture_counts(state: Any) -> list[dict[str, Any]]:
    """The mixture counters found anywhere in a (nested) iterator state."""
    if not isinstance(state, dict):
        return []
    if "mixture" in state and isinstance(state["mixture"], dict) and "tokens" in state["mixture"]:
        return [state["mixture"]]
    return [m for value in state.values() for m in _mixture_counts(value)]


class _ConcatShardsIterator(grain.DatasetIterator):
    """Next batch = the shards' next batches stacked along rows, in shard order."""

    def __init__(self, parents: dict[str, grain.DatasetIterator]):
        super().__init__(list(parents.values()))
        self._named = parents

    @property
    def shard_names(self) -> list[str]:
        """The data shards this iterator reads (their states are saved one file each)."""
        return list(self._named)

    def __next__(self) -> dict[str, np.ndarray]:
        batches = [next(it) for it in self._named.values()]
        if len(batches) == 1:
            return batches[0]
        return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

    def get_state(self) -> dict[str, Any]:
        return {name: it.get_state() for name, it in self._named.items()}

    def data_metrics(self) -> dict[str, float]:
        """What the loop logs of the data: for a mixture, the tokens this process drew from each
        source (``mixture/tokens_K``, K its place in data.mixture) and their shares."""
        counts = _mixture_counts(self.get_state())
        if not counts:
            return {}
        tokens = np.sum([m["tokens"] for m in counts], axis=0)
        out = {f"mixture/tokens_{k}": float(t) for k, t in enumerate(tokens)}
        return out | {
            f"mixture/share_{k}": float(t / max(1, tokens.sum())) for k, t in enumerate(tokens)
        }

    def set_state(self, state: dict[str, Any]) -> None:
        missing = sorted(set(self._named) - set(state))
        if missing:
            raise ValueError(
                f"the data-iterator state has no entry for shard(s) {missing} "
                f"(it holds {sorted(state)}); data.shards must be the value the run "
                "was saved with."
            )
        for name, it in self._named.items():
            it.set_state(state[name])


class _ConcatShards(grain.IterDataset):
    """Several shards' batch streams (name -> IterDataset) read as one, rows concatenated."""

    def __init__(self, streams: dict[str, grain.IterDataset]):
        super().__init__(list(streams.values()))
        self._streams = streams

    def __iter__(self) -> _ConcatShardsIterator:
        return _ConcatShardsIterator({name: ds.__iter__() for name, ds in self._streams.items()})


def _ensure_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside ``absl.app.run`` (tests,
    notebooks) mark them parsed with their defaults."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def count_batches(
    cfg: DataConfig, split: str, tokenizer: Tokenizer, *, seed: int, process_count: int = 1
) -> int:
    """The most batches any data shard gets from one pass (``repeat=False``) over ``split``.

    Pass it as ``num_batches`` to :func:`make_dataset` so that all processes
    evaluate in lockstep. Runs the pipeline of every shard (cheap for eval splits).
    """
    _, num_shards = process_shards(cfg, 0, process_count)
    rows = cfg.batch_size // num_shards
    return max(
        sum(
            1
            for _ in _shard_batches(
                cfg,
                split,
                tokenizer,
                seed=seed,
                shard=k,
                num_shards=num_shards,
                rows=rows,
                repeat=False,
                num_batches=None,
                prefetch=False,
            )
        )
        for k in range(num_shards)
    )


# ---------------------------------------------------------------------------
# Statistics for evaluation.


def _target_counts(
    cfg: DataConfig, split: str, tokenizer: Tokenizer, *, max_records: int, max_chars: int
) -> tuple[int, collections.Counter]:
    """(UTF-8 bytes, Counter of target ids) over the first records of ``split``.

    Targets are what the model predicts: each text's tokens plus one eos
    (the text of 'text', or 'target' for pair sources).
    """
    key = "target" if cfg.task == "translation" else "text"
    n_bytes, counts, chars = 0, collections.Counter(), 0
    source = (
        lm_source(cfg, split, tokenizer) if cfg.task == "lm" else sources.get_source(cfg, split)
    )
    for i, record in enumerate(source):
        if i >= max_records or chars >= max_chars:
            break
        if "tokens" in record:  # a cache's: [bos] + ids + [eos], with the text's sizes
            if len(record["tokens"]):
                chars, n_bytes = chars + record["chars"], n_bytes + record["bytes"]
                counts.update(record["tokens"][1 if tokenizer.add_bos else 0 :].tolist())
            continue
        text = record[key]
        if not text:
            continue
        chars += len(text)
        n_bytes += len(text.encode("utf-8"))
        counts.update(tokenizer.encode(text))
        counts[tokenizer.eos_id] += 1
    return n_bytes, counts


def bytes_per_token(
    cfg: DataConfig, split: str, tokenizer: Tokenizer, max_records: int = 10_000
) -> float:
    """UTF-8 bytes per predicted token on ``split`` (first ``max_records`` records).

    Tokens count each text's tokens plus its eos, as the LM's targets do, so
    ``bits_per_byte = loss_nats_per_token / ln(2) / bytes_per_token``.
    """
    n_bytes, counts = _target_counts(
        cfg, split, tokenizer, max_records=max_records, max_chars=cfg.tokenizer_max_chars
    )
    return n_bytes / max(1, sum(counts.values()))


def unigram_entropy(cfg: DataConfig, tokenizer: Tokenizer) -> float:
    """Cross-entropy (nats/token) on validation of an add-one unigram fit on train.

    The baseline a trained LM must beat: ``-mean log p(t)`` over validation
    targets with ``p(t) = (count_train(t) + 1) / (N_train + vocab_size)``.
    Both splits are capped at ``cfg.tokenizer_max_chars`` characters.
    """
    big = 1 << 62
    _, train = _target_counts(
        cfg, "train", tokenizer, max_records=big, max_chars=cfg.tokenizer_max_chars
    )
    _, valid = _target_counts(
        cfg, "validation", tokenizer, max_records=big, max_chars=cfg.tokenizer_max_chars
    )
    total = sum(train.values()) + tokenizer.vocab_size
    n_valid = sum(valid.values())
    nll = -sum(c * math.log((train[t] + 1) / total) for t, c in valid.items())
    return nll / max(1, n_valid)


__all__ = [
    "DataConfig",
    "TASKS",
    "get_tokenizer",
    "saved_tokenizer",
    "saved_tokenizer_file",
    "make_dataset",
    "count_batches",
    "bytes_per_token",
    "unigram_entropy",
    "empty_batch",
    "per_process_batch_size",
    "process_shards",
    "shard_name",
    "training_texts",
    "derive_seed",
    "Tokenizer",
]
