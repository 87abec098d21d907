"""Evaluation of base models: the lm-evaluation-harness model contract (`LanguageModel`)."""

from lm.evaluation.model import LanguageModel

__all__ = ["LanguageModel"]
