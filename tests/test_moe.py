"""Mixture-of-experts MLP (model.num_experts > 0): routing against a hand computation, the
load-balancing loss through the `losses` collection, experts sharded over 8 fake devices equal
to one device, active-parameter FLOPs, and the experiment trained through the CLI."""

import dataclasses
import functools
import importlib.util
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from lm import lora, parallel
from lm.models import layers, moe
from lm.models import transformer as T
from lm.train import OptimizerConfig, create_trainer, flops_per_token, forward_with_aux
from lm.utils import path_key

from tests.test_main import metrics, run_cli, write_corpus
from tests.test_train import synthetic_batches

MOE = T.preset("gpt2", **T.TINY, num_experts=4, experts_per_token=2, router_aux_loss=0.1)
MOE_GATED = T.preset("llama", **T.TINY, num_kv_heads=2, num_experts=4, experts_per_token=1)


def init(config, seed=0):
    model = T.build_model(config)
    boxed = model.init(jax.random.key(seed), **T.dummy_inputs(config, 2, 8))["params"]
    return model, boxed, nn.meta.unbox(boxed)


def tokens(shape, vocab, seed):
    return jax.random.randint(jax.random.key(seed), shape, 1, vocab)


def sown_losses(model, params, inputs):
    _, sown = model.apply({"params": params}, inputs, mutable=["losses"])
    return sown.get("losses", {})


# ------------------------------------------------------------------------------ the layer


def _silu(x):
    return x / (1 + np.exp(-x))


@pytest.mark.parametrize(
    "gated, k, activation", [(False, 2, "relu"), (True, 2, "silu"), (True, 1, "silu")]
)
def test_moe_mlp_equals_a_per_token_hand_computation(gated, k, activation):
    """Each token: router softmax, its top k experts, gates renormalised over them (k > 1) or
    the raw probability (k = 1), the experts' MLPs mixed by the gates; and the Switch
    load-balancing loss num_experts * sum_e fraction_e * mean_prob_e times its coefficient."""
    num, hidden, coef = 4, 16, 0.3
    mlp = moe.MoeMLP(
        num_experts=num,
        experts_per_token=k,
        hidden=hidden,
        activation=activation,
        gated=gated,
        use_bias=True,
        aux_loss=coef,
        init_std=0.3,  # large enough that routing and the MLPs are far from uniform / linear
        out_init_std=0.3,
    )
    x = jax.random.normal(jax.random.key(1), (3, 5, 8))
    params = nn.meta.unbox(mlp.init(jax.random.key(0), x)["params"])
    y, sown = mlp.apply({"params": params}, x, mutable=["losses"])

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    act = {"relu": lambda h: np.maximum(h, 0), "silu": _silu}[activation]
    first = "wi_gate" if gated else "wi"
    want = np.zeros(x.shape, np.float64)
    counts, prob_sums = np.zeros(num), np.zeros(num)
    tokens_x = np.asarray(x, np.float64).reshape(-1, 8)
    for t, xt in enumerate(tokens_x):
        logits = xt @ p["router"]["kernel"]
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        chosen = np.argsort(-probs)[:k]
        gates = probs[chosen] / (probs[chosen].sum() if k > 1 else 1.0)
        out = np.zeros(8)
        for e, g in zip(chosen, gates, strict=True):
            h = act(xt @ p[first]["kernel"][e] + p[first]["bias"][e])
            if gated:
                h = h * (xt @ p["wi_up"]["kernel"][e] + p["wi_up"]["bias"][e])
            out += g * (h @ p["wo"]["kernel"][e] + p["wo"]["bias"][e])
        want.reshape(-1, 8)[t] = out
        counts[chosen] += 1
        prob_sums += probs
    n = len(tokens_x)
    balance = coef * num * np.sum(counts / (n * k) * prob_sums / n)
    # Measured: float32 against float64, outputs to 2.6e-7 absolute, the loss to 1.9e-7 relative.
    np.testing.assert_allclose(y, want, atol=3e-6)
    (got_balance,) = sown["losses"]["load_balancing"]
    np.testing.assert_allclose(got_balance, balance, rtol=2e-6)


def test_load_balancing_loss_balances_a_lopsided_router():
    """Gradient steps on the sown loss alone move a router that sends every token to expert 0
    towards balance (loss -> the coefficient, its value for a balanced router)."""
    mlp = moe.MoeMLP(num_experts=4, experts_per_token=2, hidden=8, aux_loss=1.0)
    x = 1.0 + 0.5 * jax.random.normal(jax.random.key(1), (4, 16, 8))  # a shared direction
    params = nn.meta.unbox(mlp.init(jax.random.key(0), x)["params"])
    kernel = params["router"]["kernel"]
    params["router"]["kernel"] = kernel.at[:, 0].add(0.5)  # expert 0's logit up by about 4

    def balance(p):
        return mlp.apply({"params": p}, x, mutable=["losses"])[1]["losses"]["load_balancing"][0]

    start = float(balance(params))
    opt = optax.adam(1e-2)  # plain SGD oscillates: the assignment fractions jump as it moves

    @jax.jit
    def step(params, state):
        updates, state = opt.update(jax.grad(balance)(params), state)
        return optax.apply_updates(params, updates), state

    state = opt.init(params)
    for _ in range(100):
        params, state = step(params, state)
    end = float(balance(params))
    # Measured: 1.915 at the start (2 is the most for top-2 of 4), 1.000 after 100 steps.
    assert start > 1.8 and end < 1.01, (start, end)


