"""Launchers: dry-run text, usage errors, generated shell run against stubs, and launch.gpu's
process supervision (with a stand-in for lm.main). No cluster, TPU or GPU needed."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest
from launch import common, gpu, slurm, tpu_pod

REPO = pathlib.Path(__file__).resolve().parent.parent
LM_ARGS = [
    "--config",
    "experiments/shakespeare_gpt.py",
    "--workdir",
    "/shared/gpt",
    "--config.train.steps=10",
]


def lines(text: str) -> list[str]:
    return text.rstrip("\n").split("\n")


def usage_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def fake_python(tmp_path: pathlib.Path) -> pathlib.Path:
    """A stand-in for `python`: records its argv and some environment to $FAKE_OUT/<process id>.json."""
    path = tmp_path / "fakepy"
    path.write_text(
        textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        pid = next((a.split("=")[1] for a in sys.argv if a.startswith("--config.parallel.process_id=")), "0")
        keys = ("JAX_LOCAL_DEVICE_IDS", "CUDA_VISIBLE_DEVICES")
        record = {{"argv": sys.argv[1:], "cwd": os.getcwd(), "env": {{k: os.environ.get(k) for k in keys}}}}
        with open(os.path.join(os.environ["FAKE_OUT"], pid + ".json"), "w") as f:
            json.dump(record, f)
        """)
    )
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def executable(path: pathlib.Path, text: str) -> pathlib.Path:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return path


def flaky_python(tmp_path: pathlib.Path) -> pathlib.Path:
    """A stand-in for `python` whose exit status at its n-th run (per process id) is the n-th of
    $FAKE_CODES (the last one repeats); it counts its runs in $FAKE_OUT/runs<process id>."""
    return executable(
        tmp_path / "flakypy",
        textwrap.dedent(f"""\
        #!{sys.executable}
        import os, sys
        pid = next((a.split("=")[1] for a in sys.argv if a.startswith("--config.parallel.process_id=")), "0")
        path = os.path.join(os.environ["FAKE_OUT"], "runs" + pid)
        run = (int(open(path).read()) if os.path.exists(path) else 0) + 1
        open(path, "w").write(str(run))
        codes = os.environ["FAKE_CODES"].split()
        sys.exit(int(codes[min(run, len(codes)) - 1]))
        """),
    )


def runs(tmp_path: pathlib.Path, process: int = 0) -> int:
    return int((tmp_path / f"runs{process}").read_text())


RESTART_LOOP = (
    'lm_status=$?; if [ "$lm_status" -ne 75 ] || [ "$lm_restart" -ge {n} ]; then exit '
    '"$lm_status"; fi; lm_restart=$((lm_restart + 1)); echo "lm.main exited 75 (watchdog: a '
    'hang); restart $lm_restart of {n}" >&2; done'
)


# ------------------------------------------------------------------------------------ common


def test_flag_value_and_config_name():
    args = ["--workdir", "/a", "--config=experiments/x.py:tiny", "--workdir=/b"]
    assert common.flag_value(args, "--workdir") == "/b"
    assert common.flag_value(args, "--seed") is None
    assert common.config_name(args) == "x"
    assert common.is_url("gs://bucket/run") and not common.is_url("/mnt/gs/run")
    assert common.quote_path("~/my repo") == "~/'my repo'"
    assert common.lm_command(["--workdir", "a b"], ["--x=1"], python="uv run python") == [
        "uv",
        "run",
        "python",
        "-m",
        "lm.main",
        "--workdir",
        "a b",
        "--x=1",
    ]


OWN_ARGS = {
    tpu_pod.main: ["--tpu", "t", "--zone", "z"],
    slurm.main: ["--nodes", "1", "--gpus_per_node", "1"],
    gpu.main: ["--gpus", "1"],
}


def test_watchdog_exit_matches_lm():
    """launch/ keeps its own copy of the status (it imports no training code): the same value."""
    from lm.train import watchdog

    assert common.WATCHDOG_EXIT == watchdog.WATCHDOG_EXIT == 75


@pytest.mark.parametrize("main", [tpu_pod.main, slurm.main, gpu.main])
def test_restarts_must_be_a_count(main, capsys):
    own = OWN_ARGS[main]
    for bad, message in [("-1", "must be at least 0, got -1"), ("x", "'x' is not an integer")]:
        err = usage_error(
            main, [*own, "--restarts", bad, "--dry_run", "--", "--workdir", "w"], capsys
        )
        assert f"argument --restarts: {message}" in err


