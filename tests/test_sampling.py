"""The adaptive sampling of one benchmark point, on a virtual clock: when it stops, and what --verify times."""
import math

import pytest

from mhabench.benchmarks import sampling
from mhabench.benchmarks.sampling import Sampling


class Clock:
    """A virtual clock: a call advances it by the next of ``durations`` (seconds), cycling."""

    def __init__(self, durations):
        self.now, self.durations, self.calls = 0.0, list(durations), 0

    def perf_counter(self):
        return self.now

    def perf_counter_ns(self):
        return int(round(self.now * 1e9))

    def call(self):
        self.now += self.durations[self.calls % len(self.durations)]
        self.calls += 1


@pytest.fixture()
def clock(monkeypatch):
    made = []

    def make(durations):
        c = Clock(durations)
        monkeypatch.setattr(sampling, "time", c)
        made.append(c)
        return c
    return make


RULES = Sampling(target=0.02, min_samples=6, floor_samples=3, max_samples=50, max_seconds=10.0, warmup_seconds=0.0,
                 warmup_calls=2)


def coverage(n, k):
    """P(x_(k) <= median <= x_(n-1-k)) for n samples of a continuous distribution."""
    return 1 - 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n


@pytest.mark.parametrize("n", [6, 7, 10, 20, 41, 100])
def test_the_median_interval_is_the_narrowest_with_95_percent(n):
    low, high = sampling.median_interval_ranks(n, 0.95)
    assert high == n - 1 - low
    assert coverage(n, low) >= 0.95 and coverage(n, low + 1) < 0.95


def test_too_few_samples_have_no_interval():
    assert sampling.median_interval_ranks(5, 0.95) is None
    assert all(math.isnan(v) for v in sampling.median_interval([1.0, 2.0], 0.95))
    assert sampling.relative_halfwidth([1.0, 2.0]) == math.inf


def test_a_steady_call_stops_as_soon_as_its_median_is_known(clock):
    c = clock([0.010])
    found = sampling.sample(c.call, RULES)
    assert found.stopped == "converged" and len(found.seconds) == RULES.min_samples
    assert found.median == pytest.approx(0.010) and found.warmup_calls == 2


def test_a_noisy_call_samples_on_to_its_cap(clock):
    c = clock([0.010 * (1 + ((i * 37) % 101) / 101) for i in range(101)])  # spread evenly over 1-2x: no 2% median
    found = sampling.sample(c.call, RULES)
    assert found.stopped == "max_samples" and len(found.seconds) == RULES.max_samples
    c = clock([0.5, 0.9])
    found = sampling.sample(c.call, RULES)
    assert found.stopped == "max_seconds" and len(found.seconds) < RULES.max_samples
    assert sum(found.seconds) >= RULES.max_seconds


def test_a_slow_call_stops_at_the_floor_when_its_seconds_are_spent(clock):
    c = clock([4.0, 6.0])
    found = sampling.sample(c.call, RULES)
    assert found.stopped == "max_seconds" and len(found.seconds) == RULES.floor_samples


def test_plain_timing_runs_after_each_sample_outside_the_timed_region(clock):
    c = clock([0.010])
    plain = []

    def between():
        plain.append(sampling.plain_call(c.call))
        c.now += 5.0  # whatever runs between samples is not in the suite's samples
    found = sampling.sample(c.call, RULES, between=between)
    assert len(plain) == len(found.seconds) and found.seconds == pytest.approx([0.010] * len(found.seconds))
    assert plain == pytest.approx([0.010] * len(plain))


def test_calls_per_point_follow_the_rules():
    fast = sampling.calls_per_point(RULES, "track_time_forward", 1e-3)
    assert fast == pytest.approx(RULES.warmup_calls + RULES.max_samples)
    slow = sampling.calls_per_point(RULES, "track_time_forward", 5.0)
    assert slow == pytest.approx(RULES.warmup_calls + RULES.floor_samples)
    assert sampling.calls_per_point(RULES, "track_peakmem_forward", 1.0) == RULES.warmup_calls + RULES.memory_samples


def test_a_remeasurement_takes_more_samples(monkeypatch):
    monkeypatch.setenv(sampling.ENV_SCALE, "4")
    more = RULES.from_environment()
    assert (more.max_samples, more.max_seconds, more.memory_samples) == (200, 40.0, 4 * RULES.memory_samples)
    assert more.min_samples == 2 * RULES.min_samples
    for bad in ("lots", "0.5"):
        monkeypatch.setenv(sampling.ENV_SCALE, bad)
        with pytest.raises(ValueError, match=sampling.ENV_SCALE):
            RULES.from_environment()


def test_quartiles_interpolate_as_asv_does():
    assert sampling.quartiles([1.0, 2.0, 3.0, 4.0]) == pytest.approx((1.75, 2.5, 3.25))
    assert sampling.quartiles([7.0]) == (7.0, 7.0, 7.0)
