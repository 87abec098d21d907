"""Shapes and helpers the benchmarks share: the main job's model and batch, SmolLM2's shape, a trainer on one device, random batches, timing."""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lm import parallel
from lm.models.transformer import ModelConfig, build_model, preset
from lm.train import OptimizerConfig, create_trainer


def timed(fn, repeats: int) -> float:
    """Median wall seconds of `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# SmolLM2-135M: 30 layers of d_model 576, 9 heads (3 KV heads), SwiGLU 1536, vocab 49,152.
SMOLLM2_SHAPE = preset("llama")


# The main job's model (experiments/shakespeare_gpt.py; tests/test_bench.py keeps them equal),
# with its 4,096-piece tokenizer, batch 16 x 256 tokens.
MAIN_JOB_SHAPE = preset(
    "gpt2",
    d_model=256,
    num_layers=4,
    num_heads=4,
    mlp_dim=1024,
    max_len=256,
    dropout=0.0,
    vocab_size=4096,
)


MAIN_JOB_BATCH = (16, 256)


def one_device_trainer(config: ModelConfig):
    return create_trainer(
        config,
        build_model(config),
        OptimizerConfig(),
        1000,
        parallel.ParallelConfig(),
        devices=jax.devices()[:1],
    )


def abstract_batch(trainer, batch: int, length: int) -> dict:
    sharding = parallel.batch_sharding(trainer.mesh)
    spec = lambda dtype: jax.ShapeDtypeStruct((batch, length), dtype, sharding=sharding)
    return {
        "inputs": spec(jnp.int32),
        "targets": spec(jnp.int32),
        "segment_ids": spec(jnp.int32),
        "positions": spec(jnp.int32),
        "weights": spec(jnp.float32),
    }


def random_batch(vocab_size: int, batch: int, length: int, seed: int = 0) -> dict[str, np.ndarray]:
    """A full (unpadded) LM batch of uniformly random tokens, as the data pipeline lays it out."""
    tokens = (
        np.random.default_rng(seed).integers(1, vocab_size, (batch, length + 1)).astype(np.int32)
    )
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "segment_ids": np.ones((batch, length), np.int32),
        "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
        "weights": np.ones((batch, length), np.float32),
    }


def compile_step(config: ModelConfig, batch: int, length: int):
    """(seconds to lower and compile the train step, the compiled executable)."""
    trainer = one_device_trainer(config)
    start = time.perf_counter()
    compiled = trainer.train_step.lower(
        trainer.abstract_state, abstract_batch(trainer, batch, length)
    ).compile()
    return time.perf_counter() - start, compiled
