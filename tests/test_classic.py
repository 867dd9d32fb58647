"""The classic textbook layers: weight mappings, agreement with the oracle, and their documented differences."""
from __future__ import annotations

import numpy as np
import pytest

from mhabench import impls
from mhabench.impls import oracle

TOL = {"float64": 1e-12, "float32": 1e-5, "bfloat16": 5e-2}


def _adapter(name):
    adapter = impls.get_adapter(name)
    if not adapter.is_available():
        pytest.skip(adapter.availability()[1])
    return adapter


def _self_attention(spec, dim, seed=0, shape=(2, 5)):
    w = impls.Weights.random(spec, dim, dim, seed=seed)
    x = np.random.default_rng(seed).standard_normal(shape + (dim,))
    return w, x


def test_fused_qkv_is_interleaved_per_head():
    from mhabench.impls.classic.torch_textbook import canonical_to_fused, fused_to_canonical
    spec = impls.AttentionSpec(num_heads=2, key_dim=3)
    w = impls.Weights.random(spec, 5, 5, seed=1)
    fused = canonical_to_fused(w)["qkv_proj.weight"]  # [3 * H * hd, D]
    hd = 3
    for h in range(2):  # rows of head h: its q, then its k, then its v
        base = h * 3 * hd
        np.testing.assert_array_equal(fused[base:base + hd], w.Wq[:, h].T)
        np.testing.assert_array_equal(fused[base + hd:base + 2 * hd], w.Wk[:, h].T)
        np.testing.assert_array_equal(fused[base + 2 * hd:base + 3 * hd], w.Wv[:, h].T)
    back = fused_to_canonical(canonical_to_fused(w), 2, (5,))
    assert impls.Weights(**back).equals(w)


@pytest.mark.parametrize("name", ["classic_keras", "classic_torch"])
@pytest.mark.parametrize("dtype", ["float64", "float32", "bfloat16"])
def test_agrees_with_oracle_on_self_attention(name, dtype):
    adapter = _adapter(name)
    spec = impls.AttentionSpec(num_heads=3, key_dim=2, attention_axes=(1, 2))
    w, x = _self_attention(spec, 6, shape=(2, 3, 2))
    rng = np.random.default_rng(5)
    mask = rng.random((2, 3, 2, 3, 2)) < 0.7
    mask[..., 0, 0] = True  # no fully masked row here: that is a documented difference
    layer = adapter.build(spec, w, dtype=dtype)
    out, scores = layer(x, x, mask=mask, causal=dtype != "float16", return_scores=True)
    golden, golden_scores = oracle.forward(spec, w, x, x, mask=mask, causal=True)
    np.testing.assert_allclose(out.astype(np.float64), golden, atol=TOL[dtype] * 4, rtol=0)
    np.testing.assert_allclose(scores.astype(np.float64), golden_scores, atol=TOL[dtype], rtol=0)


@pytest.mark.parametrize("name", ["classic_keras", "classic_torch"])
def test_export_weights_round_trip_and_gradients(name):
    adapter = _adapter(name)
    spec = impls.AttentionSpec(num_heads=2, key_dim=4)
    w, x = _self_attention(spec, 8, seed=2)
    layer = adapter.build(spec, w, dtype="float64")
    assert layer.export_weights().equals(w)
    ct = np.random.default_rng(3).standard_normal((2, 5, 8))
    grads = layer.gradients(x, x, causal=True, cotangent=ct)
    expected = impls.get_adapter("torch_sdpa").build(spec, w, dtype="float64").gradients(x, x, causal=True,
                                                                                         cotangent=ct)
    assert set(grads) == set(expected)
    for key in expected:  # query and value separately, though the torch module sees one input
        np.testing.assert_allclose(grads[key], expected[key], atol=1e-10, err_msg=key)


def test_keras_cross_attention_and_key_widths():
    adapter = _adapter("classic_keras")
    spec = impls.AttentionSpec(num_heads=2, key_dim=3)
    w = impls.Weights.random(spec, 6, 4, 5, seed=4)
    rng = np.random.default_rng(0)
    q, v, k = rng.standard_normal((2, 4, 6)), rng.standard_normal((2, 7, 4)), rng.standard_normal((2, 7, 5))
    out, _ = adapter.build(spec, w, dtype="float64")(q, v, k)
    np.testing.assert_allclose(out, oracle.forward(spec, w, q, v, k)[0], atol=1e-12)


@pytest.mark.parametrize("name, spec_kwargs, why", [
    ("classic_keras", {"value_dim": 3}, "one depth"),
    ("classic_keras", {"output_shape": 5}, "d_model"),
    ("classic_keras", {"use_bias": False}, "use_bias"),
    ("classic_torch", {"value_dim": 3}, "three equal parts"),
])
def test_declared_unsupported_with_reason(name, spec_kwargs, why):
    spec = impls.AttentionSpec(num_heads=2, key_dim=4, **spec_kwargs)
    w = impls.Weights.random(spec, 8, 8, seed=0)
    reason = impls.get_adapter(name).unsupported_reason(spec, w)
    assert reason and why in reason


