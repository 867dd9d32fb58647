"""The two PyTorch adapters against the oracle, their weight round trips and their limits."""
import numpy as np
import pytest

from mhabench import impls
from mhabench.impls import oracle
from tests.feature_cases import CASES, FULLY_MASKED

torch = pytest.importorskip("torch")

ADAPTERS = ["torch_sdpa", "torch_mha", "numpy_oracle"]
TOL = {"float64": 1e-12, "float32": 2e-5}


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("name", ADAPTERS)
def test_adapter_matches_oracle(name, case, dtype):
    adapter = impls.get_adapter(name)
    w, q, v, k, mask = case.build(seed=11)
    call = oracle.prepare(case.spec, w, q, v, k, mask, case.causal)
    reason = adapter.unsupported_reason(case.spec, w, dtype=dtype, call=call)
    if reason:
        assert name == "torch_mha", f"{name} should express every feature, but says: {reason}"
        pytest.skip(reason)
    golden, golden_scores = oracle.forward(case.spec, w, q, v, k, mask, case.causal)
    layer = adapter.build(case.spec, w, dtype=dtype)
    out, _ = layer(q, v, k, mask, case.causal, return_scores=False)
    assert out.dtype == np.dtype(dtype) and out.shape == golden.shape
    assert rel_err(out, golden) < TOL[dtype]
    if name == "torch_sdpa":  # the function exposes no weights
        assert "returns the output only" in adapter.unsupported_reason(case.spec, w, call=call, return_scores=True)
        return
    out, scores = layer(q, v, k, mask, case.causal, return_scores=True)
    assert rel_err(out, golden) < TOL[dtype] and rel_err(scores, golden_scores) < TOL[dtype]


def test_torch_sdpa_agrees_with_oracle_to_1e12_on_every_feature():
    worst = 0.0
    for case in CASES:
        w, q, v, k, mask = case.build(seed=5)
        golden, _ = oracle.forward(case.spec, w, q, v, k, mask, case.causal)
        out, _ = impls.get_adapter("torch_sdpa").build(case.spec, w, dtype="float64")(q, v, k, mask, case.causal,
                                                                                     return_scores=False)
        worst = max(worst, rel_err(out, golden))
    assert worst < 1e-12


def test_torch_mha_declares_what_it_cannot_express():
    adapter = impls.get_adapter("torch_mha")
    spec = impls.AttentionSpec(num_heads=2, key_dim=4, value_dim=3)
    w = impls.Weights.random(spec, 8, 8)
    assert "head_dim" in adapter.unsupported_reason(spec, w)
    with pytest.raises(impls.UnsupportedError, match="value_dim"):
        adapter.build(spec, w)
    spec = impls.AttentionSpec(num_heads=2, key_dim=3)
    assert "embed_dim" in adapter.unsupported_reason(spec, impls.Weights.random(spec, 8, 8))


@pytest.mark.parametrize("name", ["torch_sdpa", "torch_mha"])
@pytest.mark.parametrize("use_bias", [True, False])
def test_weights_round_trip_exactly_in_float64(name, use_bias):
    spec = impls.AttentionSpec(num_heads=4, key_dim=3, use_bias=use_bias)
    for dims in ((12, 12, None), (12, 7, 5)):
        w = impls.Weights.random(spec, *dims, seed=3)
        back = impls.get_adapter(name).build(spec, w, dtype="float64").export_weights()
        assert back == w
        assert back.as_dict().keys() == w.as_dict().keys()


def test_torch_mha_in_proj_layout_is_what_torch_expects():
    # The module computes q = x @ in_proj_weight[:E].T + in_proj_bias[:E]; check against the canonical einsum.
    spec = impls.AttentionSpec(num_heads=2, key_dim=3)
    w = impls.Weights.random(spec, 6, 6, seed=0)
    layer = impls.get_adapter("torch_mha").build(spec, w, dtype="float64")
    x = np.random.default_rng(0).normal(size=(4, 6))
    E = 6
    W = layer.module.in_proj_weight.detach().numpy()[:E]
    b = layer.module.in_proj_bias.detach().numpy()[:E]
    np.testing.assert_allclose(x @ W.T + b, (np.einsum("ld,dhk->lhk", x, w.Wq) + w.bq).reshape(4, E), rtol=1e-13)


@pytest.mark.parametrize("batch_first", [False, True])
def test_torch_mha_batch_first_option(batch_first):
    case = CASES[1]
    w, q, v, k, mask = case.build()
    golden, _ = oracle.forward(case.spec, w, q, v, k, mask)
    out, _ = impls.get_adapter("torch_mha").build(case.spec, w, dtype="float64", batch_first=batch_first)(
        q, v, return_scores=False)
    assert rel_err(out, golden) < 1e-12


