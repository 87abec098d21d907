"""In-context regression (Garg et al. 2022, "What can Transformers learn in-context? A case
study of simple function classes").

A decoder-only Transformer reads a prompt x_1, f(x_1), ..., x_{k}, f(x_k), x_{k+1} and is
trained (squared error) to output f(x_{k+1}) at every x position, for f drawn afresh from a
function class (lm.icl.functions) with every prompt. After training it is compared, at every
number k of in-context examples, with least squares, 3-nearest-neighbours and averaging
(lm.icl.baselines) on the squared error divided by d.

Entry points:
    experiment(icl=..., model=..., train=...)  a ConfigDict with every default filled
    run(config, workdir)                       train (or resume), evaluate, plot

Training goes through lm.train's loop (see lm.icl.runs): the `icl` section holds the task and
the curriculum; steps, seed, logging, evaluation and checkpoints are the `train` section's.
Outputs in the workdir: config.json, metrics.jsonl (+ TensorBoard), checkpoints/,
errors.json (normalised error per k for the model and each baseline), error_vs_k.png.
Rerunning a finished run only re-evaluates.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from lm import storage
from lm.config import with_vocabulary
from lm.icl import baselines, functions, runs
from lm.models import layers
from lm.models.attention import causal_mask
from lm.models.transformer import ModelConfig, Stack, config_from_dict
from lm.train import IndexedBatches, Objective

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
    batch_size: int = 64  # prompts per step (all processes together)
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
    eval_batches: int = 16  # evaluation: eval_batches x batch_size fixed prompts at full d, n

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
            "knn_k",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"icl.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("dims_increment", "points_increment"):
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
# Garg et al.'s schedule: 500k steps; the error per k evaluated at the end only.
TRAIN_DEFAULTS = dict(
    steps=500_000, log_every=100, eval_every=0, checkpoint_every=5000, keep_checkpoints=2
)
DEFAULTS = {"model": MODEL_DEFAULTS, "optimizer": OPTIMIZER_DEFAULTS, "train": TRAIN_DEFAULTS}


def experiment(**sections: dict[str, Any] | None) -> ml_collections.ConfigDict:
    """A complete regression config from overrides per section (icl=, model=, optimizer=,
    train=, parallel=; see `lm.icl.runs.experiment`). model.max_len defaults to
    2 * icl.n_points (the interleaved prompt length)."""
    config = runs.experiment(RegressionConfig, DEFAULTS, **sections)
    if "max_len" not in (sections.get("model") or {}):
        config.model.max_len = 2 * config.icl.n_points
    return config


def build_configs(config) -> runs.IclConfigs:
    """ConfigDict (or dict) -> the frozen configs of every section, checking keys and types."""
    values = runs.section_values(config)
    icl = RegressionConfig.from_dict(values["icl"])
    model = ModelConfig.from_dict(with_vocabulary(values["model"], None))
    if model.architecture != "decoder":
        raise ValueError("model.architecture must be 'decoder' for in-context regression")
    if model.position == "learned" and model.max_len < 2 * icl.n_points:
        raise ValueError(
            f"model.max_len={model.max_len} is shorter than the prompt "
            f"(2 * icl.n_points = {2 * icl.n_points})"
        )
    optimizer, train, par = runs.build_common(values)
    return runs.IclConfigs(icl=icl, model=model, optimizer=optimizer, train=train, parallel=par)


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


def objective(icl: RegressionConfig) -> Objective:
    """The training objective: squared error of the predictions at the x positions that the
    batch's weights keep (the curriculum's first n_effective points), summed; plus the same
    divided by E[y^2] at the batch's effective dimension ("normalised_loss": 1 = the zero
    predictor, comparable across the curriculum)."""

    def sums(model, params, batch, *, deterministic=True, rng=None):
        rngs = {"dropout": rng} if rng is not None else {}
        preds = model.apply(
            {"params": params}, batch["xs"], batch["ys"], deterministic=deterministic, rngs=rngs
        )
        squared = (preds - batch["ys"]) ** 2 * batch["weights"]
        return {
            "loss": squared.sum(),
            "normalised_loss": (squared / batch["scale"][:, None]).sum(),
            "weight": batch["weights"].sum(),
        }

    def init_inputs(_):
        return {
            "xs": jnp.zeros((1, icl.n_points, icl.n_dims), jnp.float32),
            "ys": jnp.zeros((1, icl.n_points), jnp.float32),
        }

    return Objective(sums=sums, init_inputs=init_inputs)


def training_batches(icl: RegressionConfig, key: jax.Array) -> IndexedBatches:
    """Training prompts as a function of their position p in the stream: a fresh function and
    inputs from fold_in(key, p), at the curriculum's dimension for step p (trailing coordinates
    zero) and weights [batch, n_points] keeping its first n_effective points; this process's
    rows. So a resumed run draws exactly the prompts of an unbroken one."""
    sample = jax.jit(
        lambda k, d_effective: functions.sample_batch(
            icl.function,
            k,
            icl.batch_size,
            icl.n_points,
            icl.n_dims,
            d_effective,
            **icl.function_kwargs,
        )
    )
    rows = runs.process_rows(icl.batch_size)

    def batch_at(position: int) -> dict[str, np.ndarray]:
        dims, points = icl.curriculum(position)
        xs, ys = jax.device_get(sample(jax.random.fold_in(key, position), jnp.int32(dims)))
        weights = np.broadcast_to((np.arange(icl.n_points) < points).astype(np.float32), ys.shape)
        scale = np.full(ys.shape[0], functions.target_scale(icl.function, dims, icl.sparsity))
        batch = {"xs": xs, "ys": ys, "weights": weights, "scale": scale.astype(np.float32)}
        return {k: np.ascontiguousarray(v[rows]) for k, v in batch.items()}

    return IndexedBatches(batch_at)


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


def predictor(model):
    """params, batches [(xs [b, n, d], ys [b, n])] -> predictions [sum of b, n] (one jit)."""
    predict = jax.jit(lambda p, xs, ys: model.apply({"params": p}, xs, ys))

    def predictions(params, batches) -> np.ndarray:
        return np.concatenate(
            [np.asarray(jax.device_get(predict(params, xs, ys))) for xs, ys in batches]
        )

    return predictions


def evaluate(
    model, params, icl: RegressionConfig, batches, predictions=None
) -> dict[str, list[float]]:
    """Normalised squared error per k (0 .. n_points-1) of the model and every baseline.
    predictions: a `predictor(model)` to reuse (one is made if None)."""
    xs = np.concatenate([b[0] for b in batches])
    ys = np.concatenate([b[1] for b in batches])
    scale = functions.target_scale(icl.function, icl.n_dims, icl.sparsity)
    preds = (predictions or predictor(model))(params, batches)
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


def build_run(config, workdir: pathlib.Path) -> runs.IclRun:
    """The regression run of `config` in `workdir` (see `lm.icl.runs`): the Garg model, its
    squared-error objective, prompts drawn afresh every step, an evaluator of the error at full
    dimension and length, and an `on_end` that writes errors.json and error_vs_k.png."""
    configs = build_configs(config)
    icl = configs.icl
    runs.check_workdir(workdir, configs.as_dict(), ("function", "n_dims"))
    model = InContextRegressor(configs.model)
    trainer = runs.make_trainer(configs, model, objective(icl))
    # The model's init and dropout keys come from train.seed as in text runs; the prompts'
    # from streams of their own.
    data_key, eval_key = jax.random.split(
        jax.random.fold_in(jax.random.PRNGKey(configs.train.seed), 1)
    )
    batches = eval_batches(icl, eval_key)
    predictions = predictor(model)
    scale = functions.target_scale(icl.function, icl.n_dims, icl.sparsity)
    ys_eval = np.concatenate([b[1] for b in batches])
    print(
        f"in-context {icl.function}: d={icl.n_dims}, {icl.n_points} points, "
        f"{trainer.num_params / 1e6:.2f}M parameters, {configs.train.steps} steps",
        flush=True,
    )

    def evaluate_error(state) -> dict[str, float]:
        preds = predictions(trainer.model_params(state), batches)
        error = baselines.normalized_squared_error(preds, ys_eval, scale)
        return {
            "loss": float(np.mean((preds - ys_eval) ** 2)),
            "error_mean": float(error.mean()),
            "error_last": float(error[-1]),
        }

    def on_end(state) -> dict[str, Any]:
        errors = evaluate(model, trainer.model_params(state), icl, batches, predictions)
        result = {
            "function": icl.function,
            "n_dims": icl.n_dims,
            "n_points": icl.n_points,
            "step": int(state.step),
            "num_params": trainer.num_params,
            "eval_prompts": icl.eval_batches * icl.batch_size,
            "normaliser": scale,
            "k": list(range(icl.n_points)),
            "errors": errors,
        }
        if jax.process_index() == 0:
            storage.write_atomic(workdir / "errors.json", json.dumps(result, indent=2))
            plot_errors(errors, icl, workdir / "error_vs_k.png", result["step"])
            print(format_table(errors), flush=True)
            print(f"wrote {workdir / 'errors.json'} and {workdir / 'error_vs_k.png'}", flush=True)
        return result

    return runs.IclRun(
        configs=configs,
        trainer=trainer,
        batches=training_batches(icl, data_key),
        evaluators={"eval": evaluate_error},
        on_end=on_end,
        seq_len=2 * icl.n_points,
    )


def run(config, workdir) -> dict[str, Any]:
    """Trains (resuming from the workdir's latest checkpoint), evaluates and plots; a finished
    run only re-evaluates. Returns errors.json's contents: {"step", "num_params", "errors":
    {predictor: [normalised error at k]}, ...}."""
    return runs.train_run(build_run, config, workdir)
