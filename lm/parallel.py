"""Meshes, logical-axis rules, shardings, multi-host start-up and the pmap path.

Model parameters carry logical axis names (see `lm.models.layers`). A rules table maps
each logical name to mesh axes of the mesh `('data', 'fsdp', 'tensor')`; a mesh axis is
dropped for a dimension it does not divide, so any model runs on any mesh shape.

The table is `DEFAULT_RULES`, changed per run by `parallel.rules` (see `parse_rules`), e.g.
`--config.parallel.rules=embed=none,mlp=fsdp+tensor`.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lm.models import layers
from lm.utils import LazyArray, config_from_dict, logical_to_mesh_spec, path_key

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Logical axis -> mesh axes. Batch over data+fsdp, weights' model dimension over fsdp
# (ZeRO-3 style), heads/MLP/vocab over tensor (Megatron style).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("length", None),
    ("layers", None),  # the stacked axis of scanned layers: each device holds every layer
    # Mixture-of-experts kernels [expert, embed, mlp]: experts over fsdp, the axis whose
    # weights are already split and gathered for compute. A dimension takes a mesh axis only
    # if no earlier dimension of the same parameter took it (`lm.utils.logical_to_mesh_spec`), so the expert
    # dim claims fsdp ahead of embed: each device holds whole experts (expert parallelism)
    # and an MoE model costs a device no more parameter memory than FSDP of a dense one. When
    # fsdp does not divide the experts, embed takes it as in a dense model. `data` stays pure
    # data parallelism; `parallel.rules="expert=data"` (or data+fsdp) moves them.
    ("expert", "fsdp"),
    # Activations (`lm.models.layers.constrain`): every device holds its own rows of the
    # batch, whatever the weights' layout, and splits heads, MLP and vocabulary over tensor as
    # the weights are split. Without these the compiler may lay the residual stream out along
    # FSDP's embed split and hold the whole batch on each device. `activation_length=tensor`
    # would be sequence parallelism.
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
)


def parse_rules(text: str) -> tuple[tuple[str, Any], ...]:
    """`parallel.rules` -> rules entries.

    Syntax: comma-separated `LOGICAL=AXES`, where AXES is `none` (replicated) or mesh axes
    joined by `+` (e.g. `data+tensor`); spaces are ignored and "" changes nothing.
    Example: "embed=fsdp, mlp=tensor, heads=none, vocab=data+tensor".
    """
    rules = {}
    for entry in text.replace(" ", "").split(","):
        if not entry:
            continue
        name, sep, axes = entry.partition("=")
        if not (sep and name.isidentifier() and axes):
            raise ValueError(
                f"parallel.rules entry {entry!r} is not LOGICAL=AXES, e.g. 'mlp=tensor' "
                f"or 'embed=none' or 'vocab=data+tensor'"
            )
        if name in rules:
            raise ValueError(f"parallel.rules sets {name!r} twice (entry {entry!r})")
        mesh_axes = () if axes.lower() == "none" else tuple(axes.split("+"))
        bad = [a for a in mesh_axes if a not in MESH_AXES]
        if bad or len(set(mesh_axes)) < len(mesh_axes):
            raise ValueError(
                f"parallel.rules entry {entry!r}: AXES must be 'none' or distinct mesh "
                f"axes from {MESH_AXES} joined by '+'"
            )
        # The same forms as DEFAULT_RULES: None, one axis name, or a tuple of them.
        rules[name] = mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None)
    return tuple(rules.items())


def with_overrides(rules, overrides) -> tuple[tuple[str, Any], ...]:
    """`rules` with each override replacing the entry of its logical name, or appended."""
    table = dict(rules)
    table.update(overrides)
    return tuple(table.items())


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How the computation is laid out over devices and processes.

    mesh: sizes of ('data', 'fsdp', 'tensor'); one entry may be -1 to take the remaining devices.
    rules: changes to DEFAULT_RULES (logical axis -> mesh axes), e.g. "embed=none,mlp=fsdp+tensor";
      syntax in `parse_rules`, checked here. `logical_rules` is the table the run uses.
    use_pmap: pure data parallelism with `jax.pmap` instead of jit over the mesh.
    coordinator_address/num_processes/process_id: explicit multi-host start-up; when unset,
      `jax.distributed.initialize()` autodetects TPU pods and SLURM if `distributed` is True.
    initialization_timeout: seconds to wait for all processes to join before failing.
    heartbeat_timeout_seconds: a process silent this long (dead, or cut off) fails the job:
      the others exit with an error instead of hanging in a collective.
    """

    mesh: tuple = (-1, 1, 1)
    rules: str = ""
    use_pmap: bool = False
    distributed: bool = False
    coordinator_address: str = ""
    num_processes: int = 0
    process_id: int = -1
    initialization_timeout: int = 300
    heartbeat_timeout_seconds: int = 100

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ParallelConfig:
        values = dict(values)
        if "mesh" in values:
            values["mesh"] = tuple(int(x) for x in values["mesh"])
        return config_from_dict(cls, values, prefix="parallel")

    def __post_init__(self):
        parse_rules(self.rules)  # a bad entry fails when the config is read, before the run starts

    @property
    def logical_rules(self) -> tuple[tuple[str, Any], ...]:
        """DEFAULT_RULES with `rules` applied: what `param_shardings` gets for this run."""
        return with_overrides(DEFAULT_RULES, parse_rules(self.rules))


