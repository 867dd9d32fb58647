"""Unit tests of the conformance harness itself: tolerance math, NaN-aware comparison, the catalogue's
strictness, the case matrix, and results writing."""
import csv
import json

import numpy as np
import pytest

from mhabench.conformance import catalogue
from mhabench.conformance.cases import default_cases, find_case
from mhabench.conformance.compare import compare
from mhabench.conformance.evaluate import evaluate
from mhabench.conformance.cases import random_case, random_case_from_id
from mhabench.conformance.tolerances import FLOOR, FUDGE, tolerance
from mhabench.schema import RowId


# ---- tolerances -------------------------------------------------------------------------------------
def test_tolerance_is_the_larger_of_floor_and_fudged_reference_error():
    assert tolerance("float32", "output", 0.0) == FLOOR["float32"]
    assert tolerance("float16", "output", 1e-2) == pytest.approx(FUDGE["output"] * 1e-2)
    assert tolerance("float32", "output", 1e-9) == FLOOR["float32"]  # fudged error below the floor
    assert tolerance("float64", "output", 0.0, magnitude=1e3) == pytest.approx(1e-7)  # floor scales with size


def test_rounding_noise_moves_each_intermediate_by_at_most_two_ulp_and_is_seeded():
    from mhabench.impls.oracle import Numerics
    x = np.linspace(0.5, 3.0, 1001)
    plain = Numerics("float32")(x)
    a, b = Numerics("float32", rounding_noise=7)(x), Numerics("float32", rounding_noise=7)(x)
    assert np.array_equal(a, b) and not np.array_equal(a, plain)
    assert np.all(np.abs(a - plain) <= np.spacing(plain.astype(np.float32)) * 4)
    assert np.array_equal(Numerics("float32", rounding_noise=7).cast(x), plain)  # inputs are not perturbed


def test_sensitivity_covers_a_reference_exact_by_luck_and_leaves_a_well_conditioned_tolerance_alone():
    from mhabench.conformance.evaluate import Goldens
    from mhabench.conformance.tolerances import tolerance_and_source
    lucky = find_case("grad-self_T8-large_logits")  # logits ~1e4: float32 softmax rows round to one-hot
    g = Goldens(lucky, lucky.inputs())
    golden, reference = g.get("zeros", "float64")["grad_query"], g.get("zeros", "float32")["grad_query"]
    assert np.max(np.abs(golden - reference)) < 1e-15  # the reference's query gradient is exact by luck
    assert g.sensitivity("float32", "grad_query") > 1e-4  # one ulp anywhere moves it by 1e-3
    assert 0.0 < g.sensitivity("float64", "grad_query") < 1e-9  # float64's ulp is 2**29 times smaller
    plain = find_case("grad-self_T8-heads2")
    g = Goldens(plain, plain.inputs())
    for q in ("output", "grad_query", "grad_value", "grad_Wk"):
        ref_err = np.max(np.abs(g.get("zeros", "float64")[q] - g.get("zeros", "float32")[q]))
        tol, source = tolerance_and_source("float32", q, ref_err, 1.0, g.sensitivity("float32", q))
        assert source != "rounding", q
    # the sensitivity is consulted only for a result that fails without it
    calls = []
    ok = compare(np.ones(3), np.ones(3), np.ones(3), "float32", "output", lambda: calls.append(1) or 1.0)
    assert ok.ok and not calls
    bad = compare(np.ones(3), np.ones(3), np.ones(3) + 0.5, "float32", "output", lambda: calls.append(1) or 1.0)
    assert bad.ok and bad.tolerance_source == "rounding" and calls == [1]


def test_query_gradient_gets_a_larger_fudge_than_value_gradient():
    assert FUDGE["grad_query"] > FUDGE["grad_value"] and FUDGE["grad_key"] > FUDGE["grad_value"]
    with pytest.raises(ValueError, match="quantity"):
        tolerance("float32", "grad_nothing", 1.0)


def test_compare_records_errors_ratio_and_passes_within_tolerance():
    golden = np.array([1.0, 2.0, 3.0])
    reference = golden + np.array([0.0, 1e-3, 0.0])
    r = compare(golden, reference, golden + np.array([0.0, 0.0, 2e-3]), "float16", "output")
    assert r.ok and r.reference_err == pytest.approx(1e-3) and r.max_abs_err == pytest.approx(2e-3)
    assert r.error_ratio == pytest.approx(2.0) and r.tolerance == pytest.approx(4e-3)
    assert r.max_rel_err == pytest.approx(2e-3 / 3)
    bad = compare(golden, reference, golden + np.array([0.0, 0.0, 5e-2]), "float16", "output")
    assert not bad.ok and "tolerance" in bad.message and "first at [2]" in bad.message


