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
     steps 1 and 2 are `lm.bench.evaluation.write_peer_inputs`, which the end-to-end benchmark
     (`python -m lm.bench eval`, each side in its own process) uses too;
  3. runs `lm_eval.simple_evaluate` with the `hf` model (float32, CPU) and then our
     `evaluate`, both zero-shot on the same documents, timing each;
  4. prints a Markdown table of acc / acc_norm from both and the wall times, and writes
     it with the raw numbers to OUT/parity.json and OUT/parity.md.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tasks", default="openbookqa,winogrande,sst2")
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--out", default="parity")
    args = parser.parse_args()

    from lm import convert
    from lm.bench.evaluation import run_lm_eval, write_peer_inputs
    from lm.evaluation import LanguageModel, evaluate, get_tasks
    from lm.models.transformer import build_model

    out = pathlib.Path(args.out)
    pretrained = convert.load_pretrained(args.model)
    tasks = get_tasks(args.tasks.split(","))
    for task in tasks:
        if task.kind != "multiple_choice":
            raise SystemExit(f"{task.name}: the parity script compares multiple-choice tasks")
    hf_dir, names = write_peer_inputs(pretrained, tasks, args.limit, out)
    task_dir = out / "lm_eval_tasks"

    started = time.perf_counter()
    theirs = run_lm_eval(
        hf_dir,
        task_dir,
        list(names.values()),
        add_bos=pretrained.tokenizer.add_bos,
        batch_size=args.batch_size,
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
