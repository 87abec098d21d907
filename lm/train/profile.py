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
import re
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


@dataclasses.dataclass(frozen=True)
class KernelTime:
    """One kernel's (or, on a CPU, one XLA op's) share of the traced steps."""

    name: str  # the kernel's name (GPU) or the HLO op's (CPU, TPU)
    hlo_op: str  # the HLO instruction that launched it ('' where the trace does not say)
    ns_per_step: float
    calls_per_step: float


@dataclasses.dataclass(frozen=True)
class KernelBreakdown:
    """Where the device time of `steps` traced steps went (`kernel_breakdown`)."""

    device: str  # the trace plane read: '/device:GPU:0', '/host:CPU', ...
    steps: int
    kernels: tuple[KernelTime, ...]  # most time first
    busy_ns_per_step: float  # time with at least one kernel running (overlaps counted once)
    span_ns_per_step: float  # from the first kernel's start to the last one's end

    @property
    def kernel_ns_per_step(self) -> float:
        return sum(k.ns_per_step for k in self.kernels)


def _union_ns(intervals: list[tuple[float, float]]) -> float:
    """The length of the union of [start, end) intervals."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def _device_plane(profile):
    """The first accelerator plane of a trace, or the host's where there is none (CPU runs)."""
    planes = list(profile.planes)
    for prefix in ("/device:GPU:", "/device:TPU:", "/host:CPU"):
        for plane in planes:
            if plane.name.startswith(prefix):
                return plane
    raise ValueError(f"no device or host plane in the trace: {[p.name for p in planes]}")


# Lines of an accelerator's plane that summarise others (whole modules, steps) rather than
# hold kernels; counting them would count each kernel's time again.
_SUMMARY_LINES = ("XLA Modules", "Steps", "XLA TraceMe", "Framework Ops", "Framework Name Scope")


def _hlo_op(stats: dict) -> str | None:
    """The HLO op an event ran for: its `hlo_op` stat, or the `hlo_op=` entry of the annotation
    a GPU kernel carries from its launch (XLA's `op:#hlo_op=...,hlo_module=...#`)."""
    if "hlo_op" in stats:
        return str(stats["hlo_op"])
    match = re.search(r"hlo_op=([^,#]+)", str(stats.get("annotation", "")))
    return match.group(1) if match else None


def _kernel_events(plane):
    """(name, HLO op, start ns, duration ns) of the kernels on one plane: on the host's plane
    (CPU runs) only the events attributed to an HLO op, so Python and runtime bookkeeping stay
    out; on an accelerator's every event of its stream or op lines."""
    on_host = plane.name.startswith("/host:")
    for line in plane.lines:
        if not on_host and line.name in _SUMMARY_LINES:
            continue
        for event in line.events:
            op = _hlo_op(dict(event.stats))
            if event.duration_ns > 0 and (op is not None or not on_host):
                yield event.name, op or "", event.start_ns, event.duration_ns


def kernel_breakdown(xplane_file: storage.PathLike, steps: int) -> KernelBreakdown:
    """Sums a `jax.profiler` trace (`.xplane.pb`) of `steps` steps per kernel on one device
    (the first GPU or TPU, else the host's CPU). A GPU kernel keeps its own name, with the HLO
    op that launched it beside it. Busy time is the union over the device's lines (streams,
    threads); the span minus it is time the device waited."""
    from jax.profiler import ProfileData

    plane = _device_plane(ProfileData.from_file(str(xplane_file)))
    totals: dict[tuple[str, str], list[float]] = {}
    intervals = []
    for name, op, start, duration in _kernel_events(plane):
        entry = totals.setdefault((name, op), [0.0, 0])
        entry[0] += duration
        entry[1] += 1
        intervals.append((start, start + duration))
    if not intervals:
        raise ValueError(f"no kernels on {plane.name} in {xplane_file}")
    kernels = sorted(
        (KernelTime(name, op, ns / steps, n / steps) for (name, op), (ns, n) in totals.items()),
        key=lambda k: -k.ns_per_step,
    )
    span = max(end for _, end in intervals) - min(start for start, _ in intervals)
    return KernelBreakdown(
        plane.name, steps, tuple(kernels), _union_ns(intervals) / steps, span / steps
    )


def latest_trace(directory: storage.PathLike) -> storage.PathLike:
    """The newest `.xplane.pb` under a `jax.profiler.trace` directory."""
    files = sorted(storage.as_path(directory).glob("plugins/profile/*/*.xplane.pb"))
    if not files:
        raise FileNotFoundError(f"no plugins/profile/*/*.xplane.pb under {directory}")
    return files[-1]


def format_breakdown(breakdown: KernelBreakdown, step_seconds: float, top: int = 15) -> str:
    """The `top` kernels as a table (ms per step, share of the measured step, calls per step),
    then the device's busy time and the idle gaps against the step."""
    step_ms = 1e3 * step_seconds
    lines = [
        f"kernels on {breakdown.device}, per step of {step_ms:.2f} ms ({breakdown.steps} steps traced):",
        f"{'ms':>9} {'of step':>8} {'calls':>7}  kernel [HLO op]",
    ]
    for k in breakdown.kernels[:top]:
        op = f" [{k.hlo_op}]" if k.hlo_op and k.hlo_op != k.name else ""
        lines.append(
            f"{k.ns_per_step / 1e6:9.3f} {100 * k.ns_per_step / 1e6 / step_ms:7.1f}% "
            f"{k.calls_per_step:7.1f}  {k.name[:90]}{op}"
        )
    rest = breakdown.kernels[top:]
    if rest:
        lines.append(
            f"{sum(k.ns_per_step for k in rest) / 1e6:9.3f} "
            f"{100 * sum(k.ns_per_step for k in rest) / 1e6 / step_ms:7.1f}%"
            f" {sum(k.calls_per_step for k in rest):7.1f}  the other {len(rest)} kernels"
        )
    busy_ms = breakdown.busy_ns_per_step / 1e6
    lines.append(
        f"device busy {busy_ms:.2f} ms a step ({100 * busy_ms / step_ms:.1f}% of the step; "
        f"kernel time {breakdown.kernel_ns_per_step / 1e6:.2f} ms counts overlaps twice), "
        f"idle {step_ms - busy_ms:.2f} ms"
    )
    return "\n".join(lines)
