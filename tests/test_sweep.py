"""Sweeps: the lm.config helpers, launch.sweep's names, flags, checks, skip logic and results
table (on fake workdirs and a fake trainer), and one end-to-end sweep of lm.main runs."""

import csv
import json
import os
import pathlib
import subprocess
import sys
import textwrap
import time

import pytest
from launch import sweep
from lm.config import sweep_axis, sweep_product, sweep_zip

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = "experiments/shakespeare_gpt.py:tiny"

# An experiment without lm imports: quick to load, one field of every overridable type.
FAKE_EXPERIMENT = """
import ml_collections

def get_config(arg=None):
    return ml_collections.ConfigDict({
        "opt": {"lr": 0.1, "name": "adamw"},
        "model": {"width": 8, "vocab_size": 0, "gated": False},
        "data": {"vocab_size": 100, "source": "text:a/*.txt"},
        "parallel": {"mesh": (-1, 1, 1)},
        "train": {"steps": 3 if arg == "short" else 5},
    })

def get_sweep(arg=None):
    from lm.config import sweep_axis, sweep_product
    return sweep_product(sweep_axis("opt.lr", [0.1, 0.2]), sweep_axis("model.width", [8, 16]))
"""


@pytest.fixture
def fake_experiment(tmp_path):
    path = tmp_path / "fake_exp.py"
    path.write_text(FAKE_EXPERIMENT)
    return path


def write_experiment(tmp_path, sweep_source: str) -> str:
    path = (
        tmp_path / f"exp{len(list(tmp_path.glob('exp*.py')))}.py"
    )  # a new file: no stale bytecode
    path.write_text(
        FAKE_EXPERIMENT.split("def get_sweep")[0]
        + "def get_sweep(arg=None):\n"
        + textwrap.indent(textwrap.dedent(sweep_source), "    ")
    )
    return str(path)


# ----------------------------------------------------------------------------- the helpers


def test_axis_product_zip():
    lr = sweep_axis("optimizer.learning_rate", [1e-3, 3e-3])
    assert lr == [{"optimizer.learning_rate": 1e-3}, {"optimizer.learning_rate": 3e-3}]
    width = sweep_zip(
        sweep_axis("model.d_model", [64, 128]), sweep_axis("model.mlp_dim", [256, 512])
    )
    assert width == [
        {"model.d_model": 64, "model.mlp_dim": 256},
        {"model.d_model": 128, "model.mlp_dim": 512},
    ]
    points = sweep_product(lr, width)
    assert points == [  # the first factor varies slowest
        {"optimizer.learning_rate": 1e-3, "model.d_model": 64, "model.mlp_dim": 256},
        {"optimizer.learning_rate": 1e-3, "model.d_model": 128, "model.mlp_dim": 512},
        {"optimizer.learning_rate": 3e-3, "model.d_model": 64, "model.mlp_dim": 256},
        {"optimizer.learning_rate": 3e-3, "model.d_model": 128, "model.mlp_dim": 512},
    ]
    assert sweep_product(lr, [{"train.steps": 5, "name": "five"}])[1] == {
        "optimizer.learning_rate": 3e-3,
        "train.steps": 5,
        "name": "five",
    }
    assert sweep_product() == [{}] and sweep_zip() == []
    assert sweep_product(lr, []) == []


def test_helper_errors():
    with pytest.raises(ValueError, match=r"different lengths \[2, 3\]"):
        sweep_zip(sweep_axis("a", [1, 2]), sweep_axis("b", [1, 2, 3]))
    with pytest.raises(ValueError, match="key 'a' is set by more than one factor"):
        sweep_product(sweep_axis("a", [1, 2]), sweep_axis("a", [3]))
    with pytest.raises(ValueError, match="key 'a' is set by more than one factor"):
        sweep_zip(sweep_axis("a", [1]), sweep_axis("a", [3]))
    with pytest.raises(TypeError, match="list of override dicts"):
        sweep_product({"a": 1})
    with pytest.raises(TypeError, match="item 1"):
        sweep_zip([{"a": 1}, 2])
    with pytest.raises(TypeError, match="must be a list"):
        sweep_axis("a", "abc")


