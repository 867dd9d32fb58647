"""The JAX adapters (jax_dpa, flax_mha) against the oracle, their limits, gradients and x64 scoping.

Compilation dominates the cost here, so built layers are cached per (adapter, dtype, spec, widths)
for the module: calls that differ only in the mask's values reuse one compiled function.

Two JAX behaviours shape the bounds below (both asserted as such in their own tests):
* jax.nn.dot_product_attention runs its softmax in float32 even for float64 inputs, so a float64
  output is only float32-accurate. Everything else is float64: with a mask that leaves one key per
  row the softmax is exact, and there the layers agree with the oracle to 1e-12.
* a fully masked row gets uniform weights (a large finite negative fill), not the canonical zeros.
"""
from __future__ import annotations

import numpy as np
import pytest

from mhabench import impls
from mhabench.impls import _jax, oracle
from tests.feature_cases import CASES, FULLY_MASKED
from tests.test_validation import BAD_CALLS, SPEC as BAD_SPEC, W as BAD_W

jax = pytest.importorskip("jax")
pytest.importorskip("flax.nnx")
import jax.numpy as jnp  # noqa: E402

ADAPTERS = ["jax_dpa", "flax_mha"]
F32 = 2e-6                # float32: about ten times the worst error seen
SOFTMAX_IN_F32 = 1e-6     # float64 through a float32 softmax (see module docstring)
EXACT = 1e-12             # float64 where the softmax is exact
BY_ID = {c.id: c for c in CASES}
# Together these cover cross attention (T != S), a separate key of another width, 2, 3 and 8 heads,
# key_dim != value_dim, tuple outputs, no bias, attention_axes (2, 3) on 5-D inputs with batch axes,
# every mask shape ([B,T,S], [T,S], [B,1,S], [B,H,T,S]) and causal with T < S and T > S. flax_mha runs
# the cases it can express (its limits are tested apart).
ORACLE_CASES = {
    "jax_dpa": ["kv_widths", "value_dim", "heads8", "mask_BTS", "mask_TS", "mask_padding", "mask_per_head",
                "causal_cross_T4_S7", "causal_cross_T6_S3", "axes_23_5d_mask_causal", "everything"],
    "flax_mha": ["key_distinct", "output_tuple", "no_bias", "mask_BTS", "mask_TS", "mask_padding",
                 "mask_per_head", "causal_cross_T4_S7", "axes_23_5d_mask_causal"],
}
F32_CASES = {"jax_dpa": ["mask_per_head", "everything"], "flax_mha": ["mask_per_head", "output_tuple"]}
ORACLE_PARAMS = ([(n, c, "float64") for n, cases in ORACLE_CASES.items() for c in cases]
                 + [(n, c, "float32") for n, cases in F32_CASES.items() for c in cases])


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.fixture(scope="module")
def layer_for():
    """build(name, case, dtype) with a cache: one compiled layer per adapter, dtype, spec and widths."""
    cache = {}

    def build(name, case, dtype="float64", seed=11):
        w, q, v, k, mask = case.build(seed=seed)
        key = (name, dtype, case.spec, q.shape[-1], v.shape[-1], None if k is None else k.shape[-1], seed)
        if key not in cache:
            cache[key] = impls.get_adapter(name).build(case.spec, w, dtype=dtype, mode="compiled")
        return cache[key], (w, q, v, k, mask)
    return build


def one_key_per_row(lead, T, S, rng):
    """A boolean [*lead, T, S] mask allowing exactly one key per query row: the softmax is then exact."""
    pick = rng.integers(0, S, size=(*lead, T))
    return np.arange(S) == pick[..., None]


