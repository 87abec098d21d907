"""Training: sharded steps equal one device, pmap equals jit, exact resume, accumulation."""

import dataclasses
import json

import grain
import jax
import numpy as np
import pytest
from lm import parallel
from lm.checkpoint import Checkpointer, CheckpointMismatchError
from lm.models import transformer as T
from lm.train import OptimizerConfig, TrainConfig, create_trainer, train_loop

CONFIG = T.preset("llama", **T.TINY, num_kv_heads=2)
OPT = OptimizerConfig(learning_rate=1e-2, warmup_steps=1)
BATCH, LENGTH = 8, 16


def synthetic_batches(seed=0, batch=BATCH, length=LENGTH, vocab=CONFIG.vocab_size):
    """A checkpointable Grain iterator of LM batches with some padding."""

    def make(i):
        rng = np.random.default_rng([seed, i % 2])  # two batches: learnable
        tokens = rng.integers(1, vocab, size=(batch, length + 1)).astype(np.int32)
        weights = np.ones((batch, length), np.float32)
        weights[:, -3:] = 0.0  # a padded tail
        return {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "segment_ids": (weights > 0).astype(np.int32),
            "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (batch, length)).copy(),
            "weights": weights,
        }

    return iter(grain.MapDataset.range(10_000).map(make).to_iter_dataset())


def run_steps(mesh=(-1, 1, 1), use_pmap=False, devices=None, steps=4, opt=OPT, config=CONFIG):
    trainer = create_trainer(
        config,
        T.build_model(config),
        opt,
        100,
        parallel.ParallelConfig(mesh=mesh, use_pmap=use_pmap),
        devices=devices,
    )
    state = trainer.to_device_state(trainer.init_fn(0))
    data = synthetic_batches()
    losses = []
    for _ in range(steps):
        state, metrics = trainer.train_step(state, trainer.put_batch(next(data)))
        losses.append(float(np.asarray(metrics["loss"]).reshape(-1)[0]))
    return losses, jax.device_get(trainer.host_state(state).params)


@pytest.fixture(scope="module")
def single_device():
    return run_steps(devices=jax.devices()[:1])


@pytest.mark.parametrize(
    "mesh", [(8, 1, 1), pytest.param((2, 4, 1), marks=pytest.mark.slow), (2, 2, 2)]
)
def test_mesh_matches_single_device(single_device, mesh):
    assert jax.device_count() == 8
    losses, params = run_steps(mesh=mesh)
    ref_losses, ref_params = single_device
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    assert ref_losses[-1] < ref_losses[0]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params, ref_params)


def test_bf16_precision_trains_with_float32_master_weights(single_device):
    """precision='bf16': the step computes in bfloat16, but parameters and Adam moments stay
    float32 and the loss follows the float32 run's."""
    losses, params = run_steps(
        devices=jax.devices()[:1], config=dataclasses.replace(CONFIG, precision="bf16")
    )
    ref_losses, _ = single_device
    assert all(p.dtype == np.float32 for p in jax.tree.leaves(params))
    # Measured: 4.5e-5 relative to the float32 losses over the 4 steps.
    np.testing.assert_allclose(losses, ref_losses, rtol=5e-4)
    assert losses != ref_losses and losses[-1] < losses[0]


@pytest.mark.slow
def test_pmap_matches_single_device(single_device):
    losses, params = run_steps(use_pmap=True)
    ref_losses, ref_params = single_device
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params, ref_params)


def test_fsdp_and_tensor_mesh_really_shard_parameters():
    config = CONFIG
    trainer = create_trainer(
        config, T.build_model(config), OPT, 10, parallel.ParallelConfig(mesh=(2, 2, 2))
    )
    # Scanned layers: [layers, embed, mlp], the stacked axis replicated.
    wi = trainer.state_shardings.params["decoder"]["layers"]["block_0"]["mlp"]["wi_gate"]["kernel"]
    assert tuple(wi.spec) == (None, "fsdp", "tensor")
    mu = trainer.state_shardings.opt_state[1][0].mu["decoder"]["layers"]["block_0"]["mlp"][
        "wi_gate"
    ]["kernel"]
    assert tuple(mu.spec) == (None, "fsdp", "tensor")


