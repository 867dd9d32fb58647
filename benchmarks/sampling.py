"""Adaptive sampling of one benchmark point, and the plain timing that checks it.

A point is sampled one call at a time (``time.perf_counter_ns`` around the call, which ends with the
adapter's own device sync) after a warm-up, and stops as soon as the 95% confidence interval of the median
lies within ``target`` (2%) of the median, or at the point's cap (``max_samples`` calls, or ``max_seconds``
of sampling once ``floor_samples`` are in). A quiet machine and a slow call stop early; a noisy one samples
more. The interval is distribution-free: order statistics of the sorted samples whose ranks the binomial
distribution gives (the interval asv and most texts use for a median).

``plain_call`` is the check ``mhabench bench --verify`` makes: the same call timed with nothing else in the
timed region, once after each of the suite's samples (after the same warm-up, in the same process), so the
suite's median and the plain median see the same load on a shared machine.
"""
from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, replace
from typing import Callable

ENV_SCALE = "MHABENCH_SAMPLING_SCALE"  # a re-measurement: this many times the samples and seconds


@dataclass(frozen=True)
class Sampling:
    """How one point is sampled: when a point has enough samples, and when it must stop anyway."""

    target: float = 0.02          # stop once the CI of the median is within this fraction of the median
    confidence: float = 0.95
    min_samples: int = 6          # the fewest for which a 95% distribution-free interval exists
    floor_samples: int = 3        # the fewest a slow point stops at when its seconds are spent
    max_samples: int = 60
    max_seconds: float = 2.0      # of sampling (the warm-up is not counted)
    warmup_seconds: float = 0.1
    warmup_calls: int = 2
    memory_samples: int = 5       # per-call peaks, after the same warm-up

    def scaled(self, factor: float) -> "Sampling":
        """More samples for a re-measurement: caps and memory samples times ``factor``."""
        if factor == 1:
            return self
        return replace(self, max_samples=int(self.max_samples * factor), max_seconds=self.max_seconds * factor,
                       min_samples=int(self.min_samples * max(1.0, factor / 2)),
                       memory_samples=int(self.memory_samples * factor))

    def from_environment(self) -> "Sampling":
        """This sampling scaled by ``MHABENCH_SAMPLING_SCALE`` (set by the sweep when it measures a point again)."""
        text = os.environ.get(ENV_SCALE)
        if not text:
            return self
        try:
            factor = float(text)
        except ValueError:
            raise ValueError(f"{ENV_SCALE}={text!r}: expected a number such as 4") from None
        if not factor >= 1:
            raise ValueError(f"{ENV_SCALE}={text!r}: must be at least 1")
        return self.scaled(factor)


def median_interval_ranks(n: int, confidence: float = 0.95) -> tuple[int, int] | None:
    """0-based ranks (lo, hi) of the sorted samples bounding the median with at least ``confidence``, the
    narrowest symmetric pair; None when ``n`` samples are too few for that confidence."""
    if n < 1:
        return None
    # X ~ Binomial(n, 1/2) samples fall below the median; [x_(k), x_(n-1-k)] misses it when X <= k or X >= n - k
    at_most, cdf = [], 0.0
    for k in range(n + 1):
        cdf += math.comb(n, k) / 2 ** n
        at_most.append(cdf)
    for k in range((n - 1) // 2, -1, -1):
        if 1 - 2 * at_most[k] >= confidence:
            return k, n - 1 - k
    return None


def median_interval(samples, confidence: float = 0.95) -> tuple[float, float]:
    """The distribution-free confidence interval of the median; (nan, nan) when too few samples."""
    ranks = median_interval_ranks(len(samples), confidence)
    if ranks is None:
        return math.nan, math.nan
    ordered = sorted(samples)
    return ordered[ranks[0]], ordered[ranks[1]]


def relative_halfwidth(samples, confidence: float = 0.95) -> float:
    """How far the median's interval reaches from the median, as a fraction of it (inf when undefined)."""
    low, high = median_interval(samples, confidence)
    middle = statistics.median(samples) if samples else math.nan
    if not (math.isfinite(low) and math.isfinite(high)) or not middle > 0:
        return math.inf
    return max(middle - low, high - middle) / middle


def quartiles(values) -> tuple[float, float, float]:
    """(q25, median, q75), interpolated as asv's statistics interpolate them (numpy's linear method)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q25, median, q75 = statistics.quantiles(values, n=4, method="inclusive")
    return q25, median, q75


@dataclass
class Samples:
    """What one point's sampling found: the per-call times (seconds) and why it stopped."""

    seconds: list[float]
    stopped: str             # "converged" | "max_samples" | "max_seconds"
    warmup_calls: int
    wall_seconds: float      # warm-up and sampling together

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        return median_interval(self.seconds, confidence)


def warm_up(call: Callable[[], object], sampling: Sampling) -> int:
    """Call until both the warm-up calls and seconds are spent; the number of calls."""
    calls, started = 0, time.perf_counter()
    while calls < sampling.warmup_calls or time.perf_counter() - started < sampling.warmup_seconds:
        call()
        calls += 1
    return calls


def sample(call: Callable[[], object], sampling: Sampling, between: Callable[[], object] | None = None) -> Samples:
    """Time ``call`` one call per sample until the median is known to ``sampling.target`` or a cap is hit.
    ``between``, when given, runs after each sample, outside the timed region (the plain timing of --verify)."""
    started = time.perf_counter()
    warm = warm_up(call, sampling)
    seconds: list[float] = []
    sampling_started = time.perf_counter()
    stopped = "max_samples"
    while len(seconds) < sampling.max_samples:
        t0 = time.perf_counter_ns()
        call()
        seconds.append((time.perf_counter_ns() - t0) * 1e-9)
        if between is not None:
            between()
        if len(seconds) >= sampling.min_samples and \
                relative_halfwidth(seconds, sampling.confidence) <= sampling.target:
            stopped = "converged"
            break
        if len(seconds) >= sampling.floor_samples and time.perf_counter() - sampling_started >= sampling.max_seconds:
            stopped = "max_seconds"
            break
    return Samples(seconds, stopped, warm, time.perf_counter() - started)


def calls_per_point(sampling: Sampling, method: str, seconds_per_call: float) -> float:
    """How many calls one point's measurement makes at most, for a call of ``seconds_per_call``: the warm-up,
    then the samples up to the point's cap; a memory point (``method`` names peakmem), the warm-up and its
    probes."""
    if "_error_" in method:  # an accuracy figure: no sampling, a share of its case's one measurement
        from .accuracy import CALLS_PER_METHOD
        return CALLS_PER_METHOD
    seconds_per_call = max(seconds_per_call, 1e-6)
    warmup = max(sampling.warmup_calls, sampling.warmup_seconds / seconds_per_call)
    if "peakmem" in method:
        return warmup + sampling.memory_samples
    return warmup + min(sampling.max_samples, max(sampling.floor_samples, sampling.max_seconds / seconds_per_call))


def plain_call(call: Callable[[], object]) -> float:
    """One call's time in seconds, with nothing else in the timed region."""
    t0 = time.perf_counter_ns()
    call()
    return (time.perf_counter_ns() - t0) * 1e-9
