"""Mixture-of-experts feed-forward blocks: a router, three ways of dispatching tokens to their
experts, and the grouped matmuls that run each expert on its own tokens only.

Dispatch (`MoeMLP.dispatch`, the config's `model.moe_dispatch`):
- dense: every expert runs on every token; gates are zero outside each token's top k. The
  reference: simple, exact, and num_experts / experts_per_token times the active FLOPs.
- dropless: the token-expert assignments are sorted by expert and each expert multiplies only
  its own rows (`grouped_matmul`), whatever their number: the active FLOPs, no token dropped.
- capacity (GShard): each expert takes at most `capacity_factor x assignments / num_experts`
  assignments, top-1 choices before top-2 and earlier tokens first; the rest contribute
  nothing (the token passes through the residual stream). Static shapes, one dense matmul per
  expert; the share of assignments dropped is reported as the stat `moe_dropped_fraction`.
  Decoding (one new position per row) always runs dropless: a capacity made for one token
  would drop most of a batch.

The grouped matmul of dropless dispatch is `jax.lax.ragged_dot` where the backend has a
grouped kernel for it (TPU: a Mosaic kernel whose compiled FLOPs are the active ones), and a
block form on CPU, whose XLA lowers ragged_dot to a dense matmul per expert (num_experts times
the FLOPs, seen in the compiled HLO): each expert's rows are padded to whole blocks of
`block_rows`, and each block is multiplied by its expert's weights (`_Blocks`).

Expert parallelism: with experts split over mesh axes the batch is split over too, each device
sends its assignments to the devices holding their experts and gets the outputs back, inside
`shard_map` (`exchange_to_experts`): ragged all-to-alls where the platform has them, fixed
worst-case buffers through all_to_all on CPU.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from lm.models.layers import (
    ACTIVATIONS,
    DEFAULT_INIT_STD,
    MLP,
    Dropout,
    activation_spec,
    normal,
    param_init,
    traced_backend,
)
from lm.models.layers import dropout as dropout_fn

DISPATCHES = ("dense", "dropless", "capacity")
GROUPED_MATMULS = ("auto", "ragged_dot", "blocks")
EXCHANGES = ("auto", "ragged", "padded")
STATS = "stats"  # the Flax collection of sown statistics (means over layers, logged)
BLOCK_ROWS = 64  # the most rows of a block of the CPU form (`block_rows`)


class ExpertWeights(nn.Module):
    """The parameters of one projection of every expert: kernel [expert, in, out] (logical
    axes `expert` + `axes`) and, with `use_bias`, bias [expert, out]. Returns (kernel, bias or
    None), cast to `dtype`. A module of its own so that the kernels sit at `.../wi/kernel` like
    the dense MLP's (LoRA targets and checkpoint paths find them by the same names)."""

    shape: tuple[int, int, int]  # (num_experts, in, out)
    axes: tuple[str, str]
    use_bias: bool = True
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = DEFAULT_INIT_STD

    @nn.compact
    def __call__(self) -> tuple[jax.Array, jax.Array | None]:
        kernel = self.param(
            "kernel",
            param_init(normal(self.init_std), ("expert",) + tuple(self.axes)),
            tuple(self.shape),
            self.param_dtype,
        )
        bias = None
        if self.use_bias:
            bias = self.param(
                "bias",
                param_init(jax.nn.initializers.zeros, ("expert", self.axes[1])),
                (self.shape[0], self.shape[2]),
                self.param_dtype,
            ).astype(self.dtype)
        return kernel.astype(self.dtype), bias


