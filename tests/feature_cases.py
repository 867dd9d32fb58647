"""Small feature combinations shared by the oracle and adapter tests of the foundation."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mhabench import impls


@dataclass(frozen=True)
class FeatureCase:
    id: str
    spec: impls.AttentionSpec
    query: tuple
    value: tuple
    key: tuple | None = None
    mask: str | None = None  # "BTS", "TS", "padding", "per_head", "fully_masked_row", "all", "multi"
    causal: bool = False

    def build(self, seed=0):
        rng = np.random.default_rng(seed)
        q = rng.normal(size=self.query)
        v = rng.normal(size=self.value)
        k = rng.normal(size=self.key) if self.key else None
        w = impls.Weights.random(self.spec, self.query[-1], self.value[-1], self.key[-1] if self.key else None,
                                 seed=seed)
        return w, q, v, k, self.make_mask(rng)

    def make_mask(self, rng):
        if self.mask is None:
            return None
        B, T, S, H = self.query[0], self.query[1], self.value[1], self.spec.num_heads
        if self.mask == "BTS":
            m = rng.random((B, T, S)) > 0.3
            m[..., 0] = True  # keep every row attended
        elif self.mask == "TS":
            m = rng.random((T, S)) > 0.3
            m[..., 0] = True
        elif self.mask == "padding":
            m = np.ones((B, 1, S), dtype=bool)
            m[0, 0, S // 2:] = False
        elif self.mask == "per_head":
            m = rng.random((B, H, T, S)) > 0.3
            m[..., 0] = True
        elif self.mask == "fully_masked_row":
            m = np.ones((B, T, S), dtype=bool)
            m[0, 1, :] = False
        elif self.mask == "all":
            m = np.ones((B, T, S), dtype=bool)
        elif self.mask == "multi":  # 5-D input attending over (2, 3); axis 1 is a batch axis
            shape = (self.query[0], self.query[1], *self.query[2:4], *self.value[2:4])
            m = rng.random(shape) > 0.3
            m[..., 0, 0] = True
        else:
            raise ValueError(self.mask)
        return m


S = impls.AttentionSpec
CASES = [
    FeatureCase("self", S(2, 4), (2, 5, 8), (2, 5, 8)),
    FeatureCase("cross_T4_S7", S(2, 4), (2, 4, 8), (2, 7, 8)),
    FeatureCase("key_distinct", S(2, 4), (2, 4, 8), (2, 6, 8), key=(2, 6, 8)),
    FeatureCase("kv_widths", S(2, 4), (2, 4, 8), (2, 6, 5), key=(2, 6, 3)),
    FeatureCase("value_dim", S(3, 4, value_dim=6), (2, 4, 12), (2, 5, 12)),
    FeatureCase("heads1", S(1, 8), (1, 3, 8), (1, 4, 8)),
    FeatureCase("heads8", S(8, 2), (2, 3, 16), (2, 3, 16)),
    FeatureCase("key_dim_not_width", S(2, 3), (2, 4, 8), (2, 4, 8)),
    FeatureCase("output_int", S(2, 4, output_shape=5), (2, 4, 8), (2, 4, 8)),
    FeatureCase("output_tuple", S(2, 4, output_shape=(2, 3)), (2, 4, 8), (2, 4, 8)),
    FeatureCase("no_bias", S(2, 4, use_bias=False), (2, 4, 8), (2, 5, 8)),
    FeatureCase("axes_1_4d", S(2, 4, attention_axes=(1,)), (2, 3, 4, 8), (2, 5, 4, 8)),
    FeatureCase("axes_2_4d", S(2, 4, attention_axes=(2,)), (2, 3, 4, 8), (2, 3, 5, 8)),
    FeatureCase("axes_neg", S(2, 4, attention_axes=(-2,)), (2, 3, 4, 8), (2, 3, 5, 8)),
    FeatureCase("axes_none_4d", S(2, 4), (2, 3, 2, 8), (2, 2, 3, 8)),
    FeatureCase("axes_23_5d", S(2, 4, attention_axes=(2, 3)), (2, 3, 2, 3, 8), (2, 3, 3, 2, 8)),
    FeatureCase("mask_BTS", S(2, 4), (2, 4, 8), (2, 6, 8), mask="BTS"),
    FeatureCase("mask_TS", S(2, 4), (2, 4, 8), (2, 6, 8), mask="TS"),
    FeatureCase("mask_padding", S(2, 4), (2, 4, 8), (2, 6, 8), mask="padding"),
    FeatureCase("mask_per_head", S(3, 4), (2, 4, 12), (2, 6, 12), mask="per_head"),
    FeatureCase("mask_all", S(2, 4), (2, 4, 8), (2, 6, 8), mask="all"),
    FeatureCase("causal", S(2, 4), (2, 5, 8), (2, 5, 8), causal=True),
    FeatureCase("causal_cross_T4_S7", S(2, 4), (2, 4, 8), (2, 7, 8), causal=True),
    FeatureCase("causal_cross_T6_S3", S(2, 4), (2, 6, 8), (2, 3, 8), causal=True),
    FeatureCase("causal_padding", S(2, 4), (2, 5, 8), (2, 5, 8), mask="padding", causal=True),
    FeatureCase("axes_23_5d_mask_causal", S(2, 4, attention_axes=(2, 3)), (2, 2, 2, 3, 8), (2, 2, 3, 2, 8),
                mask="multi", causal=True),
    FeatureCase("everything", S(3, 4, value_dim=5, output_shape=(2, 3), use_bias=False, attention_axes=(1,)),
                (2, 4, 3, 8), (2, 6, 3, 6), key=(2, 6, 3, 7), mask=None, causal=True),
]
# A fully masked row has no well-defined softmax: adapters may differ (see the divergence catalogue).
FULLY_MASKED = FeatureCase("fully_masked_row", S(2, 4), (2, 4, 8), (2, 6, 8), mask="fully_masked_row")


# ---- modern attention: grouped-query, causal alignment, window, bias, lengths ------------------------
@dataclass(frozen=True)
class ModernCase(FeatureCase):
    """A FeatureCase with the call-level features of modern attention (``causal`` may be an alignment)."""

    window: tuple | None = None
    bias: str | None = None  # "TS", "BHTS", "B1S", "neg_inf", "neg_inf_row", "nan_where_masked"
    query_lengths: tuple | None = None
    key_value_lengths: tuple | None = None
    query_offset: int | tuple | None = None
    softcap: float | None = None
    scale: float | None = None

    def feature_kwargs(self, seed=0) -> dict:
        """``window``, ``bias``, ``query_lengths``, ``key_value_lengths``, ``query_offset``, ``softcap`` and ``scale``
        for this case (None where unused)."""
        array = lambda x: None if x is None else np.array(x)
        return {"window": self.window, "bias": self.make_bias(seed), "query_lengths": array(self.query_lengths),
                "key_value_lengths": array(self.key_value_lengths), "query_offset": array(self.query_offset),
                "softcap": self.softcap, "scale": self.scale}

    def make_bias(self, seed):
        if self.bias is None:
            return None
        rng = np.random.default_rng([seed, 17])
        spec = self.spec
        axes = spec.resolve_axes(len(self.query))
        q_att = tuple(self.query[a] for a in axes)
        k_att = tuple(self.value[a] for a in axes)
        B, H = self.query[0], spec.num_heads
        free = tuple(self.query[a] for a in range(1, len(self.query) - 1) if a not in axes)
        if self.bias == "TS":
            return rng.normal(size=q_att + k_att)
        if self.bias == "BHTS":
            return rng.normal(size=(B,) + free + (H,) + q_att + k_att)
        if self.bias == "B1S":  # a per-key bias, like ALiBi-free padding penalties: [B, 1.., S..]
            return rng.normal(size=(B,) + (1,) * len(q_att) + k_att)
        if self.bias == "neg_inf":  # some -inf positions, never a whole row
            b = rng.normal(size=(B,) + q_att + k_att)
            b[rng.random(b.shape) < 0.3] = -np.inf
            b[..., *(0,) * len(k_att)] = 0.5  # the first key of every row stays finite
            return b
        if self.bias == "neg_inf_row":  # query row 1 of batch 0 is -inf everywhere: fully masked
            b = rng.normal(size=(B,) + q_att + k_att)
            b[0, 1] = -np.inf
            return b
        if self.bias == "nan_where_masked":  # NaN and +inf only where the mask already masks
            b = rng.normal(size=(B,) + q_att + k_att)
            masked = ~np.broadcast_to(self.build(seed)[4], b.shape)  # the mask build(seed) gives
            b[masked] = np.where(rng.random(b[masked].shape) < 0.5, np.nan, np.inf)
            return b
        raise ValueError(self.bias)


M = ModernCase
MODERN_CASES = [
    M("gqa_2of4", S(4, 3, num_kv_heads=2), (2, 5, 12), (2, 6, 12)),
    M("mqa_per_head_mask", S(4, 2, num_kv_heads=1), (2, 4, 8), (2, 5, 8), mask="per_head"),
    M("gqa_cross_causal_mask_value_dim", S(6, 2, value_dim=3, num_kv_heads=3), (2, 4, 12), (2, 7, 10),
      key=(2, 7, 5), mask="BTS", causal=True),
    M("gqa_no_bias_axes_1_4d", S(4, 2, num_kv_heads=2, use_bias=False, attention_axes=(1,)), (2, 3, 2, 8),
      (2, 5, 2, 8)),
    M("bottom_right_T4_S7", S(2, 4), (2, 4, 8), (2, 7, 8), causal="bottom_right"),
    M("bottom_right_T6_S3", S(2, 4), (2, 6, 8), (2, 3, 8), causal="bottom_right"),  # rows 0..2 see nothing
    M("bottom_right_T5_S5", S(2, 4), (2, 5, 8), (2, 5, 8), causal="bottom_right"),
    M("bottom_right_decode_T1_S6_mask", S(2, 4), (2, 1, 8), (2, 6, 8), causal="bottom_right", mask="padding"),
    M("bottom_right_axes_23_5d", S(2, 4, attention_axes=(2, 3)), (2, 2, 2, 2, 8), (2, 2, 3, 2, 8),
      causal="bottom_right"),
    M("window_1_0_self", S(2, 4), (2, 6, 8), (2, 6, 8), window=(1, 0)),
    M("window_2_1_cross", S(2, 4), (2, 4, 8), (2, 7, 8), window=(2, 1)),
    M("window_unbounded_left_causal", S(2, 4), (2, 5, 8), (2, 5, 8), window=(None, 1), causal=True),
    M("window_1_none_T6_S3", S(2, 4), (2, 6, 8), (2, 3, 8), window=(1, None)),  # rows past S+1 see nothing
    M("window_bottom_right_decode", S(2, 4), (2, 2, 8), (2, 7, 8), window=(2, 0), causal="bottom_right"),
    M("window_mask_axes_23_5d", S(2, 4, attention_axes=(2, 3)), (2, 2, 2, 3, 8), (2, 2, 3, 2, 8),
      mask="multi", window=(2, 2)),
    M("bias_TS", S(2, 4), (2, 4, 8), (2, 6, 8), bias="TS"),
    M("bias_BHTS_mask", S(3, 4), (2, 4, 12), (2, 6, 12), bias="BHTS", mask="BTS"),
    M("bias_B1S_causal", S(2, 4), (2, 5, 8), (2, 5, 8), bias="B1S", causal=True),
    M("bias_neg_inf", S(2, 4), (2, 4, 8), (2, 6, 8), bias="neg_inf"),
    M("bias_neg_inf_row", S(2, 4), (2, 4, 8), (2, 6, 8), bias="neg_inf_row"),
    M("bias_nan_where_masked", S(2, 4), (2, 4, 8), (2, 6, 8), bias="nan_where_masked", mask="BTS"),
    M("bias_axes_2_4d", S(2, 4, attention_axes=(2,)), (2, 3, 4, 8), (2, 3, 5, 8), bias="BHTS"),
    M("kv_lengths", S(2, 4), (2, 4, 8), (2, 6, 8), key_value_lengths=(6, 2)),
    M("query_lengths", S(2, 4), (2, 4, 8), (2, 6, 8), query_lengths=(1, 4)),
    M("lengths_both_causal_mask", S(2, 4), (2, 5, 8), (2, 5, 8), query_lengths=(5, 3), key_value_lengths=(2, 5),
      causal=True, mask="BTS"),
    M("lengths_zero", S(2, 4), (2, 3, 8), (2, 4, 8), query_lengths=(0, 3), key_value_lengths=(4, 0)),
    M("lengths_free_axis", S(2, 4, attention_axes=(2,)), (2, 3, 4, 8), (2, 3, 5, 8), query_lengths=(2, 4),
      key_value_lengths=(5, 3)),
    M("lengths_axes_23_5d", S(2, 4, attention_axes=(2, 3)), (2, 2, 2, 3, 8), (2, 2, 3, 2, 8),
      query_lengths=(5, 6), key_value_lengths=(4, 6)),
    M("modern_everything", S(4, 2, value_dim=3, output_shape=(2, 3), num_kv_heads=2, attention_axes=(1,)),
      (2, 5, 3, 8), (2, 7, 3, 6), key=(2, 7, 3, 5), mask="BTS", causal="bottom_right", window=(3, None),
      bias="TS", query_lengths=(5, 4), key_value_lengths=(7, 6)),
    # inference attention: per-sequence query positions (a key/value cache), the soft cap, the scale
    M("offset_decode_T1_S7", S(2, 4), (3, 1, 8), (3, 7, 8), causal=True, query_offset=(0, 3, 6)),
    M("offset_speculative_T3_S8_cache", S(4, 2, num_kv_heads=2), (3, 3, 8), (3, 8, 8), causal=True,
      query_offset=(5, 0, 2), key_value_lengths=(8, 3, 5)),
    M("offset_int_window", S(2, 4), (2, 3, 8), (2, 7, 8), window=(1, 1), query_offset=2),
    M("offset_negative_rows_see_nothing", S(2, 4), (2, 4, 8), (2, 4, 8), causal=True, query_offset=(-2, -4)),
    M("offset_causal_window_mask", S(2, 4), (2, 2, 8), (2, 6, 8), causal=True, window=(2, 0), mask="BTS",
      query_offset=(4, 1)),
    M("offset_axes_23_5d", S(2, 4, attention_axes=(2, 3)), (2, 2, 1, 2, 8), (2, 2, 3, 2, 8), causal=True,
      query_offset=(4, 0)),
    M("softcap", S(2, 4), (2, 4, 8), (2, 6, 8), softcap=0.7),
    M("softcap_bias_mask", S(3, 4), (2, 4, 12), (2, 6, 12), softcap=2.0, bias="BHTS", mask="BTS"),
    M("scale", S(2, 4), (2, 4, 8), (2, 6, 8), scale=0.9),
    M("scale_softcap_causal_gqa", S(4, 3, num_kv_heads=2), (2, 5, 12), (2, 5, 12), causal=True, scale=-0.4,
      softcap=1.5),
    M("inference_everything", S(4, 2, num_kv_heads=2, value_dim=3), (3, 2, 8), (3, 9, 8), causal=True, window=(4, 0),
      query_offset=(7, 0, 3), key_value_lengths=(9, 2, 5), softcap=1.0, scale=0.8, bias="TS"),
    M("key_value_length_0", S(2, 4), (2, 3, 8), (2, 0, 8)),
    M("key_value_length_0_everything", S(4, 2, num_kv_heads=2), (2, 3, 8), (2, 0, 8), causal="bottom_right",
      window=(1, 1), bias="TS", query_lengths=(3, 1), key_value_lengths=(0, 0)),
]


def nan_in_masked_key(seed=0):
    """(spec, weights, query, value, key, mask): batch 0's last key holds a NaN and is masked for every query,
    so the canonical output has no NaN."""
    spec = impls.AttentionSpec(2, 4)
    w = impls.Weights.random(spec, 8, 8, seed=seed + 1)
    rng = np.random.default_rng(seed)
    q, k, v = rng.normal(size=(2, 3, 8)), rng.normal(size=(2, 4, 8)), rng.normal(size=(2, 4, 8))
    k[0, 3, 0] = np.nan
    mask = np.ones((2, 1, 4), bool)
    mask[0, 0, 3] = False
    return spec, w, q, v, k, mask


# ---- an adapter against the oracle on the modern cases (shared by the per-adapter test files) ---------------
def rel_err(a, b) -> float:
    """max |a - b| / max |b|, NaN-aware: NaN where the other has none counts as infinitely wrong."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise AssertionError(f"shape {a.shape}, expected {b.shape}")
    if not np.array_equal(np.isnan(a), np.isnan(b)):
        return np.inf
    finite = ~np.isnan(b)
    if not finite.any():
        return 0.0
    return float(np.max(np.abs(a[finite] - b[finite])) / max(np.max(np.abs(b[finite])), 1e-30))


