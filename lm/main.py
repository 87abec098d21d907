"""Command line: train | prepare | sample | eval | icl | convert | compile | summary.

    python -m lm.main --config experiments/shakespeare_gpt.py --workdir /tmp/gpt
    python -m lm.main --config experiments/shakespeare_gpt.py --workdir /tmp/gpt --config.train.steps=100
    python -m lm.main sample --workdir /tmp/gpt --prompt "ROMEO:"
    python -m lm.main sample --model smollm2 --prompt "The capital of France is" --temperature 0
    python -m lm.main eval --workdir /tmp/gpt --split test
    python -m lm.main eval --model smollm2 --tasks arc_easy,piqa --num_fewshot 0 --limit 100
    python -m lm.main eval --workdir /tmp/gpt --tasks heldout,heldout_order
    python -m lm.main icl --workdir /tmp/gpt --tasks heldout_order --shots 0,2,4  # few-shot curves
    python -m lm.main convert --model smollm2 --out /tmp/smollm2_hf     # or --workdir /tmp/gpt
    python -m lm.main --config experiments/shakespeare_gpt.py --workdir gs://bucket/gpt  # a bucket workdir
    python -m lm.main compile --config experiments/llama3_8b.py --topology v5p:4x4x4  # will it fit?
    python -m lm.main prepare --config EXP --workdir W --config.data.cache=DIR --workers 8  # tokenize once
    python -m lm.main summary --workdir /tmp/gpt  # steps, starts, last metrics, where the time went

Rerunning the training command on a workdir resumes from its latest checkpoint. The commands
that read a workdir (sample, eval, icl, convert, summary) write nothing into it: eval --tasks and icl
write to --out, by default eval/NAME and icl/NAME in the current directory (NAME the workdir's
or the model's).

Fine-tuning: `--config.train.init_from=/tmp/gpt` starts a new workdir from that run's
parameters (and tokenizer), `--config.train.init_from=smollm2` (or gemma3, gguf:PATH,
hf:DIR) from an imported checkpoint; `--config.train.lora_rank=8` trains LoRA adapters only.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import jax
from absl import app, flags
from ml_collections import config_flags

from lm import checkpoint, convert, storage
from lm import compile as compile_lib
from lm import config as config_lib
from lm import lease as lease_lib
from lm import run as run_lib
from lm.data import assets, cache
from lm.decode import samples
from lm.evaluation import evaluate, get_tasks, harness_model, write_results
from lm.icl import fewshot
from lm.models.transformer import for_inference
from lm.train.monitor import process_started
from lm.utils import default_compilation_cache, enable_compilation_cache

COMMANDS = ("train", "prepare", "sample", "eval", "icl", "convert", "compile", "summary")
READ_COMMANDS = ("sample", "eval", "icl", "convert", "summary")


class UsageError(ValueError):
    """A command line used wrongly: one line and exit status 2 (`run`), not absl's usage."""


