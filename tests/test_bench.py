"""The benchmark commands' building blocks (the benchmarks themselves print ratios; no timings
are asserted here)."""

import dataclasses

from launch.sweep import load_experiment
from lm import bench, config
from lm.models import transformer as T


def test_main_job_shape_is_the_experiments():
    module, _ = load_experiment("experiments/shakespeare_gpt.py")
    values = config.resolve(module.get_config())
    model = {**values["model"], "vocab_size": values["data"]["vocab_size"]}
    assert T.ModelConfig.from_dict(model) == bench.MAIN_JOB_SHAPE
    assert bench.MAIN_JOB_BATCH == (values["data"]["batch_size"], values["data"]["seq_len"])


def test_remat_shrinks_the_train_steps_temporary_memory():
    """What `python -m lm.bench layers` measures, at a small shape: saving nothing inside a layer
    ('full') needs less scratch memory than saving everything ('none')."""
    small = T.preset(
        "llama",
        d_model=64,
        num_layers=6,
        num_heads=4,
        num_kv_heads=2,
        mlp_dim=256,
        vocab_size=128,
        max_len=128,
    )
    memory = {
        remat: bench.compile_step(dataclasses.replace(small, remat=remat), 4, 128)[1]
        .memory_analysis()
        .temp_size_in_bytes
        for remat in ("none", "dots_saveable", "full")
    }
    assert memory["full"] < memory["dots_saveable"] < memory["none"], memory
