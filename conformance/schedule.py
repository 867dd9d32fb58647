"""What a conformance task costs, and which task a free worker takes next.

A task is one adapter x case x dtype: one evaluation, all its quantities. Its cost is estimated in
milliseconds as ``TASK_MS + golden_ms(case) + the adapter's own time``, where

- ``golden_ms`` is ``MS_PER_MIB`` per MiB of the case's float64 working set: the oracle's golden and
  reference, which every adapter's task computes, and which dominate on long cases (a 200 MiB case
  takes about 20 s whoever runs it);
- the adapter's own time is, by default (**the prior**), ``COMPILED_MS`` when the adapter compiles and
  ``EAGER_MS`` when it does not, or nothing for an invalid-input case (rejected before anything runs).
  An adapter *compiles* when its framework family is JAX (JAX compiles every operation it runs, under
  ``jit`` or not) or its default mode is ``compiled``. Rounded from full runs on a 2-core machine: a
  JAX-based adapter spends 1-3 s per case and dtype compiling small programs, an eager one 10-100 ms.
- **measured**, where a previous run into the same results directory timed the task: the sum of its
  rows' distinct ``duration_s`` (the rows of one path share one duration). Within a run, each
  adapter's estimates are also rescaled by how its finished tasks compared with them.

``--shard`` splits by the prior alone, so that every machine computes the same split.

The scheduler (:class:`Scheduler`) hands tasks to a fixed number of worker threads, each driving one
isolation worker process at a time. A thread keeps its adapter while that adapter has tasks left
(a new process pays the framework's import); when it runs out, it takes the adapter with the most
estimated work left per worker, joining one that other threads already serve when that work, shared
one more way, still outweighs starting a process. So the compile-bound adapters are split over every
core instead of finishing alone, each adapter's largest tasks first. Which process evaluates a task
never changes its rows: each evaluation starts from the case's seed.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field

from mhabench.impls import registry

from .cases import AnyCase

TASK_MS = 20          # sending a case, drawing its inputs, judging its rows
MS_PER_MIB = 100      # the float64 golden, the reference and the call, per MiB of working set
EAGER_MS = 60         # an eager framework's paths on a small case
COMPILED_MS = 2000    # a compiling framework's programs for a small case, compiled and run
STARTUP_MS = 4000     # a fresh worker process importing its framework (until one is measured)


def compiles(adapter: str) -> bool:
    """Whether the adapter's evaluations are dominated by compiling (see the module docstring)."""
    a = registry.get_adapter(adapter)
    return a.family == "jax" or a.default_mode == "compiled"


def golden_ms(case: AnyCase) -> int:
    return MS_PER_MIB * case.estimated_bytes() // 2**20


def estimate_ms(adapter: str, case: AnyCase, dtype: str, history: dict | None = None, *,
                _compiles: dict | None = None) -> int:
    """One task's estimated cost in whole milliseconds; without ``history`` (measured adapter times, see
    :func:`measured_costs`) the prior, identical on every machine."""
    measured = (history or {}).get((adapter, case.id, dtype))
    if measured is not None:
        own = measured
    elif not case.computes:
        own = 0
    else:
        heavy = compiles(adapter) if _compiles is None else _compiles.setdefault(adapter, compiles(adapter))
        own = COMPILED_MS if heavy else EAGER_MS
    return TASK_MS + golden_ms(case) + own


def prior_costs(adapters, cases, dtypes) -> dict[tuple[str, str, str], int]:
    """{(adapter, case id, dtype): prior ms} for every task of a run."""
    memo: dict = {}
    return {(a, c.id, d): estimate_ms(a, c, d, _compiles=memo) for a in adapters for c in cases
            for d in c.run_dtypes(dtypes)}


def measured_costs(rows) -> dict[tuple[str, str, str], int]:
    """{(adapter, case id, dtype): the adapter's own ms} from rows a run wrote (their ``duration_s``)."""
    durations: dict[tuple[str, str, str], set] = {}
    for row in rows:
        seconds = row.get("duration_s")
        if isinstance(seconds, (int, float)) and not isinstance(seconds, bool) and seconds >= 0:
            durations.setdefault((row["adapter"], row["case"], row["dtype"]), set()).add(round(float(seconds), 6))
    return {key: round(1000 * sum(values)) for key, values in durations.items()}


# ---- the scheduler --------------------------------------------------------------------------------------

@dataclass
class Task:
    adapter: str
    case: AnyCase
    dtypes: list[str]
    estimate_ms: float


@dataclass
class _Lane:
    """One adapter's tasks still to hand out, largest first, and what its finished ones cost."""

    tasks: list[Task]
    active: int = 0                 # threads serving this adapter now
    estimated_done: float = 0.0     # of finished tasks (fresh processes' first tasks left out)
    measured_done: float = 0.0
    startup_ms: float = STARTUP_MS
    remaining_ms: float = field(init=False)

    def __post_init__(self):
        self.tasks.sort(key=lambda t: (-t.estimate_ms, t.case.id))
        self.remaining_ms = sum(t.estimate_ms for t in self.tasks)

    @property
    def scale(self) -> float:
        """Measured over estimated, for this adapter's finished tasks (1 until a few are in)."""
        return self.measured_done / self.estimated_done if self.estimated_done > 0 else 1.0


class Scheduler:
    """Hands out tasks to worker threads (see the module docstring); thread-safe."""

    def __init__(self, tasks: list[Task]):
        by_adapter: dict[str, list[Task]] = {}
        for task in tasks:
            by_adapter.setdefault(task.adapter, []).append(task)
        self.lanes = {name: _Lane(list(ts)) for name, ts in by_adapter.items()}
        self._lock = threading.Lock()

    def next(self, current: str | None) -> Task | None:
        """The next task for a thread now serving ``current`` (None: none yet); None when it should stop.

        A different adapter than ``current`` means the thread must start (or switch to) that adapter's
        process."""
        with self._lock:
            lane = self.lanes.get(current) if current is not None else None
            if lane is not None and lane.tasks:
                return self._take(lane)
            if lane is not None:
                lane.active -= 1
            choice = self._choose()
            if choice is None:
                return None
            choice.active += 1
            return self._take(choice)

    def _choose(self) -> _Lane | None:
        best, best_share = None, -1.0
        for name in sorted(self.lanes):
            lane = self.lanes[name]
            if not lane.tasks:
                continue
            share = lane.remaining_ms * lane.scale / (lane.active + 1)
            if lane.active and share <= lane.startup_ms:
                continue  # another process for this adapter would cost more than it saves
            if share > best_share:
                best, best_share = lane, share
        return best

    def _take(self, lane: _Lane) -> Task:
        task = lane.tasks.pop(0)
        lane.remaining_ms -= task.estimate_ms
        return task

    def finished(self, task: Task, seconds: float, fresh: bool) -> None:
        """Record what ``task`` took. ``fresh``: it was a new process's first task, so it paid the imports."""
        with self._lock:
            lane = self.lanes[task.adapter]
            if fresh:
                lane.startup_ms = max(0.0, 1000 * seconds - task.estimate_ms * lane.scale)
            else:
                lane.estimated_done += task.estimate_ms
                lane.measured_done += 1000 * seconds
