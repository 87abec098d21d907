"""Seeing inside a run: `jax.profiler` trace windows (scheduled by `train.profile_start` /
`train.profile_steps`, or asked for while the run goes on) and the train step's compiled
program written out (`train.dump_compiled`), with the memory and cost analyses of one step.

A window is asked for while running by touching WORKDIR/PROFILE (seen at the next log step;
touch it again for another window) or by sending the process SIGUSR1 (seen at the next
step). Traces go to WORKDIR/profile, one `plugins/profile/<time>/<host>.xplane.pb` per window
and process, which xprof and TensorBoard's profile plugin read:

    pip install xprof && xprof --logdir WORKDIR/profile --port 8791
"""

from __future__ import annotations

import dataclasses
import json
import signal
import threading

import jax

from lm import storage

PROFILE_DIR = "profile"
PROFILE_TRIGGER = "PROFILE"
COMPILED_DIR = "compiled"


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes per device of one compiled step (`compiled.memory_analysis()`)."""

    arguments: int  # parameters, optimizer state, batch
    outputs: int
    aliased: int  # outputs written into donated arguments (the new state)
    temporaries: int
    code: int

    @property
    def total(self) -> int:
        """What the step holds at its peak: arguments, outputs not aliased, temporaries."""
        return self.arguments + self.outputs - self.aliased + self.temporaries + self.code

    @classmethod
    def of(cls, compiled) -> StepMemory:
        m = compiled.memory_analysis()
        return cls(
            arguments=m.argument_size_in_bytes,
            outputs=m.output_size_in_bytes,
            aliased=m.alias_size_in_bytes,
            temporaries=m.temp_size_in_bytes,
            code=m.generated_code_size_in_bytes,
        )


def _cost_analysis(compiled) -> dict[str, float]:
    """`compiled.cost_analysis()`'s totals (flops, bytes accessed, transcendentals, ...), as
    one dict (older jax returns a list of one); the per-operand entries ("bytes accessed3{}",
    "utilization0{}") are left out."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return {k: float(v) for k, v in (cost or {}).items() if "{" not in k}


def dump_compiled(train_step, state, batch, workdir: storage.PathLike) -> storage.PathLike:
    """Compiles `train_step` for (state, batch) ahead of time and writes, in WORKDIR/compiled:
    train_step.hlo.txt (the optimized HLO), train_step.json (`StepMemory` bytes per device with
    their total, and the cost analysis: flops, bytes accessed, ...). Returns the directory.

    The run's own first step compiles the same program again (a hit in the persistent
    compilation cache when that is on)."""
    compiled = train_step.lower(state, batch).compile()
    directory = storage.as_path(workdir) / COMPILED_DIR
    directory.mkdir(parents=True, exist_ok=True)
    memory = StepMemory.of(compiled)
    report = {
        "memory_bytes_per_device": {**dataclasses.asdict(memory), "total": memory.total},
        "cost_analysis": _cost_analysis(compiled),
        "devices": jax.device_count(),
        "device_kind": jax.devices()[0].device_kind,
    }
    storage.write_atomic(directory / "train_step.hlo.txt", compiled.as_text())
    storage.write_atomic(directory / "train_step.json", json.dumps(report, indent=2))
    print(f"the train step's compiled program and its analyses: {directory}", flush=True)
    return directory


class ProfileWindows:
    """Which steps are traced. A window of `steps` steps starts before step `start` (1-based,
    as logged; 0 = none scheduled) and again whenever one is asked for (`ask`: SIGUSR1, or
    WORKDIR/PROFILE touched since the last look, `look_for_trigger`).

    `before_step(step)` starts a trace due before `step`; `after_step(step, outputs)` stops
    the one that has run its steps, after waiting for `outputs` so the devices' work is in it.
    """

    def __init__(self, workdir: storage.PathLike, start: int, steps: int):
        self._workdir = storage.as_path(workdir)
        self._next_start, self._steps = start, steps
        self._stop_after = None  # the last step of the open window
        self._asked = threading.Event()
        self._trigger_seen = self._trigger_mtime()
        self._previous_handler = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGUSR1, lambda *_: self._asked.set())
        return self

    def __exit__(self, *exc):
        if self._stop_after is not None:
            jax.profiler.stop_trace()
            self._stop_after = None
        if self._previous_handler is not None:
            signal.signal(signal.SIGUSR1, self._previous_handler)

    def _trigger_mtime(self) -> float | None:
        path = self._workdir / PROFILE_TRIGGER
        return path.stat().mtime if path.exists() else None

    def look_for_trigger(self) -> None:
        """Asks for a window if WORKDIR/PROFILE was touched since the last look."""
        mtime = self._trigger_mtime()
        if mtime is not None and mtime != self._trigger_seen:
            self._asked.set()
        self._trigger_seen = mtime

    def before_step(self, step: int) -> None:
        if self._stop_after is not None:
            return
        if self._asked.is_set() or step == self._next_start:
            self._asked.clear()
            if step == self._next_start:
                self._next_start = 0
            directory = self._workdir / PROFILE_DIR
            print(
                f"profiling steps {step} to {step + self._steps - 1} into {directory}", flush=True
            )
            jax.profiler.start_trace(str(directory))
            self._stop_after = step + self._steps - 1

    def after_step(self, step: int, outputs) -> None:
        if self._stop_after is not None and step >= self._stop_after:
            jax.block_until_ready(outputs)
            jax.profiler.stop_trace()
            self._stop_after = None
            print(f"profile written to {self._workdir / PROFILE_DIR}", flush=True)
