"""Two processes joined by jax.distributed on 127.0.0.1 train exactly like one process.

Each process is `python -m lm.main` with 4 fake CPU devices and an explicit coordinator;
the reference is one process with 8 devices on the same ('data', 'fsdp', 'tensor') mesh.
With a fixed `data.shards` the global batches are the same in both layouts, so the losses
agree to float rounding, and a checkpoint written by the pair resumes in one process.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from tests.test_main import ROOT, metrics, write_corpus

MESH = "--config.parallel.mesh=(2,2,2)"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lm_command(workdir, corpus, data_dir, steps, *extra):
    return [
        sys.executable,
        "-m",
        "lm.main",
        "--config=experiments/shakespeare_gpt.py:tiny",
        f"--workdir={workdir}",
        f"--config.data.source={corpus}",
        f"--config.data.data_dir={data_dir}",
        "--config.data.vocab_size=320",
        "--config.data.shards=2",
        f"--config.train.steps={steps}",
        "--config.train.log_every=1",
        "--config.train.eval_every=3",
        "--config.train.checkpoint_every=3",
        "--config.train.sample_tokens=4",
        MESH,
        *extra,
    ]


def env_with(devices, cache):
    return {
        **os.environ,
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
        "LM_CACHE_DIR": str(cache),
        "JAX_PLATFORMS": "cpu",
    }


def start_pair(workdir, corpus, data_dir, steps, *extra, cache):
    """Two processes with 4 devices each; their output goes to <workdir>.p<i>.log."""
    port = free_port()
    procs = []
    for i in range(2):
        log = open(f"{workdir}.p{i}.log", "w")
        cmd = lm_command(
            workdir,
            corpus,
            data_dir,
            steps,
            *extra,
            f"--config.parallel.coordinator_address=127.0.0.1:{port}",
            "--config.parallel.num_processes=2",
            f"--config.parallel.process_id={i}",
        )
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env_with(4, cache), stdout=log, stderr=subprocess.STDOUT
            )
        )
    return procs


def wait_all(procs, workdir, timeout=300):
    for i, proc in enumerate(procs):
        if proc.wait(timeout=timeout) != 0:
            for other in procs:
                other.kill()
            log = open(f"{workdir}.p{i}.log").read()[-4000:]
            raise AssertionError(f"process {i} failed ({proc.returncode}):\n{log}")


def run_one(workdir, corpus, data_dir, steps, cache):
    proc = subprocess.run(
        lm_command(workdir, corpus, data_dir, steps),
        cwd=ROOT,
        env=env_with(8, cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    return root, write_corpus(root / "corpus", files=12, lines=100), root / "data", root / "cache"


@pytest.mark.slow
def test_two_processes_train_like_one_and_their_checkpoint_resumes_in_one(corpus):
    root, source, data_dir, cache = corpus
    pair, one = root / "pair", root / "one"
    wait_all(start_pair(pair, source, data_dir, 3, cache=cache), pair)
    run_one(one, source, data_dir, 6, cache)

    by_pair, unbroken = metrics(pair), metrics(one)
    assert [m["step"] for m in by_pair] == [1, 2, 3]  # written once, by process 0
    for key in ("loss", "grad_norm", "eval/loss"):
        np.testing.assert_allclose(
            [m[key] for m in by_pair if key in m],
            [m[key] for m in unbroken[:3] if key in m],
            rtol=1e-5,
            err_msg=key,
        )
    data_state = sorted(p.name for p in (pair / "checkpoints" / "3" / "data").glob("*.json"))
    assert data_state == ["shard_0-of-2.json", "shard_1-of-2.json"]  # one per shard, by its reader
    assert len(list((pair / "tensorboard").glob("events.*"))) == 1

    # The pair's checkpoint (params, optimizer, both data shards) continues in one process.
    run_one(pair, source, data_dir, 6, cache)
    resumed = metrics(pair)
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "eval/loss"):
        np.testing.assert_allclose(
            [m[key] for m in resumed[3:] if key in m],
            [m[key] for m in unbroken[3:] if key in m],
            rtol=1e-5,
            err_msg=key,
        )


@pytest.mark.slow
def test_a_dead_process_stops_the_other_with_a_clear_error(corpus):
    root, source, data_dir, cache = corpus
    workdir = root / "dies"
    procs = start_pair(
        workdir,
        source,
        data_dir,
        100_000,
        "--config.parallel.heartbeat_timeout_seconds=10",
        "--config.train.checkpoint_every=100000",
        "--config.train.eval_every=0",
        cache=cache,
    )
    try:
        deadline = time.time() + 240
        while not (workdir / "metrics.jsonl").exists() or not metrics(workdir):
            assert time.time() < deadline and all(p.poll() is None for p in procs), (
                "training did not start"
            )
            time.sleep(1)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.time()
        code = procs[0].wait(timeout=120)  # bounded: the heartbeat timeout is 10 s
        waited = time.time() - killed
    finally:
        for p in procs:
            p.kill()
    assert code != 0
    assert waited < 60
    log = open(f"{workdir}.p0.log").read()
    assert "another task died" in log or "stopped sending heartbeats" in log, log[-3000:]
    print(json.dumps({"exit": code, "seconds_after_kill": round(waited, 1)}))


def wait_for_steps(workdir, procs, count, timeout=240):
    deadline = time.time() + timeout
    while not (workdir / "metrics.jsonl").exists() or len(metrics(workdir)) < count:
        assert time.time() < deadline and all(p.poll() is None for p in procs), (
            "training did not start"
        )
        time.sleep(0.2)


def saved_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def assert_same_params(workdir, other):
    from lm.checkpoint import read_model

    ours, theirs = read_model(workdir).params, read_model(other).params
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(ours), jax.tree.leaves(theirs), strict=True
    ):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow
def test_sigterm_to_one_process_stops_every_process_at_one_step_and_resumes_exactly(corpus):
    """A TPU maintenance event signals one host: every process saves the same step, exits 0,
    and the rerun ends with the parameters of a run that was never stopped, bit for bit."""
    root, source, data_dir, cache = corpus
    steps = 40
    preempted, unbroken = root / "preempted", root / "never_stopped"
    # No scheduled checkpoint before the end: the one saved step is the preemption's.
    extra = ("--config.train.checkpoint_every=1000", "--config.train.eval_every=0")
    procs = start_pair(preempted, source, data_dir, steps, *extra, cache=cache)
    try:
        wait_for_steps(preempted, procs, 2)
        procs[1].send_signal(signal.SIGTERM)  # process 1 only
        signalled = time.time()
        wait_all(procs, preempted)  # both exit 0
        stopped_after = time.time() - signalled
    finally:
        for p in procs:
            p.kill()
    stop = metrics(preempted)[-1]["step"]
    assert 2 <= stop < steps, (
        f"stopped at step {stop} of {steps}: the signal came too late to test anything"
    )
    assert saved_steps(preempted) == [stop]
    data_state = sorted(
        p.name for p in (preempted / "checkpoints" / str(stop) / "data").glob("*.json")
    )
    assert data_state == ["shard_0-of-2.json", "shard_1-of-2.json"]
    for i in range(2):
        assert f"every process saves step {stop} and stops" in open(f"{preempted}.p{i}.log").read()

    wait_all(start_pair(preempted, source, data_dir, steps, *extra, cache=cache), preempted)
    wait_all(start_pair(unbroken, source, data_dir, steps, *extra, cache=cache), unbroken)
    resumed, reference = metrics(preempted), metrics(unbroken)
    assert [m["step"] for m in resumed] == list(range(1, steps + 1))
    assert [m["loss"] for m in resumed] == [m["loss"] for m in reference]  # exactly
    assert_same_params(preempted, unbroken)
    print(
        json.dumps(
            {"stopped_at_step": stop, "seconds_to_exit_after_sigterm": round(stopped_after, 1)}
        )
    )
