"""Will it fit? Activations split like the compute over FSDP and tensor meshes, the chunked
loss, and `python -m lm.main compile` for host devices and (with libtpu) TPU slices."""

import dataclasses
import importlib.util
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm import compile as compile_lib
from lm import lora, parallel
from lm.data.pipeline import DataConfig
from lm.models.transformer import build_model, preset
from lm.train import LANGUAGE_MODELLING, OptimizerConfig, create_trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="libtpu is not installed (pip install -e '.[tpu]'; CI installs it)"
)

# Big enough that the batch's activations and logits dominate the step's temporaries.
SHAPE = dict(
    d_model=128, num_layers=2, num_heads=4, mlp_dim=512, vocab_size=8192, max_len=256, dropout=0.0
)
BATCH = DataConfig(seq_len=256, batch_size=32)


def train_temporaries(config, mesh, lora_rank=0) -> int:
    """Per-device temporary bytes of the compiled train step on 8 host devices."""
    trainer = create_trainer(
        config,
        build_model(config),
        OptimizerConfig(),
        100,
        parallel.ParallelConfig(mesh=mesh),
        lora_config=lora.LoraConfig(rank=lora_rank) if lora_rank else None,
    )
    batch = compile_lib.abstract_batch(BATCH, trainer.mesh)
    compiled = trainer.train_step.lower(trainer.abstract_state, batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes


# Two of the eight in the default suite (between them both families, both layouts, LoRA on
# and off); all eight with the slow tests.
DEFAULT_MEMORY_CASES = {("gpt2", False, 0), ("llama", True, 4)}
MEMORY_CASES = [
    pytest.param(
        family,
        scan,
        rank,
        id=f"{family}-{'scanned' if scan else 'unrolled'}-lora{rank}",
        marks=() if (family, scan, rank) in DEFAULT_MEMORY_CASES else pytest.mark.slow,
    )
    for family in ("gpt2", "llama")
    for scan in (False, True)
    for rank in (0, 4)
]


@pytest.mark.parametrize("family, scan, lora_rank", MEMORY_CASES)
def test_fsdp_and_tensor_meshes_split_activation_memory(family, scan, lora_rank):
    extra = dict(num_kv_heads=2) if family == "llama" else {}
    config = preset(family, **SHAPE, **extra, scan_layers=scan, remat="full")
    data_parallel = train_temporaries(config, (8, 1, 1), lora_rank)
    for mesh in [(1, 8, 1), (2, 2, 2)]:
        ratio = train_temporaries(config, mesh, lora_rank) / data_parallel
        # Each device holds its own rows' activations, whatever splits the weights.
        assert ratio <= 1.25, (mesh, ratio)


def _loss_and_grads(config, params, batch):
    model = build_model(config)

    def loss(p):
        sums = LANGUAGE_MODELLING.sums(model, p, batch, deterministic=True)
        return sums["loss"] / sums["weight"], sums

    return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)


def test_chunked_logits_give_the_loss_and_gradient_of_whole_rows():
    config = preset("llama", **dict(SHAPE, vocab_size=512), num_kv_heads=2)
    params = build_model(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    params = params["params"]
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, config.vocab_size, (4, 65)).astype(np.int32)
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": (rng.random((4, 64)) > 0.2).astype(np.float32),
    }
    (whole, whole_sums), whole_grads = _loss_and_grads(config, params, batch)
    chunked_config = dataclasses.replace(config, logits_chunk=16)
    (chunked, chunked_sums), chunked_grads = _loss_and_grads(chunked_config, params, batch)
    assert float(whole) > 5.0  # near log(512) = 6.2 at init: a real loss, not zero
    np.testing.assert_allclose(chunked, whole, rtol=2e-6)
    np.testing.assert_allclose(chunked_sums["accuracy"], whole_sums["accuracy"], rtol=1e-6)
    # Measured differences are float32 summation order: about 1e-9 against gradients of 1e-3.
    for a, b in zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(whole_grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-8)


def test_chunked_logits_need_less_memory():
    config = preset("gpt2", **SHAPE, remat="full")
    whole = train_temporaries(config, (8, 1, 1))
    chunked = train_temporaries(dataclasses.replace(config, logits_chunk=32), (8, 1, 1))
    # Per device: 4 rows x 256 x 8192 float32 logits (32 MiB) and their gradient, at once.
    assert whole - chunked > 32 * 2**20, (whole, chunked)


