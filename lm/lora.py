"""LoRA (Hu et al. 2021, arXiv:2106.09685): low-rank adapters on frozen kernels, functionally.

The model modules are untouched. Each targeted kernel W (any rank, e.g. attention's
query [embed, heads, head_dim] or out [heads, head_dim, embed]) is read as a matrix
[prod(input dims), prod(output dims)] and gets two adapters,

    A [in, r] ~ normal(0, 1/in)     B [r, out] = 0,

and the model runs on `merge(base, adapters)`, whose kernel is W + (alpha / r) * A @ B
reshaped to W's shape. B = 0 makes the merged model equal to the base at the start; only
A and B are trained, the base stays frozen.

Adapters are a nested dict that mirrors the path of the kernel they adapt:

    {'decoder': {'layer_0': {'self_attention': {'query': {'kernel': {'lora_a': A, 'lora_b': B}}}}}}

so Orbax saves them like any parameter tree, and `merge` finds each kernel by its path.
Which dims are W's input and which its output is read from the kernel's logical axis names
(see `split_kernel`). Leading `layers` (scanned layers, path `.../layers/block_0/...`) and
`expert` (mixture-of-experts kernels) dims stack independent kernels: each gets its own pair,
e.g. A [layers, expert, in, r], B [layers, expert, r, out].
Nothing here imports from `lm`: `lm.train` builds on it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lm.utils import count_params, path_key

# The projections of lm/models/attention.py (query, key, value, out) and lm/models/layers.py
# (wi or wi_gate + wi_up, wo). Names a model does not have are skipped (GPT-2 has no wi_gate).
DEFAULT_TARGETS: tuple[str, ...] = ("query", "key", "value", "out", "wi", "wi_gate", "wi_up", "wo")
# Other kernels one may name explicitly (the untied output projection).
KNOWN_TARGETS: tuple[str, ...] = DEFAULT_TARGETS + ("lm_head",)

A, B = "lora_a", "lora_b"
# Leading logical axes that stack independent kernels (one adapter pair for each entry).
STACKED_AXES: tuple[str, ...] = ("layers", "expert")
# The residual stream's axis: a kernel either reads it (input first) or writes it (output last).
MODEL_AXIS = "embed"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank: r (0 = LoRA off); alpha: the update is scaled by alpha / r, so that changing r
    does not change the update's size (Hu et al. sec. 4.1); targets: module names (or
    '/'-separated path suffixes such as 'cross_attention/query') whose `kernel` gets adapters."""

    rank: int = 0
    alpha: float = 16.0
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"train.lora_rank={self.rank} must be >= 0 (0 = LoRA off)")
        if self.rank > 0 and not self.alpha > 0:
            raise ValueError(f"train.lora_alpha={self.alpha} must be > 0 when LoRA is on")
        if self.rank > 0 and not self.targets:
            raise ValueError(
                "train.lora_targets is empty: name the kernels to adapt, e.g. 'query,value'"
            )

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_strings(cls, rank: int, alpha: float, targets: str | Sequence[str]) -> LoraConfig:
        """From config values; `targets` may be a comma-separated string ('query,value')."""
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",")]
        return cls(rank=rank, alpha=float(alpha), targets=tuple(t for t in targets if t))


