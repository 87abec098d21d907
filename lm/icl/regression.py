"""In-context regression (Garg et al. 2022, "What can Transformers learn in-context? A case
study of simple function classes").

A decoder-only Transformer reads a prompt x_1, f(x_1), ..., x_{k}, f(x_k), x_{k+1} and is
trained (squared error) to output f(x_{k+1}) at every x position, for f drawn afresh from a
function class (lm.icl.functions) with every prompt. After training it is compared, at every
number k of in-context examples, with least squares, 3-nearest-neighbours and averaging
(lm.icl.baselines) on the squared error divided by d.

Entry points:
    experiment(icl=..., model=..., optimizer=...)  a ConfigDict with every default filled
    run(config, workdir)                            train (or resume), evaluate, plot

Outputs in the workdir: config.json, metrics.jsonl (+ TensorBoard), checkpoints/,
errors.json (normalised error per k for the model and each baseline), error_vs_k.png.
Rerunning a finished run only re-evaluates.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from lm import storage
from lm.checkpoint import (
    Checkpointer,
    CheckpointMismatchError,
    check_compatible,
    read_config,
    write_config,
)
from lm.config import filled_sections
from lm.icl import baselines, functions
from lm.models import layers
from lm.models.attention import causal_mask
from lm.models.transformer import ModelConfig, Stack, config_from_dict
from lm.train import (
    MetricWriter,
    OptimizerConfig,
    TrainState,
    learning_rate_schedule,
    make_optimizer,
)

# ------------------------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True)
class RegressionConfig:
    """The `icl` section of a regression experiment. Defaults: Garg et al.'s main run.

    Curriculum (Garg et al. Sec. 3): the effective dimension starts at dims_start and grows
    by dims_increment every dims_interval steps up to n_dims (inputs have their trailing
    coordinates zeroed); the prompt length likewise goes from points_start to n_points.
    A start of 0 (or one at or above the end) means no curriculum. Shorter prompts are
    trained as the first points of a full-length prompt (the model is causal, so this is the
    same loss, without recompiling for each length).
    """

    kind: str = "regression"
    function: str = "linear_regression"  # one of lm.icl.functions.KINDS
    n_dims: int = 20
    n_points: int = 41
    batch_size: int = 64
    steps: int = 500_000
    seed: int = 0
    dims_start: int = 5
    dims_increment: int = 1
    dims_interval: int = 2000
    points_start: int = 11
    points_increment: int = 2
    points_interval: int = 2000
    # Function-class sizes.
    sparsity: int = 3  # sparse_linear_regression: nonzero coordinates of w
    tree_depth: int = 4  # decision_tree
    relu_hidden: int = 100  # relu_2nn_regression
    # Baselines.
    knn_k: int = 3
    lasso_alpha: float = 0.01
    # Logging, evaluation, checkpoints.
    log_every: int = 100
    eval_every: int = 0  # > 0: log the model's error at full d and n_points this often
    eval_batches: int = 16  # final evaluation: eval_batches x batch_size fresh prompts
    checkpoint_every: int = 5000  # 0 = only at the end
    keep_checkpoints: int = 2
    progress: bool = True

    def __post_init__(self):
        if self.kind != "regression":
            raise ValueError(f"icl.kind={self.kind!r}: this module runs 'regression'")
        if self.function not in functions.KINDS:
            raise ValueError(f"icl.function={self.function!r} is not one of {functions.KINDS}")
        for key in (
            "n_dims",
            "n_points",
            "batch_size",
            "dims_interval",
            "points_interval",
            "eval_batches",
            "keep_checkpoints",
            "knn_k",
            "log_every",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"icl.{key} must be >= 1, got {getattr(self, key)}")
        for key in (
            "steps",
            "dims_increment",
            "points_increment",
            "eval_every",
            "checkpoint_every",
        ):
            if getattr(self, key) < 0:
                raise ValueError(f"icl.{key} must be >= 0, got {getattr(self, key)}")
        for key in ("dims_start", "points_start"):
            if getattr(self, key) < 0:
                raise ValueError(f"icl.{key} must be >= 0, got {getattr(self, key)}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RegressionConfig:
        """Builds the config; an unknown key is an error that names it and lists the valid ones."""
        return config_from_dict(cls, dict(values), prefix="icl")

    def curriculum(self, step: int) -> tuple[int, int]:
        """(effective dimension, prompt length) at training step `step`."""
        return (
            _schedule(self.dims_start, self.n_dims, self.dims_increment, self.dims_interval, step),
            _schedule(
                self.points_start, self.n_points, self.points_increment, self.points_interval, step
            ),
        )

    @property
    def function_kwargs(self) -> dict[str, int]:
        return dict(sparsity=self.sparsity, depth=self.tree_depth, hidden=self.relu_hidden)


def _schedule(start: int, end: int, increment: int, interval: int, step: int) -> int:
    if start == 0 or start >= end:
        return end
    return min(end, start + increment * (step // interval))


# Regression defaults that differ from ModelConfig's / OptimizerConfig's: Garg et al.'s
# GPT-2 (12 layers, 256 wide, 8 heads, no dropout) and Adam at a constant 1e-4.
MODEL_DEFAULTS = dict(
    vocab_size=1,  # unused: inputs are vectors, read in by a Dense layer
    d_model=256,
    num_layers=12,
    num_heads=8,
    mlp_dim=1024,
    mlp_activation="gelu_tanh",
    position="learned",
    dropout=0.0,
    attention_dropout=0.0,
)
OPTIMIZER_DEFAULTS = dict(
    name="adamw",
    learning_rate=1e-4,
    warmup_steps=0,
    end_learning_rate_fraction=1.0,
    weight_decay=0.0,
    b1=0.9,
    b2=0.999,
    clip_norm=0.0,
)
SECTIONS = {"icl": RegressionConfig, "model": ModelConfig, "optimizer": OptimizerConfig}


def experiment(
    *,
    icl: dict[str, Any] | None = None,
    model: dict[str, Any] | None = None,
    optimizer: dict[str, Any] | None = None,
) -> ml_collections.ConfigDict:
    """A complete regression config: sections icl, model, optimizer with every field filled.

    Each argument holds only the overrides; a misspelt key is an error that names it.
    model.max_len defaults to 2 * icl.n_points (the interleaved prompt length).
    """
    config = filled_sections(
        {
            "icl": (RegressionConfig, {}, icl),
            "model": (ModelConfig, MODEL_DEFAULTS, model),
            "optimizer": (OptimizerConfig, OPTIMIZER_DEFAULTS, optimizer),
        }
    )
    if "max_len" not in (model or {}):
        config.model.max_len = 2 * config.icl.n_points
    return config


def build_configs(config) -> tuple[RegressionConfig, ModelConfig, OptimizerConfig]:
    """ConfigDict (or dict) -> the three frozen configs, checking sections, keys and types."""
    values = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    unknown = sorted(set(values) - set(SECTIONS))
    if unknown:
        raise ValueError(
            f"unknown config section(s) {unknown} for a regression run; use {sorted(SECTIONS)}"
        )
    icl = RegressionConfig.from_dict(values.get("icl", {}))
    model_values = dict(values.get("model", {}))
    if not model_values.get("vocab_size"):
        model_values["vocab_size"] = 1
    model = ModelConfig.from_dict(model_values)
    if model.architecture != "decoder":
        raise ValueError("model.architecture must be 'decoder' for in-context regression")
    if model.position == "learned" and model.max_len < 2 * icl.n_points:
        raise ValueError(
            f"model.max_len={model.max_len} is shorter than the prompt "
            f"(2 * icl.n_points = {2 * icl.n_points})"
        )
    optimizer = OptimizerConfig.from_dict(values.get("optimizer", {}))
    return icl, model, optimizer


# ------------------------------------------------------------------------------- model


def interleave(xs: jax.Array, ys: jax.Array) -> jax.Array:
    """xs [batch, n, d], ys [batch, n] -> [batch, 2n, d]: x_1, (y_1, 0..0), x_2, (y_2, 0..0), ..."""
    y_vectors = jnp.zeros_like(xs).at[..., 0].set(ys.astype(xs.dtype))
    batch, n, d = xs.shape
    return jnp.stack([xs, y_vectors], axis=2).reshape(batch, 2 * n, d)


class InContextRegressor(nn.Module):
    """Garg et al.'s model: read-in Dense, causal Transformer stack, read-out Dense at the x's.

    (xs [batch, n, d], ys [batch, n]) -> predictions [batch, n] float32; prediction i depends
    only on x_1, y_1, ..., x_{i-1}, y_{i-1}, x_i.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, xs, ys, *, deterministic: bool = True):
        c = self.config
        batch, n, _ = xs.shape
        tokens = interleave(xs.astype(c.compute_dtype), ys)
        h = nn.Dense(
            c.d_model,
            dtype=c.compute_dtype,
            param_dtype=c.weight_dtype,
            kernel_init=layers.param_init(nn.initializers.lecun_normal(), (None, "embed")),
            bias_init=layers.param_init(nn.initializers.zeros_init(), ("embed",)),
            name="read_in",
        )(tokens)
        positions = jnp.broadcast_to(jnp.arange(2 * n, dtype=jnp.int32), (batch, 2 * n))
        h = Stack(c, c.num_layers, causal=True, name="backbone")(
            h, causal_mask(2 * n), positions=positions, deterministic=deterministic
        )
        out = nn.Dense(
            1,
            dtype=c.compute_dtype,
            param_dtype=c.weight_dtype,
            kernel_init=layers.param_init(nn.initializers.lecun_normal(), ("embed", None)),
            bias_init=layers.param_init(nn.initializers.zeros_init(), (None,)),
            name="read_out",
        )(h)
        return out[:, ::2, 0].astype(jnp.float32)


