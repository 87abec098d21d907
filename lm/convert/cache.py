"""A cache of imported checkpoints, so that a command run again skips the conversion.

Reading a GGUF file is slow where the model is small: SmolLM2-135M took 4.5 s on the 2-core
CPU (parsing 49k vocabulary strings and merges field by field, dequantising, stacking the
layers for the scanned model), longer than reading the same weights back as float32
(0.3 s). The first import of a file writes its result here; later imports of the same file
read it back. One entry is a folder holding one ``.npy`` file per parameter array (our
scanned layout, so a dozen files) and ``meta.json`` (the ModelConfig, the tokenizer's JSON,
the source path, and each array's '/'-joined path). Why .npy: np.load reads SmolLM2's
540 MB in 0.2 s from the page cache, where safetensors' numpy loader took 1.0-1.5 s.

An entry's name is a hash of what decides its contents: the source file's path, size,
modification time and inode, the source of the modules that convert it (this one,
lm/convert/gguf.py, lm/models/transformer.py, lm/data/tokenizers.py) and the versions of
the `gguf` and `tokenizers` packages. A changed file or converter gets a new entry; stale
entries are never read (delete the folder to reclaim their space).

Where: ``$LM_IMPORT_CACHE`` if set ('off' disables), else the ``imports`` folder of lm's
cache (``$LM_CACHE_DIR``, default ``~/.cache/lm``); see `lm.utils.default_cache_dir`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
import pathlib
import shutil
import tempfile
from collections.abc import Callable

import numpy as np
from absl import logging
from flax import traverse_util

from lm.convert.gguf import CheckpointFormatError, Pretrained
from lm.data.tokenizers import PretrainedTokenizer
from lm.models.transformer import ModelConfig
from lm.utils import default_cache_dir

META_FILE = "meta.json"
_CONVERTERS = ("convert/cache.py", "convert/gguf.py", "models/transformer.py", "data/tokenizers.py")


def default_import_cache() -> str:
    """$LM_IMPORT_CACHE if set (a path, or 'off'), else lm's cache folder + '/imports'."""
    return os.environ.get("LM_IMPORT_CACHE") or os.path.join(default_cache_dir(), "imports")


def entry_key(source: pathlib.Path) -> str:
    """The hex name of `source`'s entry (see the module docstring for what it hashes)."""
    stat = source.stat()
    package = pathlib.Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    identity = [str(source.resolve()), stat.st_size, stat.st_mtime_ns, stat.st_ino]
    identity += [importlib.metadata.version(p) for p in ("gguf", "tokenizers")]
    digest.update(json.dumps(identity).encode())
    for name in _CONVERTERS:
        digest.update((package / name).read_bytes())
    return digest.hexdigest()[:32]


def write_entry(entry: pathlib.Path, pretrained: Pretrained) -> None:
    """Writes `pretrained` as the folder `entry`: into a temporary sibling, then renamed, so a
    reader sees a whole entry or none (a process killed mid-write leaves only a tmp folder)."""
    if not isinstance(pretrained.tokenizer, PretrainedTokenizer):
        raise TypeError(f"cannot cache a {type(pretrained.tokenizer).__name__} tokenizer")
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        flat = traverse_util.flatten_dict(pretrained.params, sep="/")
        for i, value in enumerate(flat.values()):
            np.save(tmp / f"{i}.npy", np.asarray(value), allow_pickle=False)
        meta = {
            "params": list(flat),
            "config": dataclasses.asdict(pretrained.config),
            "tokenizer": pretrained.tokenizer.to_json(),
            "tokenizer_path": pretrained.tokenizer.path,
            "source": pretrained.source,
        }
        (tmp / META_FILE).write_text(json.dumps(meta))
        try:
            tmp.rename(entry)
        except OSError:
            if not (entry / META_FILE).is_file():  # not another process's identical entry
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_entry(entry: pathlib.Path) -> Pretrained:
    """The `Pretrained` that `write_entry` wrote in `entry`."""
    try:
        meta = json.loads((entry / META_FILE).read_text())
        flat = {path: np.load(entry / f"{i}.npy") for i, path in enumerate(meta["params"])}
        params = traverse_util.unflatten_dict(flat, sep="/")
    except (OSError, ValueError) as e:
        raise CheckpointFormatError(
            f"the import cache entry {entry} is unreadable ({type(e).__name__}: {e}); "
            "delete that folder and import again."
        ) from e
    config = ModelConfig.from_dict(meta["config"])  # as lm.checkpoint.read_model does
    tokenizer = PretrainedTokenizer.from_json(meta["tokenizer"], meta["tokenizer_path"])
    return Pretrained(config, params, tokenizer, meta["source"])


def cached_import(
    source: str | os.PathLike, load: Callable[[pathlib.Path], Pretrained], cache: str | None
) -> Pretrained:
    """`load(source)`, read from `cache` (a folder; None or 'off': no cache) when this file was
    imported before, else computed and written there. A failed write is logged and the import
    returned all the same (the cache only saves time)."""
    source = pathlib.Path(source)
    if cache is None or cache == "off" or not source.is_file():
        return load(source)  # a missing file: load() raises the clear error
    entry = pathlib.Path(cache).expanduser() / entry_key(source)
    if (entry / META_FILE).is_file():
        return read_entry(entry)
    pretrained = load(source)
    try:
        write_entry(entry, pretrained)
    except OSError as e:
        logging.warning(
            "Import cache: could not write %s (%s); the next run imports again.", entry, e
        )
    return pretrained
