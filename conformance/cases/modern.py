"""Modern attention: the area ``modern`` (grouped-query attention, bottom-right causal, sliding windows, the
additive bias and lengths, alone, together and with the classic features)."""
from __future__ import annotations

from .case import Case, spec


def cases() -> list[Case]:
    """Modern attention, each feature alone and with the classic ones: grouped-query attention with masks and
    causal; bottom-right causal with T < S and T > S (where the first T - S rows see nothing); windows, also at
    lengths either side of the tiles fused kernels use; the additive bias, with fully masked rows; lengths
    (fully masked query rows and whole batches). Gradients, the bias's included, for all of them."""
    c = lambda id, **kw: Case(id=f"modern-{id}", area="modern", spec=kw.pop("spec", spec()), **kw)
    gqa, mqa = spec(4, 2, num_kv_heads=2), spec(3, 2, num_kv_heads=1)
    return [
        # grouped-query attention (query head h reads kv head h // group)
        c("gqa_h4_kv2-self_T8", spec=gqa, quick=True),
        c("gqa_h4_kv2-cross_T6_S9-mask_padding-causal", spec=gqa, q_shape=(6,), k_shape=(9,), mask="padding",
          causal=True),
        c("mqa_h3_kv1-mask_per_head", spec=mqa),
        c("gqa_h4_kv2-value_dim3-key_distinct-mask_fully_masked_row", spec=spec(4, 2, value_dim=3, num_kv_heads=2),
          k_shape=(6,), key_distinct=True, mask="fully_masked_row"),
        c("gqa_h4_kv2-rank4-axes_default-causal", spec=gqa, q_shape=(2, 3), k_shape=(2, 3), causal=True),
        # causal aligned bottom-right (the key/value-cache case)
        c("bottom_right-cross_T4_S8", q_shape=(4,), causal="bottom_right", quick=True),
        c("bottom_right-cross_T8_S4", k_shape=(4,), causal="bottom_right"),
        c("bottom_right-decode_T1_S8-mask_padding", q_shape=(1,), causal="bottom_right", mask="padding"),
        c("bottom_right-cross_T5_S8-mask_full", q_shape=(5,), causal="bottom_right", mask="full"),
        c("bottom_right-rank4-axes_default-cross", q_shape=(2, 2), k_shape=(2, 3), causal="bottom_right"),
        c("bottom_right-gqa_h4_kv2-cross_T3_S7", spec=gqa, q_shape=(3,), k_shape=(7,), causal="bottom_right"),
        c("bottom_right-gqa_h4_kv2-decode_T1_S9", spec=gqa, q_shape=(1,), k_shape=(9,), causal="bottom_right"),
        # sliding windows, measured from the causal diagonal
        c("window_2_2-self_T8", window=(2, 2)),
        c("window_3_0-self_T8", window=(3, 0), quick=True),
        c("window_3_none-causal-self_T8", window=(3, None), causal=True),
        c("window_none_1-cross_T6_S9-mask_full", q_shape=(6,), k_shape=(9,), window=(None, 1), mask="full"),
        c("window_1_1-cross_T8_S4", k_shape=(4,), window=(1, 1)),  # rows past S + 1 see nothing
        c("window_2_0-bottom_right-cross_T4_S8", q_shape=(4,), window=(2, 0), causal="bottom_right"),
        c("window_1_2-rank5-axes_2_3", spec=spec(attention_axes=(2, 3)), q_shape=(2, 3, 2), k_shape=(2, 2, 3),
          window=(1, 2)),
        # windows across the tiles of fused kernels (64, 128): a band that a tile boundary cuts
        c("window_16_0-tiles-self_T129-causal", batch=1, q_shape=(129,), k_shape=(129,), window=(16, 0), causal=True,
          dtypes=("float32", "float64")),
        c("window_32_32-tiles-cross_T65_S129", batch=1, q_shape=(65,), k_shape=(129,), window=(32, 32),
          dtypes=("float32", "float64")),
        c("window_40_0-tiles-cross_T65_S129-bottom_right", batch=1, q_shape=(65,), k_shape=(129,), window=(40, 0),
          causal="bottom_right", dtypes=("float32", "float64")),
        # the additive bias, alone, with masks and causal, and with fully masked rows
        c("bias_TS-self_T8", bias="TS", quick=True),
        c("bias_B1S-cross_T8_S4-causal", k_shape=(4,), bias="B1S", causal=True),
        c("bias_BHTS-cross_T6_S5-mask_full", q_shape=(6,), k_shape=(5,), bias="BHTS", mask="full"),
        c("bias_neg_inf-self_T8-mask_padding", bias="neg_inf", mask="padding"),
        c("bias_neg_inf_row-self_T8", bias="neg_inf_row"),
        c("bias_TS-self_T8-mask_fully_masked_row", bias="TS", mask="fully_masked_row"),
        c("bias_BHTS-gqa_h4_kv2-rank4-axes_2", spec=spec(4, 2, num_kv_heads=2, attention_axes=(2,)), q_shape=(3, 4),
          k_shape=(3, 5), bias="BHTS"),
        c("bias_TS-large_logits", bias="TS", scale=60.0),
        # +inf and 1e30 wherever the mask, causal or lengths mask: those positions stay masked
        c("bias_huge_where_masked-self_T8-causal-mask_padding", bias="huge_where_masked", causal=True, mask="padding"),
        c("bias_huge_where_masked-gqa_h4_kv2-cross_T4_S9-lengths_key_value", spec=gqa, q_shape=(4,), k_shape=(9,),
          bias="huge_where_masked", lengths="key_value"),
        # padding given as lengths
        c("lengths_key_value-cross_T6_S8", q_shape=(6,), lengths="key_value", quick=True),
        c("lengths_query-self_T8", lengths="query"),
        c("lengths_both-self_T8-causal-mask_full", lengths="both", causal=True, mask="full"),
        c("lengths_empty-cross_T4_S6", q_shape=(4,), k_shape=(6,), lengths="empty"),
        c("lengths_both-rank4-axes_2-free3", spec=spec(attention_axes=(2,)), batch=3, q_shape=(3, 4),
          k_shape=(3, 5), lengths="both"),
        # everything at once
        c("everything-gqa_h4_kv2-bottom_right-window_3_none-bias_TS-lengths_both-mask_full", spec=gqa, q_shape=(5,),
          k_shape=(7,), causal="bottom_right", window=(3, None), bias="TS", lengths="both", mask="full"),
    ]
