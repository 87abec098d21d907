"""`train`: our train step against the PyTorch peers of `lm.bench.torch_peer` (nanoGPT's form,
transformers with SDPA attention), eager, same shapes."""

from __future__ import annotations

import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp

from lm.bench.common import one_device_trainer, random_batch, timed
from lm.bench.torch_peer import TORCH_PEERS
from lm.models.transformer import ModelConfig, preset
from lm.train import OptimizerConfig, learning_rate_schedule, matmul_peak

# (model config, batch, length): the shapes of issue 18. S is nanoGPT's Shakespeare-character
# model (dropout 0.2 on embeddings, residuals and attention weights; with GPT-2's biases,
# which transformers' GPT-2 cannot leave out), V a small model with a GPT-2-sized vocabulary
# (the cross-entropy over 50,304 logits dominates), llama a small grouped-query Llama (RoPE,
# SwiGLU, RMSNorm, no biases).
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


def torch_matmul_peak(size: int = 2048, repeats: int = 10) -> float:
    """PyTorch's measured float32 FLOP/s of one square matrix product (median after warm-up)."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    return 2 * size**3 / timed(lambda: torch.matmul(a, b), repeats)


class _OurSide:
    """Our train step as `lm.main` builds it (create_trainer's jitted step, one device)."""

    def __init__(self, config: ModelConfig, host_batch: dict):
        self.trainer = one_device_trainer(config)
        self.state = self.trainer.init_fn(0)
        self.batch = self.trainer.put_batch(host_batch)
        self.losses: list[float] = []

    def step(self) -> None:
        self.state, metrics = self.trainer.train_step(self.state, self.batch)
        self.losses.append(float(metrics["loss"]))  # a sync, as a training loop logging loss


class _TorchSide:
    """A PyTorch peer's eager step (`lm.bench.torch_peer`: 'plain', nanoGPT's form, or
    'transformers' with SDPA attention): forward, mean cross-entropy over the same targets,
    backward, global-norm clipping and fused AdamW with our optimizer's hyperparameters."""

    def __init__(self, config: ModelConfig, host_batch: dict, opt: OptimizerConfig, form: str):
        import torch

        from lm.bench import torch_peer

        torch.manual_seed(0)
        self.torch, self.clip, self.form = torch, opt.clip_norm, form
        if form == "plain":
            self.model = torch_peer.plain_model(config)
        else:
            self.model = torch_peer.transformers_model(config)
        self.optimizer = torch_peer.make_optimizer(self.model, opt)
        # Our learning-rate schedule (warmup, cosine), step by step, so both sides' losses
        # follow the same curve.
        schedule = learning_rate_schedule(opt, 1000)
        self.learning_rates = [float(x) for x in jax.vmap(schedule)(jnp.arange(1000))]
        self.inputs = torch.from_numpy(host_batch["inputs"]).long()
        self.targets = torch.from_numpy(host_batch["targets"]).long()
        self.losses: list[float] = []

    def step(self) -> None:
        torch = self.torch
        if self.form == "plain":
            logits = self.model(self.inputs)
        else:
            logits = self.model(input_ids=self.inputs).logits
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), self.targets.reshape(-1)
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip, foreach=True)
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rates[len(self.losses)]
        self.optimizer.step()
        self.losses.append(float(loss.detach()))


def train_benchmark(
    shapes: list[str], steps: int, rounds: int, precisions: list[str], peers=TORCH_PEERS
) -> str:
    """Train-step tokens/s of ours (each precision) against each PyTorch peer (float32), per
    shape, rounds interleaved in one process; lm/peer is against the faster peer of the shape.
    MFU is against the matmul peaks measured here."""
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
        "torch plain: nanoGPT's form (SDPA attention, fused AdamW); torch hf: transformers, sdpa",
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
        for form in peers if torch is not None else ():
            start = time.perf_counter()
            side = _TorchSide(base, host_batch, OptimizerConfig(), form)
            side.step()
            name = "torch " + ("hf" if form == "transformers" else form)
            sides[name] = (side, time.perf_counter() - start, base, torch_peak)
        times = {name: [] for name in sides}
        for _ in range(rounds):
            for name, (side, *_rest) in sides.items():
                for _ in range(steps):
                    start = time.perf_counter()
                    side.step()
                    times[name].append(time.perf_counter() - start)
        peer_times = [statistics.median(times[n]) for n in sides if n.startswith("torch")]
        peer = min(peer_times) if peer_times else None
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
