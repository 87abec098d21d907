"""Benchmarks that run a peer side by side, in the same process, and print ratios.

    python -m lm.bench decode --model smollm2 [--new_tokens 64] [--batches 1,8] [--precision fp32,bf16]
    python -m lm.bench layers [--depths 4,30] [--batch 4 --seq 512]
    python -m lm.bench step [--steps 10 --rounds 3]
    python -m lm.bench mfu --shape gpt2_124m --batch 16 --seq 1024 --precision bf16
    python -m lm.bench train [--shapes S,V,llama] [--precision fp32,bf16]
    python -m lm.bench eval [--model smollm2 --tasks arc_easy,piqa --limit 300 --num_fewshot 0]
    python -m lm.bench data --config experiments/shakespeare_gpt.py [--set data.source=...]

`eval`: the evaluation end to end, each side in a fresh process (`lm.evalbench`, whose
`python -m lm.evalbench` takes the same flags); the other subcommands run in this process.
`train`: our train step against transformers' GPT-2 / Llama in PyTorch, eager, same shapes.

`layers`: the real train step (`lm.train.create_trainer`) at SmolLM2-135M's shape, compiled at
several depths with scanned and with unrolled layers (compile seconds and their ratio), and
its temporary memory (`compiled.memory_analysis()`) under each `model.remat` policy.
`step`: train-step tokens/s on the main job's shape (experiments/shakespeare_gpt.py) for
the model as it was (unrolled layers, the reference attention core) and as it is now
(scanned layers, fused attention), and in bf16, interleaved in one process; medians.
`mfu`: one shape's train-step tokens/s and MFU (6N + 12 L d T FLOPs per token against the
device's peak, `lm.train.peak_flops_per_device`), then greedy decoding with those weights.

`decode`: greedy generation with our jit-compiled, KV-cached decoder against
`transformers`' `generate` on the same GGUF weights (dequantised to float32 by both)
and the same prompts. Compilation / warm-up runs are excluded on both sides; tokens/s
counts new tokens (batch x new_tokens) over the wall time of the whole call, prefill
included. The peer needs the `[reference]` extra (torch, transformers); without it
only our numbers are printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from lm import databench, decode, evalbench, parallel
from lm.convert import PRETRAINED_ASSETS, load_pretrained
from lm.models.attention import IMPLEMENTATIONS, resolve_implementation
from lm.models.transformer import ModelConfig, build_model, for_inference, preset
from lm.train import OptimizerConfig, create_trainer, learning_rate_schedule, matmul_peak

PROMPTS = [
    "The history of the old harbour town begins with",
    "In a small village at the edge of the forest, there lived",
    "def quicksort(items):",
    "The three most important ideas in physics are",
    "Once upon a time",
    "The recipe calls for two cups of flour and",
    "Dear friends, thank you all for coming tonight. I want to",
    "The train left the station at noon, and by evening",
]


def _timed(fn, repeats: int) -> float:
    """Median wall seconds of `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ours(
    spec: str, batches: list[int], new_tokens: int, repeats: int, precision: str = "fp32"
) -> dict[int, float]:
    """Our tokens/s per batch size."""
    pretrained = load_pretrained(spec)
    model, params = for_inference(
        pretrained.config, pretrained.params, precision, unroll_layers=True
    )
    params = jax.device_put(params)
    tok = pretrained.tokenizer
    prefix = [tok.bos_id] if tok.add_bos else []
    results = {}
    for batch in batches:
        prompts = [prefix + tok.encode(PROMPTS[i % len(PROMPTS)]) for i in range(batch)]

        def run(prompts=prompts):
            out = decode.generate(model, params, prompts, max_new_tokens=new_tokens)
            assert all(len(o) == new_tokens for o in out)

        results[batch] = batch * new_tokens / _timed(run, repeats)
    return results


def transformers_peer(
    spec: str, batches: list[int], new_tokens: int, repeats: int
) -> dict[int, float] | None:
    """transformers' tokens/s per batch size on the same GGUF file, or None if unavailable."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    import pathlib

    from lm.data.assets import fetch

    path = pathlib.Path(
        fetch(PRETRAINED_ASSETS[spec]) if spec in PRETRAINED_ASSETS else spec.removeprefix("gguf:")
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    results = {}
    for batch in batches:
        inputs = tokenizer(
            [PROMPTS[i % len(PROMPTS)] for i in range(batch)], return_tensors="pt", padding=True
        )

        def run(inputs=inputs):
            with torch.inference_mode():
                out = model.generate(
                    **inputs,
                    do_sample=False,
                    max_new_tokens=new_tokens,
                    min_new_tokens=new_tokens,
                    pad_token_id=tokenizer.pad_token_id,
                )
            assert out.shape[1] - inputs["input_ids"].shape[1] == new_tokens

        results[batch] = batch * new_tokens / _timed(run, repeats)
    return results


def decode_benchmark(
    spec: str,
    batches: list[int],
    new_tokens: int,
    repeats: int,
    precisions: tuple[str, ...] = ("fp32",),
) -> str:
    """Runs both sides and returns the printed table: one column per precision of ours (the
    peer runs float32); ratios against the peer."""
    mine = {p: ours(spec, batches, new_tokens, repeats, p) for p in precisions}
    peer = transformers_peer(spec, batches, new_tokens, repeats)
    lines = [
        f"decode {spec}: greedy, {new_tokens} new tokens, "
        f"{jax.devices()[0].platform} ({jax.device_count()} device(s)); tokens/s",
        f"{'batch':>5} "
        + " ".join(f"{'lm ' + p:>10}" for p in precisions)
        + f" {'transformers fp32':>18} "
        + " ".join(f"{'ratio ' + p:>10}" for p in precisions),
    ]
    for batch in batches:
        row = f"{batch:>5} " + " ".join(f"{mine[p][batch]:>10.1f}" for p in precisions)
        if peer is None:
            row += f" {'(not installed)':>18} " + " ".join(f"{'-':>10}" for _ in precisions)
        else:
            row += f" {peer[batch]:>18.1f} " + " ".join(
                f"{mine[p][batch] / peer[batch]:>9.2f}x" for p in precisions
            )
        lines.append(row)
    return "\n".join(lines)


# ------------------------------------------------------------------------------ train step

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


def _trainer(config: ModelConfig):
    return create_trainer(
        config,
        build_model(config),
        OptimizerConfig(),
        1000,
        parallel.ParallelConfig(),
        devices=jax.devices()[:1],
    )


def _abstract_batch(trainer, batch: int, length: int) -> dict:
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
    trainer = _trainer(config)
    start = time.perf_counter()
    compiled = trainer.train_step.lower(
        trainer.abstract_state, _abstract_batch(trainer, batch, length)
    ).compile()
    return time.perf_counter() - start, compiled


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
        trainer = _trainer(dataclasses.replace(MAIN_JOB_SHAPE, **changes))
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
    trainer = _trainer(config)
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

        seconds = _timed(run, 2)
        lines.append(
            f"decode ({precision} weights) batch {decode_batch}: "
            f"{decode_batch * new_tokens / seconds:,.1f} tokens/s "
            f"({new_tokens} new tokens after 16, greedy)"
        )
    return "\n".join(lines)


# ------------------------------------------------------------------- train step vs PyTorch

# (model config, batch, length): the shapes of issue 18. S is nanoGPT's Shakespeare-character
# model (dropout 0.2 on embeddings, residuals and attention weights), V a small model with a
# GPT-2-sized vocabulary (the cross-entropy over 50,304 logits dominates), llama a small
# grouped-query Llama (RoPE, SwiGLU, RMSNorm, no biases).
PEER_SHAPES = {
    "S": (
        preset(
            "gpt2",
            d_model=384,
            num_layers=6,
            num_heads=6,
            mlp_dim=1536,
            vocab_size=65,
            max_len=256,
            dropout=0.2,
            attention_dropout=0.2,
        ),
        12,
        256,
    ),
    "V": (
        preset(
            "gpt2",
            d_model=256,
            num_layers=4,
            num_heads=4,
            mlp_dim=1024,
            vocab_size=50_304,
            max_len=128,
        ),
        8,
        128,
    ),
    "llama": (
        preset(
            "llama",
            d_model=384,
            num_layers=6,
            num_heads=6,
            num_kv_heads=2,
            mlp_dim=1024,
            vocab_size=8192,
            max_len=256,
        ),
        8,
        256,
    ),
}


def torch_peer_model(config: ModelConfig):
    """transformers' model of the same architecture as `config` (its Hugging Face config from
    `lm.convert.hf.config_to_hf`: GPT2LMHeadModel for the GPT-2 family, LlamaForCausalLM for
    the Llama family), float32, randomly initialised, in training mode."""
    import torch
    import transformers

    from lm.convert.hf import config_to_hf

    hf = config_to_hf(config)
    hf_config = transformers.AutoConfig.for_model(hf.pop("model_type"), **hf)
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    return model.to(torch.float32).train()


def torch_matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    """PyTorch's measured float32 FLOP/s of one square matrix product (median after warm-up)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / _timed(lambda: torch.matmul(a, b), repeats)


class _OurSide:
    """Our train step as `lm.main` builds it (create_trainer's jitted step, one device)."""

    def __init__(self, config: ModelConfig, host_batch: dict):
        self.trainer = _trainer(config)
        self.state = self.trainer.init_fn(0)
        self.batch = self.trainer.put_batch(host_batch)
        self.losses: list[float] = []

    def step(self) -> None:
        self.state, metrics = self.trainer.train_step(self.state, self.batch)
        self.losses.append(float(metrics["loss"]))  # a sync, as a training loop logging loss


class _TorchSide:
    """The peer's eager step: forward, mean cross-entropy over the same targets, backward,
    global-norm clipping and AdamW with our optimizer's hyperparameters."""

    def __init__(self, config: ModelConfig, host_batch: dict, opt: OptimizerConfig):
        import torch

        torch.manual_seed(0)
        self.torch, self.clip = torch, opt.clip_norm
        self.model = torch_peer_model(config)
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=opt.learning_rate,
            betas=(opt.b1, opt.b2),
            eps=opt.eps,
            weight_decay=opt.weight_decay,
        )
        # Our learning-rate schedule (warmup, cosine), step by step, so both sides' losses
        # follow the same curve.
        schedule = learning_rate_schedule(opt, 1000)
        self.learning_rates = [float(x) for x in jax.vmap(schedule)(jnp.arange(1000))]
        self.inputs = torch.from_numpy(host_batch["inputs"]).long()
        self.targets = torch.from_numpy(host_batch["targets"]).long()
        self.losses: list[float] = []

    def step(self) -> None:
        torch = self.torch
        logits = self.model(input_ids=self.inputs).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), self.targets.reshape(-1)
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rates[len(self.losses)]
        self.optimizer.step()
        self.losses.append(float(loss.detach()))


def train_benchmark(shapes: list[str], steps: int, rounds: int, precisions: list[str]) -> str:
    """Train-step tokens/s of ours (each precision) against the PyTorch peer (float32), per
    shape, rounds interleaved in one process; MFU against matmul peaks measured here."""
    from lm.train import flops_per_token

    try:
        import torch
    except ImportError:
        torch = None
    jax_peak = matmul_peak(jnp.float32, 2048)
    torch_peak = torch_matmul_peak() if torch is not None else float("nan")
    device = jax.devices()[0]
    lines = [
        f"train step vs PyTorch eager ({'torch ' + torch.__version__ if torch else 'torch not installed'},"
        f" {torch.get_num_threads() if torch else '-'} threads); lm on {device.platform} "
        f"{device.device_kind}; {rounds} rounds x {steps} steps, interleaved; float32 matmul peak "
        f"measured at 2048^3: jax {jax_peak / 1e9:.0f} GFLOP/s, torch {torch_peak / 1e9:.0f} GFLOP/s",
        f"{'shape':<6} {'side':<13} {'ms/step median (min, max)':>27} {'tokens/s':>9} "
        f"{'lm/peer':>8} {'first step s':>12} {'MFU':>6} {'loss first, last':>17}",
    ]
    for shape in shapes:
        base, batch, length = PEER_SHAPES[shape]
        host_batch = random_batch(base.vocab_size, batch, length)
        sides = {}
        for precision in precisions:
            config = dataclasses.replace(base, precision=precision)
            start = time.perf_counter()
            side = _OurSide(config, host_batch)
            side.step()
            sides[f"lm {precision}"] = (side, time.perf_counter() - start, config, jax_peak)
        if torch is not None:
            start = time.perf_counter()
            side = _TorchSide(base, host_batch, OptimizerConfig())
            side.step()
            sides["torch fp32"] = (side, time.perf_counter() - start, base, torch_peak)
        times = {name: [] for name in sides}
        for _ in range(rounds):
            for name, (side, *_rest) in sides.items():
                for _ in range(steps):
                    start = time.perf_counter()
                    side.step()
                    times[name].append(time.perf_counter() - start)
        peer = statistics.median(times["torch fp32"]) if torch is not None else None
        num_params = next(iter(sides.values()))[0].trainer.num_params
        for name, (side, first, config, peak) in sides.items():
            median = statistics.median(times[name])
            tokens_per_s = batch * length / median
            mfu = tokens_per_s * flops_per_token(config, num_params, length) / peak
            ratio = f"{peer / median:>7.2f}x" if peer else f"{'-':>8}"
            lines.append(
                f"{shape:<6} {name:<13} {1e3 * median:>10.1f} ({1e3 * min(times[name]):.1f}, "
                f"{1e3 * max(times[name]):.1f}) {tokens_per_s:>9,.0f} {ratio} {first:>12.1f} "
                f"{100 * mfu:>5.1f}% {side.losses[0]:>8.3f} {side.losses[-1]:>8.3f}"
            )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m lm.bench``: one subcommand per benchmark."""
    parser = argparse.ArgumentParser(
        prog="python -m lm.bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    dec = sub.add_parser("decode", help="greedy decoding tokens/s against transformers.generate")
    dec.add_argument("--model", default="smollm2", help="smollm2, gemma3 or gguf:PATH")
    dec.add_argument("--new_tokens", type=int, default=64)
    dec.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    dec.add_argument("--repeats", type=int, default=3)
    dec.add_argument("--precision", default="fp32", help="ours, comma-separated: fp32, bf16")
    lay = sub.add_parser(
        "layers", help="train-step compile time against depth, memory against remat"
    )
    lay.add_argument("--depths", default="4,30", help="comma-separated numbers of layers")
    lay.add_argument("--batch", type=int, default=4)
    lay.add_argument("--seq", type=int, default=512)
    lay.add_argument("--remat_depth", type=int, default=30)
    step = sub.add_parser("step", help="train-step tokens/s on the main job shape, before and now")
    step.add_argument("--steps", type=int, default=10)
    step.add_argument("--rounds", type=int, default=3)
    train = sub.add_parser(
        "train", help="train-step tokens/s against a PyTorch (transformers) peer"
    )
    train.add_argument(
        "--shapes", default="S,V,llama", help=f"comma-separated: {', '.join(PEER_SHAPES)}"
    )
    train.add_argument("--steps", type=int, default=5, help="steps per side per round")
    train.add_argument("--rounds", type=int, default=4)
    train.add_argument("--precision", default="fp32", help="ours, comma-separated: fp32, bf16")
    evaluation = sub.add_parser(
        "eval",
        help="evaluation end to end (fresh processes) against lm-eval + transformers",
        description=evalbench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evalbench.add_eval_arguments(evaluation)
    mfu = sub.add_parser(
        "mfu", help="train-step tokens/s and MFU of a model shape, decode tokens/s"
    )
    mfu.add_argument("--shape", default="gpt2_124m", choices=sorted(SHAPES))
    mfu.add_argument("--batch", type=int, default=16)
    mfu.add_argument("--seq", type=int, default=1024)
    mfu.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    mfu.add_argument(
        "--remat",
        default="dots_saveable",
        choices=["none", "dots_saveable", "full"],
        help="model.remat (default: the model default)",
    )
    mfu.add_argument("--steps", type=int, default=20)
    mfu.add_argument("--decode_batches", default="1,64", help="comma-separated; empty: no decoding")
    mfu.add_argument("--new_tokens", type=int, default=64)
    mfu.add_argument(
        "--attention", default="auto", choices=list(IMPLEMENTATIONS), help="model.attention_impl"
    )
    data = sub.add_parser(
        "data",
        help="input-pipeline tokens/s (text by worker count, the cache) beside the train step's",
        description=databench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    data.add_argument("--config", default="experiments/shakespeare_gpt.py", help="FILE[:arg]")
    data.add_argument("--set", action="append", default=[], help="SECTION.KEY=VALUE (repeatable)")
    data.add_argument("--workers", default="0,2", help="comma-separated data.worker_count values")
    data.add_argument(
        "--tokens",
        type=int,
        default=1 << 22,
        help="tokens timed per pipeline (rows are packed ~256k tokens at a time: time many)",
    )
    data.add_argument("--steps", type=int, default=3, help="train steps timed")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    np.set_printoptions(precision=3)
    if args.command == "data":
        workers = [int(w) for w in args.workers.split(",") if w]
        print(databench.data_benchmark(args.config, args.set, workers, args.tokens, args.steps))
        return
    if args.command == "decode":
        batches = [int(b) for b in args.batches.split(",") if b]
        precisions = tuple(p for p in args.precision.split(",") if p)
        print(
            decode_benchmark(args.model, batches, args.new_tokens, args.repeats, precisions),
            flush=True,
        )
    elif args.command == "layers":
        depths = [int(d) for d in args.depths.split(",") if d]
        print(layers_benchmark(depths, args.batch, args.seq, args.remat_depth), flush=True)
    elif args.command == "train":
        print(
            train_benchmark(
                [s for s in args.shapes.split(",") if s],
                args.steps,
                args.rounds,
                [p for p in args.precision.split(",") if p],
            ),
            flush=True,
        )
    elif args.command == "eval":
        print(evalbench.run_from_arguments(args), flush=True)
    elif args.command == "step":
        print(step_benchmark(args.steps, args.rounds), flush=True)
    else:
        decode_batches = [int(b) for b in args.decode_batches.split(",") if b]
        print(
            mfu_benchmark(
                args.shape,
                args.batch,
                args.seq,
                args.precision,
                args.steps,
                args.remat,
                decode_batches,
                args.new_tokens,
                args.attention,
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
