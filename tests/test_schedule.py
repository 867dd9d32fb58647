"""Scheduling conformance work by estimated cost: no core idles while one adapter finishes alone, and the rows
are those of a serial run."""
import heapq
from collections import Counter

import pytest

from mhabench.conformance import cases, runner, schedule
from mhabench.conformance.cases import InvalidCase, default_cases


def _tasks(seconds_by_adapter: dict[str, list[float]]) -> list[schedule.Task]:
    case = default_cases()[0]
    return [schedule.Task(adapter, case, [f"d{i}"], 1000 * s) for adapter, durations in seconds_by_adapter.items()
            for i, s in enumerate(durations)]


def simulate(scheduler: schedule.Scheduler, jobs: int, startup: float, true_seconds=None):
    """Run the scheduler's decisions on ``jobs`` simulated threads; (makespan, processes started per adapter,
    tasks handed out). A task takes its estimate (or ``true_seconds[adapter]`` x it), a new process ``startup``."""
    clock = [(0.0, thread) for thread in range(jobs)]
    current = [None] * jobs
    started, handed, end = Counter(), [], 0.0
    while clock:
        now, thread = heapq.heappop(clock)
        task = scheduler.next(current[thread])
        if task is None:
            end = max(end, now)
            continue
        fresh = task.adapter != current[thread]
        current[thread] = task.adapter
        seconds = task.estimate_ms / 1000 * (true_seconds or {}).get(task.adapter, 1.0) + (startup if fresh else 0)
        started[task.adapter] += fresh
        handed.append((task.adapter, task.dtypes[0]))
        scheduler.finished(task, seconds, fresh)
        heapq.heappush(clock, (now + seconds, thread))
    return end, started, handed


def one_process_per_adapter(seconds_by_adapter, jobs, startup):
    """The makespan of the old runner: each adapter whole on one thread, in the given order."""
    loads = [0.0] * jobs
    for durations in seconds_by_adapter.values():
        i = loads.index(min(loads))
        loads[i] += startup + sum(durations)
    return max(loads)


WORK = {"jax_dpa": [3.0] * 40, "flax_mha": [2.0] * 40, "keras_mha@jax": [4.0] * 40,
        "torch_sdpa": [0.05] * 40, "numpy_oracle": [0.01] * 40, "keras_mha": [0.1] * 40}


def test_every_task_is_handed_out_exactly_once():
    _, _, handed = simulate(schedule.Scheduler(_tasks(WORK)), jobs=3, startup=2.0)
    assert Counter(handed) == Counter((a, f"d{i}") for a, ds in WORK.items() for i in range(len(ds)))


@pytest.mark.parametrize("jobs", [2, 4])
def test_compile_bound_adapters_are_split_so_no_core_idles(jobs):
    startup = 2.0
    makespan, started, _ = simulate(schedule.Scheduler(_tasks(WORK)), jobs, startup)
    total = sum(sum(d) for d in WORK.values())
    ideal = total / jobs + startup
    old = one_process_per_adapter(WORK, jobs, startup)
    assert makespan <= 1.15 * ideal + max(max(d) for d in WORK.values()), (makespan, ideal)
    assert makespan < old
    assert max(started[a] for a in ("jax_dpa", "flax_mha", "keras_mha@jax")) > 1  # some heavy adapter was split
    assert started["numpy_oracle"] == started["torch_sdpa"] == 1  # starting another process would cost more


def test_a_wrong_prior_is_corrected_by_what_finished_tasks_took():
    """Estimates say flax_mha is the heaviest; it really is quick, jax_dpa slow: the split follows the truth."""
    work = {"jax_dpa": [1.0] * 60, "flax_mha": [3.0] * 60}
    truth = {"jax_dpa": 4.0, "flax_mha": 0.2}
    makespan, started, _ = simulate(schedule.Scheduler(_tasks(work)), jobs=2, startup=1.0, true_seconds=truth)
    real_total = 60 * 4.0 + 60 * 0.6
    assert started["jax_dpa"] == 2
    assert makespan < 0.5 * real_total + 10


def test_the_largest_tasks_of_an_adapter_go_first():
    scheduler = schedule.Scheduler(_tasks({"a": [1.0, 5.0, 3.0]}))
    order = []
    while (task := scheduler.next("a" if order else None)) is not None:
        order.append(task.estimate_ms)
    assert order == [5000, 3000, 1000]


def test_prior_weighs_compiling_adapters_and_large_cases():
    small = next(c for c in default_cases() if c.area == "masks")
    large = max(default_cases(), key=lambda c: c.estimated_bytes())
    invalid = next(c for c in default_cases() if isinstance(c, InvalidCase))
    assert schedule.compiles("jax_dpa") and schedule.compiles("keras_mha@jax") and not schedule.compiles("torch_sdpa")
    assert schedule.estimate_ms("jax_dpa", small, "float32") > 10 * schedule.estimate_ms("torch_sdpa", small, "float32")
    assert schedule.estimate_ms("torch_sdpa", large, "float32") > 10 * schedule.estimate_ms("torch_sdpa", small,
                                                                                             "float32")
    assert schedule.estimate_ms("jax_dpa", invalid, "float32") == schedule.TASK_MS
    measured = {("jax_dpa", small.id, "float32"): 7}
    assert schedule.estimate_ms("jax_dpa", small, "float32", measured) == schedule.TASK_MS + \
        schedule.golden_ms(small) + 7


def test_measured_costs_sum_the_distinct_path_durations():
    rows = [{"adapter": "a", "case": "c", "dtype": "float32", "duration_s": d} for d in (0.5, 0.5, 0.25, None)]
    assert schedule.measured_costs(rows) == {("a", "c", "float32"): 750}


@pytest.mark.slow
def test_scheduled_rows_equal_serial_rows(monkeypatch):
    """A small matrix run serially (one process at a time) and scheduled (three threads, an adapter split over
    several processes): the same rows with the same statuses and figures."""
    selection = [c for c in default_cases() if c.area == "masks"][:8] + \
        [c for c in default_cases() if isinstance(c, InvalidCase)][:2]
    adapters, dtypes = ["numpy_oracle", "torch_sdpa"], ["float32", "float64"]
    serial = runner.run_rows(adapters, selection, dtypes, jobs=1)
    started = Counter()
    make_worker = runner.adapter_worker

    def counting(name, setup, timeout, switches=None):
        started[name] += 1
        return make_worker(name, setup, timeout, switches)
    monkeypatch.setattr(runner, "adapter_worker", counting)
    # measured costs that make torch_sdpa worth two processes
    history = {("torch_sdpa", c.id, d): 30_000 for c in selection for d in dtypes}
    scheduled = runner.run_rows(adapters, selection, dtypes, jobs=3, history=history)
    assert started["torch_sdpa"] >= 2
    strip = lambda rows: {r.row_id: r.replace(duration_s=None) for r in rows}
    assert len(serial) == len(scheduled) == len(strip(serial))
    assert strip(scheduled) == strip(serial)
    assert {r["status"] for r in serial} >= {"pass"}
    expected = {rid for a in adapters for c in selection for rid in runner.expected_row_ids(a, c, dtypes)}
    assert set(strip(serial)) == expected


def test_default_jobs_is_one_per_core_within_the_memory_available(monkeypatch):
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(runner, "available_memory", lambda: 9 << 30)
    assert runner.default_jobs() == 4  # 2 GiB a worker process
    monkeypatch.setattr(runner, "available_memory", lambda: 1 << 30)
    assert runner.default_jobs() == 1
    monkeypatch.setattr(runner, "available_memory", lambda: None)
    assert runner.default_jobs() == 64