_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file (experiments/NAME.py[:arg])."
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, tokenizer.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "sample: prompt(s) to continue.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 200, "sample: tokens to generate.", lower_bound=0)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "sample: 0 = greedy.", lower_bound=0.0)
_TOP_K = flags.DEFINE_integer(
    "top_k", 0, "sample: keep the k most likely tokens (0 = all).", lower_bound=0
)
_TOP_P = flags.DEFINE_float(
    "top_p", 1.0, "sample: nucleus probability.", lower_bound=0.0, upper_bound=1.0
)
_SEED = flags.DEFINE_integer("seed", 0, "sample: random seed.")
_STOP = flags.DEFINE_multi_string(
    "stop", [], "sample: cut the continuation at this string (repeatable)."
)
_BEAMS = flags.DEFINE_integer(
    "beams", 0, "sample: beam search with this many beams (0 = sample).", lower_bound=0
)
_SPLIT = flags.DEFINE_string(
    "split", "validation", "eval without --tasks: the split whose loss to report."
)
_TASKS = flags.DEFINE_list(
    "tasks", [], "eval: harness tasks (lm.evaluation.tasks), e.g. arc_easy,piqa."
)
_NUM_FEWSHOT = flags.DEFINE_integer(
    "num_fewshot", None, "eval: examples per prompt (default: each task's).", lower_bound=0
)
_LIMIT = flags.DEFINE_integer(
    "limit", None, "eval: the first N documents of each task (per MMLU subject).", lower_bound=1
)
_BATCH_SIZE = flags.DEFINE_integer(
    "batch_size", 16, "eval: rows per compiled batch.", lower_bound=1
)
_MAX_LENGTH = flags.DEFINE_integer(
    "max_length", 2048, "eval: longest input (capped at the model's max_len).", lower_bound=1
)
_SHOTS = flags.DEFINE_list(
    "shots", ["0", "1", "2", "4", "8", "16"], "icl: numbers of demonstrations k."
)
_SEEDS = flags.DEFINE_integer(
    "seeds", 3, "icl: draws of the demonstrations per k (mean and spread).", lower_bound=1
)
_NO_CONTROL = flags.DEFINE_boolean("no_control", False, "icl: skip the random-label control.")
_PRECISION = flags.DEFINE_enum(
    "precision",
    None,
    ["fp32", "bf16"],
    "sample, eval, icl: bf16 runs bfloat16 weights and compute (default: the run's model.precision; "
    "fp32 for imported models).",
)
_MODEL = flags.DEFINE_string(
    "model",
    None,
    "sample, eval, icl, convert: an imported model instead of a workdir: smollm2, gemma3, "
    "gguf:PATH, hf:DIR.",
)
_COMPILATION_CACHE = flags.DEFINE_string(
    "compilation_cache",
    None,
    "Directory of JAX's persistent compilation cache, so that a command run again skips "
    "compiling; 'off' to disable (default: $LM_COMPILATION_CACHE, else $LM_CACHE_DIR/jax, "
    "else ~/.cache/lm/jax; compile: off unless given).",
)
_OUT = flags.DEFINE_string(
    "out",
    None,
    "convert: new or empty directory for the Hugging Face layout; eval --tasks: directory for "
    "results.json and results.md, icl: for curves.json and fewshot.png (default: eval/NAME, "
    "icl/NAME in the current directory, NAME the workdir's or --model's; never in the workdir).",
)
_TOPOLOGY = flags.DEFINE_string(
    "topology",
    None,
    "compile: the devices to compile for, a TPU slice (v5p:4x4x4, v5e:2x2, v6e:8x8; needs the "
    "[tpu] extra, no TPU) or cpu:N (N host devices, a stand-in for a GPU box).",
)
_JSON = flags.DEFINE_boolean("json", False, "compile: print the report as JSON.")
_WORKERS = flags.DEFINE_integer(
    "workers", 0, "prepare: tokenizing processes (0: this one).", lower_bound=0
)
_DEVICE_MEMORY_GIB = flags.DEFINE_float(
    "device_memory_gib",
    0.0,
    "compile: memory per device to judge 'fits' by (default: the TPU's HBM; none for cpu:N, "
    "e.g. 80 for an H100).",
    lower_bound=0.0,
)
_PEAK_TFLOPS = flags.DEFINE_float(
    "peak_tflops",
    0.0,
    "compile: dense bf16 peak per device for the step time (default: the TPU's datasheet).",
    lower_bound=0.0,
)


# ------------------------------------------------------------------------------- commands


def load(workdir: pathlib.Path | None) -> checkpoint.SavedModel:
    """The model of --model NAME, else of --workdir DIR (its latest readable checkpoint)."""
    if _MODEL.value:
        return convert.load_model(model=_MODEL.value)
    return convert.load_model(workdir=workdir)


