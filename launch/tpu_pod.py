r"""Run lm.main on every worker of a Cloud TPU VM (a pod slice or a single host).

    python -m launch.tpu_pod --tpu my-v4-32 --zone us-central2-b --setup -- \
        --config experiments/shakespeare_gpt.py --workdir /mnt/shared/gpt
    python -m launch.tpu_pod --tpu my-v4-32 --zone us-central2-b --dry_run -- \
        --config experiments/shakespeare_gpt.py --workdir /mnt/shared/gpt --config.train.steps=1000

Runs, through `gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all --command ...`, the
command `cd REPO && python3 -m lm.main <args> --config.parallel.distributed=True` on all workers
at once; JAX finds the pod's coordinator, process count and process id from the TPU metadata.
gcloud streams every worker's output here and returns when all have finished. When lm.main exits
75 (its hang watchdog fired, on every worker at once) each worker runs it again, up to --restarts
times, and the run resumes from its last checkpoint; the loop is part of the --command.

--setup first copies this repository to the workers: the files `git ls-files --cached --others
--exclude-standard` lists (tracked files and new ones that are not ignored, as they are in the
working tree now, uncommitted edits included) are packed into a tarball, copied with `gcloud
compute tpus tpu-vm scp --worker=all`, unpacked into REPO and installed with `pip install -e .
'jax[tpu]'`. Copying the working tree rather than cloning needs no git credentials on the
workers and runs exactly the code you have. With --setup and no lm.main arguments only the
setup runs.

Every worker must see the same workdir (process 0 writes the tokenizer and the checkpoints
that the others read), so on a multi-host slice pass a directory they all share.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys
import tarfile
import tempfile

from launch import common

PROG = "python -m launch.tpu_pod"
REMOTE_TARBALL = "lm-src.tar.gz"
REPO = pathlib.Path(__file__).resolve().parent.parent  # the checkout this launcher belongs to


@dataclasses.dataclass(frozen=True)
class Pack:
    """Pack the local working tree into a tarball (done here in Python, not by a shell)."""

    repo: pathlib.Path
    tarball: str

    def describe(self) -> str:
        return (
            f"# pack the working tree of {self.repo} (git ls-files --cached --others "
            f"--exclude-standard) into {self.tarball}"
        )

    def run(self) -> None:
        try:
            listed = (
                subprocess.run(
                    [
                        "git",
                        "-C",
                        str(self.repo),
                        "ls-files",
                        "-z",
                        "--cached",
                        "--others",
                        "--exclude-standard",
                    ],
                    check=True,
                    capture_output=True,
                )
                .stdout.decode()
                .split("\0")
            )
        except (OSError, subprocess.CalledProcessError) as e:
            detail = (
                e.stderr.decode().strip() if isinstance(e, subprocess.CalledProcessError) else e
            )
            raise RuntimeError(
                f"--setup packs a git working tree; `git ls-files` in {self.repo} failed: {detail}"
            ) from None
        files = [f for f in listed if f and (self.repo / f).is_file()]  # skips deleted files
        with tarfile.open(self.tarball, "w:gz") as tar:
            for name in files:
                tar.add(self.repo / name, arcname=name, recursive=False)
        print(f"{PROG}: packed {len(files)} files into {self.tarball}", file=sys.stderr)


def parser() -> common.Parser:
    p = common.Parser(
        PROG,
        "Run `python -m lm.main <args> --config.parallel.distributed=True` on every worker "
        "of a TPU VM through `gcloud compute tpus tpu-vm ssh --worker=all`.",
        example=f"{PROG} --tpu my-v4-32 --zone us-central2-b -- --config experiments/X.py "
        "--workdir /mnt/shared/X",
        owned=[common.DISTRIBUTED.split("=")[0]],
        lm_args_optional=lambda options: options.setup,
    )
    p.add_argument("--tpu", required=True, help="TPU VM name")
    p.add_argument("--zone", required=True, help="its zone, e.g. us-central2-b")
    p.add_argument("--project", default=None, help="Google Cloud project (default: gcloud's)")
    p.add_argument(
        "--repo_dir",
        default="~/lm",
        help="the repository on the workers (default ~/lm; ~/ is expanded there)",
    )
    p.add_argument("--python", default="python3", help="Python on the workers (default python3)")
    common.add_restarts(p)
    p.add_argument(
        "--setup",
        action="store_true",
        help="copy this working tree to the workers and pip install it with jax[tpu] first",
    )
    p.add_argument(
        "--gcloud_arg",
        action="append",
        default=[],
        help="extra flag for every gcloud call, e.g. --gcloud_arg=--internal-ip (repeatable)",
    )
    return p


def gcloud(verb: str, options, args: list[str], command: str | None = None) -> list[str]:
    """`gcloud compute tpus tpu-vm VERB ARGS --zone=Z [--project=P] --worker=all [--command C]`."""
    argv = ["gcloud", "compute", "tpus", "tpu-vm", verb, *args, f"--zone={options.zone}"]
    if options.project:
        argv.append(f"--project={options.project}")
    argv += ["--worker=all", *options.gcloud_arg]
    return argv + ["--command", command] if command is not None else argv


def remote_command(options, lm_args: list[str]) -> str:
    """The shell line each worker runs. The restart loop runs there, not around gcloud here: it
    sees lm.main's own status, where gcloud --worker=all returns one status for all workers."""
    argv = common.lm_command(lm_args, [common.DISTRIBUTED], python=options.python)
    run = common.restart_loop(common.join(argv), options.restarts, one_line=True)
    return f"cd {common.quote_path(options.repo_dir)} && {run}"


