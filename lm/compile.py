"""Ahead-of-time compilation of a run for a device topology: memory per chip, FLOPs, fits.

    python -m lm.main compile --config experiments/llama3_8b.py --topology v5p:4x4x4
    python -m lm.main compile --config experiments/shakespeare_gpt.py --topology cpu:8 \\
        --config.parallel.mesh=1,8,1 --device_memory_gib 80 --json

The trainer is the one training builds (`lm.train.create_trainer`: the same mesh, rules,
precision, remat, objective and LoRA), laid over the topology's devices instead of the
attached ones; the train and eval steps are lowered from abstract inputs (no parameter is
allocated, no data read) and compiled by the target's own compiler. A TPU topology
(`v5p:4x4x4`, `v5e:2x2`, `v6e:4x4`, ...) needs libtpu (the `[tpu]` extra) but no TPU;
`cpu:N` compiles for N host devices, a stand-in for a GPU box: argument and output sizes are
exact there, temporaries are what the CPU compiler needs, not what a GPU's would.

FLOPs are counted from the model (`lm.train.flops_per_token`, 6N + attention per token;
`cost_analysis()` counts a scanned layer body once, whatever the depth), plus the forward
pass that `model.remat='full'` runs again. The step time is those FLOPs at the chip's peak,
and the MFU ceiling is the model's share of them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

import jax

from lm import config as config_lib
from lm import parallel
from lm.data.pipeline import empty_batch
from lm.models.transformer import ModelConfig
from lm.train import flops_per_token, peak_flops_for_kind
from lm.train.profile import StepMemory
from lm.utils import longest_prefix_entry

GIB = 2**30

# HBM per device (one chip; TPU v4 and v5p show one device per chip) in bytes, by device_kind.
HBM_BYTES = {
    "TPU v4": 32 * GIB,
    "TPU v5 lite": 16 * GIB,
    "TPU v5": int(95.74 * GIB),  # v5p
    "TPU v6 lite": 32 * GIB,
}
# What a TPU host holds: compile-only topologies still want a host layout.
CHIPS_PER_HOST_BOUNDS = (2, 2, 1)


class DoesNotFitError(ValueError):
    """The run needs more memory per device than the device has (one line, exit status 2)."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """The devices a run is compiled for. hbm_bytes 0: capacity unknown (fits not judged)."""

    name: str
    devices: list
    hbm_bytes: int
    peak_flops: float

    @property
    def kind(self) -> str:
        return self.devices[0].device_kind


def topology(spec: str, device_memory_gib: float = 0.0, peak_tflops: float = 0.0) -> Topology:
    """'v5p:4x4x4' (a TPU slice, through libtpu) or 'cpu:N' (N host devices) -> its Topology.

    device_memory_gib / peak_tflops: per-device capacity and bf16 peak, replacing the tables
    (`HBM_BYTES`, `lm.train.PEAK_FLOPS`); for cpu:N they say which accelerator it stands for.
    """
    generation, sep, shape = spec.partition(":")
    if not (sep and generation and shape):
        raise ValueError(
            f"--topology {spec!r} is not GENERATION:SHAPE, e.g. v5p:4x4x4, v5e:2x2 or cpu:8"
        )
    if generation == "cpu":
        devices = _cpu_devices(spec, shape)
    else:
        devices = _tpu_devices(spec)
    kind = devices[0].device_kind
    hbm = (
        int(device_memory_gib * GIB)
        if device_memory_gib
        else longest_prefix_entry(HBM_BYTES, kind, 0)
    )
    peak = peak_tflops * 1e12 if peak_tflops else peak_flops_for_kind(kind)
    return Topology(spec, devices, hbm, peak)


def _cpu_devices(spec: str, count: str) -> list:
    if not count.isdigit() or int(count) < 1:
        raise ValueError(f"--topology {spec!r}: cpu:N needs a device count N >= 1")
    n = int(count)
    devices = jax.devices("cpu")
    if len(devices) < n:
        raise ValueError(
            f"--topology {spec} needs {n} CPU devices, this process has {len(devices)}: set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={n} before JAX starts "
            f"(python -m lm.main compile does so itself)"
        )
    return devices[:n]


def _tpu_devices(spec: str) -> list:
    from jax.experimental import topologies  # not loaded by `import jax`

    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server off a TPU VM
    # Compiling touches no chip, so several compiles (a sweep, the tests) may share libtpu.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        import libtpu  # noqa: F401 - only to say how to get it
    except ImportError:
        raise ValueError(
            f"--topology {spec} compiles with libtpu, which is not installed: "
            f"pip install -e '.[tpu]' (no TPU needed), or use --topology cpu:N"
        ) from None
    try:
        description = topologies.get_topology_desc(
            platform="tpu",
            topology_name=spec,
            chip_config_name="default",
            chips_per_host_bounds=CHIPS_PER_HOST_BOUNDS,
            num_slices=1,
        )
    except (jax.errors.JaxRuntimeError, ValueError) as e:
        raise ValueError(
            f"--topology {spec!r} is not a TPU topology libtpu knows "
            f"(e.g. v5p:4x4x4, v5e:4x4, v6e:8x8, v4:2x2x2): {str(e).splitlines()[0]}"
        ) from None
    return description.devices


@dataclasses.dataclass(frozen=True)
class CompileReport:
    """What compiling a run for a topology says. FLOPs are per step, all devices together."""

    topology: str
    device_kind: str
    devices: int
    mesh: tuple[int, ...]
    batch: tuple[int, int]  # global rows, positions per row
    num_params: int
    remat: str
    train: StepMemory
    eval: StepMemory
    init: StepMemory  # the random init of the state, made sharded where it lives
    hbm_bytes: int  # per device; 0 = unknown
    model_flops: float
    executed_flops: float  # model_flops plus the forward pass that remat runs again
    peak_flops: float  # per device; 0 = unknown
    compile_seconds: float
    hint: str  # what to change if it does not fit

    @property
    def fits(self) -> bool | None:
        if not self.hbm_bytes:
            return None
        return self.peak_bytes <= self.hbm_bytes

    @property
    def peak_bytes(self) -> int:
        """The most that one of the programs (init, train step, eval step) holds per device."""
        return max(self.train.total, self.eval.total, self.init.total)

    @property
    def step_seconds(self) -> float:
        """The train step's time at the devices' peak: a lower bound."""
        if not self.peak_flops:
            return 0.0
        return self.executed_flops / self.devices / self.peak_flops

    @property
    def mfu_ceiling(self) -> float:
        return self.model_flops / self.executed_flops

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["train"]["total"] = self.train.total
        out["eval"]["total"] = self.eval.total
        out["init"]["total"] = self.init.total
        del out["hint"]
        out.update(fits=self.fits, step_seconds=self.step_seconds, mfu_ceiling=self.mfu_ceiling)
        return out

    def table(self) -> str:
        rows, length = self.batch
        hbm = _size(self.hbm_bytes) if self.hbm_bytes else "unknown"
        temp_note = " (the CPU compiler's)" if self.device_kind == "cpu" else ""
        lines = [
            f"{self.topology}: {self.devices} x {self.device_kind}, mesh {self.mesh} "
            f"(data, fsdp, tensor), {self.num_params:,} parameters, batch {rows} x {length}, "
            f"remat {self.remat}",
            f"{'per device':<34}{'train step':>12}{'eval step':>12}{'init':>12}",
        ]
        for label, field in [
            ("arguments (state, batch)", "arguments"),
            ("outputs not donated", None),
            (f"temporaries{temp_note}", "temporaries"),
            ("total", "total"),
        ]:
            if field is None:
                values = [m.outputs - m.aliased for m in (self.train, self.eval, self.init)]
            else:
                values = [getattr(m, field) for m in (self.train, self.eval, self.init)]
            lines.append(f"{label:<34}" + "".join(f"{_size(v):>12}" for v in values))
        verdict = {None: "not judged", True: "fits", False: "DOES NOT FIT"}[self.fits]
        peak = self.peak_bytes
        headroom = f", headroom {_size(self.hbm_bytes - peak)}" if self.hbm_bytes else ""
        lines.append(f"device memory {hbm}: {verdict}{headroom}")
        lines.append(
            f"FLOPs per step {self.model_flops:.3e} (model), {self.executed_flops:.3e} with remat "
            f"recompute; per device {self.executed_flops / self.devices:.3e}"
        )
        if self.peak_flops:
            lines.append(
                f"at {self.peak_flops / 1e12:.0f} TFLOP/s per device: step >= "
                f"{self.step_seconds * 1e3:.1f} ms, "
                f"{rows * length / max(self.step_seconds, 1e-12):,.0f} tokens/s at most, "
                f"MFU ceiling {100 * self.mfu_ceiling:.1f}%"
            )
        lines.append(f"compile {self.compile_seconds:.1f} s (train step, eval step, init)")
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / 2**20:.1f} MiB"


def abstract_batch(data_cfg, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch of `data_cfg` as ShapeDtypeStructs laid out over `mesh`'s batch axes."""
    sharding = parallel.batch_sharding(mesh)
    return {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding)
        for k, v in empty_batch(data_cfg, data_cfg.batch_size).items()
    }


