"""In-context regression (Garg et al. 2022): samplers, baselines, model causality, training."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm.icl import baselines, functions, regression
from lm.train import create_trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _experiment_module():
    spec = importlib.util.spec_from_file_location(
        "garg", ROOT / "experiments" / "garg_linear_regression.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------ samplers


@pytest.mark.parametrize("kind", functions.KINDS)
def test_sample_batch_shapes_and_seeds(kind):
    key = jax.random.PRNGKey(0)
    xs, ys = functions.sample_batch(kind, key, 4, 9, 6, 6)
    assert xs.shape == (4, 9, 6) and ys.shape == (4, 9)
    assert xs.dtype == jnp.float32 and ys.dtype == jnp.float32
    xs2, ys2 = functions.sample_batch(kind, key, 4, 9, 6, 6)
    np.testing.assert_array_equal(xs, xs2)
    np.testing.assert_array_equal(ys, ys2)
    xs3, ys3 = functions.sample_batch(kind, jax.random.PRNGKey(1), 4, 9, 6, 6)
    assert not np.allclose(xs, xs3) and not np.allclose(ys, ys3)


def test_unknown_function_class():
    with pytest.raises(ValueError, match="unknown function class 'cubic'"):
        functions.sample_batch("cubic", jax.random.PRNGKey(0), 1, 2, 3)


def test_x_distribution_is_standard_normal():
    xs = np.asarray(functions.sample_xs(jax.random.PRNGKey(3), 256, 64, 4))
    assert abs(xs.mean()) < 0.02
    assert abs(xs.var() - 1.0) < 0.03
    cov = np.cov(xs.reshape(-1, 4).T)
    np.testing.assert_allclose(cov, np.eye(4), atol=0.03)


@pytest.mark.parametrize("kind", functions.KINDS)
def test_curriculum_zeroes_trailing_coordinates(kind):
    # d_effective traced under jit: the curriculum changes it without recompiling.
    sample = jax.jit(lambda key, d_eff: functions.sample_batch(kind, key, 8, 5, 6, d_eff))
    xs, ys = sample(jax.random.PRNGKey(0), 3)
    assert np.all(np.asarray(xs)[..., 3:] == 0)
    assert np.all(np.asarray(xs)[..., :3] != 0)
    assert np.all(np.isfinite(np.asarray(ys)))


def test_linear_targets_use_only_effective_coordinates():
    w = np.asarray(functions.sample_linear_weights(jax.random.PRNGKey(0), 16, 6, 2))
    assert np.all(w[:, 2:] == 0) and np.all(w[:, :2] != 0)


@pytest.mark.slow
def test_sparse_weights_have_exactly_s_nonzeros():
    w = np.asarray(functions.sample_sparse_weights(jax.random.PRNGKey(0), 500, 10, 10, sparsity=3))
    assert np.all((w != 0).sum(axis=1) == 3)
    # The support is uniform over the coordinates.
    frequency = (w != 0).mean(axis=0)
    np.testing.assert_allclose(frequency, 0.3, atol=0.07)
    # Under the curriculum the support lies among the effective coordinates.
    w = np.asarray(functions.sample_sparse_weights(jax.random.PRNGKey(1), 200, 10, 5, sparsity=3))
    assert np.all((w != 0).sum(axis=1) == 3) and np.all(w[:, 5:] == 0)
    w = np.asarray(functions.sample_sparse_weights(jax.random.PRNGKey(2), 50, 10, 2, sparsity=3))
    assert np.all((w != 0).sum(axis=1) == 2) and np.all(w[:, 2:] == 0)


def test_decision_tree_by_hand_and_scale():
    # Depth 2: root tests x_1; left child (x_1 <= 0) tests x_0, right child tests x_2.
    coords = jnp.array([[1, 0, 2]])
    leaves = jnp.array([[10.0, 11.0, 12.0, 13.0]])
    xs = jnp.array([[[1.0, -1.0, 0.0], [-1.0, -1.0, 5.0], [0.0, 2.0, 1.0], [0.0, 2.0, -1.0]]])
    np.testing.assert_array_equal(
        functions.tree_targets(xs, coords, leaves), [[11.0, 10.0, 13.0, 12.0]]
    )
    xs, ys = functions.sample_batch("decision_tree", jax.random.PRNGKey(0), 512, 32, 8, depth=4)
    ys = np.asarray(ys)
    assert 0.8 < ys.var() < 1.2  # leaves N(0, 1)
    assert len(np.unique(ys[0])) <= 16  # one of 2^depth leaves


def test_relu_net_scale_matches_linear_regression():
    d = 8
    _, ys = functions.sample_batch("relu_2nn_regression", jax.random.PRNGKey(0), 512, 32, d)
    scale = float(np.mean(np.asarray(ys) ** 2)) / functions.target_scale("relu_2nn_regression", d)
    assert 0.8 < scale < 1.2
    _, ys = functions.sample_batch("linear_regression", jax.random.PRNGKey(0), 512, 32, d)
    assert 0.8 < float(np.mean(np.asarray(ys) ** 2)) / d < 1.2


# ----------------------------------------------------------------------------- baselines


def test_least_squares_exact_from_d_examples():
    d = 5
    xs, ys = functions.sample_batch("linear_regression", jax.random.PRNGKey(0), 32, 12, d)
    preds = baselines.least_squares(xs, ys)
    errors = baselines.normalized_squared_error(preds, ys, d)
    assert np.all(errors[d:] < 1e-8)
    assert np.all(errors[:d] > 1e-3)
    np.testing.assert_array_equal(preds[:, 0], 0.0)


def test_nearest_neighbours_by_hand():
    xs = np.array([[[0.0], [1.0], [2.0], [10.0], [1.1]]])
    ys = np.array([[0.0, 10.0, 20.0, 100.0, -1.0]])
    preds = baselines.nearest_neighbours(xs, ys, k=3)
    # i=1: only x_0; i=2: both earlier points; i=4: x=1.1 is nearest to 1, 2, 0 (not 10).
    np.testing.assert_allclose(preds[0], [0.0, 0.0, 5.0, 10.0, 10.0])


def test_averaging_by_hand():
    xs = np.array([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])
    ys = np.array([[3.0, 4.0, 0.0]])
    preds = baselines.averaging(xs, ys)
    # i=1: w = 3 * (1, 0) -> x_1 . w = 0; i=2: w = ((3, 0) + (0, 8)) / 2 = (1.5, 4) -> 5.5.
    np.testing.assert_allclose(preds[0], [0.0, 0.0, 5.5])


def test_lasso_recovers_sparse_weights():
    xs, ys = functions.sample_batch(
        "sparse_linear_regression", jax.random.PRNGKey(0), 2, 12, 8, sparsity=2
    )
    errors = baselines.normalized_squared_error(baselines.lasso(xs, ys, alpha=0.001), ys, 2)
    assert errors[0] > 0.1 and errors[-1] < 0.01


def test_normalized_squared_error_by_hand():
    pred = np.array([[1.0, 2.0], [3.0, 0.0]])
    ys = np.array([[0.0, 2.0], [1.0, 4.0]])
    # position 0: (1 + 4) / 2 = 2.5 -> / d=5 = 0.5; position 1: (0 + 16) / 2 = 8 -> 1.6.
    np.testing.assert_allclose(baselines.normalized_squared_error(pred, ys, 5), [0.5, 1.6])


# ---------------------------------------------------------------------------------- model


def _tiny_model(n_points=6, d=3):
    config = regression.experiment(
        icl=dict(n_dims=d, n_points=n_points),
        model=dict(d_model=32, num_layers=2, num_heads=2, mlp_dim=64),
    )
    model = regression.InContextRegressor(regression.build_configs(config).model)
    return model, regression.init_params(model, jax.random.PRNGKey(0), n_points, d)


def test_interleave():
    xs = jnp.arange(12.0).reshape(1, 3, 4)
    ys = jnp.array([[-1.0, -2.0, -3.0]])
    z = np.asarray(regression.interleave(xs, ys))
    np.testing.assert_array_equal(z[0, 0], [0, 1, 2, 3])
    np.testing.assert_array_equal(z[0, 1], [-1, 0, 0, 0])
    np.testing.assert_array_equal(z[0, 5], [-3, 0, 0, 0])


def test_model_is_causal_and_does_not_see_its_target():
    n, d = 6, 3
    model, params = _tiny_model(n, d)
    apply = jax.jit(lambda xs, ys: model.apply({"params": params}, xs, ys))
    xs, ys = functions.sample_batch("linear_regression", jax.random.PRNGKey(1), 2, n, d)
    base = np.asarray(apply(xs, ys))
    assert base.shape == (2, n)
    for i in range(n):
        # Change y_j for j >= i and x_j for j > i: predictions 0..i must not move.
        xs2 = xs.at[:, i + 1 :].add(3.0)
        ys2 = ys.at[:, i:].add(5.0)
        out = np.asarray(apply(xs2, ys2))
        np.testing.assert_allclose(out[:, : i + 1], base[:, : i + 1], atol=1e-5)
        if i + 1 < n:
            assert not np.allclose(out[:, i + 1 :], base[:, i + 1 :])
    # The query x_i itself does matter.
    out = np.asarray(apply(xs.at[:, 2].add(1.0), ys))
    np.testing.assert_allclose(out[:, :2], base[:, :2], atol=1e-5)
    assert not np.allclose(out[:, 2], base[:, 2])


def test_masked_squared_error():
    preds = jnp.array([[1.0, 2.0, 9.0]])
    ys = jnp.array([[0.0, 0.0, 0.0]])
    assert float(regression.masked_squared_error(preds, ys, 2)) == pytest.approx(2.5)


@pytest.mark.slow
def test_training_lowers_the_loss():
    """The regression objective through lm.train's step: the squared error on fixed prompts
    falls, and the curriculum's weights keep only the first points of each prompt."""
    config = regression.experiment(
        icl=dict(n_dims=2, n_points=6, batch_size=64, dims_start=0, points_start=0),
        train=dict(steps=150),
        model=dict(d_model=32, num_layers=2, num_heads=2, mlp_dim=64),
        optimizer=dict(learning_rate=3e-3, warmup_steps=10),
    )
    configs = regression.build_configs(config)
    model = regression.InContextRegressor(configs.model)
    trainer = create_trainer(
        configs.model,
        model,
        configs.optimizer,
        configs.train.steps,
        configs.parallel,
        objective=regression.objective(configs.icl),
    )
    state = trainer.init_fn(0)
    xs, ys = functions.sample_batch("linear_regression", jax.random.PRNGKey(2), 256, 6, 2)
    loss = jax.jit(
        lambda p: regression.masked_squared_error(model.apply({"params": p}, xs, ys), ys, 6)
    )
    before = float(loss(state.params))
    batches = regression.training_batches(configs.icl, jax.random.PRNGKey(1))
    for _ in range(configs.train.steps):
        state, metrics = trainer.train_step(state, trainer.put_batch(next(batches)))
    after = float(loss(state.params))
    assert int(state.step) == configs.train.steps
    assert after < 0.7 * before, (before, after)
    # With a curriculum the weights keep the first n_effective points of every prompt.
    icl = regression.RegressionConfig(n_dims=4, n_points=9, points_start=3, points_interval=5)
    first = regression.training_batches(icl, jax.random.PRNGKey(0))
    batch = next(first)
    assert batch["weights"].shape == (icl.batch_size, 9)
    np.testing.assert_array_equal(batch["weights"][0], [1, 1, 1, 0, 0, 0, 0, 0, 0])
    first.set_state({"next": 5})
    np.testing.assert_array_equal(next(first)["weights"][0], [1, 1, 1, 1, 1, 0, 0, 0, 0])