def test_logits_chunk_must_divide_the_row():
    config = preset("gpt2", **dict(SHAPE, vocab_size=64), logits_chunk=48)
    params = build_model(config).init(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    batch = {k: np.ones((2, 64), np.int32) for k in ("inputs", "targets")}
    batch["weights"] = np.ones((2, 64), np.float32)
    with pytest.raises(ValueError, match="logits_chunk=48 does not divide the sequence length 64"):
        _loss_and_grads(config, params["params"], batch)


# ------------------------------------------------------------------------- the command


def run_compile(*args, devices=None):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "LM_COMPILATION_CACHE": "off"}
    cmd = [sys.executable, "-m", "lm.main", "compile", "--config=experiments/shakespeare_gpt.py"]
    cmd += ["--config.data.vocab_size=512", "--compilation_cache=off", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def shard_bytes(abstract_tree) -> int:
    """Bytes that one device holds of a tree of ShapeDtypeStructs with shardings."""
    total = 0
    for leaf in jax.tree.leaves(abstract_tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


def test_compile_for_host_devices_reports_exact_argument_bytes():
    proc = run_compile("--topology=cpu:4", "--config.parallel.mesh=1,4,1", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["devices"] == 4 and report["mesh"] == [1, 4, 1]
    assert report["fits"] is None  # a host device's capacity is not known
    # The same trainer, built here: what one device holds of the state and the batch.
    from lm import config as config_lib

    values = config_lib.resolve(config_lib.config_of(ROOT / "experiments/shakespeare_gpt.py"))
    values["data"]["vocab_size"] = 512
    values["parallel"]["mesh"] = (1, 4, 1)
    run = config_lib.build(values)
    model_cfg = run.model_config(512)
    trainer = run.create_trainer(model_cfg, devices=jax.devices()[:4])
    batch = compile_lib.abstract_batch(run.data, trainer.mesh)
    assert report["num_params"] == trainer.num_params
    assert report["train"]["arguments"] == shard_bytes((trainer.abstract_state, batch))
    assert report["train"]["temporaries"] > 0
    # The init makes each device's shards only, never the whole state on one device.
    whole_state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.abstract_state))
    # Its outputs are this device's shards of the state (measured: 512 bytes more, the
    # compiler's padding of the scalar outputs).
    assert report["init"]["outputs"] == pytest.approx(shard_bytes(trainer.abstract_state), abs=4096)
    assert report["init"]["total"] < whole_state / 2, (report["init"], whole_state)
    assert report["model_flops"] == pytest.approx(
        compile_lib.model_flops_per_step(model_cfg, trainer.num_params, 16, 256)[0]
    )


def test_compile_table_and_the_does_not_fit_line():
    proc = run_compile("--topology=cpu:2", "--device_memory_gib=0.01")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "per device" in proc.stdout and "DOES NOT FIT" in proc.stdout
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: batch 16 x 256 on cpu:2 (mesh (2, 1, 1)) does not fit: needs ")
    assert "GiB per device of 0.01 GiB; try more FSDP" in last
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "topology, message",
    [
        ("v5p", "is not GENERATION:SHAPE"),
        ("cpu:x", "cpu:N needs a device count"),
    ],
)
def test_bad_topology_is_one_line(topology, message):
    proc = run_compile(f"--topology={topology}")
    assert proc.returncode == 2
    assert message in proc.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(HAS_LIBTPU, reason="checks the message shown without libtpu")
def test_tpu_topology_without_libtpu_says_how_to_install_it():
    proc = run_compile("--topology=v5e:2x2")
    assert proc.returncode == 2
    assert "pip install -e '.[tpu]'" in proc.stderr.strip().splitlines()[-1]


