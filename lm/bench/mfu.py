"""`mfu`: one shape's train-step tokens/s and MFU (6N + 12 L d T FLOPs per token against the
device's peak, `lm.train.peak_flops_per_device`), then greedy decoding with those weights.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time

import jax
import jax.numpy as jnp

from lm import decode
from lm.bench.common import SMOLLM2_SHAPE, one_device_trainer, random_batch, timed
from lm.models.attention import resolve_implementation
from lm.models.transformer import for_inference, preset
from lm.train import matmul_peak
from lm.train.profile import format_breakdown, kernel_breakdown, latest_trace

SHAPES = {
    # GPT-2 small at the padded vocabulary peers train with (nanoGPT, MaxText): 124M parameters.
    "gpt2_124m": preset("gpt2", vocab_size=50_304, dropout=0.0),
    "smollm2_135m": SMOLLM2_SHAPE,
    # Llama 3.2 1B's shape (1.24B parameters; its RoPE frequency scaling, which changes no
    # FLOP, left out). The 128k-entry logits are made 512 positions at a time.
    "llama3_1b": preset(
        "llama",
        d_model=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        mlp_dim=8192,
        vocab_size=128_256,
        rope_base=500_000.0,
        max_len=8192,
        logits_chunk=512,
    ),
}


def shape_config(shape: str, length: int, **overrides):
    """`SHAPES[shape]` with `overrides`, its positions long enough for `length` tokens."""
    base = SHAPES[shape]
    return dataclasses.replace(base, max_len=max(base.max_len, length), **overrides)


def mfu_benchmark(
    shape: str,
    batch: int,
    length: int,
    precision: str,
    steps: int,
    remat: str,
    decode_batches: list[int],
    new_tokens: int,
    attention_impl: str = "auto",
    profile_dir: str = "",
    top: int = 15,
    scan_layers: bool = True,
) -> str:
    """Train-step tokens/s and model FLOPs utilisation of one shape on the first device (random
    weights and tokens), then greedy-decoding tokens/s of the same weights. With `profile_dir`,
    3 more steps are traced there and the `top` kernels' share of the step is printed."""
    from lm.train import flops_per_token, peak_flops_per_device

    config = shape_config(
        shape,
        length,
        precision=precision,
        remat=remat,
        attention_impl=attention_impl,
        scan_layers=scan_layers,
    )
    trainer = one_device_trainer(config)
    host_batch = random_batch(config.vocab_size, batch, length)
    tokens = host_batch["inputs"]
    state, device_batch = trainer.init_fn(0), trainer.put_batch(host_batch)
    start = time.perf_counter()
    for _ in range(3):  # compile and warm up
        state, metrics = trainer.train_step(state, device_batch)
    jax.block_until_ready(metrics)
    warmup = time.perf_counter() - start
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        state, metrics = trainer.train_step(state, device_batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    tokens_per_s = batch * length / median
    flops = flops_per_token(config, trainer.num_params, length)
    peak = peak_flops_per_device()
    measured = matmul_peak(jnp.bfloat16 if precision == "bf16" else jnp.float32)
    device = jax.devices()[0]
    attention = attention_impl
    if attention == "auto":
        dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
        attention += f" ({resolve_implementation('auto', dtype, config.dim_per_head, lengths=(length, length))})"
    lines = [
        f"{shape}: {trainer.num_params / 1e6:.1f}M parameters, {config.num_layers} layers, "
        f"precision {precision}, remat {remat}, attention {attention}, "
        f"{'scanned' if scan_layers else 'unrolled'} layers, batch {batch} x {length}, "
        f"{device.platform} {device.device_kind}",
        f"train step: {1e3 * median:.1f} ms median ({1e3 * min(times):.1f}, {1e3 * max(times):.1f}) "
        f"over {steps} steps, {tokens_per_s:,.0f} tokens/s, {flops / 1e9:.2f} GFLOP/token, "
        f"MFU {100 * tokens_per_s * flops / peak:.1f}% of {peak / 1e12:.1f} TFLOP/s (datasheet), "
        f"{100 * tokens_per_s * flops / measured:.1f}% of {measured / 1e12:.1f} TFLOP/s (measured "
        f"{precision} matmul); compile + 3 warm-up steps {warmup:.1f} s, final loss {float(metrics['loss']):.3f}",
    ]
    if profile_dir:
        state, breakdown = profiled_steps(trainer, state, device_batch, profile_dir, median, top)
        lines.append(breakdown)
    model, params = for_inference(config, trainer.model_params(state), unroll_layers=True)
    for decode_batch in decode_batches:
        prompts = [list(map(int, tokens[i % batch, :16])) for i in range(decode_batch)]

        def run(prompts=prompts):
            decode.generate(model, params, prompts, max_new_tokens=new_tokens)

        seconds = timed(run, 2)
        lines.append(
            f"decode ({precision} weights) batch {decode_batch}: "
            f"{decode_batch * new_tokens / seconds:,.1f} tokens/s "
            f"({new_tokens} new tokens after 16, greedy)"
        )
    return "\n".join(lines)


def profiled_steps(
    trainer, state, batch, directory: str, step_seconds: float, top: int
) -> tuple[object, str]:
    """Traces 3 train steps into `directory`; returns the new state (the step donates its input)
    and the steps' per-kernel breakdown."""
    steps = 3
    with jax.profiler.trace(directory):
        for _ in range(steps):
            state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
    breakdown = kernel_breakdown(latest_trace(directory), steps)
    return state, f"trace: {directory}\n" + format_breakdown(breakdown, step_seconds, top)


def step_losses(
    shape: str, batch: int, length: int, precision: str, steps: int, attention_impl: str
) -> dict:
    """The losses of `steps` train steps on one fixed random batch (seed 0 for the weights and
    the tokens) on the first device: the same numbers on any machine up to rounding, so one
    platform's run checks another's. Returns {"platform", "precision", "attention", "losses"}."""
    config = shape_config(shape, length, precision=precision, attention_impl=attention_impl)
    trainer = one_device_trainer(config)
    state = trainer.init_fn(0)
    device_batch = trainer.put_batch(random_batch(config.vocab_size, batch, length))
    losses = []
    for _ in range(steps):
        state, metrics = trainer.train_step(state, device_batch)
        losses.append(float(metrics["loss"]))
    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    resolved = resolve_implementation(
        attention_impl, dtype, config.dim_per_head, lengths=(length, length)
    )
    return {
        "platform": jax.devices()[0].platform,
        "precision": precision,
        "attention": resolved,
        "losses": losses,
    }


def compare_losses(run: dict, reference: dict, noise: dict) -> tuple[str, bool]:
    """`run`'s losses against `reference`'s (the same precision elsewhere), with the rounding
    noise of that precision measured as `reference` against `noise` (the same platform in
    float32). Agreement: at no step does run differ from reference by more than twice the
    larger of the noise at that step and 1e-3 relative (where float32 and bf16 happen to
    agree at a step, the noise there says nothing). Returns (table, agreed)."""
    rows = [
        f"{'step':>4} {run['platform'] + ' ' + run['precision']:>14} "
        f"{reference['platform'] + ' ' + reference['precision']:>14} "
        f"{noise['platform'] + ' ' + noise['precision']:>14} {'|run-ref|':>10} {'bound':>10}"
    ]
    agreed = True
    for step, (a, b, c) in enumerate(
        zip(run["losses"], reference["losses"], noise["losses"], strict=True)
    ):
        bound = 2 * max(abs(b - c), 1e-3 * abs(b))
        agreed &= abs(a - b) <= bound
        rows.append(f"{step + 1:4d} {a:14.5f} {b:14.5f} {c:14.5f} {abs(a - b):10.5f} {bound:10.5f}")
    rows.append(
        f"{'agree' if agreed else 'DIFFER'}: {run['attention']} attention on {run['platform']}"
    )
    return "\n".join(rows), agreed


def read_losses(path: str) -> dict:
    with open(path) as f:
        return json.load(f)
