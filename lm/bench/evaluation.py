"""Evaluation end to end against lm-evaluation-harness + transformers (`python -m lm.bench eval`).

    python -m lm.bench eval --model smollm2 --tasks arc_easy,piqa --limit 300 --num_fewshot 0

Every side runs in a fresh subprocess and is timed by this process from its launch: to its
exit (start-up, imports, model load, compilation, scoring and results: the wall time a user
waits) and to its first scored document (the first batch of scores back from the model).

ours     `python -m lm.main eval --model M --tasks T --limit N --num_fewshot K --out DIR`, run
         twice on new cache directories (compiled programs, --compilation_cache, and
         imported checkpoints, $LM_IMPORT_CACHE): cold (empty caches: the GGUF file is
         converted, everything is compiled) and warm (the same command again: the import and
         the programs come from the caches). The
         first batch's scores are timed by the harness (`first_scored_unix` in results.json).
peer     lm-eval's `simple_evaluate` with transformers' `hf` model (float32, CPU) on exactly
         our weights (imported, then exported in the Hugging Face layout) and our documents
         (each task's first N, written as an lm-eval task: same prompts, choices and gold),
         zero-shot, batch size 16 (--peer_batch_size; ours runs the CLI's defaults); its
         first scored batch is the first return of `HFLM._model_call`. Writing its inputs
         happens before the timing. It needs the `[reference]` extra (lm-eval, transformers,
         torch); without it only ours is run.

The table gives each side's wall and first-scored seconds, the CPU seconds its process tree
used (user + system: the machine may be shared), acc / acc_norm per task, and the ratios:
peer wall / our wall (cold and warm), accuracy differences in points, and our time to the
first scored document cold / warm.

This module imports no jax or lm-eval at the top: the peer's subprocess
(`python -m lm.bench.evaluation peer ...`) pays only for lm-eval's own imports.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import textwrap
import time

# lm-eval task functions for documents written by write_lm_eval_task (a module beside the
# YAML files; lm-eval's `!function` tag imports it).
LM_EVAL_UTILS = """
def doc_to_text(doc):
    return doc["gold"] if doc["partial"] else doc["contexts"][0]


def doc_to_choice(doc):
    return doc["contexts"] if doc["partial"] else doc["continuations"]


def doc_to_target(doc):
    return doc["continuations"][0] if doc["partial"] else doc["gold"]
