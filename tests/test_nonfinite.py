"""train.nonfinite: a batch that makes a step non-finite is caught by the step and handled by
the loop: abort (stop, naming the step, nothing non-finite saved), skip (the step changes
nothing) or rollback (back to the last checkpoint, the batch dropped for good)."""

import json
import shutil

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from lm import lora, parallel
from lm.checkpoint import Checkpointer
from lm.models import transformer as T
from lm.train import (
    SKIPPED_BATCHES,
    NonFiniteError,
    OptimizerConfig,
    TrainConfig,
    create_trainer,
    train_loop,
)

from tests import slow_except
from tests.test_main import TINY, run_cli, write_corpus
from tests.test_train import BATCH, CONFIG, LENGTH, OPT


def batches(poison=(), drop=(), count=64):
    """A checkpointable Grain iterator of LM batches, one distinct batch per position of the
    stream; the positions in `poison` have a NaN loss weight (one token of one row), those in
    `drop` are left out (the stream an unbroken run without them sees)."""

    def make(i):
        rng = np.random.default_rng([7, i])
        tokens = rng.integers(1, CONFIG.vocab_size, size=(BATCH, LENGTH + 1)).astype(np.int32)
        weights = np.ones((BATCH, LENGTH), np.float32)
        weights[:, -3:] = 0.0
        if i in poison:
            weights[0, 0] = np.nan
        return {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "segment_ids": np.ones((BATCH, LENGTH), np.int32),
            "positions": np.broadcast_to(np.arange(LENGTH, dtype=np.int32), (BATCH, LENGTH)).copy(),
            "weights": weights,
        }

    positions = [i for i in range(count) if i not in drop]
    return iter(grain.MapDataset.source(positions).map(make).to_iter_dataset())


def make_trainer(variant="jit", nonfinite="abort"):
    opt = OPT
    kwargs = {"devices": jax.devices()[:1]}
    par = parallel.ParallelConfig()
    if variant == "pmap":
        par, kwargs = parallel.ParallelConfig(use_pmap=True), {}
    elif variant == "lora":
        kwargs["lora_config"] = lora.LoraConfig(rank=4, alpha=16.0)
    elif variant == "accum":
        opt = OptimizerConfig(learning_rate=1e-2, warmup_steps=1, grad_accum_steps=2)
    return create_trainer(
        CONFIG, T.build_model(CONFIG), opt, 100, par, nonfinite=nonfinite, **kwargs
    )


@pytest.fixture(scope="module")
def trainer():
    """One trainer for the loop tests: its compiled steps are reused."""
    return make_trainer()


def loop(trainer, workdir, data, steps, nonfinite="abort", log_every=1, checkpoint_every=100):
    config = TrainConfig(
        steps=steps,
        log_every=log_every,
        eval_every=0,
        checkpoint_every=checkpoint_every,
        progress=False,
        nonfinite=nonfinite,
    )
    return jax.device_get(train_loop(trainer, config, workdir, data))


def metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def saved(workdir, trainer):
    """{step: host state} of every checkpoint in the workdir."""
    checkpointer = Checkpointer(workdir)
    states = {
        s: jax.device_get(checkpointer.restore(trainer.abstract_state, step=s)[1])
        for s in checkpointer.all_steps()
    }
    checkpointer.close()
    return states


def all_finite(tree):
    return all(
        np.isfinite(x).all()
        for x in jax.tree.leaves(tree)
        if np.issubdtype(np.asarray(x).dtype, np.inexact)
    )


def assert_equal_trees(a, b):
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_policy_is_validated():
    assert TrainConfig().nonfinite == "abort"
    with pytest.raises(
        ValueError, match=r"train.nonfinite='ignore': use one of 'abort', 'skip', 'rollback'"
    ):
        TrainConfig(nonfinite="ignore")


def test_a_nan_batch_makes_the_plain_step_non_finite(trainer):
    """The injected batch really poisons a step: loss and gradient NaN, and without 'skip' the
    parameters after it are NaN (what abort and rollback must never save)."""
    state = trainer.init_fn(0)
    state, good = trainer.train_step(state, trainer.put_batch(next(batches())))
    assert bool(good["finite"]) and np.isfinite(float(good["loss"]))
    state, bad = trainer.train_step(state, trainer.put_batch(next(batches(poison={0}))))
    assert not bool(bad["finite"])
    assert np.isnan(float(bad["loss"])) and np.isnan(float(bad["grad_norm"]))
    assert not all_finite(jax.device_get(state.params))


