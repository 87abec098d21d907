"""Benchmarks that run a peer side by side, in the same process, and print ratios.

    python -m lm.bench decode --model smollm2 [--new_tokens 64] [--batches 1,8]

`decode`: greedy generation with our jit-compiled, KV-cached decoder against
`transformers`' `generate` on the same GGUF weights (dequantised to float32 by both)
and the same prompts. Compilation / warm-up runs are excluded on both sides; tokens/s
counts new tokens (batch x new_tokens) over the wall time of the whole call, prefill
included. The peer needs the `[reference]` extra (torch, transformers); without it
only our numbers are printed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from lm import decode
from lm.convert import PRETRAINED_ASSETS, load_pretrained
from lm.models.transformer import build_model

PROMPTS = [
    'The history of the old harbour town begins with',
    'In a small village at the edge of the forest, there lived',
    'def quicksort(items):',
    'The three most important ideas in physics are',
    'Once upon a time',
    'The recipe calls for two cups of flour and',
    'Dear friends, thank you all for coming tonight. I want to',
    'The train left the station at noon, and by evening',
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


def ours(spec: str, batches: list[int], new_tokens: int, repeats: int) -> dict[int, float]:
    """Our tokens/s per batch size."""
    pretrained = load_pretrained(spec)
    model, params = build_model(pretrained.config), jax.device_put(pretrained.params)
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


def transformers_peer(spec: str, batches: list[int], new_tokens: int,
                      repeats: int) -> dict[int, float] | None:
    """transformers' tokens/s per batch size on the same GGUF file, or None if unavailable."""
    try:
        import torch
        import transformers
    except ImportError:
        return None
    import pathlib

    from lm.data.assets import fetch

    path = pathlib.Path(fetch(PRETRAINED_ASSETS[spec]) if spec in PRETRAINED_ASSETS
                        else spec.removeprefix('gguf:'))
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer.padding_side = 'left'
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    results = {}
    for batch in batches:
        inputs = tokenizer([PROMPTS[i % len(PROMPTS)] for i in range(batch)], return_tensors='pt',
                           padding=True)

        def run(inputs=inputs):
            with torch.inference_mode():
                out = model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id)
            assert out.shape[1] - inputs['input_ids'].shape[1] == new_tokens

        results[batch] = batch * new_tokens / _timed(run, repeats)
    return results


def decode_benchmark(spec: str, batches: list[int], new_tokens: int, repeats: int) -> str:
    """Runs both sides and returns the printed table."""
    mine = ours(spec, batches, new_tokens, repeats)
    peer = transformers_peer(spec, batches, new_tokens, repeats)
    lines = [f'decode {spec}: greedy, {new_tokens} new tokens, float32, '
             f'{jax.devices()[0].platform} ({jax.device_count()} device(s))',
             f'{"batch":>5} {"lm tok/s":>10} {"transformers tok/s":>19} {"ratio":>6}']
    for batch in batches:
        if peer is None:
            lines.append(f'{batch:>5} {mine[batch]:>10.1f} {"(not installed)":>19} {"-":>6}')
        else:
            lines.append(f'{batch:>5} {mine[batch]:>10.1f} {peer[batch]:>19.1f} '
                         f'{mine[batch] / peer[batch]:>5.2f}x')
    return '\n'.join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog='python -m lm.bench', description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest='command', required=True)
    dec = sub.add_parser('decode', help='greedy decoding tokens/s against transformers.generate')
    dec.add_argument('--model', default='smollm2', help='smollm2, gemma3 or gguf:PATH')
    dec.add_argument('--new_tokens', type=int, default=64)
    dec.add_argument('--batches', default='1,8', help='comma-separated batch sizes')
    dec.add_argument('--repeats', type=int, default=3)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(',') if b]
    np.set_printoptions(precision=3)
    print(decode_benchmark(args.model, batches, args.new_tokens, args.repeats), flush=True)


if __name__ == '__main__':
    main()