# ------------------------------------------------------------------------------ dispatch

# 8 experts top-2 with the z-loss on; the batch's last 4 positions of each row are padding.
DISPATCH = T.preset(
    "llama", **T.TINY, num_kv_heads=2, num_experts=8, experts_per_token=2, router_z_loss=1e-3
)


def _objective_and_grads(config):
    """(objective, aux, gradients) of `config` on a padded batch, dense or sorted dispatch."""
    model, _, params = init(config)
    inputs = tokens((4, 16), config.vocab_size, 1)
    segments = jnp.ones_like(inputs).at[:, 12:].set(0)
    batch = {
        "inputs": inputs,
        "segment_ids": segments,
        "targets": jnp.roll(inputs, -1, axis=1),
        "weights": (segments > 0).astype(jnp.float32),
    }

    def objective(params):
        logits, aux = forward_with_aux(model, params, batch)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        losses = sum(v for k, v in aux.items() if not k.startswith("stats/"))
        return jnp.sum(ce * batch["weights"]) / jnp.sum(batch["weights"]) + losses, aux

    (value, aux), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
    return float(value), aux, grads


@pytest.fixture(scope="module")
def dense_dispatch():
    return _objective_and_grads(dataclasses.replace(DISPATCH, moe_dispatch="dense"))


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(
            dict(moe_dispatch="dropless", moe_grouped_matmul="blocks"), marks=pytest.mark.slow
        ),
        dict(moe_dispatch="dropless", moe_grouped_matmul="ragged_dot"),
        pytest.param(  # room for every assignment
            dict(moe_dispatch="capacity", moe_capacity_factor=8.0), marks=pytest.mark.slow
        ),
    ],
    ids=["dropless-blocks", "dropless-ragged_dot", "capacity-8"],
)
def test_sorted_dispatch_equals_dense_dispatch(dense_dispatch, overrides):
    want, want_aux, want_grads = dense_dispatch
    got, aux, grads = _objective_and_grads(dataclasses.replace(DISPATCH, **overrides))
    # Measured (each): the objective equal, gradients to 9.3e-8 of the largest entry.
    np.testing.assert_allclose(got, want, rtol=1e-6)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want_grads))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6 * scale), grads, want_grads
    )
    for name in ("load_balancing", "router_z"):
        np.testing.assert_allclose(aux[name], want_aux[name], rtol=1e-6)
    if overrides["moe_dispatch"] == "capacity":
        assert float(aux["stats/moe_dropped_fraction"]) == 0.0


