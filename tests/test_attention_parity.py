"""Parity of the attention implementations (lm.models.attention.attend) with the reference core.

Every mask pattern the models build, in float32 and bfloat16, outputs and gradients
(w.r.t. q, k, v and the bias), on the query rows that can attend to something: rows with
no key at all (padding) only have to stay finite, their values are implementation-defined.
'xla' runs everywhere; 'cudnn' only on a CUDA GPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from lm.models import attention as A

B, D = 2, 16
HAS_CUDNN = A.resolve_implementation("auto", jnp.bfloat16, D) == "cudnn"  # a CUDA GPU

# Tolerances. Measured on CPU, xla vs reference, each jitted on its own: float32 outputs
# <= 4.8e-7 (gqa, mqa), gradients <= 1.0e-6 (mqa dk), 0 for the variants without grouped
# heads or a second length (same ops in the same order); jitted together, as below, 0.
# Values are O(1) (max |out| ~3, |grad| ~2.6), so ~10x: 5e-6 and 1e-5.
# bfloat16 xla vs reference: 0 (the same bf16 casts in the same places). The bf16 bounds,
# relative to max |reference|, are for cuDNN, not measured here (no GPU): a few bf16 ulps
# (2^-8 = 3.9e-3) for its blockwise softmax and its bf16 copy of the folded mask and bias.
TOL = {  # dtype -> (output, gradient) atol; for bf16 relative to max |reference|
    jnp.float32: (5e-6, 1e-5),
    jnp.bfloat16: (2e-2, 5e-2),
}


def _valid(lengths, length, left=()):
    """[len(lengths), length] 0/1 validity; rows listed in `left` are padded on the left."""
    rows = [
        np.arange(length) >= length - n if i in left else np.arange(length) < n
        for i, n in enumerate(lengths)
    ]
    return jnp.asarray(np.stack(rows), jnp.int32)


def _relative(t, s):
    return jnp.arange(s)[None, :] - jnp.arange(t)[:, None]


# name -> (q_len, k_len, heads, kv_heads, mask, has_bias, causal)
_T = 16
_PAD = _valid(
    [11, 13], _T, left=(1,)
)  # row 1 left-padded: under a causal mask its first queries see no key
_PACKED = jnp.asarray([[1] * 5 + [2] * 6 + [3] * 3 + [0] * 2, [1] * 8 + [2] * 8])
_TREE = jnp.asarray([[1] * 4 + [2] * 3 + [3] * 4 + [4] * 2 + [0] * 3, [1] * 10 + [2] * 3 + [3] * 3])
_CACHE, _INDEX = 24, 17  # decode: one query at slot 17 of a 24-slot cache, row 1 left-padded
_DECODE = ((jnp.arange(_CACHE) <= _INDEX)[None] & (_valid([24, 20], _CACHE, left=(1,)) != 0))[
    :, None, None
]
_WINDOW = 5
VARIANTS = {
    "causal": (_T, _T, 4, 4, A.causal_mask(_T), False, True),
    "causal_padding": (_T, _T, 4, 4, A.causal_mask(_T) & A.padding_mask(_PAD, _PAD), False, True),
    "packed": (_T, _T, 4, 4, A.causal_mask(_T) & A.segment_mask(_PACKED, _PACKED), False, True),
    "gqa": (_T, _T, 8, 2, A.causal_mask(_T) & A.padding_mask(_PAD, _PAD), False, True),
    "mqa": (_T, _T, 8, 1, A.causal_mask(_T), False, True),
    "sliding_window": (
        24,
        24,
        4,
        2,
        A.causal_mask(24) & (_relative(24, 24) > -_WINDOW),
        False,
        True,
    ),
    "t5_bias": (_T, _T, 4, 4, None, True, False),
    "t5_bias_padding": (_T, _T, 4, 4, A.segment_mask(_PAD, _PAD), True, False),
    "decode": (1, _CACHE, 4, 2, _DECODE, False, False),
    "cross": (12, 20, 4, 4, A.padding_mask(None, _valid([20, 14], 20)), False, False),
    "prefix_tree": (_T, _T, 4, 4, A.prefix_tree_mask(_TREE), False, True),
}
IMPLS = [
    "xla",
    pytest.param("cudnn", marks=pytest.mark.skipif(not HAS_CUDNN, reason="cuDNN needs a CUDA GPU")),
]


def _inputs(variant, dtype, seed=0):
    t, s, h, kv, mask, has_bias, _ = VARIANTS[variant]
    kq, kk, kv_, kb = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(kq, (B, t, h, D)).astype(dtype)
    k = jax.random.normal(kk, (B, s, kv, D)).astype(dtype)
    v = jax.random.normal(kv_, (B, s, kv, D)).astype(dtype)
    bias = jax.random.normal(kb, (1, h, t, s)) if has_bias else None  # a float32 param, as in T5
    return q, k, v, mask, bias


def _live(mask, t):
    """[b or 1, t, 1, 1]: query rows with at least one key to attend to."""
    if mask is None:
        return jnp.ones((1, t, 1, 1), bool)
    return jnp.broadcast_to(mask, mask.shape[:2] + (t, mask.shape[-1])).any(-1)[:, 0, :, None, None]


def _run(impl, q, k, v, mask, bias, causal, live, differentiate=True):
    """Outputs and gradients (q, k, v, bias) of sum(out * fixed cotangent), in one compilation.

    -> (out, grads) of `impl` and of the reference, both over the rows where `live`, and
    `impl`'s grads over all rows (to see that fully masked rows keep them finite); the
    grads are () without `differentiate`.
    """
    cotangent = jax.random.normal(jax.random.PRNGKey(9), q.shape)

    def out_and_grads(name, rows):
        def loss(q, k, v, bias):
            out = A.attend(q, k, v, mask, bias=bias, causal=causal, implementation=name)
            return jnp.sum(jnp.where(rows, out.astype(jnp.float32) * cotangent, 0.0)), out

        if not differentiate:
            return loss(q, k, v, bias)[1], ()
        (_, out), grads = jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True)(q, k, v, bias)
        return out, grads[: 3 if bias is None else 4]

    @jax.jit
    def run():
        return (
            out_and_grads(impl, live),
            out_and_grads("reference", live),
            out_and_grads(impl, jnp.ones_like(live))[1],
        )

    # float32 parity means float32 matmuls: no TF32 on GPUs, whose rounding is not the subject.
    with jax.default_matmul_precision("highest" if q.dtype == jnp.float32 else None):
        return run()


def _errors(out, grads, ref_out, ref_grads, live, relative):
    """{'out', 'dq', 'dk', 'dv'[, 'db']: max |x - reference|}, divided by max |reference| if relative."""
    pairs = {"out": (jnp.where(live, out, 0), jnp.where(live, ref_out, 0))}
    pairs.update({f"d{n}": pair for n, *pair in zip("qkvb", grads, ref_grads, strict=False)})
    errors = {}
    for name, (x, ref) in pairs.items():
        x, ref = np.asarray(x, np.float32), np.asarray(ref, np.float32)
        errors[name] = np.abs(x - ref).max() / (np.abs(ref).max() if relative else 1.0)
    return errors


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_parity_with_reference(variant, impl, dtype):
    if impl == "cudnn" and dtype == jnp.float32:
        pytest.skip("cuDNN takes bf16/fp16 inputs only")
    t, s, _, _, mask, _, causal = VARIANTS[variant]
    # cuDNN's backward pass with a bias (the folded mask) needs even lengths; decoding has none.
    differentiate = impl != "cudnn" or not (t % 2 or s % 2)
    q, k, v, mask, bias = _inputs(variant, dtype)
    live = _live(mask, t)
    (out, grads), (ref_out, ref_grads), all_row_grads = _run(
        impl, q, k, v, mask, bias, causal, live, differentiate
    )

    for x in (out, *grads, *all_row_grads):  # fully masked rows included
        assert np.isfinite(np.asarray(x, np.float32)).all()
    out_tol, grad_tol = TOL[dtype]
    errors = _errors(out, grads, ref_out, ref_grads, live, relative=dtype != jnp.float32)
    for name, error in errors.items():
        assert error <= (out_tol if name == "out" else grad_tol), (name, errors)


@pytest.mark.parametrize("impl", ["reference", *IMPLS])
@pytest.mark.parametrize("variant", ["causal", "sliding_window", "packed", "prefix_tree"])
def test_no_attention_to_future_tokens(variant, impl):
    """Output i must not move when keys/values after i change (a kernel ignoring the mask fails).

    Rows with no key at all (padding) are left out: their output is implementation-defined.
    """
    t, _, _, _, mask, _, causal = VARIANTS[variant]
    dtype = jnp.bfloat16 if impl == "cudnn" else jnp.float32
    q, k, v, mask, bias = _inputs(variant, dtype)
    fn = jax.jit(
        lambda k, v: A.attend(q, k, v, mask, bias=bias, causal=causal, implementation=impl)
    )
    live = np.asarray(_live(mask, t))
    base = np.where(live, np.asarray(fn(k, v), np.float32), 0)
    for i in range(t - 1):
        future = (jnp.arange(t) > i)[None, :, None, None]
        moved = np.where(
            live,
            np.asarray(fn(jnp.where(future, k + 10, k), jnp.where(future, v + 10, v)), np.float32),
            0,
        )
        np.testing.assert_array_equal(moved[:, : i + 1], base[:, : i + 1], err_msg=f"position {i}")
        assert not np.allclose(moved[:, i + 1 :], base[:, i + 1 :])  # the perturbation is visible


def test_resolve_implementation():
    f32, bf16 = jnp.float32, jnp.bfloat16
    assert A.resolve_implementation("auto", f32, 16) == "xla"  # this machine's backend
    assert A.resolve_implementation("auto", bf16, 64, "cpu") == "xla"
    assert A.resolve_implementation("auto", bf16, 64, "gpu") == "cudnn"
    assert A.resolve_implementation("auto", jnp.float16, 128, "gpu", lengths=(16, 32)) == "cudnn"
    assert A.resolve_implementation("auto", f32, 64, "gpu") == "xla"
    assert A.resolve_implementation("auto", bf16, 256, "gpu") == "xla"
    assert A.resolve_implementation("auto", bf16, 60, "gpu") == "xla"
    assert A.resolve_implementation("auto", bf16, 64, "gpu", lengths=(1, 32)) == "xla"
    assert A.resolve_implementation("auto", bf16, 64, "rocm") == "xla"
    assert A.resolve_implementation("reference", bf16, 64, "gpu") == "reference"
    assert A.resolve_implementation("xla", bf16, 64, "gpu") == "xla"
    assert A.resolve_implementation("cudnn", bf16, 64, "gpu") == "cudnn"
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        A.resolve_implementation("cudnn", f32, 64, "gpu")
    with pytest.raises(ValueError, match="CUDA GPU"):
        A.resolve_implementation("cudnn", bf16, 64, "cpu")


def _module(**kw):
    return A.Attention(num_heads=8, num_kv_heads=2, head_dim=D, rotary=True, **kw)


def _module_inputs():
    x = jax.random.normal(jax.random.PRNGKey(1), (B, _T, 32))
    positions = jnp.broadcast_to(jnp.arange(_T), (B, _T))
    return x, A.causal_mask(_T) & A.padding_mask(_PAD, _PAD), positions


def test_module_implementations_agree_and_capture():
    x, mask, positions = _module_inputs()
    params = _module().init(jax.random.PRNGKey(0), x, mask, positions=positions)

    def apply(impl):
        return _module(implementation=impl, capture_attention=True).apply(
            params, x, mask, positions=positions, causal=True, mutable=["intermediates"]
        )

    (out, state), (ref_out, ref_state) = apply("xla"), apply("reference")
    live = _live(mask, _T)[..., 0]
    np.testing.assert_allclose(
        jnp.where(live, out, 0), jnp.where(live, ref_out, 0), atol=1e-5, rtol=0
    )
    (weights,) = state["intermediates"]["attention_weights"]
    (ref_weights,) = ref_state["intermediates"]["attention_weights"]
    assert weights.shape == (B, 8, _T, _T)
    np.testing.assert_allclose(weights, ref_weights, atol=1e-6, rtol=0)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)


def test_dropout_runs_the_reference_core():
    x, mask, positions = _module_inputs()
    params = _module().init(jax.random.PRNGKey(0), x, mask, positions=positions)

    def apply(impl, deterministic):
        return _module(implementation=impl, dropout=0.5).apply(
            params,
            x,
            mask,
            positions=positions,
            deterministic=deterministic,
            rngs={"dropout": jax.random.PRNGKey(3)},
        )

    dropped = apply("xla", False)
    assert np.isfinite(dropped).all()
    assert not np.allclose(dropped, apply("xla", True), atol=1e-3)
    np.testing.assert_array_equal(dropped, apply("reference", False))  # same rng, same path


def test_invalid_implementation_is_rejected():
    x, mask, positions = _module_inputs()
    with pytest.raises(
        ValueError,
        match=r"model\.attention_impl must be one of .*'auto', 'xla', 'cudnn', 'splash', 'reference'",
    ):
        _module(implementation="flash").init(jax.random.PRNGKey(0), x, mask, positions=positions)


# ---------------------------------------------------------------------------- splash
# The TPU kernel runs here in the Pallas interpreter: the same kernel code, its blockwise
# online softmax included, executed by XLA on the CPU. Measured, float32 against the
# reference core (gqa, packed segments, padding): outputs <= 1.4e-6 (|out| <= 3.3),
# gradients <= 4.4e-5 (|grad| <= 27: dq and dk sum 256 terms in another order); ~10x.
SPLASH_T, SPLASH_D = 256, 128
SPLASH_IDS = jnp.asarray(
    [[1] * 100 + [2] * 120 + [0] * 36, [1] * 256],  # packed documents, then padding
    jnp.int32,
)


def test_splash_matches_the_reference_core():
    rng = np.random.default_rng(0)
    shape = lambda heads: (B, SPLASH_T, heads, SPLASH_D)
    q, k, v = (jnp.asarray(rng.normal(size=shape(h)), jnp.float32) for h in (4, 2, 2))
    mask = A.causal_mask(SPLASH_T) & A.segment_mask(SPLASH_IDS, SPLASH_IDS)
    real = (SPLASH_IDS != 0)[:, :, None, None]  # padding queries: implementation-defined

    def loss(impl):
        def f(q, k, v):
            out = A.attend(q, k, v, mask, causal=True, implementation=impl, segment_ids=SPLASH_IDS)
            return (jnp.where(real, out, 0.0) ** 2).sum(), out

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, want), want_grads = loss("reference")
    (_, got), got_grads = loss("splash")
    np.testing.assert_allclose(jnp.where(real, got, 0), jnp.where(real, want, 0), atol=1.5e-5)
    for g, w in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w, atol=5e-4)


def test_splash_only_where_the_mask_is_causal_within_segments():
    segmented = dict(lengths=(256, 256), segmented=True)
    assert A.resolve_implementation("splash", jnp.float32, 32, **segmented) == "splash"
    assert A.resolve_implementation("splash", jnp.float32, 128, lengths=(256, 256)) == "xla"
    assert A.resolve_implementation("splash", jnp.float32, 128, lengths=(1, 256)) == "xla"
    odd = dict(lengths=(200, 200), segmented=True)
    assert A.resolve_implementation("splash", jnp.float32, 128, **odd) == "xla"
    assert A.resolve_implementation("auto", jnp.bfloat16, 128, "tpu", **segmented) == "splash"
    assert A.resolve_implementation("auto", jnp.bfloat16, 64, "tpu", **segmented) == "splash"
    assert A.resolve_implementation("auto", jnp.bfloat16, 32, "tpu", **segmented) == "xla"
    assert A.resolve_implementation("auto", jnp.bfloat16, 128, "tpu", lengths=(256, 256)) == "xla"
    assert A.resolve_implementation("auto", jnp.bfloat16, 128, "cpu", **segmented) == "xla"


# Segment rows as the pipeline packs them: contiguous documents, padding (0) after them or,
# for a left-padded prompt, before; one-token documents; a row that is one document.
SEGMENT_ROWS = jnp.asarray(
    [
        [1] * 5 + [2] * 6 + [3] * 3 + [0] * 2,
        [0] * 3 + [1] * 13,
        list(range(1, 17)),
        [1] * 16,
    ],
    jnp.int32,
)


def test_segment_offsets_describe_the_packed_mask():
    """cuDNN's packed layout (lengths and offsets, -1 past the last segment) holds exactly
    the dense mask the models build for packed rows: causal within each segment."""
    lengths, offsets = A.segment_offsets(SEGMENT_ROWS)
    assert lengths.shape == (4, 16) and offsets.shape == (4, 17)
    np.testing.assert_array_equal(lengths[0, :4], [5, 6, 3, -1])
    np.testing.assert_array_equal(offsets[0, :4], [0, 5, 11, -1])
    np.testing.assert_array_equal(lengths[1, :2], [13, -1])
    np.testing.assert_array_equal(offsets[1, :2], [3, -1])
    np.testing.assert_array_equal(lengths[2], np.ones(16))
    np.testing.assert_array_equal(offsets[2], list(range(16)) + [-1])
    np.testing.assert_array_equal(offsets[3, :2], [0, -1])
    dense = A.causal_mask(16) & A.segment_mask(SEGMENT_ROWS, SEGMENT_ROWS)
    np.testing.assert_array_equal(A.mask_from_offsets(lengths, offsets, 16), dense)


HAS_PACKED_CUDNN = HAS_CUDNN and A._cudnn_packs(jnp.zeros((1, 1, 4, D)), jnp.zeros((1, 1, 4, D)))


@pytest.mark.skipif(not HAS_PACKED_CUDNN, reason="cuDNN's packed layout needs a Hopper GPU")
def test_cudnn_packed_segments_match_the_reference_core():
    """Packed rows through cuDNN's offsets (no dense mask) against the reference core on the
    dense mask, outputs and gradients, on the rows of real tokens."""
    t = 16
    ids = SEGMENT_ROWS
    mask = A.causal_mask(t) & A.segment_mask(ids, ids)
    q, k, v = (
        jax.random.normal(key, (4, t, 4, D)).astype(jnp.bfloat16)
        for key in jax.random.split(jax.random.PRNGKey(0), 3)
    )
    real = (ids != 0)[:, :, None, None]

    def run(impl):
        def f(q, k, v):
            out = A.attend(q, k, v, mask, causal=True, implementation=impl, segment_ids=ids)
            return jnp.where(real, out.astype(jnp.float32), 0.0).sum(), out

        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    (_, got), got_grads = run("cudnn")
    (_, want), want_grads = run("reference")
    out_tol, grad_tol = TOL[jnp.bfloat16]
    errors = _errors(got, got_grads, want, want_grads, real, relative=True)
    for name, error in errors.items():
        assert error <= (out_tol if name == "out" else grad_tol), (name, errors)


def _fake_cuda(monkeypatch, packs: bool):
    """Trace (never run) jax's cuDNN attention on this CPU: its version and device checks
    answer as on a Hopper GPU, and `attend` resolves as on backend 'gpu'."""
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    monkeypatch.setattr(cudnn, "check_cudnn_version", lambda: 91000)
    monkeypatch.setattr(cudnn, "check_compute_capability", lambda capability: True)
    monkeypatch.setattr(cudnn, "is_cuda_compute_capability_equal", lambda capability: False)
    monkeypatch.setattr(A, "traced_backend", lambda: "gpu")
    monkeypatch.setattr(A, "_cudnn_packs", lambda q, k: packs)


@pytest.mark.parametrize("packs", [False, True], ids=["dense_mask", "packed_offsets"])
def test_default_remat_does_not_run_the_fused_attention_forward_again(monkeypatch, packs):
    """Under the default remat ('dots_saveable') the gradient of a scanned bf16 model runs
    cuDNN's forward kernel once per layer, as without remat: its output and log-sum-exp are
    saved by name (ATTENTION_RESIDUALS). With remat 'full' (nothing saved) it runs twice,
    the forward pass's and the backward pass's."""
    from lm.models import transformer as T

    _fake_cuda(monkeypatch, packs)
    tokens = jnp.ones((2, 16), jnp.int32)

    def forward_kernels(remat: str) -> int:
        config = T.preset("gpt2", **T.TINY, precision="bf16", attention_impl="cudnn", remat=remat)
        model = T.build_model(config)
        params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens))["params"]
        loss = lambda p: model.apply({"params": p}, tokens, segment_ids=jnp.ones_like(tokens)).sum()
        text = str(jax.make_jaxpr(jax.grad(loss))(params))
        assert text.count("dot_product_attention_bwd_wrapper[") == 1  # the one scanned layer
        return text.count("dot_product_attention_fwd_wrapper[")

    assert T.ModelConfig().remat == "dots_saveable"
    assert forward_kernels("dots_saveable") == forward_kernels("none") == 1
    assert forward_kernels("full") == 2