def load_for_inference(
    workdir: pathlib.Path | None, no_tokenizer: str, unroll_layers: bool = False
):
    """(saved model, Flax module, params on the default device) at --precision, from --model or
    --workdir; `no_tokenizer` ends the error for an import without a tokenizer. unroll_layers:
    see `for_inference` (decoding)."""
    saved = load(workdir)
    if saved.tokenizer is None:
        raise ValueError(f"--model {_MODEL.value!r} {no_tokenizer}")
    model, params = for_inference(
        saved.config, saved.params, _PRECISION.value, unroll_layers=unroll_layers
    )
    return saved, model, jax.device_put(params)  # once, not with every compiled call


def default_out(workdir: pathlib.Path | None, kind: str):
    """Returns --out, else KIND/NAME in the current directory, NAME the workdir's or the
    model's: a command that reads a workdir writes nothing into it (`check_out`)."""
    if _OUT.value:
        return storage.as_path(_OUT.value)
    if _MODEL.value:
        name = pathlib.Path(_MODEL.value).name
    else:  # resolved, so that --workdir . or run/ still names the run
        name = workdir.name if storage.is_remote(workdir) else pathlib.Path(workdir).resolve().name
    return storage.as_path(kind) / name


def sample_command(workdir: pathlib.Path | None) -> None:
    saved, model, params = load_for_inference(
        workdir, "has no tokenizer.json to encode prompts with", unroll_layers=True
    )
    if _PROMPT.value:
        prompts = _PROMPT.value
    elif _MODEL.value:
        prompts = ["The"]
    else:
        prompts = run_lib.default_prompts(
            saved.data_config, saved.sections.get("train", {}).get("sample_prompt", "")
        )
    for text in samples(
        model,
        params,
        saved.tokenizer,
        saved.data_config,
        prompts,
        max_new_tokens=_MAX_NEW.value,
        temperature=_TEMPERATURE.value,
        top_k=_TOP_K.value,
        top_p=_TOP_P.value,
        seed=_SEED.value,
        beams=_BEAMS.value,
        stops=_STOP.value,
    ):
        print(text)
        print("-" * 40)


def eval_command(workdir: pathlib.Path | None) -> None:
    if not _TASKS.value:  # the loss of a split (the training data's own evaluation)
        if workdir is None:
            raise UsageError("eval --model needs --tasks (e.g. --tasks arc_easy,piqa)")
        saved = convert.load_model(workdir=workdir)
        metrics = run_lib.split_loss(saved, _SPLIT.value)
        print(json.dumps({"split": _SPLIT.value, "step": saved.step, **metrics}, indent=2))
        return
    saved, model, params = load_for_inference(workdir, "has no tokenizer to encode prompts with")
    out = default_out(workdir, "eval")
    tasks = get_tasks(_TASKS.value, saved.data_config)  # unknown names fail before any work
    lm = harness_model(
        model,
        params,
        saved.tokenizer,
        saved.data_config,
        batch_size=_BATCH_SIZE.value,
        max_length=_MAX_LENGTH.value,
    )
    results = evaluate(lm, tasks, num_fewshot=_NUM_FEWSHOT.value, limit=_LIMIT.value, progress=True)
    print(write_results({"model": saved.source, "step": saved.step, **results}, out))
    print(f"wrote {out / 'results.json'}")


def icl_command(workdir: pathlib.Path | None) -> None:
    """Few-shot curves: accuracy against k demonstrations, seeds, random-label control."""
    if not _TASKS.value:
        raise UsageError("icl needs --tasks (e.g. --tasks sst2,arc_easy)")
    saved, model, params = load_for_inference(workdir, "has no tokenizer to encode prompts with")
    out = default_out(workdir, "icl")
    tasks = get_tasks(_TASKS.value, saved.data_config)
    fewshot.check_accuracy_tasks(tasks)
    lm = harness_model(
        model,
        params,
        saved.tokenizer,
        saved.data_config,
        batch_size=_BATCH_SIZE.value,
        max_length=_MAX_LENGTH.value,
    )
    curves = fewshot.fewshot_curves(
        lm,
        tasks,
        shots=[int(k) for k in _SHOTS.value],
        seeds=_SEEDS.value,
        limit=_LIMIT.value if _LIMIT.value is not None else 100,
        control=not _NO_CONTROL.value,
        progress=True,
    )
    curves = {
        "model": saved.source,
        "step": saved.step,
        "chance": fewshot.chance_levels(tasks),
        **curves,
    }
    print(fewshot.write_curves(curves, out, title=saved.source))
    print(f"wrote {out / 'curves.json'} and {out / 'fewshot.png'}")


