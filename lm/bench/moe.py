"""`moe`: the train step of a mixture of experts at the main job's scale under each dispatch
(`model.moe_dispatch`: dropless, capacity, dense) beside the dense model of equal active
parameters: median step time and the compiled step's FLOPs, as ratios against the dense model.

The mixture replaces each MLP of the main job (experiments/shakespeare_gpt.py, width 1,024)
by 8 experts of width 512, each token routed to its top 2: a token uses 2 x 512 = 1,024 MLP
units, as in the dense model (the same active parameters up to the router's and one bias
vector per layer), while the model holds 4x the MLP parameters. (Width 256, a quarter of the
MLP, would give half the dense model's active MLP.) The dropless grouped matmul is the one
`model.moe_grouped_matmul=auto` picks for the backend (blocks on CPU, ragged_dot elsewhere).

FLOPs are `cost_analysis()['flops']` of the train step compiled with unrolled layers (the
same computation: `cost_analysis()` counts a scanned layer body once); times are of the
scanned step the main job trains with, rounds interleaved in one process.
"""

from __future__ import annotations

import dataclasses
import statistics

import jax

from lm.bench.common import (
    MAIN_JOB_BATCH,
    MAIN_JOB_SHAPE,
    compile_step,
    one_device_trainer,
    random_batch,
    timed,
)
from lm.models.moe import resolve_grouped_matmul
from lm.models.transformer import ModelConfig

DENSE = "dense model"


def moe_variants(
    base: ModelConfig, experts: int = 8, top_k: int = 2, capacity_factor: float = 1.25
) -> dict[str, ModelConfig]:
    """name -> config: the dense `base`, then the mixture of `experts` experts of width
    base.mlp_dim / top_k (the dense model's active MLP) under each dispatch."""
    if base.mlp_dim % top_k:
        raise ValueError(f"mlp_dim {base.mlp_dim} is not a multiple of top_k {top_k}")
    mixture = dataclasses.replace(
        base,
        mlp_dim=base.mlp_dim // top_k,
        num_experts=experts,
        experts_per_token=top_k,
        moe_capacity_factor=capacity_factor,
    )
    grouped = resolve_grouped_matmul(mixture.moe_grouped_matmul)
    return {
        DENSE: base,
        f"dropless ({grouped})": dataclasses.replace(mixture, moe_dispatch="dropless"),
        f"capacity {capacity_factor:g}": dataclasses.replace(mixture, moe_dispatch="capacity"),
        "dense dispatch": dataclasses.replace(mixture, moe_dispatch="dense"),
    }


def moe_runs(
    steps: int,
    rounds: int,
    base: ModelConfig = MAIN_JOB_SHAPE,
    batch: int = MAIN_JOB_BATCH[0],
    length: int = MAIN_JOB_BATCH[1],
    experts: int = 8,
    top_k: int = 2,
    capacity_factor: float = 1.25,
) -> dict[str, dict]:
    """name -> {config, params, active, flops, compile (seconds to lower and compile the timed
    step), times (per round: the median of `steps` steps after one warm-up step), dropped (the
    last step's stats/moe_dropped_fraction, or None)}; rounds interleaved across variants. A
    `base` with unrolled layers (scan_layers=False) compiles each step once, for both."""
    base = dataclasses.replace(base, max_len=max(base.max_len, length))
    host_batch = random_batch(base.vocab_size, batch, length)
    runs = {}
    for name, config in moe_variants(base, experts, top_k, capacity_factor).items():
        seconds, step = compile_step(config, batch, length)
        counted = step
        if config.scan_layers:
            counted = compile_step(dataclasses.replace(config, scan_layers=False), batch, length)[1]
        trainer = one_device_trainer(config)  # the same layout as the compiled step's
        runs[name] = dict(
            config=config,
            step=step,
            state=trainer.init_fn(0),
            batch=trainer.put_batch(host_batch),
            params=trainer.num_params,
            active=config.active_params(trainer.num_params),
            flops=counted.cost_analysis()["flops"],
            compile=seconds,
            times=[],
        )
    for _ in range(rounds):
        for run in runs.values():
            run["times"].append(timed(lambda run=run: _step(run), steps))
    for run in runs.values():
        dropped = run.pop("metrics").get("stats/moe_dropped_fraction")
        run["dropped"] = None if dropped is None else float(dropped)
        for key in ("step", "state", "batch"):
            del run[key]
    return runs


def _step(run: dict) -> None:
    run["state"], run["metrics"] = run["step"](run["state"], run["batch"])
    jax.block_until_ready(run["metrics"])


def moe_table(runs: dict[str, dict], batch: int, length: int, steps: int, rounds: int) -> str:
    """The runs as a table, times and FLOPs as ratios against the dense model's."""
    dense = runs[DENSE]
    base_time, base_flops = statistics.median(dense["times"]), dense["flops"]
    mixture = next(run["config"] for name, run in runs.items() if name != DENSE)
    shape = dense["config"]
    lines = [
        f"train step of a dense model ({shape.num_layers} layers, d_model {shape.d_model}, MLP "
        f"{shape.mlp_dim}, vocab {shape.vocab_size}) against {mixture.num_experts} experts top-"
        f"{mixture.experts_per_token} of width {mixture.mlp_dim}, batch {batch} x {length}, "
        f"{jax.devices()[0].platform}; {rounds} rounds x {steps} steps, interleaved",
        f"{'variant':<18} {'params':>10} {'active':>10} {'ms/step: median (min, max) of rounds':>38} "
        f"{'x dense':>7} {'GFLOP/step':>10} {'x dense':>7} {'dropped':>7} {'compile s':>9}",
    ]
    for name, run in runs.items():
        median = statistics.median(run["times"])
        times = f"{1e3 * median:.1f} ({1e3 * min(run['times']):.1f}, {1e3 * max(run['times']):.1f})"
        dropped = "-" if run["dropped"] is None else f"{100 * run['dropped']:.1f}%"
        lines.append(
            f"{name:<18} {run['params']:>10,} {run['active']:>10,} {times:>38} "
            f"{median / base_time:>6.2f}x {run['flops'] / 1e9:>10.2f} "
            f"{run['flops'] / base_flops:>6.2f}x {dropped:>7} {run['compile']:>9.1f}"
        )
    return "\n".join(lines)


def moe_benchmark(
    steps: int,
    rounds: int,
    batch: int = MAIN_JOB_BATCH[0],
    length: int = MAIN_JOB_BATCH[1],
    experts: int = 8,
    top_k: int = 2,
    capacity_factor: float = 1.25,
) -> str:
    """`moe_runs` at the main job's shape, printed by `moe_table`."""
    runs = moe_runs(steps, rounds, MAIN_JOB_SHAPE, batch, length, experts, top_k, capacity_factor)
    return moe_table(runs, batch, length, steps, rounds)
