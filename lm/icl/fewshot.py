"""Few-shot curves: accuracy against the number of demonstrations k, over several seeds for
the choice of demonstrations, with the random-label control of Min et al. (2022).

    lm = LanguageModel(model, params, tokenizer)
    curves = fewshot_curves(lm, get_tasks(["sst2", "arc_easy"]), shots=(0, 1, 2, 4, 8, 16),
                            seeds=3, limit=100)
    print(format_curves(curves)); plot_curves(curves, "fewshot.png")

Every (task, k, seed) runs the same documents; a seed changes only which demonstrations
each document sees (the harness's sampler, lm-eval's, seeded with FEWSHOT_SEED + seed).
With `control=True` each k > 0 runs a second time with the demonstrations' answers replaced
by options drawn uniformly at random: the gap between the two curves is how much the model
reads the input-label mapping rather than the format and the label space.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import numpy as np

from lm import storage
from lm.evaluation.harness import FEWSHOT_SEED, evaluate_task
from lm.evaluation.tasks import Task

GOLD, RANDOM = "gold", "random"


def fewshot_curves(
    lm,
    tasks: Sequence[Task],
    *,
    shots: Sequence[int] = (0, 1, 2, 4, 8, 16),
    seeds: int = 3,
    limit: int | None = 100,
    control: bool = True,
    metric: str = "acc",
    progress: bool = False,
) -> dict:
    """Runs every task at every k and seed. Returns {"runs": [one row per run: task, k, seed,
    labels, docs, value, seconds], "summary": {task: {labels: {k: {mean, std, n}}}}, "config"}.

    k = 0 has no demonstrations to choose, so it runs once and stands for both label kinds.
    """
    runs = []
    for task in tasks:
        for k in shots:
            for labels in (GOLD, RANDOM) if control and k else (GOLD,):
                for s in range(seeds if k else 1):
                    r = evaluate_task(
                        lm,
                        task,
                        num_fewshot=k,
                        limit=limit,
                        seed=FEWSHOT_SEED + s,
                        progress=progress,
                        shuffle_labels=labels == RANDOM,
                    )
                    if metric not in r["metrics"]:
                        raise ValueError(
                            f"task {task.name} has no metric {metric!r}; it has "
                            f"{sorted(m for m in r['metrics'] if not m.endswith('_stderr'))}"
                        )
                    runs.append(
                        {
                            "task": task.name,
                            "k": k,
                            "seed": s,
                            "labels": labels,
                            "docs": r["docs"],
                            "value": r["metrics"][metric],
                            "seconds": r["seconds"],
                        }
                    )
    return {
        "runs": runs,
        "summary": summarize(runs),
        "config": {
            "shots": list(shots),
            "seeds": seeds,
            "limit": limit,
            "control": control,
            "metric": metric,
            "batch_size": getattr(lm, "batch_size", None),
        },
    }


def summarize(runs: list[dict]) -> dict:
    """{task: {labels: {k: {"mean", "std", "n"}}}}: mean and sample standard deviation over
    seeds; k = 0 is filed under both label kinds (no demonstrations, nothing to shuffle)."""
    grouped: dict = {}
    for run in runs:
        kinds = (GOLD, RANDOM) if run["k"] == 0 else (run["labels"],)
        for labels in kinds:
            grouped.setdefault(run["task"], {}).setdefault(labels, {}).setdefault(
                run["k"], []
            ).append(run["value"])
    out: dict = {}
    for task, by_labels in grouped.items():
        for labels, by_k in by_labels.items():
            if labels == RANDOM and all(k == 0 for k in by_k):
                continue  # no control was run
            for k, values in sorted(by_k.items()):
                v = np.asarray(values, np.float64)
                out.setdefault(task, {}).setdefault(labels, {})[k] = {
                    "mean": float(v.mean()),
                    "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                    "n": len(v),
                }
    return out


def load_curves(path: str | pathlib.Path) -> dict:
    """curves.json (written by `python -m lm.main icl`) -> the dict `fewshot_curves` returned,
    with the numbers of demonstrations k as int keys again (JSON keeps only strings)."""
    path = pathlib.Path(path)
    if path.is_dir():
        path = path / "curves.json"
    curves = json.loads(path.read_text())
    curves["summary"] = {
        task: {labels: {int(k): v for k, v in by_k.items()} for labels, by_k in by_labels.items()}
        for task, by_labels in curves["summary"].items()
    }
    return curves


def format_curves(curves: dict) -> str:
    """A Markdown table: one row per task and label kind, one column per k (mean ± std)."""
    summary = curves["summary"]
    shots = curves["config"]["shots"]
    lines = [
        "| task | demonstrations | " + " | ".join(f"k={k}" for k in shots) + " |",
        "|---|---|" + "---|" * len(shots),
    ]
    for task, by_labels in summary.items():
        for labels, by_k in by_labels.items():
            cells = []
            for k in shots:
                if k not in by_k:
                    cells.append("")
                    continue
                cell = f"{100 * by_k[k]['mean']:.1f}"
                if by_k[k]["n"] > 1:
                    cell += f" ± {100 * by_k[k]['std']:.1f}"
                cells.append(cell)
            lines.append(f"| {task} | {labels} labels | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_curves(
    curves: dict, path: str | pathlib.Path, chance: dict[str, float] | None = None, title: str = ""
) -> pathlib.Path:
    """One panel per task: mean accuracy against k (log-2 axis; k=0 at the left), a band of
    one standard deviation over seeds, gold and random-label demonstrations, chance dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = curves["summary"]
    fig, axes = plt.subplots(1, len(summary), figsize=(4.5 * len(summary), 3.6), squeeze=False)
    for ax, (task, by_labels) in zip(axes[0], summary.items(), strict=True):
        for labels, style in ((GOLD, "o-"), (RANDOM, "s--")):
            if labels not in by_labels:
                continue
            ks = sorted(by_labels[labels])
            x = [0.5 if k == 0 else k for k in ks]  # k=0 on a log axis
            mean = np.array([by_labels[labels][k]["mean"] for k in ks]) * 100
            std = np.array([by_labels[labels][k]["std"] for k in ks]) * 100
            (line,) = ax.plot(x, mean, style, label=f"{labels} labels")
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        if chance and task in chance:
            ax.axhline(100 * chance[task], color="grey", linestyle=":", label="chance")
        ks = sorted(next(iter(by_labels.values())))
        ax.set_xscale("log", base=2)
        ax.set_xticks([0.5 if k == 0 else k for k in ks], [str(k) for k in ks])
        ax.set_xlabel("demonstrations in the prompt (k)")
        ax.set_ylabel(f"{curves['config']['metric']} (%)")
        ax.set_title(task)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = pathlib.Path(path)
    storage.save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def check_accuracy_tasks(tasks: Sequence[Task]) -> None:
    """ValueError naming the tasks that have no accuracy (few-shot curves need multiple-choice
    or classification tasks)."""
    bad = [t.name for t in tasks if t.kind != "multiple_choice"]
    if bad:
        raise ValueError(
            f"icl: tasks {bad} are not multiple-choice or classification tasks; "
            "few-shot curves need accuracy (e.g. sst2, boolq, arc_easy, piqa)"
        )


def chance_levels(tasks: Sequence[Task]) -> dict[str, float]:
    """{task: the accuracy of guessing uniformly}, averaged over its documents."""
    return {t.name: sum(1 / d.num_options for d in t.load()) / len(t.load()) for t in tasks}


def write_curves(curves: dict, out, title: str = "") -> str:
    """Writes `curves` (as `fewshot_curves` returns them, with "chance" and any other keys
    added) to OUT/curves.json, their table to OUT/curves.md and their plot to OUT/fewshot.png
    (OUT: a local directory or a bucket folder, created if missing). Returns the table."""
    out = storage.as_path(out)
    out.mkdir(parents=True, exist_ok=True)
    table = format_curves(curves)
    storage.write_atomic(out / "curves.json", json.dumps(curves, indent=2) + "\n")
    storage.write_atomic(out / "curves.md", table + "\n")
    plot_curves(curves, out / "fewshot.png", chance=curves.get("chance"), title=title)
    return table