@pytest.mark.parametrize("variant", slow_except(["jit", "pmap", "lora", "accum"], "jit", "accum"))
def test_skip_keeps_the_state_bit_for_bit_and_counts(variant):
    """train.nonfinite=skip, in the step: on the poisoned batch the parameters and optimizer
    state are the previous step's exactly and the step counter advances; the skip is counted;
    the steps after it train on. pmap: the NaN is in one device's rows only."""
    trainer = make_trainer(variant, nonfinite="skip")
    state = trainer.to_device_state(trainer.init_fn(0))
    data = batches(poison={2})
    for i in range(4):
        before = jax.device_get(
            trainer.host_state(state)
        )  # a host copy: the step donates the state
        state, metrics = trainer.train_step(state, trainer.put_batch(next(data)))
        after, metrics = jax.device_get((trainer.host_state(state), metrics))
        finite = np.asarray(metrics["finite"])
        assert finite.all() == (i != 2) and finite.any() == (i != 2)  # pmap: every device agrees
        assert (np.asarray(metrics["nonfinite_skipped"]) == int(i >= 2)).all()
        assert int(after.step) == i + 1
        assert all_finite(after.params) and all_finite(after.opt_state)
        if i == 2:
            assert np.isnan(np.asarray(metrics["loss"])).all()
            assert_equal_trees(after.params, before.params)
            assert_equal_trees(after.opt_state, before.opt_state)
        elif i > 0:  # (step 1's learning rate is 0: warmup)
            assert not all(
                np.array_equal(a, b)
                for a, b in zip(
                    jax.tree.leaves(after.params), jax.tree.leaves(before.params), strict=True
                )
            )
    if variant == "lora":
        assert_equal_trees(after.frozen, jax.device_get(trainer.init_fn(0).frozen))


@pytest.mark.parametrize(
    "log_every, checkpoint_every, steps, kept",
    [
        (3, 2, 10, [2, 4]),  # found at step 6's log and save
        (100, 3, 10, [3]),  # found before step 6's save, with no log in between
        (100, 100, 5, []),  # the bad step is the last: found before the final save
    ],
)
def test_abort_names_the_step_and_saves_nothing_after_it(
    trainer, tmp_path, log_every, checkpoint_every, steps, kept
):
    with pytest.raises(
        NonFiniteError,
        match=r"step 5 was not finite \(loss nan, gradient norm nan\)"
        r"\. Stopped \(train.nonfinite=abort\)",
    ) as error:
        loop(
            trainer,
            tmp_path,
            batches(poison={4}),
            steps,
            log_every=log_every,
            checkpoint_every=checkpoint_every,
        )
    assert (
        "no checkpoint had been saved"
        if not kept
        else f"the last checkpoint (step {kept[-1]}) is kept"
    ) in str(error.value)
    states = saved(tmp_path, trainer)
    assert sorted(states) == kept
    assert all(all_finite(s) for s in states.values())
    logged = [m["step"] for m in metrics(tmp_path)] if (tmp_path / "metrics.jsonl").exists() else []
    assert all(s < 5 for s in logged)
    assert not (tmp_path / SKIPPED_BATCHES).exists()


def test_skip_in_the_loop_counts_and_resumes(trainer, tmp_path):
    """metrics.jsonl counts the skipped steps (cumulative), and a resumed run continues the
    count and ends where the unbroken one does."""
    unbroken = loop(trainer, tmp_path / "a", batches(poison={2, 5}), 8, "skip", log_every=2)
    assert [(m["step"], m["nonfinite_skipped"]) for m in metrics(tmp_path / "a")] == [
        (2, 0),
        (4, 1),
        (6, 2),
        (8, 2),
    ]
    assert all_finite(unbroken)
    loop(
        trainer, tmp_path / "b", batches(poison={2, 5}), 4, "skip", log_every=2, checkpoint_every=4
    )
    resumed = loop(trainer, tmp_path / "b", batches(poison={2, 5}), 8, "skip", log_every=2)
    assert [(m["step"], m["nonfinite_skipped"]) for m in metrics(tmp_path / "b")] == [
        (2, 0),
        (4, 1),
        (6, 2),
        (8, 2),
    ]
    assert_equal_trees(resumed, unbroken)


