r"""Run lm.main on a SLURM GPU cluster: write an sbatch script, and submit it with --submit.

    python -m launch.slurm --nodes 2 --gpus_per_node 8 --partition gpu --time 24:00:00 --submit -- \
        --config experiments/shakespeare_gpt.py --workdir /shared/runs/gpt
    python -m launch.slurm --nodes 2 --gpus_per_node 8 --dry_run -- --config experiments/X.py --workdir DIR

The script starts one process per GPU (`--ntasks-per-node=G --gpus-per-task=1`), or with
--per_node one process per node that drives all its GPUs (`--ntasks-per-node=1
--gpus-per-node=G`), each through `srun ... python -m lm.main <args>` plus the multi-host flags
(see the comments in the script). When the step exits 75 (lm.main's hang watchdog fired) the
script runs the whole srun step again, up to --restarts times, resuming from the last checkpoint.
The script goes to --script, by default WORKDIR/sbatch.sh, and SLURM writes the job's output
beside it (slurm-JOBID.out). Without --submit or --dry_run the script is written and the sbatch
command printed; --dry_run prints both and writes nothing; --submit runs sbatch. The workdir must
be on a filesystem every node sees.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

from launch import common

PROG = "python -m launch.slurm"
# SLURM's --time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME = re.compile(r"^(\d+-\d+(:\d+){0,2}|\d+(:\d+){0,2})$")

COORDINATOR_COMMENT = """\
# Multi-host start-up. JAX can autodetect a SLURM job by itself (--config.parallel.distributed=True
# alone): it takes the first host of SLURM_STEP_NODELIST with a small parser of its own, a port
# derived from the job id, and the process count and id from SLURM_NTASKS and SLURM_PROCID. We
# pass the coordinator explicitly instead, because it is the more robust of the two: `scontrol
# show hostnames` expands every node-list syntax (JAX's parser handles 'name[001-004]' but not
# e.g. 'rack[1-2]-gpu[01-04]'), the address is printed in the job log, and the same flags work
# where autodetection fails (an older JAX, tasks started through a wrapper, a site that hides
# SLURM_* variables). distributed=True stays on so that both routes agree. Either way the tasks
# must be started by srun, which sets SLURM_PROCID and SLURM_NTASKS for each of them."""

DEVICES_COMMENT_PER_GPU = """\
# Which GPU each process drives. Left alone, JAX restricts each process to the GPU numbered
# SLURM_LOCALID among those it can see, which is wrong when SLURM already bound one GPU to each
# task (each then sees exactly one, number 0). JAX_LOCAL_DEVICE_IDS overrides that choice."""

DEVICES_COMMENT_PER_NODE = """\
# Which GPUs each process drives: all of its node's. Left alone, JAX would restrict a SLURM task to
# GPU number SLURM_LOCALID (0 here) -- one GPU per node; JAX_LOCAL_DEVICE_IDS overrides that."""

RESTART_COMMENT = """\
# lm.main exits {status} when its hang watchdog fires (in every task), and srun returns the highest
# status its tasks exited with: on {status} the whole step runs again, all tasks together, up to {n}
# times, resuming from the last checkpoint. Any other failure ends the job with its status."""


def parser() -> common.Parser:
    p = common.Parser(
        PROG,
        "Write (and with --submit, submit) an sbatch script that runs `srun python -m lm.main "
        "<args>` with the multi-host flags on every node.",
        example=f"{PROG} --nodes 2 --gpus_per_node 8 --partition gpu --time 24:00:00 --submit -- "
        "--config experiments/X.py --workdir /shared/runs/X",
        owned=[common.DISTRIBUTED.split("=")[0], *common.EXPLICIT],
    )
    p.add_argument(
        "--nodes", type=common.positive_int, required=True, help="number of nodes (>= 1)"
    )
    p.add_argument(
        "--gpus_per_node", type=common.positive_int, required=True, help="GPUs per node (>= 1)"
    )
    p.add_argument("--partition", default=None, help="#SBATCH --partition")
    p.add_argument("--time", default=None, help="#SBATCH --time, e.g. 24:00:00 or 2-00:00:00")
    p.add_argument("--account", default=None, help="#SBATCH --account")
    p.add_argument(
        "--job_name", default=None, help="#SBATCH --job-name (default: lm-<config name>)"
    )
    p.add_argument(
        "--per_node",
        action="store_true",
        help="one process per node driving all its GPUs (default: one process per GPU)",
    )
    p.add_argument(
        "--sbatch",
        action="append",
        default=[],
        metavar="OPTION",
        help="another #SBATCH line, e.g. --sbatch=--mem=0 or --sbatch=--constraint=h100 "
        "(repeatable)",
    )
    p.add_argument(
        "--prelude",
        action="append",
        default=[],
        metavar="LINE",
        help="shell line run before srun, e.g. 'module load cuda' or 'source venv/bin/activate' "
        "(repeatable)",
    )
    p.add_argument(
        "--repo_dir",
        default=None,
        help="the repository on the cluster, where the job runs (default: the current directory)",
    )
    p.add_argument("--python", default="python", help="Python on the nodes (default python)")
    common.add_restarts(p)
    p.add_argument(
        "--port",
        type=common.port_number,
        default=None,
        help="coordinator port (default: 61440 + SLURM_JOB_ID %% 4096, as JAX picks it)",
    )
    p.add_argument(
        "--script",
        default=None,
        help="where to write the sbatch script (default: WORKDIR/sbatch.sh)",
    )
    p.add_argument("--submit", action="store_true", help="run sbatch on the script")
    return p


