"""Small helpers that every layer of `lm` may use (this module imports only jax, numpy and the
standard library): building a config dataclass from a dict, naming a pytree path, counting
parameters, comparing two trees' shapes, gathering sharded arrays across processes, host
arrays that are read only where they are indexed (`LazyArray`), and the code's version
(`code_version`, git run as a subprocess)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def config_from_dict(cls, values: Mapping[str, Any], prefix: str):
    """`cls(**values)` for a config dataclass, with unknown keys and wrong types named.

    values: a dict (or anything with `to_dict()`, such as an ml_collections ConfigDict).
    prefix: the config section, for the messages ('model' -> "model.d_model must be an int").
    A field's type is judged by its default: bool, int, float (an int is accepted and
    converted) and str fields are checked; others (tuples, ...) pass as they are.
    Returns the config; ValueError names the offending key (and lists the valid ones).
    """
    if hasattr(values, "to_dict"):
        values = values.to_dict()
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ValueError(
            f"unknown key(s) {', '.join(prefix + '.' + k for k in unknown)}; "
            f"valid keys: {', '.join(sorted(fields))}"
        )
    checked = {}
    for key, value in values.items():
        if isinstance(value, np.generic):  # a numpy scalar from an array: judged as its value
            value = value.item()
        default = fields[key].default
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"{prefix}.{key} must be a bool, got {value!r}")
        if isinstance(default, int) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{prefix}.{key} must be an int, got {value!r}")
        if isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{prefix}.{key} must be a number, got {value!r}")
            value = float(value)
        if isinstance(default, str) and not isinstance(value, str):
            raise ValueError(f"{prefix}.{key} must be a string, got {value!r}")
        checked[key] = value
    return cls(**checked)


def logical_to_mesh_spec(
    logical: Sequence[str | None], shape: Sequence[int], axis_sizes: Mapping[str, int], rules
) -> jax.sharding.PartitionSpec:
    """Logical axis names (one per dimension of `shape`) -> the PartitionSpec the rules table
    `rules` ((logical name, mesh axes) pairs) gives them on a mesh of `axis_sizes`.

    A mesh axis is dropped for a dimension it does not divide, and for a dimension after one
    that already took it: any array lays out on any mesh shape, and one rule may list an axis
    that an earlier dimension claims first (MoE experts ahead of embed).
    """
    table = dict(rules)
    spec = []
    used = set()
    for name, dim in zip(logical, shape, strict=True):
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        kept = []
        size = 1
        for axis in axes:
            if axis in used:
                continue
            if dim % (size * axis_sizes[axis]) == 0:
                kept.append(axis)
                size *= axis_sizes[axis]
        used.update(kept)
        spec.append(tuple(kept) if len(kept) > 1 else (kept[0] if kept else None))
    return jax.sharding.PartitionSpec(*spec)


def longest_prefix_entry(table: Mapping[str, Any], key: str, default=None):
    """The value of the longest name in `table` that `key` starts with, else `default`
    (device kinds: 'TPU v5 lite' is v5e, 'TPU v5' v5p)."""
    matches = [name for name in table if key.startswith(name)]
    return table[max(matches, key=len)] if matches else default


Index = tuple[slice, ...]


def _block_shape(index: Index) -> tuple[int, ...]:
    return tuple(len(range(s.start, s.stop, s.step)) for s in index)


@dataclasses.dataclass(frozen=True, eq=False)
class LazyArray:
    """A host array whose elements are read only when indexed, so that a checkpoint larger
    than host memory can be laid out shard by shard (`jax.make_array_from_callback` asks
    each device's block in turn).

    read: takes one slice per axis, each with concrete start, stop and step, and returns that
      block as a numpy array of `dtype`. `x[index]` normalises the index and calls it;
      `np.asarray(x)` reads everything. A LazyArray is a pytree leaf.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[Index], np.ndarray]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * np.dtype(self.dtype).itemsize

    def normalize(self, index) -> Index:
        """`index` (a slice, or a tuple of slices, shorter than ndim or not) as one concrete
        slice per axis. TypeError for integers, arrays and Ellipsis: blocks only."""
        index = index if isinstance(index, tuple) else (index,)
        if len(index) > self.ndim or not all(isinstance(s, slice) for s in index):
            raise TypeError(f"LazyArray{self.shape} takes slices only, not {index!r}")
        index = index + (slice(None),) * (self.ndim - len(index))
        return tuple(slice(*s.indices(n)) for s, n in zip(index, self.shape, strict=True))

    def __getitem__(self, index) -> np.ndarray:
        return self.read(self.normalize(index))

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[()]
        return out if dtype is None else out.astype(dtype, copy=False)

    def astype(self, dtype) -> LazyArray:
        """The same elements cast to `dtype` as they are read."""
        return LazyArray(self.shape, np.dtype(dtype), lambda i: self.read(i).astype(dtype))

    def take(self, row: int) -> LazyArray:
        """`x[row]` without reading it: the array of the remaining axes."""
        assert 0 <= row < self.shape[0], (row, self.shape)
        return LazyArray(
            self.shape[1:], self.dtype, lambda i: self.read((slice(row, row + 1, 1),) + i)[0]
        )

    @staticmethod
    def stack(parts: Sequence[LazyArray]) -> LazyArray:
        """`np.stack(parts)` without reading them; a block reads only the parts it covers,
        one at a time, into its output."""
        shape, dtype = parts[0].shape, parts[0].dtype
        assert all(p.shape == shape and p.dtype == dtype for p in parts), "ragged stack"

        def read(index: Index) -> np.ndarray:
            out = np.empty(_block_shape(index), dtype)
            for i, row in enumerate(range(index[0].start, index[0].stop, index[0].step)):
                out[i] = parts[row].read(index[1:])
            return out

        return LazyArray((len(parts),) + tuple(shape), dtype, read)


