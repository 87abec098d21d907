"""Benchmarks that run a peer side by side, in the same process, and print ratios: one module a
benchmark (`decoding`, `peer` for `train`, `step`, `layers`, `mfu`, `moe`, `data`,
`evaluation`),
`common` for the shapes they share, `__main__` for the command line.

    python -m lm.bench decode --model smollm2 [--new_tokens 64] [--batches 1,8] [--precision fp32,bf16]
    python -m lm.bench layers [--depths 4,30] [--batch 4 --seq 512]
    python -m lm.bench step [--steps 10 --rounds 3]
    python -m lm.bench mfu --shape gpt2_124m --batch 16 --seq 1024 --precision bf16 [--profile DIR]
    python -m lm.bench losses [--precision bf16] | --compare RUN.json REFERENCE.json NOISE.json
    python -m lm.bench moe [--experts 8 --top_k 2 --capacity_factor 1.25]
    python -m lm.bench train [--shapes S,V,llama] [--precision fp32,bf16]
    python -m lm.bench eval [--model smollm2 --tasks arc_easy,piqa --limit 300 --num_fewshot 0]
    python -m lm.bench data --config experiments/shakespeare_gpt.py [--set data.source=...]

`eval`: the evaluation end to end, each side in a fresh process (`lm.bench.evaluation`, whose
`python -m lm.bench.evaluation` takes the same flags); the other subcommands run in this process.
`train`: our train step against two PyTorch peers of the same shapes, eager: a plain model in
nanoGPT's form (SDPA attention, fused AdamW) and transformers' GPT-2 / Llama with SDPA.

`layers`: the real train step (`lm.train.create_trainer`) at SmolLM2-135M's shape, compiled at
several depths with scanned and with unrolled layers (compile seconds and their ratio), and
its temporary memory (`compiled.memory_analysis()`) under each `model.remat` policy.
`step`: train-step tokens/s on the main job's shape (experiments/shakespeare_gpt.py) for
the model as it was (unrolled layers, the reference attention core) and as it is now
(scanned layers, fused attention), and in bf16, interleaved in one process; medians.
`mfu`: one shape's train-step tokens/s and MFU (6N + 12 L d T FLOPs per token against the
device's peak, `lm.train.peak_flops_per_device`), then greedy decoding with those weights;
with `--profile`, each kernel's time in 3 traced steps (`lm.train.profile.kernel_breakdown`).
`losses`: 20 train steps on one fixed batch, seed 0, as JSON; `--compare` checks one platform's
against another's within the precision's own rounding noise (the GPU check against the CPU's
goldens in tests/goldens/losses).
`moe`: the main job's step with a mixture of experts under each `model.moe_dispatch` beside
the dense model of equal active parameters: step time and compiled FLOPs, as ratios.

`decode`: greedy generation with our jit-compiled, KV-cached decoder against
`transformers`' `generate` on the same GGUF weights (dequantised to float32 by both)
and the same prompts. Compilation / warm-up runs are excluded on both sides; tokens/s
counts new tokens (batch x new_tokens) over the wall time of the whole call, prefill
included. The peer needs the `[reference]` extra (torch, transformers); without it
only our numbers are printed.
"""
