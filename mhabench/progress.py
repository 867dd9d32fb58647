"""Progress of a long run: work done against work planned, per group, and the time left.

Conformance counts rows per adapter, the benchmark sweep benchmarks per chunk. Groups differ a lot
in cost per item (a JAX-based adapter's row costs tens of times a NumPy one's), so the fraction done
weighs each group by its estimated cost, not by its item count, and the time left follows from that
fraction and the time so far.

:meth:`Tally.line` is the one plain progress line, written to a log every few seconds when no
terminal shows a bar; ``mhabench run`` reads it back from its child processes with :func:`parse`.
"""
from __future__ import annotations

import math
import re
import time

_LINE = re.compile(r"(?:^|\s)progress: (\d+)/(\d+) (\w+)")


class Tally:
    """Done and planned per group. ``weights``: each group's estimated cost (default: its item count);
    ``plan``: what the run set out to do, for whoever shows the tally (a conformance session's plan)."""

    def __init__(self, planned: dict[str, int], weights: dict[str, float] | None = None,
                 done: dict[str, int] | None = None, unit: str = "rows", clock=time.monotonic, plan=None):
        self.plan = plan
        self.planned = {g: int(n) for g, n in planned.items()}
        self.done = {g: min(int((done or {}).get(g, 0)), n) for g, n in self.planned.items()}
        self.initial = dict(self.done)  # already done when this run started (a resumed run)
        weights = weights or {}
        self.weights = {g: float(weights.get(g, n)) for g, n in self.planned.items()}
        self.unit, self.clock = unit, clock
        self.started = clock()

    def add(self, group: str, count: int = 1) -> None:
        if group not in self.planned:  # an item nobody planned (should not happen): count it visibly
            self.planned[group], self.done[group], self.initial[group], self.weights[group] = 0, 0, 0, 0.0
        self.done[group] += count
        self.planned[group] = max(self.planned[group], self.done[group])

    def drop(self, group: str, count: int) -> None:
        """Items planned that will not be done after all (a time budget ran out): planned no more."""
        if group in self.planned:
            self.planned[group] = max(self.done[group], self.planned[group] - count)

    @property
    def total(self) -> int:
        return sum(self.planned.values())

    @property
    def completed(self) -> int:
        return sum(self.done.values())

    def fraction(self) -> float:
        """Of this run's work, the part done, each group weighted by its estimated cost."""
        weight = done = 0.0
        for g, planned in self.planned.items():
            todo = planned - self.initial[g]
            if todo <= 0:
                continue
            weight += self.weights[g]
            done += self.weights[g] * (self.done[g] - self.initial[g]) / todo
        return done / weight if weight > 0 else 1.0

    def elapsed(self) -> float:
        return self.clock() - self.started

    def eta(self) -> float:
        """Seconds left at this run's pace so far (NaN before anything is done)."""
        f = self.fraction()
        if f >= 1.0:
            return 0.0
        return self.elapsed() * (1 - f) / f if f > 0 else math.nan

    def running(self) -> list[str]:
        """Groups started and not finished."""
        return [g for g, n in self.planned.items() if 0 < self.done[g] - self.initial[g] and self.done[g] < n]

    def line(self) -> str:
        """``progress: 120/480 rows (25%), 12 s elapsed, about 36 s left; jax_dpa 10/48, ...``"""
        eta = self.eta()
        left = "done" if self.completed >= self.total else \
            ("time left unknown" if math.isnan(eta) else f"about {format_seconds(eta)} left")
        text = (f"progress: {self.completed}/{self.total} {self.unit} ({100 * self.fraction():.0f}% of the "
                f"estimated work), {format_seconds(self.elapsed())} elapsed, {left}")
        running = self.running()
        if running:
            text += "; " + ", ".join(f"{g} {self.done[g]}/{self.planned[g]}" for g in running)
        return text


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds} s" if seconds < 120 else f"{seconds // 60} min {seconds % 60:02d} s"


def parse(line: str) -> tuple[int, int, str] | None:
    """(done, total, unit) from a :meth:`Tally.line` (anywhere in ``line``), else None."""
    match = _LINE.search(line)
    return (int(match.group(1)), int(match.group(2)), match.group(3)) if match else None