def _expert_outputs(params, x):
    """Every expert's GELU MLP (no biases) on every token, float64 [tokens, expert, embed]."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    h = np.einsum("td,edf->tef", x, p["wi"]["kernel"])
    h = 0.5 * h * (1 + np.vectorize(math.erf)(h / math.sqrt(2)))
    return np.einsum("tef,efd->ted", h, p["wo"]["kernel"])


@pytest.mark.parametrize("padding", [0, 6])
def test_capacity_keeps_each_experts_earliest_assignments_and_counts_the_dropped(padding):
    """A router that makes expert 0 every token's first choice: with capacity 12 (factor 1, 24
    tokens x 2 / 4 experts) expert 0 keeps its first 12 valid tokens; the rest keep only their
    second expert. Padding tokens take no capacity and count in no share."""
    mlp = moe.MoeMLP(
        num_experts=4,
        experts_per_token=2,
        hidden=8,
        use_bias=False,
        dispatch="capacity",
        capacity_factor=1.0,
        init_std=0.3,
        out_init_std=0.3,
    )
    x = jax.random.normal(jax.random.key(1), (1, 24, 8)).at[..., 0].set(1.0)
    params = nn.meta.unbox(mlp.init(jax.random.key(0), x)["params"])
    params["router"]["kernel"] = params["router"]["kernel"].at[0, 0].set(20.0)
    valid = jnp.arange(24)[None] >= padding
    y, sown = mlp.apply({"params": params}, x, valid=valid, mutable=[moe.STATS])

    xt = np.asarray(x[0], np.float64)
    probs = jax.nn.softmax(xt @ np.asarray(params["router"]["kernel"], np.float64), axis=-1)
    gates, experts = jax.lax.top_k(probs, 2)
    gates = np.asarray(gates / gates.sum(-1, keepdims=True))
    experts = np.asarray(experts)
    assert (experts[:, 0] == 0).all()
    outs = _expert_outputs(params, xt)
    want = np.zeros((24, 8))
    for t in range(padding, 24):
        keep_first = t < padding + 12
        want[t] = gates[t, 1] * outs[t, experts[t, 1]] + keep_first * gates[t, 0] * outs[t, 0]
    # Measured: 1.9e-7 absolute (float32 against float64).
    np.testing.assert_allclose(y[0], want, atol=2e-6)
    valid_assignments = 2 * (24 - padding)
    (dropped,) = sown[moe.STATS]["moe_dropped_fraction"]
    assert float(dropped) == pytest.approx((24 - padding - 12) / valid_assignments, rel=1e-6)


def test_router_losses_count_only_valid_tokens():
    """The load-balancing and z losses equal their formulas over the valid tokens, and
    whatever the padding tokens hold changes neither."""
    num, z_coef, aux_coef = 4, 0.01, 0.1
    mlp = moe.MoeMLP(
        num_experts=num,
        experts_per_token=2,
        hidden=8,
        aux_loss=aux_coef,
        z_loss=z_coef,
        init_std=0.3,
    )
    x = jax.random.normal(jax.random.key(1), (2, 10, 8))
    valid = jnp.arange(10)[None, :] < jnp.array([[7], [10]])
    params = nn.meta.unbox(mlp.init(jax.random.key(0), x)["params"])

    def losses(x):
        sown = mlp.apply({"params": params}, x, valid=valid, mutable=["losses"])[1]["losses"]
        return float(sown["load_balancing"][0]), float(sown["router_z"][0])

    kept = np.asarray(x, np.float64)[np.asarray(valid)]  # [17, 8]
    logits = kept @ np.asarray(params["router"]["kernel"], np.float64)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    top2 = np.argsort(-probs, axis=-1)[:, :2]
    fraction = np.bincount(top2.reshape(-1), minlength=num) / top2.size
    want_balance = aux_coef * num * np.sum(fraction * probs.mean(0))
    lse = np.log(np.exp(logits).sum(-1))
    want_z = z_coef * np.mean(lse**2)
    balance, z = losses(x)
    # Measured: 1e-7 relative.
    np.testing.assert_allclose([balance, z], [want_balance, want_z], rtol=2e-6)
    noise = jnp.where(valid[..., None], 0.0, 5.0 * jax.random.normal(jax.random.key(2), x.shape))
    assert losses(x + noise) == (balance, z)


def test_shared_experts_add_a_gated_dense_mlp_to_the_routed_ones():
    options = dict(num_experts=4, experts_per_token=2, hidden=8, init_std=0.3, out_init_std=0.3)
    with_shared = moe.MoeMLP(**options, shared_hidden=16, shared_gate=True)
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    params = nn.meta.unbox(with_shared.init(jax.random.key(0), x)["params"])
    assert set(params) == {"router", "wi", "wo", "shared", "shared_gate"}
    routed = moe.MoeMLP(**options).apply(
        {"params": {k: v for k, v in params.items() if not k.startswith("shared")}}, x
    )
    shared = layers.MLP(hidden=16).apply({"params": params["shared"]}, x)
    gate = jax.nn.sigmoid(x @ params["shared_gate"]["kernel"])
    # Measured: 6e-8.
    np.testing.assert_allclose(
        with_shared.apply({"params": params}, x), routed + gate * shared, atol=1e-6
    )


def test_dropout_inside_sorted_dispatch_is_inverted_dropout_of_the_experts_hidden_units():
    """Dropout on the experts' hidden units, scaled by 1 / (1 - rate): each training draw
    differs, and their mean is the deterministic output (the down projection is linear)."""
    mlp = moe.MoeMLP(num_experts=4, experts_per_token=2, hidden=16, dropout=0.5, init_std=0.3)
    x = jax.random.normal(jax.random.key(1), (2, 5, 8))
    params = nn.meta.unbox(mlp.init(jax.random.key(0), x)["params"])
    want = mlp.apply({"params": params}, x)

    @jax.jit
    def draw(key):
        return mlp.apply({"params": params}, x, deterministic=False, rngs={"dropout": key})

    draws = jnp.stack([draw(key) for key in jax.random.split(jax.random.key(2), 400)])
    assert not jnp.allclose(draws[0], draws[1])
    spread = jnp.std(draws, axis=0) / np.sqrt(len(draws))
    assert bool(jnp.all(jnp.abs(draws.mean(0) - want) < 5 * spread + 1e-6))


def _step_flops(config, batch=8, length=64):
    """Compiled FLOPs of the objective's value and gradient on a [batch, length] batch."""
    model = T.build_model(config)
    params = jax.eval_shape(
        lambda: nn.meta.unbox(
            model.init(jax.random.key(0), **T.dummy_inputs(config, 2, 8))["params"]
        )
    )
    inputs = jax.ShapeDtypeStruct((batch, length), jnp.int32)

    def objective(params, inputs):
        logits, aux = forward_with_aux(model, params, {"inputs": inputs})
        return jnp.mean(logits[..., 0]) + sum(aux.values())

    compiled = jax.jit(jax.value_and_grad(objective)).lower(params, inputs).compile()
    return compiled.cost_analysis()["flops"]


