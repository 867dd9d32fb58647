"""Special values: the area ``special`` (NaN and Inf in queries, keys and values, masked or not, and at key
lengths either side of a CPU SIMD width)."""
from __future__ import annotations

from .case import Case, spec


def cases() -> list[Case]:
    c = lambda id, special, **kw: Case(id=id, area="special", spec=spec(), special=special, **kw)
    cases = [
        c("self_T8-nan_query", "nan_query", quick=True),
        c("cross_T8_S4-nan_key", "nan_key", k_shape=(4,), key_distinct=True),
        c("self_T8-nan_value", "nan_value"),
        c("self_T8-inf_query", "inf_query"),
        c("cross_T8_S4-inf_key", "inf_key", k_shape=(4,), key_distinct=True),
        c("self_T8-ninf_value", "ninf_value"),
        c("cross_T8_S4-nan_masked_key", "nan_masked_key", k_shape=(4,), key_distinct=True, quick=True),
        c("cross_T8_S4-nan_masked_value", "nan_masked_value", k_shape=(4,), key_distinct=True),
        c("cross_T8_S4-inf_masked_value", "inf_masked_value", k_shape=(4,), key_distinct=True),
    ]
    # a NaN query at key lengths below, between and above the CPU SIMD widths (8 and 16 float32 lanes, 4 and 8
    # float64 ones): fused kernels treat a leftover tail of a row apart from its vectorised part. S = 3 is below
    # every width, so such a kernel shows on every machine and in every dtype
    cases += [c(f"cross_T5_S{n}-nan_query", "nan_query", q_shape=(5,), k_shape=(n,), key_distinct=True)
              for n in (3, 4, 12, 40)]
    # a non-finite query in a row that reads nothing (fully masked, or past its query length): canonically the row
    # outputs the output bias and every gradient stays finite
    cases += [c("self_T8-nan_query-mask_fully_masked_row", "nan_query", mask="fully_masked_row"),
              c("self_T8-inf_query-mask_fully_masked_row", "inf_query", mask="fully_masked_row"),
              c("self_T8-nan_query_padded-lengths_query", "nan_query_padded", lengths="query")]
    return cases