"""
LM_EVAL_PREFIX = "parity_"  # lm-eval task name = prefix + our task name
PEER_ENV = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def peer_installed() -> bool:
    """Whether the `[reference]` extra (lm-eval, transformers, torch) is importable."""
    return all(importlib.util.find_spec(m) for m in ("lm_eval", "transformers", "torch"))


def write_lm_eval_task(task, docs, directory: pathlib.Path) -> str:
    """Writes `docs` (our `Doc`s of a multiple-choice `task`) as JSONL and an lm-eval task YAML
    that reads them back in `directory` (which must also hold LM_EVAL_UTILS as
    parity_utils.py, see `write_peer_inputs`); Winogrande-style documents (several contexts,
    one continuation) use lm-eval's multiple-context (partial) scoring. Returns the lm-eval
    task name."""
    if task.kind != "multiple_choice":
        raise ValueError(f"{task.name}: only multiple-choice tasks are written for lm-eval")
    name = f"{LM_EVAL_PREFIX}{task.name}"
    data = directory / f"{name}.jsonl"
    with data.open("w") as f:
        for d in docs:
            record = {
                "contexts": list(d.contexts),
                "continuations": list(d.continuations),
                "gold": d.gold,
                "partial": len(d.contexts) > 1,
            }
            f.write(json.dumps(record) + "\n")
    metrics = "".join(
        f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n"
        for m in task.metrics
        if m in ("acc", "acc_norm")
    )
    (directory / f"{name}.yaml").write_text(
        textwrap.dedent(f"""\
        task: {name}
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
        test_split: test
        output_type: multiple_choice
        doc_to_text: !function parity_utils.doc_to_text
        doc_to_choice: !function parity_utils.doc_to_choice
        doc_to_target: !function parity_utils.doc_to_target
        target_delimiter: "{task.target_delimiter}"
        metric_list:
        """)
        + metrics
        + "metadata:\n  version: 1.0\n"
    )
    return name


def write_peer_inputs(pretrained, tasks, limit: int | None, directory) -> tuple[pathlib.Path, dict]:
    """What lm-eval + transformers need to score exactly our model and documents.

    pretrained: an imported model (`lm.convert.load_pretrained`); its float32 weights are
      exported in the Hugging Face layout to DIRECTORY/hf_model (kept when already there).
    tasks: our multiple-choice Tasks; the first `limit` documents of each (as our harness
      selects them) are written as lm-eval tasks under DIRECTORY/lm_eval_tasks.
    Returns (the HF model directory, {our task name: lm-eval task name}).
    """
    from lm.convert.hf import export_hf
    from lm.evaluation.harness import select_docs

    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    hf_dir = directory / "hf_model"
    if not (hf_dir / "config.json").exists():
        export_hf(pretrained, hf_dir)
    task_dir = directory / "lm_eval_tasks"
    task_dir.mkdir(exist_ok=True)
    (task_dir / "parity_utils.py").write_text(LM_EVAL_UTILS)
    names = {}
    for task in tasks:
        docs = task.load()
        names[task.name] = write_lm_eval_task(
            task, [docs[i] for i in select_docs(docs, limit)], task_dir
        )
    return hf_dir, names


def run_lm_eval(
    hf_dir,
    task_dir,
    lm_eval_tasks: list[str],
    *,
    add_bos: bool,
    batch_size: int,
    num_fewshot: int = 0,
    limit: int | None = None,
) -> dict:
    """lm-eval's `simple_evaluate` with transformers' `hf` model: float32 weights from `hf_dir`
    (see `write_peer_inputs`), on CPU, tasks found in `task_dir`; BOS as our tokenizer adds it.
    Returns lm-eval's results dict ({"results": {task: {"acc,none": ...}}, ...}). Needs the
    `[reference]` extra."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(hf_dir), "dtype": "float32", "add_bos_token": add_bos},
        tasks=lm_eval_tasks,
        num_fewshot=num_fewshot,
        limit=limit,
        batch_size=batch_size,
        device="cpu",
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=False,
        bootstrap_iters=0,
    )


# ----------------------------------------------------------------------------- the sides


@dataclasses.dataclass
class Side:
    """One timed run: wall and first-scored seconds from launch, CPU seconds of its process
    tree, and {task: {"acc": .., "acc_norm": ..}} (fractions)."""

    name: str
    wall: float
    first_scored: float
    cpu: float
    metrics: dict[str, dict[str, float]]