# ---- against the oracle ------------------------------------------------------------------------
@pytest.mark.parametrize("name, case_id, dtype", ORACLE_PARAMS, ids=["-".join(p) for p in ORACLE_PARAMS])
def test_matches_oracle(layer_for, name, case_id, dtype):
    case = BY_ID[case_id]
    layer, (w, q, v, k, mask) = layer_for(name, case, dtype)
    golden, golden_scores = oracle.forward(case.spec, w, q, v, k, mask, case.causal)
    out, _ = layer(q, v, k, mask, case.causal, return_scores=False)
    assert out.dtype == np.dtype(dtype) and out.shape == golden.shape
    assert rel_err(out, golden) < (F32 if dtype == "float32" else SOFTMAX_IN_F32)
    if name == "jax_dpa":  # the function exposes no weights
        with pytest.raises(ValueError, match="returns the output only"):
            layer(q, v, k, mask, case.causal, return_scores=True)
        return
    out, scores = layer(q, v, k, mask, case.causal, return_scores=True)
    assert scores.shape == golden_scores.shape
    # the call that sows the weights takes nnx's explicit softmax, float64 included: output and weights exact
    assert rel_err(scores, golden_scores) < (F32 if dtype == "float32" else EXACT)
    assert rel_err(out, golden) < (F32 if dtype == "float32" else EXACT)


@pytest.mark.parametrize("name", ADAPTERS)
def test_float64_is_exact_where_the_softmax_is(layer_for, name):
    """Projections, flattening of attention_axes (2, 3), batch axes and the output projection, to 1e-12."""
    case = BY_ID["axes_23_5d_mask_causal"]
    layer, (w, q, v, k, mask) = layer_for(name, case)
    # query [2, 2, 2, 3, 8] and value [2, 2, 3, 2, 8] attend over axes (2, 3): mask [B, 2, 2, 3, 3, 2]
    mask = one_key_per_row((2, 2), 6, 6, np.random.default_rng(0)).reshape(mask.shape)
    golden, golden_scores = oracle.forward(case.spec, w, q, v, k, mask)
    out, _ = layer(q, v, k, mask, return_scores=False)
    assert rel_err(out, golden) < EXACT
    if name == "flax_mha":
        assert rel_err(layer(q, v, k, mask, return_scores=True)[1], golden_scores) < EXACT


def test_jax_dpa_float64_softmax_runs_in_float32(layer_for):
    """jax.nn.dot_product_attention casts the logits to float32 for the softmax, float64 included
    (jax/_src/nn/functions.py, _dot_product_attention_core). If this starts failing, JAX changed:
    tighten SOFTMAX_IN_F32 and update the divergence catalogue."""
    case = BY_ID["mask_BTS"]
    layer, (w, q, v, k, mask) = layer_for("jax_dpa", case)
    golden, _ = oracle.forward(case.spec, w, q, v, k, mask)
    out, _ = layer(q, v, k, mask, return_scores=False)
    assert 1e-12 < rel_err(out, golden) < SOFTMAX_IN_F32


@pytest.mark.parametrize("name", ADAPTERS)
def test_fully_masked_row_gets_uniform_weights(layer_for, name):
    """Both fill masked logits with a large finite negative: an empty row averages every value
    (the oracle's "uniform" policy), where the canonical semantics give zeros (output = bo)."""
    case = FULLY_MASKED
    layer, (w, q, v, k, mask) = layer_for(name, case)
    out, _ = layer(q, v, k, mask, return_scores=False)
    uniform, uniform_scores = oracle.forward(case.spec, w, q, v, k, mask, fully_masked="uniform")
    golden, _ = oracle.forward(case.spec, w, q, v, k, mask)
    assert rel_err(out, uniform) < SOFTMAX_IN_F32
    if name == "flax_mha":  # the weights it sows
        scores = layer(q, v, k, mask, return_scores=True)[1]
        assert np.allclose(scores[0, :, 1], 1.0 / mask.shape[-1], rtol=0, atol=1e-7)
        assert rel_err(scores, uniform_scores) < SOFTMAX_IN_F32
    assert rel_err(out[0, 1], golden[0, 1]) > 1e-2                        # not the canonical zeros
    assert rel_err(np.delete(out, 1, axis=1), np.delete(golden, 1, axis=1)) < SOFTMAX_IN_F32


