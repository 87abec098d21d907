"""The hang watchdog: a run in which no training step completes for `train.step_timeout_s`
seconds writes every Python thread's stack to the log and exits with `WATCHDOG_EXIT`, a status
of its own, so that a launcher can restart it from its last checkpoint.

The clock starts at the first completed step (compiling is not a hang) and runs only while the
loop waits for batches or for the devices: evaluation, checkpoint saves and restores have no
deadline, and the end of one restarts the clock.

Several processes (`jax.distributed`): each publishes where it is (steps done, what it waits
for, since when) in the coordination service's key-value store every poll. The first to fire
says so there, and the others fire at their next poll, so the whole job stops together; each
names the process that is behind: the fewest steps done, and of those, the ones waiting for
something other than the devices (their batch), whom the rest wait for in the step's
collectives.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable

import jax

WATCHDOG_EXIT = 75  # sysexits' EX_TEMPFAIL: a temporary failure, worth trying again
WATCHED = ("data_wait", "steps", "retrained")  # the loop's waits that have a deadline
_KEY = "lm_watchdog"


def thread_stacks() -> str:
    """Every Python thread's stack, each under its name."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        stack = "".join(traceback.format_stack(frame))
        parts.append(f"--- thread {names.get(ident, ident)} ---\n{stack}")
    return "\n".join(parts)


def name_laggards(states: dict[int, dict]) -> list[int]:
    """The processes that the others wait for: the fewest steps done, and of those the ones
    not waiting on the devices (if any is). states: process -> {done, bucket, ...}."""
    fewest = min(s["done"] for s in states.values())
    behind = [p for p, s in sorted(states.items()) if s["done"] == fewest]
    off_device = [p for p in behind if states[p]["bucket"] not in ("steps", "retrained")]
    return off_device or behind


def describe(states: dict[int, dict], now: float) -> str:
    """One line per process: steps done, what it waits for and for how long."""
    return "\n".join(
        f"  process {p}: {s['done']} steps done, in {s['bucket']} for step {s['step']} "
        f"for {now - s['since']:.0f} s"
        for p, s in sorted(states.items())
    )


class Watchdog:
    """A daemon thread that fires when no step completes within `timeout_s` while the loop
    waits in a `WATCHED` bucket. The loop reports its buckets (`enter`) and completed steps
    (`step_done`); `on_fire` runs just before the exit (the goodput ledger's last write)."""

    def __init__(self, timeout_s: float, on_fire: Callable[[], None] = lambda: None):
        self._timeout = timeout_s
        self._on_fire = on_fire
        self._poll = min(1.0, timeout_s / 10)
        now = time.time()
        self._state = {"done": 0, "bucket": "startup", "step": 0, "since": now}
        self._armed, self._last_progress = False, now
        self._client = _distributed_client()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="lm-watchdog", daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def enter(self, bucket: str, step: int) -> None:
        now = time.time()
        if self._state["bucket"] not in WATCHED:  # the end of an undeadlined wait is progress
            self._last_progress = now
        self._state = {**self._state, "bucket": bucket, "step": step, "since": now}

    def step_done(self, step: int) -> None:
        self._armed, self._last_progress = True, time.time()
        self._state = {**self._state, "done": step}

    def _watch(self) -> None:
        while not self._stop.wait(self._poll):
            self._publish()
            state, now = self._state, time.time()
            stalled = now - self._last_progress
            if self._armed and state["bucket"] in WATCHED and stalled > self._timeout:
                self._fire(f"no training step completed for {stalled:.0f} s")
            elif (by := self._fired_elsewhere()) is not None:
                self._fire(f"process {by}'s watchdog fired")

    def _publish(self) -> None:
        if self._client is not None:
            key = f"{_KEY}/state/{jax.process_index()}"
            self._client.key_value_set(key, json.dumps(self._state), allow_overwrite=True)

    def _fired_elsewhere(self) -> int | None:
        if self._client is None:
            return None
        entries = dict(self._client.key_value_dir_get(f"{_KEY}/fired/"))
        return int(next(iter(entries.values()))) if entries else None

    def _others(self) -> dict[int, dict]:
        """Every process's published state (this one's as it is now)."""
        states = {jax.process_index(): self._state}
        if self._client is None:
            return states
        try:
            for key, value in self._client.key_value_dir_get(f"{_KEY}/state/"):
                states.setdefault(int(key.rsplit("/", 1)[-1]), json.loads(value))
        except jax.errors.JaxRuntimeError as e:  # the coordinator itself may be gone
            logging.error("watchdog: the other processes' states are unreadable: %s", e)
        return states

    def _fire(self, why: str) -> None:
        index = jax.process_index()
        states, now = self._others(), time.time()
        lines = [
            f"watchdog: {why} (train.step_timeout_s={self._timeout:g}); process {index} stops "
            f"with exit status {WATCHDOG_EXIT} so that its launcher can restart it"
        ]
        if len(states) > 1:
            laggards = ", ".join(map(str, name_laggards(states)))
            lines += [f"the process(es) the others wait for: {laggards}", describe(states, now)]
        else:
            lines.append(describe(states, now))
        lines.append("every thread's stack:\n" + thread_stacks())
        logging.error("%s", "\n".join(lines))
        self._on_fire()
        logging.shutdown()
        if self._client is not None:
            self._client.key_value_set(f"{_KEY}/fired/{index}", str(index), allow_overwrite=True)
            self._wait_for_the_others()
        os._exit(WATCHDOG_EXIT)

    def _wait_for_the_others(self) -> None:
        """Until every process has fired (each sees the first one's at its next poll), so that
        none is cut off in a collective by another's exit before it has said where it is. The
        coordinator goes last: the others' clients end their process when it is gone."""
        deadline = time.time() + 2 * self._poll + 5
        while time.time() < deadline:
            try:
                fired = len(self._client.key_value_dir_get(f"{_KEY}/fired/"))
            except jax.errors.JaxRuntimeError:  # the coordinator is gone: nothing to wait for
                return
            if fired >= jax.process_count():
                break
            time.sleep(0.05)
        if jax.process_index() == 0:
            time.sleep(0.5)


def _distributed_client():
    """The coordination service's client of a multi-process run (None in one process)."""
    if jax.process_count() == 1:
        return None
    from jax._src import distributed  # the key-value store has no public API

    return distributed.global_state.client
