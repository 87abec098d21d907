"""Metrics against values worked out by hand or known from the libraries' own definitions."""

import math

import numpy as np
import pytest
from lm.evaluation import metrics


def test_accuracy_and_length_normalised_accuracy():
    logprobs = [[-1.0, -2.0], [-6.0, -4.0], [-3.0, -3.5]]
    gold = [0, 1, 1]
    acc = metrics.choice_accuracy(logprobs, gold)
    assert acc.value == pytest.approx(2 / 3)
    assert acc.stderr == pytest.approx(np.std([1, 1, 0], ddof=1) / math.sqrt(3))
    # Per byte, the third document's second choice (-3.5 over 7 bytes) beats -3.0 over 3.
    norm = metrics.choice_accuracy(logprobs, gold, lengths=[[1, 1], [1, 1], [3, 7]])
    assert norm.value == pytest.approx(1.0) and norm.stderr == 0.0


def test_ties_go_to_the_first_choice():
    assert metrics.choice_accuracy([[-1.0, -1.0]], [1]).value == 0.0


def test_precision_recall_f1_by_hand():
    predictions = [1, 1, 1, 0, 0, 1, 0, 0]
    labels = [1, 0, 1, 1, 0, 1, 0, 0]
    scores = metrics.precision_recall_f1(predictions, labels)
    # tp = 3, fp = 1, fn = 1
    assert scores["precision"].value == pytest.approx(0.75)
    assert scores["recall"].value == pytest.approx(0.75)
    assert scores["f1"].value == pytest.approx(0.75)
    assert 0.0 < scores["f1"].stderr < 0.5
    again = metrics.precision_recall_f1(predictions, labels)
    assert again["f1"].stderr == scores["f1"].stderr  # seeded bootstrap


def test_no_positive_predictions_is_zero_precision():
    scores = metrics.precision_recall_f1([0, 0, 0], [1, 0, 1])
    assert scores["precision"].value == 0.0 and scores["recall"].value == 0.0
    assert scores["f1"].value == 0.0


def test_exact_match_strips_and_accepts_any_reference():
    score = metrics.exact_match(
        [" Paris", "London", "rome"], ["Paris", ["Berlin", "London "], "Rome"]
    )
    assert score.value == pytest.approx(2 / 3)


def test_bleu_and_chrf_match_sacrebleu():
    import sacrebleu

    preds = ["the cat sat on the mat", "a dog ran in the park today", "hello world"]
    refs = ["the cat sat on the mat", "the dog ran in the park", "hello there world"]
    scores = metrics.bleu_chrf(preds, refs)
    assert scores["bleu"].value == pytest.approx(sacrebleu.corpus_bleu(preds, [refs]).score)
    assert scores["chrf"].value == pytest.approx(sacrebleu.corpus_chrf(preds, [refs]).score)
    assert metrics.bleu_chrf(refs, refs)["bleu"].value == pytest.approx(100.0)
    assert scores["bleu"].stderr > 0


def test_rouge_by_hand():
    scores = metrics.rouge(["the cat sat"], ["the cat sat down"])
    # ROUGE-1: precision 3/3, recall 3/4 -> F = 6/7.
    assert scores["rouge1"].value == pytest.approx(6 / 7)
    assert scores["rouge2"].value == pytest.approx(2 * 1 * (2 / 3) / (1 + 2 / 3))


def test_perplexity_and_bits_per_byte():
    out = metrics.perplexity_scores([-10.0, -20.0], [5, 10], [20, 40])
    assert out["nats_per_token"] == pytest.approx(2.0)
    assert out["perplexity"] == pytest.approx(math.exp(2.0))
    assert out["bits_per_byte"] == pytest.approx(30 / math.log(2) / 60)
