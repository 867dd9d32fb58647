"""The harness has teeth: every one-bug mutant fails somewhere, the unmodified oracle nowhere."""
from __future__ import annotations

import io

import numpy as np
import pytest

from mhabench import impls
from mhabench.conformance import mutants


@pytest.fixture(scope="module")
def catch_table():
    """The self-check on the quick matrix (what pytest runs by default) plus the self-check's own cases."""
    from mhabench.conformance.cases import default_cases, select
    cases = select(default_cases(), quick=True) + mutants.teeth_cases()
    return {s["adapter"]: s for s in mutants.self_check(cases)}


@pytest.mark.parametrize("name", list(mutants.MUTANTS))
def test_every_mutant_is_caught(catch_table, name):
    summary = catch_table[name]
    assert summary["failing"] > 0, f"{name} ({summary['bug']}) passed every row"
    assert all(row_id.startswith(name + "-") for row_id in summary["example_rows"])


def test_control_is_clean(catch_table):
    control = catch_table[mutants.CONTROL]
    assert control["rows"] > 50 and control["failing"] == 0


@pytest.mark.parametrize("name, area", [("mutant_mask_inverted", "masks"), ("mutant_causal_off_by_one", "masks"),
                                        ("mutant_float16_no_upcast", "dtypes")])
def test_targeted_mutants_are_caught_where_their_bug_lives(catch_table, name, area):
    assert catch_table[name]["by_area"].get(area, 0) > 0
    if name == "mutant_causal_off_by_one":
        assert set(catch_table[name]["by_area"]) <= {"masks", "axes"}  # only causal cases see it


def test_print_catch_table(catch_table):
    out = io.StringIO()
    assert mutants.print_catch_table(list(catch_table.values()), file=out)
    assert "every mutant caught" in out.getvalue()
    missed = dict(catch_table["mutant_mask_inverted"], failing=0, caught=False, by_area={}, example_rows=[])
    assert not mutants.print_catch_table([missed], file=io.StringIO())


def test_mutants_differ_from_the_oracle_only_by_their_bug():
    mutants.register_mutants()
    spec = impls.AttentionSpec(num_heads=2, key_dim=4)
    w = impls.Weights.random(spec, 8, 8, seed=0)
    x = np.random.default_rng(0).standard_normal((2, 6, 8))
    golden = impls.oracle.forward(spec, w, x, x)[0]
    same_without_mask = ("mutant_mask_inverted", "mutant_causal_off_by_one", "mutant_float16_no_upcast")
    for name in mutants.MUTANTS:
        out, _ = impls.get_adapter(name).build(spec, w, dtype="float64")(x, x)
        assert np.allclose(out, golden, atol=1e-12) == (name in same_without_mask), name
