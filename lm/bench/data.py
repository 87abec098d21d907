"""Input-pipeline throughput beside the train step's consumption, for one experiment's data.

    python -m lm.bench data --config experiments/shakespeare_gpt.py [--set data.source=jsonl:...]
        [--workers 0,2] [--tokens 4194304] [--steps 3]

Training batches of this process (`lm.data.pipeline.make_dataset`) are drawn from the raw text
at each ``data.worker_count`` in ``--workers``, then from a tokenized cache that the benchmark
prepares in a temporary directory (`lm.data.cache`; its own tokens/s is printed too). Tokens
count the positions the loss is taken on (``weights``). The train step of the experiment's model
at its batch, on one device, gives the tokens/s the pipeline must keep up with; the last column
is the ratio.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import tempfile
import time

from lm import config as config_lib
from lm.data import cache, pipeline


def apply_overrides(values: dict, overrides: list[str]) -> dict:
    """``section.key=value`` overrides of a resolved config (values read as JSON, else text)."""
    for item in overrides:
        path, _, raw = item.partition("=")
        section, _, key = path.partition(".")
        if section not in values or key not in values[section]:
            raise ValueError(f"--set {item!r}: no config field {path!r}")
        try:
            values[section][key] = json.loads(raw)
        except json.JSONDecodeError:
            values[section][key] = raw
    return values


def pipeline_tokens_per_sec(cfg, tokenizer, tokens: int, warmup: int = 3) -> float:
    """Loss-bearing tokens per second of this process's training batches, over the first
    batches after `warmup` that hold at least `tokens` (many packing windows: a window's
    rows are packed at once, then handed out for free)."""
    it = iter(pipeline.make_dataset(cfg, "train", tokenizer, seed=0))
    for _ in range(warmup):
        next(it)
    start, drawn = time.perf_counter(), 0.0
    while drawn < tokens:
        drawn += float(next(it)["weights"].sum())
    return drawn / (time.perf_counter() - start)


def step_tokens_per_sec(run_config, model_config, cfg, tokenizer, steps: int) -> float:
    """Tokens per second the experiment's train step consumes on one device (compiled first)."""
    import jax

    trainer = run_config.create_trainer(model_config, devices=jax.devices()[:1])
    state = trainer.init_fn(0)
    batch = trainer.put_batch(next(iter(pipeline.make_dataset(cfg, "train", tokenizer, seed=0))))
    state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    tokens = float(jax.device_get(batch["weights"]).sum())
    return tokens * steps / (time.perf_counter() - start)


def data_benchmark(
    config: str, overrides: list[str], workers: list[int], tokens: int, steps: int
) -> str:
    path, _, arg = config.partition(":")
    values = apply_overrides(config_lib.resolve(config_lib.config_of(path, arg or None)), overrides)
    run_config = config_lib.build(values)
    data = run_config.data
    with tempfile.TemporaryDirectory(prefix="lm-databench-") as scratch:
        tokenizer = pipeline.get_tokenizer(data, scratch)
        model_config = run_config.model_config(tokenizer.vocab_size)
        consumed = step_tokens_per_sec(run_config, model_config, data, tokenizer, steps)
        rows = []
        for count in workers:
            raw = dataclasses.replace(data, worker_count=count, cache="")
            rows.append((f"text, {count} workers", pipeline_tokens_per_sec(raw, tokenizer, tokens)))
        cached = dataclasses.replace(data, cache=str(pathlib.Path(scratch) / "cache"))
        start = time.perf_counter()
        manifests = cache.prepare_caches(cached, tokenizer, log=lambda _: None)
        prepared = sum(
            c["tokens"]
            for _, manifest in manifests
            for e in manifest["splits"].values()
            for c in e["finished"].values()
        )
        prepare_rate = prepared / (time.perf_counter() - start)
        rows.append(("cache, 0 workers", pipeline_tokens_per_sec(cached, tokenizer, tokens)))
    lines = [
        f"data: {data.source or data.mixture}, rows of {data.seq_len} tokens, batch {data.batch_size}",
        f"train step ({model_config.num_layers} layers, d {model_config.d_model}, one device): "
        f"{consumed:,.0f} tokens/s",
        f"prepare (tokenize into the cache, this process): {prepare_rate:,.0f} tokens/s",
        "",
        "| pipeline | tokens/s | / train step |",
        "|---|---|---|",
    ]
    lines += [f"| {name} | {rate:,.0f} | {rate / consumed:.1f}x |" for name, rate in rows]
    return "\n".join(lines)
