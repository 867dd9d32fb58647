"""The case matrix as data: pair coverage of the covering design, seeds from ids, mask forms, quantities."""
from __future__ import annotations

import numpy as np
import pytest

from mhabench.conformance import cases


def test_pair_coverage_of_the_forward_and_the_gradient_matrix_is_complete():
    matrix = [c for c in cases.default_cases() if c.area != "invalid"]
    met, possible, missing = cases.pair_coverage(matrix)
    assert (met, missing) == (possible, [])
    with_gradients = [c for c in matrix if c.gradient_quantities()]
    met, possible, missing = cases.pair_coverage(with_gradients)
    assert (met, missing) == (possible, [])


def test_the_design_alone_covers_every_pair():
    design = [c for c in cases.default_cases() if c.area == "pairs"]
    assert len(design) == len(cases.PAIR_DESIGN)
    met, possible, missing = cases.pair_coverage(design)
    assert met == possible, missing


def test_coverage_notices_a_missing_pair():
    design = [c for c in cases.default_cases() if c.area == "pairs"]
    causal_t1 = [c for c in design if cases.case_factors(c)["causal"] and cases.case_factors(c)["lengths"] == "T=1"]
    assert causal_t1, "the design has a causal decode case"
    met, possible, missing = cases.pair_coverage([c for c in design if c not in causal_t1])
    assert met < possible and ("lengths", "T=1", "causal", True) in missing


def test_seeds_come_from_ids():
    matrix = cases.default_cases()
    assert all(c.seed == cases.case_seed(c.id) for c in matrix)
    assert len({c.seed for c in matrix}) == len(matrix)


@pytest.mark.parametrize("case_id, shape", [
    ("mask_rank2_TS-cross_T4_S6", (4, 6)), ("mask_rank3_BTS-cross_T4_S6", (2, 4, 6)),
    ("mask_rank4_BHTS-cross_T4_S6", (2, 2, 4, 6)), ("mask_rank3_BTS-free3_batch3-cross_T4_S5", (3, 4, 5)),
    ("mask_rank5_BFHTS-free3_batch3-cross_T4_S5", (3, 3, 2, 4, 5)), ("mask_rank4_TTSS-axes_2_3", (3, 2, 2, 3)),
    ("mask_padding_rank3_B1S-free3_batch3", (3, 1, 5)),
])
def test_mask_forms_have_the_rank_their_id_says(case_id, shape):
    case = cases.find_case(case_id)
    mask = case.inputs().mask
    assert mask.shape == shape and mask.dtype == bool
    assert not mask.all(), "a mask that allows everything tests nothing"


def test_every_case_has_the_three_forward_paths_and_gradients():
    case = cases.find_case("self_T8-heads2_kd4")
    assert case.quantities()[:3] == ("output", "output_with_scores", "scores")
    assert "grad_Wq" in case.quantities() and "grad_key" not in case.quantities()
    assert "grad_key" in cases.find_case("cross_T8_S4-key_distinct").quantities()
    assert cases.find_case("invalid_query_none").quantities() == ("raises",)


def test_tile_cases_run_in_float32_and_float16_only():
    case = cases.find_case("tiles-cross_T63_S65")
    assert case.run_dtypes(["float64", "float32", "float16", "bfloat16"]) == ["float32", "float16"]
    assert case.query_shape[1] == 63 and case.value_shape[1] == 65


def test_a_masked_value_holds_the_nan_and_the_mask_hides_it():
    i = cases.find_case("cross_T8_S4-nan_masked_value").inputs()
    assert np.isnan(i.value[0, -1, 0]) and np.isfinite(i.key).all()
    assert not i.mask[0, ..., -1].any()
