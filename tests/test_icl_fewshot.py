"""Few-shot curves and the random-label control (Min et al. 2022)."""

import re

import numpy as np
import pytest
from lm.evaluation import evaluate_task, harness
from lm.evaluation.tasks import Doc, Task
from lm.icl import fewshot


def parity_task(n=60):
    """'x3 ->' is 'odd': a label mapping that only the demonstrations reveal."""
    docs = [Doc((f"x{i} ->",), ("even", "odd"), i % 2) for i in range(n)]
    return Task("parity", "multiple_choice", lambda: docs, ("acc",)), docs


class LabelReader:
    """A fake model that answers by the demonstrations it is shown: the label given most often
    to inputs of the query's parity (ties: no preference). It reads the mapping, nothing else."""

    batch_size = 1

    def __init__(self):
        self.contexts = []

    def loglikelihood(self, requests):
        out = []
        for context, continuation in requests:
            self.contexts.append(context)
            *shots, query = context.split("\n\n")
            parity = int(re.fullmatch(r"x(\d+) ->", query).group(1)) % 2
            votes = {"even": 0, "odd": 0}
            for shot in shots:
                number, label = re.fullmatch(r"x(\d+) -> (\w+)", shot).groups()
                if int(number) % 2 == parity:
                    votes[label] += 1
            out.append((float(votes[continuation.strip()]), False))
        return out


def test_random_labels_keep_the_shots_and_change_only_answers():
    task, docs = parity_task()
    gold, shuffled = LabelReader(), LabelReader()
    evaluate_task(gold, task, num_fewshot=4, seed=7)
    evaluate_task(shuffled, task, num_fewshot=4, seed=7, shuffle_labels=True)
    strip = [re.sub(r"-> \w+", "->", c) for c in gold.contexts]
    assert strip == [re.sub(r"-> \w+", "->", c) for c in shuffled.contexts]  # same inputs
    assert gold.contexts != shuffled.contexts
    shown = [re.findall(r"x(\d+) -> (\w+)", c) for c in shuffled.contexts]
    wrong = np.mean([("even", "odd")[int(n) % 2] != label for row in shown for n, label in row])
    assert 0.3 < wrong < 0.7  # uniform over two options: half the answers are wrong
    again = LabelReader()
    evaluate_task(again, task, num_fewshot=4, seed=7, shuffle_labels=True)
    assert again.contexts == shuffled.contexts  # seeded


def test_control_separates_a_model_that_reads_the_labels():
    task, _ = parity_task()
    curves = fewshot.fewshot_curves(LabelReader(), [task], shots=(0, 8), seeds=3, limit=None)
    summary = curves["summary"]["parity"]
    assert summary["gold"][0] == summary["random"][0]  # k=0: one run stands for both
    assert summary["gold"][0]["n"] == 1 and summary["gold"][0]["mean"] == pytest.approx(0.5)
    assert summary["gold"][8]["mean"] > 0.95 and summary["gold"][8]["n"] == 3
    assert summary["random"][8]["mean"] < 0.75
    runs = [r for r in curves["runs"] if r["k"] == 8 and r["labels"] == "gold"]
    assert summary["gold"][8]["std"] == pytest.approx(np.std([r["value"] for r in runs], ddof=1))


def test_table_and_plot(tmp_path):
    runs = [
        {"task": "t", "k": 0, "seed": 0, "labels": "gold", "docs": 4, "value": 0.5, "seconds": 1},
        *(
            {"task": "t", "k": 2, "seed": s, "labels": lab, "docs": 4, "value": v, "seconds": 1}
            for lab, vals in (("gold", (0.75, 1.0)), ("random", (0.5, 0.5)))
            for s, v in enumerate(vals)
        ),
    ]
    curves = {
        "runs": runs,
        "summary": fewshot.summarize(runs),
        "config": {"shots": [0, 2], "metric": "acc"},
    }
    table = fewshot.format_curves(curves).splitlines()
    assert table[2] == "| t | gold labels | 50.0 | 87.5 ± 17.7 |"
    assert table[3] == "| t | random labels | 50.0 | 50.0 ± 0.0 |"
    path = fewshot.plot_curves(curves, tmp_path / "c.png", chance={"t": 0.5})
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_prompt_prefix_shows_the_given_labels():
    task, docs = parity_task()
    assert (
        harness.prompt_prefix(task, docs[0], docs[1:3], labels=[0, 1])
        == "x1 -> even\n\nx2 -> odd\n\n"
    )
    assert harness.prompt_prefix(task, docs[0], docs[1:3]) == "x1 -> odd\n\nx2 -> even\n\n"
