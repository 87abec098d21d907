"""Seeing what a run does: profile windows the profiler's reader parses, the compiled step
written out, the hang watchdog (one process, one of two), and the goodput ledger."""

import glob
import json
import math
import os
import signal
import subprocess
import sys
import time

import jax
import pytest
from lm import parallel
from lm.models import transformer as T
from lm.train import IndexedBatches, OptimizerConfig, TrainConfig, create_trainer, train_loop
from lm.train.goodput import BUCKETS, Ledger, format_ledger, read_ledger, totals
from lm.train.profile import PROFILE_TRIGGER
from lm.train.watchdog import WATCHDOG_EXIT, name_laggards

from tests.hang_run import CONFIG, blocking_batch_source
from tests.test_main import ROOT
from tests.test_multihost import free_port


def tiny_trainer():
    return create_trainer(
        CONFIG,
        T.build_model(CONFIG),
        OptimizerConfig(learning_rate=1e-2),
        100,
        parallel.ParallelConfig(),
        devices=jax.devices()[:1],
    )


def traced_steps(workdir) -> list[int]:
    """The step numbers of the "train" step annotations in every trace of WORKDIR/profile, as
    the profiler's own reader (`jax.profiler.ProfileData`) finds them."""
    steps = []
    for path in glob.glob(str(workdir / "profile" / "**" / "*.xplane.pb"), recursive=True):
        for plane in jax.profiler.ProfileData.from_file(path).planes:
            for line in plane.lines:
                steps += [dict(e.stats)["step_num"] for e in line.events if e.name == "train"]
    return sorted(steps)


@pytest.fixture(scope="module")
def scheduled(tmp_path_factory):
    """(workdir, trainer) of a run that traces steps 3 and 4 and dumps its compiled step."""
    workdir, trainer = tmp_path_factory.mktemp("scheduled"), tiny_trainer()
    config = TrainConfig(
        steps=6,
        log_every=2,
        checkpoint_every=100,
        progress=False,
        profile_start=3,
        profile_steps=2,
        dump_compiled=True,
    )
    train_loop(trainer, config, workdir, IndexedBatches(blocking_batch_source))
    return workdir, trainer


def test_a_scheduled_window_is_traced_and_the_compiled_step_is_written(scheduled):
    workdir, trainer = scheduled
    assert traced_steps(workdir) == [3, 4]
    hlo = (workdir / "compiled" / "train_step.hlo.txt").read_text()
    assert hlo.startswith("HloModule jit_train_step")
    report = json.loads((workdir / "compiled" / "train_step.json").read_text())
    # The step's arguments hold the parameters and Adam's two moments, at least.
    params = jax.tree.leaves(trainer.abstract_state.params)
    param_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in params)
    assert report["memory_bytes_per_device"]["arguments"] >= 3 * param_bytes
    assert report["cost_analysis"]["flops"] > 0
    assert all("{" not in key for key in report["cost_analysis"])


def test_xprof_reads_the_trace_and_shows_the_steps(scheduled):
    """What `xprof --logdir WORKDIR/profile` serves (the [profile] extra; CI installs it)."""
    raw_to_tool_data = pytest.importorskip("xprof.convert.raw_to_tool_data")
    workdir, _ = scheduled
    paths = glob.glob(str(workdir / "profile" / "**" / "*.xplane.pb"), recursive=True)
    assert {"trace_viewer@", "overview_page", "op_profile"} <= set(
        raw_to_tool_data.xspace_to_tool_names(paths)
    )
    data, _ = raw_to_tool_data.xspace_to_tool_data(paths, "trace_viewer@", {})
    names = {event.get("name") for event in json.loads(data)["traceEvents"]}
    assert {"train 3", "train 4"} <= names and "train 2" not in names


