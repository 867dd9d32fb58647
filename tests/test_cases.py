"""The case matrix as data: pair coverage of the covering design, seeds from ids, mask forms, quantities."""
from __future__ import annotations

import numpy as np
import pytest

from mhabench.conformance import cases


def test_pair_coverage_of_the_forward_and_the_gradient_matrix_is_complete():
    matrix = [c for c in cases.default_cases() if isinstance(c, cases.Case)]
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


def test_the_modern_area_covers_each_feature_with_gradients():
    modern = [c for c in cases.default_cases() if c.area == "modern"]
    assert all(c.gradient_quantities() for c in modern)
    used = {f for c in modern for f in c.modern}
    assert used == {"gqa", "causal_bottom_right", "window", "bias", "lengths"}
    calls = {c.id: c.shape_call() for c in modern}
    bottom_right = [c for c in modern if "causal_bottom_right" in c.modern]
    assert any(calls[c.id].q_len < calls[c.id].k_len for c in bottom_right)
    assert any(calls[c.id].q_len > calls[c.id].k_len for c in bottom_right)
    # windows across the 64/128 tiles of fused kernels
    assert any(c.window and max(calls[c.id].q_len, calls[c.id].k_len) in (65, 129) for c in modern)
    # a bias case with a fully masked row, by the bias alone and by the mask
    empty = lambda c: not np.all(np.any(c.call().flat_allowed(), axis=-1))
    assert {c.bias for c in modern if c.bias and empty(c)} >= {"neg_inf_row", "TS"}
    assert all("grad_bias" in c.gradient_quantities() for c in modern if c.bias)
    assert not any("grad_bias" in c.gradient_quantities() for c in modern if not c.bias)


def test_a_case_normalises_its_modern_features_and_refuses_unknown_kinds():
    case = cases.Case(id="x", area="modern", spec={"num_heads": 2, "key_dim": 4}, causal="top_left", window=[1, None])
    assert case.causal is True and case.window == (1, None)
    assert cases.Case.from_dict(case.to_dict()) == case
    with pytest.raises(ValueError, match="bias must be None or one of"):
        cases.Case(id="x", area="modern", spec={"num_heads": 2, "key_dim": 4}, bias="ALiBi")
    with pytest.raises(ValueError, match="causal must be False, True, 'top_left' or 'bottom_right'"):
        cases.Case(id="x", area="modern", spec={"num_heads": 2, "key_dim": 4}, causal="lower_right")


def test_lengths_and_bias_are_drawn_as_their_kinds_say():
    call = cases.Case(id="x", area="modern", spec={"num_heads": 2, "key_dim": 4}, batch=3, q_shape=(4,),
                      k_shape=(6,)).shape_call()
    q, kv = cases.make_lengths("both", call)
    assert q[0] == 4 and kv[0] == 6 and np.all(q[1:] < 4) and np.all(kv[1:] < 6) and np.all(q >= 1)
    q, kv = cases.make_lengths("empty", call)
    assert kv[0] == 0 and q[-1] == 0
    rng = np.random.default_rng(0)
    row = cases.make_bias("neg_inf_row", call, 2, rng)
    assert row.shape == (3, 4, 6) and np.all(row[0, 1] == -np.inf) and np.isfinite(np.delete(row, 1, axis=1)).all()
    some = cases.make_bias("neg_inf", call, 2, rng)
    assert np.isinf(some).any() and np.isfinite(some[..., 0]).all()
    assert cases.make_bias("B1S", call, 2, rng).shape == (3, 1, 6)


def test_every_invalid_modern_input_is_refused_naming_its_argument():
    from mhabench import impls
    from mhabench.conformance.evaluate import attempt_invalid
    names = {"causal_unknown_alignment": "causal", "window_bare_int": "window", "window_negative": "window left",
             "bias_boolean": "bias", "bias_not_broadcastable": "bias", "key_value_lengths_too_long": "key_value_lengths",
             "key_value_lengths_one_per_batch": "key_value_lengths", "query_lengths_float": "query_lengths",
             "num_kv_heads_not_dividing": "num_kv_heads"}
    by_name = {c.invalid: c for c in cases.default_cases() if isinstance(c, cases.InvalidCase)}
    for name, argument in names.items():
        exc = attempt_invalid(impls.get_adapter("numpy_oracle"), by_name[name])
        assert isinstance(exc, (ValueError, TypeError)) and argument in str(exc), (name, exc)