def test_gradient_accumulation_matches_full_batch(single_device):
    losses, params = run_steps(
        devices=jax.devices()[:1],
        opt=OptimizerConfig(learning_rate=1e-2, warmup_steps=1, grad_accum_steps=4),
    )
    ref_losses, ref_params = single_device
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), params, ref_params)


@pytest.mark.slow
def test_adafactor_trains():
    losses, _ = run_steps(
        devices=jax.devices()[:1],
        steps=8,
        opt=OptimizerConfig(name="adafactor", learning_rate=1e-2, warmup_steps=1),
    )
    assert losses[-1] < losses[0]


def _loop(workdir, steps, checkpoint_every, config=CONFIG):
    trainer = create_trainer(
        config,
        T.build_model(config),
        OPT,
        100,
        parallel.ParallelConfig(),
        devices=jax.devices()[:1],
    )
    train_config = TrainConfig(
        steps=steps,
        log_every=1,
        eval_every=0,
        checkpoint_every=checkpoint_every,
        progress=False,
        async_checkpoints=True,
    )
    data = synthetic_batches()
    state = train_loop(trainer, train_config, workdir, data)
    return state, data


def test_exact_resume(tmp_path):
    unbroken, unbroken_data = _loop(tmp_path / "a", steps=6, checkpoint_every=100)
    _loop(tmp_path / "b", steps=3, checkpoint_every=3)
    resumed, resumed_data = _loop(tmp_path / "b", steps=6, checkpoint_every=100)
    assert int(resumed.step) == 6
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(resumed.params),
        jax.device_get(unbroken.params),
    )
    # Same data order afterwards too.
    np.testing.assert_array_equal(next(resumed_data)["inputs"], next(unbroken_data)["inputs"])
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [int(__import__("json").loads(line)["step"]) for line in lines] == [1, 2, 3, 4, 5, 6]


def test_checkpoint_of_another_shape_is_refused_and_kept(tmp_path):
    _loop(tmp_path, steps=2, checkpoint_every=2)
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "checkpoints").rglob("*"))
    bigger = T.preset("llama", **{**T.TINY, "d_model": 64}, num_kv_heads=2)
    with pytest.raises(CheckpointMismatchError, match="new --workdir"):
        _loop(tmp_path, steps=4, checkpoint_every=2, config=bigger)
    after = sorted(p.relative_to(tmp_path) for p in (tmp_path / "checkpoints").rglob("*"))
    assert before == after
    assert Checkpointer(tmp_path).latest_step() == 2


@pytest.mark.parametrize(
    "saved_on, restored_on",
    [
        pytest.param((8, 1, 1), (2, 2, 2), marks=pytest.mark.slow),
        pytest.param((8, 1, 1), (2, 4, 1), marks=pytest.mark.slow),
        ((8, 1, 1), "one device"),
        # FSDP over 8 devices -> a single device, and the reverse
        pytest.param((1, 8, 1), "one device", marks=pytest.mark.slow),
        pytest.param("one device", (1, 8, 1), marks=pytest.mark.slow),
    ],
)
def test_restore_onto_a_different_mesh(tmp_path, saved_on, restored_on):
    def trainer_for(layout):
        if layout == "one device":
            return create_trainer(
                CONFIG,
                T.build_model(CONFIG),
                OPT,
                100,
                parallel.ParallelConfig(),
                devices=jax.devices()[:1],
            )
        return create_trainer(
            CONFIG, T.build_model(CONFIG), OPT, 100, parallel.ParallelConfig(mesh=layout)
        )

    train_config = TrainConfig(
        steps=2, log_every=1, eval_every=0, checkpoint_every=2, progress=False
    )
    saved = train_loop(trainer_for(saved_on), train_config, tmp_path, synthetic_batches())
    target = trainer_for(restored_on)
    checkpointer = Checkpointer(tmp_path)
    step, restored = checkpointer.restore(target.abstract_state)
    checkpointer.close()
    assert step == 2
    path = ("decoder", "layers", "block_0", "mlp", "wi_gate", "kernel")  # [layers, embed, mlp]
    kernel, wanted = restored.params, target.abstract_state.params
    for key in path:
        kernel, wanted = kernel[key], wanted[key]
    assert kernel.sharding == wanted.sharding
    if restored_on == (2, 2, 2):
        assert tuple(kernel.sharding.spec) == (None, "fsdp", "tensor")
    elif restored_on == (2, 4, 1):
        assert tuple(kernel.sharding.spec)[1] == "fsdp"
        assert kernel.addressable_shards[0].data.shape[1] == kernel.shape[1] // 4
    elif restored_on == (1, 8, 1):
        assert tuple(kernel.sharding.spec)[1] == "fsdp" and len(kernel.sharding.device_set) == 8
        assert kernel.addressable_shards[0].data.shape[1] == kernel.shape[1] // 8
    else:
        assert kernel.sharding.device_set == {jax.devices()[0]}
    jax.tree.map(
        np.testing.assert_array_equal, jax.device_get(restored.params), jax.device_get(saved.params)
    )
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(restored.opt_state),
        jax.device_get(saved.opt_state),
    )