def test_dropless_costs_the_flops_of_the_dense_model_of_equal_active_parameters():
    """8 experts top-2 of width 64 beside a dense MLP of width 128: dropless dispatch at most
    1.2x the dense model's compiled FLOPs; dense dispatch computes all 8 experts."""
    shape = {**T.TINY, "num_kv_heads": 2, "mlp_dim": 64}
    moe_config = T.preset("llama", **shape, num_experts=8, experts_per_token=2)
    dense = _step_flops(T.preset("llama", **{**shape, "mlp_dim": 128}))
    dropless = _step_flops(dataclasses.replace(moe_config, moe_grouped_matmul="blocks"))
    everything = _step_flops(dataclasses.replace(moe_config, moe_dispatch="dense"))
    # Measured: dropless 0.985x the dense model, dense dispatch 2.32x.
    print(
        f"dropless {dropless / dense:.3f}x, dense dispatch {everything / dense:.3f}x the dense model"
    )
    assert dropless <= 1.2 * dense
    assert everything >= 2 * dense


# ------------------------------------------------------------------------------ the model


def test_expert_parameters_carry_the_expert_axis():
    _, boxed, params = init(MOE)
    mlp = boxed["decoder"]["layers"]["block_0"]["mlp"]
    names = {
        path_key(path): (leaf.value.shape, leaf.names)
        for path, leaf in jax.tree_util.tree_flatten_with_path(
            mlp, is_leaf=lambda x: isinstance(x, nn.Partitioned)
        )[0]
    }
    layers_, e, d, f = MOE.num_layers, MOE.num_experts, MOE.d_model, MOE.mlp_dim
    assert names == {
        "router/kernel": ((layers_, d, e), ("layers", "embed", "expert")),
        "wi/kernel": ((layers_, e, d, f), ("layers", "expert", "embed", "mlp")),
        "wi/bias": ((layers_, e, f), ("layers", "expert", "mlp")),
        "wo/kernel": ((layers_, e, f, d), ("layers", "expert", "mlp", "embed")),
        "wo/bias": ((layers_, e, d), ("layers", "expert", "embed")),
    }


def test_dense_models_have_no_experts_and_sow_no_losses():
    config = T.preset("gpt2", **T.TINY)
    assert config.num_experts == 0  # the default: existing models and checkpoints unchanged
    model, boxed, params = init(config)
    names = {n for spec in jax.tree.leaves(nn.get_partition_spec(boxed)) for n in spec}
    assert "expert" not in names
    assert sown_losses(model, params, tokens((2, 6), config.vocab_size, 1)) == {}


@pytest.mark.slow
def test_losses_are_sown_per_layer_scanned_and_unrolled_alike():
    model, _, params = init(MOE)
    inputs = tokens((2, 10), MOE.vocab_size, 2)
    scanned = sown_losses(model, params, inputs)
    stacked = scanned["decoder"]["layers"]["block_0"]["mlp"]["load_balancing"][0]
    assert stacked.shape == (MOE.num_layers,)  # one value per layer, stacked by the scan
    unrolled = dataclasses.replace(MOE, scan_layers=False)
    per_layer = sown_losses(T.build_model(unrolled), T.to_layout(params, unrolled), inputs)
    values = [per_layer["decoder"][f"layer_{i}"]["mlp"]["load_balancing"][0] for i in range(2)]
    # Measured: equal to 1.5e-7 relative.
    np.testing.assert_allclose(values, stacked, rtol=2e-6)
    assert all(v > 0 for v in values)
    # What lm.train adds to the objective: the sum over layers, under its name.
    batch = {"inputs": inputs}
    _, aux = forward_with_aux(model, params, batch)
    np.testing.assert_allclose(aux["load_balancing"], np.sum(stacked), rtol=1e-6)
    off = dataclasses.replace(MOE, router_aux_loss=0.0)
    assert sown_losses(T.build_model(off), params, inputs) == {}


@pytest.mark.parametrize(
    "config",
    [MOE, pytest.param(MOE_GATED, marks=pytest.mark.slow)],
    ids=["gpt2_top2", "llama_top1"],
)
def test_moe_decoder_is_causal_and_its_cache_matches_the_full_forward(config):
    model, _, params = init(config)
    toks = tokens((2, 10), config.vocab_size, 5)
    full = model.apply({"params": params}, toks)
    changed = model.apply({"params": params}, toks.at[:, 6:].set(1))
    np.testing.assert_allclose(full[:, :6], changed[:, :6], atol=1e-6)
    cache = T.init_cache(model, params, batch=2, max_len=16)
    step = jax.jit(
        lambda cache, t, pos: model.apply(
            {"params": params, "cache": cache}, t, positions=pos, decode=True, mutable=["cache"]
        )
    )
    logits, mut = step(cache, toks[:, :4], jnp.broadcast_to(jnp.arange(4), (2, 4)))
    outs = [logits]
    for i in range(4, 10):
        logits, mut = step(mut["cache"], toks[:, i : i + 1], jnp.full((2, 1), i))
        outs.append(logits)
    # Measured: 1.8e-7.
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=2e-6)


