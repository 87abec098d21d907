"""The benchmark commands' building blocks (the benchmarks themselves print ratios; no timings
are asserted here)."""

import dataclasses
import pathlib
import re

import numpy as np
import pytest
from launch.sweep import load_experiment
from lm import config
from lm.bench import common, peer
from lm.models import transformer as T


def test_main_job_shape_is_the_experiments():
    module, _ = load_experiment("experiments/shakespeare_gpt.py")
    values = config.resolve(module.get_config())
    model = {**values["model"], "vocab_size": values["data"]["vocab_size"]}
    assert T.ModelConfig.from_dict(model) == common.MAIN_JOB_SHAPE
    assert common.MAIN_JOB_BATCH == (values["data"]["batch_size"], values["data"]["seq_len"])


@pytest.mark.slow
def test_remat_shrinks_the_train_steps_temporary_memory():
    """What `python -m lm.bench layers` measures, at a small shape: saving nothing inside a layer
    ('full') needs less scratch memory than saving everything ('none')."""
    small = T.preset(
        "llama",
        d_model=64,
        num_layers=6,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=256,
        vocab_size=128,
        max_len=128,
    )
    memory = {
        remat: common.compile_step(dataclasses.replace(small, remat=remat), 4, 128)[1]
        .memory_analysis()
        .temp_size_in_bytes
        for remat in ("none", "dots_saveable", "full")
    }
    assert memory["full"] < memory["dots_saveable"] < memory["none"], memory


def test_peer_shapes_are_the_issues():
    """S is nanoGPT's Shakespeare-character model, V the small model with GPT-2's padded
    vocabulary, llama a grouped-query Llama."""
    s, batch, length = peer.PEER_SHAPES["S"]
    assert (s.num_layers, s.d_model, s.num_heads, s.vocab_size, batch, length) == (
        6,
        384,
        6,
        65,
        12,
        256,
    )
    assert s.dropout == s.attention_dropout == 0.2
    v, batch, length = peer.PEER_SHAPES["V"]
    assert (v.num_layers, v.d_model, v.vocab_size, batch, length) == (4, 256, 50_304, 8, 128)
    llama = peer.PEER_SHAPES["llama"][0]
    assert llama.kv_heads < llama.num_heads and llama.mlp_gated and llama.position == "rotary"


def test_our_side_of_the_train_benchmark_learns():
    """The benchmark's side is the real train step: on a repeated batch its loss falls from
    about ln(vocab)."""
    import math

    config = T.preset("llama", **T.TINY, num_kv_heads=2)
    side = peer._OurSide(config, common.random_batch(config.vocab_size, 4, 32))
    for _ in range(60):  # inside the 100-step warmup: a small learning rate
        side.step()
    assert abs(side.losses[0] - math.log(config.vocab_size)) < 0.3
    assert side.losses[-1] < side.losses[0] - 0.3  # measured: 4.58 -> 4.04


def test_peer_shapes_have_a_transformers_layout():
    """The PyTorch peer is built from `config_to_hf` of the same config (no torch needed
    here): the GPT-2 shapes map to GPT2LMHeadModel with our dropouts, llama to
    LlamaForCausalLM with grouped-query heads."""
    from lm.convert.hf import config_to_hf

    s = config_to_hf(peer.PEER_SHAPES["S"][0])
    assert s["architectures"] == ["GPT2LMHeadModel"]
    assert s["attn_pdrop"] == s["resid_pdrop"] == s["embd_pdrop"] == 0.2
    llama = config_to_hf(peer.PEER_SHAPES["llama"][0])
    assert llama["architectures"] == ["LlamaForCausalLM"]
    assert (llama["num_attention_heads"], llama["num_key_value_heads"]) == (6, 2)