def initialize_distributed(config: ParallelConfig) -> None:
    """Joins a multi-process job (TPU pod, SLURM, or an explicit coordinator). No-op if single."""
    explicit = bool(config.coordinator_address)
    if not (config.distributed or explicit):
        return
    if jax.distributed.is_initialized():
        return
    # Cross-process collectives on CPU (tests, CPU clusters); no effect on TPU/GPU backends.
    # Must not touch the backend here: initialize() has to come before any JAX computation.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(
        initialization_timeout=config.initialization_timeout,
        heartbeat_timeout_seconds=config.heartbeat_timeout_seconds,
    )
    if explicit:
        if config.num_processes < 1 or not 0 <= config.process_id < config.num_processes:
            raise ValueError(
                f"parallel.coordinator_address={config.coordinator_address!r} needs "
                f"parallel.num_processes >= 1 and 0 <= parallel.process_id < num_processes, got "
                f"num_processes={config.num_processes}, process_id={config.process_id}"
            )
        kwargs.update(
            coordinator_address=config.coordinator_address,
            num_processes=config.num_processes,
            process_id=config.process_id,
        )
    jax.distributed.initialize(**kwargs)
    logging.info(
        "process %d of %d, %d local devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
    )


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
    """Resolves a -1 entry and checks that the mesh uses exactly the devices there are."""
    shape = [int(s) for s in shape]
    if len(shape) != len(MESH_AXES):
        raise ValueError(f"parallel.mesh needs {len(MESH_AXES)} sizes {MESH_AXES}, got {shape}")
    if shape.count(-1) > 1:
        raise ValueError(f"parallel.mesh may have at most one -1, got {shape}")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"parallel.mesh {shape} does not divide the {num_devices} devices")
        shape[shape.index(-1)] = num_devices // known
    if int(np.prod(shape)) != num_devices:
        raise ValueError(
            f"parallel.mesh {tuple(shape)} uses {int(np.prod(shape))} devices but there are "
            f"{num_devices}; set --config.parallel.mesh so the sizes multiply to {num_devices}"
        )
    return tuple(shape)


def batch_ways(config: ParallelConfig) -> int:
    """How many ways a global batch is split: over every device under pmap, else over the
    mesh's batch axes (data x fsdp) of all the devices there are."""
    if config.use_pmap:
        return jax.device_count()
    data, fsdp, _ = mesh_shape(config.mesh, jax.device_count())
    return data * fsdp


def check_batch_split(name: str, batch_size: int, config: ParallelConfig) -> None:
    """ValueError naming `name` (the config key of the global batch size) unless the batch
    splits evenly over the batch axes and the processes: before any work, rather than a
    sharding error from JAX at the first step."""
    ways = batch_ways(config)
    if batch_size % ways or batch_size % jax.process_count():
        ways = int(np.lcm(ways, jax.process_count()))
        layout = (
            "every device (pmap)"
            if config.use_pmap
            else f"data x fsdp of parallel.mesh {tuple(config.mesh)}"
        )
        raise ValueError(
            f"{name}={batch_size} does not split over the {ways} ways of the batch ({layout}, "
            f"{jax.device_count()} devices, {jax.process_count()} processes): use a multiple of "
            f"{ways} (e.g. {name}={max(ways, batch_size // ways * ways)}) or another parallel.mesh"
        )


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
    """The ('data', 'fsdp', 'tensor') mesh over `devices` (default: all), in jax's device order
    for the hardware (e.g. rings on TPU)."""
    devices = jax.devices() if devices is None else list(devices)
    resolved = mesh_shape(shape, len(devices))
    # Auto axes: the steps are jit-compiled with explicit NamedShardings and XLA propagates
    # them inside. jax.make_mesh's default, Explicit, puts shardings into the array types,
    # which the model code is not written for.
    return jax.make_mesh(
        resolved, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices
    )