def setup_command(options) -> str:
    repo = common.quote_path(options.repo_dir)
    install = common.join([*common.split_python(options.python), "-m", "pip", "install", "-e", "."])
    install += ' "jax[tpu]"'  # double quotes: no glob, and no nested single quotes in --command
    return (
        f"mkdir -p {repo} && tar -xzf {REMOTE_TARBALL} -C {repo} && rm {REMOTE_TARBALL} "
        f"&& cd {repo} && {install}"
    )


def plan(options, lm_args: list[str]) -> list:
    """The steps, in order: Pack objects and gcloud argv lists."""
    steps: list = []
    if options.setup:
        tarball = os.path.join(tempfile.gettempdir(), f"lm-src-{options.tpu}.tar.gz")
        steps += [
            Pack(REPO, tarball),
            gcloud("scp", options, [tarball, f"{options.tpu}:{REMOTE_TARBALL}"]),
            gcloud("ssh", options, [options.tpu], setup_command(options)),
        ]
    if lm_args:
        steps.append(gcloud("ssh", options, [options.tpu], remote_command(options, lm_args)))
    return steps


def check_workdir(lm_args: list[str], parser_: common.Parser) -> None:
    """A gs:// workdir is shared by every worker as it is; a path must be a shared mount."""
    workdir = common.workdir_of(lm_args)
    if workdir and workdir.startswith("s3://"):
        parser_.error(
            f"--workdir {workdir}: lm.main writes checkpoints to gs:// or a path, not s3:// "
            "(orbax-checkpoint writes arrays to local paths and gs:// only); use a gs:// bucket"
        )
    if workdir and not common.is_url(workdir):
        common.warn(
            PROG,
            (
                f"--workdir {workdir} is a path on each worker. On a multi-host slice every worker "
                "must see the same workdir (process 0 writes the tokenizer and checkpoints the others "
                "read): use a gs:// bucket (--workdir gs://BUCKET/RUN) or a directory they all share, "
                "such as a Filestore/NFS mount at the same path on every worker. Ignore this on a "
                "single-host TPU VM."
            ),
        )


def main(argv: list[str] | None = None) -> int:
    parser_ = parser()
    options, lm_args = parser_.parse(argv)
    check_workdir(lm_args, parser_)
    steps = plan(options, lm_args)
    if options.dry_run:
        for step in steps:
            print(step.describe() if isinstance(step, Pack) else common.join(step))
        return 0
    for step in steps:
        try:
            if isinstance(step, Pack):
                step.run()
                continue
            print(f"{PROG}: running {common.join(step)}", file=sys.stderr, flush=True)
            code = subprocess.run(step).returncode
        except FileNotFoundError:
            print(
                f"{PROG}: error: {step[0]} not found; install the Google Cloud CLI", file=sys.stderr
            )
            return 1
        except RuntimeError as e:
            print(f"{PROG}: error: {e}", file=sys.stderr)
            return 1
        if code:
            print(
                f"{PROG}: error: `{' '.join(step[:5])} ...` exited with status {code}",
                file=sys.stderr,
            )
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
