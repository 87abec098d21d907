"""What the training loop reports about its time, to the goodput ledger (`lm.train.goodput`)
and the hang watchdog (`lm.train.watchdog`), and the per-process step times that show a
straggler among several processes.
"""

from __future__ import annotations

import logging
import os
import pathlib
import time

import jax
import numpy as np
import psutil

from lm import storage
from lm.train.goodput import Ledger, format_ledger
from lm.train.watchdog import Watchdog


def process_started() -> float:
    """When this process started (`time.time()` seconds): where a run's startup begins.

    On Linux from the process's start and the uptime, both counted from the boot in clock
    ticks: psutil adds the start to the boot time, which Linux gives to the second only."""
    stat = pathlib.Path("/proc/self/stat")
    if not stat.exists():
        return psutil.Process().create_time()
    ticks = int(stat.read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
    uptime = float(pathlib.Path("/proc/uptime").read_text().split()[0])
    return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))


class Monitor:
    """The loop's reports, told to the ledger (process 0 writes it) and the watchdog (on when
    timeout_s > 0). A context manager: the watchdog watches inside it.

    started_at: when the run's startup began (None: now).
    """

    def __init__(self, workdir: storage.PathLike, timeout_s: float, started_at: float | None):
        self.ledger = Ledger(workdir, started_at or time.time(), jax.process_index() == 0)
        self.watchdog = None
        if timeout_s > 0:
            self.watchdog = Watchdog(timeout_s, on_fire=lambda: self.ledger.close("hung"))

    def __enter__(self):
        if self.watchdog is not None:
            self.watchdog.__enter__()
        return self

    def __exit__(self, *exc):
        if self.watchdog is not None:
            self.watchdog.__exit__(*exc)

    def enter(self, bucket: str, step: int = 0) -> None:
        """The loop's time goes to `bucket` from now (`lm.train.goodput.BUCKETS`), working on
        `step` (1-based; 0 = none)."""
        self.ledger.enter(bucket, step)
        if self.watchdog is not None:
            self.watchdog.enter(bucket, step)

    def completed(self, step: int, outputs) -> None:
        """Waits for `outputs` of step `step` (the step before the one just dispatched: one
        step stays in flight), then counts the step as done."""
        jax.block_until_ready(outputs)
        self.ledger.step_done(step)
        if self.watchdog is not None:
            self.watchdog.step_done(step)

    def close(self, outcome: str) -> None:
        """Writes the ledger's last entry; process 0 prints where the time went."""
        runs = self.ledger.close(outcome)
        if self.ledger.enabled and outcome != "failed":
            print(format_ledger(runs), flush=True)


def process_step_times(step: int, seconds_per_step: float, wait_per_step: float) -> dict:
    """Every process's seconds per step and seconds waiting for data per step over the log
    window, gathered (a collective: every process calls it at the same log steps) and logged
    as a table; returns {"slowest_process", "data_wait_s_max"}. A process whose data wait
    stands out is the one the others wait for."""
    from jax.experimental import multihost_utils  # not loaded by `import jax`

    local = np.array([seconds_per_step, wait_per_step], np.float32)
    table = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, 2)
    slowest = int(np.argmax(table[:, 1]))
    logging.info(
        "step %d, seconds per step by process (waiting for data): %s; slowest: process %d",
        step,
        ", ".join(f"{p}: {t:.3f} ({w:.3f})" for p, (t, w) in enumerate(table)),
        slowest,
    )
    return {"slowest_process": float(slowest), "data_wait_s_max": float(table[slowest, 1])}
