r"""Run lm.main on one machine with several GPUs.

    python -m launch.gpu --gpus 8 -- --config experiments/shakespeare_gpt.py --workdir /tmp/gpt
    python -m launch.gpu --gpus 8 --processes_per_gpu -- --config experiments/X.py --workdir DIR
    python -m launch.gpu --gpus 2 --processes_per_gpu --dry_run -- --config experiments/X.py --workdir DIR

By default (--one_process) one process drives all G GPUs: `CUDA_VISIBLE_DEVICES=0,...,G-1
python -m lm.main <args>`; no distributed start-up is needed and this is the simplest and
usually the fastest way on one box. --processes_per_gpu starts G processes instead, process i
with CUDA_VISIBLE_DEVICES=<GPU i> and the explicit coordinator 127.0.0.1:PORT,
num_processes=G, process_id=i -- the same code path as a multi-host job, useful to test one on
a single machine. If CUDA_VISIBLE_DEVICES is already set, its first G entries are the GPUs used.

Per process, output goes to LOG_DIR/process_<i>.log (default WORKDIR/logs); process 0's is also
shown here. If one process fails, the others are stopped (SIGTERM, then SIGKILL after --grace
seconds) and the launcher exits non-zero naming the failed process and its log. Ctrl-C or
SIGTERM is passed on to the processes as SIGTERM (lm.main saves a checkpoint and stops); a
second one kills them.

When the process that fails first exited 75 (lm.main's hang watchdog fired), the others are
stopped the same way and all of them start again, up to --restarts times (default 3), resuming
from the last checkpoint; the logs are appended to, so the hung run's stacks stay in them. Any
other failure, or a stop by a signal, is not restarted.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from launch import common

PROG = "python -m launch.gpu"
COORDINATOR_HOST = "127.0.0.1"


@dataclasses.dataclass
class Process:
    index: int
    argv: list[str]
    env: dict[str, str]  # set on top of this process's environment
    log: str | None  # None: output goes to this terminal only

    def shell_line(self) -> str:
        return common.env_prefix(self.env) + common.join(self.argv)


def parser() -> common.Parser:
    p = common.Parser(
        PROG,
        "Run `python -m lm.main` on the GPUs of this machine: one process for all of them "
        "(default) or one process per GPU.",
        example=f"{PROG} --gpus 8 -- --config experiments/X.py --workdir /tmp/X",
        owned=[common.DISTRIBUTED.split("=")[0], *common.EXPLICIT],
    )
    p.add_argument(
        "--gpus", type=common.positive_int, required=True, help="number of GPUs to use (>= 1)"
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--one_process",
        dest="per_gpu",
        action="store_false",
        help="one process drives all GPUs (the default)",
    )
    mode.add_argument(
        "--processes_per_gpu",
        "--process_per_gpu",
        dest="per_gpu",
        action="store_true",
        help="one process per GPU, joined through a coordinator on 127.0.0.1",
    )
    p.set_defaults(per_gpu=False)
    p.add_argument(
        "--port",
        type=common.port_number,
        default=None,
        help="coordinator port for --processes_per_gpu (default: a free one)",
    )
    p.add_argument(
        "--log_dir",
        default=None,
        help="per-process logs for --processes_per_gpu (default: WORKDIR/logs)",
    )
    p.add_argument(
        "--python", default=sys.executable, help="the Python that runs lm.main (default: this one)"
    )
    p.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds between SIGTERM and SIGKILL when stopping processes (default 30)",
    )
    common.add_restarts(p)
    # Testing only: replaces `python -m lm.main` with another command (shell-split).
    p.add_argument("--program", default=None, help=argparse.SUPPRESS)
    return p


def gpu_ids(count: int, visible: str | None) -> list[str]:
    """The GPUs to use: the first `count` of CUDA_VISIBLE_DEVICES if set, else 0..count-1."""
    if visible is None or not visible.strip():
        return [str(i) for i in range(count)]
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    if len(ids) < count:
        raise ValueError(f"--gpus {count} but CUDA_VISIBLE_DEVICES={visible} lists only {len(ids)}")
    return ids[:count]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((COORDINATOR_HOST, 0))
        return s.getsockname()[1]


def plan(options, lm_args: list[str], environ: dict[str, str]) -> list[Process]:
    ids = gpu_ids(options.gpus, environ.get("CUDA_VISIBLE_DEVICES"))
    if not options.per_gpu:
        argv = common.lm_command(lm_args, python=options.python, program=options.program)
        return [Process(0, argv, {"CUDA_VISIBLE_DEVICES": ",".join(ids)}, None)]
    port = options.port or free_port()
    workdir = common.workdir_of(lm_args)
    log_dir = options.log_dir or os.path.join(workdir or ".", "logs")
    processes = []
    for i, gpu in enumerate(ids):
        flags = common.explicit_flags(f"{COORDINATOR_HOST}:{port}", options.gpus, i)
        argv = common.lm_command(lm_args, flags, python=options.python, program=options.program)
        # JAX_LOCAL_DEVICE_IDS=0: the one visible GPU, whatever a cluster autodetection would pick.
        env = {"CUDA_VISIBLE_DEVICES": gpu, "JAX_LOCAL_DEVICE_IDS": "0"}
        processes.append(Process(i, argv, env, os.path.join(log_dir, f"process_{i}.log")))
    return processes


def _tee(stream, log_file, out) -> None:
    """Copies a child's output to its log and to this terminal."""
    for chunk in iter(lambda: stream.read1(65536), b""):
        log_file.write(chunk)
        log_file.flush()
        out.write(chunk)
        out.flush()


