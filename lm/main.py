"""Command line: train | sample | eval.

    python -m lm.main --config experiments/shakespeare_gpt.py --workdir /tmp/gpt
    python -m lm.main --config experiments/shakespeare_gpt.py --workdir /tmp/gpt --config.train.steps=100
    python -m lm.main sample --workdir /tmp/gpt --prompt "ROMEO:"
    python -m lm.main eval --workdir /tmp/gpt --split test

Rerunning the training command on a workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pathlib
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from lm import checkpoint, parallel
from lm import config as config_lib
from lm.data import pipeline
from lm.decode import beam_search, beam_search_seq2seq, cut_at_stop, generate, generate_seq2seq
from lm.models.transformer import ModelConfig, build_model
from lm.train import Trainer, create_trainer, train_loop

COMMANDS = ("train", "sample", "eval")

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file (experiments/NAME.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, tokenizer.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "sample: prompt(s) to continue.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "sample: tokens to generate.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "sample: 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "sample: keep the k most likely tokens (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "sample: nucleus probability.")
_SEED = flags.DEFINE_integer("seed", 0, "sample: random seed.")
_STOP = flags.DEFINE_multi_string("stop", [], "sample: cut the continuation at this string (repeatable).")
_BEAMS = flags.DEFINE_integer("beams", 0, "sample: beam search with this many beams (0 = sample).")
_SPLIT = flags.DEFINE_string("split", "validation", "eval: data split.")


# ---------------------------------------------------------------------------------- build


def model_config_for(model_values: dict, tokenizer) -> ModelConfig:
    """The model's vocabulary is the tokenizer's unless the config pins it."""
    values = dict(model_values)
    if not values.get("vocab_size"):
        values["vocab_size"] = tokenizer.vocab_size
    elif values["vocab_size"] < tokenizer.vocab_size:
        raise ValueError(
            f"model.vocab_size={values['vocab_size']} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size} pieces; set model.vocab_size=0 to follow the tokenizer"
        )
    return ModelConfig.from_dict(values)


def shared_tokenizer(data_cfg, workdir: pathlib.Path):
    """Process 0 prepares the data and trains the tokenizer; the others then load them."""
    if jax.process_count() == 1:
        return pipeline.get_tokenizer(data_cfg, str(workdir))
    from jax.experimental import multihost_utils

    tokenizer = pipeline.get_tokenizer(data_cfg, str(workdir)) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("tokenizer ready")
    return tokenizer or pipeline.get_tokenizer(data_cfg, str(workdir))


def build_run(values: dict, workdir: pathlib.Path):
    """Everything a run needs, from a resolved config dict: (values, tokenizer, trainer, configs)."""
    model_values, data_cfg, opt_cfg, train_cfg, par_cfg = config_lib.build(values)
    parallel.initialize_distributed(par_cfg)
    saved = checkpoint.read_config(workdir)
    tokenizer = shared_tokenizer(data_cfg, workdir)
    model_cfg = model_config_for(model_values, tokenizer)
    values = {**values, "model": {**model_values, "vocab_size": model_cfg.vocab_size}}
    checkpoint.check_compatible(saved, json.loads(json.dumps(values)), sections=("model",))
    if saved is not None and saved.get("data", {}).get("source") != values["data"]["source"]:
        raise checkpoint.CheckpointMismatchError(
            f"this workdir was trained on data.source={saved['data'].get('source')!r}, not "
            f"{values['data']['source']!r}; use a new --workdir (or init_from, for fine-tuning)"
        )
    trainer = create_trainer(model_cfg, build_model(model_cfg), opt_cfg, train_cfg.steps, par_cfg,
                             seed=train_cfg.seed)
    return values, tokenizer, trainer, (model_cfg, data_cfg, opt_cfg, train_cfg, par_cfg)


def loss_evaluator(trainer: Trainer, data_cfg, tokenizer, split: str, seed: int):
    """state -> {loss, perplexity, bits_per_byte, accuracy} over a whole split."""
    bytes_per_token = pipeline.bytes_per_token(data_cfg, split, tokenizer)
    # Every process must run the same number of (collective) eval steps.
    num_batches = None
    if jax.process_count() > 1:
        num_batches = pipeline.count_batches(data_cfg, split, tokenizer, seed=seed,
                                             process_count=jax.process_count())

    def evaluate(state):
        batches = pipeline.make_dataset(
            data_cfg, split, tokenizer, seed=seed, process_index=jax.process_index(),
            process_count=jax.process_count(), repeat=False, num_batches=num_batches,
        )
        metrics = trainer.evaluate(state, iter(batches))
        if data_cfg.task == "lm":
            metrics["bits_per_byte"] = metrics["loss"] / math.log(2) / bytes_per_token
        return metrics

    return evaluate


def samples(trainer: Trainer, params, tokenizer, data_cfg, prompts, *, max_new_tokens, temperature,
            top_k=0, top_p=1.0, seed=0, beams=0, stops=()) -> list[str]:
    """Decoded continuations (decoder-only) or translations (encoder-decoder) of text prompts.

    beams > 0 uses beam search instead of sampling (decoder-only) or greedy (encoder-decoder).
    """
    if trainer.model_config.architecture == "decoder":
        ids = [[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts]
        limit = trainer.model_config.max_len if trainer.model_config.position == "learned" else None
        if limit is not None:
            max_new_tokens = min(max_new_tokens, limit - max(len(i) for i in ids))
        if beams > 0:
            out, _ = beam_search(trainer.model, params, ids, max_new_tokens=max_new_tokens, beams=beams,
                                 eos_id=tokenizer.eos_id)
        else:
            out = generate(trainer.model, params, ids, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                           eos_id=tokenizer.eos_id)
        return [p + cut_at_stop(tokenizer.decode(o), stops) for p, o in zip(prompts, out, strict=True)]
    ids = [tokenizer.encode(p)[: data_cfg.encoder_len - 1] + [tokenizer.eos_id] for p in prompts]
    max_new_tokens = min(max_new_tokens, data_cfg.seq_len)
    if beams > 0:
        out, _ = beam_search_seq2seq(trainer.model, params, ids, max_new_tokens=max_new_tokens, beams=beams,
                                     bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    else:
        out = generate_seq2seq(trainer.model, params, ids, max_new_tokens=max_new_tokens,
                               bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id)
    return [f"{p}\n  -> {cut_at_stop(tokenizer.decode(o), stops)}" for p, o in zip(prompts, out, strict=True)]


def default_prompts(data_cfg, tokenizer, train_cfg) -> list[str]:
    if train_cfg.sample_prompt:
        return [train_cfg.sample_prompt]
    if data_cfg.task == "translation":
        from lm.data.sources import get_source

        source = get_source(data_cfg, "validation")
        return [source[i]["source"] for i in range(min(3, len(source)))]
    return ["\n"]


# ------------------------------------------------------------------------------- commands


def train_command(config, workdir: pathlib.Path) -> None:
    values = config_lib.resolve(config)
    values, tokenizer, trainer, cfgs = build_run(values, workdir)
    model_cfg, data_cfg, _, train_cfg, _ = cfgs
    checkpoint.write_config(workdir, values)
    if jax.process_index() == 0:
        print(f"model: {trainer.num_params:,} parameters ({model_cfg.architecture}); "
              f"mesh {dict(trainer.mesh.shape)}; tokenizer: {tokenizer.vocab_size} pieces")
    data = iter(pipeline.make_dataset(
        data_cfg, "train", tokenizer, seed=train_cfg.seed, process_index=jax.process_index(),
        process_count=jax.process_count(), repeat=True,
    ))
    evaluators = {"eval": loss_evaluator(trainer, data_cfg, tokenizer, "validation", train_cfg.seed)}
    if data_cfg.task == "lm" and jax.process_index() == 0:
        baseline_file = workdir / "baseline.json"  # computed once per workdir (same data and tokenizer)
        if baseline_file.exists():
            baseline = json.loads(baseline_file.read_text())["unigram_loss"]
        else:
            baseline = pipeline.unigram_entropy(data_cfg, tokenizer)
            baseline_file.write_text(json.dumps({"unigram_loss": baseline}))
        print(f"unigram baseline on validation: {baseline:.3f} nats/token")

    def on_end(state):
        params = state.params
        if jax.process_count() > 1:  # every process holds a shard: gather full copies first
            from jax.experimental import multihost_utils

            params = multihost_utils.process_allgather(params, tiled=True)
        if jax.process_index() != 0:
            return
        texts = samples(trainer, params, tokenizer, data_cfg, default_prompts(data_cfg, tokenizer, train_cfg),
                        max_new_tokens=train_cfg.sample_tokens, temperature=train_cfg.sample_temperature,
                        seed=train_cfg.seed)
        text = "\n\n".join(texts)
        (workdir / "samples.txt").write_text(text + "\n")
        print("\n===== samples =====\n" + text + "\n===================")

    state = train_loop(trainer, train_cfg, workdir, data, evaluators=evaluators, seq_len=data_cfg.seq_len,
                       on_end=on_end)
    final = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()] \
        if (workdir / "metrics.jsonl").exists() else []
    evals = [m for m in final if "eval/loss" in m]
    if evals and jax.process_index() == 0:
        last = evals[-1]
        print(f"step {int(state.step)}: validation loss {last['eval/loss']:.4f}, "
              f"perplexity {last['eval/perplexity']:.2f}"
              + (f", bits/byte {last['eval/bits_per_byte']:.4f}" if "eval/bits_per_byte" in last else ""))


def restore_for_inference(workdir: pathlib.Path):
    """(trainer, params, tokenizer, data_cfg) from a trained workdir's config and latest checkpoint."""
    values = checkpoint.read_config(workdir)
    if values is None:
        raise SystemExit(f"{workdir} has no config.json: train there first, or pass the right --workdir")
    values = {**values, "parallel": {**values.get("parallel", {}), "mesh": (-1, 1, 1), "use_pmap": False}}
    values, tokenizer, trainer, cfgs = build_run(values, workdir)
    ckpt = checkpoint.Checkpointer(workdir, async_save=False)
    if ckpt.latest_step() is None:
        raise SystemExit(f"{workdir} has no checkpoint yet")
    step, state = ckpt.restore(trainer.abstract_state)
    ckpt.close()
    logging.info("restored step %d", step)
    return trainer, state, tokenizer, cfgs[1], cfgs[3]