def test_compare_is_nan_aware():
    golden = np.array([1.0, np.nan, 3.0])
    assert compare(golden, golden, golden.copy(), "float32", "output").ok  # NaN where the golden has NaN
    extra = compare(np.array([1.0, 2.0]), np.array([1.0, 2.0]), np.array([1.0, np.nan]), "float32", "output")
    assert not extra.ok and "NaN where the golden is not NaN" in extra.message
    hidden = compare(golden, golden, np.array([1.0, 0.0, 3.0]), "float32", "output")
    assert not hidden.ok and "no NaN where the golden is NaN" in hidden.message
    inf = compare(np.array([np.inf]), np.array([np.inf]), np.array([-np.inf]), "float32", "output")
    assert not inf.ok and "Inf" in inf.message
    shape = compare(np.zeros(3), np.zeros(3), np.zeros(4), "float32", "output")
    assert not shape.ok and "shape" in shape.message


# ---- cases ------------------------------------------------------------------------------------------
def test_case_ids_are_unique_readable_and_map_back():
    cases = default_cases()
    assert len({c.id for c in cases}) == len(cases)
    assert {c.area for c in cases} >= {"shapes", "masks", "axes", "dtypes", "special", "invalid", "gradients"}
    case = find_case("cross_T8_S4-heads2-mask_padding")
    assert case.mask == "padding" and case.k_shape == (4,)
    assert RowId("torch_mha", case.id, "float32", "output").format() == \
        "torch_mha-cross_T8_S4-heads2-mask_padding-float32-output"


def test_inputs_are_reproducible_from_the_seed():
    case = find_case("self_T8-mask_fully_masked_row")
    a, b = case.inputs(), case.inputs()
    assert np.array_equal(a.query, b.query) and a.weights == b.weights and np.array_equal(a.mask, b.mask)
    assert not a.mask[0, 1].any(), "the fully masked row is row 1 of batch 0"
    assert all(a.mask[0, i].any() for i in range(8) if i != 1)


def test_special_values_are_planted_in_one_position_of_batch_zero():
    i = find_case("self_T8-nan_query").inputs()
    assert np.isnan(i.query).sum() == 1 and np.isnan(i.query[0, 1, 0])
    assert np.isfinite(i.query[1]).all()


def test_random_cases_rebuild_from_their_id():
    case = random_case(7)
    assert random_case_from_id(case.id) == case
    assert find_case(case.id) == case
    assert random_case_from_id("random7-not-its-id") is None


# ---- catalogue --------------------------------------------------------------------------------------
def _write_toml(path, body):
    path.write_text(body)
    return catalogue.load(path.parent)


def test_catalogue_rejects_malformed_entries(tmp_path):
    with pytest.raises(ValueError, match="exactly one of oracle_policy, behaviour"):
        _write_toml(tmp_path / "x.toml", '[[divergence]]\nid="a"\nadapters=["torch_mha"]\ncases=["*"]\n'
                                         'observed="o"\n')
    with pytest.raises(ValueError, match="unknown keys"):
        _write_toml(tmp_path / "x.toml", '[[divergence]]\nid="a"\nadapters=["x"]\ncases=["*"]\nobserved="o"\n'
                                         'oracle_policy="nan"\ntypo=1\n')
    with pytest.raises(ValueError, match="https"):
        _write_toml(tmp_path / "x.toml", '[[divergence]]\nid="a"\nadapters=["x"]\ncases=["*"]\nobserved="o"\n'
                                         'oracle_policy="nan"\nupstream="github.com/x"\n')


def test_a_divergence_that_reproduces_marks_the_row(tmp_path):
    entries = _write_toml(tmp_path / "numpy.toml", '''
[[divergence]]
id = "planted-uniform"
adapters = ["numpy_oracle"]
cases = ["self_T8-mask_fully_masked_row"]
observed = "planted: the layer is built with the uniform policy"
oracle_policy = "uniform"
''')
    case = find_case("self_T8-mask_fully_masked_row")
    rows = evaluate("numpy_oracle", case, ["float32"], entries)
    # the oracle itself follows the canonical policy, so the planted entry does not reproduce: stale
    assert all(r["status"] == "pass" and r["divergence"] is None for r in rows)
    [check] = catalogue.check(entries, rows, ["numpy_oracle"])
    assert check.status == "stale" and "no longer show" in check.message


