"""A conformance run planned against a time budget: coverage first, and what does not fit accounted for.

A *cell* is one adapter x area x dtype. Every cell gets one task (one case in one dtype) before any cell
gets a second: round 1 holds the first task of every cell, round 2 the second, and so on. Within a cell the
cases go cheapest first by the prior cost (``schedule.estimate_ms`` without history), so the order is the
same on every machine and in every run, and a rerun runs the cases whose programs the last run compiled.

:func:`plan` takes whole rounds while the projected time fits the budget, then as much of the next round
as fits, and stops there: no task of round r + 1 is planned while a task of round r is left out. The
projected time is the tasks' estimated cost (``schedule``: measured on this machine where an earlier run
timed the task, else the prior) plus the process starts, shared by the worker processes, plus the
largest task, which may be the last to start (:class:`Projection`). The projection errs long: what the
plan leaves out still runs if the time is there once everything planned has started.

At run time the scheduler keeps the deadline (``schedule.Scheduler``): a task starts only if it ends in
time and leaves the time the lower rounds still pending elsewhere need. Everything planned out or
dropped is "not run: budget", counted per adapter (:func:`not_run_rows`).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable

from . import schedule
from .cases import AnyCase

TaskKey = tuple  # (adapter, case id, dtype)


@dataclass
class BudgetPlan:
    """Which tasks fit ``seconds``, in which coverage round each task is, and the projected times."""

    seconds: float
    rounds: dict                      # task key -> its coverage round (1 = the cell's first task)
    selected: list                    # the task keys planned, in coverage order
    estimated_s: float                # projected time of the selected tasks
    coverage_s: float                 # projected time of round 1 alone: one task per cell
    all_s: float                      # projected time of every task
    left_out: list = field(default_factory=list)  # task keys planned out, in coverage order

    @property
    def complete_coverage(self) -> bool:
        """Whether every cell has a task in the plan."""
        return not any(self.rounds[key] == 1 for key in self.left_out)


def coverage_rounds(tasks: list[tuple[str, AnyCase, str]]) -> dict[TaskKey, int]:
    """Each task's round in its cell (adapter x area x dtype), cheapest case first by the prior (within a cell
    the prior differs only by the case's size), then by case id."""
    cells: dict[tuple, list] = defaultdict(list)
    for adapter, case, dtype in tasks:
        cells[(adapter, case.area, dtype)].append((schedule.golden_ms(case), case.id, (adapter, case.id, dtype)))
    rounds = {}
    for members in cells.values():
        for number, (_, _, key) in enumerate(sorted(members), 1):
            rounds[key] = number
    return rounds


class Projection:
    """The projected wall time of a set of tasks on ``jobs`` worker processes.

    The tasks' work, and the process starts: an adapter's coverage round and its later rounds are each
    served by as many processes as the scheduler would start for them (another joins while the work left
    per process exceeds a start, up to ``jobs``), all shared by the processes; plus the largest task, which
    may start last."""

    def __init__(self, startup_ms: Callable[[str], float], jobs: int):
        self.startup_ms, self.jobs = startup_ms, max(1, jobs)
        self.parts: dict[tuple[str, bool], float] = {}  # (adapter, later rounds) -> its tasks' work
        self.total_ms, self.largest_ms = 0.0, 0.0

    def _part_ms(self, adapter: str, work: float) -> float:
        start = self.startup_ms(adapter)
        processes = min(self.jobs, max(1, int(work // start))) if start > 0 else 1
        return work + processes * start

    def _added(self, adapter: str, number: int, ms: float) -> float:
        """How much the total grows with one more task of ``adapter``, of round ``number``, costing ``ms``."""
        key = (adapter, number > 1)
        work = self.parts.get(key)
        before = 0.0 if work is None else self._part_ms(adapter, work)
        return self._part_ms(adapter, (work or 0.0) + ms) - before

    def with_task(self, adapter: str, number: int, ms: float) -> float:
        """The projection (ms) with one more task."""
        return (self.total_ms + self._added(adapter, number, ms)) / self.jobs + max(self.largest_ms, ms)

    def add(self, adapter: str, number: int, ms: float) -> None:
        self.total_ms += self._added(adapter, number, ms)
        self.parts[(adapter, number > 1)] = self.parts.get((adapter, number > 1), 0.0) + ms
        self.largest_ms = max(self.largest_ms, ms)

    @property
    def ms(self) -> float:
        return self.total_ms / self.jobs + self.largest_ms if self.parts else 0.0


def plan(tasks: list[tuple[str, AnyCase, str]], seconds: float, estimate_ms: Callable[[str, AnyCase, str], float],
         startup_ms: Callable[[str], float], jobs: int, done: set | frozenset = frozenset()) -> BudgetPlan:
    """The tasks (adapter, case, dtype) to run within ``seconds``, coverage first.

    ``estimate_ms(adapter, case, dtype)`` and ``startup_ms(adapter)`` are the cost model; ``done``: task keys
    already run (a resumed run), which count for coverage and cost nothing."""
    rounds = coverage_rounds(tasks)
    todo = [(rounds[(a, c.id, d)], a, c, d) for a, c, d in tasks if (a, c.id, d) not in done]
    # cheapest first within a round, so a round cut short leaves out its costliest tasks
    costed = sorted(((r, estimate_ms(a, c, d), a, c.id, d) for r, a, c, d in todo), key=lambda t: (t[0], t[1], t[2:]))
    budget_ms = 1000 * seconds
    everything, first_round = Projection(startup_ms, jobs), Projection(startup_ms, jobs)
    chosen = Projection(startup_ms, jobs)
    selected, left_out, closed_after = [], [], None
    for number, ms, adapter, case_id, dtype in costed:
        key = (adapter, case_id, dtype)
        everything.add(adapter, number, ms)
        if number == 1:
            first_round.add(adapter, number, ms)
        if closed_after is not None and number > closed_after:
            left_out.append(key)
            continue
        if chosen.with_task(adapter, number, ms) <= budget_ms:
            chosen.add(adapter, number, ms)
            selected.append(key)
        else:
            left_out.append(key)
            closed_after = number  # later rounds wait for this one: nothing of them is planned
    return BudgetPlan(seconds, rounds, selected, chosen.ms / 1000, first_round.ms / 1000, everything.ms / 1000,
                      left_out)


def not_run_rows(keys, rows_of: Callable[[TaskKey], int]) -> dict[str, int]:
    """Rows per adapter of the task keys not run, adapters in name order (those with none left out)."""
    counts: dict[str, int] = defaultdict(int)
    for key in keys:
        counts[key[0]] += rows_of(key)
    return {adapter: counts[adapter] for adapter in sorted(counts) if counts[adapter]}
