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
- **measured**, where an earlier run on this machine timed the task (kept in the cache's ``costs/``
  folder, :func:`learned_costs`) or a previous run into the same results directory did: the sum of its
  rows' distinct ``duration_s`` (the rows of one path share one duration). Within a run, each
  adapter's estimates are also rescaled by how its finished tasks compared with them. A process start
  is ``STARTUP_MS`` until one is measured, then what was measured.

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

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from mhabench import results
from mhabench.impls import cache, registry

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


# ---- what this machine measured, kept between runs -------------------------------------------------------

LEARNED_FILE = "conformance.json"  # in the cache's costs/ folder


def learned_path() -> Path | None:
    where = cache.folder("costs")
    return None if where is None else where / LEARNED_FILE


def learned_costs() -> tuple[dict[tuple[str, str, str], int], dict[str, float]]:
    """(task costs, process starts) earlier runs measured on this machine: {(adapter, case id, dtype): ms} as
    :func:`measured_costs` gives them, {adapter: ms}. Empty when nothing was kept or the file is unreadable."""
    path = learned_path()
    try:
        data = json.loads(path.read_text()) if path is not None and path.is_file() else {}
        tasks = {tuple(key.split("\t")): int(ms) for key, ms in data.get("tasks", {}).items()}
        startup = {str(name): float(ms) for name, ms in data.get("startup_ms", {}).items()}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}, {}
    return {key: ms for key, ms in tasks.items() if len(key) == 3 and ms >= 0}, startup


def remember_costs(measured: dict[tuple[str, str, str], int], startup: dict[str, float]) -> None:
    """Merge a run's measured task costs and process starts into what this machine keeps (newest wins)."""
    path = learned_path()
    if path is None or not (measured or startup):
        return
    tasks, starts = learned_costs()
    tasks.update(measured)
    starts.update(startup)
    data = {"version": 1, "tasks": {"\t".join(key): ms for key, ms in sorted(tasks.items())},
            "startup_ms": {name: round(ms) for name, ms in sorted(starts.items())}}
    try:
        results.atomic_write(path, json.dumps(data))
    except OSError:  # an unwritable cache costs planning accuracy, never a result
        pass


class _Wait:
    def __repr__(self):
        return "WAIT"


WAIT = _Wait()  # Scheduler.next: nothing this thread may start yet; wait for a task to finish and ask again


# ---- the scheduler --------------------------------------------------------------------------------------

@dataclass
class Task:
    adapter: str
    case: AnyCase
    dtypes: list[str]
    estimate_ms: float
    round: int = 1  # its coverage round under a time budget (``budget``); every task is round 1 without one


@dataclass
class _Lane:
    """One adapter's tasks still to hand out (lowest coverage round first, largest first within a round), and
    what its finished ones cost."""

    tasks: list[Task]
    active: int = 0                 # threads serving this adapter now
    estimated_done: float = 0.0     # of finished tasks (fresh processes' first tasks left out)
    measured_done: float = 0.0
    startup_ms: float = STARTUP_MS
    remaining_ms: float = field(init=False)
    first_round_ms: float = field(init=False)  # estimated cost of its round-1 tasks still to hand out
    first_round_left: int = field(init=False)  # and how many they are

    def __post_init__(self):
        tasks, self.tasks = self.tasks, []
        self.remaining_ms = self.first_round_ms = 0.0
        self.first_round_left = 0
        self.add(tasks)

    @property
    def scale(self) -> float:
        """Measured over estimated, for this adapter's finished tasks (1 until a few are in)."""
        return self.measured_done / self.estimated_done if self.estimated_done > 0 else 1.0

    def add(self, tasks: list[Task]) -> None:
        self.tasks = sorted(self.tasks + tasks, key=lambda t: (t.round, -t.estimate_ms, t.case.id))
        self.remaining_ms += sum(t.estimate_ms for t in tasks)
        self.first_round_ms += sum(t.estimate_ms for t in tasks if t.round == 1)
        self.first_round_left += sum(t.round == 1 for t in tasks)

    def pop(self) -> Task:
        task = self.tasks.pop(0)
        self.remaining_ms -= task.estimate_ms
        if task.round == 1:
            self.first_round_ms -= task.estimate_ms
            self.first_round_left -= 1
        return task