# ---------------------------------------------------------------------------------- which


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted kernel: its path, shape, and its matrix view [in, out]."""

    path: tuple[str, ...]  # e.g. ('decoder', 'layer_0', 'self_attention', 'query', 'kernel')
    shape: tuple[int, ...]
    names: tuple[str | None, ...]  # the kernel's logical axis names (None where unnamed)
    num_in: int  # how many dims (after any stacked ones) are the input side
    stacked: int = 0  # leading STACKED_AXES dims (layers, experts): one adapter pair each

    @property
    def fan_in(self) -> int:
        return int(np.prod(self.shape[self.stacked : self.stacked + self.num_in]))

    @property
    def fan_out(self) -> int:
        return int(np.prod(self.shape[self.stacked + self.num_in :]))


def _keys(path) -> tuple[str, ...]:
    return tuple(path_key(path).split("/"))


def split_kernel(names: Sequence[str | None], where: str = "kernel") -> tuple[int, int]:
    """(stacked, num_in) of a kernel from its logical axis names: how many leading dims stack
    independent kernels (`STACKED_AXES`), and how many of the rest are the input side.

    Every projection here reads or writes the residual stream, and the logical names say
    which: a kernel whose first (unstacked) dim is `embed` reads it ([embed, mlp], query's
    [embed, heads, kv]: input = that dim), one whose last dim is `embed` writes it ([mlp,
    embed], out's [heads, kv, embed]: output = that dim). Shapes alone cannot tell (heads *
    head_dim often equals embed). Any other 2-D kernel (unnamed, e.g. plain arrays) is the
    usual [in, out]. Raises ValueError for a kernel of more dims that the names do not split.
    """
    stacked = 0
    while stacked < len(names) and names[stacked] in STACKED_AXES:
        stacked += 1
    kernel = tuple(names[stacked:])
    if len(kernel) >= 2 and kernel[0] == MODEL_AXIS and kernel[-1] != MODEL_AXIS:
        return stacked, 1
    if len(kernel) >= 2 and kernel[-1] == MODEL_AXIS and kernel[0] != MODEL_AXIS:
        return stacked, len(kernel) - 1
    if len(kernel) == 2:
        return stacked, 1
    raise ValueError(
        f"LoRA cannot tell the input dims of {where} from its logical axes {tuple(names)}: "
        f"a kernel of more than 2 dims must start with '{MODEL_AXIS}' (it reads the model "
        f"width) or end with it (it writes it)"
    )


def _matches(module_path: tuple[str, ...], target: str) -> bool:
    parts = tuple(target.split("/"))
    return module_path[-len(parts) :] == parts


def find_targets(boxed_params, config: LoraConfig) -> list[Target]:
    """The kernels `config.targets` names, in a fixed (tree) order.

    boxed_params: parameters (or their `jax.eval_shape`) as `model.init` returns them, with
      logical axis names (`nn.Partitioned` leaves); plain arrays work for 2-D kernels.
    Raises ValueError for a target that names nothing here and no known module (a typo),
    or when nothing at all matches.
    """
    leaves = jax.tree_util.tree_flatten_with_path(
        boxed_params, is_leaf=lambda x: isinstance(x, nn.Partitioned)
    )[0]
    found, used = [], set()
    for path, leaf in leaves:
        keys = _keys(path)
        if keys[-1] != "kernel":
            continue
        hits = [t for t in config.targets if _matches(keys[:-1], t)]
        if not hits:
            continue
        used.update(hits)
        value = leaf.value if isinstance(leaf, nn.Partitioned) else leaf
        shape = tuple(value.shape)
        names = tuple(leaf.names) if isinstance(leaf, nn.Partitioned) else (None,) * len(shape)
        if len(shape) > 2 and not isinstance(leaf, nn.Partitioned):
            raise ValueError(
                f"LoRA needs logical axis names to split the {len(shape)}-D kernel "
                f"{'/'.join(keys)}: pass the boxed params from model.init"
            )
        stacked, num_in = split_kernel(names, "/".join(keys))
        found.append(Target(keys, shape, names, num_in, stacked))
    unknown = [t for t in config.targets if t not in used and t.split("/")[-1] not in KNOWN_TARGETS]
    if unknown:
        raise ValueError(
            f"train.lora_targets names {unknown}, which match no kernel of this model; "
            f"use module names such as {', '.join(KNOWN_TARGETS)}"
        )
    if not found:
        raise ValueError(
            f"train.lora_targets={','.join(config.targets)} matches no kernel of this model; "
            f"use module names such as {', '.join(KNOWN_TARGETS)}"
        )
    return found


# ------------------------------------------------------------------------------ adapters


def _set(tree: dict, path: Sequence[str], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def init(rng: jax.Array, boxed_params, config: LoraConfig) -> dict:
    """Fresh adapters for the targeted kernels, boxed with logical axis names.

    A [in, r] is normal with std 1/sqrt(in) (Kaiming-like: A x has unit-order entries), B [r, out]
    is zero. Adapters are float32 whatever the base's param_dtype: they are the trained
    master weights, and the merge casts their product to the kernel's dtype.
    A takes the logical name of the kernel's first input dim and B that of its first output dim,
    so they shard like the side of W they touch (a flattened [heads * head_dim] side sharded over
    'tensor' splits at head boundaries when heads divide); the rank dim is replicated.
    Only shapes and names of `boxed_params` are read (abstract values work).
    """
    adapters: dict = {}
    for i, t in enumerate(find_targets(boxed_params, config)):
        key = jax.random.fold_in(rng, i)
        layers, layer_names = t.shape[: t.stacked], t.names[: t.stacked]
        a = jax.random.normal(key, layers + (t.fan_in, config.rank), jnp.float32) / math.sqrt(
            t.fan_in
        )
        b = jnp.zeros(layers + (config.rank, t.fan_out), jnp.float32)
        _set(
            adapters,
            t.path,
            {
                A: nn.Partitioned(a, names=layer_names + (t.names[t.stacked], None)),
                B: nn.Partitioned(b, names=layer_names + (None, t.names[t.stacked + t.num_in])),
            },
        )
    return adapters


def _pairs(adapters) -> dict[tuple[str, ...], dict[str, Any]]:
    """{kernel path: {'lora_a': A, 'lora_b': B}} from the nested adapter tree."""
    pairs: dict[tuple[str, ...], dict[str, Any]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(adapters)[0]:
        keys = _keys(path)
        pairs.setdefault(keys[:-1], {})[keys[-1]] = leaf
    return pairs


def delta(a: jax.Array, b: jax.Array, shape: Sequence[int], scale: float) -> jax.Array:
    """(alpha / r) * A @ B reshaped to the kernel's shape, in float32. Leading (scanned
    layers) dims of A [..., in, r] and B [..., r, out] are batch dims of the product.

    Row-major reshape of [in, out] is the kernel's layout for any in/out split, so the merge
    needs no knowledge of where the split was. HIGHEST precision: on TPU the default would
    round the product to bfloat16 before it is added to W.
    """
    product = jnp.matmul(
        a.astype(jnp.float32), b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )
    return (scale * product).reshape(shape)


def merge(base, adapters, config: LoraConfig | float):
    """A plain parameter tree: every adapted kernel W becomes W + (alpha/r) A @ B, all else is `base`.

    base: the model's parameters (unboxed); adapters: as from `init` (unboxed);
    config: the LoraConfig (or the scale alpha / r itself). Works under jit and on host arrays.
    """
    scale = config.scale if isinstance(config, LoraConfig) else float(config)
    pairs = _pairs(adapters)
    merged_paths = set()

    def one(path, w):
        pair = pairs.get(_keys(path))
        if pair is None:
            return w
        merged_paths.add(_keys(path))
        return (w.astype(jnp.float32) + delta(pair[A], pair[B], w.shape, scale)).astype(w.dtype)

    merged = jax.tree_util.tree_map_with_path(one, base)
    stray = sorted(set(pairs) - merged_paths)
    if stray:
        raise ValueError(
            f"LoRA adapters for parameters the model does not have: "
            f"{['/'.join(p) for p in stray[:5]]}"
        )
    return merged


def count(adapters) -> int:
    """Number of adapter parameters: sum of r * (in + out) over adapted kernels."""
    return count_params(adapters)