def convert_command(workdir: pathlib.Path | None) -> None:
    """Writes an imported model or a workdir's latest parameters in the Hugging Face layout
    (config.json + model.safetensors, + tokenizer.json for imported models)."""
    if _OUT.value is None:
        raise UsageError("convert needs --out DIR (a new or empty directory)")
    written, names = convert.export_model(load(workdir), _OUT.value)
    print(f"wrote {written}: " + ", ".join(names))


def compile_command() -> None:
    """Compiles the experiment's train and eval steps for --topology and prints what each
    device holds; a run that does not fit ends with one line and exit status 2."""
    if _CONFIG.value is None or not _TOPOLOGY.value:
        raise UsageError("compile needs --config experiments/NAME.py and --topology T")
    target = compile_lib.topology(_TOPOLOGY.value, _DEVICE_MEMORY_GIB.value, _PEAK_TFLOPS.value)
    report = compile_lib.compile_run(config_lib.resolve(_CONFIG.value), target)
    print(json.dumps(report.to_dict(), indent=2) if _JSON.value else report.table())
    compile_lib.check_fits(report)


def prepare_command(workdir: pathlib.Path) -> None:
    """Tokenizes the experiment's data source once into data.cache (`lm.data.cache`), with the
    run's tokenizer (trained into the workdir first if it has none), for training to read."""
    if _CONFIG.value is None:
        raise UsageError("prepare needs --config experiments/NAME.py")
    config = config_lib.build(config_lib.resolve(_CONFIG.value))
    if not config.data.cache:
        raise ValueError(
            "prepare writes a tokenized cache to data.cache, which is empty; add "
            "--config.data.cache=DIR (a local directory or gs://bucket/path)"
        )
    with lease_lib.hold_workdir(
        workdir, config.train.lease_timeout_s
    ):  # it may write the tokenizer
        tokenizer = run_lib.shared_tokenizer(config.data, workdir)
        caches = cache.prepare_caches(config.data, tokenizer, workers=_WORKERS.value)
        for source, manifest in caches:
            for split, entry in manifest["splits"].items():
                tokens = sum(c["tokens"] for c in entry["finished"].values())
                print(
                    f"{source} {split}: {entry['records']:,} records, {tokens:,} tokens in "
                    f"{entry['shards']} shards"
                )


# ------------------------------------------------------------------- the command line's checks
# Each raises UsageError (one line, exit status 2) before any work, so that a misuse neither
# prints absl's usage nor surfaces late as a raw errno or a traceback.


def check_command(argv: list[str]) -> str:
    """Returns the subcommand (train when none is given); an unknown one names the valid ones.
    absl leaves in argv what is not a flag, so words after the command are refused too."""
    command = argv[1] if len(argv) > 1 else "train"
    if command not in COMMANDS:
        raise UsageError(
            f"unknown command {command!r}: use one of {', '.join(COMMANDS)} "
            "(python -m lm.main COMMAND --workdir DIR [--config FILE]; --help lists the flags)"
        )
    if len(argv) > 2:
        raise UsageError(
            f"unexpected argument(s) {' '.join(argv[2:])!r} after {command!r}: flags are "
            "--name=value (quote a --prompt with spaces); --help lists them"
        )
    return command


