"""Evaluation of base models: the lm-evaluation-harness model contract (`LanguageModel`,
`Seq2SeqModel`), tasks as data (`tasks`), metrics and the runner (`harness`)."""

from lm.evaluation.harness import evaluate, evaluate_task, format_table, write_results
from lm.evaluation.model import LanguageModel, Seq2SeqModel, harness_model
from lm.evaluation.tasks import Doc, Task, get_tasks, task_names

__all__ = [
    "Doc",
    "LanguageModel",
    "Seq2SeqModel",
    "Task",
    "evaluate",
    "evaluate_task",
    "format_table",
    "get_tasks",
    "harness_model",
    "task_names",
    "write_results",
]