def test_skip_stops_when_every_step_is_skipped(trainer, tmp_path):
    """Ten skipped steps in a row: the state is broken, not a batch; stop rather than run on
    without training (found at the log after the tenth)."""
    with pytest.raises(
        NonFiniteError, match=r"steps 3 to 12 were all not finite .*train.nonfinite=skip"
    ):
        loop(
            trainer,
            tmp_path,
            batches(poison=set(range(2, 20))),
            30,
            "skip",
            log_every=4,
            checkpoint_every=8,
        )
    states = saved(tmp_path, trainer)
    assert sorted(states) == [8] and all_finite(states[8])


def test_rollback_drops_the_bad_batches_and_equals_a_run_without_them(trainer, tmp_path):
    """Two poisoned batches: the first before any checkpoint (back to the initial state), the
    second after step 4's (back to it). Found at the next log (every 3 steps), so good steps
    are retrained too. The result is the run that never saw those batches, bit for bit; a run
    resumed from before a dropped batch drops it again, whatever its own policy."""
    reference = loop(trainer, tmp_path / "reference", batches(drop={1, 6}), 8)
    rolled = loop(
        trainer,
        tmp_path / "run",
        batches(poison={1, 6}),
        8,
        "rollback",
        log_every=3,
        checkpoint_every=4,
    )
    assert_equal_trees(rolled, reference)
    assert json.loads((tmp_path / "run" / SKIPPED_BATCHES).read_text())["batches"] == [
        {"position": 1, "step": 2, "restored_step": 0},
        {"position": 6, "step": 6, "restored_step": 4},
    ]
    logged = metrics(tmp_path / "run")
    assert [m["step"] for m in logged] == [
        3,
        6,
        8,
    ]  # steps 3 and 6 of the discarded tries were not logged
    assert [m["nonfinite_skipped"] for m in logged] == [1, 2, 2]
    assert sorted(saved(tmp_path / "run", trainer)) == [4, 8]

    # As if the run had stopped after the second rollback, before saving step 8.
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "8")
    resumed = loop(trainer, tmp_path / "run", batches(poison={1, 6}), 8, "abort")
    assert_equal_trees(resumed, reference)


def test_rollback_gives_up_on_a_diverging_run(trainer, tmp_path):
    """Bad batch after bad batch with no checkpoint in between is divergence, not bad data:
    stop, keep the checkpoint, and leave no dropped batch on record."""
    with pytest.raises(
        NonFiniteError, match=r"step 5 was not finite .* after 3 rollbacks .* diverges"
    ):
        loop(trainer, tmp_path, batches(poison={4, 5, 6, 7}), 8, "rollback", checkpoint_every=4)
    assert json.loads((tmp_path / SKIPPED_BATCHES).read_text())["batches"] == []
    states = saved(tmp_path, trainer)
    assert sorted(states) == [4] and all_finite(states[4])


@pytest.mark.slow
def test_cli_learning_rate_1e9_stops_non_zero_naming_the_step(tmp_path):
    """The issue's example: lr 1e9 without clipping used to train to its last step on NaN and
    exit 0. Now: exit non-zero with the step, and every checkpoint left is finite and older."""
    source = write_corpus(tmp_path / "corpus", files=2, lines=100)
    workdir = tmp_path / "run"
    proc = run_cli(
        TINY,
        "--config.train.steps=20",
        "--config.optimizer.learning_rate=1e9",
        "--config.optimizer.clip_norm=0",
        "--config.train.checkpoint_every=2",
        workdir=workdir,
        source=source,
        data_dir=tmp_path / "data",
        check=False,
    )
    assert proc.returncode != 0
    message = proc.stderr.strip().splitlines()[-1]
    assert "train.nonfinite=abort" in message, proc.stderr[-3000:]
    bad_step = int(message.split("step ")[1].split()[0])
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert all(s < bad_step for s in steps)
    for s in steps:
        path = workdir / "checkpoints" / str(s) / "state"
        as_numpy = jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
            ocp.PyTreeCheckpointHandler().metadata(path).tree,
        )
        state = ocp.PyTreeCheckpointer().restore(
            path, args=ocp.args.PyTreeRestore(restore_args=as_numpy)
        )
        assert all_finite(state), s