class Scheduler:
    """Hands out tasks to worker threads (see the module docstring); thread-safe.

    With a ``deadline`` (a time on ``clock``, in seconds), a task is handed out only if it ends before the
    deadline, by its estimate rescaled by what the adapter's finished tasks took, plus a process start when
    the thread switches adapter. Coverage first: a task of a later round starts only once every round-1 task
    is handed out, and while no adapter being served needs help to end its round 1 in time; until then the
    thread serves such an adapter instead, or waits (``WAIT``), which costs it at most about a process
    start (an adapter with more round-1 work left than that is worth joining). A task that cannot end in
    time is dropped (``dropped``; ``on_drop(task)`` sees each): not run, for the budget, and so is a task
    still running ``grace`` seconds past the deadline (``timeout``, ``drop``); once a round-1 task is
    dropped, so is every later-round task, so no cell gets a second row while another has none. ``extra``:
    tasks planned out, handed out under the same rules once every planned task is (the estimates were
    pessimistic). ``startup_ms`` seeds the process starts measured on earlier runs; ``measured_startup``
    holds this run's."""

    def __init__(self, tasks: list[Task], *, deadline: float | None = None, grace: float = 0.0, jobs: int = 1,
                 clock=time.monotonic, startup_ms: dict | None = None, on_drop=None, extra: list[Task] = ()):
        self.lanes: dict[str, _Lane] = {}
        self._startup_ms = dict(startup_ms or {})
        self._add(tasks)
        self.extra = list(extra)
        self.deadline, self.grace, self.jobs, self.clock = deadline, grace, max(1, jobs), clock
        self.on_drop = on_drop
        self.dropped: list[Task] = []
        self.measured_startup: dict[str, float] = {}
        self._lock = threading.Condition()

    def _add(self, tasks: list[Task]) -> None:
        by_adapter: dict[str, list[Task]] = {}
        for task in tasks:
            by_adapter.setdefault(task.adapter, []).append(task)
        for name, more in by_adapter.items():
            if name not in self.lanes:
                self.lanes[name] = _Lane([], startup_ms=self._startup_ms.get(name, STARTUP_MS))
            self.lanes[name].add(more)

    def timeout(self, limit: float) -> float:
        """A task's timeout: ``limit``, or less where the deadline's grace ends sooner."""
        if self.deadline is None:
            return limit
        return min(limit, max(0.1, self.deadline + self.grace - self.clock()))

    def drop(self, task: Task) -> None:
        """Record a task that was handed out but stopped at the deadline's grace: not run."""
        with self._lock:
            self._record_drop(task)
            self._lock.notify_all()

    def _record_drop(self, task: Task) -> None:
        self.dropped.append(task)
        if self.on_drop is not None:
            self.on_drop(task)

    def next(self, current: str | None):
        """The next task for a thread now serving ``current`` (None: none yet); None when it should stop;
        ``WAIT`` when its tasks wait for lower rounds other threads are running (call ``wait``, then ask again,
        keeping its adapter).

        A different adapter than ``current`` means the thread must start (or switch to) that adapter's
        process."""
        with self._lock:
            lane = self.lanes.get(current) if current is not None else None
            if lane is not None:
                task = self._take(lane, fresh=False)
                if task is not None:
                    return task
                lane.active -= 1
            tried: set[int] = set()
            while (choice := self._choose(tried)) is not None:
                task = self._take(choice, fresh=True)
                if task is not None:
                    choice.active += 1
                    return task
                tried.add(id(choice))
            if self.extra and not any(other.tasks for other in self.lanes.values()):
                self._add(self.extra)  # everything planned is handed out and time is left: what was planned out
                self.extra = []
                if lane is not None:
                    lane.active += 1
                return self.next(current)
            others_busy = any(other.active for other in self.lanes.values())
            if self.deadline is not None and others_busy and any(other.tasks for other in self.lanes.values()):
                if lane is not None:
                    lane.active += 1  # it keeps its adapter while it waits
                return WAIT
            return None

    def wait(self, seconds: float) -> None:
        """Until a task finishes (or ``seconds`` pass): what a thread told ``WAIT`` does."""
        with self._lock:
            self._lock.wait(seconds)

    def _choose(self, tried=frozenset()) -> _Lane | None:
        """The lane with the lowest coverage round pending; then the most estimated work left per thread (the
        longest work starts first, so no thread idles at the end), except for the coverage round under a
        deadline: the least first, so the most adapters reach their coverage in the time."""
        best, best_rank = None, None
        for name in sorted(self.lanes):
            lane = self.lanes[name]
            if not lane.tasks or id(lane) in tried:
                continue
            share = lane.remaining_ms * lane.scale / (lane.active + 1)
            if lane.active and share <= lane.startup_ms and not self._needs_help(lane):
                continue  # another process for this adapter would cost more than it saves
            if self.deadline is not None and lane.tasks[0].round == 1:
                rank = (1, lane.first_round_ms * lane.scale + (0.0 if lane.active else lane.startup_ms))
            else:
                rank = (lane.tasks[0].round, -share)
            if best_rank is None or rank < best_rank:
                best, best_rank = lane, rank
        return best

    def _take(self, lane: _Lane, fresh: bool) -> Task | None:
        """The lane's next task this thread may start now; tasks that cannot end in time are dropped. None when
        the lane has none left, or its next one must wait for lower rounds elsewhere."""
        while lane.tasks:
            if self.deadline is None:
                return lane.pop()
            task = lane.tasks[0]
            work = task.estimate_ms * lane.scale / 1000
            end = self.clock() + work + (lane.startup_ms / 1000 if fresh else 0.0)
            coverage_lost = task.round > 1 and any(t.round == 1 for t in self.dropped)
            if end > self.deadline or coverage_lost:
                if not coverage_lost and fresh and lane.active and self.clock() + work <= self.deadline:
                    return None  # too late to start a process for it, not for the thread serving it
                self._record_drop(lane.pop())
                continue
            if task.round > 1 and (any(other.first_round_left for other in self.lanes.values())
                                   or any(self._needs_help(other) for other in self.lanes.values()
                                          if other is not lane)):
                return None  # coverage first: every round-1 task is handed out before a later one starts
            return lane.pop()
        return None

    def _needs_help(self, lane: _Lane) -> bool:
        """Whether the threads serving ``lane`` would end its round 1 past the deadline, and one more process
        would end it sooner: then a thread joins it rather than run a later round."""
        if self.deadline is None or not lane.active or not lane.first_round_left:
            return False
        alone = lane.first_round_ms * lane.scale / lane.active
        joined = lane.startup_ms + lane.first_round_ms * lane.scale / (lane.active + 1)
        return self.clock() + alone / 1000 > self.deadline and joined < alone

    def finished(self, task: Task, seconds: float, fresh: bool) -> None:
        """Record what ``task`` took. ``fresh``: it was a new process's first task, so it paid the imports."""
        with self._lock:
            lane = self.lanes[task.adapter]
            if fresh:
                lane.startup_ms = max(0.0, 1000 * seconds - task.estimate_ms * lane.scale)
                self.measured_startup[task.adapter] = lane.startup_ms
            else:
                lane.estimated_done += task.estimate_ms
                lane.measured_done += 1000 * seconds
            self._lock.notify_all()
