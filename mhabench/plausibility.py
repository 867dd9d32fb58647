"""Whether a measured line (one quantity of one adapter against the sequence length L) is physically plausible,
and how well a power law fits it.

The sweep measures a point again, with more samples and in a fresh process, when its line breaks a rule; the
report flags a line that still breaks one, with the rule and the numbers, and leaves it out of the verdict.
Both read the rules here, so what is measured again and what is flagged are the same thing.

The rules, each a physical bound rather than an expectation of speed:

- **time falls with L**: a longer sequence is never less work, so a time that drops as L grows, by more
  than the noise of both points (their interquartile ranges apart, and by more than the sampling target), is
  a measurement of something else (the machine was busy for one of the points). The interquartile range is
  the noise because it is defined for every point, however few its samples (a slow point may stop at three,
  where an interval of the median says little). Steps each within their noise that fall together (a
  negative exponent over the largest lengths) break it too.
- **memory grows faster than L²**: the largest thing attention holds is the [B, H, T, S] scores, so the
  per-call memory's exponent cannot exceed 2 (beyond ``MEMORY_EXPONENT_SLACK``, for allocator rounding).
- **time grows slower than L^0.8 for a kernel that holds the scores**: such a kernel writes T x S scores per
  head, so its time grows at least linearly once the work dominates the per-call overhead (the exponent is
  fitted over the largest lengths, where it does).
- **time grows faster than L^2.5**: attention's work grows as L² (the projections as L); the memory
  hierarchy stretches that a little as the scores leave a cache, not past 2.5. A steeper line had its
  longest points measured on a busier machine.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

FIT_POINTS = 3                  # the exponent is fitted over this many of the largest lengths measured
MEMORY_EXPONENT_MAX = 2.0
MEMORY_EXPONENT_SLACK = 0.25
TIME_EXPONENT_MIN = 0.8         # for a kernel that holds the scores
TIME_EXPONENT_MAX = 2.5
FALL_MARGIN = 0.02              # a fall smaller than the sampling target is noise, whatever the spreads say
GOOD_FIT, FAIR_FIT = 0.05, 0.15  # typical distance of the fitted points from the power law

# ``mhabench bench --verify``: the suite's time over plain timing of the same call in the same process; outside
# this range the suite's figure is not the call's time
VERIFY_RANGE = (0.95, 1.05)

TIME_FALLS = "time falls with L"
MEMORY_EXPONENT = "memory grows faster than L²"
TIME_EXPONENT = "time grows slower than L^0.8 for a kernel that holds the scores"
TIME_STEEP = "time grows faster than L^2.5"
RULES = (TIME_FALLS, MEMORY_EXPONENT, TIME_EXPONENT, TIME_STEEP)


@dataclass(frozen=True)
class Point:
    """One measured point: its median, and the spread of its samples (the quartiles; nan where exact or
    unknown)."""

    length: int
    value: float
    low: float = math.nan
    high: float = math.nan


@dataclass(frozen=True)
class Fit:
    """A power law value = c * L^exponent, fitted by least squares in log-log over the largest lengths."""

    exponent: float
    residual: float          # typical distance of the fitted points from the law, as a fraction (0.05 = 5%)
    lengths: tuple[int, ...]

    @property
    def quality(self) -> str:
        """How well a power law fits, in a word: good (the points within GOOD_FIT of it, typically), fair (within
        FAIR_FIT), poor (not one power law over these lengths), two points (an exact fit that tests nothing)."""
        if not math.isfinite(self.residual):
            return "no fit"
        if len(self.lengths) <= 2:
            return "two points"
        if self.residual <= GOOD_FIT:
            return "good"
        return "fair" if self.residual <= FAIR_FIT else "poor"


def power_fit(lengths, values, points: int = FIT_POINTS) -> Fit:
    """Least-squares slope of log(value) on log(length) over the ``points`` largest lengths: 1 for O(L), 2 for
    O(L²). The largest lengths only, because that is where the growth shows: at small L the per-call overhead
    and the projections (O(L)) dominate and pull a quadratic kernel's slope down (torch_sdpa's forward on a
    2-core CPU: 1.31 over 128-4096, 1.67 over 1024-4096). The residual is the root mean square of the fit's
    log residuals (over the degrees of freedom left), given as the fraction exp(r) - 1."""
    pairs = sorted((float(x), float(y)) for x, y in zip(lengths, values)
                   if math.isfinite(float(x)) and math.isfinite(float(y)) and float(x) > 0 and float(y) > 0)
    distinct = sorted({x for x, _ in pairs})
    if len(distinct) < 2:
        return Fit(math.nan, math.nan, tuple(int(x) for x in distinct))
    largest = set(distinct[-points:])
    xs = [math.log(x) for x, _ in pairs if x in largest]
    ys = [math.log(y) for x, y in pairs if x in largest]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    squares = sum((y - mean_y - slope * (x - mean_x)) ** 2 for x, y in zip(xs, ys))
    residual = math.expm1(math.sqrt(squares / max(1, len(xs) - 2)))
    return Fit(float(slope), float(residual), tuple(int(x) for x in sorted(largest)))


@dataclass(frozen=True)
class Breach:
    """A rule a line breaks: which, at which lengths (the points to measure again), and the numbers."""

    rule: str
    lengths: tuple[int, ...]
    detail: str


def _seconds(value: float) -> str:
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"


def _spread(point: Point) -> str:
    if not (math.isfinite(point.low) and math.isfinite(point.high)):
        return ""
    return f" (IQR {_seconds(point.low)}-{_seconds(point.high)})"


def falls(points: list[Point]) -> list[Breach]:
    """Each step to a longer length whose time is lower beyond the noise of both points."""
    ordered = sorted((p for p in points if math.isfinite(p.value) and p.value > 0), key=lambda p: p.length)
    out = []
    for shorter, longer in zip(ordered, ordered[1:]):
        if longer.value >= shorter.value * (1 - FALL_MARGIN):
            continue
        apart = not (math.isfinite(longer.high) and math.isfinite(shorter.low)) or longer.high < shorter.low
        if apart:
            out.append(Breach(TIME_FALLS, (shorter.length, longer.length),
                              f"L={longer.length}: {_seconds(longer.value)}{_spread(longer)} is "
                              f"{1 - longer.value / shorter.value:.0%} below L={shorter.length}: "
                              f"{_seconds(shorter.value)}{_spread(shorter)}"))
    return out


def check(points: list[Point], quantity: str, holds_scores: bool | None = None) -> tuple[Fit, list[Breach]]:
    """The power-law fit of a line and the rules it breaks. ``quantity``: "time" or "memory";
    ``holds_scores``: whether the kernel holds the [B, H, T, S] scores (None: unknown, the rule is not applied)."""
    if quantity not in ("time", "memory"):
        raise ValueError(f"quantity must be 'time' or 'memory', got {quantity!r}")
    fit = power_fit([p.length for p in points], [p.value for p in points])
    breaches = falls(points) if quantity == "time" else []
    if len(fit.lengths) >= FIT_POINTS and math.isfinite(fit.exponent):
        span = f"L={fit.lengths[0]}..{fit.lengths[-1]}"
        if quantity == "time" and fit.exponent < 0 and not breaches:  # each step within its noise, all of them down
            breaches.append(Breach(TIME_FALLS, fit.lengths, f"exponent {fit.exponent:.2f} over {span}: the time "
                                                            f"falls as L grows"))
        if quantity == "memory" and fit.exponent > MEMORY_EXPONENT_MAX + MEMORY_EXPONENT_SLACK:
            breaches.append(Breach(MEMORY_EXPONENT, fit.lengths,
                                   f"exponent {fit.exponent:.2f} over {span}: above 2, the scores' L²"))
        if quantity == "time" and holds_scores and fit.exponent < TIME_EXPONENT_MIN:
            breaches.append(Breach(TIME_EXPONENT, fit.lengths,
                                   f"exponent {fit.exponent:.2f} over {span}: below {TIME_EXPONENT_MIN}, though the "
                                   f"kernel writes L² scores"))
        if quantity == "time" and fit.exponent > TIME_EXPONENT_MAX:
            breaches.append(Breach(TIME_STEEP, fit.lengths,
                                   f"exponent {fit.exponent:.2f} over {span}: above {TIME_EXPONENT_MAX}, though the "
                                   f"work grows as L²"))
    return fit, breaches