def test_windows_are_traced_on_demand_by_a_file_and_by_sigusr1(tmp_path):
    def batch_at(position):
        if position == 3:  # while step 4 waits for its batch; seen at the log line of step 4
            (tmp_path / PROFILE_TRIGGER).touch()
        if position == 7:  # seen before step 9; a second apart, the traces get their own folder
            time.sleep(1.1)
            os.kill(os.getpid(), signal.SIGUSR1)
        return blocking_batch_source(position)

    (tmp_path / PROFILE_TRIGGER).touch()  # there before the run: not a request
    config = TrainConfig(
        steps=12, log_every=2, checkpoint_every=100, progress=False, profile_steps=2
    )
    train_loop(tiny_trainer(), config, tmp_path, IndexedBatches(batch_at))
    assert traced_steps(tmp_path) == [5, 6, 9, 10]


def hang_command(workdir, timeout, hang_process, hang_at, *multi):
    args = [str(workdir), str(timeout), str(hang_process), str(hang_at), *map(str, multi)]
    return [sys.executable, "-m", "tests.hang_run", *args]


def env_with_devices(count):
    return {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}",
    }


@pytest.mark.slow
def test_the_watchdog_stops_a_hung_batch_source_with_its_stack_and_status(tmp_path):
    workdir, timeout = tmp_path / "run", 4
    proc = subprocess.run(
        hang_command(workdir, timeout, 0, 5),
        cwd=ROOT,
        env=env_with_devices(1),
        capture_output=True,
        text=True,
        timeout=240,
    )
    ended = time.time()
    assert proc.returncode == WATCHDOG_EXIT, proc.stderr[-3000:]
    hung_since = float((tmp_path / "run.hang").read_text())
    assert ended - hung_since < timeout + 10
    assert f"no training step completed for {timeout}" in proc.stderr
    assert "in blocking_batch_source" in proc.stderr  # the blocked thread's stack
    runs = read_ledger(workdir)
    assert runs[-1]["outcome"] == "hung" and runs[-1]["last_step"] >= 4


@pytest.mark.slow
def test_the_watchdog_names_the_one_of_two_processes_that_hangs(tmp_path):
    workdir, timeout, port = tmp_path / "run", 6, free_port()
    logs = [open(tmp_path / f"p{i}.log", "w") for i in range(2)]
    procs = [
        subprocess.Popen(
            hang_command(workdir, timeout, 1, 5, port, 2, i),
            cwd=ROOT,
            env=env_with_devices(2),
            stdout=logs[i],
            stderr=subprocess.STDOUT,
        )
        for i in range(2)
    ]
    codes = [p.wait(timeout=300) for p in procs]
    ended = time.time()
    texts = [(tmp_path / f"p{i}.log").read_text() for i in range(2)]
    assert codes == [WATCHDOG_EXIT, WATCHDOG_EXIT], texts[0][-3000:] + texts[1][-3000:]
    hung_since = float((tmp_path / "run.hang").read_text())
    assert ended - hung_since < timeout + 10
    assert "in blocking_batch_source" in texts[1]  # the hung process's own stack
    for text in texts:
        assert "the process(es) the others wait for: 1\n" in text, text[-3000:]
        # The per-process step times of the log steps before the hang.
        assert "seconds per step by process (waiting for data): 0: " in text


def test_laggards_are_the_fewest_steps_done_and_then_those_off_the_devices():
    states = {
        0: {"done": 4, "bucket": "steps"},
        1: {"done": 4, "bucket": "data_wait"},
        2: {"done": 5, "bucket": "data_wait"},
    }
    assert name_laggards(states) == [1]
    assert name_laggards({**states, 1: {"done": 4, "bucket": "steps"}}) == [0, 1]
    assert name_laggards({**states, 0: {"done": 3, "bucket": "steps"}}) == [0]


