"""`decode`: greedy generation with our jit-compiled, KV-cached decoder against
`transformers`' `generate` on the same GGUF weights (dequantised to float32 by both)
and the same prompts. Compilation / warm-up runs are excluded on both sides; tokens/s
counts new tokens (batch x new_tokens) over the wall time of the whole call, prefill
included. The peer needs the `[reference]` extra (torch, transformers); without it
only our numbers are printed.
"""

from __future__ import annotations

import jax

from lm import decode
from lm.bench.common import timed
from lm.convert import PRETRAINED_ASSETS, load_pretrained
from lm.models.transformer import for_inference

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

        results[batch] = batch * new_tokens / timed(run, repeats)
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

        results[batch] = batch * new_tokens / timed(run, repeats)
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