@pytest.mark.slow
def test_moe_scanned_equals_unrolled_with_gradients():
    unrolled = dataclasses.replace(MOE, scan_layers=False)
    model, _, params = init(unrolled)
    inputs = tokens((2, 10), MOE.vocab_size, 3)

    def loss(model, params):
        logits, sown = model.apply({"params": params}, inputs, mutable=["losses"])
        return jnp.sum(jnp.sin(logits)) + sum(jnp.sum(x) for x in jax.tree.leaves(sown))

    want, want_grad = jax.value_and_grad(loss, argnums=1)(model, params)
    stacked = T.to_layout(params, MOE)
    got, got_grad = jax.value_and_grad(loss, argnums=1)(T.build_model(MOE), stacked)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want_grad))
    # Measured: values equal, gradients to 5.6e-8 of the largest entry.
    np.testing.assert_allclose(got, want, rtol=1e-6)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=6e-7 * scale),
        T.unstack_layers(got_grad),
        want_grad,
    )


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(num_experts=-1), r"model\.num_experts=-1 must be >= 0"),
        (dict(num_experts=4, experts_per_token=0), r"model\.experts_per_token=0 must be >= 1"),
        (dict(num_experts=4, experts_per_token=5), r"experts_per_token=5 must be <= .*=4"),
        (dict(num_experts=4, mlp_dim=0), r"num_experts > 0 needs model\.mlp_dim > 0"),
        (dict(router_aux_loss=-0.1), r"model\.router_aux_loss=-0.1 must be >= 0"),
    ],
)
def test_bad_expert_settings_are_one_clear_line(values, message):
    with pytest.raises(ValueError, match=message) as error:
        T.ModelConfig(**values)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------ FLOPs


def test_flops_per_token_counts_active_parameters():
    """gpt2 TINY, 4 experts top-2 (d 32, expert width 64, 2 layers, vocab 97, 64 positions)."""
    _, _, params = init(MOE)
    total = sum(x.size for x in jax.tree.leaves(params))
    embeddings = 97 * 32 + 64 * 32
    norms = 2 * (2 * 2 * 32) + 2 * 32  # two LayerNorms per layer and the final one
    attention = 4 * (32 * 32 + 32)  # query, key, value, out with biases
    expert = 32 * 64 + 64 + 64 * 32 + 32  # wi, its bias, wo, its bias
    router = 32 * 4
    assert total == embeddings + norms + 2 * (attention + 4 * expert + router) == 47_712
    active = total - 2 * (4 - 2) * expert  # each token skips 2 of 4 experts in each layer
    assert MOE.active_params(total) == active == 30_944
    attention_flops = 12 * 2 * 4 * 8 * 16  # layers * heads * head_dim * seq_len
    assert flops_per_token(MOE, total, 16) == 6 * 30_944 + attention_flops
    dense = T.preset("gpt2", **T.TINY)
    assert flops_per_token(dense, 1000, 16) == 6 * 1000 + attention_flops  # unchanged: 6N


# ------------------------------------------------------------------------------ meshes


@pytest.fixture(scope="module")
def one_device_loss_and_grads():
    return _loss_and_grads(parallel.make_mesh((1, 1, 1), jax.devices()[:1]), parallel.DEFAULT_RULES)


def _batch():
    return {k: jnp.asarray(v) for k, v in next(synthetic_batches(vocab=MOE.vocab_size)).items()}


def _loss_and_grads(mesh, rules, config=MOE):
    """The training objective (cross-entropy + router losses) and its gradients, with the
    parameters laid out on `mesh` by `rules`, the batch over the batch axes, and the
    activations laid out as a train step lays them out (`parallel.with_activation_layout`:
    with experts over a batch axis, the tokens go to them all-to-all). Returns (params,
    loss, gradients, the compiled HLO text)."""
    model = T.build_model(config)
    boxed = jax.eval_shape(
        lambda: model.init(jax.random.key(0), **T.dummy_inputs(config))["params"]
    )
    shardings = parallel.param_shardings(boxed, mesh, rules)
    params = jax.jit(
        lambda: nn.meta.unbox(model.init(jax.random.key(0), **T.dummy_inputs(config))["params"]),
        out_shardings=shardings,
    )()
    batch = jax.device_put(_batch(), parallel.batch_sharding(mesh))

    def objective(params, batch):
        logits, aux = forward_with_aux(model, params, batch)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
        losses = sum(v for k, v in aux.items() if not k.startswith("stats/"))
        return jnp.sum(ce * batch["weights"]) / jnp.sum(batch["weights"]) + losses

    step = jax.jit(parallel.with_activation_layout(jax.value_and_grad(objective), mesh, rules))
    loss, grads = step(params, batch)
    hlo = step.lower(params, batch).compile().as_text()
    return params, float(loss), jax.device_get(grads), hlo