@pytest.mark.slow
def test_moe_benchmark_compares_the_dispatches_flops():
    """What `python -m lm.bench moe` measures, at a small shape (unrolled layers: one compile
    a variant): dropless dispatch costs about the compiled FLOPs of the dense model of equal
    active parameters, capacity 1.25 a little more, dense dispatch all 8 experts'."""
    from lm.bench import moe
    from lm.bench.__main__ import build_parser

    args = build_parser().parse_args(["moe", "--steps", "1", "--rounds", "1"])
    assert (args.command, args.batch, args.seq, args.experts, args.top_k) == (
        "moe",
        16,
        256,
        8,
        2,
    )
    base = T.preset(
        "gpt2",
        d_model=64,
        num_layers=2,
        num_heads=4,
        mlp_dim=256,
        vocab_size=256,
        max_len=64,
        dropout=0.0,
        scan_layers=False,
    )
    runs = moe.moe_runs(1, 1, base, 4, 64)
    assert list(runs) == [moe.DENSE, "dropless (blocks)", "capacity 1.25", "dense dispatch"]
    dense = runs[moe.DENSE]
    for name, run in runs.items():
        assert len(run["times"]) == 1 and run["times"][0] > 0
        assert run["active"] == pytest.approx(dense["active"], rel=0.02)  # router + biases
        assert (run["dropped"] is not None) == (name == "capacity 1.25")
    assert 0 <= runs["capacity 1.25"]["dropped"] < 1
    ratio = {name: run["flops"] / dense["flops"] for name, run in runs.items()}
    # Measured: dropless 1.10x (blocks padded), capacity 1.15x, dense dispatch 2.42x.
    assert 1 < ratio["dropless (blocks)"] < 1.2
    assert ratio["dropless (blocks)"] < ratio["capacity 1.25"] < 1.3
    assert ratio["dense dispatch"] > 2
    table = moe.moe_table(runs, 4, 64, 1, 1).splitlines()
    assert len(table) == 2 + len(runs)
    assert all(line.startswith(name) for line, name in zip(table[2:], runs, strict=True))


@pytest.mark.slow
def test_mfu_benchmark_prints_the_step_and_its_kernel_breakdown(tmp_path, capsys):
    from lm.bench.__main__ import main

    args = "--shape gpt2_124m --batch 1 --seq 32 --precision fp32 --steps 1 --decode_batches 1"
    main(["mfu", *args.split(), "--new_tokens", "2", "--profile", str(tmp_path), "--top", "3"])
    out = capsys.readouterr().out
    assert "gpt2_124m: 124.5M parameters" in out and "attention auto (xla)" in out
    assert "kernels on /host:CPU, per step of" in out and "device busy" in out
    rows = [
        line for line in out.splitlines() if re.match(r"\s+[\d.]+\s+[\d.]+%\s+[\d.]+\s+\S", line)
    ]
    assert len(rows) == 4 and "the other" in rows[-1]  # --top 3, then the rest in one row
    assert "decode (fp32 weights) batch 1:" in out


LOSS_GOLDENS = pathlib.Path(__file__).parent / "goldens" / "losses"


@pytest.mark.slow
def test_the_cpu_loss_goldens_are_what_the_code_computes():
    """The GPU check compares its losses with these files: they must still be this code's."""
    from lm.bench.mfu import read_losses, step_losses

    golden = read_losses(LOSS_GOLDENS / "gpt2_124m_cpu_fp32.json")
    got = step_losses("gpt2_124m", 4, 256, "fp32", 4, "auto")
    assert got["attention"] == golden["attention"] == "xla"
    # Measured between this machine's runs: equal; between CPUs, float32 reduction order.
    np.testing.assert_allclose(got["losses"], golden["losses"][:4], rtol=1e-5)
    assert golden["losses"][-1] < 0.5 * golden["losses"][0]  # 20 steps on one batch learn it


def test_loss_comparison_bounds_each_step_by_the_precisions_own_noise():
    from lm.bench.mfu import compare_losses, read_losses

    bf16 = read_losses(LOSS_GOLDENS / "gpt2_124m_cpu_bf16.json")
    fp32 = read_losses(LOSS_GOLDENS / "gpt2_124m_cpu_fp32.json")
    close = {
        **bf16,
        "platform": "gpu",
        "losses": [
            x + 0.9 * abs(x - y) for x, y in zip(bf16["losses"], fp32["losses"], strict=True)
        ],
    }
    table, agreed = compare_losses(close, bf16, fp32)
    assert agreed and table.endswith("agree: xla attention on gpu")
    off = {**close, "losses": [*close["losses"][:-1], close["losses"][-1] + 0.1]}
    table, agreed = compare_losses(off, bf16, fp32)
    assert not agreed and "DIFFER" in table