def path_key(path) -> str:
    """A pytree key path (from `jax.tree_util.tree_flatten_with_path`) as 'decoder/layer_0/mlp'."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def count_params(tree) -> int:
    """The number of scalars in a tree of arrays or ShapeDtypeStructs."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def tree_differences(have, want, *, dtypes: bool = False) -> list[tuple[str, Any, Any]]:
    """Where two trees of arrays (or ShapeDtypeStructs) differ, sorted by path.

    Returns [(path key, have's leaf, want's leaf)] for every path that is in only one tree
    (the other's entry is None) or whose shape differs (or, with `dtypes`, whose dtype
    differs). Each leaf is given as its shape tuple, or as (shape, dtype name) with `dtypes`.
    """

    def table(tree):
        return {
            path_key(p): (tuple(np.shape(x)), str(x.dtype)) if dtypes else tuple(np.shape(x))
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        }

    a, b = table(have), table(want)
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def gather_full(tree):
    """A tree of global arrays with every element on every process: on one process the tree
    itself; across processes (where each holds only its shards) full host copies, gathered
    with a collective that every process must call."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils  # not loaded by `import jax`

    return multihost_utils.process_allgather(tree, tiled=True)


def enable_compilation_cache(directory: str | None) -> str | None:
    """Turns on JAX's persistent compilation cache in `directory` (created if missing), so that
    a command run again loads its compiled programs instead of compiling them (start-up of
    train, sample, eval and icl). Every program is cached, however quick its compilation:
    start-up is many short compilations (one per step, evaluation shape, decode length).

    directory: a local path, created by jax when it first compiles (so a command refused
    before that writes nothing); None or "off" leaves the cache off. Call it before anything
    is compiled (jax reads the setting then). Returns the directory in use, or None when off.
    """
    if directory is None or directory == "off":
        return None
    path = os.path.abspath(os.path.expanduser(directory))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def default_compilation_cache() -> str:
    """Where the CLI caches compiled programs: $LM_COMPILATION_CACHE if set (a path, or "off"),
    else the `jax` folder of lm's cache ($LM_CACHE_DIR, default ~/.cache/lm)."""
    return os.environ.get("LM_COMPILATION_CACHE") or os.path.join(default_cache_dir(), "jax")


def default_cache_dir() -> str:
    """The root of lm's caches (compiled programs, imported checkpoints): $LM_CACHE_DIR, else
    ~/.cache/lm (unexpanded: users of the path expand it)."""
    return os.environ.get("LM_CACHE_DIR") or os.path.join("~", ".cache", "lm")


def first_argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, axis=-1)` as int32 ([...] from [..., n]): the first index of the largest
    value, or of the first NaN in a row that has one.

    Why: XLA on CPU runs argmax as a variadic (value, index) reduction that does not
    vectorise; a max and then a min over matching indices is several times faster at a
    decoding step's [8, 49152] (python -m lm.bench decode).
    """
    peak = x.max(axis=-1, keepdims=True)
    index = jax.lax.broadcasted_iota(jnp.int32, x.shape, x.ndim - 1)
    hits = (x == peak) | jnp.isnan(x)
    return jnp.where(hits, index, x.shape[-1]).min(axis=-1)


def _git(*args: str) -> str:
    """The stdout of `git ARGS` run in the lm package's directory. CalledProcessError where
    git fails (not a work tree, the package untracked), FileNotFoundError with no git binary."""
    here = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def code_version() -> dict:
    """The version of the code that runs, for a run's record (config and trackers).

    Returns {"commit", "dirty", "version"}: in a git checkout of lm, the HEAD commit and whether
    tracked files differ from it (untracked ones, such as workdirs, are not counted); elsewhere
    (an installed wheel, no git binary) commit and dirty are None. version is the installed
    package's (None when lm runs from a tree that was never installed).
    """
    try:
        version = importlib.metadata.version("lm")
    except importlib.metadata.PackageNotFoundError:
        version = None
    try:
        # lm's own files must be tracked: a wheel installed inside some other repository (a
        # virtualenv in a project's checkout) is not that repository's commit.
        _git("ls-files", "--error-unmatch", "--", "__init__.py")
        commit = _git("rev-parse", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    except (FileNotFoundError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty, "version": version}
