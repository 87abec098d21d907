"""Function classes of Garg et al. 2022 ("What can Transformers learn in-context?").

Every sampler is a pure JAX function of a PRNG key; the same key gives the same batch.
A prompt is `n_points` pairs (x_i, f(x_i)) of one function f drawn from the class:

    xs [batch, n_points, d] ~ N(0, I_d), coordinates d_effective..d-1 set to 0 (curriculum)
    ys [batch, n_points]    = f(xs), one f per batch row

`d_effective` may be a traced integer (the curriculum changes it without recompiling);
`batch`, `n_points`, `d` and the class's own sizes are static.

Classes (KINDS):
    linear_regression         w ~ N(0, I_d), y = x . w
    sparse_linear_regression  w with `sparsity` nonzero N(0, 1) coordinates, y = x . w
    decision_tree             depth `depth`; each internal node tests x_i > 0 for a random
                              coordinate i, leaves N(0, 1)
    relu_2nn_regression       y = sum_j a_j relu(W_j . x), W_j ~ N(0, I_d), a_j ~ N(0, 2/hidden)

Only the first `d_effective` coordinates matter in every class (the others are zero in x,
and w / tree coordinates are drawn among the effective ones).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KINDS = ("linear_regression", "sparse_linear_regression", "decision_tree", "relu_2nn_regression")


def _coordinate_mask(d: int, d_effective) -> jax.Array:
    """[d] float32: 1 on coordinates < d_effective, else 0."""
    return (jnp.arange(d) < d_effective).astype(jnp.float32)


def sample_xs(key: jax.Array, batch: int, n_points: int, d: int, d_effective=None) -> jax.Array:
    """Inputs x ~ N(0, I_d) with coordinates >= d_effective zeroed -> [batch, n_points, d]."""
    d_effective = d if d_effective is None else d_effective
    xs = jax.random.normal(key, (batch, n_points, d), jnp.float32)
    return xs * _coordinate_mask(d, d_effective)


def sample_linear_weights(key: jax.Array, batch: int, d: int, d_effective=None) -> jax.Array:
    """Dense weights w ~ N(0, I_d) on the effective coordinates -> [batch, d]."""
    d_effective = d if d_effective is None else d_effective
    return jax.random.normal(key, (batch, d), jnp.float32) * _coordinate_mask(d, d_effective)


def sample_sparse_weights(
    key: jax.Array, batch: int, d: int, d_effective=None, sparsity: int = 3
) -> jax.Array:
    """Weights with min(sparsity, d_effective) nonzero N(0, 1) coordinates, chosen uniformly
    among the first d_effective -> [batch, d]."""
    d_effective = d if d_effective is None else d_effective
    k_values, k_support = jax.random.split(key)
    values = jax.random.normal(k_values, (batch, d), jnp.float32)
    # A uniformly random subset of the effective coordinates: the `sparsity` smallest of
    # i.i.d. uniform scores, with the ineffective coordinates pushed past every real score.
    scores = jax.random.uniform(k_support, (batch, d)) + (jnp.arange(d) >= d_effective) * 2.0
    ranks = jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1)
    support = (ranks < sparsity) & (jnp.arange(d) < d_effective)
    return jnp.where(support, values, 0.0)


def linear_targets(xs: jax.Array, w: jax.Array) -> jax.Array:
    """xs [batch, n, d], w [batch, d] -> ys [batch, n] = x . w."""
    return jnp.einsum("bnd,bd->bn", xs, w)


def sample_tree(key: jax.Array, batch: int, d: int, d_effective=None, depth: int = 4):
    """A random decision tree per row, as arrays in heap order.

    Returns (coords [batch, 2^depth - 1] int32: the coordinate each internal node tests,
    leaves [batch, 2^depth] float32 ~ N(0, 1)). Node j's children are 2j+1 (x_i <= 0) and
    2j+2 (x_i > 0); the node after the last level, j >= 2^depth - 1, is leaf j - (2^depth - 1).
    """
    d_effective = d if d_effective is None else d_effective
    k_coords, k_leaves = jax.random.split(key)
    n_internal = 2**depth - 1
    u = jax.random.uniform(k_coords, (batch, n_internal))
    coords = jnp.minimum(jnp.floor(u * d_effective), d_effective - 1).astype(jnp.int32)
    leaves = jax.random.normal(k_leaves, (batch, 2**depth), jnp.float32)
    return coords, leaves


def tree_targets(xs: jax.Array, coords: jax.Array, leaves: jax.Array) -> jax.Array:
    """xs [batch, n, d], a tree from `sample_tree` -> ys [batch, n]."""
    depth = leaves.shape[-1].bit_length() - 1  # leaves.shape[-1] = 2^depth
    node = jnp.zeros(xs.shape[:2], jnp.int32)  # [batch, n]
    for _ in range(depth):
        coord = jnp.take_along_axis(coords, node, axis=1)  # [batch, n]
        value = jnp.take_along_axis(xs, coord[..., None], axis=2)[..., 0]
        node = 2 * node + 1 + (value > 0).astype(jnp.int32)
    return jnp.take_along_axis(leaves, node - (2**depth - 1), axis=1)


def sample_relu_net(key: jax.Array, batch: int, d: int, d_effective=None, hidden: int = 100):
    """A random two-layer ReLU net per row: (W [batch, hidden, d] ~ N(0, 1) on the effective
    coordinates, a [batch, hidden] ~ N(0, 2/hidden)). Then E[y^2] = d_effective, the same scale
    as linear regression."""
    d_effective = d if d_effective is None else d_effective
    k_w, k_a = jax.random.split(key)
    w = jax.random.normal(k_w, (batch, hidden, d), jnp.float32) * _coordinate_mask(d, d_effective)
    a = jax.random.normal(k_a, (batch, hidden), jnp.float32) * jnp.sqrt(2.0 / hidden)
    return w, a


def relu_net_targets(xs: jax.Array, w: jax.Array, a: jax.Array) -> jax.Array:
    """xs [batch, n, d], W [batch, hidden, d], a [batch, hidden] -> ys [batch, n]."""
    hidden = jax.nn.relu(jnp.einsum("bnd,bhd->bnh", xs, w))
    return jnp.einsum("bnh,bh->bn", hidden, a)


def sample_batch(
    kind: str,
    key: jax.Array,
    batch: int,
    n_points: int,
    d: int,
    d_effective=None,
    *,
    sparsity: int = 3,
    depth: int = 4,
    hidden: int = 100,
) -> tuple[jax.Array, jax.Array]:
    """A batch of prompts of class `kind` -> (xs [batch, n_points, d], ys [batch, n_points]).

    Each row has its own function. `d_effective` (default d) may be traced; the keyword
    arguments are the classes' sizes: sparsity (sparse_linear_regression), depth
    (decision_tree), hidden (relu_2nn_regression).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown function class {kind!r}: use one of {KINDS}")
    d_effective = d if d_effective is None else d_effective
    k_x, k_f = jax.random.split(key)
    xs = sample_xs(k_x, batch, n_points, d, d_effective)
    if kind == "linear_regression":
        ys = linear_targets(xs, sample_linear_weights(k_f, batch, d, d_effective))
    elif kind == "sparse_linear_regression":
        ys = linear_targets(xs, sample_sparse_weights(k_f, batch, d, d_effective, sparsity))
    elif kind == "decision_tree":
        ys = tree_targets(xs, *sample_tree(k_f, batch, d, d_effective, depth))
    else:
        ys = relu_net_targets(xs, *sample_relu_net(k_f, batch, d, d_effective, hidden))
    return xs, ys


def target_scale(kind: str, d: int, sparsity: int = 3) -> float:
    """E[y^2] of a class at full dimension d: the zero predictor's squared error.

    Garg et al. divide squared errors by d for (dense) linear regression and ReLU nets, where
    E[y^2] = d; dividing by this instead puts the zero predictor at 1 for every class
    (sparse: E[y^2] = min(sparsity, d); trees: leaves N(0, 1), E[y^2] = 1).
    """
    if kind in ("linear_regression", "relu_2nn_regression"):
        return float(d)
    if kind == "sparse_linear_regression":
        return float(min(sparsity, d))
    if kind == "decision_tree":
        return 1.0
    raise ValueError(f"unknown function class {kind!r}: use one of {KINDS}")