# ---- what each adapter declares ----------------------------------------------------------------
def test_flax_declares_what_nnx_cannot_express():
    adapter = impls.get_adapter("flax_mha")
    spec = impls.AttentionSpec(num_heads=2, key_dim=4, value_dim=3)
    w = impls.Weights.random(spec, 8, 8)
    assert "one head_dim" in adapter.unsupported_reason(spec, w)
    with pytest.raises(impls.UnsupportedError, match="value_dim"):
        adapter.build(spec, w)
    spec = impls.AttentionSpec(num_heads=2, key_dim=4)
    assert "in_kv_features" in adapter.unsupported_reason(spec, impls.Weights.random(spec, 8, 6, key_dim=5))
    # what nnx can: key_dim * H != width, a distinct (equal-width) key/value width, tuple outputs
    spec = impls.AttentionSpec(num_heads=3, key_dim=5, output_shape=(2, 3))
    assert adapter.unsupported_reason(spec, impls.Weights.random(spec, 8, 6), return_scores=True) is None


@pytest.mark.parametrize("name", ADAPTERS)
def test_float16_compiled_on_cpu_is_declared(name):
    spec = impls.AttentionSpec(num_heads=2, key_dim=2)
    w = impls.Weights.random(spec, 4, 4, seed=0)
    adapter = impls.get_adapter(name)
    assert "F16_F16_F32" in adapter.unsupported_reason(spec, w, dtype="float16", mode="compiled")
    with pytest.raises(impls.UnsupportedError, match="mode='eager'"):
        adapter.build(spec, w, dtype="float16", mode="compiled")


@pytest.mark.parametrize("name, dtype, mode", [("jax_dpa", "float16", "eager"), ("flax_mha", "bfloat16", "compiled")])
def test_low_precision_runs_and_is_close(name, dtype, mode):
    """float16 runs eagerly (outside jit, jax.nn.dot_product_attention falls back to the default dot
    precision; flax_mha calls the same function); bfloat16 compiles."""
    case = BY_ID["self"]
    w, q, v, k, mask = case.build()
    golden, _ = oracle.forward(case.spec, w, q, v)
    ref, _ = oracle.forward(case.spec, w, q, v, dtype=dtype)
    out, _ = impls.get_adapter(name).build(case.spec, w, dtype=dtype, mode=mode)(q, v, return_scores=False)
    assert out.dtype.name == dtype
    # the same scale of error as a same-precision computation (the harness does this properly)
    assert rel_err(out, golden) < 20 * max(rel_err(ref, golden), 1e-3)


def test_jax_dpa_implementation_option():
    spec = impls.AttentionSpec(num_heads=1, key_dim=2)
    w = impls.Weights.random(spec, 2, 2)
    adapter = impls.get_adapter("jax_dpa")
    with pytest.raises(ValueError, match="implementation must be one of"):
        adapter.build(spec, w, implementation="flash")
    with pytest.raises(ValueError, match="needs device='cuda' and dtype float16 or bfloat16"):
        adapter.build(spec, w, implementation="cudnn")
    assert adapter.build(spec, w, implementation="xla").implementation == "xla"
    assert "dropout" in adapter.unsupported_reason(impls.AttentionSpec(1, 2, dropout=0.1), w, training=True)


@pytest.mark.parametrize("name", ADAPTERS)
def test_cuda_is_a_clear_error_without_a_gpu(name):
    if "cuda" in impls.get_adapter(name).available_devices():
        pytest.skip("JAX sees a GPU here")
    spec = impls.AttentionSpec(num_heads=1, key_dim=2)
    with pytest.raises(ValueError, match="device='cuda'.*no such device"):
        impls.get_adapter(name).build(spec, impls.Weights.random(spec, 2, 2), device="cuda")