def _tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


class Supervisor:
    """Starts the processes, waits for them, stops them all when one fails or on a signal."""

    def __init__(self, processes: list[Process], grace: float):
        self.processes = processes
        self.grace = grace
        self.popens: list[subprocess.Popen] = []
        self.threads: list[threading.Thread] = []
        self.files = []
        self.signals = 0

    def start(self, header: str = "") -> None:
        """Starts every process; with a header (a restart) the logs are appended to after it."""
        many = len(self.processes) > 1
        for proc in self.processes:
            if self.signals:  # stopped while starting: start no more
                break
            env = {**os.environ, **proc.env}
            kwargs = dict(env=env, start_new_session=True)  # own group: signals go through us
            if proc.log:
                os.makedirs(os.path.dirname(proc.log) or ".", exist_ok=True)
                log_file = open(proc.log, "ab" if header else "wb")  # noqa: SIM115 - see close()
                self.files.append(log_file)
                if header:
                    log_file.write(f"\n--- {header} ---\n".encode())
                    log_file.flush()
                if proc.index == 0 and many:
                    kwargs.update(stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
                else:
                    kwargs.update(stdout=log_file, stderr=subprocess.STDOUT)
            popen = subprocess.Popen(proc.argv, **kwargs)
            self.popens.append(popen)
            if popen.stdout is not None:
                thread = threading.Thread(
                    target=_tee, args=(popen.stdout, log_file, sys.stdout.buffer), daemon=True
                )
                thread.start()
                self.threads.append(thread)

    def on_signal(self, signum, frame) -> None:
        self.signals += 1
        if self.signals == 1:
            print(
                f"\n{PROG}: {signal.Signals(signum).name}: sending SIGTERM to the processes "
                "(again to kill them)",
                file=sys.stderr,
                flush=True,
            )
            self.send(signal.SIGTERM)
        else:
            self.send(signal.SIGKILL)

    def send(self, sig) -> None:
        for popen in self.popens:
            if popen.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(popen.pid, sig)

    def stop_all(self) -> None:
        self.send(signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while any(p.poll() is None for p in self.popens) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.send(signal.SIGKILL)
        for popen in self.popens:
            popen.wait()

    def wait(self) -> tuple[int, Process | None]:
        """-> (exit status, the process that failed first or None)."""
        while True:
            codes = [p.poll() for p in self.popens]
            for proc, code in zip(self.processes, codes, strict=True):
                if code not in (None, 0) and not self.signals:
                    self.stop_all()
                    return code, proc
            if all(code is not None for code in codes):
                bad = [c for c in codes if c]
                return (bad[0] if bad else 0), None
            time.sleep(0.1)

    def close(self) -> None:
        """Closes the logs of stopped processes; start() may then run them again."""
        for thread in self.threads:
            thread.join(timeout=5)
        for f in self.files:
            f.close()
        self.popens, self.threads, self.files = [], [], []


def run(processes: list[Process], grace: float, restarts: int = 0) -> int:
    supervisor = Supervisor(processes, grace)
    # One set of handlers for every attempt: a signal between two attempts stops the restarts.
    handled = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {s: signal.signal(s, supervisor.on_signal) for s in handled}
    try:
        supervisor.start()
        code, failed = supervisor.wait()
        for restart in range(1, restarts + 1):
            # wait() names a failed process only when no signal stopped the run.
            if failed is None or code != common.WATCHDOG_EXIT or supervisor.signals:
                break
            message = common.restart_message(restart, restarts)
            announce_restart(message, failed, len(processes))
            supervisor.close()
            supervisor.start(header=message)
            if not supervisor.popens:
                break  # a signal came before any process started: report the hang
            code, failed = supervisor.wait()
    finally:
        if supervisor.popens and any(p.poll() is None for p in supervisor.popens):
            supervisor.stop_all()  # an exception here: leave nothing running
        supervisor.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return report(code, failed, processes)


def announce_restart(message: str, failed: Process, count: int) -> None:
    """One line; with several processes it says which one fired first and where its stacks are."""
    where = (
        f" (process {failed.index} of {count} exited first; its log: {failed.log})"
        if count > 1
        else ""
    )
    print(f"{PROG}: {message}{where}", file=sys.stderr, flush=True)


def report(code: int, failed: Process | None, processes: list[Process]) -> int:
    """Says how the run ended; -> the launcher's exit status."""
    if failed is not None:
        how = (
            f"exited with status {code}"
            if code > 0
            else f"was killed by {signal.Signals(-code).name}"
        )
        if code == common.WATCHDOG_EXIT:
            how += " (its hang watchdog fired)"
        where = f"its log: {failed.log}" if failed.log else "its output is above"
        others = "; stopped the other processes" if len(processes) > 1 else ""
        tail = _tail(failed.log) if failed.log and failed.index != 0 else ""
        if tail:
            print(f"--- last lines of {failed.log} ---\n{tail}\n---", file=sys.stderr)
        print(
            f"{PROG}: error: process {failed.index} of {len(processes)} "
            f"(CUDA_VISIBLE_DEVICES={failed.env.get('CUDA_VISIBLE_DEVICES')}) {how}{others}; "
            f"{where}",
            file=sys.stderr,
        )
        return code if code > 0 else 1
    if code:
        print(f"{PROG}: stopped (exit status {code})", file=sys.stderr)
        return code if code > 0 else 128 - code
    return 0


def main(argv: list[str] | None = None) -> int:
    p = parser()
    options, lm_args = p.parse(argv)
    if not options.per_gpu and (options.port or options.log_dir):
        p.error("--port and --log_dir are for --processes_per_gpu")
    try:
        processes = plan(options, lm_args, dict(os.environ))
    except ValueError as e:
        p.error(str(e))
    if options.dry_run:
        for proc in processes:
            if len(processes) > 1:
                print(f"# process {proc.index} of {len(processes)}, log {proc.log}")
            print(proc.shell_line())
        if options.restarts:
            print(
                f"# on exit status {common.WATCHDOG_EXIT} (watchdog: a hang) all processes start "
                f"again, up to {options.restarts} times"
            )
        return 0
    if len(processes) > 1:
        print(
            f"{PROG}: {len(processes)} processes, logs in {os.path.dirname(processes[0].log)}; "
            "showing process 0",
            file=sys.stderr,
            flush=True,
        )
    return run(processes, options.grace, options.restarts)


if __name__ == "__main__":
    sys.exit(main())