# --------------------------------------------------------------------- values and names


def test_values_round_trip_through_config_flags(fake_experiment):
    """format_value's text, parsed by ml_collections as lm.main parses it, gives the value back."""
    overrides = {
        "opt.lr": 3e-4,
        "opt.name": "sgd with: spaces=and/slashes",
        "model.width": 32,
        "model.gated": True,
        "data.source": "",
        "data.vocab_size": 7,
        "parallel.mesh": (2, 1, 4),
        "train.steps": 10,
    }
    values = sweep.resolve_config(str(fake_experiment), sweep.override_flags(overrides))
    flat = sweep.config_keys(values)
    assert {k: flat[k] for k in overrides} == overrides
    assert isinstance(flat["opt.lr"], float) and isinstance(flat["parallel.mesh"], tuple)
    # Ints into float fields, lists into tuple fields, tiny and huge floats.
    flat = sweep.config_keys(
        sweep.resolve_config(
            str(fake_experiment),
            sweep.override_flags({"opt.lr": 1, "parallel.mesh": [1, 8, 1], "model.gated": False}),
        )
    )
    assert (
        flat["opt.lr"] == 1.0
        and flat["parallel.mesh"] == (1, 8, 1)
        and flat["model.gated"] is False
    )
    for x in (1e-7, 1.5e20, 0.1 + 0.2):
        assert (
            sweep.config_keys(
                sweep.resolve_config(str(fake_experiment), sweep.override_flags({"opt.lr": x}))
            )["opt.lr"]
            == x
        )
    assert sweep.format_value((4,)) == "(4,)" and sweep.format_value(("a", "b")) == "('a', 'b')"
    with pytest.raises(sweep.SweepError, match="cannot pass a dict"):
        sweep.format_value({"a": 1}, "opt.lr")
    with pytest.raises(sweep.SweepError, match="train.steps=1.5"):
        sweep.resolve_config(str(fake_experiment), ["--config.train.steps=1.5"])


def test_the_real_config_round_trips():
    values = sweep.resolve_config(
        TINY,
        sweep.override_flags(
            {
                "parallel.mesh": (1, 2, 1),
                "optimizer.learning_rate": 0.003,
                "train.sample_prompt": "KING:\n",
            }
        ),
    )
    assert values["parallel"]["mesh"] == (1, 2, 1) and values["optimizer"]["learning_rate"] == 0.003
    assert values["train"]["sample_prompt"] == "KING:\n" and values["train"]["steps"] == 20


def test_point_names():
    points = sweep_product(
        sweep_axis("optimizer.learning_rate", [1e-3, 3e-4]), sweep_axis("model.d_model", [64])
    )
    assert sweep.point_names(points) == [
        "learning_rate=0.001,d_model=64",
        "learning_rate=0.0003,d_model=64",
    ]
    # Keys that share a last part keep enough of their path to stay apart.
    assert sweep.point_names(
        [{"model.vocab_size": 0, "data.vocab_size": 320, "train.steps": 5}]
    ) == ["model.vocab_size=0,data.vocab_size=320,steps=5"]
    # Filesystem-safe: no slashes or shell characters; tuples and bools readable.
    names = sweep.point_names(
        [{"data.source": "text:/data/*.txt", "parallel.mesh": (2, 1, 1), "model.qk_norm": True}]
    )
    assert names == ["source=text-data-.txt,mesh=2x1x1,qk_norm=True"]
    # Names that collide after cleaning get a hash of their overrides; an explicit name wins.
    names = sweep.point_names([{"data.source": "a/b"}, {"data.source": "a b"}, {"name": "base"}])
    assert names[0] != names[1] and names[0].startswith("source=a-b-") and names[2] == "base"
    assert (
        sweep.point_names([{"data.source": "a/b"}, {"data.source": "a b"}]) == names[:2]
    )  # deterministic
    assert len(sweep.point_names([{"data.source": "x" * 500}])[0]) <= sweep.MAX_NAME
    assert sweep.point_names([{}]) == ["default"]
    with pytest.raises(sweep.SweepError, match="two points are named 'a'"):
        sweep.point_names([{"name": "a", "x": 1}, {"name": "a", "x": 2}])
    with pytest.raises(sweep.SweepError, match="not a plain file name"):
        sweep.point_names([{"name": "../up"}])
    with pytest.raises(sweep.SweepError, match=r"points \[0, 1\] have the same overrides"):
        sweep.point_names([{"x": 1}, {"x": 1}])