def param_shardings(boxed_params, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for a tree of (abstract) parameters that carry logical axis names; a
    parameter without names (a plain `self.param`) is replicated."""
    logical = nn.get_partition_spec(boxed_params)
    shapes = nn.meta.unbox(boxed_params)
    return jax.tree.map(
        lambda spec, x: NamedSharding(
            mesh,
            logical_to_mesh_spec(tuple(spec) or (None,) * len(x.shape), x.shape, mesh.shape, rules),
        ),
        logical,
        shapes,
        is_leaf=lambda x: isinstance(x, P),
    )


def with_activation_layout(fn, mesh: Mesh, rules=DEFAULT_RULES):
    """`fn` traced with its activations laid out by `rules` over `mesh`: the model's
    `layers.constrain` pins then take effect (outside this they are no-ops). Wrap a step
    before `jax.jit`; the context is entered only while the step is traced. On one device
    there is nothing to lay out: `fn` comes back as it is."""
    if mesh.size == 1:
        return fn

    @functools.wraps(fn)
    def laid_out(*args, **kwargs):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), layers.activation_rules(rules):
            return fn(*args, **kwargs)

    return laid_out


def check_rules_apply(config: ParallelConfig, boxed_params) -> None:
    """A `parallel.rules` entry for a logical axis that no parameter carries and DEFAULT_RULES
    does not list is most likely misspelt: say so instead of silently changing nothing."""
    specs = jax.tree.leaves(nn.get_partition_spec(boxed_params), is_leaf=lambda x: isinstance(x, P))
    known = {name for spec in specs for name in spec if name} | {name for name, _ in DEFAULT_RULES}
    unknown = [name for name, _ in parse_rules(config.rules) if name not in known]
    if unknown:
        raise ValueError(
            f"parallel.rules names logical axes {unknown} that no parameter carries; "
            f"known logical axes: {sorted(known)}"
        )


def _path_keys(path) -> tuple[str, ...]:
    return tuple(path_key(path).split("/"))


def matching_shardings(tree, params, shardings, mesh: Mesh):
    """Shardings for a tree (e.g. optimizer state) whose leaves mirror parameters.

    A leaf whose key path ends with a parameter's path and has that parameter's shape takes
    its sharding (Adam moments); anything else (counts, Adafactor's factored rows) is replicated.
    """
    by_path = {}
    for (path, p), (_, s) in zip(
        jax.tree_util.tree_flatten_with_path(params)[0],
        jax.tree_util.tree_flatten_with_path(shardings)[0],
        strict=True,
    ):
        by_path[_path_keys(path)] = (p.shape, s)
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        keys = _path_keys(path)
        for start in range(len(keys)):
            hit = by_path.get(keys[start:])
            if hit is not None and hit[0] == getattr(leaf, "shape", None):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, tree)


def put_params(host_params, abstract_params):
    """Host params -> global arrays laid out as `abstract_params` (ShapeDtypeStructs with
    shardings), cast to the model's param dtype. Leaves are numpy arrays or `LazyArray`s (an
    import streamed from its files). Each distinct block of a leaf is read once, put on the
    devices that hold it and dropped, so host memory holds one block beyond what the devices
    hold. Every process contributes only its own devices' blocks, so this works across
    processes."""

    def put(x, a):
        x = x if isinstance(x, LazyArray) else np.asarray(x)
        index_of = a.sharding.addressable_devices_indices_map(a.shape)
        devices_at: dict[tuple, list] = {}
        for device, index in index_of.items():
            key = tuple((s.start, s.stop, s.step) for s in index)
            devices_at.setdefault(key, []).append(device)
        shards = {}
        for devices in devices_at.values():
            # A LazyArray's block is a fresh array; a host array's is a view of the caller's.
            block = x[index_of[devices[0]]].astype(a.dtype, copy=not isinstance(x, LazyArray))
            shards.update({d: jax.device_put(block, d) for d in devices})
            del block
        return jax.make_array_from_single_device_arrays(
            a.shape, a.sharding, [shards[d] for d in index_of]
        )

    return jax.tree.map(put, host_params, abstract_params)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over ('data', 'fsdp'), the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's rows into one global array sharded over the batch axes."""
    sharding = batch_sharding(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


# ------------------------------------------------------------------------------- pmap path


def replicate(tree):
    """Copies a pytree onto every local device (leading axis = device)."""
    devices = jax.local_devices()
    sharding = NamedSharding(Mesh(np.asarray(devices), ("device",)), P("device"))
    return jax.tree.map(
        lambda x: jax.device_put(np.stack([np.asarray(x)] * len(devices)), sharding), tree
    )


def unreplicate(tree):
    """The first device's copy of a replicated pytree, as ordinary (uncommitted) arrays."""
    return jax.tree.map(lambda x: jax.numpy.asarray(np.asarray(x[0])), tree)


def split_for_pmap(local_batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """[batch, ...] -> [local_devices, batch // local_devices, ...]."""
    n = jax.local_device_count()

    def split(x):
        if x.shape[0] % n:
            raise ValueError(
                f"per-process batch {x.shape[0]} is not divisible by {n} local devices"
            )
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])

    return jax.tree.map(split, local_batch)
