"""`lm.train.profile.kernel_breakdown`: a trace's device time per kernel, busy and idle time,
read from a GPU-shaped trace written here and from a real CPU train step's trace."""

import jax
import pytest
from jax.profiler import ProfileData
from lm.bench.common import one_device_trainer, random_batch
from lm.train.profile import format_breakdown, kernel_breakdown, latest_trace

from tests.test_train import CONFIG

US = 1_000_000  # picoseconds


def _event(metadata_id, start_us, duration_us, op=None):
    stats = (
        f'stats {{ metadata_id: 1 str_value: "{op}:#hlo_op={op},hlo_module=jit_step#" }}'
        if op
        else ""
    )
    return (
        f"events {{ metadata_id: {metadata_id} offset_ps: {start_us * US} "
        f"duration_ps: {duration_us * US} {stats} }}"
    )


def gpu_trace(path):
    """Two streams of one GPU (kernels carry the annotation of their launch, as CUPTI records
    it), a module line spanning them, and a host plane whose thunk events must not count."""
    streams = f"""
      lines {{ id: 1 name: "Stream #13(compute)" timestamp_ns: 1000
        {_event(10, 0, 100, "fusion.1")} {_event(10, 200, 100, "fusion.1")} }}
      lines {{ id: 2 name: "Stream #14(compute)" timestamp_ns: 1000
        {_event(11, 50, 100, "custom-call.3")} {_event(12, 290, 20)} }}
      lines {{ id: 3 name: "XLA Modules" timestamp_ns: 1000 {_event(13, 0, 310)} }}
    """
    names = {10: "sm90_xmma_gemm_bf16", 11: "cudnn_sdpa_fprop", 12: "memcpy", 13: "jit_step"}
    metadata = " ".join(
        f'event_metadata {{ key: {k} value {{ id: {k} name: "{v}" }} }}' for k, v in names.items()
    )
    text = f"""
    planes {{ id: 1 name: "/host:CPU"
      lines {{ id: 1 name: "tf_XLAEigen" timestamp_ns: 0 {_event(1, 0, 5000)} }}
      event_metadata {{ key: 1 value {{ id: 1 name: "thunk" }} }}
      stat_metadata {{ key: 1 value {{ id: 1 name: "hlo_op" }} }} }}
    planes {{ id: 2 name: "/device:GPU:0" {streams} {metadata}
      stat_metadata {{ key: 1 value {{ id: 1 name: "annotation" }} }} }}
    """
    path.write_bytes(ProfileData.text_proto_to_serialized_xspace(text))
    return path


def test_gpu_trace_is_summed_per_kernel_with_overlaps_counted_once(tmp_path):
    breakdown = kernel_breakdown(gpu_trace(tmp_path / "gpu.xplane.pb"), steps=2)
    assert breakdown.device == "/device:GPU:0"
    got = {(k.name, k.hlo_op): (k.ns_per_step, k.calls_per_step) for k in breakdown.kernels}
    assert got == {
        ("sm90_xmma_gemm_bf16", "fusion.1"): (100_000, 1.0),
        ("cudnn_sdpa_fprop", "custom-call.3"): (50_000, 0.5),
        ("memcpy", ""): (10_000, 0.5),
    }
    assert breakdown.kernels[0].name == "sm90_xmma_gemm_bf16"  # most time first
    # Busy: [0, 150) and [200, 310) us over 2 steps; the module line spans them and is left out.
    assert breakdown.busy_ns_per_step == 130_000
    assert breakdown.span_ns_per_step == 155_000
    text = format_breakdown(breakdown, step_seconds=200e-6, top=2)
    assert "sm90_xmma_gemm_bf16 [fusion.1]" in text and "the other 1 kernels" in text
    assert "(65.0% of the step" in text and "idle 0.07 ms" in text


def test_a_trace_with_no_device_plane_is_refused(tmp_path):
    path = tmp_path / "empty.xplane.pb"
    path.write_bytes(
        ProfileData.text_proto_to_serialized_xspace('planes { name: "/host:metadata" }')
    )
    with pytest.raises(ValueError, match="no device or host plane"):
        kernel_breakdown(path, steps=1)


@pytest.mark.slow
def test_cpu_train_step_trace_names_the_ops_of_the_compiled_step(tmp_path):
    trainer = one_device_trainer(CONFIG)
    state = trainer.init_fn(0)
    batch = trainer.put_batch(random_batch(CONFIG.vocab_size, 2, 16))
    state, metrics = trainer.train_step(state, batch)  # compiled outside the trace
    jax.block_until_ready(metrics)
    with jax.profiler.trace(str(tmp_path)):
        for _ in range(2):
            state, metrics = trainer.train_step(state, batch)
        jax.block_until_ready(metrics)
    breakdown = kernel_breakdown(latest_trace(tmp_path), steps=2)
    assert breakdown.device == "/host:CPU"
    hlo = trainer.train_step.lower(state, batch).compile().as_text()
    ops = {k.hlo_op for k in breakdown.kernels}
    assert ops and all(f"{op} = " in hlo for op in ops), ops - {o for o in ops if f"{o} = " in hlo}
    assert 0 < breakdown.busy_ns_per_step <= breakdown.span_ns_per_step
    assert breakdown.busy_ns_per_step <= breakdown.kernel_ns_per_step