def model_flops_per_step(model_cfg: ModelConfig, num_params: int, rows: int, length: int):
    """(model FLOPs, executed FLOPs) of one train step over rows x length tokens: executed adds
    the forward pass (a third) that remat='full' runs again, and the vocabulary projection's
    forward (2 x vocab x d_model per token) that `logits_chunk` runs again."""
    model = flops_per_token(model_cfg, num_params, length) * rows * length
    executed = model * 4 / 3 if model_cfg.remat == "full" else model
    if model_cfg.logits_chunk:
        executed += 2 * model_cfg.vocab_size * model_cfg.d_model * rows * length
    return model, executed


# The TPU compiler's out-of-memory messages: (needed, capacity) with units.
_OUT_OF_MEMORY = (
    re.compile(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM \(([\d.]+)([KMGT]?)\)"),
    re.compile(r"Used ([\d.]+)([KMGT]?) of ([\d.]+)([KMGT]?) hbm"),
)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _does_not_fit(what: str, needed: float, capacity: float, report_hint: str) -> DoesNotFitError:
    return DoesNotFitError(
        f"{what} does not fit: needs {needed / GIB:.2f} GiB per device of {capacity / GIB:.2f} "
        f"GiB; {report_hint}"
    )


def _hint(model_cfg: ModelConfig, mesh: tuple[int, ...]) -> str:
    """What to change when a run does not fit, given what it already does."""
    options = []
    if mesh[1] < mesh[0] * mesh[1]:
        options.append("more FSDP (--config.parallel.mesh=1,-1,1)")
    if model_cfg.remat != "full":
        options.append("--config.model.remat=full")
    if not model_cfg.logits_chunk:
        options.append("--config.model.logits_chunk=512")
    options.append("a smaller --config.data.batch_size (or optimizer.grad_accum_steps > 1)")
    options.append("a larger slice")
    return "try " + ", ".join(options)


def _compile(lowered, what: str, hint: str):
    """lowered.compile(), a TPU's out-of-memory error turned into a DoesNotFitError."""
    try:
        return lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        text = str(e)
        if "RESOURCE_EXHAUSTED" not in text:
            raise
        match = next(filter(None, (p.search(text) for p in _OUT_OF_MEMORY)), None)
        if match is None:
            raise DoesNotFitError(f"{what} does not fit: {text.splitlines()[0]}; {hint}") from None
        used = float(match[1]) * _UNITS[match[2]]
        capacity = float(match[3]) * _UNITS[match[4]]
        raise _does_not_fit(what, used, capacity, hint) from None


def compile_run(values: dict[str, Any], target: Topology) -> CompileReport:
    """Compiles the train and eval steps of the run `values` describes (a resolved config, as
    `lm.config.resolve` gives) for `target`. DoesNotFitError (one line: the numbers and what
    to change) when the compiler runs out of device memory or the total exceeds the device's."""
    config = config_lib.build(values)
    data_cfg = config.data
    model_cfg = config.model_config(data_cfg.vocab_size)
    trainer = config.create_trainer(model_cfg, devices=target.devices)
    mesh = tuple(trainer.mesh.shape.values())
    hint = _hint(model_cfg, mesh)
    batch = abstract_batch(data_cfg, trainer.mesh)
    start = time.perf_counter()
    train = _compile(
        trainer.train_step.lower(trainer.abstract_state, batch), "the train step", hint
    )
    eval_params = trainer.abstract_state.params
    if trainer.lora is not None:  # evaluation runs the merged model, laid out like the base
        eval_params = trainer.abstract_state.frozen
    evaluation = _compile(trainer.eval_step.lower(eval_params, batch), "the eval step", hint)
    init = _compile(trainer.init_fn.lower(config.train.seed), "the parameter init", hint)
    seconds = time.perf_counter() - start
    rows, length = data_cfg.batch_size, data_cfg.seq_len
    model_flops, executed = model_flops_per_step(model_cfg, trainer.num_params, rows, length)
    report = CompileReport(
        topology=target.name,
        device_kind=target.kind,
        devices=len(target.devices),
        mesh=mesh,
        batch=(rows, length),
        num_params=trainer.num_params,
        remat=model_cfg.remat,
        train=StepMemory.of(train),
        eval=StepMemory.of(evaluation),
        init=StepMemory.of(init),
        hbm_bytes=target.hbm_bytes,
        model_flops=model_flops,
        executed_flops=executed,
        peak_flops=target.peak_flops,
        compile_seconds=seconds,
        hint=hint,
    )
    return report


def check_fits(report: CompileReport) -> None:
    """DoesNotFitError (one line) when the report's larger step exceeds the device memory."""
    if report.fits is False:
        rows, length = report.batch
        raise _does_not_fit(
            f"batch {rows} x {length} on {report.topology} (mesh {report.mesh})",
            report.peak_bytes,
            report.hbm_bytes,
            report.hint,
        )
