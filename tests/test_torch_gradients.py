"""PyTorch autograd (torch_sdpa, torch_mha) against the oracle's analytic backward, in float64."""
from __future__ import annotations

import numpy as np
import pytest

from mhabench import impls
from mhabench.impls.oracle_backward import backward
from mhabench.impls.spec import AttentionSpec, Weights
from mhabench.impls.validation import validate_call, weights_dims

pytest.importorskip("torch")

MAX_REL_ERR = 1e-10
ZERO = 1e-12  # bk's gradient is identically zero (softmax ignores a shift shared by a row)
ADAPTERS = ("torch_sdpa", "torch_mha")


def _empty_rows_mask():
    """[B, T, S]: query row 1 of batch 0 attends nothing; batch 1 never attends key 0."""
    m = np.ones((2, 3, 5), bool)
    m[0, 1] = False
    m[1, :, 0] = False
    return m


def _empty_rows_per_head():
    """[B, H, T, S]: head 1 of batch 1 has an empty row 2; other heads see every key."""
    m = np.ones((2, 2, 3, 5), bool)
    m[1, 1, 2] = False
    return m


# id: (spec kwargs, query shape, kv shape [B, *K], value width, key width or None, mask (shape or array), causal)
CASES = {
    "self": (dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 3), 4, None, None, False),
    "cross_separate_key": (dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 5), 4, 4, None, False),
    "key_value_dims": (dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 5), 5, 3, None, False),
    "no_bias": (dict(num_heads=2, key_dim=2, use_bias=False), (2, 3, 4), (2, 5), 4, 4, None, False),
    "mask_key_padding_B_1_S": (dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 5), 4, None, (2, 1, 5), False),
    "mask_B_T_S": (dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 5), 4, None, (2, 3, 5), False),
    "mask_per_head": (dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 5), 4, 4, (2, 2, 3, 5), False),
    "causal_T4_S4": (dict(num_heads=2, key_dim=2), (2, 4, 4), (2, 4), 4, None, None, True),
    "causal_T3_S5": (dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 5), 4, 4, None, True),
    "causal_and_mask": (dict(num_heads=2, key_dim=2), (2, 4, 4), (2, 4), 4, None, (2, 4, 4), True),
    "axes_1_3_rank5": (dict(num_heads=2, key_dim=2, attention_axes=(1, 3)), (1, 2, 2, 3, 4), (1, 3, 2, 2), 4,
                       None, (1, 2, 2, 3, 3, 2), False),
    "value_dim_output_shape": (dict(num_heads=2, key_dim=3, value_dim=2, output_shape=(2, 3)), (2, 3, 4), (2, 5),
                               4, 4, None, False),
    "fully_masked_rows": (dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 5), 4, None, _empty_rows_mask(), False),
    "fully_masked_rows_per_head": (dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 5), 4, 4, _empty_rows_per_head(),
                                   False),
}


def make(case_id: str, seed: int = 0):
    spec_kwargs, query_shape, kv_shape, value_width, key_width, mask, causal = CASES[case_id]
    spec = AttentionSpec(**spec_kwargs)
    rng = np.random.default_rng(seed)
    weights = Weights.random(spec, query_shape[-1], value_width, key_width or value_width, seed=seed)
    query = rng.normal(size=query_shape)
    value = rng.normal(size=kv_shape + (value_width,))
    key = None if key_width is None else rng.normal(size=kv_shape + (key_width,))
    if isinstance(mask, tuple):
        mask = rng.random(mask) < 0.7
    call = validate_call(spec, weights_dims(weights), query, value, key, mask, causal)
    cotangent = rng.normal(size=call.output_shape)
    return spec, weights, dict(query=query, value=value, key=key, mask=mask, causal=causal), call, cotangent