@pytest.mark.parametrize(
    "mesh, rules, expert_axis",
    [
        ((2, 4, 1), "", "fsdp"),
        pytest.param((2, 2, 2), "", "fsdp", marks=pytest.mark.slow),
        pytest.param((4, 2, 1), "expert=data", "data", marks=pytest.mark.slow),
    ],
)
def test_experts_sharded_on_8_devices_give_the_one_device_loss_and_gradients(
    one_device_loss_and_grads, mesh, rules, expert_axis
):
    assert jax.device_count() == 8
    config = parallel.ParallelConfig(mesh=mesh, rules=rules)
    mesh = parallel.make_mesh(config.mesh)
    params, loss, grads, hlo = _loss_and_grads(mesh, config.logical_rules)
    assert "all-to-all" in hlo  # experts over a batch axis: tokens travel to them
    _, want_loss, want_grads, _ = one_device_loss_and_grads

    mlp = params["decoder"]["layers"]["block_0"]["mlp"]
    for name in ("wi", "wo"):
        kernel = mlp[name]["kernel"]  # [layers, expert, in, out]
        assert kernel.sharding.spec[1] == expert_axis
        experts_here = MOE.num_experts // mesh.shape[expert_axis]
        assert {s.data.shape[1] for s in kernel.addressable_shards} == {experts_here}
    # Measured (each mesh): loss to 1.0e-7 relative, gradients to 3.3e-7 of the largest entry.
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(want_grads))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=3e-6 * scale), grads, want_grads
    )


@functools.cache
def _one_device(dispatch):
    one = parallel.make_mesh((1, 1, 1), jax.devices()[:1])
    return _loss_and_grads(one, parallel.DEFAULT_RULES, _expert_parallel_config(dispatch))


def _expert_parallel_config(dispatch):
    # 8 experts: 2 per device over fsdp=4; capacity with room for every assignment.
    return dataclasses.replace(MOE, num_experts=8, moe_dispatch=dispatch, moe_capacity_factor=8.0)


@pytest.mark.parametrize(
    "mesh, dispatch",
    [
        pytest.param((2, 4, 1), "dropless", marks=pytest.mark.slow),
        pytest.param((4, 2, 1), "dropless", marks=pytest.mark.slow),
        pytest.param((8, 1, 1), "dropless", marks=pytest.mark.slow),
        pytest.param((2, 4, 1), "capacity", marks=pytest.mark.slow),
        pytest.param((4, 2, 1), "capacity", marks=pytest.mark.slow),
        pytest.param((2, 2, 2), "dropless", marks=pytest.mark.slow),
    ],
)
def test_expert_parallelism_over_fsdp_equals_one_device(mesh, dispatch):
    """Experts split over fsdp, tokens sent to them all-to-all inside shard_map (composed
    with data parallelism, and with the experts' MLP dimension over tensor): the one-device
    loss and gradients."""
    assert jax.device_count() == 8
    config = _expert_parallel_config(dispatch)
    _, loss, grads, hlo = _loss_and_grads(parallel.make_mesh(mesh), parallel.DEFAULT_RULES, config)
    _, want_loss, want_grads, one_hlo = _one_device(dispatch)
    assert ("all-to-all" in hlo) == (mesh[1] > 1) and "all-to-all" not in one_hlo
    # Measured (each mesh): loss to 1e-7 relative, gradients to 2.9e-7 of the largest entry.
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(want_grads))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=3e-6 * scale), grads, want_grads
    )


@pytest.mark.parametrize(
    "mesh, rules, collective",
    [
        pytest.param((2, 2, 2), "expert=tensor", "all-reduce", marks=pytest.mark.slow),
        pytest.param((2, 4, 1), "expert=none", None, marks=pytest.mark.slow),  # all on each
    ],
)
def test_experts_off_the_batch_axes_equal_one_device(mesh, rules, collective):
    """Experts over an axis the batch is not split over: every device holds its tokens
    already, runs its own experts on them, and the outputs are summed over that axis; with
    the experts on every device, each dispatches its own tokens."""
    config = parallel.ParallelConfig(mesh=mesh, rules=rules)
    _, loss, grads, hlo = _loss_and_grads(
        parallel.make_mesh(mesh), config.logical_rules, _expert_parallel_config("dropless")
    )
    _, want_loss, want_grads, _ = _one_device("dropless")
    if collective is not None:  # the sum over the experts' devices, no exchange
        assert collective in hlo and "all-to-all" not in hlo
    # Measured: loss to 1e-7 relative, gradients to 2.4e-7 of the largest entry.
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(want_grads))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=3e-6 * scale), grads, want_grads
    )