def route(logits: jax.Array, k: int, normalize: bool) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Router logits [tokens, expert] (float32) -> (probs [tokens, expert], gates [tokens, k],
    experts [tokens, k] int32): the softmax, and each token's top-k experts with their gates.
    Gates are the top-k probabilities, renormalised to sum to 1 when `normalize` and k > 1
    (GShard top-2, Mixtral); otherwise the raw probabilities (Switch; OLMoE, Qwen-MoE), so
    that the language-model loss still reaches the router."""
    probs = jax.nn.softmax(logits, axis=-1)
    gates, experts = jax.lax.top_k(probs, k)
    if normalize and k > 1:
        gates = gates / jnp.sum(gates, axis=-1, keepdims=True)
    return probs, gates, experts


class _Blocks(NamedTuple):
    """Where each sorted assignment sits in a buffer of `tiles` blocks of `rows` rows, each block
    holding one expert's rows. dest [assignments]: its row in the flattened buffer (>= the
    buffer's size: dropped); tile_expert [tiles]: each block's expert (None: block e is
    expert e)."""

    dest: jax.Array
    tile_expert: jax.Array | None
    tiles: int
    rows: int


def _group_offsets(sorted_experts: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Each sorted assignment's rank among its expert's assignments [assignments]."""
    starts = jnp.cumsum(group_sizes) - group_sizes
    index = jnp.arange(sorted_experts.shape[0], dtype=jnp.int32)
    return index - starts[jnp.minimum(sorted_experts, group_sizes.shape[0] - 1)]