def modern_support(name: str, case: ModernCase, dtype: str, seed: int = 11, **needs) -> str | None:
    """Why the adapter refuses the case (``needs``: return_scores, gradients, mode; the mode defaults to the
    adapter's preferred mode for the dtype), or None."""
    w, q, v, k, mask = case.build(seed)
    call = impls.oracle.prepare(case.spec, w, q, v, k, mask, case.causal, **case.feature_kwargs(seed))
    adapter = impls.get_adapter(name)
    needs.setdefault("mode", adapter.preferred_mode(case.spec, w, dtype=dtype))
    return adapter.unsupported_reason(case.spec, w, dtype=dtype, call=call, **needs)


def modern_forward_errors(name: str, case: ModernCase, dtype: str, seed: int = 11, policy: str = "zeros",
                          scores_policy: str | None = None, **options) -> dict[str, float]:
    """Relative errors of the default call's output and, where the adapter returns weights, the with-scores call's
    output and its scores against the oracle (``policy``: its fully-masked-row policy for the default call;
    ``scores_policy`` for the call with scores, default the same)."""
    w, q, v, k, mask = case.build(seed)
    kwargs = case.feature_kwargs(seed)
    adapter = impls.get_adapter(name)
    options.setdefault("mode", adapter.preferred_mode(case.spec, w, dtype=dtype))
    layer = adapter.build(case.spec, w, dtype=dtype, **options)
    golden = lambda p: impls.oracle.forward(case.spec, w, q, v, k, mask, case.causal, fully_masked=p, **kwargs)
    out, _ = layer(q, v, k, mask, case.causal, return_scores=False, **kwargs)
    assert out.dtype == np.dtype(dtype)
    errors = {"output": rel_err(out, golden(policy)[0])}
    if modern_support(name, case, dtype, seed, return_scores=True, mode=options["mode"]) is None:  # weights returned
        with_scores, scores = layer(q, v, k, mask, case.causal, return_scores=True, **kwargs)
        want_with_scores, want_scores = golden(scores_policy or policy)
        errors.update(output_with_scores=rel_err(with_scores, want_with_scores), scores=rel_err(scores, want_scores))
    return errors


