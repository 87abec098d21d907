"""Baseline in-context learners of Garg et al. 2022, in float64 numpy.

Every baseline maps a batch of prompts (xs [batch, n, d], ys [batch, n]) to predictions
[batch, n]: prediction i uses only the first i pairs (x_0, y_0) .. (x_{i-1}, y_{i-1}) and
the query x_i, like the Transformer. With no pairs (i = 0) every baseline predicts 0.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np

Baseline = Callable[[np.ndarray, np.ndarray], np.ndarray]


def _as_float64(xs, ys) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
    if xs.ndim != 3 or ys.shape != xs.shape[:2]:
        raise ValueError(f"want xs [batch, n, d] and ys [batch, n], got {xs.shape} and {ys.shape}")
    return xs, ys


def zero(xs, ys) -> np.ndarray:
    """Predicts 0 everywhere (the error of this is E[y^2])."""
    xs, ys = _as_float64(xs, ys)
    return np.zeros_like(ys)


def least_squares(xs, ys) -> np.ndarray:
    """Minimum-norm least squares: w_i = pinv(X_{<i}) y_{<i}, prediction x_i . w_i.

    Exact on noiseless linear data once i >= d (X_{<i} has full column rank almost surely).
    """
    xs, ys = _as_float64(xs, ys)
    preds = np.zeros_like(ys)
    for i in range(1, xs.shape[1]):
        w = np.einsum("bdi,bi->bd", np.linalg.pinv(xs[:, :i]), ys[:, :i])
        preds[:, i] = np.einsum("bd,bd->b", xs[:, i], w)
    return preds


def nearest_neighbours(xs, ys, k: int = 3) -> np.ndarray:
    """Mean of y over the min(k, i) earlier x_j nearest (Euclidean) to x_i."""
    xs, ys = _as_float64(xs, ys)
    preds = np.zeros_like(ys)
    for i in range(1, xs.shape[1]):
        dist = np.linalg.norm(xs[:, :i] - xs[:, i : i + 1], axis=-1)  # [batch, i]
        nearest = np.argsort(dist, axis=1, kind="stable")[:, : min(k, i)]
        preds[:, i] = np.take_along_axis(ys[:, :i], nearest, axis=1).mean(axis=1)
    return preds


def averaging(xs, ys) -> np.ndarray:
    """Garg et al.'s averaging estimator: w_i = mean_{j<i} y_j x_j, prediction x_i . w_i.

    Unbiased for w when x ~ N(0, I) (E[y x] = w), but its variance does not vanish with d.
    """
    xs, ys = _as_float64(xs, ys)
    preds = np.zeros_like(ys)
    for i in range(1, xs.shape[1]):
        w = np.einsum("bid,bi->bd", xs[:, :i], ys[:, :i]) / i
        preds[:, i] = np.einsum("bd,bd->b", xs[:, i], w)
    return preds


def lasso(xs, ys, alpha: float = 0.01, max_iter: int = 10_000) -> np.ndarray:
    """scikit-learn Lasso (no intercept) fit on the first i pairs of each prompt, for
    sparse linear regression: minimises |y - Xw|^2 / (2 i) + alpha |w|_1."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import Lasso

    xs, ys = _as_float64(xs, ys)
    preds = np.zeros_like(ys)
    model = Lasso(alpha=alpha, fit_intercept=False, max_iter=max_iter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for b in range(xs.shape[0]):
            for i in range(1, xs.shape[1]):
                model.fit(xs[b, :i], ys[b, :i])
                preds[b, i] = xs[b, i] @ model.coef_
    return preds


def baselines_for(kind: str, *, knn_k: int = 3, lasso_alpha: float = 0.01) -> dict[str, Baseline]:
    """The baselines that Garg et al. plot beside the model for function class `kind`."""
    out: dict[str, Baseline] = {
        "least_squares": least_squares,
        f"{knn_k}_nearest_neighbours": lambda xs, ys: nearest_neighbours(xs, ys, knn_k),
        "averaging": averaging,
    }
    if kind == "sparse_linear_regression":
        out["lasso"] = lambda xs, ys: lasso(xs, ys, lasso_alpha)
    return out


def normalized_squared_error(pred, ys, d: float) -> np.ndarray:
    """Mean over the batch of (pred - y)^2 / d, per prompt position.

    pred, ys [batch, n_points] -> [n_points]. Garg et al. divide by d (E[y^2] for linear
    regression, so the zero predictor scores about 1); see functions.target_scale for other classes.
    """
    pred, ys = np.asarray(pred, np.float64), np.asarray(ys, np.float64)
    if pred.shape != ys.shape:
        raise ValueError(f"pred {pred.shape} and ys {ys.shape} differ in shape")
    return ((pred - ys) ** 2).mean(axis=0) / d
