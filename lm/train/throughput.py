"""Peak FLOP/s per device and FLOPs per token, for the MFU the loop logs."""

from __future__ import annotations

import functools
import statistics
import time

import jax
import jax.numpy as jnp

from lm.models.transformer import (
    ModelConfig,
)
from lm.utils import longest_prefix_entry

PEAK_FLOPS = {  # dense bf16 FLOP/s per device
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,  # v5p's device_kind
    "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def matmul_peak(dtype=jnp.float32, size: int = 0, repeats: int = 10) -> float:
    """Measured FLOP/s of one square matrix product on the first device (median of `repeats`
    after a warm-up). size 0: 8192 on an accelerator, 1024 on CPU."""
    size = size or (1024 if jax.default_backend() == "cpu" else 8192)
    a = b = jnp.ones((size, size), dtype)  # the values do not change a product's speed
    product = jax.jit(jnp.matmul)
    jax.block_until_ready(product(a, b))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(product(a, b))
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def peak_flops_for_kind(kind: str) -> float:
    """The datasheet's dense bf16 FLOP/s of a device kind (`Device.device_kind`); 0 if not
    listed. The longest matching name wins: 'TPU v5 lite' (v5e) before 'TPU v5' (v5p)."""
    return longest_prefix_entry(PEAK_FLOPS, kind, 0.0)


def peak_flops_per_device(override: float = 0.0) -> float:
    """Peak FLOP/s of one device: the datasheet's for known accelerators; on CPU a float32
    matrix product measured now (about 0.1 s), since clock boost and vector width make any
    formula wrong (2 EPYC cores: 32 FLOP/cycle x 2.5 GHz said 160 GFLOP/s, they do 450)."""
    if override > 0:
        return override
    flops = peak_flops_for_kind(jax.devices()[0].device_kind)
    if flops:
        return flops
    if jax.default_backend() == "cpu":  # forced host devices share the cores
        return _cpu_peak() / jax.local_device_count()
    return 0.0


@functools.cache
def _cpu_peak() -> float:
    """The CPU's measured float32 peak, once per process (every run of a test session asks)."""
    return matmul_peak(jnp.float32)


def flops_per_token(config: ModelConfig, num_params: int, seq_len: int) -> float:
    """Training FLOPs per token: 6N for the weights a token uses plus attention (Kaplan et al.,
    PaLM appendix). N counts active parameters (`ModelConfig.active_params`): a mixture of
    experts' token pays for its experts_per_token experts, not all of them. Model FLOPs, so
    the dense dispatch of `lm.models.moe.MoeMLP`, which runs every expert, computes more than this."""
    attention = 12 * config.num_layers * config.num_heads * config.dim_per_head * seq_len
    return 6 * config.active_params(num_params) + attention