def init_params(model: InContextRegressor, key: jax.Array, n_points: int, d: int):
    """Unboxed parameters for prompts of n_points pairs in dimension d."""
    xs = jnp.zeros((1, n_points, d), jnp.float32)
    ys = jnp.zeros((1, n_points), jnp.float32)
    return nn.meta.unbox(model.init(key, xs, ys)["params"])


def masked_squared_error(preds: jax.Array, ys: jax.Array, n_effective) -> jax.Array:
    """Mean of (pred - y)^2 over the batch and the first n_effective positions (a scalar)."""
    mask = (jnp.arange(ys.shape[1]) < n_effective).astype(jnp.float32)
    return jnp.sum((preds - ys) ** 2 * mask) / (ys.shape[0] * jnp.sum(mask))


def make_train_step(
    model: InContextRegressor, optimizer: optax.GradientTransformation, icl: RegressionConfig
):
    """jitted (state, d_effective, n_effective) -> (state, metrics). The batch is sampled inside
    the step from fold_in(state.rng, state.step), so a resumed run sees the same prompts."""

    def loss_fn(params, xs, ys, n_effective):
        preds = model.apply({"params": params}, xs, ys, deterministic=True)
        return masked_squared_error(preds, ys, n_effective)

    @jax.jit
    def train_step(state: TrainState, d_effective, n_effective):
        key = jax.random.fold_in(state.rng, state.step)
        xs, ys = functions.sample_batch(
            icl.function,
            key,
            icl.batch_size,
            icl.n_points,
            icl.n_dims,
            d_effective,
            **icl.function_kwargs,
        )
        loss, grads = jax.value_and_grad(loss_fn)(state.params, xs, ys, n_effective)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, {"loss": loss, "grad_norm": optax.global_norm(grads)}

    return train_step


