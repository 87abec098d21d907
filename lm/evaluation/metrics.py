"""Task metrics, each with a standard error: the libraries made for them where one exists.

Every metric returns a :class:`Score` (value and standard error). Per-document means
(accuracy, exact match) use the analytic standard error of a mean; corpus-level metrics
(F1, BLEU, chrF, ROUGE) use a seeded bootstrap over documents, as lm-evaluation-harness
does for them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import numpy as np

BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 1234


@dataclasses.dataclass(frozen=True)
class Score:
    value: float
    stderr: float

    def as_dict(self, name: str) -> dict[str, float]:
        return {name: self.value, f"{name}_stderr": self.stderr}


def mean_score(values: Sequence[float]) -> Score:
    """Mean with the analytic standard error (sample std / sqrt(n))."""
    x = np.asarray(values, np.float64)
    if x.size == 0:
        raise ValueError("no documents to score")
    stderr = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0
    return Score(float(x.mean()), stderr)


def bootstrap_stderr(
    metric: Callable[[np.ndarray], float],
    n: int,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> float:
    """Std of `metric(indices)` over `samples` resamples (with replacement) of n documents."""
    rng = np.random.default_rng(seed)
    values = [metric(rng.integers(0, n, n)) for _ in range(samples)]
    return float(np.std(values, ddof=1))


# ----------------------------------------------------------------------------- choices


def choice_accuracy(
    logprobs: Sequence[Sequence[float]],
    gold: Sequence[int],
    lengths: Sequence[Sequence[int]] | None = None,
) -> Score:
    """Accuracy of argmax over each document's choices.

    logprobs: per document, log p(choice | context) of each choice.
    lengths: per choice, its length in bytes for length-normalised accuracy (acc_norm:
      argmax of logprob / bytes, as the harness); None for plain accuracy.
    Ties go to the first choice, as numpy's argmax (and the harness) does.
    """
    correct = []
    for i, (scores, answer) in enumerate(zip(logprobs, gold, strict=True)):
        scores = np.asarray(scores, np.float64)
        if lengths is not None:
            scores = scores / np.maximum(np.asarray(lengths[i], np.float64), 1.0)
        correct.append(float(int(np.argmax(scores)) == int(answer)))
    return mean_score(correct)


# ----------------------------------------------------------------------------- classification


def precision_recall_f1(
    predictions: Sequence[int], labels: Sequence[int], *, positive: int = 1
) -> dict[str, Score]:
    """Binary precision, recall and F1 of the `positive` class, with bootstrap standard errors.

    An empty denominator counts as 0 (no positive predictions -> precision 0).
    """
    pred = np.asarray(predictions) == positive
    gold = np.asarray(labels) == positive

    def prf(idx):
        p, g = pred[idx], gold[idx]
        tp = float(np.sum(p & g))
        precision = tp / max(float(np.sum(p)), 1.0) if np.any(p) else 0.0
        recall = tp / max(float(np.sum(g)), 1.0) if np.any(g) else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        return precision, recall, f1

    everything = np.arange(pred.size)
    values = prf(everything)
    out = {}
    for k, name in enumerate(("precision", "recall", "f1")):
        stderr = bootstrap_stderr(lambda idx, k=k: prf(idx)[k], pred.size)
        out[name] = Score(values[k], stderr)
    return out


# ----------------------------------------------------------------------------- generation


def exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> Score:
    """1 if the stripped prediction equals (any of) the stripped reference(s)."""
    hits = []
    for pred, refs in zip(predictions, references, strict=True):
        refs = [refs] if isinstance(refs, str) else list(refs)
        hits.append(float(pred.strip() in {r.strip() for r in refs}))
    return mean_score(hits)


def bleu_chrf(predictions: Sequence[str], references: Sequence[str]) -> dict[str, Score]:
    """Corpus BLEU and chrF (sacrebleu's defaults: 13a tokenisation, chrF n=6, beta=2)."""
    import sacrebleu

    preds, refs = list(predictions), list(references)

    def corpus(idx, which):
        p = [preds[i] for i in idx]
        r = [[refs[i] for i in idx]]
        return (
            sacrebleu.corpus_bleu(p, r) if which == "bleu" else sacrebleu.corpus_chrf(p, r)
        ).score

    everything = np.arange(len(preds))
    return {
        which: Score(
            corpus(everything, which),
            bootstrap_stderr(lambda idx, w=which: corpus(idx, w), len(preds), samples=200),
        )
        for which in ("bleu", "chrf")
    }


def rouge(
    predictions: Sequence[str],
    references: Sequence[str],
    kinds: Sequence[str] = ("rouge1", "rouge2", "rougeL"),
) -> dict[str, Score]:
    """Mean ROUGE F-measures (Google's `rouge-score`, with stemming) per document."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(kinds), use_stemmer=True)
    per_doc = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    return {kind: mean_score([s[kind].fmeasure for s in per_doc]) for kind in kinds}


# ----------------------------------------------------------------------------- perplexity


def perplexity_scores(
    logprobs: Sequence[float], tokens: Sequence[int], num_bytes: Sequence[int]
) -> dict[str, float]:
    """Corpus perplexity (per token), bits per byte and mean nats per token from per-document
    total log-probs, token counts and UTF-8 byte counts."""
    total = float(np.sum(logprobs))
    n_tokens, n_bytes = float(np.sum(tokens)), float(np.sum(num_bytes))
    return {
        "perplexity": math.exp(-total / n_tokens),
        "nats_per_token": -total / n_tokens,
        "bits_per_byte": -total / math.log(2) / n_bytes,
    }