def test_experts_over_batch_and_other_axes_at_once_are_one_clear_line():
    config = parallel.ParallelConfig(mesh=(2, 2, 2), rules="expert=fsdp+tensor")
    with pytest.raises(ValueError, match=r"puts the experts over \('fsdp', 'tensor'\)") as error:
        _loss_and_grads(
            parallel.make_mesh(config.mesh),
            config.logical_rules,
            _expert_parallel_config("dropless"),
        )
    assert "\n" not in str(error.value)


def _emulated_ragged_all_to_all(
    operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name
):
    """`jax.lax.ragged_all_to_all` as its docstring defines it, built from all_to_all (XLA:CPU
    has no ragged one): operand[input_offsets[i]:][:send_sizes[i]] goes to device i and is
    written there at output_offsets[i]; this device's output keeps its values elsewhere."""
    rows = jnp.arange(operand.shape[0])
    trailing = (1,) * (operand.ndim - 1)
    chunks = jnp.take(operand, input_offsets[:, None] + rows, axis=0, mode="fill", fill_value=0)
    chunks = jnp.where(
        (rows < send_sizes[:, None]).reshape(*chunks.shape[:2], *trailing), chunks, 0
    )
    got = jax.lax.all_to_all(chunks, axis_name, 0, 0)  # got[j]: device j's chunk for here
    at = jax.lax.all_to_all(output_offsets, axis_name, 0, 0, tiled=True)  # where it lands here
    dest = jnp.where(rows < recv_sizes[:, None], at[:, None] + rows, output.shape[0])
    return output.at[dest.reshape(-1)].set(got.reshape(-1, *operand.shape[1:]), mode="drop")


@pytest.mark.slow
@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_the_ragged_exchange_equals_one_device(monkeypatch, dispatch):
    """The exchange TPUs and GPUs run (ragged all-to-alls, here emulated by their documented
    semantics) sends each row to its expert's device and back: the one-device result."""
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", _emulated_ragged_all_to_all)
    config = dataclasses.replace(_expert_parallel_config(dispatch), moe_exchange="ragged")
    _, loss, grads, hlo = _loss_and_grads(
        parallel.make_mesh((2, 4, 1)), parallel.DEFAULT_RULES, config
    )
    _, want_loss, want_grads, _ = _one_device(dispatch)
    assert "all-to-all" in hlo
    # Measured: loss to 1e-7 relative, gradients to 2.4e-7 of the largest entry.
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(want_grads))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=3e-6 * scale), grads, want_grads
    )


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]'; CI installs it)",
)
def test_expert_parallelism_compiles_ragged_collectives_and_grouped_matmuls_for_tpu():
    """On a TPU slice (compiled here by libtpu) the train step exchanges tokens with ragged
    all-to-alls and runs the experts as ragged_dot's grouped kernel."""
    from lm import compile as compile_lib

    config = dataclasses.replace(MOE, num_experts=8)
    target = compile_lib.topology("v5e:2x2")
    trainer = create_trainer(
        config,
        T.build_model(config),
        OptimizerConfig(),
        10,
        parallel.ParallelConfig(mesh=(1, 4, 1)),
        devices=target.devices,
    )
    mesh = trainer.mesh
    batch = {
        k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=parallel.batch_sharding(mesh))
        for k, v in _batch().items()
    }
    text = trainer.train_step.lower(trainer.abstract_state, batch).compile().as_text()
    assert "ragged-all-to-all" in text and "ragged-dot" in text


def test_expert_rules_reach_the_trainer_and_its_optimizer_state():
    trainer = create_trainer(
        MOE,
        T.build_model(MOE),
        OptimizerConfig(learning_rate=1e-2, warmup_steps=1),
        10,
        parallel.ParallelConfig(mesh=(2, 4, 1)),
    )
    want = NamedSharding(trainer.mesh, P(None, "fsdp", None, "tensor"))
    wi = trainer.state_shardings.params["decoder"]["layers"]["block_0"]["mlp"]["wi"]["kernel"]
    mu = trainer.state_shardings.opt_state[1][0].mu["decoder"]["layers"]["block_0"]["mlp"]
    assert wi.is_equivalent_to(want, 4) and mu["wi"]["kernel"].is_equivalent_to(want, 4)
    assert math.prod(trainer.mesh.shape.values()) == 8


# ------------------------------------------------------------------------------ the CLI


@pytest.mark.slow
def test_tiny_moe_experiment_trains_through_the_cli(tmp_path):
    source = write_corpus(tmp_path / "corpus", lines=600)
    workdir = tmp_path / "run"
    run_cli(
        "--config=experiments/shakespeare_moe.py:tiny",
        workdir=workdir,
        source=source,
        data_dir=tmp_path / "data",
    )
    lines = metrics(workdir)
    assert lines[-1]["step"] == 20 and lines[-1]["loss"] < lines[0]["loss"]
    assert "eval/loss" in lines[-1]
    # Two layers' load-balancing losses, 0.01 each for a balanced router. Measured: 0.0200 to
    # 0.0201 over the run (below 0.02 is possible: the Switch ratio is not bounded by 1).
    assert all(abs(line["aux/load_balancing"] - 0.02) < 0.002 for line in lines)