def check_source(command: str) -> None:
    """A read command reads exactly one of --workdir and --model; train and prepare need
    --workdir and take no --model (it would be ignored without a word)."""
    if command == "summary":
        if _MODEL.value or not _WORKDIR.value:
            raise UsageError("summary reads a run's --workdir DIR (and takes no --model)")
        return
    if command in READ_COMMANDS:
        if _WORKDIR.value and _MODEL.value:
            raise UsageError(f"{command} reads --workdir DIR or --model NAME, not both: drop one")
        if not (_WORKDIR.value or _MODEL.value):
            raise UsageError(
                f"{command} needs --workdir DIR (a trained run) or --model NAME (smollm2, "
                "gemma3, gguf:PATH, hf:DIR)"
            )
        return
    if _MODEL.value:
        raise UsageError(
            f"{command} takes no --model: to start from an imported model, pass "
            f"--config.train.init_from={_MODEL.value}"
        )
    if _WORKDIR.value is None:
        raise UsageError(
            "--workdir is required (sample, eval, icl and convert also take --model NAME instead)"
        )


def check_workdir(workdir, command: str) -> None:
    """--workdir is a directory, and a read command's exists (else the lease reports a file as a
    raw errno, and a reader a missing directory as "no config.json"). A bucket's prefix exists
    once written: a missing one shows when it is read."""
    if storage.is_remote(workdir):
        return
    if workdir.exists() and not workdir.is_dir():
        fix = (
            "pass the --workdir of a trained run"
            if command in READ_COMMANDS
            else "pass a directory to train in (a new one, or a run's to resume)"
        )
        raise UsageError(f"--workdir {workdir} is a file, not a run's directory: {fix}")
    if command in READ_COMMANDS and not workdir.exists():
        raise UsageError(f"no such workdir {workdir}: train there first, or fix the --workdir path")


def output_dir(command: str, workdir):
    """Returns the directory the command writes: --out for convert, --out or its default for
    eval --tasks and icl; None for the others (and for convert without --out, which
    `convert_command` refuses)."""
    if command == "convert":
        return storage.as_path(_OUT.value) if _OUT.value else None
    if command == "icl" or (command == "eval" and _TASKS.value):
        return default_out(workdir, command)
    return None


def is_inside(path, directory) -> bool:
    """Whether `path` is `directory` or below it: local paths resolved (symlinks, ..), URLs
    compared as text."""
    if storage.is_remote(path) or storage.is_remote(directory):
        path, directory = str(path).rstrip("/"), str(directory).rstrip("/")
        return path == directory or path.startswith(directory + "/")
    return pathlib.Path(path).resolve().is_relative_to(pathlib.Path(directory).resolve())


def check_out(out, workdir, command: str) -> None:
    """The directory a command writes (`output_dir`), before the model is loaded: not in the
    workdir it reads (a read command writes nothing there), not a file, and for convert new or
    empty (it never overwrites). None: nothing to check."""
    if out is None:
        return
    flag = "--out" if _OUT.value else "the default --out"
    if workdir is not None and is_inside(out, workdir):
        raise UsageError(
            f"{flag} {out} is inside --workdir {workdir}, and a command that reads a workdir "
            "writes nothing into it: pass --out DIR outside it"
        )
    if storage.is_remote(out):
        return  # `convert.export_model` refuses a bucket folder that is not empty
    if out.exists() and not out.is_dir():
        raise UsageError(f"{flag} {out} is a file, not a directory: pass --out DIR")
    if command == "convert" and out.is_dir() and any(out.iterdir()):
        raise UsageError(
            f"--out {out} is not empty, and convert never overwrites: pass a new or empty directory"
        )


def use_host_devices(topology: str | None) -> None:
    """compile --topology cpu:N: N host devices, set before JAX starts its CPU backend."""
    if topology and topology.startswith("cpu:") and topology[4:].isdigit():
        flag = f"--xla_force_host_platform_device_count={topology[4:]}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()