def sample_command(workdir: pathlib.Path) -> None:
    trainer, state, tokenizer, data_cfg, train_cfg = restore_for_inference(workdir)
    prompts = _PROMPT.value or default_prompts(data_cfg, tokenizer, train_cfg)
    for text in samples(trainer, state.params, tokenizer, data_cfg, prompts, max_new_tokens=_MAX_NEW.value,
                        temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                        seed=_SEED.value, beams=_BEAMS.value, stops=_STOP.value):
        print(text)
        print("-" * 40)


def eval_command(workdir: pathlib.Path) -> None:
    trainer, state, tokenizer, data_cfg, train_cfg = restore_for_inference(workdir)
    metrics = loss_evaluator(trainer, data_cfg, tokenizer, _SPLIT.value, train_cfg.seed)(state)
    print(json.dumps({"split": _SPLIT.value, "step": int(state.step), **metrics}, indent=2))


def main(argv):
    command = argv[1] if len(argv) > 1 else "train"
    if command not in COMMANDS or len(argv) > 2:
        raise app.UsageError(f"usage: python -m lm.main [{'|'.join(COMMANDS)}] --workdir DIR [--config FILE]")
    if _WORKDIR.value is None:
        raise app.UsageError("--workdir is required")
    workdir = pathlib.Path(_WORKDIR.value)
    if command == "train":
        if _CONFIG.value is None:
            raise app.UsageError("train needs --config experiments/NAME.py")
        train_command(_CONFIG.value, workdir)
    elif command == "sample":
        sample_command(workdir)
    else:
        eval_command(workdir)


def run():
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and TFDS are chatty at INFO
    try:
        app.run(main)
    except (ValueError, checkpoint.CheckpointMismatchError) as e:  # bad input: one clear line, exit 2
        if os.environ.get("LM_DEBUG"):
            raise
        print(f"error: {e}\n(set LM_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    run()
