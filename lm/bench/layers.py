"""`layers`: the real train step (`lm.train.create_trainer`) at SmolLM2-135M's shape, compiled at
several depths with scanned and with unrolled layers (compile seconds and their ratio), and
its temporary memory (`compiled.memory_analysis()`) under each `model.remat` policy.
"""

from __future__ import annotations

import dataclasses

import jax

from lm.bench.common import SMOLLM2_SHAPE, compile_step


def layers_benchmark(depths: list[int], batch: int, length: int, remat_depth: int) -> str:
    """Compile time against depth (scanned and unrolled), temporary memory against remat."""
    lines = [
        f"train step at SmolLM2-135M shape (d_model {SMOLLM2_SHAPE.d_model}, vocab "
        f"{SMOLLM2_SHAPE.vocab_size}), batch {batch} x {length}, float32, "
        f"{jax.devices()[0].platform}; compile = lower + XLA compile",
        f"{'layers':>6} {'scanned s':>10} {'unrolled s':>11}",
    ]
    times = {}
    for depth in depths:
        for scan in (True, False):
            config = dataclasses.replace(SMOLLM2_SHAPE, num_layers=depth, scan_layers=scan)
            times[depth, scan] = compile_step(config, batch, length)[0]
        lines.append(f"{depth:>6} {times[depth, True]:>10.1f} {times[depth, False]:>11.1f}")
    low, high = min(depths), max(depths)
    lines.append(
        f"{high} / {low} layers: scanned {times[high, True] / times[low, True]:.2f}x, "
        f"unrolled {times[high, False] / times[low, False]:.2f}x"
    )
    lines.append(
        f"temporary memory at {remat_depth} scanned layers (memory_analysis().temp_size_in_bytes):"
    )
    memory = {}
    for remat in ("none", "dots_saveable", "full"):
        config = dataclasses.replace(SMOLLM2_SHAPE, num_layers=remat_depth, remat=remat)
        memory[remat] = compile_step(config, batch, length)[1].memory_analysis().temp_size_in_bytes
        lines.append(
            f"  remat={remat:<14} {memory[remat] / 2**20:>9.1f} MiB "
            f"({memory[remat] / memory['none']:.2f} of none)"
        )
    return "\n".join(lines)
