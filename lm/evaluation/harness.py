"""Runs tasks over a model: few-shot prompts, requests, metrics, results.json and a table.

    lm = LanguageModel(model, params, tokenizer)          # or Seq2SeqModel for translation
    results = evaluate(lm, get_tasks(["arc_easy", "piqa"]), num_fewshot=0, limit=100)
    print(format_table(results))

Few-shot examples are drawn as lm-evaluation-harness's default sampler draws them, so that a
k-shot prompt is the one lm-eval builds from the same pool (tests/test_fewshot_parity.py holds
lm-eval's own ARC-Easy contexts): one `random.Random(seed)` per task (per group: an MMLU
subject is a sub-task of its own in lm-eval), seed 1234 as lm-eval's default
`fewshot_random_seed`, consumed document after document in evaluation order; each document
takes `sample(pool, k)`, or, when the pool is the evaluated split, `sample(pool, k + 1)` less
the document itself (the first k of the rest). So a document's examples depend on the
documents evaluated before it: the same for --limit N as for a full run (the first N
documents are the same ones), and independent of the batch size, but a document's prompt
changes if documents before it are added, dropped or reordered. A task whose examples come
from its own split never shows a document its own answer; `fewshot_order="first"` takes the
pool's first k (lm-eval's `first_n` sampler, as MMLU's dev set is used).
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Sequence

import numpy as np

from lm import storage
from lm.evaluation import metrics as M
from lm.evaluation.tasks import Doc, Task

FEWSHOT_SEED = 1234
ROWS_PER_CHUNK = 2048  # requests per progress update and per packing (a handful of calls)
CHARS_PER_CHUNK = 200_000  # perplexity: text per call (tens of full-context windows, so that
# short documents share batches and long ones still update the progress bar)


def select_docs(docs: list[Doc], limit: int | None) -> list[int]:
    """Indices of the evaluated documents: all, or the first `limit` of each group (MMLU
    subject), as lm-evaluation-harness limits each sub-task."""
    if not limit:
        return list(range(len(docs)))
    taken: dict[str, int] = {}
    chosen = []
    for i, doc in enumerate(docs):
        if taken.get(doc.group, 0) < limit:
            taken[doc.group] = taken.get(doc.group, 0) + 1
            chosen.append(i)
    return chosen


def fewshot_indices(
    task: Task,
    docs: Sequence[Doc],
    chosen: Sequence[int],
    pool: Sequence[Doc],
    k: int,
    seed: int,
    same_split: bool,
) -> dict[int, list[int]]:
    """Each chosen document's k examples, as lm-evaluation-harness's samplers draw them.

    chosen: the evaluated documents in evaluation order (the draws consume one generator per
    group in this order, so a document's examples depend on the documents before it).
    same_split: `pool` is `docs` (the evaluated split): a document is drawn k + 1 examples and
    loses itself, as lm-eval does when it passes the evaluated document to its sampler.
    lm-eval drops the examples equal to the document; dropping the document's own index is
    the same wherever the split has no repeated documents (true of every benchmark here).

    Returns {document index: indices into `pool` of its examples, in the order shown}.
    """
    by_group: dict[str, list[int]] = {}
    for j, shot in enumerate(pool):
        by_group.setdefault(shot.group, []).append(j)
    generators: dict[str, random.Random] = {}
    draws = {}
    for i in chosen:
        group = docs[i].group
        candidates = by_group.get(group, [])
        available = len(candidates) - same_split  # the pool less the document itself
        if k > available:
            raise ValueError(
                f"task {task.name}: {k} few-shot examples asked, but the few-shot pool "
                f"of {group or 'the task'} has {available}"
            )
        if task.fewshot_order == "first":
            draws[i] = [j for j in candidates[: k + 1] if not (same_split and j == i)][:k]
            continue
        generator = generators.setdefault(group, random.Random(seed))
        # random.sample picks positions by the population's length alone, so sampling
        # positions draws the same examples as lm-eval's sample over the documents.
        if same_split:
            drawn = [candidates[p] for p in generator.sample(range(len(candidates)), k + 1)]
            draws[i] = [j for j in drawn if j != i][:k]
        else:
            draws[i] = [candidates[p] for p in generator.sample(range(len(candidates)), k)]
    return draws


def prompt_prefix(
    task: Task, doc: Doc, shots: Sequence[Doc], labels: Sequence[int] | None = None
) -> str:
    """Description and worked examples: each shot is its gold context, the target delimiter,
    its gold continuation and the few-shot delimiter. labels: the option each shot shows
    instead of its gold one (the random-label control of Min et al. 2022)."""
    text = task.description.format(group=doc.group.replace("_", " "))
    for n, shot in enumerate(shots):
        context, continuation = shot.option(shot.gold if labels is None else labels[n])
        text += context + task.target_delimiter + continuation + task.fewshot_delimiter
    return text


def _progress(total: int, name: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=name, unit="doc", dynamic_ncols=True)


def _chunks(indices: list[int], size: int):
    for start in range(0, len(indices), size):
        yield indices[start : start + size]


def _chunks_by_size(indices: list[int], sizes: list[int], budget: int):
    """Consecutive runs of indices whose sizes add up to about `budget` (at least one each)."""
    chunk, total = [], 0
    for i, size in zip(indices, sizes, strict=True):
        if chunk and total + size > budget:
            yield chunk
            chunk, total = [], 0
        chunk.append(i)
        total += size
    if chunk:
        yield chunk


def random_labels(index: int, shots: Sequence[Doc], seed: int) -> list[int]:
    """Each shot's shown option drawn uniformly from its options (gold included), from a
    generator seeded apart from the choice of the shots themselves."""
    rng = np.random.default_rng([seed, index, 1])
    return [int(rng.integers(shot.num_options)) for shot in shots]


def _score_multiple_choice(lm, task: Task, docs, chunk, prefix) -> dict[int, list]:
    """Each document's options' log-likelihoods after its prompt."""
    requests, owners = [], []
    for i in chunk:
        head = prefix(i)
        for j in range(docs[i].num_options):
            context, continuation = docs[i].option(j)
            requests.append((head + context, task.target_delimiter + continuation))
            owners.append(i)
    scored = lm.loglikelihood(requests)
    return {i: [s for s, o in zip(scored, owners, strict=True) if o == i] for i in chunk}


def _score_cloze(lm, task: Task, docs, chunk, prefix) -> dict[int, tuple]:
    """Each document's continuation's (log-likelihood, is greedy)."""
    requests = [
        (prefix(i) + docs[i].contexts[0], task.target_delimiter + docs[i].continuations[0])
        for i in chunk
    ]
    return dict(zip(chunk, lm.loglikelihood(requests), strict=True))


def _score_generation(lm, task: Task, docs, chunk, prefix) -> dict[int, str]:
    """Each document's generated answer, up to the task's stop sequences."""
    requests = [(prefix(i) + docs[i].contexts[0], list(task.stop), task.max_tokens) for i in chunk]
    return {i: text.strip() for i, text in zip(chunk, lm.generate_until(requests), strict=True)}


def _score_perplexity(lm, task: Task, docs, chunk, prefix) -> dict[int, float]:
    """Each whole document's log-likelihood."""
    texts = [docs[i].text for i in chunk]
    return dict(zip(chunk, lm.loglikelihood_rolling(texts), strict=True))


# How each task kind (`lm.evaluation.tasks.KINDS`) is scored: (lm, task, docs, the chunk of
# document indices, i -> its prompt prefix) -> {i: the model's output for document i}.
SCORERS = {
    "multiple_choice": _score_multiple_choice,
    "cloze": _score_cloze,
    "generation": _score_generation,
    "perplexity": _score_perplexity,
}


def evaluate_task(
    lm,
    task: Task,
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    seed: int = FEWSHOT_SEED,
    progress: bool = False,
    shuffle_labels: bool = False,
) -> dict:
    """Scores one task. lm: a LanguageModel (any kind) or Seq2SeqModel (generation only).

    seed: seeds the task's few-shot generator (see the module docstring). shuffle_labels: the
    examples show a random option as their answer instead of the gold one (Min et al. 2022's
    control: how much the model reads the demonstrations' input-label mapping).

    Returns {task, kind, num_fewshot, docs, source, seconds, docs_per_second, metrics:
    {name: value, name_stderr: ...}}.
    """
    if task.kind != "generation" and not hasattr(lm, "loglikelihood"):
        raise ValueError(
            f"task {task.name} ({task.kind}) scores log-likelihoods: it needs a "
            "decoder-only model; an encoder-decoder runs generation tasks "
            "(e.g. translation)"
        )
    started = time.perf_counter()
    docs = task.load()
    if not docs:
        raise ValueError(f"task {task.name} has no documents ({task.source})")
    chosen = select_docs(docs, limit)
    k = task.num_fewshot if num_fewshot is None else num_fewshot
    if task.kind == "perplexity" or (
        task.kind == "generation" and not hasattr(lm, "loglikelihood")
    ):
        k = 0  # whole documents / a translation model: nothing to prompt with
    same_split = task.load_fewshot is None
    pool = docs if same_split else (task.load_fewshot() if k else [])
    # Drawn up front, in evaluation order: each draw advances the task's generator.
    draws = fewshot_indices(task, docs, chosen, pool, k, seed, same_split) if k else {}
    bar = _progress(len(chosen), task.name, progress)

    def prefix(i):
        if not k:
            return task.description.format(group=docs[i].group.replace("_", " "))
        shots = [pool[j] for j in draws[i]]
        labels = random_labels(i, shots, seed) if shuffle_labels else None
        return prompt_prefix(task, docs[i], shots, labels)

    outputs: dict[int, object] = {}
    per_chunk = max(1, ROWS_PER_CHUNK // max(1, max(docs[i].num_options for i in chosen)))
    chunks = _chunks(chosen, per_chunk)
    if task.kind == "perplexity":
        chunks = _chunks_by_size(chosen, [len(docs[i].text) for i in chosen], CHARS_PER_CHUNK)
    for chunk in chunks:
        outputs.update(SCORERS[task.kind](lm, task, docs, chunk, prefix))
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - started
    values = task_metrics(task, [docs[i] for i in chosen], [outputs[i] for i in chosen], lm)
    return {
        "task": task.name,
        "kind": task.kind,
        "num_fewshot": k,
        "seed": seed,
        "shuffled_labels": bool(shuffle_labels and k),
        "docs": len(chosen),
        "of_docs": len(docs),
        "source": task.source,
        "seconds": round(seconds, 2),
        "docs_per_second": round(len(chosen) / seconds, 2),
        "metrics": values,
    }


def task_metrics(task: Task, docs: list[Doc], outputs: list, lm) -> dict[str, float]:
    """The task's metrics (each with its standard error) from per-document outputs."""
    out: dict[str, float] = {}
    wanted = set(task.metrics)
    if task.kind == "multiple_choice":
        logprobs = [[s for s, _ in result] for result in outputs]
        gold = [d.gold for d in docs]
        if "acc" in wanted:
            out.update(M.choice_accuracy(logprobs, gold).as_dict("acc"))
        if "acc_norm" in wanted:
            # As the harness: log-likelihood per character of each choice (delimiter excluded).
            lengths = [[len(d.option(j)[1]) for j in range(d.num_options)] for d in docs]
            out.update(M.choice_accuracy(logprobs, gold, lengths).as_dict("acc_norm"))
        if wanted & {"precision", "recall", "f1"}:
            predictions = [int(np.argmax(row)) for row in logprobs]
            for name, score in M.precision_recall_f1(predictions, gold).items():
                out.update(score.as_dict(name))
    elif task.kind == "cloze":
        logprobs = np.array([s for s, _ in outputs])
        if "acc" in wanted:
            out.update(M.mean_score([float(g) for _, g in outputs]).as_dict("acc"))
        if "perplexity" in wanted:
            value = math.exp(-logprobs.mean())
            stderr = M.bootstrap_stderr(lambda idx: math.exp(-logprobs[idx].mean()), len(logprobs))
            out.update(M.Score(value, stderr).as_dict("perplexity"))
    elif task.kind == "generation":
        references = [d.continuations[0] for d in docs]
        if "exact_match" in wanted:
            out.update(
                M.exact_match(outputs, [(d.continuations[0], *d.references) for d in docs]).as_dict(
                    "exact_match"
                )
            )
        if wanted & {"bleu", "chrf"}:
            for name, score in M.bleu_chrf(outputs, references).items():
                out.update(score.as_dict(name))
        rouges = [m for m in task.metrics if m.startswith("rouge")]
        if rouges:
            for name, score in M.rouge(outputs, references, rouges).items():
                out.update(score.as_dict(name))
    else:
        logprobs = np.array(outputs, np.float64)
        tokens = np.array([len(lm.tokenizer.encode(d.text)) for d in docs], np.float64)
        words = np.array([len(d.text.split()) for d in docs], np.float64)
        num_bytes = np.array([len(d.text.encode("utf-8")) for d in docs], np.float64)

        def corpus(idx):
            total = logprobs[idx].sum()
            return {
                "perplexity": math.exp(-total / tokens[idx].sum()),
                "word_perplexity": math.exp(-total / words[idx].sum()),
                "bits_per_byte": -total / math.log(2) / num_bytes[idx].sum(),
            }

        everything = corpus(np.arange(len(docs)))
        for name in task.metrics:
            stderr = (
                M.bootstrap_stderr(lambda idx, n=name: corpus(idx)[n], len(docs), samples=200)
                if len(docs) > 1
                else 0.0
            )
            out.update(M.Score(everything[name], stderr).as_dict(name))
        out["tokens"] = float(tokens.sum())
    return out


def evaluate(
    lm,
    tasks: Sequence[Task],
    *,
    num_fewshot: int | None = None,
    limit: int | None = None,
    seed: int = FEWSHOT_SEED,
    progress: bool = False,
) -> dict:
    """{"tasks": {name: result of evaluate_task}, "config": {...}, "first_scored_unix": the
    time.time() at which the model's first batch of results came back (`lm.first_scored`;
    None for a model that does not record it)} for several tasks."""
    results = {
        task.name: evaluate_task(
            lm, task, num_fewshot=num_fewshot, limit=limit, seed=seed, progress=progress
        )
        for task in tasks
    }
    return {
        "tasks": results,
        "config": {
            "num_fewshot": num_fewshot,
            "limit": limit,
            "seed": seed,
            "batch_size": getattr(lm, "batch_size", None),
        },
        "first_scored_unix": getattr(lm, "first_scored", None),
    }


def format_table(results: dict) -> str:
    """A Markdown table: task, k, documents, metric, value, standard error, docs/s."""
    lines = [
        "| task | k | docs | metric | value | stderr | docs/s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in results["tasks"].items():
        for metric, value in r["metrics"].items():
            if metric.endswith("_stderr") or metric == "tokens":
                continue
            stderr = r["metrics"].get(f"{metric}_stderr")
            shown = f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
            lines.append(
                f"| {name} | {r['num_fewshot']} | {r['docs']} | {metric} | {shown} | "
                f"{'' if stderr is None else f'{stderr:.4f}'} | {r['docs_per_second']} |"
            )
    return "\n".join(lines)


def write_results(results: dict, out) -> str:
    """Writes `results` (as `evaluate` returns them, with any keys added) to OUT/results.json and
    their table to OUT/results.md (OUT: a local directory or a bucket folder, created if
    missing). Returns the table."""
    out = storage.as_path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(results)
    storage.write_atomic(out / "results.json", json.dumps(results, indent=2) + "\n")
    storage.write_atomic(out / "results.md", table + "\n")
    return table
