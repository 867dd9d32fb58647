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
