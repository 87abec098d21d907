"""Host memory of a streamed Hugging Face import (`lm.convert.hf.load_hf(lazy=True)` placed by
`lm.parallel.put_params`): a multi-GB Llama-shaped checkpoint in sharded safetensors, written
here, lands on 8 host devices (FSDP) with the process's peak RSS bounded by what the devices hold
plus the largest tensor and a fixed margin, not by several copies of the model.

By hand, beside the whole-model (eager) import for comparison:

    python -m tests.test_import_memory DIR [--eager]
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

# Llama-shaped (GQA, SwiGLU, untied head), 1.0B parameters: 2.0 GB of bfloat16 in the files,
# 4.1 GB of float32 on the devices.
CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 14,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 32768,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
MESH = (1, 8, 1)
MARGIN = 256 << 20  # jax's own buffers, safetensors' header parses, allocator slack


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    d, kv = c["hidden_size"], c["num_key_value_heads"] * c["head_dim"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,)}
    shapes["lm_head.weight"] = (c["vocab_size"], d)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,)}
        shapes |= {p + "self_attn.q_proj.weight": (c["num_attention_heads"] * c["head_dim"], d)}
        shapes |= {p + "self_attn.k_proj.weight": (kv, d), p + "self_attn.v_proj.weight": (kv, d)}
        shapes |= {p + "self_attn.o_proj.weight": (d, c["num_attention_heads"] * c["head_dim"])}
        for name in ("gate_proj", "up_proj"):
            shapes[p + f"mlp.{name}.weight"] = (c["intermediate_size"], d)
        shapes[p + "mlp.down_proj.weight"] = (d, c["intermediate_size"])
    return shapes


def random_bfloat16(shape, rng) -> np.ndarray:
    """Finite bfloat16 values of magnitude [2^-8, 2^-7), made from random bits (fast)."""
    bits = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    return ((bits & 0x807F) | 0x3B80).view(ml_dtypes.bfloat16)


def write_checkpoint(directory: pathlib.Path, shard_bytes: int = 1 << 29) -> None:
    """config.json, model-0000K-of-0000N.safetensors shards of about `shard_bytes`, the index."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(CONFIG))
    shapes, groups, size = tensor_shapes(CONFIG), [[]], 0
    for name, shape in shapes.items():
        if size > shard_bytes:
            groups, size = groups + [[]], 0
        groups[-1].append(name)
        size += math.prod(shape) * 2
    rng, weight_map = np.random.default_rng(0), {}
    for k, names in enumerate(groups):
        file = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: random_bfloat16(shapes[n], rng) for n in names}, str(directory / file))
        weight_map |= dict.fromkeys(names, file)
    index = {"metadata": {"total_size": sum(math.prod(s) * 2 for s in shapes.values())}}
    (directory / "model.safetensors.index.json").write_text(
        json.dumps(index | {"weight_map": weight_map})
    )


def memory_kib() -> dict[str, int]:
    with open("/proc/self/status") as f:
        rows = [line.split() for line in f if line.startswith(("VmRSS", "VmHWM"))]
    return {row[0].rstrip(":"): int(row[1]) for row in rows}


def measure(directory: str, lazy: bool = True) -> dict:
    """Imports `directory` onto 8 host devices (mesh MESH); the RSS it took and what it placed."""
    import flax.linen as nn
    import jax
    from lm import parallel
    from lm.convert import hf
    from lm.models.transformer import build_model, dummy_inputs

    config = hf.config_from_hf(json.loads((pathlib.Path(directory) / "config.json").read_text()))
    model, mesh = build_model(config), parallel.make_mesh(MESH)
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), **dummy_inputs(config))["params"])
    shardings = parallel.param_shardings(boxed, mesh)
    abstract = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
        nn.meta.unbox(boxed),
        shardings,
    )
    before = memory_kib()
    params = parallel.put_params(hf.load_hf(directory, lazy=lazy).params, abstract)
    jax.block_until_ready(params)
    after = memory_kib()
    stored = hf.open_tensors(directory)
    largest = max(t.shape for t in stored.values() if len(t.shape) == 2)
    # Spot checks of the values placed: a layer's query kernel ([d, heads, head_dim]) and
    # down projection ([mlp, d]) are the files' torch.nn.Linear weights, transposed.
    layers = params["decoder"]["layers"]["block_0"]
    query = np.asarray(layers["self_attention"]["query"]["kernel"][5])
    want = np.asarray(stored["model.layers.5.self_attn.q_proj.weight"]).astype(np.float32).T
    np.testing.assert_array_equal(query.reshape(want.shape), want)
    down = np.asarray(layers["mlp"]["wo"]["kernel"][13])
    want = np.asarray(stored["model.layers.13.mlp.down_proj.weight"]).astype(np.float32).T
    np.testing.assert_array_equal(down, want)
    return {
        "rss_before": before["VmRSS"] << 10,
        "peak": after["VmHWM"] << 10,
        "device_bytes": sum(x.nbytes for x in jax.tree.leaves(params)),
        "largest_float32_tensor": math.prod(largest) * 4,
        "file_bytes": sum(p.stat().st_size for p in pathlib.Path(directory).glob("*.safetensors")),
    }


def measure_in_subprocess(directory: pathlib.Path, lazy: bool = True) -> dict:
    root = pathlib.Path(__file__).resolve().parents[1]
    code = "import json; from tests.test_import_memory import measure; "
    code += f"print(json.dumps(measure({str(directory)!r}, lazy={lazy})))"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env["JAX_PLATFORMS"] = "cpu"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_streamed_import_peak_memory(tmp_path):
    write_checkpoint(tmp_path / "llama")
    m = measure_in_subprocess(tmp_path / "llama")
    assert m["file_bytes"] > 2e9 and m["device_bytes"] > 4e9
    # The bound: what the devices hold, one float32 copy of the largest tensor, the margin.
    extra = m["peak"] - m["rss_before"] - m["device_bytes"]
    assert extra <= m["largest_float32_tensor"] + MARGIN, m


if __name__ == "__main__":
    target = pathlib.Path(sys.argv[1])
    if not (target / "config.json").is_file():
        write_checkpoint(target)
    m = measure_in_subprocess(target, lazy="--eager" not in sys.argv)
    gib = {k: round(v / 2**30, 2) for k, v in m.items()}
    extra = (m["peak"] - m["rss_before"] - m["device_bytes"]) / 2**30
    print(json.dumps(gib | {"extra_gib": round(extra, 2)}))
