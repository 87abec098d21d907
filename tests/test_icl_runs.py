"""ICL experiments train through lm.train's one loop: SIGTERM saves, SIGKILL loses only the steps
since the last checkpoint, reruns end exactly where an unbroken run ends, and launch.sweep runs
them like any other experiment."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from lm import checkpoint

from tests.test_main import ROOT, metrics

EXPERIMENTS = {
    "induction": "experiments/induction_heads.py:tiny",
    "regression": "experiments/garg_linear_regression.py:tiny",
}
STEPS = 600


def command(config, workdir, *extra):
    return [
        sys.executable,
        "-m",
        "lm.main",
        f"--config={config}",
        f"--workdir={workdir}",
        f"--config.train.steps={STEPS}",
        "--config.train.log_every=1",
        "--config.train.eval_every=200",
        "--config.train.checkpoint_every=20",
        "--config.train.progress=false",
        *extra,
    ]


def env(tmp_path):
    return {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "LM_CACHE_DIR": str(tmp_path)}


def complete_rows(workdir) -> list[dict]:
    """The rows of a running or killed run's metrics.jsonl, less a line still being written."""
    path = workdir / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def last_step(workdir) -> int:
    """The last step in a running run's metrics.jsonl (-1 if none)."""
    return max((row["step"] for row in complete_rows(workdir)), default=-1)


def signal_when(proc, workdir, step, sig, timeout=240.0):
    """Sends `sig` once the run has logged `step`; fails if the run ended first."""
    deadline = time.time() + timeout
    while last_step(workdir) < step:
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before step {step}"
        assert time.time() < deadline, f"step {step} was not logged in {timeout} s"
        time.sleep(0.05)
    proc.send_signal(sig)
    return proc.wait(timeout=120)


def final_params(workdir):
    step, params = checkpoint.read_params(workdir, checkpoint.read_config(workdir))
    return step, params


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(EXPERIMENTS))
def test_icl_run_resumes_exactly_after_sigterm_and_sigkill(tmp_path, kind):
    config = EXPERIMENTS[kind]
    unbroken, broken = tmp_path / "unbroken", tmp_path / "broken"
    done = subprocess.run(
        command(config, unbroken), cwd=ROOT, env=env(tmp_path), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]

    # SIGTERM: the run saves the step it reached and exits 0.
    proc = subprocess.Popen(command(config, broken), cwd=ROOT, env=env(tmp_path))
    assert signal_when(proc, broken, 50, signal.SIGTERM) == 0
    saved = checkpoint.Checkpointer(broken, async_save=False)
    stopped = saved.latest_step()
    saved.close()
    assert 50 <= stopped < STEPS and stopped == last_step(broken)
    # SIGKILL: nothing is saved at the kill; the rerun restarts from the last checkpoint.
    proc = subprocess.Popen(command(config, broken), cwd=ROOT, env=env(tmp_path))
    assert signal_when(proc, broken, stopped + 70, signal.SIGKILL) == -signal.SIGKILL
    saved = checkpoint.Checkpointer(broken, async_save=False)
    resumed_from = saved.latest_step()
    saved.close()
    killed_rows = [r for r in complete_rows(broken) if "loss" in r]
    assert max(r["step"] for r in killed_rows) > resumed_from  # steps the rerun trains again
    finished = subprocess.run(
        command(config, broken), cwd=ROOT, env=env(tmp_path), capture_output=True, text=True
    )
    assert finished.returncode == 0, finished.stderr[-3000:]

    # Bit for bit the unbroken run's parameters, and every logged step has its loss.
    (step_a, ours), (step_b, theirs) = final_params(broken), final_params(unbroken)
    assert step_a == step_b == STEPS
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(theirs), strict=True
    ):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    # The rerun dropped the killed run's rows after its checkpoint and logged them again.
    reference = {r["step"]: r for r in metrics(unbroken) if "loss" in r}
    rows = [r for r in metrics(broken) if "loss" in r]
    assert [r["step"] for r in rows] == sorted(reference)
    for row in rows + killed_rows:
        assert row["loss"] == reference[row["step"]]["loss"], row["step"]
    results = "summary.json" if kind == "induction" else "errors.json"
    ours, theirs = (json.loads((w / results).read_text()) for w in (broken, unbroken))
    ours.pop("wall_time_s", None), theirs.pop("wall_time_s", None)
    assert ours == theirs


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(EXPERIMENTS))
def test_icl_experiment_runs_under_launch_sweep(tmp_path, kind):
    root = tmp_path / "sweep"
    metric = "probe/repeat_loss_ratio" if kind == "induction" else "eval/loss"
    cmd = [
        sys.executable,
        "-m",
        "launch.sweep",
        EXPERIMENTS[kind],
        f"--workdir={root}",
        "--parallel=2",
        f"--metric={metric}",
        "--config.train.steps=12",
    ]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env(tmp_path), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(root / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["status"] == "finished" and r["step"] == "12" for r in rows)
    values = [float(r[metric]) for r in rows]
    assert values == sorted(values) and all(np.isfinite(values))
    layers = {int(r["model.num_layers"]) for r in rows}
    assert layers == ({1, 2} if kind == "induction" else {2, 4})
    for r in rows:
        saved = json.loads((root / r["name"] / "config.json").read_text())
        assert saved["model"]["num_layers"] == int(r["model.num_layers"])
        assert saved["icl"]["kind"] == kind


@pytest.mark.slow
def test_icl_run_on_a_mesh_equals_one_device_and_shows_progress(tmp_path):
    """The regression run on 8 fake devices (batch split over the mesh's data axis) logs the
    losses of the same run on one device, and the loop's progress bar shows on stderr."""
    runs = {}
    for devices in (1, 8):
        workdir = tmp_path / f"devices{devices}"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "lm.main",
                f"--config={EXPERIMENTS['regression']}",
                f"--workdir={workdir}",
                "--config.train.log_every=1",
                "--config.train.progress=true",
            ],
            cwd=ROOT,
            env={**env(tmp_path), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"},
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "train: 100%" in proc.stderr and "20/20" in proc.stderr
        runs[devices] = [r["loss"] for r in metrics(workdir) if "loss" in r]
        saved = json.loads((workdir / "config.json").read_text())
        assert saved["parallel"]["mesh"] == [-1, 1, 1]
    assert len(runs[1]) == 20
    # Measured: at most 1.7e-7 apart, relative (sums over the batch in another order).
    np.testing.assert_allclose(runs[8], runs[1], rtol=2e-6)