def eval_batches(icl: RegressionConfig, key: jax.Array) -> list[tuple[np.ndarray, np.ndarray]]:
    """The fixed evaluation prompts at full dimension and length: eval_batches x batch_size."""
    sample = jax.jit(
        lambda k: functions.sample_batch(
            icl.function,
            k,
            icl.batch_size,
            icl.n_points,
            icl.n_dims,
            icl.n_dims,
            **icl.function_kwargs,
        )
    )
    return [jax.device_get(sample(jax.random.fold_in(key, i))) for i in range(icl.eval_batches)]


def model_predictions(model, params, batches) -> np.ndarray:
    predict = jax.jit(lambda p, xs, ys: model.apply({"params": p}, xs, ys))
    return np.concatenate([np.asarray(predict(params, xs, ys)) for xs, ys in batches])


def evaluate(model, params, icl: RegressionConfig, batches) -> dict[str, list[float]]:
    """Normalised squared error per k (0 .. n_points-1) of the model and every baseline."""
    xs = np.concatenate([b[0] for b in batches])
    ys = np.concatenate([b[1] for b in batches])
    scale = functions.target_scale(icl.function, icl.n_dims, icl.sparsity)
    preds = model_predictions(model, params, batches)
    errors = {"model": baselines.normalized_squared_error(preds, ys, scale)}
    others = baselines.baselines_for(icl.function, knn_k=icl.knn_k, lasso_alpha=icl.lasso_alpha)
    for name, baseline in others.items():
        errors[name] = baselines.normalized_squared_error(baseline(xs, ys), ys, scale)
    errors["zero"] = baselines.normalized_squared_error(baselines.zero(xs, ys), ys, scale)
    return {name: [float(v) for v in values] for name, values in errors.items()}