def test_torch_is_self_attention_only():
    adapter = _adapter("classic_torch")
    spec = impls.AttentionSpec(num_heads=2, key_dim=4)
    w, x = _self_attention(spec, 8)
    layer = adapter.build(spec, w, dtype="float64")
    with pytest.raises(impls.UnsupportedError, match="query = key = value"):
        layer(x, x + 1.0)
    with pytest.raises(impls.UnsupportedError, match="query = key = value"):
        layer(x, x, key=x)
    with pytest.raises(impls.UnsupportedError, match="c10::Half"):
        adapter.build(spec, w, dtype="float16")(x, x, causal=True)
    out, _ = adapter.build(spec, w, dtype="float16")(x, x)  # float16 without a mask runs
    np.testing.assert_allclose(out.astype(np.float64), oracle.forward(spec, w, x, x)[0], atol=1e-2)


@pytest.mark.parametrize("name", ["classic_keras", "classic_torch"])
def test_fully_masked_row_gets_uniform_weights_in_float32(name):
    adapter = _adapter(name)
    spec = impls.AttentionSpec(num_heads=2, key_dim=4)
    w, x = _self_attention(spec, 8)
    mask = np.ones((2, 5, 5), bool)
    mask[0, 1] = False
    out, scores = adapter.build(spec, w, dtype="float32")(x, x, mask=mask, return_scores=True)
    np.testing.assert_allclose(scores[0, :, 1], 1 / 5, atol=1e-6)
    uniform = oracle.forward(spec, w, x, x, mask=mask, fully_masked="uniform")[0]
    zeros = oracle.forward(spec, w, x, x, mask=mask)[0]
    np.testing.assert_allclose(out, uniform, atol=1e-5)
    assert np.abs(out[0, 1] - zeros[0, 1]).max() > 0.1  # canonically that row's output is the bias


def test_keras_fully_masked_row_in_float64_is_the_unmasked_softmax():
    """-1e9 + s keeps s to ~1e-7 in float64: the additive mask cancels out of a fully masked row."""
    adapter = _adapter("classic_keras")
    spec = impls.AttentionSpec(num_heads=2, key_dim=4)
    w, x = _self_attention(spec, 8)
    mask = np.ones((2, 5, 5), bool)
    mask[0, 1] = False
    _, scores = adapter.build(spec, w, dtype="float64")(x, x, mask=mask, return_scores=True)
    unmasked = oracle.forward(spec, w, x, x)[1]
    np.testing.assert_allclose(scores[0, :, 1], unmasked[0, :, 1], atol=1e-6)
    assert np.abs(scores[0, :, 1] - 1 / 5).max() > 1e-3


def test_keras_float16_additive_mask_is_nan():
    """-1e9 overflows float16 to -inf, so 0 * -1e9 at every allowed position is NaN."""
    adapter = _adapter("classic_keras")
    spec = impls.AttentionSpec(num_heads=2, key_dim=4)
    w, x = _self_attention(spec, 8)
    layer = adapter.build(spec, w, dtype="float16")
    out, _ = layer(x, x, causal=True)
    assert np.all(np.isnan(out.astype(np.float64)))
    out, _ = layer(x, x)  # no mask, no NaN
    np.testing.assert_allclose(out.astype(np.float64), oracle.forward(spec, w, x, x)[0], atol=1e-2)


def test_keras_through_the_harness_passes_and_diverges_as_catalogued():
    _adapter("classic_keras")
    from mhabench.conformance import catalogue, runner
    from mhabench.conformance.cases import default_cases
    wanted = {"self_T8-heads2_kd4", "cross_T8_S4-key_distinct", "rank5-axes_2_3", "self_T8-causal",
              "self_T8-mask_fully_masked_row", "self_T8-value_dim6"}
    rows = runner.run_rows(["classic_keras"], [c for c in default_cases() if c.id in wanted],
                           ["float64", "float32"], isolate=False, entries=catalogue.load())
    status = {(r["case"], r["dtype"], r["quantity"]): r for r in rows}
    for case in ("self_T8-heads2_kd4", "cross_T8_S4-key_distinct", "rank5-axes_2_3", "self_T8-causal"):
        assert {status[(case, d, q)]["status"] for d in ("float64", "float32") for q in ("output", "scores")} \
            == {"pass"}, case
    assert status[("self_T8-value_dim6", "float32", "output")]["status"] == "unsupported"
    row = status[("self_T8-mask_fully_masked_row", "float32", "output")]
    assert row["status"] == "divergence" and row["divergence"] == "classic_keras-fully_masked_row-uniform_rounded"
    row = status[("self_T8-mask_fully_masked_row", "float64", "output")]  # -1e9 + s keeps s in float64
    assert row["status"] == "divergence" and row["divergence"] == "classic_keras-fully_masked_row-unmasked-float64"
