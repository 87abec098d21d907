"""SIGKILL the training CLI at random moments, then let it finish: nothing is lost.

The harness starts `python -m lm.main` on the tiny config again and again and kills it with
SIGKILL: while it starts up, at a random moment of training, and the moment an asynchronous
checkpoint save is being written (Orbax's temporary step directory exists). Then it lets
the run finish and checks, against a run that was never killed:
- the final parameters are bit-identical;
- every step any run logged (steps after the last checkpoint are trained again after a kill)
  has exactly the unbroken run's loss: no step was trained on other data or from another state;
- each rerun resumed from the newest step that was complete when the kill came, never from
  the step whose save was cut short.
"""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
from lm.history import read_history

from tests.test_main import ROOT, metrics, write_corpus
from tests.test_multihost import assert_same_params, env_with, saved_steps

STEPS = 40
SEED = 20261130  # the kill moments; printed with the results


def command(workdir, source, data_dir):
    return [
        sys.executable,
        "-m",
        "lm.main",
        "--config=experiments/shakespeare_gpt.py:tiny",
        f"--workdir={workdir}",
        f"--config.data.source={source}",
        f"--config.data.data_dir={data_dir}",
        "--config.data.vocab_size=320",
        f"--config.train.steps={STEPS}",
        "--config.train.log_every=1",
        "--config.train.checkpoint_every=4",
        "--config.train.eval_every=0",
        "--config.train.sample_tokens=0",
        "--config.train.keep_checkpoints=2",
    ]


def temporary_steps(workdir) -> list[str]:
    """Step directories Orbax is still writing (renamed to the bare step number once complete)."""
    directory = workdir / "checkpoints"
    return (
        sorted(p.name for p in directory.iterdir() if "tmp" in p.name) if directory.exists() else []
    )


def lines(workdir) -> list[str]:
    """metrics.jsonl's complete lines (a line still being written is left out)."""
    path = workdir / "metrics.jsonl"
    text = path.read_text() if path.exists() else ""
    return text.splitlines() if text.endswith("\n") else text.splitlines()[:-1]


def new_rows(workdir, before: list[str]) -> int:
    """How many rows this run has logged: a run drops the rows after the step it resumes from
    and logs those steps again, and every row holds its own timings, so the lines past the
    prefix it shares with `before` (metrics.jsonl at its launch) are this run's."""
    now = lines(workdir)
    shared = next(
        (i for i, (a, b) in enumerate(zip(before, now, strict=False)) if a != b),
        min(map(len, (before, now))),
    )
    return len(now) - shared


def newest_complete(workdir) -> int:
    """The newest checkpoint a run started now resumes from (0: none, a fresh start)."""
    return max(saved_steps(workdir), default=0) if (workdir / "checkpoints").exists() else 0


def started_from(workdir, history_before: list[dict]) -> int | None:
    """The step the run resumed from, by the history.json entry it wrote at its start; None if
    it was killed before writing one."""
    history = read_history(workdir)
    return history[-1]["step"] if history != history_before else None


def kill_when(proc, moment, workdir, rng, before: list[str], timeout=180.0) -> dict:
    """SIGKILLs `proc` at `moment`; returns what the workdir held then. before: metrics.jsonl's
    lines at the launch. 'startup': 0.5 to 4 s after launch (the tiny run takes about 5 s to its
    first step); 'training': 1 to 12 of this run's steps plus up to 10 ms; 'saving': the moment
    the run's first, second or third save is being written (a save takes about as long as 9
    steps, so the first is usually cut short by a 'training' kill too)."""
    start = time.time()
    delay = rng.uniform(0.5, 4.0) if moment == "startup" else rng.uniform(0.0, 0.01)
    steps, saves = int(rng.integers(1, 13)), int(rng.integers(1, 4))
    ready = None  # when the condition for a 'training' kill was met
    writing = set()  # temporary step directories seen in this run
    while True:
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before the {moment} kill"
        assert time.time() - start < timeout, f"no moment for the {moment} kill came"
        now = time.time()
        if moment == "startup" and now - start >= delay:
            break
        if moment == "training" and ready is None and new_rows(workdir, before) >= steps:
            ready = now
        if moment == "training" and ready is not None and now - ready >= delay:
            break
        if moment == "saving" and new_rows(workdir, before):  # older ones are cleaned up by now
            writing.update(temporary_steps(workdir))
            if len(writing) >= saves:
                break
        time.sleep(0.002)
    proc.kill()
    proc.wait()
    return {
        "moment": moment,
        "seconds": round(time.time() - start, 2),
        "writing": temporary_steps(workdir),
        "committed": saved_steps(workdir) if (workdir / "checkpoints").exists() else [],
        "logged": new_rows(workdir, before),
    }


@pytest.mark.slow
def test_sigkill_at_random_moments_loses_nothing(tmp_path):
    source = write_corpus(tmp_path / "corpus", files=6, lines=200)
    data_dir, cache = tmp_path / "data", tmp_path / "cache"
    killed, unbroken = tmp_path / "killed", tmp_path / "unbroken"
    env = env_with(1, cache)
    proc = subprocess.run(
        command(unbroken, source, data_dir),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    reference = {m["step"]: m["loss"] for m in metrics(unbroken)}
    assert sorted(reference) == list(range(1, STEPS + 1))

    rng = np.random.default_rng(SEED)
    moments = ["startup", "saving", "training", "saving", "training", "saving"]
    kills, logged_rows = [], []
    for moment in moments:
        before, history, newest = lines(killed), read_history(killed), newest_complete(killed)
        proc = subprocess.Popen(
            command(killed, source, data_dir),
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        kill = kill_when(proc, moment, killed, rng, before)
        kills.append({**kill, "newest": newest, "started_from": started_from(killed, history)})
        logged_rows += [json.loads(line) for line in lines(killed)]
    history, newest = read_history(killed), newest_complete(killed)
    proc = subprocess.run(
        command(killed, source, data_dir),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"kill moments drawn with seed {SEED}:")
    for kill in kills:
        print(json.dumps(kill))

    assert sum(bool(k["writing"]) for k in kills) >= 3, "fewer kills than planned landed mid-save"
    # Each run resumed from the newest step complete at its launch, never a half-written one.
    # A run that logged a step had written its history entry first.
    runs = [*kills, {"newest": newest, "started_from": started_from(killed, history)}]
    for number, run in enumerate(runs):
        assert run["started_from"] in (run["newest"], None), (number, run)
        assert run.get("logged", 1) == 0 or run["started_from"] is not None, (number, run)
    # Every step, however often it was trained, on the same data and state; the finished
    # metrics.jsonl lists each step once.
    final = metrics(killed)
    assert [row["step"] for row in final] == list(range(1, STEPS + 1))
    for row in logged_rows + final:
        assert row["loss"] == reference[row["step"]], row
    assert temporary_steps(killed) == []
    assert_same_params(killed, unbroken)
