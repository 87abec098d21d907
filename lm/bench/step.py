"""`step`: train-step tokens/s on the main job's shape (experiments/shakespeare_gpt.py) for
the model as it was (unrolled layers, the reference attention core) and as it is now
(scanned layers, fused attention), and in bf16, interleaved in one process; medians.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax

from lm.bench.common import MAIN_JOB_BATCH, MAIN_JOB_SHAPE, one_device_trainer, random_batch

STEP_VARIANTS = {
    # name: ModelConfig changes. 'before' is the model as it was: unrolled layers and the
    # hand-written attention core.
    "before: unrolled, reference attention": dict(
        scan_layers=False, attention_impl="reference", remat="none"
    ),
    "now (scanned, xla attention, remat dots)": dict(),
    "now, remat=none": dict(remat="none"),
    "now, remat=full": dict(remat="full"),
    "now, precision=bf16": dict(precision="bf16"),
}


def step_benchmark(steps: int, rounds: int) -> str:
    """Train-step tokens/s of each variant on the main job's shape, rounds interleaved."""
    batch, length = MAIN_JOB_BATCH
    host_batch = random_batch(MAIN_JOB_SHAPE.vocab_size, batch, length)
    runs = {}
    for name, changes in STEP_VARIANTS.items():
        trainer = one_device_trainer(dataclasses.replace(MAIN_JOB_SHAPE, **changes))
        state, device_batch = trainer.init_fn(0), trainer.put_batch(host_batch)
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, device_batch)  # compile + first step
        jax.block_until_ready(metrics)
        runs[name] = dict(
            trainer=trainer,
            state=state,
            batch=device_batch,
            times=[],
            first=time.perf_counter() - start,
        )
    for _ in range(rounds):
        for run in runs.values():
            for _ in range(steps):
                start = time.perf_counter()
                run["state"], metrics = run["trainer"].train_step(run["state"], run["batch"])
                jax.block_until_ready(metrics)
                run["times"].append(time.perf_counter() - start)
    base = statistics.median(next(iter(runs.values()))["times"])
    lines = [
        f"train step, main job shape ({MAIN_JOB_SHAPE.num_layers} layers, d_model "
        f"{MAIN_JOB_SHAPE.d_model}, vocab {MAIN_JOB_SHAPE.vocab_size}), batch {batch} x {length}, "
        f"{jax.devices()[0].platform}; {rounds} rounds x {steps} steps, interleaved",
        f"{'variant':<40} {'ms/step median (min, max)':>27} {'tokens/s':>9} {'vs before':>9} "
        f"{'first step s':>12}",
    ]
    for name, run in runs.items():
        median = statistics.median(run["times"])
        lines.append(
            f"{name:<40} {1e3 * median:>10.1f} ({1e3 * min(run['times']):.1f}, "
            f"{1e3 * max(run['times']):.1f}) {batch * length / median:>9.0f} "
            f"{base / median:>8.2f}x {run['first']:>12.1f}"
        )
    return "\n".join(lines)
