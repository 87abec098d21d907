"""The goodput ledger: where a workdir's wall time went, over every start of its run.

Each process-0 start of the training loop adds a run to WORKDIR/goodput.json and keeps it up
to date from a background thread (every `flush_every_s`), so a run killed outright loses at most
that much. Its wall time, from the process's start to its last write, is split into `BUCKETS`
(the interpreter's own exit after that is not in it):

- startup: the process's start to the loop's first step: imports, data, tokenizer, model
  init (a restore is counted apart);
- restore: reading the checkpoint the run resumes from;
- compile: the first train step of the start (tracing and compiling; the step runs after);
- data_wait: waiting for batches; steps: training steps, waiting for the devices;
- retrained: both of those for a step some earlier moment of the run had already taken (a
  resume after a crash redoes the steps after its checkpoint; a rollback those after its);
- checkpoint_save, evaluation (evaluators and the final samples), other (the rest: logging,
  profiles, shutting down).

The productive share is `steps` over the wall time of all the runs together.
"""

from __future__ import annotations

import json
import socket
import threading
import time

from lm import storage

LEDGER_FILE = "goodput.json"
BUCKETS = (
    "startup",
    "restore",
    "compile",
    "data_wait",
    "steps",
    "retrained",
    "checkpoint_save",
    "evaluation",
    "other",
)
PRODUCTIVE = "steps"
TRAINING = ("data_wait", "steps")  # what a step already taken turns into "retrained"


def read_ledger(workdir: storage.PathLike) -> list[dict]:
    """The runs recorded in WORKDIR/goodput.json, oldest first ([] when there is none)."""
    path = storage.as_path(workdir) / LEDGER_FILE
    return json.loads(path.read_text())["runs"] if path.exists() else []


def totals(runs: list[dict]) -> dict[str, float]:
    """Seconds per bucket over `runs`, plus "wall" (their wall times together)."""
    sums = {b: sum(r["buckets"].get(b, 0.0) for r in runs) for b in BUCKETS}
    return {**sums, "wall": sum(r["wall"] for r in runs)}


def format_ledger(runs: list[dict]) -> str:
    """A table of the buckets' seconds and shares, and the productive share."""
    total = totals(runs)
    wall = total["wall"] or 1e-9
    rows = [f"goodput over {len(runs)} start(s), {total['wall']:.1f} s of wall time:"]
    rows += [
        f"  {b:<16}{total[b]:>10.1f} s {total[b] / wall:>7.1%}" for b in BUCKETS if total[b] >= 0.05
    ]
    rows.append(f"  productive share (training steps): {total[PRODUCTIVE] / wall:.1%}")
    return "\n".join(rows)


class Ledger:
    """This start's share of the ledger. The loop says which bucket its time goes to from now
    (`enter`); time is credited to the bucket in force until the next call.

    started_at: the process's start (`time.time()` seconds). enabled: whether this process
    writes the file (process 0); the others keep nothing.
    """

    def __init__(
        self,
        workdir: storage.PathLike,
        started_at: float,
        enabled: bool = True,
        flush_every_s: float | None = None,
    ):
        self._path = storage.as_path(workdir) / LEDGER_FILE
        self.enabled = enabled
        self._earlier = read_ledger(workdir) if enabled else []
        self._taken = max((r["last_step"] for r in self._earlier), default=0)
        self._lock = threading.Lock()
        self._run = {
            "host": socket.gethostname(),
            "started": started_at,
            "first_step": 0,
            "last_step": 0,
            "outcome": "running",
            "buckets": dict.fromkeys(BUCKETS, 0.0),
            "wall": 0.0,
        }
        self._bucket, self._since = "startup", started_at
        self._stop = threading.Event()
        if flush_every_s is None:  # an object store takes about one write a second per object
            flush_every_s = 10.0 if storage.is_remote(self._path) else 0.2
        self._thread = None
        if enabled:
            self._thread = threading.Thread(
                target=self._flush_periodically, args=(flush_every_s,), daemon=True
            )
            self._thread.start()

    def enter(self, bucket: str, step: int | None = None) -> None:
        """From now on time goes to `bucket`; for a training bucket, `step` is the step being
        taken (1-based), and one some earlier moment took already goes to "retrained"."""
        if bucket in TRAINING and step and step <= self._taken:
            bucket = "retrained"
        with self._lock:
            self._credit(time.time())
            self._bucket = bucket

    def begin(self, step: int) -> None:
        """The start trains from `step` (0, or the checkpoint it resumed)."""
        self._run["first_step"] = self._run["last_step"] = step

    def step_done(self, step: int) -> None:
        """`step` is taken: it and the steps before it count as retrained if taken again."""
        self._run["last_step"] = step
        self._taken = max(self._taken, step)

    def _credit(self, now: float) -> None:
        self._run["buckets"][self._bucket] += max(now - self._since, 0.0)
        self._since = now
        self._run["wall"] = now - self._run["started"]

    def flush(self) -> None:
        """Writes the ledger with this start's time up to now."""
        if not self.enabled:
            return
        with self._lock:
            self._credit(time.time())
            text = json.dumps({"runs": [*self._earlier, self._run]}, indent=1)
        storage.write_atomic(self._path, text)

    def _flush_periodically(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            self.flush()

    def close(self, outcome: str) -> list[dict]:
        """Stops the background writes and writes the start's outcome ("finished", "stopped",
        "failed"); returns every run of the ledger."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._run["outcome"] = outcome
        self.flush()
        return [*self._earlier, self._run]