# ------------------------------------------------------------------------- config and run


def test_curriculum_schedule():
    icl = regression.RegressionConfig(n_dims=20, n_points=41)
    assert icl.curriculum(0) == (5, 11)
    assert icl.curriculum(1999) == (5, 11)
    assert icl.curriculum(2000) == (6, 13)
    assert icl.curriculum(10**6) == (20, 41)
    assert regression.RegressionConfig(
        n_dims=4, n_points=9, dims_start=0, points_start=0
    ).curriculum(0) == (4, 9)


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match="icl.n_dimz"):
        regression.RegressionConfig.from_dict({"n_dimz": 3})
    with pytest.raises(ValueError, match="icl.n_dimz"):
        regression.experiment(icl=dict(n_dimz=3))
    config = regression.experiment()
    config.model.d_modl = 3
    with pytest.raises(ValueError, match="model.d_modl"):
        regression.build_configs(config)
    with pytest.raises(ValueError, match="icl.function='cubic'"):
        regression.RegressionConfig(function="cubic")


def test_experiment_configs_build():
    module = _experiment_module()
    for arg in ("", "small", "tiny"):
        configs = regression.build_configs(module.get_config(arg))
        assert configs.model.max_len >= 2 * configs.icl.n_points
    configs = regression.build_configs(module.get_config())
    icl, model = configs.icl, configs.model
    assert (
        icl.n_dims,
        icl.n_points,
        configs.train.steps,
        model.num_layers,
        model.d_model,
        model.num_heads,
    ) == (20, 41, 500_000, 12, 256, 8)
    assert configs.optimizer.learning_rate == 1e-4


@pytest.mark.slow
def test_tiny_run_writes_results_and_reevaluates(tmp_path):
    config = _experiment_module().get_config("tiny")
    result = regression.run(config, tmp_path)
    assert result["step"] == config.train.steps
    saved = json.loads((tmp_path / "errors.json").read_text())
    assert set(saved["errors"]) >= {"model", "least_squares", "3_nearest_neighbours", "averaging"}
    assert len(saved["errors"]["model"]) == config.icl.n_points
    assert (tmp_path / "error_vs_k.png").stat().st_size > 0
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "normalised_loss", "learning_rate"} <= set(lines[0])
    assert {"eval/loss", "eval/error_mean", "eval/error_last"} <= set(lines[-1])
    # A finished run only re-evaluates: same errors, no new training lines.
    again = regression.run(config, tmp_path)
    assert again["errors"] == result["errors"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == len(lines)