def test_fully_masked_row_behaviour_is_reported_as_it_is():
    """SDPA returns zero weights (output = bo), like our default policy, and so does nn.MultiheadAttention's
    default call (need_weights=False reaches SDPA); with need_weights=True its row is NaN. Recorded in the
    divergence catalogue; asserted here so a change shows."""
    w, q, v, k, mask = FULLY_MASKED.build()
    golden, _ = oracle.forward(FULLY_MASKED.spec, w, q, v, k, mask)
    sdpa, _ = impls.get_adapter("torch_sdpa").build(FULLY_MASKED.spec, w, dtype="float64")(q, v, k, mask,
                                                                                          return_scores=False)
    assert rel_err(sdpa, golden) < 1e-12
    layer = impls.get_adapter("torch_mha").build(FULLY_MASKED.spec, w, dtype="float64")
    assert rel_err(layer(q, v, k, mask, return_scores=False)[0], golden) < 1e-12
    mha, _ = layer(q, v, k, mask, return_scores=True)  # need_weights=True: the explicit softmax
    assert np.all(np.isnan(mha[0, 1])) and np.all(np.isfinite(np.delete(mha, 1, axis=1)))


@pytest.mark.parametrize("name", ["torch_sdpa", "torch_mha"])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_runs_and_is_close(name, dtype):
    case = CASES[0]
    w, q, v, k, mask = case.build()
    golden, _ = oracle.forward(case.spec, w, q, v, k, mask)
    ref, _ = oracle.forward(case.spec, w, q, v, k, mask, dtype=dtype)
    out, _ = impls.get_adapter(name).build(case.spec, w, dtype=dtype)(q, v, return_scores=False)
    ref_err = rel_err(ref, golden)
    # the same scale of error as a same-precision computation (the harness does this properly)
    assert rel_err(out, golden) < 20 * max(ref_err, 1e-3)


def test_dropout_only_when_training():
    spec = impls.AttentionSpec(num_heads=2, key_dim=4, dropout=0.5)
    w = impls.Weights.random(spec, 8, 8)
    x = np.random.default_rng(0).normal(size=(2, 16, 8))
    for name in ("torch_sdpa", "torch_mha"):
        layer = impls.get_adapter(name).build(spec, w, dtype="float64")
        golden, _ = oracle.forward(spec, w, x, x)
        assert rel_err(layer(x, x, return_scores=False)[0], golden) < 1e-12
        a = layer(x, x, return_scores=False, training=True, seed=1)[0]
        b = layer(x, x, return_scores=False, training=True, seed=1)[0]
        c = layer(x, x, return_scores=False, training=True, seed=2)[0]
        np.testing.assert_array_equal(a, b)          # deterministic under a seed
        assert rel_err(a, golden) > 1e-3 and rel_err(a, c) > 1e-3


def test_cuda_is_a_clear_error_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    spec = impls.AttentionSpec(num_heads=1, key_dim=2)
    w = impls.Weights.random(spec, 2, 2)
    with pytest.raises(ValueError, match="device='cuda'.*no such device"):
        impls.get_adapter("torch_sdpa").build(spec, w, device="cuda")


# ---- modern attention: every mapping against the oracle -----------------------------------------------------
from tests.feature_cases import (MODERN_CASES, modern_forward_errors, modern_gradient_errors,  # noqa: E402
                                 modern_support)

TORCH_MODERN = ["torch_sdpa", "torch_sdpa+math", "torch_sdpa+flash", "torch_mha"]
GRAD_TOL = {"float64": 1e-10, "float32": 5e-4}


def _refusal_is_expected(name, reason):
    """torch_mha cannot express grouped-query attention, a scale or a soft cap, SDPA a soft cap; the flash kernel
    refuses what its own checks name."""
    if getattr(reason, "subject", None) == "softcap":
        return True
    if name == "torch_mha":
        return reason.startswith("grouped-query attention") or getattr(reason, "subject", None) == "scale"
    return name == "torch_sdpa+flash" and ("same last dimension" in reason or "differentiates its float attn_mask"
                                           in reason)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", MODERN_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("name", TORCH_MODERN)