@pytest.mark.slow
def test_unreadable_latest_checkpoint_falls_back_and_training_continues(tmp_path, caplog):
    _loop(tmp_path, steps=4, checkpoint_every=2)
    for f in (tmp_path / "checkpoints" / "4" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    state, _ = _loop(tmp_path, steps=4, checkpoint_every=2)
    assert int(state.step) == 4
    assert "unreadable" in caplog.text
    assert list((tmp_path / "unreadable_checkpoints").iterdir())
    assert Checkpointer(tmp_path).all_steps() == [2, 4]


@pytest.mark.parametrize(
    "saved_scan, restored_scan",
    [
        pytest.param(True, False, marks=pytest.mark.slow),
        pytest.param(False, True, marks=pytest.mark.slow),
    ],
)
def test_checkpoint_converts_between_unrolled_and_scanned_layers(
    tmp_path, saved_scan, restored_scan
):
    """A run saved with unrolled layers (every run before scanned layers existed) resumes in a
    scanned model, and back: the state converts exactly on load, and the resumed run's losses
    are the unbroken run's."""

    def trainer_for(scan):
        config = dataclasses.replace(CONFIG, scan_layers=scan)
        return create_trainer(
            config, T.build_model(config), OPT, 100, parallel.ParallelConfig(mesh=(2, 2, 2))
        )

    def losses(workdir):
        lines = (workdir / "metrics.jsonl").read_text().splitlines()
        return {m["step"]: m["loss"] for m in map(json.loads, lines) if "loss" in m}

    first = TrainConfig(steps=2, log_every=1, eval_every=0, checkpoint_every=2, progress=False)
    saved = train_loop(trainer_for(saved_scan), first, tmp_path / "run", synthetic_batches())
    target = trainer_for(restored_scan)
    checkpointer = Checkpointer(tmp_path / "run")
    _, restored = checkpointer.restore(target.abstract_state)
    checkpointer.close()
    assert T.scanned_period(restored.params) == (1 if restored_scan else 0)
    jax.tree.map(
        np.testing.assert_array_equal,
        jax.device_get(T.unstack_layers(restored)),
        jax.device_get(T.unstack_layers(saved)),
    )
    assert (
        restored.params["decoder"]["final_norm"]["scale"].sharding
        == target.abstract_state.params["decoder"]["final_norm"]["scale"].sharding
    )

    train_loop(target, dataclasses.replace(first, steps=4), tmp_path / "run", synthetic_batches())
    train_loop(
        trainer_for(saved_scan),
        dataclasses.replace(first, steps=4),
        tmp_path / "unbroken",
        synthetic_batches(),
    )
    resumed, unbroken = losses(tmp_path / "run"), losses(tmp_path / "unbroken")
    assert sorted(resumed) == sorted(unbroken) == [1, 2, 3, 4]
    # The scanned and unrolled programs round differently (measured: 5.8e-7 relative at most).
    np.testing.assert_allclose(
        [resumed[s] for s in range(1, 5)], [unbroken[s] for s in range(1, 5)], rtol=1e-5
    )


def test_a_metrics_line_torn_by_a_kill_is_dropped_and_the_file_stays_one_json_per_line(tmp_path):
    from lm.train import MetricWriter

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.5}\n{"step": 2, "lo')  # SIGKILL mid-write
    writer = MetricWriter(tmp_path)
    writer.write(2, {"loss": 2.25})
    writer.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "loss": 2.5},
        {"step": 2, "loss": 2.25},
    ]
    whole = path.read_text()
    MetricWriter(tmp_path).close()  # a whole file is left as it is
    assert path.read_text() == whole


