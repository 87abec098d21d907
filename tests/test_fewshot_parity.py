"""Few-shot prompts as lm-evaluation-harness builds them (its default sampler, seed 1234).

The golden holds the requests lm-eval itself sends for the first 100 ARC-Easy test documents
at 5 shots (tests/reference/make_fewshot_goldens.py); the harness must send the same strings.
"""

import json
import pathlib
import random

import pytest
from lm.evaluation import evaluate_task, get_tasks, harness
from lm.evaluation.tasks import Doc, Task

GOLDEN = pathlib.Path(__file__).parent / "goldens" / "arc_easy_5shot_contexts.json"


class Recorder:
    """A model that scores every request 0 and keeps the requests, in the order sent."""

    batch_size = 1

    def __init__(self):
        self.requests = []

    def loglikelihood(self, requests):
        self.requests += requests
        return [(0.0, False)] * len(requests)


def test_arc_easy_5shot_requests_equal_lm_evals():
    golden = json.loads(GOLDEN.read_text())
    recorder = Recorder()
    task = get_tasks(["arc_easy"])[0]
    result = evaluate_task(
        recorder,
        task,
        num_fewshot=golden["num_fewshot"],
        limit=golden["limit"],
        seed=golden["fewshot_random_seed"],
    )
    assert result["docs"] == len(golden["docs"]) == 100
    expected = [(d["context"], c) for d in golden["docs"] for c in d["continuations"]]
    assert len(recorder.requests) == len(expected)
    for n, (ours, theirs) in enumerate(zip(recorder.requests, expected, strict=True)):
        assert ours == theirs, f"request {n}"


def test_default_seed_is_lm_evals():
    assert harness.FEWSHOT_SEED == json.loads(GOLDEN.read_text())["fewshot_random_seed"]


def toy_task(n=30):
    docs = [Doc((f"q{i}?",), (f"a{i}", f"b{i}"), i % 2) for i in range(n)]
    return Task("toy", "multiple_choice", lambda: docs, ("acc",)), docs


def test_same_split_draws_as_lm_evals_sampler():
    """The pool is the evaluated split: lm-eval's ContextSampler, given the document, samples
    k + 1 and drops it. Its draws for the same documents in the same order are ours."""
    samplers = pytest.importorskip("lm_eval.api.samplers")
    task, docs = toy_task()
    rows = [{"i": i, "q": d.contexts[0]} for i, d in enumerate(docs)]
    sampler = samplers.ContextSampler(rows, rnd=1234)
    order = [3, 0, 29, 7, 7, 12]
    theirs = [[r["i"] for r in sampler.sample(4, eval_doc=rows[i])] for i in order[:4]]
    draws = harness.fewshot_indices(task, docs, order[:4], docs, 4, 1234, same_split=True)
    assert [draws[i] for i in order[:4]] == theirs
    assert all(i not in draws[i] and len(set(draws[i])) == 4 for i in order[:4])


def test_draws_follow_the_evaluation_order():
    """One generator per task, consumed document after document (not seeded per document):
    --limit keeps the first documents' examples, a different order changes them."""
    task, docs = toy_task()
    full = harness.fewshot_indices(task, docs, range(30), docs, 3, 1234, same_split=True)
    first = harness.fewshot_indices(task, docs, range(10), docs, 3, 1234, same_split=True)
    assert first == {i: full[i] for i in range(10)}
    reordered = harness.fewshot_indices(task, docs, range(29, -1, -1), docs, 3, 1234, True)
    assert reordered[29] == full[0]  # the first document evaluated gets the first draw
    assert any(reordered[i] != full[i] for i in range(30))
    # What the generator gives: sample(k + 1) over the split, the document dropped.
    rng = random.Random(1234)
    expected = [j for j in rng.sample(range(30), 4) if j != 0][:3]
    assert full[0] == expected
