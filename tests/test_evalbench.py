"""The end-to-end evaluation benchmark's own logic: the commands it times, the timing of a
subprocess, the lm-eval task files and the table (no model runs, no timings asserted)."""

import json
import pathlib
import sys
import textwrap

import pytest
from lm.bench import evaluation as evalbench
from lm.evaluation.tasks import Doc, Task


def test_our_side_is_the_cli_command_a_user_types(tmp_path):
    command = evalbench.our_command(
        "smollm2", ["arc_easy", "piqa"], 300, 0, tmp_path / "out", tmp_path / "cache"
    )
    assert command[0] == sys.executable
    assert command[1:] == [
        "-m",
        "lm.main",
        "eval",
        "--model",
        "smollm2",
        "--tasks",
        "arc_easy,piqa",
        "--num_fewshot",
        "0",
        "--limit",
        "300",
        "--out",
        str(tmp_path / "out"),
        "--compilation_cache",
        str(tmp_path / "cache"),
    ]


def test_run_timed_measures_from_launch_and_reads_our_results(tmp_path):
    """A stand-in side that sleeps, records its first scored batch, sleeps again and writes a
    results.json shaped like ours: first scored and wall are measured from the launch."""
    result = tmp_path / "results.json"
    script = textwrap.dedent(f"""
        import json, time
        time.sleep(0.3)
        first = time.time()
        time.sleep(0.3)
        record = {{"first_scored_unix": first, "tasks": {{"piqa": {{"metrics": {{
            "acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.25}}}}}}}}
        open({str(result)!r}, "w").write(json.dumps(record))
    """)
    side = evalbench.run_timed(
        "ours", [sys.executable, "-c", script], result, tmp_path / "side.log"
    )
    assert 0.3 <= side.first_scored < side.wall
    assert side.wall >= 0.6
    assert side.metrics == {"piqa": {"acc": 0.5, "acc_norm": 0.25}}


def test_run_timed_reports_a_failed_side_with_its_log(tmp_path):
    command = [sys.executable, "-c", "print('loading'); raise SystemExit('no weights')"]
    with pytest.raises(RuntimeError, match="no weights"):
        evalbench.run_timed("peer", command, tmp_path / "none.json", tmp_path / "peer.log")


def test_documents_are_written_as_an_lm_eval_task(tmp_path):
    task = Task("demo", "multiple_choice", lambda: [], ("acc", "acc_norm"))
    docs = [
        Doc(contexts=("Question: 1+1?\nAnswer:",), continuations=("2", "3"), gold=0),
        Doc(contexts=("The cat", "The dog"), continuations=("barked.",), gold=1),  # partial
    ]
    name = evalbench.write_lm_eval_task(task, docs, tmp_path)
    assert name == "parity_demo"
    rows = [json.loads(line) for line in (tmp_path / "parity_demo.jsonl").read_text().splitlines()]
    assert rows[0] == {
        "contexts": ["Question: 1+1?\nAnswer:"],
        "continuations": ["2", "3"],
        "gold": 0,
        "partial": False,
    }
    assert rows[1]["partial"] and rows[1]["gold"] == 1
    config = (tmp_path / "parity_demo.yaml").read_text()
    assert "task: parity_demo" in config and 'target_delimiter: " "' in config
    assert config.count("- metric:") == 2
    assert str(tmp_path / "parity_demo.jsonl") in config
    with pytest.raises(ValueError, match="multiple-choice"):
        evalbench.write_lm_eval_task(
            Task("ppl", "perplexity", lambda: [], ("perplexity",)), [], tmp_path
        )


def test_table_gives_times_accuracies_and_ratios():
    metrics = {"piqa": {"acc": 0.65, "acc_norm": 0.6633}}
    sides = [
        evalbench.Side("ours, cold cache", 50.0, 12.0, 60.0, metrics),
        evalbench.Side("ours, warm cache", 40.0, 4.0, 50.0, metrics),
        evalbench.Side("lm-eval + transformers", 200.0, 20.0, 300.0, {"piqa": {"acc": 0.65}}),
    ]
    table = evalbench.format_table(sides, ["piqa"], 300)
    assert "| ours, cold cache | 50.0 | 12.0 | 60.0 | 65.00 | 66.33 |" in table
    assert "| lm-eval + transformers | 200.0 | 20.0 | 300.0 | 65.00 |  |" in table
    assert "cold / warm: 3.00x" in table
    assert "lm-eval + transformers / ours, cold cache: wall 4.00x, CPU 5.00x" in table
    assert "lm-eval + transformers / ours, warm cache: wall 5.00x" in table
    assert "piqa acc +0.00" in table and "acc_norm" not in table.splitlines()[-1]
    alone = evalbench.format_table(sides[:2], ["piqa"], None)
    assert "all documents" in alone and "peer not run" in alone


def test_the_peer_needs_zero_shot():
    with pytest.raises(ValueError, match="zero-shot"):
        evalbench.eval_benchmark(["piqa"], 10, 5, peer=True, workdir=str(pathlib.Path("unused")))