# ---------------------------------------------------------------------------------- checks


def test_plan_checks_keys(tmp_path, fake_experiment):
    points = sweep.plan_sweep(f"{fake_experiment}:short", ["--config.data.vocab_size=50"])
    assert [p.name for p in points] == [
        "lr=0.1,width=8",
        "lr=0.1,width=16",
        "lr=0.2,width=8",
        "lr=0.2,width=16",
    ]
    assert points[3].flags == [
        "--config.opt.lr=0.2",
        "--config.model.width=16",
        "--config.data.vocab_size=50",
    ]
    assert all(p.steps == 3 for p in points)  # the arg reaches get_config
    assert sweep.plan_sweep(str(fake_experiment), ["--config.train.steps=9"])[0].steps == 9

    bad = write_experiment(tmp_path, 'return [{"opt.lr": 0.1}, {"opt.lrr": 0.2}]')
    with pytest.raises(sweep.SweepError) as e:
        sweep.plan_sweep(bad)
    assert "unknown config key 'opt.lrr'" in str(e.value) and "did you mean 'opt.lr'" in str(
        e.value
    )
    assert "valid keys of 'opt': opt.lr, opt.name" in str(e.value) and "sweep point 1" in str(
        e.value
    )
    bad = write_experiment(tmp_path, 'return [{"optim.lr": 0.1}]')
    with pytest.raises(sweep.SweepError, match="valid sections: data, model, opt, parallel, train"):
        sweep.plan_sweep(bad)
    bad = write_experiment(tmp_path, 'return [{"opt": 0.1}]')
    with pytest.raises(sweep.SweepError, match="'opt' is a config section, not a key"):
        sweep.plan_sweep(bad)
    with pytest.raises(sweep.SweepError, match="unknown config key 'train.step'"):
        sweep.plan_sweep(str(fake_experiment), ["--config.train.step=3"])
    with pytest.raises(
        sweep.SweepError, match="unknown experiment arg 'tyni'"
    ):  # the file's own check
        sweep.plan_sweep("experiments/shakespeare_gpt.py:tyni")
    with pytest.raises(sweep.SweepError, match="opt.lr is swept by get_sweep"):
        sweep.plan_sweep(str(fake_experiment), ["--config.opt.lr=3"])
    with pytest.raises(sweep.SweepError, match="--config.KEY=VALUE"):
        sweep.plan_sweep(str(fake_experiment), ["--config.opt.lr"])
    bad = write_experiment(tmp_path, 'return [{"model.width": 1.5}]')
    with pytest.raises(sweep.SweepError, match="sweep point width=1.5: .*model.width=1.5"):
        sweep.plan_sweep(bad)
    (tmp_path / "nosweep.py").write_text("def get_config(arg=None):\n    return {}\n")
    with pytest.raises(sweep.SweepError, match="has no get_sweep"):
        sweep.plan_sweep(str(tmp_path / "nosweep.py"))


def test_shakespeare_sweep_is_valid():
    for arg, widths in (("tiny", (16, 32)), (None, (128, 256))):
        points = sweep.plan_sweep("experiments/shakespeare_gpt.py" + (f":{arg}" if arg else ""))
        assert len(points) == 4 and len({p.name for p in points}) == 4
        assert {p.overrides["model.d_model"] for p in points} == set(widths)
        assert all(p.overrides["model.mlp_dim"] == 4 * p.overrides["model.d_model"] for p in points)


# ----------------------------------------------------------------- fake workdirs, results


