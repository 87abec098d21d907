"""`python -m lm.bench SUBCOMMAND`: the command line of every benchmark (see `lm.bench`)."""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

from lm.bench import data as databench
from lm.bench import evaluation as evalbench
from lm.bench.decoding import decode_benchmark
from lm.bench.layers import layers_benchmark
from lm.bench.mfu import SHAPES, compare_losses, mfu_benchmark, read_losses, step_losses
from lm.bench.moe import moe_benchmark
from lm.bench.peer import PEER_SHAPES, train_benchmark
from lm.bench.step import step_benchmark
from lm.bench.torch_peer import TORCH_PEERS
from lm.models.attention import IMPLEMENTATIONS


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
    moe = sub.add_parser(
        "moe",
        help="MoE train step (dropless, capacity, dense dispatch) against the dense model",
    )
    moe.add_argument("--steps", type=int, default=5, help="steps per variant per round")
    moe.add_argument("--rounds", type=int, default=3)
    moe.add_argument("--batch", type=int, default=16)
    moe.add_argument("--seq", type=int, default=256)
    moe.add_argument("--experts", type=int, default=8)
    moe.add_argument("--top_k", type=int, default=2, help="experts per token")
    moe.add_argument("--capacity_factor", type=float, default=1.25)
    train = sub.add_parser(
        "train", help="train-step tokens/s against PyTorch peers (nanoGPT form, transformers)"
    )
    train.add_argument(
        "--shapes", default="S,V,llama", help=f"comma-separated: {', '.join(PEER_SHAPES)}"
    )
    train.add_argument("--steps", type=int, default=5, help="steps per side per round")
    train.add_argument("--rounds", type=int, default=4)
    train.add_argument("--precision", default="fp32", help="ours, comma-separated: fp32, bf16")
    train.add_argument(
        "--peers",
        default=",".join(TORCH_PEERS),
        help="PyTorch peers, comma-separated: plain (nanoGPT's form), transformers (sdpa)",
    )
    evaluation = sub.add_parser(
        "eval",
        help="evaluation end to end (fresh processes) against lm-eval + transformers",
        description=evalbench.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evalbench.add_eval_arguments(evaluation)
    _add_mfu(sub)
    _add_losses(sub)
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


def _add_mfu(sub) -> None:
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
    mfu.add_argument(
        "--profile", default="", help="trace 3 more steps into this directory: per-kernel times"
    )
    mfu.add_argument("--top", type=int, default=15, help="kernels listed with --profile")
    mfu.add_argument(
        "--unroll_layers", action="store_true", help="model.scan_layers=False (default: scanned)"
    )


def _add_losses(sub) -> None:
    losses = sub.add_parser(
        "losses",
        help="losses of train steps on a fixed batch as JSON, or --compare three such files",
    )
    losses.add_argument("--shape", default="gpt2_124m", choices=sorted(SHAPES))
    losses.add_argument("--batch", type=int, default=4)
    losses.add_argument("--seq", type=int, default=256)
    losses.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    losses.add_argument("--steps", type=int, default=20)
    losses.add_argument("--attention", default="auto", choices=list(IMPLEMENTATIONS))
    losses.add_argument(
        "--compare",
        nargs=3,
        metavar=("RUN", "REFERENCE", "NOISE"),
        help="JSON files: RUN against REFERENCE (same precision, another platform) within "
        "REFERENCE's own rounding noise (NOISE: the reference platform in float32); exit 1 if not",
    )


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    np.set_printoptions(precision=3)
    if args.command == "data":
        workers = [int(w) for w in args.workers.split(",") if w]
        print(databench.data_benchmark(args.config, args.set, workers, args.tokens, args.steps))
        return
    if args.command == "losses":
        if args.compare:
            table, agreed = compare_losses(*map(read_losses, args.compare))
            print(table)
            sys.exit(0 if agreed else 1)
        print(
            json.dumps(
                step_losses(
                    args.shape, args.batch, args.seq, args.precision, args.steps, args.attention
                )
            )
        )
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
                [p for p in args.peers.split(",") if p],
            ),
            flush=True,
        )
    elif args.command == "eval":
        print(evalbench.run_from_arguments(args), flush=True)
    elif args.command == "step":
        print(step_benchmark(args.steps, args.rounds), flush=True)
    elif args.command == "moe":
        print(
            moe_benchmark(
                args.steps,
                args.rounds,
                args.batch,
                args.seq,
                args.experts,
                args.top_k,
                args.capacity_factor,
            ),
            flush=True,
        )
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
                args.profile,
                args.top,
                not args.unroll_layers,
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