def test_an_entry_matching_no_case_is_stale_only_on_a_full_run(tmp_path):
    entries = _write_toml(tmp_path / "x.toml", '[[divergence]]\nid="ghost"\nadapters=["numpy_oracle"]\n'
                                               'cases=["no_such_case*"]\nobserved="o"\noracle_policy="nan"\n')
    assert catalogue.check(entries, [], ["numpy_oracle"], full_matrix=True)[0].status == "stale"
    assert catalogue.check(entries, [], ["numpy_oracle"], full_matrix=False)[0].status == "unchecked"
    assert catalogue.check(entries, [], ["torch_sdpa"], full_matrix=True)[0].status == "unchecked"


def test_shipped_catalogue_is_valid_and_links_are_real_issue_urls():
    for entry in catalogue.load():
        assert entry.upstream is None or entry.upstream.startswith("https://github.com/")
        assert entry.source.endswith(".toml")


def test_torch_mha_fully_masked_row_is_judged_per_path():
    """The default call (need_weights=False) reaches SDPA's kernel and passes; the call that returns the
    weights is the catalogued NaN."""
    pytest.importorskip("torch")
    rows = {r["quantity"]: r for r in evaluate("torch_mha", find_case("self_T8-mask_fully_masked_row"), ["float32"])}
    with_scores = [rows.pop("output_with_scores"), rows.pop("scores")]
    assert {r["status"] for r in with_scores} == {"divergence"}
    assert {r["divergence"] for r in with_scores} == {"torch_mha-with_scores-fully_masked_row-nan"}
    assert {r["status"] for r in rows.values()} == {"pass"}




def test_a_check_is_judged_against_the_policy_its_entry_names(tmp_path):
    """introduces_nan on top of another fully-masked-row policy: a NaN in one row that reads nothing, the other
    such rows (past their query length) with uniform weights. Only the entry that names the uniform policy sees
    the rest agree; an entry may pair a check with the policy it is judged against."""
    from mhabench.conformance.behaviours import CHECKS
    from mhabench.conformance.evaluate import Goldens
    case = find_case("self_T8-nan_query_padded-lengths_query")
    goldens = Goldens(case, case.inputs())
    actual = np.array(goldens.get("uniform", "float64")["output"], np.float64)
    canonical = np.asarray(goldens.get("zeros", "float64")["output"], np.float64)
    assert np.isfinite(canonical).all() and not np.allclose(actual[1, 4:7], canonical[1, 4:7])
    actual[1, 7] = np.nan
    check = CHECKS["introduces_nan"]
    assert not check(actual, goldens, "output", "float32", compare)  # rows 4-6 are uniform, canonically zero weights
    assert check(actual, goldens, "output", "float32", compare, "uniform")
    [entry] = _write_toml(tmp_path / "x.toml", '[[divergence]]\nid="a"\nadapters=["numpy_oracle"]\nobserved="o"\n'
                                               'check="introduces_nan"\noracle_policy="uniform"\n')
    assert (entry.check, entry.oracle_policy) == ("introduces_nan", "uniform")
    with pytest.raises(ValueError, match="exactly one of"):
        _write_toml(tmp_path / "x.toml", '[[divergence]]\nid="a"\nadapters=["numpy_oracle"]\nobserved="o"\n'
                                         'behaviour="nonfinite_input_poisons_batch"\noracle_policy="uniform"\n')


def test_a_drawn_case_is_judged_by_its_own_properties():
    """A hypothesis-drawn case cannot be rebuilt from its id, so a catalogue entry with a ``when`` property
    covers its rows only because the case being judged is consulted itself: Keras's TensorFlow bias_add
    shortcut (key_dim 1, a key length equal to the head count) is a divergence on such a case, not a fail."""
    from mhabench.conformance.cases import Case
    drawn = Case.from_dict({"id": "hyp0-1_2-heads2_kd1-mask_none", "area": "random", "spec": {
        "num_heads": 2, "key_dim": 1, "value_dim": None, "output_shape": None, "attention_axes": None,
        "use_bias": True, "dropout": 0.0, "num_kv_heads": None}, "batch": 1, "q_shape": [1], "k_shape": [2],
        "query_dim": 1, "key_dim": 1, "value_dim": 1, "key_distinct": False, "mask": "none", "causal": False,
        "scale": 1.0, "special": None, "seed": 0, "shared_input": False, "quick": False, "mask_lead": None,
        "gradients": True, "dtypes": None, "window": None, "bias": None, "lengths": None})
    assert find_case(drawn.id) is None
    entries = catalogue.load()
    entry = entries.get("keras_mha-tensorflow-bias_add-shortcut")
    assert not entries.covers(entry, "keras_mha", drawn.id, "float32", "output")
    entries.properties.judging(drawn)
    assert entries.covers(entry, "keras_mha", drawn.id, "float32", "output")