@needs_libtpu
@pytest.mark.slow
def test_compile_for_a_tpu_slice():
    proc = run_compile("--topology=v5e:2x2", "--config.parallel.mesh=1,4,1", "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["device_kind"] == "TPU v5 lite" and report["devices"] == 4
    assert report["hbm_bytes"] == 16 * 2**30 and report["fits"] is True
    assert 0 < report["train"]["temporaries"] < 2**30
    assert report["peak_flops"] == 197e12 and report["step_seconds"] > 0


@pytest.mark.slow
@needs_libtpu
def test_a_batch_a_tpu_cannot_hold_is_one_line():
    proc = run_compile(
        "--topology=v5e:2x2",
        "--config.data.batch_size=2048",
        "--config.model.remat=none",
        "--config.data.vocab_size=32768",
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert re.search(
        r"the train step does not fit: needs [\d.]+ GiB per device of 15\.\d+ GiB; try", last
    ), last
    assert "Traceback" not in proc.stderr


def _eval_loss(attention_impl: str, mesh) -> float:
    config = preset("llama", **dict(SHAPE, vocab_size=256, num_layers=1), num_kv_heads=2)
    config = dataclasses.replace(config, attention_impl=attention_impl)
    trainer = create_trainer(
        config, build_model(config), OptimizerConfig(), 10, parallel.ParallelConfig(mesh=mesh)
    )
    state = trainer.init_fn(0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 256, (4, 129)).astype(np.int32)
    ids = np.ones((4, 128), np.int32)
    ids[0, 60:] = 2  # two documents packed in row 0, padding at the end of row 1
    ids[1, 100:] = 0
    positions = np.where(ids[0] == 2, np.arange(128) - 60, np.arange(128))
    batch = {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "weights": (ids != 0).astype(np.float32),
        "segment_ids": ids,
        "positions": np.stack([positions] + [np.arange(128)] * 3).astype(np.int32),
    }
    out = trainer.eval_step(state.params, parallel.global_batch(batch, trainer.mesh))
    return float(out["loss_sum"] / out["tokens"])


def test_splash_inside_the_laid_out_step_equals_xla():
    """The kernel per device (shard_map over batch and heads, Pallas interpreter on CPU)
    gives the loss that XLA's attention gives over the whole mesh."""
    want = _eval_loss("xla", (2, 2, 2))
    assert _eval_loss("splash", (2, 2, 2)) == pytest.approx(want, rel=1e-6)
    assert _eval_loss("splash", (1, 1, 8)) == pytest.approx(want, rel=1e-6)


@needs_libtpu
@pytest.mark.parametrize("mesh, splash", [((1, 2, 2), True), ((1, 1, 4), False)])
def test_auto_attention_compiles_the_splash_kernel_for_tpu(mesh, splash):
    """Splash where each device holds its query heads' kv heads: 4 query heads and 2 kv heads
    split over tensor 2 alike, but over tensor 4 only the query heads split (XLA then)."""
    from lm import config as config_lib

    values = config_lib.resolve(config_lib.config_of(ROOT / "experiments/llama3_8b.py", "tiny"))
    values["model"].update(head_dim=128)
    values["parallel"]["mesh"] = mesh
    run = config_lib.build(values)
    model_cfg = run.model_config(run.data.vocab_size)
    assert model_cfg.attention_impl == "auto"
    target = compile_lib.topology("v5e:2x2")
    trainer = run.create_trainer(model_cfg, devices=target.devices)
    batch = compile_lib.abstract_batch(run.data, trainer.mesh)
    text = trainer.train_step.lower(trainer.abstract_state, batch).compile().as_text()
    assert ("tpu_custom_call" in text) == splash  # the Mosaic kernel, or XLA's attention


@pytest.mark.parametrize(
    "spec, params",
    [
        # The published sizes: Llama 3 8B, 70B and 3.2 1B; GPT-2 1.5B with 50,304 tokens;
        # Mixtral 8x7B (all 8 experts of each layer counted).
        ("llama3_8b.py", 8_030_261_248),
        ("llama3_70b.py", 70_553_706_496),
        ("llama3_1b.py", 1_235_814_400),
        ("gpt2.py:1.5b", 1_557_686_400),
        ("mixtral_8x7b.py", 46_702_792_704),
    ],
)
def test_real_size_experiments_have_the_published_shapes(spec, params):
    from lm import config as config_lib
    from lm.models.transformer import dummy_inputs
    from lm.utils import count_params

    path, _, arg = spec.partition(":")
    run = config_lib.build(
        config_lib.resolve(config_lib.config_of(ROOT / "experiments" / path, arg or None))
    )
    model_cfg = run.model_config(run.data.vocab_size)
    shapes = jax.eval_shape(
        build_model(model_cfg).init, jax.random.PRNGKey(0), **dummy_inputs(model_cfg)
    )
    assert count_params(shapes["params"]) == params
