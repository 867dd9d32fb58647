"""The plausibility rules of a measured line and the power-law fit they read."""
import math

import numpy as np
import pytest

from mhabench import plausibility
from mhabench.plausibility import Point, check, power_fit

LENGTHS = [128, 256, 512, 1024, 2048, 4096]


def line(values, spread=0.0):
    return [Point(L, v, v * (1 - spread), v * (1 + spread)) for L, v in zip(LENGTHS, values)]


def test_the_fit_recovers_a_power_law_over_the_largest_lengths_and_says_how_well():
    lengths = np.array(LENGTHS, float)
    fit = power_fit(lengths, 3e-6 * lengths ** 1.7)
    assert fit.exponent == pytest.approx(1.7) and fit.residual == pytest.approx(0, abs=1e-9)
    assert fit.lengths == (1024, 2048, 4096) and fit.quality == "good"
    # linear at small L, quadratic where the fit looks: the largest lengths decide
    assert power_fit(lengths, np.where(lengths < 1024, 1e-3 * lengths, 1e-9 * lengths ** 2)).exponent \
        == pytest.approx(2.0)
    # a kink inside the fitted lengths: no one power law
    kinked = power_fit([1024, 2048, 4096], [1.0, 1.1, 4.4])
    assert kinked.residual > plausibility.FAIR_FIT and kinked.quality == "poor"
    assert math.isnan(power_fit([256], [1.0]).exponent)
    assert power_fit([128, 256, 512], [1.0, float("nan"), 4.0]).quality == "two points"


def test_time_falling_with_L_beyond_both_spreads_breaks_a_rule():
    values = [1.0, 2.0, 4.0, 8.0, 6.0, 30.0]  # L=2048 25% below L=1024, quartiles +-5%: apart
    _, breaches = check(line(values, 0.05), "time", holds_scores=False)
    assert [b.rule for b in breaches] == [plausibility.TIME_FALLS]
    assert breaches[0].lengths == (1024, 2048) and "25% below L=1024" in breaches[0].detail


def test_steps_within_their_noise_that_all_fall_break_it_together():
    values = [1.0, 2.0, 4.0, 3.6, 3.3, 3.0]  # each step 8-10% down, quartiles +-15%: overlapping
    _, breaches = check(line(values, 0.15), "time", holds_scores=False)
    assert [(b.rule, b.lengths) for b in breaches] == [(plausibility.TIME_FALLS, (1024, 2048, 4096))]
    assert "falls as L grows" in breaches[0].detail


def test_a_fall_within_the_noise_or_the_sampling_target_does_not():
    assert check(line([1.0, 2.0, 4.0, 8.0, 6.0, 30.0], 0.2), "time")[1] == []  # the spreads overlap
    assert check(line([1.0, 2.0, 4.0, 8.0, 7.9, 30.0], 0.0), "time")[1] == []  # 1.25%: below the target


def test_memory_cannot_grow_faster_than_the_scores():
    lengths = np.array(LENGTHS, float)
    _, breaches = check(line(lengths ** 3.5), "memory")
    assert [b.rule for b in breaches] == [plausibility.MEMORY_EXPONENT]
    assert breaches[0].lengths == (1024, 2048, 4096) and "exponent 3.50" in breaches[0].detail
    assert check(line(lengths ** 2.1), "memory")[1] == []  # allocator rounding's slack
    assert check(line(lengths[::-1]), "memory")[1] == []   # falling memory is not a time rule


def test_a_kernel_holding_the_scores_cannot_be_timed_sublinear():
    lengths = np.array(LENGTHS, float)
    flat = line(lengths ** 0.36)
    assert [b.rule for b in check(flat, "time", holds_scores=True)[1]] == [plausibility.TIME_EXPONENT]
    assert check(flat, "time", holds_scores=False)[1] == []   # a fused kernel at small L may be overhead-bound
    assert check(flat, "time", holds_scores=None)[1] == []    # unknown: the rule is not applied
    assert check(line(lengths ** 1.2), "time", holds_scores=True)[1] == []


def test_time_cannot_grow_much_faster_than_the_work():
    lengths = np.array(LENGTHS, float)
    _, breaches = check(line(1e-9 * lengths ** 2.8), "time", holds_scores=True)
    assert [b.rule for b in breaches] == [plausibility.TIME_STEEP] and breaches[0].lengths == (1024, 2048, 4096)
    assert check(line(1e-9 * lengths ** 2.3), "time", holds_scores=True)[1] == []  # a cache boundary's stretch


def test_a_line_too_short_to_fit_is_judged_only_by_its_falls():
    _, breaches = check([Point(128, 1.0), Point(256, 0.5)], "time", holds_scores=True)
    assert [b.rule for b in breaches] == [plausibility.TIME_FALLS]
    with pytest.raises(ValueError, match="quantity"):
        check([], "bytes")