def relative_errors(got: dict, want: dict) -> dict[str, float]:
    """Per gradient: max |got - want| / max |want|; a gradient that is zero analytically must be ~0 in both."""
    errors = {}
    for name, w in want.items():
        g = got[name]
        assert g.shape == w.shape, f"{name}: shape {g.shape}, expected {w.shape}"
        scale = np.max(np.abs(w))
        diff = np.max(np.abs(g - w))  # NaN in either makes this NaN, which fails below
        errors[name] = float(diff) if scale < ZERO else float(diff / scale)
    return errors


@pytest.mark.parametrize("case_id", CASES)
@pytest.mark.parametrize("adapter_name", ADAPTERS)
def test_autograd_matches_analytic_backward(adapter_name, case_id):
    adapter = impls.get_adapter(adapter_name)
    if not adapter.is_available():
        pytest.skip(adapter.availability()[1])
    spec, weights, inputs, call, cotangent = make(case_id)
    reason = adapter.unsupported_reason(spec, weights, dtype="float64", call=call, gradients=True)
    if reason:
        pytest.skip(f"{adapter_name}: {reason}")
    layer = adapter.build(spec, weights, dtype="float64")
    got = layer.gradients(cotangent=cotangent, **inputs)
    want = backward(spec, weights, cotangent=cotangent, **inputs)
    assert set(got) == set(want)
    errors = relative_errors(got, want)
    bad = {name: err for name, err in errors.items() if not err <= MAX_REL_ERR}
    assert not bad, f"{adapter_name} {case_id}: gradients off (relative error): {bad}"


def test_torch_mha_need_weights_true_gives_nan_policy_gradients_on_fully_masked_rows():
    """A framework divergence, recorded as what torch does, not what it should do.

    nn.MultiheadAttention's default need_weights=True path runs a plain softmax over the masked
    scores: a fully masked row becomes NaN (0/0) and its NaN flows back through autograd into every
    projection weight and every key/value of that batch element, exactly the oracle's "nan" policy.
    The need_weights=False path (SDPA, used by the adapter) follows the canonical "zeros" policy
    (test above). Upstream: https://github.com/pytorch/pytorch/issues/41508,
    https://github.com/pytorch/pytorch/issues/160064. If this starts failing, torch changed: update
    the divergence catalogue.
    """
    import torch

    from mhabench.impls.torch_mha import module_to_canonical

    adapter = impls.get_adapter("torch_mha")
    spec, weights, inputs, call, cotangent = make("fully_masked_rows")
    module = adapter.build(spec, weights, dtype="float64").module  # batch_first=False: [L, N, E]
    seq_first = lambda x: torch.tensor(np.ascontiguousarray(x.transpose(1, 0, 2)), requires_grad=True)
    query, value = seq_first(inputs["query"]), seq_first(inputs["value"])
    H, (T, S) = spec.num_heads, inputs["mask"].shape[1:]
    masked = torch.tensor(~np.broadcast_to(inputs["mask"][:, None], (2, H, T, S)).reshape(-1, T, S))
    out, _ = module(query, value, value, attn_mask=masked, need_weights=True, average_attn_weights=False)
    assert torch.isnan(out[1, 0]).all() and not torch.isnan(out[:, 1]).any()
    out.backward(torch.tensor(np.ascontiguousarray(cotangent.transpose(1, 0, 2))))
    got = module_to_canonical({n: p.grad.numpy() for n, p in module.named_parameters()}, H)
    got.update(query=query.grad.numpy().transpose(1, 0, 2), value=value.grad.numpy().transpose(1, 0, 2))

    want = backward(spec, weights, cotangent=cotangent, fully_masked="nan", **inputs)
    for name, w in want.items():
        np.testing.assert_array_equal(np.isnan(got[name]), np.isnan(w), err_msg=f"{name}: NaN pattern")
        finite = ~np.isnan(w)
        if finite.any():
            err = np.max(np.abs(got[name][finite] - w[finite])) / np.max(np.abs(w[finite]))
            assert err <= MAX_REL_ERR, f"{name}: finite entries off by {err:.2e}"
    assert all(np.isnan(got[n]).all() for n in ("Wq", "bq", "Wk", "bk", "Wv", "bv", "Wo"))
    assert not np.isnan(got["bo"]).any()