def fake_workdir(root, name, rows):
    workdir = root / name
    workdir.mkdir(parents=True)
    (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return workdir


def test_skip_finished(tmp_path):
    fake_workdir(
        tmp_path, "done", [{"step": 5, "loss": 3.0}, {"step": 10, "loss": 2.0, "eval/loss": 2.5}]
    )
    fake_workdir(tmp_path, "half", [{"step": 5, "loss": 3.0}])
    workdir = fake_workdir(tmp_path, "torn", [{"step": 5, "loss": 3.0}])
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 10, "lo')  # killed mid-write
    assert sweep.is_finished(tmp_path / "done", 10)
    assert not sweep.is_finished(tmp_path / "done", 20)  # steps extended: resume
    assert not sweep.is_finished(tmp_path / "half", 10)
    assert not sweep.is_finished(tmp_path / "torn", 10)
    assert not sweep.is_finished(tmp_path / "missing", 10)
    assert not sweep.is_finished(tmp_path / "done", None)
    assert sweep.target_steps({"train": {"steps": 7}, "icl": {"kind": "induction"}}) == 7
    assert sweep.target_steps({"model": {}}) is None


def test_results_table(tmp_path):
    def point(name, lr):
        return sweep.Point(name=name, overrides={"optimizer.learning_rate": lr}, flags=[], steps=10)

    fake_workdir(tmp_path, "a", [{"step": 10, "loss": 2.0, "eval/loss": 3.0}])
    # The final metrics are the last row with each metric (eval/loss is logged less often).
    fake_workdir(
        tmp_path, "b", [{"step": 5, "loss": 3.0, "eval/loss": 2.5}, {"step": 10, "loss": 1.5}]
    )
    fake_workdir(tmp_path, "c", [{"step": 5, "loss": 3.0}])  # failed before its first eval
    fake_workdir(tmp_path, "d", [{"step": 10, "loss": 2.0, "eval/loss": float("nan")}])
    points = [
        point("a", 1e-3),
        point("b", 2e-3),
        point("c", 3e-3),
        point("d", 4e-3),
        point("e", 5e-3),
    ]
    rows = sweep.collect_results(tmp_path, points, {"a": 0, "c": 1})
    status = {r["name"]: r["status"] for r in rows}
    assert status == {
        "a": "finished",
        "b": "finished",
        "c": "failed (exit 1)",
        "d": "finished",
        "e": "not started",
    }
    b = next(r for r in rows if r["name"] == "b")
    assert b["step"] == 10 and b["metrics"]["eval/loss"] == 2.5 and b["metrics"]["loss"] == 1.5

    assert [r["name"] for r in sweep.sort_results(rows, "eval/loss")] == ["b", "a", "c", "d", "e"]
    assert [r["name"] for r in sweep.sort_results(rows, "eval/loss", "max")] == [
        "a",
        "b",
        "c",
        "d",
        "e",
    ]
    assert [r["name"] for r in sweep.sort_results(rows, "loss")] == ["b", "a", "d", "c", "e"]
    assert [r["name"] for r in sweep.sort_results(rows, "nothing")] == ["a", "b", "c", "d", "e"]

    table = sweep.write_results(tmp_path, sweep.sort_results(rows, "eval/loss"), "eval/loss")
    lines = table.splitlines()
    assert lines[0] == "| name | optimizer.learning_rate | status | step | eval/loss | loss |"
    assert lines[2] == "| b | 0.002 | finished | 10 | 2.5000 | 1.5000 |"
    assert (
        lines[4]
        == f"| c | 0.003 | failed (exit 1), log: {tmp_path / 'c' / 'sweep.log'} | 5 |  | 3.0000 |"
    )
    assert lines[6] == "| e | 0.005 | not started |  |  |  |"
    assert (tmp_path / "results.md").read_text().endswith(table + "\n")
    with open(tmp_path / "results.csv") as f:
        got = list(csv.DictReader(f))
    assert [r["name"] for r in got] == ["b", "a", "c", "d", "e"]
    assert float(got[0]["eval/loss"]) == 2.5 and got[2]["eval/loss"] == "" and got[2]["step"] == "5"
    assert (
        float(got[1]["optimizer.learning_rate"]) == 1e-3 and got[2]["status"] == "failed (exit 1)"
    )


# ---------------------------------------------------- the runner with a fake trainer

FAKE_TRAINER = """
import json, pathlib, sys
args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if "=" in a)
workdir = pathlib.Path(args["workdir"])
lr, width, steps = float(args["config.opt.lr"]), int(args["config.model.width"]), int(args["config.train.steps"])
print("training", workdir.name)
if lr > 0.15 and width == 16:
    print("diverged", file=sys.stderr)
    sys.exit(3)
with open(workdir / "metrics.jsonl", "a") as f:
    f.write(json.dumps({"step": steps, "loss": 1.0, "eval/loss": 10 * lr - width / 100}) + "\\n")
"""


def test_runner_with_a_fake_trainer(tmp_path, fake_experiment, monkeypatch, capsys):
    """The pool, logs, failures, exit status, skipping and the table, with a stand-in for lm.main."""
    trainer = tmp_path / "fake_trainer.py"
    trainer.write_text(FAKE_TRAINER)
    monkeypatch.setattr(
        sweep,
        "command",
        lambda spec, root, point: [
            sys.executable,
            str(trainer),
            f"--workdir={root / point.name}",
            *point.flags,
        ],
    )
    root = tmp_path / "sweep"
    args = [str(fake_experiment), f"--workdir={root}", "--parallel=2", "--config.train.steps=4"]

    assert sweep.main(args) == 1  # one point fails
    out, err = capsys.readouterr()
    assert "4 to run (2 at a time)" in out and "FAILED lr=0.2,width=16 (exit 3)" in out
    assert f"log: {root / 'lr=0.2,width=16' / 'sweep.log'}" in err
    log = (root / "lr=0.2,width=16" / "sweep.log").read_text()
    assert "--config.train.steps=4" in log and "diverged" in log
    assert "training lr=0.1,width=8" in (root / "lr=0.1,width=8" / "sweep.log").read_text()
    with open(root / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == [
        "lr=0.1,width=16",
        "lr=0.1,width=8",
        "lr=0.2,width=8",
        "lr=0.2,width=16",
    ]
    assert [r["status"] for r in rows] == ["finished"] * 3 + ["failed (exit 3)"]
    assert "| lr=0.1,width=16 | 0.1 | 16 | finished | 4 | 0.8400 | 1.0000 |" in out

    # Rerun: the finished points are skipped, the failed one runs (and fails) again.
    before = {p: p.stat().st_mtime_ns for p in root.rglob("metrics.jsonl")}
    assert sweep.main(args) == 1
    out, _ = capsys.readouterr()
    assert "3 finished, 1 to run" in out and out.count("skip ") == 3
    assert {p: p.stat().st_mtime_ns for p in root.rglob("metrics.jsonl")} == before
    # More steps: every point is unfinished again; a dry run lists the commands and runs nothing.
    assert sweep.main([*args[:-1], "--config.train.steps=8", "--dry_run"]) == 0
    out, _ = capsys.readouterr()
    assert "0 finished, 4 to run" in out and out.count(str(trainer)) == 4
    assert {p: p.stat().st_mtime_ns for p in root.rglob("metrics.jsonl")} == before


# ---------------------------------------------------------------------------- end to end


def write_corpus(directory: pathlib.Path):
    from tests.test_main import write_corpus as write

    return write(directory)


def snapshot(directory: pathlib.Path):
    return {
        p.relative_to(directory): p.stat().st_mtime_ns
        for p in directory.rglob("*")
        if p.is_file() and p.name != "sweep.log"
    }


@pytest.mark.slow
def test_sweep_end_to_end(tmp_path):
    """Four tiny lm.main runs two at a time; a rerun trains nothing; the table is sorted."""
    source = write_corpus(tmp_path / "corpus")
    root = tmp_path / "sweep"
    env = {**os.environ, "XLA_FLAGS": "", "LM_CACHE_DIR": str(tmp_path / "data")}
    cmd = [
        sys.executable,
        "-m",
        "launch.sweep",
        TINY,
        f"--workdir={root}",
        "--parallel=2",
        "--config.train.steps=10",
        f"--config.data.source={source}",
        f"--config.data.data_dir={tmp_path / 'data'}",
        "--config.data.vocab_size=320",
    ]

    def run():
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return proc, time.perf_counter() - start

    proc, _ = run()
    with open(root / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(r["status"] == "finished" and r["step"] == "10" for r in rows), (
        rows
    )
    assert all(float(r["eval/loss"]) > 0 and float(r["eval/perplexity"]) > 1 for r in rows)
    losses = [float(r["eval/loss"]) for r in rows]
    assert losses == sorted(losses)
    assert {(float(r["optimizer.learning_rate"]), int(r["model.d_model"])) for r in rows} == {
        (1e-3, 16),
        (1e-3, 32),
        (3e-3, 16),
        (3e-3, 32),
    }
    for r in rows:
        workdir = root / r["name"]
        assert (workdir / "checkpoints" / "10").is_dir()
        config = json.loads((workdir / "config.json").read_text())
        assert (
            config["model"]["d_model"] == int(r["model.d_model"]) and config["train"]["steps"] == 10
        )
        assert "validation loss" in (workdir / "sweep.log").read_text()
    assert (
        "| name | optimizer.learning_rate | model.d_model | model.mlp_dim | status | step | eval/loss |"
        in proc.stdout
    )
    assert (root / "results.md").exists()

    before = snapshot(root)
    proc, took = run()
    assert proc.stdout.count("skip ") == 4 and "0 to run" in proc.stdout
    after = snapshot(root)
    assert {k: v for k, v in after.items() if k.name not in ("results.csv", "results.md")} == {
        k: v for k, v in before.items() if k.name not in ("results.csv", "results.md")
    }
    with open(root / "results.csv") as f:
        assert [r["name"] for r in csv.DictReader(f)] == [r["name"] for r in rows]
    assert took < 60, took  # nothing retrained


def run_sweep(*args):
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "LM_COMPILATION_CACHE": "off"}
    cmd = [sys.executable, "-m", "launch.sweep", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_compile_only_sweep_tables_every_point(tmp_path):
    """Every point compiled for 8 host devices, nothing trained: one table, and the exit
    status says whether all of them fit."""
    spec = "experiments/gpt2.py:tiny"
    proc = run_sweep(spec, "--compile_only", "--topology=cpu:8", f"--workdir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "compile.json").read_text())
    assert [r["name"] for r in rows] == ["d64", "d128"]
    assert [r["status"] for r in rows] == ["not judged", "not judged"]
    assert rows[1]["num_params"] > rows[0]["num_params"]
    assert rows[1]["model_flops"] > rows[0]["model_flops"]
    assert "| d128 | 128 | 512 | not judged |" in proc.stdout
    assert not list(tmp_path.glob("d64*"))  # no workdir: nothing trained


@pytest.mark.slow
def test_compile_only_sweep_fails_when_a_point_does_not_fit(tmp_path):
    spec = "experiments/gpt2.py:tiny"
    proc = run_sweep(spec, "--compile_only", "--topology=cpu:8", f"--workdir={tmp_path}")
    rows = json.loads((tmp_path / "compile.json").read_text())
    between = (rows[0]["train"]["total"] + rows[1]["train"]["total"]) / 2 / 2**30
    proc = run_sweep(spec, "--compile_only", "--topology=cpu:8", f"--device_memory_gib={between}")
    assert proc.returncode == 1
    assert "| d64 | 64 | 256 | fits |" in proc.stdout
    assert "| d128 | 128 | 512 | does not fit: batch 40 x 128 on cpu:8" in proc.stdout


def test_compile_only_needs_a_topology():
    proc = run_sweep("experiments/gpt2.py:tiny", "--compile_only")
    assert proc.returncode == 2 and "--compile_only needs --topology" in proc.stderr