def run_timed(
    name: str,
    command: list[str],
    result_file: pathlib.Path,
    log: pathlib.Path,
    env: dict[str, str] | None = None,
) -> Side:
    """Runs `command` in a fresh process (stdout and stderr to `log`) and reads `result_file`,
    a JSON file it writes with "first_scored_unix" (time.time() when its first batch of scores
    came back) and either "metrics" ({task: {metric: value}}, the peer's) or "tasks" (our
    results.json: {task: {"metrics": {...}}}); acc and acc_norm are kept; `env` is added to
    the process's environment. Raises RuntimeError
    (with the log's tail) if the command fails or recorded no first scored batch."""
    env = {**os.environ, **PEER_ENV, "PYTHONUNBUFFERED": "1", **(env or {})}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with log.open("w") as out:
        started = time.time()
        code = subprocess.call(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        wall = time.time() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if code != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{name} failed (exit {code}): {' '.join(command)}\n{tail}")
    record = json.loads(result_file.read_text())
    if record.get("first_scored_unix") is None:
        raise RuntimeError(f"{name}: {result_file} records no first scored batch")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if "tasks" in record:
        per_task = {task: r["metrics"] for task, r in record["tasks"].items()}
    else:
        per_task = record["metrics"]
    metrics = {
        task: {m: v for m, v in values.items() if m in ("acc", "acc_norm")}
        for task, values in per_task.items()
    }
    return Side(name, wall, record["first_scored_unix"] - started, cpu, metrics)


def our_command(
    model: str,
    tasks: list[str],
    limit: int | None,
    num_fewshot: int,
    out: pathlib.Path,
    cache: pathlib.Path,
) -> list[str]:
    """The CLI evaluation, as a user types it (its default batch size and row length), with
    --out and --compilation_cache."""
    command = [sys.executable, "-m", "lm.main", "eval", "--model", model]
    command += ["--tasks", ",".join(tasks), "--num_fewshot", str(num_fewshot)]
    if limit:
        command += ["--limit", str(limit)]
    return command + ["--out", str(out), "--compilation_cache", str(cache)]


def peer_command(
    hf_dir: pathlib.Path, task_dir: pathlib.Path, names: dict, batch_size: int, add_bos: bool, out
) -> list[str]:
    """The peer's subprocess: `python -m lm.bench.evaluation peer ...` (see `peer_main`)."""
    return [
        sys.executable,
        "-m",
        "lm.bench.evaluation",
        "peer",
        "--hf_dir",
        str(hf_dir),
        "--task_dir",
        str(task_dir),
        "--tasks",
        ",".join(f"{ours}={theirs}" for ours, theirs in names.items()),
        "--batch_size",
        str(batch_size),
        "--add_bos",
        str(int(add_bos)),
        "--out",
        str(out),
    ]


def peer_main(argv: list[str]) -> None:
    """The peer side, in its own process: lm-eval's simple_evaluate with the `hf` model (float32,
    CPU, zero-shot) on the written tasks. Writes --out: {"first_scored_unix", "metrics":
    {our task name: {"acc", "acc_norm"}}, "lm_eval": lm-eval's results}."""
    parser = argparse.ArgumentParser(prog="python -m lm.bench.evaluation peer")
    parser.add_argument("--hf_dir", required=True)
    parser.add_argument("--task_dir", required=True)
    parser.add_argument("--tasks", required=True, help="ours=lm_eval_name,...")
    parser.add_argument("--batch_size", type=int, required=True)
    parser.add_argument("--add_bos", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from lm_eval.models.huggingface import HFLM

    first: list[float] = []
    model_call = HFLM._model_call

    def timed_call(self, *a, **kw):
        logits = model_call(self, *a, **kw)  # CPU torch: computed when it returns
        if not first:
            first.append(time.time())
        return logits

    HFLM._model_call = timed_call
    names = dict(pair.split("=") for pair in args.tasks.split(","))
    results = run_lm_eval(
        args.hf_dir,
        args.task_dir,
        list(names.values()),
        add_bos=bool(args.add_bos),
        batch_size=args.batch_size,
    )["results"]
    metrics = {
        ours: {
            m: results[theirs][f"{m},none"]
            for m in ("acc", "acc_norm")
            if f"{m},none" in results[theirs]
        }
        for ours, theirs in names.items()
    }
    record = {
        "first_scored_unix": first[0] if first else None,
        "metrics": metrics,
        "lm_eval": results,
    }
    pathlib.Path(args.out).write_text(json.dumps(record, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------- the benchmark


def format_table(sides: list[Side], tasks: list[str], limit: int | None) -> str:
    """A Markdown table of the sides (wall, first scored, CPU seconds, accuracies in %) and the
    ratios: peer wall / ours (each run of ours), our first-scored cold / warm, and the
    accuracy differences against the peer in points. sides: ours cold, ours warm, then the
    peer when it ran (named 'lm-eval + transformers')."""
    columns = [f"{t} {m}" for t in tasks for m in ("acc", "acc_norm")]
    lines = [
        f"Evaluation end to end ({', '.join(tasks)}; {limit or 'all'} documents each)",
        "",
        "| side | wall s | first scored doc s | CPU s | " + " | ".join(columns) + " |",
        "|---" * (4 + len(columns)) + "|",
    ]
    for s in sides:
        values = [s.metrics.get(t, {}).get(m) for t in tasks for m in ("acc", "acc_norm")]
        shown = ["" if v is None else f"{100 * v:.2f}" for v in values]
        lines.append(
            f"| {s.name} | {s.wall:.1f} | {s.first_scored:.1f} | {s.cpu:.1f} | "
            + " | ".join(shown)
            + " |"
        )
    ours = [s for s in sides if s.name.startswith("ours")]
    peer = next((s for s in sides if not s.name.startswith("ours")), None)
    lines.append("")
    if len(ours) == 2:
        lines.append(
            f"ours, time to the first scored document cold / warm: "
            f"{ours[0].first_scored / ours[1].first_scored:.2f}x"
        )
    if peer is None:
        lines.append("peer not run (install the [reference] extra: lm-eval, transformers, torch)")
        return "\n".join(lines)
    for s in ours:
        lines.append(
            f"end to end, {peer.name} / {s.name}: wall {peer.wall / s.wall:.2f}x, "
            f"CPU {peer.cpu / s.cpu:.2f}x"
        )
    base = ours[0]
    diffs = []
    for t in tasks:
        for m in ("acc", "acc_norm"):
            a, b = base.metrics.get(t, {}).get(m), peer.metrics.get(t, {}).get(m)
            if a is not None and b is not None:
                diffs.append(f"{t} {m} {100 * (a - b):+.2f}")
    lines.append("accuracy, ours - peer (points): " + ", ".join(diffs))
    return "\n".join(lines)


def eval_benchmark(
    tasks: list[str],
    limit: int | None,
    num_fewshot: int,
    *,
    model: str = "smollm2",
    peer_batch_size: int = 16,
    workdir: str | None = None,
    peer: bool | None = None,
) -> str:
    """Times our CLI evaluation (cold, then warm caches) and, when `peer` (None: when
    the `[reference]` extra is installed), lm-eval + transformers on the same weights and
    documents; returns the table (`format_table`).

    workdir: where the runs write (results, logs, the cache, the peer's inputs; the HF export
      is reused when present); default: a new temporary directory, removed afterwards.
    """
    if peer is None:
        peer = peer_installed()
    if peer and num_fewshot:
        raise ValueError(
            "the peer runs zero-shot on the written documents: use --num_fewshot 0, or --no_peer"
        )
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="evalbench_") as tmp:
            return eval_benchmark(
                tasks,
                limit,
                num_fewshot,
                model=model,
                peer_batch_size=peer_batch_size,
                workdir=tmp,
                peer=peer,
            )
    root = pathlib.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    cache = root / f"caches_{time.strftime('%Y%m%d_%H%M%S')}"
    if cache.exists():
        raise FileExistsError(f"{cache} exists: the cold run needs new cache directories")
    sides = []
    for run in ("cold", "warm"):
        out = root / f"ours_{run}"
        command = our_command(model, tasks, limit, num_fewshot, out, cache / "jax")
        print(f"ours ({run} caches): {' '.join(command[1:])}", flush=True)
        side = run_timed(
            f"ours, {run} caches",
            command,
            out / "results.json",
            root / f"ours_{run}.log",
            env={"LM_IMPORT_CACHE": str(cache / "imports")},
        )
        sides.append(side)
    if peer:
        from lm.convert import load_pretrained
        from lm.evaluation import get_tasks

        pretrained = load_pretrained(model)
        hf_dir, names = write_peer_inputs(pretrained, get_tasks(tasks), limit, root / "peer")
        out = root / "peer" / "results.json"
        command = peer_command(
            hf_dir,
            root / "peer" / "lm_eval_tasks",
            names,
            peer_batch_size,
            pretrained.tokenizer.add_bos,
            out,
        )
        del pretrained
        print("peer: lm-eval simple_evaluate, hf model", flush=True)
        sides.append(run_timed("lm-eval + transformers", command, out, root / "peer.log"))
    return format_table(sides, tasks, limit)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The `eval` benchmark's flags (see `eval_benchmark`)."""
    parser.add_argument("--model", default="smollm2", help="smollm2, gemma3 or gguf:PATH")
    parser.add_argument("--tasks", default="arc_easy,piqa", help="comma-separated task names")
    parser.add_argument("--limit", type=int, default=300, help="documents per task (0: all)")
    parser.add_argument("--num_fewshot", type=int, default=0)
    parser.add_argument(
        "--peer_batch_size", type=int, default=16, help="lm-eval's batch size (ours: the CLI's)"
    )
    parser.add_argument(
        "--workdir", default=None, help="keep the runs here (default: a temporary directory)"
    )
    parser.add_argument(
        "--no_peer", action="store_true", help="run ours only (the default without lm-eval)"
    )


def run_from_arguments(args: argparse.Namespace) -> str:
    """eval_benchmark from add_eval_arguments' flags."""
    return eval_benchmark(
        [t for t in args.tasks.split(",") if t],
        args.limit or None,
        args.num_fewshot,
        model=args.model,
        peer_batch_size=args.peer_batch_size,
        workdir=args.workdir,
        peer=False if args.no_peer else None,
    )


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["peer"]:
        peer_main(argv[1:])
        return
    parser = argparse.ArgumentParser(
        prog="python -m lm.bench.evaluation",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_eval_arguments(parser)
    print(run_from_arguments(parser.parse_args(argv)), flush=True)


if __name__ == "__main__":
    main()