def test_the_ledger_splits_the_wall_time_and_counts_steps_taken_again(tmp_path):
    start = time.time() - 1.0  # the process started a second ago
    first = Ledger(tmp_path, start)
    first.begin(0)
    for step in range(1, 5):
        first.enter("data_wait", step)
        first.enter("steps", step)
        time.sleep(0.01)
        first.step_done(step)
    first.enter("checkpoint_save")
    first.close("finished")
    second = Ledger(tmp_path, time.time())
    second.begin(2)  # resumed from step 2: steps 3 and 4 are taken again
    second.enter("data_wait", 3)
    second.enter("steps", 3)
    time.sleep(0.05)
    second.step_done(3)
    second.enter("steps", 5)
    time.sleep(0.02)
    runs = second.close("finished")
    assert runs == read_ledger(tmp_path)
    for run in runs:
        assert sum(run["buckets"].values()) == pytest.approx(run["wall"], rel=1e-9)
    assert runs[0]["buckets"]["startup"] >= 1.0
    assert runs[1]["buckets"]["retrained"] >= 0.05
    assert 0.02 <= runs[1]["buckets"]["steps"] < 0.05
    total = totals(runs)
    assert set(BUCKETS) < set(total)
    assert "productive share (training steps):" in format_ledger(runs)


def test_the_ledger_is_written_while_the_run_goes_on(tmp_path):
    ledger = Ledger(tmp_path, time.time(), flush_every_s=0.05)
    ledger.enter("steps", 1)
    time.sleep(0.3)
    written = read_ledger(tmp_path)[-1]  # a run killed now keeps what is written
    assert written["outcome"] == "running" and written["wall"] >= 0.2
    ledger.close("finished")


@pytest.mark.slow
def test_goodput_buckets_sum_to_the_wall_time_of_a_run_killed_once_and_resumed(tmp_path):
    from tests.test_crash_harness import command
    from tests.test_main import write_corpus
    from tests.test_multihost import env_with

    source = write_corpus(tmp_path / "corpus", files=6, lines=200)
    workdir, env = tmp_path / "run", env_with(1, tmp_path / "cache")
    # Long enough that what the ledger cannot see (the interpreter's exit after its last write,
    # up to a flush period before the kill) is well under 2% of the wall time.
    steps = ["--config.train.steps=10000", "--config.train.log_every=100"]
    cmd = [
        *command(workdir, source, tmp_path / "data"),
        *steps,
        "--config.train.checkpoint_every=2500",
    ]
    launched = time.time()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    while not (workdir / "checkpoints" / "5000").exists():  # killed past its second checkpoint
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        time.sleep(0.01)
    time.sleep(0.5)
    proc.kill()
    proc.wait()
    killed = time.time() - launched
    launched = time.time()
    finished = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    resumed = time.time() - launched
    assert finished.returncode == 0, finished.stderr[-3000:]
    runs = read_ledger(workdir)
    assert [r["outcome"] for r in runs] == ["running", "finished"]  # the kill left it running
    total = totals(runs)
    assert sum(total[b] for b in BUCKETS) == pytest.approx(total["wall"], rel=1e-9)
    walls = [r["wall"] for r in runs]
    assert total["wall"] == pytest.approx(killed + resumed, rel=0.02), (walls, killed, resumed)
    assert (
        runs[1]["first_step"] >= 5000 and total["retrained"] > 0
    )  # the steps after the checkpoint
    assert total["restore"] > 0 and total["compile"] > 0 and total["steps"] > 0
    assert "productive share (training steps):" in finished.stdout
    summary = subprocess.run(
        [sys.executable, "-m", "lm.main", "summary", f"--workdir={workdir}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert summary.returncode == 0, summary.stderr[-3000:]
    assert "10000 of 10000 steps saved" in summary.stdout and "2 start(s)" in summary.stdout
    assert "goodput over 2 start(s)" in summary.stdout


def test_summary_of_a_directory_without_a_run_is_one_line_and_status_2(tmp_path):
    (tmp_path / "notes.txt").write_text("not a run")
    proc = subprocess.run(
        [sys.executable, "-m", "lm.main", "summary", f"--workdir={tmp_path}"],
        cwd=ROOT,
        env=env_with_devices(1),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {tmp_path} holds no run (no config.json): pass the workdir of a run"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]  # wrote nothing
