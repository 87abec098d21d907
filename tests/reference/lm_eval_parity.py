"""Our harness against lm-evaluation-harness on the same weights and the same documents.

Needs the `[reference]` extra (torch, transformers, lm-eval), e.g. in a venv beside the
main install:

    python -m venv --system-site-packages refvenv
    refvenv/bin/pip install -e ".[reference]"
    HF_DATASETS_OFFLINE=1 refvenv/bin/python tests/reference/lm_eval_parity.py --model smollm2 \
        --tasks openbookqa,winogrande,sst2 --out parity/

What it does:
  1. imports the model (GGUF, dequantised to float32) and exports it in the Hugging Face
     layout (`lm.convert.hf.export_hf`), so that transformers runs exactly our weights;
  2. writes each task's documents (as `lm.evaluation.tasks` builds them: same prompts,
     choices and gold) to JSONL, with an lm-eval task YAML that reads them back
     (partial scoring for Winogrande, through lm-eval's multiple-context mode);
  3. runs `lm_eval.simple_evaluate` with the `hf` model (float32, CPU) and then our
     `evaluate`, both zero-shot on the same documents, timing each;
  4. prints a Markdown table of acc / acc_norm from both and the wall times, and writes
     it with the raw numbers to OUT/parity.json and OUT/parity.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import textwrap
import time

UTILS = """
def doc_to_text(doc):
    return doc["gold"] if doc["partial"] else doc["contexts"][0]


def doc_to_choice(doc):
    return doc["contexts"] if doc["partial"] else doc["continuations"]


def doc_to_target(doc):
    return doc["continuations"][0] if doc["partial"] else doc["gold"]
"""


def write_lm_eval_task(task, docs, directory: pathlib.Path) -> str:
    """JSONL documents and a YAML config for lm-eval; returns the lm-eval task name."""
    name = f"parity_{task.name}"
    data = directory / f"{name}.jsonl"
    with data.open("w") as f:
        for d in docs:
            f.write(
                json.dumps(
                    {
                        "contexts": list(d.contexts),
                        "continuations": list(d.continuations),
                        "gold": d.gold,
                        "partial": len(d.contexts) > 1,
                    }
                )
                + "\n"
            )
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tasks", default="openbookqa,winogrande,sst2")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--out", default="parity")
    args = parser.parse_args()

    import lm_eval
    from lm import convert
    from lm.convert.hf import export_hf
    from lm.evaluation import LanguageModel, evaluate, get_tasks
    from lm.evaluation.harness import select_docs
    from lm.models.transformer import build_model
    from lm_eval.tasks import TaskManager

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    pretrained = convert.load_pretrained(args.model)
    hf_dir = out / "hf_model"
    if not (hf_dir / "config.json").exists():
        export_hf(pretrained, hf_dir)
    task_dir = out / "lm_eval_tasks"
    task_dir.mkdir(exist_ok=True)
    (task_dir / "parity_utils.py").write_text(UTILS)
    tasks = get_tasks(args.tasks.split(","))
    names = {}
    for task in tasks:
        if task.kind != "multiple_choice":
            raise SystemExit(f"{task.name}: the parity script compares multiple-choice tasks")
        docs = task.load()
        names[task.name] = write_lm_eval_task(
            task, [docs[i] for i in select_docs(docs, args.limit)], task_dir
        )

    started = time.perf_counter()
    theirs = lm_eval.simple_evaluate(
        model="hf",
        model_args={
            "pretrained": str(hf_dir),
            "dtype": "float32",
            "add_bos_token": pretrained.tokenizer.add_bos,
        },
        tasks=list(names.values()),
        num_fewshot=0,
        batch_size=args.batch_size,
        device="cpu",
        task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=False,
        bootstrap_iters=0,
    )
    their_seconds = time.perf_counter() - started

    started = time.perf_counter()
    model = LanguageModel(
        build_model(pretrained.config),
        pretrained.params,
        pretrained.tokenizer,
        batch_size=args.batch_size,
    )
    ours = evaluate(model, tasks, num_fewshot=0, limit=args.limit, progress=True)
    our_seconds = time.perf_counter() - started

    rows = [
        "| task | docs | metric | lm (ours) | lm-eval + transformers | difference (points) |",
        "|---|---|---|---|---|---|",
    ]
    record = {
        "model": args.model,
        "lm_seconds": our_seconds,
        "lm_eval_seconds": their_seconds,
        "tasks": {},
    }
    for task in tasks:
        mine = ours["tasks"][task.name]
        other = theirs["results"][names[task.name]]
        record["tasks"][task.name] = {"docs": mine["docs"], "lm": mine["metrics"], "lm_eval": other}
        for metric in ("acc", "acc_norm"):
            if metric in mine["metrics"]:
                a, b = mine["metrics"][metric], other[f"{metric},none"]
                rows.append(
                    f"| {task.name} | {mine['docs']} | {metric} | {100 * a:.2f} | "
                    f"{100 * b:.2f} | {100 * (a - b):+.2f} |"
                )
    rows.append(
        f"\nwall time (load + all tasks): lm {our_seconds:.0f} s, lm-eval {their_seconds:.0f} s "
        f"({their_seconds / our_seconds:.2f}x)"
    )
    table = "\n".join(rows)
    print(table)
    (out / "parity.md").write_text(table + "\n")
    (out / "parity.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
