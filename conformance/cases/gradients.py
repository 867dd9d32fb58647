"""Gradients: the area ``gradients`` (every input and weight gradient, with masks, causal, fully masked rows,
several axes and large logits). Every forward case of the other areas has gradient rows too."""
from __future__ import annotations

from .case import Case, spec


def cases() -> list[Case]:
    c = lambda id, **kw: Case(id=id, area="gradients", spec=kw.pop("spec", spec()), **kw)
    return [
        c("grad-self_T8-heads2"),
        c("grad-cross_T8_S4-key_distinct", k_shape=(4,), key_distinct=True, quick=True),
        c("grad-cross_T6_S5-dims_q8_k6_v5", q_shape=(6,), k_shape=(5,), key_dim=6, value_dim=5,
          key_distinct=True),
        c("grad-self_T8-value_dim6-output_shape5", spec=spec(value_dim=6, output_shape=5)),
        c("grad-self_T8-no_bias", spec=spec(use_bias=False)),
        c("grad-self_T8-mask_padding", mask="padding"),
        c("grad-self_T8-causal", causal=True),
        c("grad-self_T8-mask_fully_masked_row", mask="fully_masked_row", quick=True),
        c("grad-rank4-axes_default", spec=spec(), q_shape=(3, 4), k_shape=(2, 5)),
        c("grad-self_T8-heads8", spec=spec(8, 2), query_dim=16, value_dim=16, key_dim=16),
        c("grad-self_T8-large_logits", scale=60.0),
        c("grad-shared_input_T8-causal", shared_input=True, causal=True),
    ]
