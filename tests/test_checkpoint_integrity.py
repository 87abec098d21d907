"""Checkpoint integrity is decided from the checkpoint's own files (issue 15, item 5).

A step whose array files are truncated, whose metadata file is missing, or whose directory is
empty falls back to the previous step with a warning naming both, and is set aside; a
checkpoint of another model is a CheckpointMismatchError naming the differing paths, with
nothing moved; a scanned/unrolled layer layout difference is no mismatch.
"""

import dataclasses
import logging
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from lm import parallel
from lm.checkpoint import Checkpointer, CheckpointMismatchError, read_params
from lm.models import transformer as T
from lm.train import TrainConfig, create_trainer, train_loop

from tests.test_train import CONFIG, OPT, synthetic_batches


def _trainer(config=CONFIG):
    return create_trainer(
        config,
        T.build_model(config),
        OPT,
        100,
        parallel.ParallelConfig(),
        devices=jax.devices()[:1],
    )


def _steps(workdir):
    checkpointer = Checkpointer(workdir)
    steps = checkpointer.all_steps()
    checkpointer.close()
    return steps


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A workdir with steps 2 and 4 (never modified: tests copy it), its trainer, and the saved
    step-2 state read with plain Orbax (not with the code under test)."""
    workdir = tmp_path_factory.mktemp("trained")
    trainer = _trainer()
    config = TrainConfig(
        steps=4,
        log_every=1,
        eval_every=0,
        checkpoint_every=2,
        progress=False,
        async_checkpoints=True,
    )
    train_loop(trainer, config, workdir, synthetic_batches())
    assert _steps(workdir) == [2, 4]
    with ocp.StandardCheckpointer() as reader:
        step2 = reader.restore(workdir / "checkpoints" / "2" / "state", trainer.abstract_state)
    return workdir, trainer, jax.device_get(step2)


def _copy(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir)
    return workdir


def _truncate_array_files(step_dir):
    """Halves every file holding array data: OCDBT's data files (in `d/` directories)."""
    files = [f for f in (step_dir / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert files, sorted(str(f) for f in (step_dir / "state").rglob("*"))
    for f in files:
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])


def _remove_metadata(step_dir):
    (step_dir / "state" / "_METADATA").unlink()


def _empty(step_dir):
    shutil.rmtree(step_dir)
    step_dir.mkdir()


@pytest.mark.parametrize(
    "damage",
    [_truncate_array_files, _remove_metadata, _empty],
    ids=["truncated-arrays", "missing-metadata", "empty-dir"],
)
def test_unreadable_latest_step_falls_back_with_a_warning(trained, tmp_path, caplog, damage):
    workdir = _copy(trained, tmp_path)
    _, trainer, step2 = trained
    damage(workdir / "checkpoints" / "4")
    checkpointer = Checkpointer(workdir)
    with caplog.at_level(logging.WARNING):
        step, state = checkpointer.restore(trainer.abstract_state)
    checkpointer.close()
    assert step == 2
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), step2)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint 4 " in w and "falling back to step 2" in w for w in warnings), warnings
    aside = list((workdir / "unreadable_checkpoints").iterdir())
    assert [p.name.split("-")[0] for p in aside] == ["4"]
    assert not (workdir / "checkpoints" / "4").exists()
    assert _steps(workdir) == [2]


def test_nothing_readable_is_a_runtime_error(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    for step in ("2", "4"):
        _remove_metadata(workdir / "checkpoints" / step)
    checkpointer = Checkpointer(workdir)
    with pytest.raises(RuntimeError, match=f"^no readable checkpoint in {workdir}"):
        checkpointer.restore(trained[1].abstract_state)
    checkpointer.close()


def _snapshot(directory):
    return sorted(
        (str(p.relative_to(directory)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in directory.rglob("*")
    )


@pytest.mark.parametrize(
    "change, path",
    [
        (
            {"d_model": 64},
            "params/decoder/final_norm/scale: saved (32,) float32, model (64,) float32",
        ),
        ({"num_layers": 3}, "params/decoder/layer_2/"),
    ],
    ids=["d_model", "num_layers"],
)
def test_another_model_is_a_mismatch_and_nothing_moves(trained, tmp_path, change, path):
    workdir = _copy(trained, tmp_path)
    other = _trainer(T.preset("llama", **{**T.TINY, **change}, num_kv_heads=2))
    before = _snapshot(workdir)
    checkpointer = Checkpointer(workdir)
    with pytest.raises(CheckpointMismatchError, match="new --workdir") as error:
        checkpointer.restore(other.abstract_state)
    checkpointer.close()
    assert path in str(error.value), str(error.value)
    assert _snapshot(workdir) == before
    assert not (workdir / "unreadable_checkpoints").exists()


def test_scanned_and_unrolled_layouts_are_no_mismatch(trained, tmp_path):
    workdir = _copy(trained, tmp_path)
    unrolled = _trainer(dataclasses.replace(CONFIG, scan_layers=False))
    assert T.scanned_period(trained[1].abstract_state) and not T.scanned_period(
        unrolled.abstract_state
    )
    checkpointer = Checkpointer(workdir)
    step, state = checkpointer.restore(unrolled.abstract_state, step=2)
    checkpointer.close()
    assert step == 2
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(T.unstack_layers(state)),
        T.unstack_layers(trained[2]),
    )
    assert not (workdir / "unreadable_checkpoints").exists()
    assert os.listdir(workdir / "checkpoints" / "4")


def test_reading_params_for_inference_falls_back_and_moves_nothing(trained, tmp_path, caplog):
    """read_params (sample, eval, convert, init_from) judges steps as restore does, but only
    reads: an unreadable latest step falls back with a warning naming both steps, and stays."""
    workdir = _copy(trained, tmp_path)
    _truncate_array_files(workdir / "checkpoints" / "4")
    before = _snapshot(workdir)
    with caplog.at_level(logging.WARNING):
        step, params = read_params(workdir, {})
    assert step == 2
    jax.tree.map(np.testing.assert_array_equal, params, trained[2].params)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("checkpoint 4 " in w and "falling back to step 2" in w for w in warnings), warnings
    assert _snapshot(workdir) == before
    _remove_metadata(workdir / "checkpoints" / "2")
    with pytest.raises(ValueError, match=r"no readable checkpoint .* \(tried steps \[2, 4\]\)"):
        read_params(workdir, {})
