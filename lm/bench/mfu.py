"""`mfu`: one shape's train-step tokens/s and MFU (6N + 12 L d T FLOPs per token against the
device's peak, `lm.train.peak_flops_per_device`), then greedy decoding with those weights.
"""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp

from lm import decode
from lm.bench.common import SMOLLM2_SHAPE, one_device_trainer, random_batch, timed
from lm.models.attention import resolve_implementation
from lm.models.transformer import for_inference, preset
from lm.train import matmul_peak

SHAPES = {
    # GPT-2 small at the padded vocabulary peers train with (nanoGPT, MaxText): 124M parameters.
    "gpt2_124m": preset("gpt2", vocab_size=50_304, dropout=0.0),
    "smollm2_135m": SMOLLM2_SHAPE,
}


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
) -> str:
    """Train-step tokens/s and model FLOPs utilisation of one shape on the first device (random
    weights and tokens), then greedy-decoding tokens/s of the same weights."""
    from lm.train import flops_per_token, peak_flops_per_device

    config = dataclasses.replace(
        SHAPES[shape],
        precision=precision,
        remat=remat,
        attention_impl=attention_impl,
        max_len=max(SHAPES[shape].max_len, length),
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
        f"precision {precision}, remat {remat}, attention {attention}, batch {batch} x {length}, "
        f"{device.platform} {device.device_kind}",
        f"train step: {1e3 * median:.1f} ms median ({1e3 * min(times):.1f}, {1e3 * max(times):.1f}) "
        f"over {steps} steps, {tokens_per_s:,.0f} tokens/s, {flops / 1e9:.2f} GFLOP/token, "
        f"MFU {100 * tokens_per_s * flops / peak:.1f}% of {peak / 1e12:.1f} TFLOP/s (datasheet), "
        f"{100 * tokens_per_s * flops / measured:.1f}% of {measured / 1e12:.1f} TFLOP/s (measured "
        f"{precision} matmul); compile + 3 warm-up steps {warmup:.1f} s, final loss {float(metrics['loss']):.3f}",
    ]
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
