"""Who may attend to whom, and over which axes: the areas ``masks`` (every mask kind and rank as users pass it,
causal with T != S, decode against a cache, fully masked rows, one array for query, key and value) and
``axes`` (attention over one or several inner axes, the others acting as batch axes)."""
from __future__ import annotations

from .case import Case, spec


def cases() -> list[Case]:
    return mask_cases() + axes_cases()


def mask_cases() -> list[Case]:
    c = lambda id, **kw: Case(id=id, area="masks", spec=kw.pop("spec", spec()), **kw)
    cases = [
        c("self_T8-mask_full", mask="full"),
        c("self_T8-mask_broadcast", mask="broadcast"),
        c("cross_T8_S4-heads2-mask_padding", k_shape=(4,), mask="padding", quick=True),
        c("self_T8-mask_per_head", mask="per_head"),
        c("self_T8-causal", causal=True),
        c("cross_T8_S4-causal", k_shape=(4,), causal=True),
        c("cross_T4_S8-causal", q_shape=(4,), causal=True),
        c("self_T8-causal-mask_padding", causal=True, mask="padding", quick=True),
        c("self_T8-mask_fully_masked_row", mask="fully_masked_row", quick=True),
        c("cross_T8_S4-key_distinct-mask_fully_masked_row", k_shape=(4,), key_distinct=True,
          mask="fully_masked_row"),
        c("self_T8-mask_all_allowed", mask="all_allowed"),
        c("self_T8-causal-mask_full", causal=True, mask="full"),
        # x attends to itself through one array: what a fused qkv projection (the textbook layer) can express
        c("shared_input_T8-causal", shared_input=True, causal=True),
        c("shared_input_T8-mask_padding", shared_input=True, mask="padding"),
        c("shared_input_T8-mask_fully_masked_row", shared_input=True, mask="fully_masked_row"),
    ]
    # [T, S] up to the full scores rank with a head axis; with a free axis whose size equals the batch's
    # (batch 3, free 3), so a mask read NumPy-style (from the right) lines up without an error but wrongly
    form = lambda id, the_spec, q, k, lead, **kw: c(id, spec=the_spec, q_shape=q, k_shape=k, mask="full",
                                                    mask_lead=lead, **kw)
    cases += [form("mask_rank2_TS-cross_T4_S6", spec(), (4,), (6,), 0),
              form("mask_rank3_BTS-cross_T4_S6", spec(), (4,), (6,), 1),
              form("mask_rank4_BHTS-cross_T4_S6", spec(), (4,), (6,), 2)]
    free = spec(attention_axes=(2,))
    cases += [form(f"mask_rank{2 + lead}_{name}-free3_batch3-cross_T4_S5", free, (3, 4), (3, 5), lead, batch=3,
                   quick=lead == 1) for lead, name in ((0, "TS"), (1, "BTS"), (2, "BFTS"), (3, "BFHTS"))]
    two = spec(attention_axes=(2, 3))
    cases += [form(f"mask_rank{4 + lead}_{name}-axes_2_3", two, (2, 3, 2), (2, 2, 3), lead)
              for lead, name in ((0, "TTSS"), (1, "BTTSS"), (2, "BFTTSS"), (3, "BFHTTSS"))]
    cases.append(c("mask_padding_rank3_B1S-free3_batch3", spec=free, batch=3, q_shape=(3, 4), k_shape=(3, 5),
                   mask="padding", mask_lead=1))
    # decode: one query position against a cache of keys, with padding and causal (top-left: key 0 only)
    decode = lambda id, **kw: c(id, q_shape=(1,), k_shape=(8,), **kw)
    cases += [decode("decode_T1_S8-causal", causal=True, quick=True),
              decode("decode_T1_S8-mask_padding", mask="padding"),
              decode("decode_T1_S8-mask_padding-causal", mask="padding", causal=True)]
    return cases


def axes_cases() -> list[Case]:
    c = lambda id, axes, q, k, **kw: Case(id=id, area="axes", spec=spec(attention_axes=axes), q_shape=q, k_shape=k,
                                          **kw)
    return [
        c("rank4-axes_default", None, (3, 4), (2, 5)),
        c("rank4-axes_1", (1,), (3, 4), (2, 4)),
        c("rank4-axes_2", (2,), (3, 4), (3, 5)),
        c("rank4-axes_neg2", (-2,), (3, 4), (3, 5)),
        c("rank4-axes_1_2", (1, 2), (3, 4), (2, 5)),
        # a length-1 attended axis: a layer that flattens the attended axes gives [N, T, F], which broadcasts
        # against the call's [N, 1, T, F], so a missed reshape shows as wrong values rather than an error
        c("rank4-axes_1_2-length1_axis", (1, 2), (1, 4), (1, 5), quick=True),
        c("rank5-axes_2_3", (2, 3), (2, 3, 2), (2, 2, 3), quick=True),
        c("rank5-axes_neg3_neg2", (-3, -2), (2, 3, 2), (2, 2, 3)),
        c("rank4-axes_default-mask_full", None, (3, 4), (2, 5), mask="full"),
        c("rank4-axes_2-causal", (2,), (3, 4), (3, 5), causal=True),
        c("rank4-axes_default-causal", None, (2, 3), (2, 3), causal=True),
        c("rank5-axes_2_3-causal", (2, 3), (2, 3, 2), (2, 2, 3), causal=True),
    ]