@pytest.mark.slow
def test_capacity_dispatch_logs_the_dropped_share_through_the_cli(tmp_path):
    source = write_corpus(tmp_path / "corpus", lines=600)
    workdir = tmp_path / "run"
    run_cli(
        "--config=experiments/shakespeare_moe.py:tiny",
        "--config.model.moe_dispatch=capacity",
        "--config.model.moe_capacity_factor=1.0",
        workdir=workdir,
        source=source,
        data_dir=tmp_path / "data",
    )
    lines = [line for line in metrics(workdir) if "loss" in line]
    assert lines[-1]["step"] == 20 and lines[-1]["loss"] < lines[0]["loss"]
    # At factor 1 an expert drops what exceeds its even share: some, never most.
    dropped = [line["stats/moe_dropped_fraction"] for line in lines]
    assert all(0 < share < 0.5 for share in dropped), dropped


# ------------------------------------------------------------------------------ LoRA


@pytest.mark.slow
def test_lora_gives_each_expert_of_each_layer_its_own_adapters():
    """Expert kernels [layers, expert, in, out]: both leading axes stack kernels, so A is
    [layers, expert, in, r] and B [layers, expert, r, out], and the merge adds A @ B to each."""
    model, boxed, params = init(MOE)
    config = lora.LoraConfig(rank=2, alpha=4.0, targets=("wi", "wo", "query"))
    adapters = nn.meta.unbox(lora.init(jax.random.key(1), boxed, config))
    mlp = adapters["decoder"]["layers"]["block_0"]["mlp"]
    n, e, d, f = MOE.num_layers, MOE.num_experts, MOE.d_model, MOE.mlp_dim
    assert mlp["wi"]["kernel"]["lora_a"].shape == (n, e, d, 2)
    assert mlp["wi"]["kernel"]["lora_b"].shape == (n, e, 2, f)
    assert mlp["wo"]["kernel"]["lora_a"].shape == (n, e, f, 2)
    assert mlp["wo"]["kernel"]["lora_b"].shape == (n, e, 2, d)
    query = adapters["decoder"]["layers"]["block_0"]["self_attention"]["query"]["kernel"]
    assert query["lora_a"].shape == (n, d, 2)  # attention: stacked by layer only

    tokens_ = tokens((2, 8), MOE.vocab_size, 4)
    base_logits = model.apply({"params": params}, tokens_)
    np.testing.assert_array_equal(  # B = 0: the merged model starts as the base
        model.apply({"params": lora.merge(params, adapters, config)}, tokens_), base_logits
    )
    rng = np.random.default_rng(0)
    b = rng.normal(size=mlp["wo"]["kernel"]["lora_b"].shape).astype(np.float32)
    mlp["wo"]["kernel"]["lora_b"] = b
    merged = lora.merge(params, adapters, config)["decoder"]["layers"]["block_0"]["mlp"]
    a = np.asarray(mlp["wo"]["kernel"]["lora_a"], np.float64)
    w = np.asarray(params["decoder"]["layers"]["block_0"]["mlp"]["wo"]["kernel"])
    want = w + config.scale * np.einsum("lefr,lerd->lefd", a, b)  # one product per expert
    # Measured: 2.0e-7 (float32 product against float64).
    np.testing.assert_allclose(merged["wo"]["kernel"], want, atol=2e-6)


def test_the_expert_rule_is_a_default_that_the_config_overrides():
    assert dict(parallel.DEFAULT_RULES)["expert"] == "fsdp"
    _, boxed, _ = init(MOE)
    config = parallel.ParallelConfig(mesh=(4, 2, 1), rules="expert=data+fsdp")
    assert dict(config.logical_rules)["expert"] == ("data", "fsdp")
    parallel.check_rules_apply(config, boxed)  # a rule for a logical axis the model carries
    _, dense, _ = init(T.preset("gpt2", **T.TINY))
    parallel.check_rules_apply(config, dense)  # a default axis: fine for dense models too
    with pytest.raises(ValueError, match=r"\['experts'\] that no parameter carries"):
        parallel.check_rules_apply(parallel.ParallelConfig(rules="experts=data"), boxed)
    # fsdp = 8 does not divide 4 experts: the embed dim takes fsdp, as in a dense model.
    shardings = parallel.param_shardings(boxed, parallel.make_mesh((1, 8, 1)))
    wi = shardings["decoder"]["layers"]["block_0"]["mlp"]["wi"]["kernel"]
    assert tuple(wi.spec) == (None, None, "fsdp", "tensor")