# ----------------------------------------------------------------------------- outputs


def format_table(errors: dict[str, list[float]]) -> str:
    """A text table: one row per k, one column per predictor."""
    names = list(errors)
    widths = [max(len(n), 9) for n in names]
    lines = ["  k  " + "  ".join(n.rjust(w) for n, w in zip(names, widths, strict=True))]
    for k in range(len(errors[names[0]])):
        cells = [f"{errors[n][k]:.4f}".rjust(w) for n, w in zip(names, widths, strict=True)]
        lines.append(f"{k:3d}  " + "  ".join(cells))
    return "\n".join(lines)


def plot_saved_errors(workdir: str | pathlib.Path, path: str | pathlib.Path) -> dict[str, Any]:
    """Plots a finished run's WORKDIR/errors.json (see `plot_errors`) to `path`; returns the
    errors.json contents."""
    source = storage.as_path(workdir) / "errors.json"
    if not source.exists():
        raise FileNotFoundError(
            f"{source} does not exist: run a regression experiment there first "
            "(python -m lm.main --config experiments/garg_linear_regression.py:small "
            f"--workdir {workdir})"
        )
    saved = json.loads(source.read_text())
    icl = RegressionConfig(
        function=saved["function"], n_dims=saved["n_dims"], n_points=saved["n_points"]
    )
    plot_errors(saved["errors"], icl, storage.as_path(path), saved["step"])
    return saved