@pytest.mark.parametrize("main", [tpu_pod.main, slurm.main, gpu.main])
def test_missing_lm_args(main, capsys):
    own = OWN_ARGS[main]
    err = usage_error(main, own, capsys)
    assert "no `--`: put lm.main's arguments after `--`" in err
    err = usage_error(main, [*own, "--"], capsys)
    assert "nothing after `--`" in err
    err = usage_error(main, [*own, "--", "python", "-m", "lm.main", "--workdir", "w"], capsys)
    assert "give only lm.main's arguments" in err
    err = usage_error(
        main, [*own, "--", "--workdir", "w", "--config.parallel.distributed=True"], capsys
    )
    assert "sets --config.parallel.distributed itself" in err


# ----------------------------------------------------------------------------------- tpu_pod


def test_tpu_pod_dry_run(capsys):
    code = tpu_pod.main(
        [
            "--tpu",
            "pod-1",
            "--zone",
            "us-central2-b",
            "--project",
            "proj",
            "--dry_run",
            "--",
            *LM_ARGS,
            "--prompt",
            "a b",
        ]
    )
    assert code == 0
    out, err = capsys.readouterr()
    # (quoting of harder arguments: test_tpu_pod_command_runs_as_written)
    assert lines(out) == [
        "gcloud compute tpus tpu-vm ssh pod-1 --zone=us-central2-b --project=proj --worker=all --command "
        "'cd ~/lm && lm_restart=0 && until python3 -m lm.main --config experiments/shakespeare_gpt.py "
        "--workdir /shared/gpt --config.train.steps=10 --prompt '\"'\"'a b'\"'\"' "
        "--config.parallel.distributed=True; do " + RESTART_LOOP.format(n=3) + "'"
    ]
    assert "--workdir /shared/gpt is a path on each worker" in err  # local path on a pod: warned