def test_modern_features_match_the_oracle(name, case, dtype):
    reason = modern_support(name, case, dtype)
    if reason:
        assert _refusal_is_expected(name, reason), reason
        pytest.skip(reason)
    # nn.MultiheadAttention's need_weights=True path gives an empty row NaN (catalogued); its default call does not
    scores_policy = "nan" if name == "torch_mha" else "zeros"
    try:
        errors = modern_forward_errors(name, case, dtype, scores_policy=scores_policy)
    except impls.UnsupportedError as exc:
        assert _refusal_is_expected(name, exc.reason), exc.reason
        pytest.skip(exc.reason)
    assert max(errors.values()) < TOL[dtype], errors


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", MODERN_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("name", TORCH_MODERN)
def test_modern_gradients_match_the_analytic_backward(name, case, dtype):
    reason = modern_support(name, case, dtype, gradients=True)
    if reason:
        assert _refusal_is_expected(name, reason), reason
        pytest.skip(reason)
    try:
        errors = modern_gradient_errors(name, case, dtype)
    except impls.UnsupportedError as exc:
        assert _refusal_is_expected(name, exc.reason), exc.reason
        pytest.skip(exc.reason)
    bad = {k: e for k, e in errors.items() if not e <= GRAD_TOL[dtype]}
    assert not bad, bad


def test_sdpa_gets_its_native_arguments():
    """enable_gqa, a float attn_mask for the bias, causal_lower_right when bottom-right causal stands alone;
    the window and lengths folded into the boolean mask and recorded as emulated."""
    import torch.nn.functional as F
    from torch.nn.attention.bias import CausalBias
    seen = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    def call(case):
        w, q, v, k, mask = case.build(11)
        layer = impls.get_adapter("torch_sdpa").build(case.spec, w, dtype="float64")
        seen.clear()
        F.scaled_dot_product_attention = spy
        try:
            layer(q, v, k, mask, case.causal, return_scores=False, **case.feature_kwargs(11))
        finally:
            F.scaled_dot_product_attention = real
        call = impls.oracle.prepare(case.spec, w, q, v, k, mask, case.causal, **case.feature_kwargs(11))
        return seen[0], layer.emulations(call)

    by_id = {c.id: c for c in MODERN_CASES}
    kwargs, emulated = call(by_id["gqa_2of4"])
    assert kwargs["enable_gqa"] and kwargs["attn_mask"] is None and emulated == ()
    kwargs, emulated = call(by_id["bottom_right_T4_S7"])
    assert isinstance(kwargs["attn_mask"], CausalBias) and not kwargs["is_causal"] and emulated == ()
    kwargs, emulated = call(by_id["bias_BHTS_mask"])
    assert kwargs["attn_mask"].dtype == torch.float64 and emulated == ()
    kwargs, emulated = call(by_id["window_2_1_cross"])
    assert kwargs["attn_mask"].dtype == torch.bool and emulated == ("window",)
    kwargs, emulated = call(by_id["lengths_both_causal_mask"])
    assert kwargs["attn_mask"].dtype == torch.bool and not kwargs["is_causal"] and emulated == ("causal", "lengths")
    kwargs, emulated = call(by_id["scale"])
    assert kwargs["scale"] == 0.9 and kwargs["attn_mask"] is None and emulated == ()
    # per-sequence positions have no argument: causal at each sequence's diagonal is built into the mask
    kwargs, emulated = call(by_id["offset_decode_T1_S7"])
    assert kwargs["attn_mask"].shape == (3, 1, 1, 7) and not kwargs["is_causal"] and emulated == ("query_offset",)
    assert kwargs["attn_mask"][:, 0, 0].sum(dim=-1).tolist() == [1, 4, 7]


def test_a_kernel_variant_refuses_instead_of_falling_back():
    """torch_sdpa+flash restricted to SDPA's flash kernel: a call it cannot take is unsupported with SDPA's
    reason, where the default adapter would silently run the math kernel; efficient/cuDNN are CUDA-only."""
    spec = impls.AttentionSpec(num_heads=2, key_dim=4, value_dim=3)
    w = impls.Weights.random(spec, 8, 8, seed=1)
    x = np.random.default_rng(1).normal(size=(2, 5, 8))
    assert impls.get_adapter("torch_sdpa").build(spec, w, dtype="float32")(x, x, return_scores=False)[0].shape
    flash = impls.get_adapter("torch_sdpa+flash").build(spec, w, dtype="float32")
    with pytest.raises(impls.UnsupportedError, match="flash kernel refuses it: .*same last dimension"):
        flash(x, x, return_scores=False)
    assert impls.get_adapter("torch_sdpa+flash").kernel == "flash"
    for kernel in ("efficient", "cudnn"):
        reason = impls.get_adapter(f"torch_sdpa+{kernel}").unsupported_reason(spec, w, device="cpu")
        assert "exists only on CUDA" in reason
    assert impls.get_adapter("torch_sdpa").kernel == "default"