def block_rows(assignments: int, num_experts: int) -> int:
    """Rows of a block of the CPU form: a power of two from 8 to `BLOCK_ROWS`, at most an
    eighth of the mean rows per expert, so that padding (under a block per expert) adds at most
    an eighth to the expert FLOPs once there are 64 assignments per expert."""
    share = max(1, assignments // (8 * num_experts))
    return max(8, min(BLOCK_ROWS, 1 << (share.bit_length() - 1)))


def dropless_blocks(sorted_experts, group_sizes, rows: int) -> _Blocks:
    """Each expert's assignments padded to whole blocks of `rows`; the static number of blocks,
    ceil(assignments / rows) + experts, holds any split of the assignments. Assignments of
    expert id `num_experts` (sorted last) are dropped."""
    num_experts, assignments = group_sizes.shape[0], sorted_experts.shape[0]
    tiles_of = (group_sizes + rows - 1) // rows  # [expert]
    ends = jnp.cumsum(tiles_of)
    tile_start = ends - tiles_of
    expert = jnp.minimum(sorted_experts, num_experts - 1)
    dest = tile_start[expert] * rows + _group_offsets(sorted_experts, group_sizes)
    tiles = -(-assignments // rows) + num_experts
    dest = jnp.where(sorted_experts < num_experts, dest, tiles * rows)  # expert id num: none
    tile_expert = jnp.searchsorted(ends, jnp.arange(tiles), side="right")
    return _Blocks(dest, jnp.minimum(tile_expert, num_experts - 1), tiles, rows)


def capacity_blocks(sorted_experts, group_sizes, capacity: int) -> _Blocks:
    """Block e holds expert e's first `capacity` assignments; later ones, and the padding
    tokens' (sorted last under the expert id `num_experts`), are dropped."""
    num_experts = group_sizes.shape[0]
    rank = _group_offsets(sorted_experts, group_sizes)
    kept = (rank < capacity) & (sorted_experts < num_experts)
    dest = jnp.where(kept, sorted_experts * capacity + rank, num_experts * capacity)
    return _Blocks(dest, None, num_experts, capacity)


def to_blocks(x: jax.Array, blocks: _Blocks) -> jax.Array:
    """Sorted assignments' rows [assignments, features] -> [tiles, rows, features]; rows no
    assignment fills are zero."""
    buffer = jnp.zeros((blocks.tiles * blocks.rows, x.shape[-1]), x.dtype)
    buffer = buffer.at[blocks.dest].set(x, mode="drop", unique_indices=True)
    return buffer.reshape(blocks.tiles, blocks.rows, x.shape[-1])


def from_blocks(buffer: jax.Array, blocks: _Blocks) -> jax.Array:
    """[tiles, rows, features] -> the sorted assignments' rows [assignments, features] (zero for
    a dropped assignment)."""
    flat = buffer.reshape(-1, buffer.shape[-1])
    return flat.at[blocks.dest].get(mode="fill", fill_value=0, unique_indices=True)


def block_matmul(buffer: jax.Array, kernel: jax.Array, blocks: _Blocks) -> jax.Array:
    """[tiles, rows, in] x kernel [expert, in, out] -> [tiles, rows, out], each block by its
    expert's kernel."""
    weights = kernel if blocks.tile_expert is None else kernel[blocks.tile_expert]
    return jnp.einsum("tri,tio->tro", buffer, weights)


def block_bias(buffer: jax.Array, bias: jax.Array, blocks: _Blocks) -> jax.Array:
    per_tile = bias if blocks.tile_expert is None else bias[blocks.tile_expert]
    return buffer + per_tile[:, None, :]


def resolve_grouped_matmul(name: str) -> str:
    """'auto' -> 'blocks' where the model is traced for a CPU (its ragged_dot is dense), else
    'ragged_dot'."""
    if name not in GROUPED_MATMULS:
        raise ValueError(f"unknown grouped matmul {name!r}: use one of {GROUPED_MATMULS}")
    if name == "auto":
        return "blocks" if traced_backend() == "cpu" else "ragged_dot"
    return name


def resolve_exchange(name: str) -> str:
    """'auto' -> 'padded' where the model is traced for a CPU (XLA:CPU has no ragged
    all-to-all), else 'ragged'."""
    if name not in EXCHANGES:
        raise ValueError(f"unknown expert exchange {name!r}: use one of {EXCHANGES}")
    if name == "auto":
        return "padded" if traced_backend() == "cpu" else "ragged"
    return name


def capacity_of(assignments: int, num_experts: int, factor: float) -> int:
    """Assignments an expert takes under capacity dispatch: ceil(factor x assignments /
    experts), at least 1 and at most every assignment."""
    return max(1, min(assignments, math.ceil(factor * assignments / num_experts)))


def capacity_kept(experts: jax.Array, num_experts: int, capacity: int) -> jax.Array:
    """Which assignments capacity dispatch keeps: experts [assignments] in priority order
    (`num_experts`: none) -> bool [assignments], True for each expert's first `capacity`."""
    order = jnp.argsort(experts, stable=True)
    sorted_experts = experts[order]
    group_sizes = jnp.bincount(sorted_experts, length=num_experts + 1)[:num_experts]
    rank = _group_offsets(sorted_experts, group_sizes)
    kept_sorted = (rank < capacity) & (sorted_experts < num_experts)
    return jnp.zeros_like(kept_sorted).at[order].set(kept_sorted, unique_indices=True)


class ExpertFn(NamedTuple):
    """The expert MLP apart from its parameters: activation, gating, dropout (rows -> rows) and
    `reduce`, applied to the down projection before its bias (a psum where the MLP dimension is
    split over devices)."""

    activation: str
    gated: bool
    dropout: object  # rows -> rows
    reduce: object = None  # rows -> rows

    def __call__(self, h, weights, matmul, add_bias):
        """The expert MLP on rows `h` laid out for `matmul(h, kernel)` / `add_bias(h, bias)`."""

        def project(h, name, reduce=None):
            kernel, bias = weights[name]
            out = matmul(h, kernel)
            out = out if reduce is None else reduce(out)
            return out if bias is None else add_bias(out, bias)

        hidden = ACTIVATIONS[self.activation](project(h, "wi"))
        if self.gated:
            hidden = hidden * project(h, "wu")
        return project(self.dropout(hidden), "wo", self.reduce)


def grouped_experts(rows, experts, weights, expert_fn: ExpertFn, method: str, capacity=None):
    """Each row through its expert's MLP: rows [m, embed], experts [m] (id `num_experts`: no
    expert) -> [m, embed] in the rows' order, zero for a row with no expert. With `capacity`,
    each expert takes its first `capacity` rows (one block per expert) and drops the rest."""
    num = weights["wi"][0].shape[0]
    order = jnp.argsort(experts, stable=True)
    sorted_experts = experts[order]
    group_sizes = jnp.bincount(sorted_experts, length=num + 1)[:num].astype(jnp.int32)
    sorted_rows = rows[order]
    if capacity is not None or method == "blocks":
        if capacity is not None:
            blocks = capacity_blocks(sorted_experts, group_sizes, capacity)
        else:
            rows_per_block = block_rows(rows.shape[0], num)
            blocks = dropless_blocks(sorted_experts, group_sizes, rows_per_block)
        out = expert_fn(
            to_blocks(sorted_rows, blocks),
            weights,
            lambda h, kernel: block_matmul(h, kernel, blocks),
            lambda h, bias: block_bias(h, bias, blocks),
        )
        out = from_blocks(out, blocks)
    else:  # rows of no expert sort last, past every group: ragged_dot leaves them alone
        out = expert_fn(
            sorted_rows,
            weights,
            lambda h, kernel: jax.lax.ragged_dot(h, kernel, group_sizes),
            lambda h, bias: h + bias[jnp.minimum(sorted_experts, num - 1)],
        )
        out = jnp.where((sorted_experts < num)[:, None], out, 0)
    return _unsorted(out, order)


def _unsorted(sorted_values: jax.Array, order: jax.Array) -> jax.Array:
    """values[order] -> values (order a permutation of the first axis)."""
    return jnp.zeros_like(sorted_values).at[order].set(sorted_values, unique_indices=True)


class _Destinations(NamedTuple):
    """A device's rows sorted by the device holding their expert. order [m]: the sort;
    device [m]: each sorted row's device (`devices`: none, sorted last); counts [devices]:
    rows for each device; local_experts [m]: each sorted row's expert on its device."""

    order: jax.Array
    device: jax.Array
    counts: jax.Array
    local_experts: jax.Array


def _destinations(experts, local: int, devices: int) -> _Destinations:
    device = jnp.where(experts < local * devices, experts // local, devices)
    order = jnp.argsort(device, stable=True)
    sorted_device = device[order]
    counts = jnp.bincount(sorted_device, length=devices + 1)[:devices].astype(jnp.int32)
    local_experts = jnp.where(sorted_device < devices, experts[order] % local, local)
    return _Destinations(order, sorted_device, counts, local_experts)


def exchange_to_experts(
    rows, experts, weights, expert_fn, method, axes, devices, slots, exchange, capacity=None
):
    """Expert parallelism inside `shard_map`: this device's rows [m, embed] go to the devices
    holding their experts (`axes`: the mesh axes the experts are split over, this device holding
    experts [index * local, (index + 1) * local) of the `devices` x local), run there, and come
    back. experts [m]: global ids, `num_experts` = none. slots: rows a device may send to each
    other device (m for dropless: every row may go to one device). Returns [m, embed] in the
    rows' order. capacity: rows each expert takes from each device (None: dropless).

    exchange 'ragged': `jax.lax.ragged_all_to_all` sends each device only its rows, into a
    buffer of devices x slots rows. 'padded' (XLA:CPU has no ragged all-to-all): two
    all-to-alls of [devices, slots, embed] buffers, devices x slots rows whatever the routing."""
    local = weights["wi"][0].shape[0]
    sent = _destinations(experts, local, devices)
    if exchange == "ragged":
        back = _ragged_round_trip(
            rows[sent.order], sent, weights, expert_fn, method, axes, slots, capacity
        )
        return _unsorted(back, sent.order)
    order, sorted_device, counts = sent.order, sent.device, sent.counts
    rank = _group_offsets(sorted_device, counts)
    kept = (sorted_device < devices) & (rank < slots)
    slot = jnp.where(kept, sorted_device * slots + rank, devices * slots)
    sent_rows = jnp.zeros((devices * slots, rows.shape[-1]), rows.dtype)
    sent_rows = sent_rows.at[slot].set(rows[order], mode="drop", unique_indices=True)
    sent_experts = jnp.full((devices * slots,), local, experts.dtype)
    sent_experts = sent_experts.at[slot].set(sent.local_experts, mode="drop", unique_indices=True)

    def swap(a):  # block j of this device's buffer <-> this device's block of device j's
        return jax.lax.all_to_all(a.reshape(devices, slots, *a.shape[1:]), axes, 0, 0).reshape(
            a.shape
        )

    received = devices * capacity if capacity is not None else None
    out = grouped_experts(swap(sent_rows), swap(sent_experts), weights, expert_fn, method, received)
    back = swap(out).at[slot].get(mode="fill", fill_value=0, unique_indices=True)
    return _unsorted(back, order)


def _ragged_round_trip(
    sorted_rows, sent: _Destinations, weights, expert_fn, method, axes, slots, capacity
):
    """Rows sorted by device [m, embed] to their devices with ragged all-to-alls, through the
    experts there, and back: [m, embed] in the same order (zero for a row with no device)."""
    devices = sent.counts.shape[0]
    offsets = jnp.cumsum(sent.counts) - sent.counts  # where each device's rows start here
    counts = jax.lax.all_gather(sent.counts, axes)  # [source, destination]
    here = jax.lax.axis_index(axes)
    landing = (jnp.cumsum(counts, axis=0) - counts)[here]  # where my rows start on each device
    received = counts[:, here]  # rows each device sends me
    buffer = devices * slots

    def to_experts(values, fill):
        output = jnp.full((buffer, *values.shape[1:]), fill, values.dtype)
        return jax.lax.ragged_all_to_all(
            values, output, offsets, sent.counts, landing, received, axis_name=axes
        )

    rows = to_experts(sorted_rows, 0)
    ids = to_experts(sent.local_experts, weights["wi"][0].shape[0])
    received_capacity = devices * capacity if capacity is not None else None
    out = grouped_experts(rows, ids, weights, expert_fn, method, received_capacity)
    starts = jnp.cumsum(received) - received  # each source's rows in `rows`
    their_offsets = jax.lax.all_gather(offsets, axes)[:, here]  # where they sit on the source
    output = jnp.zeros_like(sorted_rows)
    return jax.lax.ragged_all_to_all(
        out, output, starts, received, their_offsets, sent.counts, axis_name=axes
    )


def _axes(entry) -> tuple[str, ...]:
    """A PartitionSpec entry (None, an axis, or a tuple of them) as a tuple of axes."""
    return () if entry is None else ((entry,) if isinstance(entry, str) else tuple(entry))


class _DeviceLayout(NamedTuple):
    """How a step's mesh splits the dispatch. batch: the axes the tokens are split over;
    exchange: the expert axes among them (tokens travel to their experts' devices); reduce:
    expert axes the tokens are not split over (each device runs its experts on the tokens it
    already holds, and the outputs are summed over these axes); mlp: the axes the experts'
    MLP dimension is split over (the down projection is summed over them); specs: each
    weight's (kernel, bias) PartitionSpecs inside the shard_map."""

    batch: tuple[str, ...]
    exchange: tuple[str, ...]
    reduce: tuple[str, ...]
    mlp: tuple[str, ...]
    specs: dict


_WEIGHT_NAMES = {"wi": ("expert", None, "mlp"), "wu": ("expert", None, "mlp")}
_WEIGHT_NAMES["wo"] = ("expert", "mlp", None)


def device_layout(weights, tokens: int) -> _DeviceLayout | None:
    """The dispatch's layout under the rules and mesh in force (`layers.activation_rules`),
    None outside them (one device, a bare model, decoding). Each weight's spec is its
    parameter's: experts over the `expert` rule's axes, the MLP dimension over `mlp`'s, the
    embedding dimension whole (gathered, as FSDP gathers a dense MLP's kernels)."""
    batch_spec = activation_spec(("activation_batch",), (tokens,))
    if batch_spec is None:
        return None
    specs = {}
    for name, (kernel, bias) in weights.items():
        names = _WEIGHT_NAMES[name]
        bias_spec = None if bias is None else activation_spec(names[::2], bias.shape)
        specs[name] = (activation_spec(names, kernel.shape), bias_spec)
    batch, experts = _axes(batch_spec[0]), _axes(specs["wi"][0][0])
    exchange = tuple(a for a in experts if a in batch)
    reduce = tuple(a for a in experts if a not in batch)
    if exchange and reduce:
        raise ValueError(
            f"parallel.rules puts the experts over {experts}: {exchange} split the batch and "
            f"{reduce} do not; use axes of one kind, e.g. --config.parallel.rules=expert=fsdp"
        )
    return _DeviceLayout(batch, exchange, reduce, _axes(specs["wi"][0][2]), specs)


class MoeMLP(nn.Module):
    """Mixture-of-experts feed-forward block: a router sends each token to its top-k experts
    (each an `MLP`-shaped block of width `hidden`) and mixes their outputs by the router's
    gates (`route`); `dispatch` says how tokens reach experts (module docstring). The router
    runs in float32 (Switch's selective precision).

    Shared experts (DeepSeekMoE, Qwen-MoE): with `shared_hidden` > 0 a dense MLP of that width
    (`shared`) runs on every token beside the routed experts, scaled by a sigmoid gate of the
    token (`shared_gate`) when `shared_gate`.

    Auxiliary losses, sown into the `losses` collection over the tokens `valid` marks
    (padding does not count):
    - `load_balancing` (Switch Transformer eq. 4, top-k counted per assignment): with f_e the
      fraction of assignments that go to expert e and P_e its mean router probability,
      `aux_loss * num_experts * sum_e f_e P_e` (= aux_loss when balanced);
    - `router_z` (ST-MoE eq. 5): `z_loss * mean(logsumexp(router logits)^2)`.
    Each is sown only when its coefficient is non-zero.

    x [batch, length, embed], valid [batch, length] bool or None (every token)
    -> [batch, length, embed].
    """

    num_experts: int
    experts_per_token: int
    hidden: int
    activation: str = "gelu"
    gated: bool = False
    use_bias: bool = True
    dropout: float = 0.0
    aux_loss: float = 0.0
    z_loss: float = 0.0
    normalize_gates: bool = True
    dispatch: str = "dropless"
    capacity_factor: float = 1.25
    grouped_matmul: str = "auto"
    exchange: str = "auto"
    shared_hidden: int = 0
    shared_gate: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    init_std: float = DEFAULT_INIT_STD
    out_init_std: float = DEFAULT_INIT_STD

    def _weights(self, shape, axes, std, name):
        return ExpertWeights(
            shape,
            axes,
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            init_std=std,
            name=name,
        )()

    def _expert_weights(self, features):
        up, in_axes = (self.num_experts, features, self.hidden), ("embed", "mlp")
        weights = {
            "wi": self._weights(up, in_axes, self.init_std, "wi_gate" if self.gated else "wi")
        }
        if self.gated:
            weights["wu"] = self._weights(up, in_axes, self.init_std, "wi_up")
        down = (self.num_experts, self.hidden, features)
        weights["wo"] = self._weights(down, ("mlp", "embed"), self.out_init_std, "wo")
        return weights

    @nn.compact
    def __call__(self, x, deterministic: bool = True, valid=None, decode: bool = False):
        if self.dispatch not in DISPATCHES:
            raise ValueError(f"unknown MoE dispatch {self.dispatch!r}: use one of {DISPATCHES}")
        batch, length, features = x.shape
        tokens = x.reshape(batch * length, features)
        mask = jnp.ones(tokens.shape[0], bool) if valid is None else valid.reshape(-1)
        logits = nn.Dense(
            self.num_experts,
            use_bias=False,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            kernel_init=param_init(normal(self.init_std), ("embed", "expert")),
            name="router",
        )(tokens)  # [tokens, expert] float32
        probs, gates, experts = route(logits, self.experts_per_token, self.normalize_gates)
        self._sow_losses(logits, probs, experts, mask)
        weights = self._expert_weights(features)
        if self.dispatch == "dense":
            y = self._dense(tokens, gates, experts, weights, deterministic)
        else:
            y = self._sorted(tokens, gates, experts, mask, weights, deterministic, decode)
        if self.shared_hidden:
            y = y + self._shared(tokens, deterministic)
        return y.reshape(batch, length, features)

    def _dense(self, tokens, gates, experts, weights, deterministic):
        """Every expert on every token [tokens, embed]; gates zero outside the top k. Gated
        before the down projection, so that every expert's [tokens, expert, embed] output is
        never materialised."""
        act = ACTIVATIONS[self.activation]
        full = jnp.einsum("tk,tke->te", gates, jax.nn.one_hot(experts, self.num_experts))

        def up(name):
            kernel, bias = weights[name]
            h = jnp.einsum("ti,eio->teo", tokens, kernel)
            return h if bias is None else h + bias

        hidden = act(up("wi"))
        if self.gated:
            hidden = hidden * up("wu")
        hidden = Dropout(self.dropout)(hidden, deterministic=deterministic)
        wo, bo = weights["wo"]
        full = full.astype(self.dtype)
        y = jnp.einsum("tef,efd->td", hidden * full[..., None], wo)
        return y if bo is None else y + full @ bo

    def _sorted(self, tokens, gates, experts, mask, weights, deterministic, decode):
        """Dropless or capacity dispatch [tokens, embed]: each token-expert assignment through
        its expert (`grouped_experts`), on each device for the tokens it holds when a mesh is
        in force (`_per_device`)."""
        num, k = self.num_experts, self.experts_per_token
        count = tokens.shape[0]
        capacity = self.dispatch == "capacity" and not decode
        # Choice-major order: every top-1 choice of an expert comes before its top-2 ones, the
        # priority capacity dispatch keeps (GShard); padding takes no expert's capacity.
        flat = experts.T.reshape(-1)
        valid = jnp.tile(mask, k)
        if capacity:
            flat = jnp.where(valid, flat, num)
        rng = self.make_rng("dropout") if self.dropout and not deterministic else None
        layout = device_layout(weights, count)
        if layout is None:
            out, kept = self._assignments(tokens, flat, weights, capacity, rng, None)
        else:
            out, kept = self._per_device(tokens, flat, weights, capacity, rng, layout)
        if capacity:
            dropped = jnp.sum(valid & ~kept) / jnp.maximum(jnp.sum(valid), 1)
            self.sow(STATS, "moe_dropped_fraction", dropped)
        out = out * gates.T.reshape(-1)[:, None].astype(out.dtype)
        return jnp.sum(out.reshape(k, count, -1), axis=0)

    def _assignments(self, tokens, flat, weights, capacity: bool, rng, layout):
        """One device's assignments through their experts: tokens [n, embed], flat [k * n]
        expert ids (choice-major; `num_experts`: none) -> (outputs [k * n, embed], kept
        [k * n]). Capacity counts this device's assignments (GShard's groups)."""
        num, k = self.num_experts, self.experts_per_token
        dropout = (lambda h: h) if rng is None else (lambda h: dropout_fn(h, self.dropout, rng))
        reduce = None
        if layout is not None and layout.mlp:
            reduce = lambda y: jax.lax.psum(y, layout.mlp)  # noqa: E731
        expert_fn = ExpertFn(self.activation, self.gated, dropout, reduce)
        method = resolve_grouped_matmul(self.grouped_matmul)
        per_expert = None
        if capacity:
            per_expert = capacity_of(flat.shape[0], num, self.capacity_factor)
            flat = jnp.where(capacity_kept(flat, num, per_expert), flat, num)
        rows = jnp.tile(tokens, (k, 1))
        local = weights["wi"][0].shape[0]
        if layout is not None and layout.exchange:
            devices = num // local
            slots = flat.shape[0] if per_expert is None else min(flat.shape[0], local * per_expert)
            exchange = resolve_exchange(self.exchange)
            out = exchange_to_experts(
                rows,
                flat,
                weights,
                expert_fn,
                method,
                layout.exchange,
                devices,
                slots,
                exchange,
                per_expert,
            )
        elif layout is not None and layout.reduce:  # this device's experts, summed over them
            first = jax.lax.axis_index(layout.reduce) * local
            mine = (flat >= first) & (flat < first + local)
            ids = jnp.where(mine, flat - first, local)
            # Marked as varying over those axes, so that the backward pass sums the tokens'
            # gradients over the devices' experts: gathers with device-dependent indices
            # from an array replicated over them do not.
            rows = jax.lax.pcast(rows, layout.reduce, to="varying")
            out = grouped_experts(rows, ids, weights, expert_fn, method, per_expert)
            out = jax.lax.psum(out, layout.reduce)
        else:
            out = grouped_experts(rows, flat, weights, expert_fn, method, per_expert)
        return out, flat < num

    def _per_device(self, tokens, flat, weights, capacity, rng, layout: _DeviceLayout):
        """`_assignments` in a `shard_map` over the mesh in force: each device dispatches the
        tokens it holds (a sort over the whole batch would gather it onto every device), its
        experts' weights gathered along the embedding as FSDP gathers them."""
        k, features = self.experts_per_token, tokens.shape[-1]
        mesh = jax.sharding.get_abstract_mesh()
        by_choice = P(None, layout.batch or None)

        def local(tokens, flat, weights, rng):
            if rng is not None:  # each device draws its own dropout bits
                rng = jax.random.fold_in(rng, jax.lax.axis_index(tuple(mesh.axis_names)))
            out, kept = self._assignments(tokens, flat.reshape(-1), weights, capacity, rng, layout)
            return out.reshape(k, -1, features), kept.reshape(k, -1)

        out, kept = jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(layout.batch or None, None), by_choice, layout.specs, P()),
            out_specs=(P(None, layout.batch or None, None), by_choice),
        )(tokens, flat.reshape(k, -1), weights, rng)
        return out.reshape(-1, features), kept.reshape(-1)

    def _shared(self, tokens, deterministic):
        """The shared experts' dense MLP on every token [tokens, embed], gated if configured."""
        shared = MLP(
            hidden=self.shared_hidden,
            activation=self.activation,
            gated=self.gated,
            use_bias=self.use_bias,
            dropout=self.dropout,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            init_std=self.init_std,
            out_init_std=self.out_init_std,
            name="shared",
        )(tokens[None], deterministic=deterministic)[0]
        if not self.shared_gate:
            return shared
        gate = nn.Dense(
            1,
            use_bias=False,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            kernel_init=param_init(normal(self.init_std), ("embed", None)),
            name="shared_gate",
        )(tokens)
        return shared * jax.nn.sigmoid(gate).astype(shared.dtype)

    def _sow_losses(self, logits, probs, experts, mask):
        """The load-balancing and z losses over the tokens `mask` marks."""
        weight = mask.astype(jnp.float32)
        total = jnp.maximum(jnp.sum(weight), 1.0)
        if self.aux_loss:
            assigned = jnp.sum(jax.nn.one_hot(experts, self.num_experts), axis=1)  # [tokens, e]
            fraction = weight @ assigned / (total * self.experts_per_token)  # sums to 1
            mean_prob = weight @ probs / total
            balance = self.num_experts * jnp.sum(fraction * mean_prob)
            self.sow("losses", "load_balancing", self.aux_loss * balance)
        if self.z_loss:
            z = jax.nn.logsumexp(logits, axis=-1)
            self.sow("losses", "router_z", self.z_loss * jnp.sum(weight * z**2) / total)