def test_auxiliary_losses_join_the_objective_and_are_reported(tmp_path):
    """A model that sows into the "losses" collection (twice under one name, as layers do)
    adds their sum to the objective: the step's gradient is that of cross-entropy plus the
    penalty, and the loop logs the penalty as aux/penalty."""
    import flax.linen as nn
    import jax.numpy as jnp
    import optax
    from lm import train

    class PenalisedLM(nn.Module):
        config: T.ModelConfig

        @nn.compact
        def __call__(self, tokens, deterministic=True, **_):
            h = nn.Embed(self.config.vocab_size, 8)(tokens)
            w = self.param("w", nn.initializers.normal(1.0), (8, 8))
            for _ in range(2):
                self.sow("losses", "penalty", 0.25 * jnp.sum(w**2))
            return nn.Dense(self.config.vocab_size)(h @ w)

    model = PenalisedLM(CONFIG)
    trainer = create_trainer(
        CONFIG,
        model,
        OptimizerConfig(learning_rate=1e-2, warmup_steps=0, weight_decay=0.0),
        100,
        parallel.ParallelConfig(),
        devices=jax.devices()[:1],
    )
    state = trainer.init_fn(0)
    batch = next(synthetic_batches())
    params = jax.device_get(state.params)
    penalty = 0.5 * float(np.sum(np.asarray(params["w"], np.float64) ** 2))

    def objective(p):  # what the step should minimise: mean cross-entropy + the penalty
        logits = model.apply({"params": p}, batch["inputs"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        weights = batch["weights"]
        return (ce * weights).sum() / weights.sum() + 0.5 * jnp.sum(p["w"] ** 2)

    expected = jax.grad(objective)(params)
    grads, sums = train._accumulated_grads(model, state.params, batch, None, 1)
    weight = float(sums["weight"])
    for (path, g), e in zip(
        jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(expected), strict=True
    ):
        # Measured: up to 1.2e-7 apart (float32 sums in another order).
        np.testing.assert_allclose(np.asarray(g) / weight, e, atol=1e-6, err_msg=str(path))
    _, metrics = trainer.train_step(state, trainer.put_batch(batch))
    assert float(metrics["aux/penalty"]) == pytest.approx(penalty, rel=1e-5)

    train_loop(
        trainer,
        TrainConfig(steps=2, log_every=1, eval_every=0, progress=False),
        tmp_path,
        synthetic_batches(),
    )
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in logged] == [1, 2]
    assert logged[0]["aux/penalty"] == pytest.approx(penalty, rel=1e-5)


def test_cross_entropy_equals_optax_and_accuracy_equals_argmax():
    """The loss's cross-entropy and gradient are optax's; 'correct' is argmax == target
    (without ties, which random logits do not have)."""
    import jax.numpy as jnp
    import optax
    from lm.train import cross_entropy

    logits = 3 * jax.random.normal(jax.random.key(0), (4, 6, 50))
    targets = jax.random.randint(jax.random.key(1), (4, 6), 0, 50)
    targets = targets.at[0, :3].set(jnp.argmax(logits[0, :3], -1))  # some correct ones
    ce, correct = cross_entropy(logits, targets)
    want = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    np.testing.assert_allclose(ce, want, rtol=1e-6)
    np.testing.assert_array_equal(correct, (jnp.argmax(logits, -1) == targets).astype(np.float32))
    assert correct[0, :3].all()
    grad = jax.grad(lambda x: cross_entropy(x, targets)[0].sum())(logits)
    want_grad = jax.grad(
        lambda x: optax.softmax_cross_entropy_with_integer_labels(x, targets).sum()
    )(logits)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-7)