def test_tpu_pod_setup_dry_run(capsys):
    code = tpu_pod.main(
        [
            "--tpu",
            "pod-1",
            "--zone",
            "z",
            "--repo_dir",
            "/opt/lm",
            "--setup",
            "--restarts",
            "0",
            "--dry_run",
            "--",
            "--config",
            "experiments/x.py",
            "--workdir",
            "/mnt/shared/x",
        ]
    )
    assert code == 0
    out, err = capsys.readouterr()
    tarball = os.path.join(tempfile.gettempdir(), "lm-src-pod-1.tar.gz")
    assert lines(out) == [
        f"# pack the working tree of {REPO} (git ls-files --cached --others --exclude-standard) "
        f"into {tarball}",
        f"gcloud compute tpus tpu-vm scp {tarball} pod-1:lm-src.tar.gz --zone=z --worker=all",
        "gcloud compute tpus tpu-vm ssh pod-1 --zone=z --worker=all --command 'mkdir -p /opt/lm && "
        "tar -xzf lm-src.tar.gz -C /opt/lm && rm lm-src.tar.gz && cd /opt/lm && python3 -m pip "
        'install -e . "jax[tpu]"\'',
        "gcloud compute tpus tpu-vm ssh pod-1 --zone=z --worker=all --command 'cd /opt/lm && python3 "
        "-m lm.main --config experiments/x.py --workdir /mnt/shared/x --config.parallel.distributed=True'",
    ]
    assert "every worker must see the same workdir" in err  # and --restarts 0: no loop
    # A gs:// workdir goes to lm.main as it is (every worker reaches the bucket), without the
    # shared-path warning; s3:// (no Orbax checkpoints there) is refused before anything runs.
    assert (
        tpu_pod.main(
            [
                "--tpu",
                "pod-1",
                "--zone",
                "z",
                "--dry_run",
                "--",
                "--config",
                "experiments/x.py",
                "--workdir",
                "gs://bucket/x",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    assert "--workdir gs://bucket/x --config.parallel.distributed=True; do" in lines(out)[-1]
    assert "every worker must see the same workdir" not in err
    message = usage_error(
        tpu_pod.main,
        ["--tpu", "t", "--zone", "z", "--dry_run", "--", "--workdir", "s3://bucket/x"],
        capsys,
    )
    assert "use a gs:// bucket" in message


def test_tpu_pod_setup_only_and_errors(capsys):
    assert tpu_pod.main(["--tpu", "t", "--zone", "z", "--setup", "--dry_run"]) == 0
    assert len(lines(capsys.readouterr().out)) == 3  # pack, scp, install; no run
    assert "--zone" in usage_error(tpu_pod.main, ["--tpu", "t", "--", "--workdir", "w"], capsys)


def test_tpu_pod_command_runs_as_written(tmp_path, capsys):
    """The --command text, run by a shell the way the workers' ssh runs it, gives lm.main these argv."""
    (tmp_path / "home" / "my lm").mkdir(parents=True)
    python = fake_python(tmp_path)
    tpu_pod.main(
        [
            "--tpu",
            "t",
            "--zone",
            "z",
            "--repo_dir",
            "~/my lm",
            "--python",
            str(python),
            "--dry_run",
            "--",
            *LM_ARGS,
            "--prompt",
            'it\'s "$HOME" `x`',
        ]
    )
    argv = __import__("shlex").split(capsys.readouterr().out)
    command = argv[argv.index("--command") + 1]
    env = {**os.environ, "HOME": str(tmp_path / "home"), "FAKE_OUT": str(tmp_path)}
    subprocess.run(["bash", "-c", command], env=env, check=True)
    record = json.loads((tmp_path / "0.json").read_text())
    assert record["argv"] == [
        "-m",
        "lm.main",
        *LM_ARGS,
        "--prompt",
        'it\'s "$HOME" `x`',
        "--config.parallel.distributed=True",
    ]
    assert record["cwd"] == str(tmp_path / "home" / "my lm")


@pytest.mark.parametrize(
    "codes, restarts, status, count",
    [("75 75 0", [], 0, 3), ("1", [], 1, 1), ("75", ["--restarts", "1"], 75, 2)],
)
def test_tpu_pod_restarts_on_watchdog_exit(tmp_path, capsys, codes, restarts, status, count):
    """A worker's --command runs lm.main again after status 75, and only after 75."""
    python = flaky_python(tmp_path)
    argv = ["--tpu", "t", "--zone", "z", "--repo_dir", str(tmp_path), "--python", str(python)]
    tpu_pod.main([*argv, *restarts, "--dry_run", "--", "--workdir", "gs://b/x"])
    out = __import__("shlex").split(capsys.readouterr().out)
    command = out[out.index("--command") + 1]
    env = {**os.environ, "FAKE_OUT": str(tmp_path), "FAKE_CODES": codes}
    result = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True)
    assert (result.returncode, runs(tmp_path)) == (status, count)
    n = 1 if restarts else 3
    expected = [
        f"lm.main exited 75 (watchdog: a hang); restart {i} of {n}" for i in range(1, count)
    ]
    assert lines(result.stderr) == (expected or [""])


def test_tpu_pod_pack(tmp_path):
    tarball = tmp_path / "src.tar.gz"
    tpu_pod.Pack(REPO, str(tarball)).run()
    import tarfile

    with tarfile.open(tarball) as tar:
        names = set(tar.getnames())
    assert {"lm/main.py", "launch/tpu_pod.py", "tests/test_launch.py", "setup.cfg"} <= names
    assert not any(n.startswith(".git/") or "__pycache__" in n for n in names)


# ------------------------------------------------------------------------------------- slurm

SLURM_HEAD = [
    "#SBATCH --job-name=lm-shakespeare_gpt",
    "#SBATCH --nodes=2",
]
SLURM_TAIL = [
    "#SBATCH --partition=gpu",
    "#SBATCH --time=24:00:00",
    "#SBATCH --account=proj",
    "#SBATCH --output={dir}/slurm-%j.out",
    "set -eu",
    "",
    "cd /home/me/lm",
    "module load cuda",
    "",
]
COORD_LINES = [
    'COORDINATOR_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
    "export LM_COORDINATOR=$COORDINATOR_HOST:$((61440 + SLURM_JOB_ID % 4096))",
    'echo "coordinator: $LM_COORDINATOR"',
]
RUN_LINES = [
    "exec python -m lm.main --config experiments/shakespeare_gpt.py --workdir /shared/gpt "
    "--config.train.steps=10 --config.parallel.distributed=True \\",
    '  --config.parallel.coordinator_address="$LM_COORDINATOR" --config.parallel.num_processes='
    '"$SLURM_NTASKS" --config.parallel.process_id="$SLURM_PROCID"',
]
# The restart loop around srun, after the task command's closing quote.
LOOP_LINES = [
    "'; do",
    "  lm_status=$?",
    '  if [ "$lm_status" -ne 75 ] || [ "$lm_restart" -ge 3 ]; then exit "$lm_status"; fi',
    "  lm_restart=$((lm_restart + 1))",
    '  echo "lm.main exited 75 (watchdog: a hang); restart $lm_restart of 3" >&2',
    "done",
]


def slurm_dry_run(tmp_path, capsys, *extra):
    script = tmp_path / "job.sh"
    argv = [
        "--nodes",
        "2",
        "--gpus_per_node",
        "4",
        "--partition",
        "gpu",
        "--time",
        "24:00:00",
        "--account",
        "proj",
        "--repo_dir",
        "/home/me/lm",
        "--prelude",
        "module load cuda",
        "--script",
        str(script),
        *extra,
        "--dry_run",
        "--",
        *LM_ARGS,
    ]
    assert slurm.main(argv) == 0
    out = capsys.readouterr().out
    assert not script.exists()  # a dry run writes nothing
    return lines(out), script


def comment_free(text_lines):
    return [line for line in text_lines if not line.startswith("# ") or line.startswith("# /")]


def test_slurm_dry_run_per_gpu(tmp_path, capsys):
    out, script = slurm_dry_run(tmp_path, capsys)
    assert out[0] == f"# {script}"
    assert out[1] == "#!/bin/bash"
    assert out[2].startswith("# Written by: python -m launch.slurm --nodes 2 ")
    assert "--dry_run" not in out[2]
    tail = [line.format(dir=tmp_path) for line in SLURM_TAIL]
    assert comment_free(out) == [
        f"# {script}",
        "#!/bin/bash",
        *SLURM_HEAD,
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-task=1",
        *tail,
        *COORD_LINES,
        "",
        "lm_restart=0",
        "until srun --kill-on-bad-exit=1 bash -c '",
        'if [[ -z "${CUDA_VISIBLE_DEVICES:-}" || "$CUDA_VISIBLE_DEVICES" == *,* ]]; then',
        "  export JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID  # GPUs not bound to tasks: take ours",
        "else",
        "  export JAX_LOCAL_DEVICE_IDS=0  # the one GPU SLURM bound to this task",
        "fi",
        *RUN_LINES,
        *LOOP_LINES,
        f"sbatch {script}",
    ]
    assert "# submit with:" in out
    assert any("more robust" in line for line in out)  # the comment that explains the choice
    assert any("the whole step runs again" in line for line in out)  # ... and the restarts


def test_slurm_dry_run_per_node(tmp_path, capsys):
    out, script = slurm_dry_run(
        tmp_path, capsys, "--per_node", "--port", "12345", "--job_name", "j", "--restarts", "0"
    )
    body = comment_free(out)
    assert "#SBATCH --job-name=j" in body
    assert "#SBATCH --ntasks-per-node=1" in body and "#SBATCH --gpus-per-node=4" in body
    assert "#SBATCH --gpus-per-task=1" not in body
    assert "export LM_COORDINATOR=$COORDINATOR_HOST:12345" in body
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in body
    at = body.index("srun --kill-on-bad-exit=1 bash -c '")  # --restarts 0: srun alone
    assert body[at + 1 : at + 4] == [*RUN_LINES, "'"]
    assert "lm_restart=0" not in body and not any("runs again" in line for line in out)


def test_slurm_writes_script_under_workdir(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert (
        slurm.main(
            [
                "--nodes",
                "1",
                "--gpus_per_node",
                "2",
                "--",
                "--config",
                "experiments/x.py",
                "--workdir",
                str(workdir),
            ]
        )
        == 0
    )
    script = workdir / "sbatch.sh"
    assert os.access(script, os.X_OK)
    assert f"#SBATCH --output={workdir}/slurm-%j.out" in script.read_text()
    assert f"sbatch {script}" in capsys.readouterr().out
    subprocess.run(["bash", "-n", str(script)], check=True)  # valid shell


def slurm_stubs(tmp_path: pathlib.Path) -> pathlib.Path:
    """scontrol, and an srun that runs 2 tasks and exits, like srun, with the highest status."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    executable(
        bin_dir / "scontrol",
        "#!/bin/bash\n[ \"$1 $2\" = 'show hostnames' ] && printf 'gpu-a1\\ngpu-a2\\n'\n",
    )
    executable(
        bin_dir / "srun",
        textwrap.dedent("""\
        #!/bin/bash
        while [[ "$1" == -* ]]; do shift; done
        rc=0
        for i in 0 1; do
          SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NTASKS=2 "$@"
          status=$?
          if [ "$status" -gt "$rc" ]; then rc=$status; fi
        done
        exit "$rc"
        """),
    )
    return bin_dir


def test_slurm_script_runs_as_written(tmp_path, capsys):
    """The script under stub scontrol/srun (2 tasks, GPUs not bound) gives each task these flags."""
    bin_dir = slurm_stubs(tmp_path)
    python = fake_python(tmp_path)
    script = tmp_path / "job.sh"
    slurm.main(
        [
            "--nodes",
            "1",
            "--gpus_per_node",
            "2",
            "--repo_dir",
            str(tmp_path),
            "--python",
            str(python),
            "--script",
            str(script),
            "--",
            *LM_ARGS,
            "--prompt",
            "it's $HOME",
        ]
    )
    capsys.readouterr()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_OUT": str(tmp_path),
        "SLURM_JOB_ID": "5",
        "SLURM_JOB_NODELIST": "gpu-a[1-2]",
        "CUDA_VISIBLE_DEVICES": "0,1",
    }
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "coordinator: gpu-a1:61445" in result.stdout
    for i in (0, 1):
        record = json.loads((tmp_path / f"{i}.json").read_text())
        assert record["argv"] == [
            "-m",
            "lm.main",
            *LM_ARGS,
            "--prompt",
            "it's $HOME",
            "--config.parallel.distributed=True",
            "--config.parallel.coordinator_address=gpu-a1:61445",
            "--config.parallel.num_processes=2",
            f"--config.parallel.process_id={i}",
        ]
        assert record["env"]["JAX_LOCAL_DEVICE_IDS"] == str(i)  # unbound GPUs: pick by local id
        assert record["cwd"] == str(tmp_path)
    env["CUDA_VISIBLE_DEVICES"] = "3"  # SLURM bound one GPU to each task
    subprocess.run(["bash", str(script)], env=env, check=True, capture_output=True)
    assert json.loads((tmp_path / "1.json").read_text())["env"]["JAX_LOCAL_DEVICE_IDS"] == "0"


@pytest.mark.parametrize(
    "codes, restarts, status, count",
    [("75 75 0", [], 0, 3), ("1", [], 1, 1), ("75", ["--restarts", "0"], 75, 1)],
)
def test_slurm_restarts_the_step(tmp_path, capsys, codes, restarts, status, count):
    """After srun exits 75 the script runs the step again: every task, under `set -e`."""
    bin_dir = slurm_stubs(tmp_path)
    python = flaky_python(tmp_path)
    script = tmp_path / "job.sh"
    argv = ["--nodes", "1", "--gpus_per_node", "2", "--repo_dir", str(tmp_path)]
    argv += ["--python", str(python), "--script", str(script), *restarts]
    assert slurm.main([*argv, "--", *LM_ARGS]) == 0
    capsys.readouterr()
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "FAKE_OUT": str(tmp_path),
        "FAKE_CODES": codes,
        "SLURM_JOB_ID": "5",
        "SLURM_JOB_NODELIST": "gpu-a1",
    }
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert result.returncode == status, result.stderr
    assert runs(tmp_path, 0) == runs(tmp_path, 1) == count  # the tasks restart together
    restarted = [line for line in lines(result.stderr) if "restart" in line]
    assert restarted == [
        f"lm.main exited 75 (watchdog: a hang); restart {i} of 3" for i in range(1, count)
    ]


def test_slurm_errors(tmp_path, capsys):
    base = ["--gpus_per_node", "8", "--script", str(tmp_path / "s.sh")]
    assert "must be at least 1, got 0" in usage_error(
        slurm.main, ["--nodes", "0", *base, "--", "--workdir", "w"], capsys
    )
    assert "--nodes" in usage_error(slurm.main, [*base, "--", "--workdir", "w"], capsys)
    assert "--time '1 day'" in usage_error(
        slurm.main, ["--nodes", "1", *base, "--time", "1 day", "--", "--workdir", "w"], capsys
    )
    assert "sets --config.parallel.process_id itself" in usage_error(
        slurm.main,
        ["--nodes", "1", *base, "--", "--workdir", "w", "--config.parallel.process_id", "0"],
        capsys,
    )
    assert "pass --script PATH" in usage_error(
        slurm.main,
        ["--nodes", "1", "--gpus_per_node", "1", "--", "eval", "--model", "smollm2"],
        capsys,
    )
    assert "exclude each other" in usage_error(
        slurm.main, ["--nodes", "1", *base, "--dry_run", "--submit", "--", "--workdir", "w"], capsys
    )


# --------------------------------------------------------------------------------------- gpu


def test_gpu_dry_run_one_process(capsys, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu.main(["--gpus", "4", "--python", "python", "--dry_run", "--", *LM_ARGS]) == 0
    assert lines(capsys.readouterr().out) == [
        "CUDA_VISIBLE_DEVICES=0,1,2,3 python -m lm.main --config experiments/shakespeare_gpt.py "
        "--workdir /shared/gpt --config.train.steps=10",
        "# on exit status 75 (watchdog: a hang) all processes start again, up to 3 times",
    ]


def test_gpu_dry_run_per_gpu(capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6,7")  # the first two of these are used
    assert (
        gpu.main(
            [
                "--gpus",
                "2",
                "--processes_per_gpu",
                "--port",
                "4321",
                "--python",
                "python",
                "--restarts",
                "0",
                "--dry_run",
                "--",
                *LM_ARGS,
            ]
        )
        == 0
    )
    run = (
        "python -m lm.main --config experiments/shakespeare_gpt.py --workdir /shared/gpt "
        "--config.train.steps=10 --config.parallel.coordinator_address=127.0.0.1:4321 "
        "--config.parallel.num_processes=2 --config.parallel.process_id="
    )
    assert lines(capsys.readouterr().out) == [
        "# process 0 of 2, log /shared/gpt/logs/process_0.log",
        f"CUDA_VISIBLE_DEVICES=4 JAX_LOCAL_DEVICE_IDS=0 {run}0",
        "# process 1 of 2, log /shared/gpt/logs/process_1.log",
        f"CUDA_VISIBLE_DEVICES=6 JAX_LOCAL_DEVICE_IDS=0 {run}1",
    ]


def test_gpu_errors(capsys, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert "lists only 1" in usage_error(gpu.main, ["--gpus", "2", "--", "--workdir", "w"], capsys)
    assert "must be at least 1" in usage_error(
        gpu.main, ["--gpus", "0", "--", "--workdir", "w"], capsys
    )
    assert "not allowed with argument" in usage_error(
        gpu.main,
        ["--gpus", "1", "--one_process", "--processes_per_gpu", "--", "--workdir", "w"],
        capsys,
    )
    assert "sets --config.parallel.coordinator_address itself" in usage_error(
        gpu.main, ["--gpus", "1", "--", "--config.parallel.coordinator_address=h:1"], capsys
    )


STAND_IN = """\
import os, sys, time
pid = int(next((a.split("=")[1] for a in sys.argv if a.startswith("--config.parallel.process_id=")), 0))
print(f"process {pid} args {' '.join(sys.argv[1:])} gpu {os.environ['CUDA_VISIBLE_DEVICES']}", flush=True)
mode = os.environ["STAND_IN_MODE"]
if mode == "fail" and pid == 1:
    print("boom", flush=True)
    time.sleep(0.3)
    sys.exit(3)
if mode == "fail":
    open(os.path.join(os.environ["STAND_IN_DIR"], f"pid{pid}"), "w").write(str(os.getpid()))
    time.sleep(60)  # the launcher must stop this one
if mode == "term":  # like lm.main: on SIGTERM, save and exit 0
    import signal
    def on_term(signum, frame):
        open(os.path.join(os.environ["STAND_IN_DIR"], f"term{pid}"), "w").write("saved")
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    open(os.path.join(os.environ["STAND_IN_DIR"], f"pid{pid}"), "w").write(str(os.getpid()))
    time.sleep(60)
"""


def stand_in(tmp_path, monkeypatch, mode):
    (tmp_path / "stand_in.py").write_text(STAND_IN)
    monkeypatch.setenv("STAND_IN_MODE", mode)
    monkeypatch.setenv("STAND_IN_DIR", str(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return ["--program", f"{sys.executable} {tmp_path / 'stand_in.py'}"]


def test_gpu_runs_processes(tmp_path, monkeypatch, capfd):
    program = stand_in(tmp_path, monkeypatch, "ok")
    code = gpu.main(
        [
            "--gpus",
            "2",
            "--processes_per_gpu",
            "--port",
            "4321",
            *program,
            "--",
            "--workdir",
            str(tmp_path / "w"),
        ]
    )
    assert code == 0
    out = capfd.readouterr().out
    assert "process 0 args --workdir" in out  # process 0 is shown here ...
    assert "process 1 args" not in out  # ... the others only in their logs
    for i in (0, 1):
        log = (tmp_path / "w" / "logs" / f"process_{i}.log").read_text()
        assert (
            f"process {i} args --workdir {tmp_path / 'w'} --config.parallel.coordinator_address="
            f"127.0.0.1:4321 --config.parallel.num_processes=2 --config.parallel.process_id={i} "
            f"gpu {i}"
        ) in log


def test_gpu_failure_stops_the_others(tmp_path, monkeypatch, capfd):
    program = stand_in(tmp_path, monkeypatch, "fail")
    start = time.monotonic()
    code = gpu.main(
        ["--gpus", "2", "--processes_per_gpu", *program, "--", "--workdir", str(tmp_path / "w")]
    )
    assert time.monotonic() - start < 20  # not the stand-in's 60 s
    assert code == 3
    err = capfd.readouterr().err
    log = tmp_path / "w" / "logs" / "process_1.log"
    assert (
        f"process 1 of 2 (CUDA_VISIBLE_DEVICES=1) exited with status 3; stopped the other "
        f"processes; its log: {log}"
    ) in err
    assert "boom" in err  # the failed log's last lines
    survivor = int((tmp_path / "pid0").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(survivor, 0)


def test_gpu_passes_sigterm_on(tmp_path, monkeypatch):
    program = stand_in(tmp_path, monkeypatch, "term")
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "launch.gpu",
            "--gpus",
            "2",
            "--processes_per_gpu",
            *program,
            "--",
            "--workdir",
            str(tmp_path / "w"),
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 20
    while not all((tmp_path / f"pid{i}").exists() for i in (0, 1)) and time.monotonic() < deadline:
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    _, err = launcher.communicate(timeout=20)
    assert "SIGTERM: sending SIGTERM to the processes" in err
    assert launcher.returncode == 0  # both saved and exited cleanly
    assert (tmp_path / "term0").read_text() == (tmp_path / "term1").read_text() == "saved"


def test_gpu_one_process_failure(tmp_path, monkeypatch, capfd):
    code = gpu.main(
        [
            "--gpus",
            "1",
            "--program",
            f"{sys.executable} -c 'import sys; sys.exit(2)'",
            "--",
            "--workdir",
            str(tmp_path),
        ]
    )
    assert code == 2
    assert (
        "process 0 of 1 (CUDA_VISIBLE_DEVICES=0) exited with status 2; its output is above"
        in capfd.readouterr().err
    )


FLAKY = """\
import os, sys, time
def flag(name, default):
    return next((a.split("=")[1] for a in sys.argv if a.startswith(f"--config.parallel.{name}=")), default)
pid, count = int(flag("process_id", 0)), int(flag("num_processes", 1))
folder = os.environ["STAND_IN_DIR"]
def runs(p):
    path = os.path.join(folder, f"runs{p}")
    return int(open(path).read()) if os.path.exists(path) else 0
run = runs(pid) + 1
open(os.path.join(folder, f"runs{pid}.new"), "w").write(str(run))
os.replace(os.path.join(folder, f"runs{pid}.new"), os.path.join(folder, f"runs{pid}"))  # the others read it
print(f"process {pid} run {run}", flush=True)
deadline = time.time() + 10  # until every process has counted this run: then stopping one is safe
while any(runs(p) < run for p in range(count)) and time.time() < deadline:
    time.sleep(0.02)
codes = os.environ[f"STAND_IN_CODES_{pid}"].split()  # the status of each run; wait: until stopped
code = codes[min(run, len(codes)) - 1]
if code == "wait":
    time.sleep(60)
sys.exit(int(code))
"""


def flaky(tmp_path, monkeypatch, *codes):
    """--program for a stand-in whose process i exits with codes[i]'s n-th entry at its n-th run."""
    (tmp_path / "flaky.py").write_text(FLAKY)
    monkeypatch.setenv("STAND_IN_DIR", str(tmp_path))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    for i, process_codes in enumerate(codes):
        monkeypatch.setenv(f"STAND_IN_CODES_{i}", process_codes)
    return ["--program", f"{sys.executable} {tmp_path / 'flaky.py'}"]


@pytest.mark.parametrize(
    "codes, restarts, status, count",
    [
        ("75 75 0", [], 0, 3),  # a hang twice, then done: restarted twice
        ("1", [], 1, 1),  # a real error: not restarted
        ("75", ["--restarts", "0"], 75, 1),
        ("75", ["--restarts", "1"], 75, 2),  # restarts used up: the hang's status
    ],
)
def test_gpu_restarts_on_watchdog_exit(
    tmp_path, monkeypatch, capfd, codes, restarts, status, count
):
    program = flaky(tmp_path, monkeypatch, codes)
    argv = ["--gpus", "1", *restarts, *program, "--", "--workdir", str(tmp_path)]
    assert gpu.main(argv) == status
    assert runs(tmp_path) == count
    n = 1 if restarts == ["--restarts", "1"] else 3
    err = capfd.readouterr().err
    restarted = [line for line in lines(err) if "restart" in line]
    assert restarted == [
        f"python -m launch.gpu: lm.main exited 75 (watchdog: a hang); restart {i} of {n}"
        for i in range(1, count)
    ]
    if status == 75:
        assert "exited with status 75 (its hang watchdog fired)" in err


def test_gpu_restarts_all_processes_together(tmp_path, monkeypatch, capfd):
    """Process 1 exits 75 twice while process 0 runs on: 0 is stopped and both start again."""
    program = flaky(tmp_path, monkeypatch, "wait wait 0", "75 75 0")
    workdir = tmp_path / "w"
    start = time.monotonic()
    code = gpu.main(
        ["--gpus", "2", "--processes_per_gpu", *program, "--", "--workdir", str(workdir)]
    )
    assert time.monotonic() - start < 30  # process 0 was stopped, not waited for
    assert code == 0
    assert runs(tmp_path, 0) == runs(tmp_path, 1) == 3
    log = workdir / "logs" / "process_1.log"
    err = capfd.readouterr().err
    assert (
        "python -m launch.gpu: lm.main exited 75 (watchdog: a hang); restart 2 of 3 "
        f"(process 1 of 2 exited first; its log: {log})"
    ) in err
    # The logs keep every run (the hung run's stacks are in them), each restart marked.
    assert lines(log.read_text()) == [
        "process 1 run 1",
        "",
        "--- lm.main exited 75 (watchdog: a hang); restart 1 of 3 ---",
        "process 1 run 2",
        "",
        "--- lm.main exited 75 (watchdog: a hang); restart 2 of 3 ---",
        "process 1 run 3",
    ]


def test_cli_entry_points():
    for module in ("launch.tpu_pod", "launch.slurm", "launch.gpu"):
        result = subprocess.run(
            [sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True
        )
        assert result.returncode == 0 and "-- <lm.main arguments>" in result.stdout, result.stderr
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.slurm",
            "--nodes",
            "0",
            "--gpus_per_node",
            "1",
            "--",
            "--workdir",
            "w",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "--nodes: must be at least 1, got 0" in result.stderr


def test_tpu_pod_without_gcloud(monkeypatch, capsys):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert tpu_pod.main(["--tpu", "t", "--zone", "z", "--", "--workdir", "/mnt/w"]) == 1
    assert "gcloud not found" in capsys.readouterr().err