# ---- weights, bad input, modes -----------------------------------------------------------------
@pytest.mark.parametrize("name", ADAPTERS)
@pytest.mark.parametrize("use_bias", [True, False])
def test_weights_round_trip_exactly_in_float64(name, use_bias):
    spec = impls.AttentionSpec(num_heads=4, key_dim=3, output_shape=(2, 5), use_bias=use_bias)
    for dims in ((12, 12, None), (12, 7, 7 if name == "flax_mha" else 5)):
        w = impls.Weights.random(spec, *dims, seed=3)
        back = impls.get_adapter(name).build(spec, w, dtype="float64").export_weights()
        assert back == w and back.as_dict().keys() == w.as_dict().keys()


def test_flax_parameters_are_the_canonical_arrays():
    """nnx's DenseGeneral kernels use the canonical layout: query kernel [D, H, k], out kernel [H, k, *out]."""
    from flax import nnx
    spec = impls.AttentionSpec(num_heads=3, key_dim=2, output_shape=(4, 5))
    w = impls.Weights.random(spec, 6, 7, seed=1)
    layer = impls.get_adapter("flax_mha").build(spec, w, dtype="float64")
    tree = nnx.to_pure_dict(layer.params)
    np.testing.assert_array_equal(np.asarray(tree["query"]["kernel"]), w.Wq)
    np.testing.assert_array_equal(np.asarray(tree["key"]["bias"]), w.bk)
    np.testing.assert_array_equal(np.asarray(tree["out"]["kernel"]), w.Wo)
    assert np.asarray(tree["out"]["bias"]).shape == (4, 5)


@pytest.fixture(scope="module")
def bad_input_layers():
    reference = "torch_sdpa" if impls.get_adapter("torch_sdpa").is_available() else "numpy_oracle"
    return {name: impls.get_adapter(name).build(BAD_SPEC, BAD_W, dtype="float32") for name in [reference, *ADAPTERS]}


@pytest.mark.parametrize("bad", BAD_CALLS, ids=lambda b: b[0])
@pytest.mark.parametrize("name", ADAPTERS)
def test_bad_input_gives_the_same_message_as_torch_sdpa(bad_input_layers, name, bad):
    _, kwargs, exc, pattern = bad
    reference = next(iter(bad_input_layers.values()))
    with pytest.raises(exc) as from_reference:
        reference(**kwargs)
    with pytest.raises(exc, match=pattern) as from_adapter:
        bad_input_layers[name](**kwargs)
    assert str(from_adapter.value) == str(from_reference.value)


def test_flax_eager_and_compiled_agree(layer_for):
    """flax_mha's eager mode calls the merged module outside jit (jax_dpa's eager path runs in float16 above)."""
    case = BY_ID["mask_per_head"]
    compiled, (w, q, v, k, mask) = layer_for("flax_mha", case, "float32")
    eager = impls.get_adapter("flax_mha").build(case.spec, w, dtype="float32", mode="eager")
    a, a_scores = compiled(q, v, k, mask, return_scores=True)
    b, b_scores = eager(q, v, k, mask, return_scores=True)
    assert rel_err(b, a) < F32 and rel_err(b_scores, a_scores) < F32


def test_flax_dropout_only_when_training():
    spec = impls.AttentionSpec(num_heads=2, key_dim=4, dropout=0.5)
    w = impls.Weights.random(spec, 8, 8)
    x = np.random.default_rng(0).normal(size=(2, 16, 8))
    layer = impls.get_adapter("flax_mha").build(spec, w, dtype="float64", mode="compiled")
    golden, _ = oracle.forward(spec, w, x, x)
    # dropout_rate > 0 moves nnx to its float64 weights path, even in inference
    assert rel_err(layer(x, x, return_scores=False)[0], golden) < EXACT
    a = layer(x, x, return_scores=False, training=True, seed=1)[0]
    b = layer(x, x, return_scores=False, training=True, seed=1)[0]
    c = layer(x, x, return_scores=False, training=True, seed=2)[0]
    np.testing.assert_array_equal(a, b)
    assert rel_err(a, golden) > 1e-3 and rel_err(a, c) > 1e-3


