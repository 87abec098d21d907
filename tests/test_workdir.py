"""One trainer per workdir (the lease), Ctrl-C, and resumes that notice what changed."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from lm import lease as lease_lib
from lm.checkpoint import Checkpointer

from tests.test_main import ROOT, SMALL_VOCAB, TINY, metrics, run_cli, write_corpus


def write_holder(workdir, number, *, host=None, pid=None, age=0.0):
    directory = workdir / lease_lib.LEASE_DIR
    directory.mkdir(parents=True, exist_ok=True)
    now = time.time()
    holder = dict(
        host=host or socket.gethostname(),
        pid=pid or os.getpid(),
        started=now - age,
        heartbeat=now - age,
        token="t" * 32,
    )
    (directory / f"{number:06d}.json").write_text(json.dumps(holder))


def dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_held_lease_refuses_a_second_trainer_naming_the_holder(tmp_path):
    with lease_lib.Lease(tmp_path, timeout_s=60):
        with pytest.raises(lease_lib.WorkdirBusyError, match=rf"in use .*pid {os.getpid()}"):
            lease_lib.Lease(tmp_path, timeout_s=60).acquire()
    assert not (tmp_path / lease_lib.LEASE_DIR).exists()  # released, folder removed
    with lease_lib.Lease(tmp_path, timeout_s=60) as again:  # free again
        assert again.number == 1


def test_a_stale_lease_is_taken_over_and_the_old_holder_sees_it_lost(tmp_path, caplog):
    write_holder(tmp_path, 4, pid=dead_pid())  # this host, process gone: stale at once
    with lease_lib.Lease(tmp_path, timeout_s=60) as taker:
        assert taker.number == 5
        assert sorted(p.name for p in (tmp_path / "lease").iterdir()) == ["000005.json"]
    assert "not running" in caplog.text
    write_holder(tmp_path, 7, host="elsewhere", age=120)  # another host, old heartbeat
    with lease_lib.Lease(tmp_path, timeout_s=60) as taker:
        assert taker.number == 8
    write_holder(tmp_path, 9, host="elsewhere", age=5)  # another host, fresh heartbeat
    with pytest.raises(lease_lib.WorkdirBusyError, match="elsewhere pid"):
        lease_lib.Lease(tmp_path, timeout_s=60).acquire()
    (tmp_path / "lease" / "000009.json").unlink()
    holder = lease_lib.Lease(tmp_path, timeout_s=60)
    holder.acquire()
    write_holder(tmp_path, holder.number + 1, host="elsewhere")  # a taker after a stall
    holder._check_held()
    with pytest.raises(lease_lib.LeaseLostError, match="another trainer took over"):
        holder.check()


def trainer_cmd(workdir, source, data, *extra):
    return [
        sys.executable,
        "-m",
        "lm.main",
        TINY,
        f"--workdir={workdir}",
        f"--config.data.source={source}",
        f"--config.data.data_dir={data}",
        SMALL_VOCAB,
        *extra,
    ]


def params_at(workdir, step):
    checkpointer = Checkpointer(workdir, async_save=False)
    restored = checkpointer.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
    )["state"]
    checkpointer.close()
    return restored["params"]


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    root = tmp_path_factory.mktemp("unbroken")
    source = write_corpus(root / "corpus")
    run_cli(TINY, "--config.train.steps=40", workdir=root / "run", source=source, data_dir=root)
    return root, source


@pytest.mark.slow
def test_two_trainers_racing_on_one_workdir(unbroken, tmp_path):
    """10 trials: one trains to the end (its parameters equal an unbroken run's), the other
    exits 2 at once naming the holder; neither hangs."""
    root, source = unbroken
    env = {**os.environ, "XLA_FLAGS": "", "LM_CACHE_DIR": str(root)}
    reference = params_at(root / "run", 40)
    for trial in range(10):
        workdir = tmp_path / f"race{trial}"
        cmd = trainer_cmd(workdir, source, root, "--config.train.steps=40")
        procs = [
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(2)
        ]
        outs = [p.communicate(timeout=300) for p in procs]
        codes = sorted(p.returncode for p in procs)
        errors = [err.decode() for _, err in outs]
        assert codes == [0, 2], errors
        loser = errors[[p.returncode for p in procs].index(2)]
        assert "is in use by another trainer" in loser.strip().splitlines()[-1], loser
        assert [m["step"] for m in metrics(workdir)] == [5, 10, 15, 20, 25, 30, 35, 40]
        jax.tree.map(np.testing.assert_array_equal, params_at(workdir, 40), reference)
        assert not (workdir / "lease").exists()


def test_ctrl_c_saves_and_a_rerun_equals_an_unbroken_run(unbroken, tmp_path):
    root, source = unbroken
    workdir = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": "", "LM_CACHE_DIR": str(root)}
    cmd = trainer_cmd(
        workdir, source, root, "--config.train.steps=40", "--config.train.log_every=1"
    )
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and not (
        (workdir / "metrics.jsonl").exists() and len(metrics(workdir)) >= 2
    ):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    assert "Traceback" not in err.decode()
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] < 40, "the run ended before Ctrl-C reached it"
    assert f"stopped at step {saved[-1]}, saved" in out.decode()
    run_cli(TINY, "--config.train.steps=40", workdir=workdir, source=source, data_dir=root)
    jax.tree.map(np.testing.assert_array_equal, params_at(workdir, 40), params_at(root / "run", 40))
    assert [m["step"] for m in metrics(workdir)][-1] == 40  # no step logged twice
    steps = [m["step"] for m in metrics(workdir)]
    assert len(steps) == len(set(steps))


@pytest.mark.slow
def test_a_resume_refuses_math_changes_and_records_the_rest(unbroken, tmp_path):
    root, source = unbroken
    corpus = tmp_path / "corpus"
    source = write_corpus(corpus)
    workdir = tmp_path / "run"
    run_cli(TINY, "--config.train.steps=10", workdir=workdir, source=source, data_dir=tmp_path)
    config = (workdir / "config.json").read_text()

    def rerun(*args):
        return run_cli(TINY, *args, workdir=workdir, source=source, data_dir=tmp_path, check=False)

    for args, expected in [
        (
            ["--config.train.steps=10", "--config.data.batch_size=16"],
            r"data.batch_size 8 -> 16.*--config.train.allow_changes=data.batch_size$",
        ),
        (
            ["--config.train.steps=10", "--config.optimizer.learning_rate=0.01"],
            r"optimizer.learning_rate 0.002 -> 0.01",
        ),
    ]:
        proc = rerun(*args)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert re.search(expected, proc.stderr.strip().splitlines()[-1]), proc.stderr[-500:]
        assert (workdir / "config.json").read_text() == config
    # The corpus edited: refused, naming the data's files.
    part = corpus / "part0.txt"
    part.write_text(part.read_text() + "The king doth love the queen.\n")
    proc = rerun("--config.train.steps=10")
    assert proc.returncode == 2 and "data.files" in proc.stderr.splitlines()[-1]
    # Accepted, and what changes nothing is recorded with its step.
    proc = rerun(
        "--config.train.steps=20",
        "--config.train.log_every=2",
        "--config.train.allow_changes=data.files",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "pass --config.optimizer.decay_steps=10 to keep the schedule" in proc.stderr
    history = json.loads((workdir / "history.json").read_text())
    assert [h["step"] for h in history] == [0, 10]
    assert history[1]["accepted"] == {"data.files": [0, 10]}
    assert history[1]["changes"]["train.log_every"] == [5, 2]
    assert json.loads((workdir / "config.json").read_text())["train"]["log_every"] == 2


@pytest.mark.slow
def test_a_first_run_that_failed_leaves_nothing_a_rerun_reads_as_its_own(tmp_path):
    """A run that stopped before its first checkpoint: a corrected rerun writes its own
    config.json, history and metrics."""
    source = write_corpus(tmp_path / "corpus")
    workdir = tmp_path / "run"
    run_cli(TINY, "--config.train.steps=10", workdir=workdir, source=source, data_dir=tmp_path)
    shutil.rmtree(workdir / "checkpoints")  # as if it died before saving
    run_cli(
        TINY,
        "--config.train.steps=10",
        "--config.data.batch_size=4",
        workdir=workdir,
        source=source,
        data_dir=tmp_path,
    )
    assert json.loads((workdir / "config.json").read_text())["data"]["batch_size"] == 4
    assert [h["step"] for h in json.loads((workdir / "history.json").read_text())] == [0]
    assert [m["step"] for m in metrics(workdir)] == [5, 10]


@pytest.mark.slow
def test_commands_that_read_a_workdir_change_no_byte_of_it(unbroken, tmp_path):
    from tests.test_main import state

    root, _ = unbroken
    workdir = root / "run"
    before = state(workdir)
    for args in [
        ["sample", "--prompt=The king", "--max_new_tokens=4"],
        ["eval", "--split=test"],
        ["eval", "--tasks=heldout_order", "--limit=8", f"--out={tmp_path / 'eval'}"],
        ["icl", "--tasks=heldout_order", "--shots=0,1", "--seeds=1", "--limit=4"]
        + [f"--out={tmp_path / 'icl'}"],
        ["convert", f"--out={tmp_path / 'hf'}"],
    ]:
        run_cli(*args, workdir=workdir, source=None, data_dir=root)
        assert state(workdir) == before, args


def test_a_batch_the_mesh_does_not_split_and_an_unwritable_workdir_fail_up_front(tmp_path):
    source = write_corpus(tmp_path / "corpus")
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
        "LM_CACHE_DIR": str(tmp_path),
    }
    for workdir, extra, expected in [
        (
            tmp_path / "run",
            ["--config.data.batch_size=6"],
            r"data\.batch_size=6 does not split over the 4 ways of the batch .*use a multiple of 4",
        ),
        ("/proc/lm-workdir", [], r"cannot write to --workdir /proc/lm-workdir"),
    ]:
        cmd = trainer_cmd(workdir, source, tmp_path, *extra)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert re.search(expected, proc.stderr.strip().splitlines()[-1]), proc.stderr[-500:]
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())