def main(argv):
    command = check_command(argv)
    if command == "compile":
        use_host_devices(_TOPOLOGY.value)
        # No persistent cache unless asked: the compile time is part of the report, and the
        # programs are for other devices than this machine's.
        enable_compilation_cache(_COMPILATION_CACHE.value or "off")
        compile_command()
        return
    check_source(command)
    workdir = storage.as_path(_WORKDIR.value) if _WORKDIR.value else None
    if workdir is not None:
        check_workdir(workdir, command)
        checkpoint.check_checkpoint_store(workdir)
        storage.check_reachable(workdir)  # a bucket that is missing or out of reach: one line, now
    if _OUT.value:
        storage.check_reachable(_OUT.value)
    check_out(output_dir(command, workdir), workdir, command)
    enable_compilation_cache(_COMPILATION_CACHE.value or default_compilation_cache())
    if command == "train":
        if _CONFIG.value is None:
            raise UsageError("train needs --config experiments/NAME.py")
        run_lib.run(_CONFIG.value, workdir, started_at=process_started())
    elif command == "prepare":
        prepare_command(workdir)
    elif command == "sample":
        sample_command(workdir)
    elif command == "convert":
        convert_command(workdir)
    elif command == "icl":
        icl_command(workdir)
    elif command == "summary":
        print(run_lib.run_summary(workdir))
    else:
        eval_command(workdir)


def check_config_file(argv: list[str]) -> None:
    """A --config file that does not exist: one line (config_flags loads it lazily, and its
    error would surface as a traceback at the first read)."""
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        else:
            continue
        path = value.split(":", 1)[0]
        if not os.path.isfile(path):
            raise UsageError(
                f"--config {value}: no such experiment file {path!r}; pass a file such as "
                "experiments/shakespeare_gpt.py (paths are relative to the current directory)"
            )


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a bad flag value (a value out of range, an unknown experiment
    arg) raised as a ValueError that `run` prints as one line."""
    check_config_file(argv)
    try:
        return flags.FLAGS(argv)
    except (
        AttributeError,
        KeyError,
    ) as e:  # config_flags: an override names no field of the config
        if "--config." not in " ".join(argv):
            raise
        inner = e
        while inner.args and isinstance(
            inner.args[0], BaseException
        ):  # AttributeError(KeyError(text))
            inner = inner.args[0]
        text = str(inner.args[0]) if inner.args else str(inner)
        name, _, suggestion = text.partition(
            "\n"
        )  # 'stepz'\nDid you mean "steps" instead of "stepz"?
        hint = name.strip("'") + (f" ({suggestion.strip()})" if suggestion.strip() else "")
        raise ValueError(
            f"an override names a field the experiment's config does not have: {hint}. "
            "Fix the --config.SECTION.FIELD name (the fields are in config.json of any "
            "workdir, or the experiment file)"
        ) from e
    except flags.UnrecognizedFlagError as e:  # absl suggests a near name when there is one
        hint = "" if "Did you mean" in str(e) else " (python -m lm.main --help lists the flags)"
        raise UsageError(f"{e}{hint}") from e
    except flags.Error as e:
        message, marker = str(e), "Error whilst parsing config file"
        cause = e.__context__  # config_flags wraps an experiment file's error in a traceback
        while cause is not None and marker in str(cause):
            cause = cause.__context__
        if marker in message and cause is not None:
            message = message.split(marker)[0] + str(cause)
        raise ValueError(message) from e


# Bad input, an asset out of reach, a checkpoint that cannot be written (disk full), or a run that
# does not fit its devices (compile): one line that names the problem and the fix, exit status 2.
# Anything else is a bug and keeps its traceback.
EXPECTED_ERRORS = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    assets.AssetUnavailableError,
    checkpoint.CheckpointSaveError,
)  # a failed save (disk full): one line too


def run():
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax and TFDS are chatty at INFO
    try:
        app.run(main, flags_parser=parse_flags)
    except KeyboardInterrupt:  # outside the training loop, which saves on Ctrl-C and returns
        print("error: interrupted (Ctrl-C); checkpoints already saved are kept", file=sys.stderr)
        sys.exit(130)
    except EXPECTED_ERRORS as e:
        if os.environ.get("LM_DEBUG"):
            raise
        print(
            "error: " + " ".join(str(e).split()), file=sys.stderr
        )  # one line; LM_DEBUG=1: traceback
        sys.exit(2)


if __name__ == "__main__":
    run()