# ---- gradients ---------------------------------------------------------------------------------
# no key (value serves both) with per-head masks; a separate key (of another width, for jax_dpa)
GRAD_CASES = [("jax_dpa", "mask_per_head"), ("jax_dpa", "everything"), ("flax_mha", "key_distinct")]


@pytest.mark.parametrize("name, case_id", GRAD_CASES, ids=["-".join(p) for p in GRAD_CASES])
def test_gradients_match_torch_and_the_analytic_backward(layer_for, name, case_id):
    case = BY_ID[case_id]
    layer, (w, q, v, k, mask) = layer_for(name, case)
    call = oracle.prepare(case.spec, w, q, v, k, mask, case.causal)
    cotangent = np.random.default_rng(5).normal(size=call.output_shape)
    inputs = dict(query=q, value=v, key=k, mask=mask, causal=case.causal)
    got = layer.gradients(cotangent=cotangent, **inputs)
    assert ("key" in got) == (k is not None) and got["value"].shape == v.shape
    references = []
    try:
        from mhabench.impls.oracle_backward import backward
        references.append(("oracle_backward", backward(case.spec, w, cotangent=cotangent, **inputs)))
    except ImportError:
        pass
    if impls.get_adapter("torch_sdpa").is_available():
        torch_layer = impls.get_adapter("torch_sdpa").build(case.spec, w, dtype="float64")
        references.append(("torch_sdpa", torch_layer.gradients(cotangent=cotangent, **inputs)))
    if not references:
        pytest.skip("neither impls.oracle_backward nor torch is available")
    for ref_name, want in references:
        assert set(got) == set(want), ref_name
        scale = max(np.max(np.abs(g)) for g in want.values())
        for grad_name, g in want.items():
            # bk's gradient is zero analytically (a shift shared by a softmax row); through JAX's
            # float32 softmax it is ~1e-8 of the others, so judge it against the overall scale
            zero = np.max(np.abs(g)) < 1e-10 * scale
            err = np.max(np.abs(got[grad_name] - g)) / (scale if zero else np.max(np.abs(g)))
            assert err < SOFTMAX_IN_F32, f"{name} vs {ref_name}: d{grad_name} off by {err:.2e}"


# ---- benchmark path and x64 scoping ------------------------------------------------------------
@pytest.mark.parametrize("name", ADAPTERS)
def test_native_path(layer_for, name):
    case = BY_ID["mask_per_head"]
    layer, (w, q, v, k, mask) = layer_for(name, case, "float32")
    inputs = layer.native_inputs(q, v, k, mask, requires_grad=True)
    out = layer.native_forward(inputs)
    assert isinstance(out, jax.Array) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), layer(q, v, k, mask, return_scores=False)[0], rtol=1e-6, atol=1e-7)
    grads = layer.native_forward_backward(inputs)
    assert grads["query"].shape == q.shape and grads["Wq"].shape == w.Wq.shape and ("key" in grads) == (k is not None)


def test_x64_does_not_leak(layer_for):
    """float64 layers switch x64 on only inside their own calls: other JAX code keeps its default."""
    default, flag = jnp.ones(3).dtype, jax.config.jax_enable_x64
    case = BY_ID["mask_BTS"]
    for name in ADAPTERS:
        layer, (w, q, v, k, mask) = layer_for(name, case, "float64")
        assert layer(q, v, k, mask, return_scores=False)[0].dtype == np.float64
        assert layer.export_weights() == w
        assert jnp.ones(3).dtype == default
    with pytest.raises(RuntimeError):  # an error inside the scope restores the setting too
        with _jax.precision_scope("float64"):
            assert jnp.ones(3).dtype == jnp.float64
            raise RuntimeError("inside")
    assert jnp.ones(3).dtype == default and jax.config.jax_enable_x64 == flag
    if not flag:
        assert default == jnp.float32