def script_path(options, lm_args: list[str], parser_: common.Parser) -> str:
    if options.script:
        return options.script
    workdir = common.workdir_of(lm_args)
    if not workdir or common.is_url(workdir):
        parser_.error(
            "pass --script PATH: the lm.main arguments have no local --workdir to write "
            "the sbatch script to"
        )
    return os.path.join(workdir, "sbatch.sh")


def sbatch_lines(options, lm_args: list[str], output: str) -> list[str]:
    g = options.gpus_per_node
    tasks = (
        ["--ntasks-per-node=1", f"--gpus-per-node={g}"]
        if options.per_node
        else [f"--ntasks-per-node={g}", "--gpus-per-task=1"]
    )
    name = options.job_name or f"lm-{common.config_name(lm_args) or 'run'}"
    lines = [f"--job-name={name}", f"--nodes={options.nodes}", *tasks]
    if options.partition:
        lines.append(f"--partition={options.partition}")
    if options.time:
        lines.append(f"--time={options.time}")
    if options.account:
        lines.append(f"--account={options.account}")
    lines.append(f"--output={output}")
    lines += options.sbatch
    return [f"#SBATCH {line}" for line in lines]


def task_command(options, lm_args: list[str]) -> str:
    """The shell text each srun task runs; $SLURM_PROCID etc. are expanded per task."""
    argv = common.lm_command(lm_args, [common.DISTRIBUTED], python=options.python)
    explicit = " ".join(
        common.explicit_flags('"$LM_COORDINATOR"', '"$SLURM_NTASKS"', '"$SLURM_PROCID"')
    )
    run = f"exec {common.join(argv)} \\\n  {explicit}\n"
    if options.per_node:
        return "\n" + run
    return (
        '\nif [[ -z "${CUDA_VISIBLE_DEVICES:-}" || "$CUDA_VISIBLE_DEVICES" == *,* ]]; then\n'
        "  export JAX_LOCAL_DEVICE_IDS=$SLURM_LOCALID  # GPUs not bound to tasks: take ours\n"
        "else\n"
        "  export JAX_LOCAL_DEVICE_IDS=0  # the one GPU SLURM bound to this task\n"
        "fi\n" + run
    )


def script_text(options, lm_args: list[str], command_line: str, output: str) -> str:
    repo = options.repo_dir or os.getcwd()
    port = str(options.port) if options.port else "$((61440 + SLURM_JOB_ID % 4096))"
    lines = [
        "#!/bin/bash",
        f"# Written by: {command_line}",
        *sbatch_lines(options, lm_args, output),
        "set -eu",
        "",
        f"cd {common.quote(repo)}",
        *options.prelude,
        "",
        COORDINATOR_COMMENT,
        'COORDINATOR_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        f"export LM_COORDINATOR=$COORDINATOR_HOST:{port}",
        'echo "coordinator: $LM_COORDINATOR"',
        "",
    ]
    if options.per_node:
        ids = ",".join(str(i) for i in range(options.gpus_per_node))
        lines += [DEVICES_COMMENT_PER_NODE, f"export JAX_LOCAL_DEVICE_IDS={ids}", ""]
    else:
        lines += [DEVICES_COMMENT_PER_GPU]
    srun = f"srun --kill-on-bad-exit=1 bash -c {common.quote(task_command(options, lm_args))}"
    lines.append(
        "# --kill-on-bad-exit: if one process fails, stop the others rather than leave them waiting."
    )
    if options.restarts:
        lines.append(RESTART_COMMENT.format(status=common.WATCHDOG_EXIT, n=options.restarts))
    lines.append(common.restart_loop(srun, options.restarts))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    options, lm_args = p.parse(argv)
    if options.time and not _TIME.match(options.time):
        p.error(f"--time {options.time!r}: use HH:MM:SS, MM, MM:SS or D-HH[:MM[:SS]]")
    if options.dry_run and options.submit:
        p.error("--dry_run and --submit exclude each other")
    script = script_path(options, lm_args, p)
    output = os.path.join(os.path.dirname(os.path.abspath(script)), "slurm-%j.out")
    recorded = [
        a for a in argv[: argv.index(common.SEPARATOR)] if a not in ("--dry_run", "--submit")
    ]
    recorded += argv[argv.index(common.SEPARATOR) :]
    text = script_text(options, lm_args, common.join([*PROG.split(), *recorded]), output)
    submit = ["sbatch", script]
    if options.dry_run:
        print(f"# {script}")
        print(text, end="")
        print(f"# submit with:\n{common.join(submit)}")
        return 0
    os.makedirs(os.path.dirname(script) or ".", exist_ok=True)
    with open(script, "w") as f:
        f.write(text)
    os.chmod(script, 0o755)
    print(f"{PROG}: wrote {script}", file=sys.stderr)
    if not options.submit:
        print(f"submit with:\n{common.join(submit)}")
        return 0
    print(f"{PROG}: running {common.join(submit)}", file=sys.stderr, flush=True)
    try:
        return subprocess.run(submit).returncode
    except FileNotFoundError:
        print(
            f"{PROG}: error: sbatch not found; run this on a SLURM login node, or submit "
            f"{script} there",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