def modern_gradient_errors(name: str, case: ModernCase, dtype: str = "float64", seed: int = 11,
                           policy: str = "zeros", **options) -> dict[str, float]:
    """Relative errors of every gradient (the bias's included) against the oracle's analytic backward; a gradient
    that is zero analytically (bk: softmax ignores a shift shared by a row) is compared absolutely."""
    from mhabench.impls.oracle_backward import backward
    w, q, v, k, mask = case.build(seed)
    kwargs = case.feature_kwargs(seed)
    rng = np.random.default_rng([seed, 5])
    layer = impls.get_adapter(name).build(case.spec, w, dtype=dtype, **options)
    out, _ = layer(q, v, k, mask, case.causal, return_scores=False, **kwargs)
    ct = rng.normal(size=out.shape)
    got = layer.gradients(q, v, k, mask, case.causal, ct, **kwargs)
    want = backward(case.spec, w, q, v, k, mask, case.causal, ct, fully_masked=policy, **kwargs)
    assert set(got) == set(want), f"gradients {sorted(got)}, expected {sorted(want)}"
    errors = {}
    for n in want:
        scale = np.max(np.abs(want[n])) if want[n].size else 0.0
        errors[n] = rel_err(got[n], want[n]) if scale > 1e-12 else float(np.max(np.abs(got[n]), initial=0.0))
    return errors