# ---- modern attention: every mapping against the oracle, and where JAX differs, against its model ----------------
from mhabench.conformance.cases import Inputs  # noqa: E402
from mhabench.conformance.framework_models import jax_filled_attention  # noqa: E402
from tests.feature_cases import MODERN_CASES  # noqa: E402

MODERN_BY_ID = {c.id: c for c in MODERN_CASES}
# Each feature alone and with the classic ones: GQA (with a per-head mask, causal, value_dim), bottom-right causal
# (T < S, multi-axis, with a window), windows (cross, unbounded left with causal, multi-axis with a mask), the bias
# (per head with a mask, per key with causal, on a free axis), lengths (key/value, on a free axis), and rows that
# JAX treats its own way (no allowed key, an all -inf bias row, query lengths, S = 0).
JAX_MODERN = {
    "jax_dpa": ["gqa_cross_causal_mask_value_dim", "mqa_per_head_mask", "bottom_right_T4_S7", "bottom_right_axes_23_5d",
                "window_2_1_cross", "window_unbounded_left_causal", "window_bottom_right_decode",
                "window_mask_axes_23_5d", "bias_BHTS_mask", "bias_B1S_causal", "bias_axes_2_4d", "kv_lengths",
                "lengths_free_axis", "bottom_right_T6_S3", "bias_neg_inf_row", "query_lengths", "lengths_zero",
                "modern_everything", "key_value_length_0_everything", "offset_decode_T1_S7",
                "offset_speculative_T3_S8_cache", "offset_int_window", "offset_negative_rows_see_nothing",
                "offset_causal_window_mask", "scale"],
    # flax_mha has no bias argument (its limits are tested apart)
    "flax_mha": ["gqa_2of4", "gqa_no_bias_axes_1_4d", "mqa_per_head_mask",
                 "bottom_right_T4_S7", "bottom_right_T6_S3", "window_1_0_self", "window_unbounded_left_causal",
                 "window_mask_axes_23_5d", "kv_lengths", "query_lengths", "lengths_axes_23_5d", "offset_decode_T1_S7",
                 "offset_int_window", "offset_axes_23_5d"],
}
MODERN_PARAMS = [(n, c, d) for n, ids in JAX_MODERN.items() for c in ids for d in ("float64", "float32")]


def _modern_call(case, seed=11):
    w, q, v, k, mask = case.build(seed=seed)
    kwargs = case.feature_kwargs(seed)
    call = oracle.prepare(case.spec, w, q, v, k, mask, case.causal, **kwargs)
    cotangent = np.random.default_rng([seed, 5]).normal(size=call.output_shape)
    return w, q, v, k, mask, kwargs, call, cotangent


def _expected(name, case, seed=11):
    """What the adapter should give: the oracle; where rows have no allowed key, JAX's own behaviour (jax_dpa: the
    model of its XLA path the catalogue uses; flax_mha: uniform weights, its mask's finite fill)."""
    w, q, v, k, mask, kwargs, call, cotangent = _modern_call(case, seed)
    empty = call.flat_allowed() is not None and not np.all(np.any(call.flat_allowed(), axis=-1))
    if name == "jax_dpa" and empty:
        model = jax_filled_attention(Inputs(case.spec, w, q, v, k, mask, case.causal, cotangent, **kwargs))
        return model["output"], model["scores"], {g[len("grad_"):]: a for g, a in model.items() if g.startswith("grad_")}
    from mhabench.impls.oracle_backward import backward
    policy = "uniform" if empty else "zeros"
    out, scores = oracle.forward(case.spec, w, q, v, k, mask, case.causal, fully_masked=policy, **kwargs)
    return out, scores, backward(case.spec, w, q, v, k, mask, case.causal, cotangent, fully_masked=policy, **kwargs)