def plot_errors(
    errors: dict[str, list[float]], icl: RegressionConfig, path: pathlib.Path, step: int
) -> None:
    """Error vs. number of in-context examples, model and baselines, dashed line at k = d."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    ks = np.arange(len(errors["model"]))
    for name, values in errors.items():
        if name == "zero":
            continue
        style = dict(linewidth=2.5, color="black") if name == "model" else dict(linewidth=1.5)
        ax.plot(ks, values, marker="o", markersize=3, label=name.replace("_", " "), **style)
    ax.axvline(icl.n_dims, linestyle="--", color="gray", label=f"k = d = {icl.n_dims}")
    ax.axhline(1.0, linestyle=":", color="gray", linewidth=1, label="zero predictor")
    ax.set_xlabel("in-context examples k")
    ax.set_ylabel(
        "squared error / d"
        if icl.function in ("linear_regression", "relu_2nn_regression")
        else "normalised squared error"
    )
    ax.set_ylim(-0.05, 1.5)
    ax.set_title(f"{icl.function.replace('_', ' ')}, d = {icl.n_dims}, after {step} steps")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    storage.save_figure(fig, path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------- run


def _check_workdir(workdir: pathlib.Path, resolved: dict[str, Any]) -> None:
    saved = read_config(workdir)
    check_compatible(saved, resolved, sections=("model",))
    if saved is None:
        return
    for key in ("function", "n_dims"):
        old, new = saved.get("icl", {}).get(key), resolved["icl"][key]
        if old != new:
            raise CheckpointMismatchError(
                f"this workdir holds a run with icl.{key}={old!r}, not {new!r}; use a new --workdir"
            )


def run(config, workdir) -> dict[str, Any]:
    """Trains (resuming from the workdir's latest checkpoint), evaluates and plots.

    config: ConfigDict with sections icl, model, optimizer (see `experiment`).
    Returns {"step", "errors": {predictor: [error at k]}, "train_seconds", "num_params"}.
    """
    workdir = storage.as_path(workdir)
    icl, model_config, opt_config = build_configs(config)
    resolved = {
        "icl": dataclasses.asdict(icl),
        "model": dataclasses.asdict(model_config),
        "optimizer": dataclasses.asdict(opt_config),
    }
    workdir.mkdir(parents=True, exist_ok=True)
    _check_workdir(workdir, resolved)
    write_config(workdir, resolved)

    model = InContextRegressor(model_config)
    schedule = learning_rate_schedule(opt_config, icl.steps)
    optimizer = make_optimizer(opt_config, schedule)
    init_key, train_key, eval_key = jax.random.split(jax.random.PRNGKey(icl.seed), 3)
    params = init_params(model, init_key, icl.n_points, icl.n_dims)
    state = TrainState(
        step=jnp.array(0, jnp.int32), params=params, opt_state=optimizer.init(params), rng=train_key
    )
    num_params = sum(int(x.size) for x in jax.tree.leaves(params))

    checkpointer = Checkpointer(workdir, keep=icl.keep_checkpoints)
    step = 0
    if checkpointer.latest_step() is not None:
        step, state = checkpointer.restore(state)
        logging.info("restored step %d from %s", step, workdir)
    print(
        f"in-context {icl.function}: d={icl.n_dims}, {icl.n_points} points, "
        f"{num_params / 1e6:.2f}M parameters, step {step}/{icl.steps}",
        flush=True,
    )

    batches = eval_batches(icl, eval_key)
    state, train_seconds = _train(
        model, optimizer, schedule, icl, state, step, checkpointer, workdir, batches
    )
    checkpointer.close()

    errors = evaluate(model, state.params, icl, batches)
    final_step = int(state.step)
    result = {
        "function": icl.function,
        "n_dims": icl.n_dims,
        "n_points": icl.n_points,
        "step": final_step,
        "num_params": num_params,
        "eval_prompts": icl.eval_batches * icl.batch_size,
        "normaliser": functions.target_scale(icl.function, icl.n_dims, icl.sparsity),
        "k": list(range(icl.n_points)),
        "errors": errors,
    }
    if (
        train_seconds is None and (workdir / "errors.json").exists()
    ):  # re-evaluation of a finished run
        train_seconds = json.loads((workdir / "errors.json").read_text()).get("train_seconds")
    if train_seconds is not None:
        result["train_seconds"] = train_seconds
    storage.write_atomic(workdir / "errors.json", json.dumps(result, indent=2))
    plot_errors(errors, icl, workdir / "error_vs_k.png", final_step)
    print(format_table(errors), flush=True)
    print(f"wrote {workdir / 'errors.json'} and {workdir / 'error_vs_k.png'}", flush=True)
    return result


def _train(model, optimizer, schedule, icl, state, start, checkpointer, workdir, batches):
    """The training loop from step `start` -> (state, seconds; None if there was nothing to do)."""
    if start >= icl.steps:
        return state, None
    from tqdm.auto import tqdm

    train_step = make_train_step(model, optimizer, icl)
    writer = MetricWriter(workdir)
    ys_eval = np.concatenate([b[1] for b in batches])
    bar = tqdm(
        total=icl.steps, initial=start, disable=not icl.progress, desc="train", dynamic_ncols=True
    )
    began = last_time = time.time()
    last_step = start
    try:
        for step in range(start, icl.steps):
            dims, points = icl.curriculum(step)
            state, metrics = train_step(state, jnp.int32(dims), jnp.int32(points))
            done = step + 1
            bar.update(1)
            values = {}
            if done % icl.log_every == 0 or done == icl.steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not math.isfinite(values["loss"]):
                    raise FloatingPointError(
                        f"the training loss is {values['loss']} at step {done}"
                    )
                now = time.time()
                values.update(
                    # The loss divided by E[y^2] at the current dimension: 1 = the zero predictor.
                    normalised_loss=values["loss"]
                    / functions.target_scale(icl.function, dims, icl.sparsity),
                    lr=float(schedule(step)),
                    curriculum_dims=dims,
                    curriculum_points=points,
                    steps_per_second=(done - last_step) / max(now - last_time, 1e-9),
                )
                last_time, last_step = now, done
                bar.set_postfix(loss=f"{values['loss']:.3f}", dims=dims, points=points)
            if icl.eval_every and (done % icl.eval_every == 0 or done == icl.steps):
                scale = functions.target_scale(icl.function, icl.n_dims, icl.sparsity)
                preds = model_predictions(model, state.params, batches)
                err = baselines.normalized_squared_error(preds, ys_eval, scale)
                values.update(eval_error_mean=float(err.mean()), eval_error_last=float(err[-1]))
            if values:
                writer.write(done, values)
            if icl.checkpoint_every and done % icl.checkpoint_every == 0 and done < icl.steps:
                checkpointer.save(done, state)
        checkpointer.save(icl.steps, state, force=True)
    finally:
        bar.close()
        writer.close()
    return state, time.time() - began
