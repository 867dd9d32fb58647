"""The harness has teeth: every one-bug mutant fails somewhere, the unmodified oracle nowhere."""
from __future__ import annotations

import io

import numpy as np
import pytest

from mhabench import impls
from mhabench.conformance import mutants


@pytest.fixture(scope="module")
def catch_table():
    """The self-check on the hand-written cases that catch the mutants (a few seconds; the CLI's
    ``--self-check`` runs the whole default matrix)."""
    return {s["adapter"]: s for s in mutants.self_check(mutants.teeth_cases())}


@pytest.mark.parametrize("name", list(mutants.MUTANTS))
def test_every_mutant_fails_at_least_two_hand_written_cases(catch_table, name):
    summary = catch_table[name]
    assert len(summary["cases"]) >= 2, f"{name} ({summary['bug']}) fails only {summary['cases']}"
    assert summary["caught"]
    assert all(row_id.startswith(name + "-") for row_id in summary["example_rows"])


def test_control_is_clean(catch_table):
    control = catch_table[mutants.CONTROL]
    assert control["rows"] > 50 and control["failing"] == 0


@pytest.mark.parametrize("name, area", [("mutant_mask_inverted", "masks"), ("mutant_causal_off_by_one", "masks"),
                                        ("mutant_float16_no_upcast", "dtypes")])
def test_targeted_mutants_are_caught_where_their_bug_lives(catch_table, name, area):
    assert catch_table[name]["by_area"].get(area, 0) > 0
    if name == "mutant_causal_off_by_one":  # only causal cases see it
        from mhabench.conformance.cases import find_case
        assert all(find_case(c).causal for c in catch_table[name]["cases"])


def test_print_catch_table(catch_table):
    out = io.StringIO()
    assert mutants.print_catch_table(list(catch_table.values()), file=out)
    assert "every mutant caught" in out.getvalue()
    missed = dict(catch_table["mutant_mask_inverted"], failing=1, caught=False, by_area={"masks": 1},
                  example_rows=["x"], cases=["self_T8-mask_full"])
    assert not mutants.print_catch_table([missed], file=io.StringIO())


def test_mutants_differ_from_the_oracle_only_by_their_bug():
    mutants.register_mutants()
    spec = impls.AttentionSpec(num_heads=2, key_dim=4)
    w = impls.Weights.random(spec, 8, 8, seed=0)
    x = np.random.default_rng(0).standard_normal((2, 6, 8))
    golden = impls.oracle.forward(spec, w, x, x)[0]
    same_without_mask = {"mutant_mask_inverted", "mutant_causal_off_by_one", "mutant_float16_no_upcast",
                         "mutant_default_path_ignores_mask", "mutant_default_path_uniform_empty_rows",
                         "mutant_mask_read_from_the_right", "mutant_head_axis_of_mask_ignored",
                         "mutant_backward_causal_bottom_right", "mutant_backward_mask_from_head_zero",
                         "mutant_backward_output_axes_swapped", "mutant_backward_causal_over_last_axis",
                         "mutant_dropout_when_not_training", "mutant_masked_value_leaks",
                         "mutant_last_partial_tile_dropped", "mutant_causal_bottom_right_when_T_shorter",
                         "mutant_one_head_skips_the_scale"}
    for name in mutants.MUTANTS:
        out, _ = impls.get_adapter(name).build(spec, w, dtype="float64")(x, x, return_scores=True)
        assert np.allclose(out, golden, atol=1e-12) == (name in same_without_mask), name