def _close(got, want, tol):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(want)), "NaN where the expectation has none, or the reverse"
    finite = ~np.isnan(want)
    if finite.any():
        scale = max(np.max(np.abs(want[finite])), 1e-30)
        assert np.max(np.abs(got[finite] - want[finite])) <= tol * max(scale, 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("name, case_id, dtype", MODERN_PARAMS, ids=["-".join(p) for p in MODERN_PARAMS])
def test_modern_features_forward_and_gradients(name, case_id, dtype):
    case = MODERN_BY_ID[case_id]
    w, q, v, k, mask, kwargs, call, cotangent = _modern_call(case)
    scores = name != "jax_dpa"  # jax.nn.dot_product_attention returns no weights
    assert impls.get_adapter(name).unsupported_reason(case.spec, w, dtype=dtype, call=call, return_scores=scores,
                                                      gradients=True) is None
    layer = impls.get_adapter(name).build(case.spec, w, dtype=dtype, mode="compiled")
    want_out, want_scores, want_grads = _expected(name, case)
    found = layer.evaluate(q, v, k, mask, case.causal, cotangent=cotangent, scores=scores, **kwargs)
    tol = F32 * 10 if dtype == "float32" else SOFTMAX_IN_F32
    _close(found["output"], want_out, tol)
    if scores:
        _close(found["output_with_scores"], want_out, tol)
        _close(found["scores"], want_scores, tol)
    assert set(found["gradients"]) == set(want_grads)
    for grad_name, g in want_grads.items():
        _close(found["gradients"][grad_name], g, 50 * tol)
    # the default call outside evaluate's one program: the same
    _close(layer(q, v, k, mask, case.causal, return_scores=False, **kwargs)[0], want_out, tol)


def test_jax_dpa_takes_a_decode_step_as_cache_lengths_and_masks_only_what_it_cannot_say():
    """One query per sequence at its own position: key_value_seq_lengths = offset + 1, is_causal off, no mask, nothing
    emulated; three speculative queries per sequence: the diagonals go into the mask (emulated); scale= passed."""
    seen = []
    real = jax.nn.dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append(kwargs)
        return real(q, k, v, **kwargs)

    def run(case_id):
        case = MODERN_BY_ID[case_id]
        w, q, v, k, mask, kwargs, call, _ = _modern_call(case)
        layer = impls.get_adapter("jax_dpa").build(case.spec, w, dtype="float64", mode="eager")
        seen.clear()
        jax.nn.dot_product_attention = spy
        try:
            out, _ = layer(q, v, k, mask, case.causal, return_scores=False, **kwargs)
        finally:
            jax.nn.dot_product_attention = real
        _close(out, oracle.forward(case.spec, w, q, v, k, mask, case.causal, **kwargs)[0], SOFTMAX_IN_F32)
        return seen[0], layer.emulations(call)

    kwargs, emulated = run("offset_decode_T1_S7")  # offsets (0, 3, 6)
    assert list(np.asarray(kwargs["key_value_seq_lengths"])) == [1, 4, 7] and not kwargs["is_causal"]
    assert kwargs["mask"] is None and emulated == ()
    kwargs, emulated = run("offset_speculative_T3_S8_cache")
    assert kwargs["mask"] is not None and not kwargs["is_causal"] and emulated == ("query_offset",)
    kwargs, emulated = run("scale")
    assert kwargs["scale"] == 0.9 and emulated == ()


def test_jax_dpa_gets_the_functions_own_arguments():
    """GQA as fewer K/V heads, the bias, the lengths, local_window_size (bottom-right causal as its band) and
    is_causal reach jax.nn.dot_product_attention itself; nothing is emulated."""
    seen = []
    real = jax.nn.dot_product_attention

    def spy(q, k, v, **kwargs):
        seen.append((q.shape, k.shape, kwargs))
        return real(q, k, v, **kwargs)

    case = MODERN_BY_ID["modern_everything"]
    w, q, v, k, mask, kwargs, call, _ = _modern_call(case)
    layer = impls.get_adapter("jax_dpa").build(case.spec, w, dtype="float32", mode="eager")
    jax.nn.dot_product_attention = spy
    try:
        layer(q, v, k, mask, case.causal, return_scores=False, **kwargs)
    finally:
        jax.nn.dot_product_attention = real
    q_shape, k_shape, args = seen[0]
    assert q_shape[2] == 4 and k_shape[2] == 2  # [N, L, heads, width]: 4 query heads read 2 kv heads
    T, S = call.q_len, call.k_len
    assert args["local_window_size"] == (3 - (S - T), S - T) and args["is_causal"] is False
    assert args["bias"] is not None and args["query_seq_lengths"] is not None
    assert args["key_value_seq_lengths"] is not None and layer.emulations(call) == ()


def _model_and_canonical(case_id):
    case = MODERN_BY_ID[case_id]
    w, q, v, k, mask, kwargs, call, cotangent = _modern_call(case)
    model = jax_filled_attention(Inputs(case.spec, w, q, v, k, mask, case.causal, cotangent, **kwargs))
    out, scores = oracle.forward(case.spec, w, q, v, k, mask, case.causal, **kwargs)
    return model, {"output": out, "scores": scores}


def test_the_jax_model_differs_from_the_canonical_rows_it_describes():
    """The catalogue's model of JAX is a real divergence where rows have no allowed key: uniform rows, NaN for an
    all -inf bias row; past the query lengths the output agrees and only the weights differ."""
    model, canonical = _model_and_canonical("bottom_right_T6_S3")
    assert not np.allclose(model["output"], canonical["output"])
    model, canonical = _model_and_canonical("bias_neg_inf_row")
    assert np.isnan(model["output"]).any() and not np.isnan(canonical["output"]).any()
    model, canonical = _model_and_canonical("query_lengths")
    np.testing.assert_allclose(model["output"], canonical["output"], atol=1e-12)
    assert not np.allclose(model["scores"], canonical["scores"])


def test_flax_refuses_the_bias_with_its_reason():
    case = MODERN_BY_ID["bias_TS"]
    w, q, v, k, mask, kwargs, call, _ = _modern_call(case)
    reason = impls.get_adapter("flax_mha").unsupported_reason(case.spec, w, call=call)
    assert reason.startswith("an additive float bias") and "never passes" in reason


def test_jax_kernel_variants():
    assert impls.get_adapter("jax_dpa+xla").kernel == "xla" and impls.get_adapter("jax_dpa").kernel == "default"
    spec = impls.AttentionSpec(num_heads=2, key_dim=4)
    w = impls.Weights.random(spec, 8, 8)
    layer = impls.get_adapter("jax_dpa+xla").build(spec, w, dtype="float32")
    assert layer.implementation == "xla"
    assert "NVIDIA GPUs only" in impls.get_adapter("jax_dpa+cudnn").unsupported_reason(spec, w, device="cpu")


@pytest.mark.parametrize("name", ADAPTERS)
def test_the_compiled_program_states_what_a_call_allocates(name):
    """XLA's buffer assignment (temp + output) is the per-call memory of a compiled program: it holds the
    [B, H, T, S] scores, grows as L² and does not depend on what earlier calls left resident; eager mode has
    no program to ask."""
    spec = impls.AttentionSpec(num_heads=2, key_dim=8)
    w = impls.Weights.random(spec, query_dim=16, value_dim=16, seed=0)
    found = {}
    for length in (32, 64):
        layer = impls.get_adapter(name).build(spec, w, dtype="float32", mode="compiled")
        q = np.random.default_rng(0).standard_normal((1, length, 16)).astype(np.float32)
        inputs = layer.native_inputs(q, q)
        found[length] = layer.native_program_bytes(inputs)
        assert found[length] >= 2 * length * length * 4  # the scores, at least
        assert layer.native_program_bytes(layer.native_inputs(q, q, requires_grad=True), backward=True) \
            > found[length]
        eager = impls.get_adapter(name).build(spec, w, dtype="float32", mode="eager")
        assert eager.native_program_bytes(eager.native_inputs(q, q)) is None
    assert 3 < found[64] / found[32] <= 4.2
