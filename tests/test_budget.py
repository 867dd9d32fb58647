"""The time budget's planner on a fake cost model: coverage first, the deadline honoured, and what did not run
counted per adapter, never silent."""
import heapq
import json
from collections import Counter, defaultdict

import pytest

from mhabench import budget as job_budget
from mhabench import results
from mhabench.conformance import budget, schedule
from mhabench.conformance.cases import Case

AREAS = ("shapes", "masks", "modern")
DTYPES = ("float32", "float16")
ADAPTERS = ("cheap", "compiling", "exporting")
# what a task of each adapter costs, in ms (the fake cost model); a process start costs STARTUP_MS
COST_MS = {"cheap": 50.0, "compiling": 2000.0, "exporting": 800.0}
STARTUP_MS = {"cheap": 500.0, "compiling": 3000.0, "exporting": 4000.0}


def _cases(per_area: int = 4) -> list[Case]:
    # sizes grow with the index, so within a cell the cases' order by the prior is their index
    return [Case(f"{area}-{i}", area, {"num_heads": 2, "key_dim": 4}, q_shape=(4 * (i + 1),), k_shape=(4 * (i + 1),))
            for area in AREAS for i in range(per_area)]


def _tasks(cases=None):
    return [(a, c, d) for a in ADAPTERS for c in (cases or _cases()) for d in DTYPES]


def _estimate(adapter, case, dtype):
    return COST_MS[adapter]


def _startup(adapter):
    return STARTUP_MS[adapter]


def _cell(key, cases):
    adapter, case_id, dtype = key
    return adapter, cases[case_id].area, dtype


def test_every_cell_gets_a_task_before_any_gets_a_second():
    cases = _cases()
    by_id = {c.id: c for c in cases}
    full = budget.plan(_tasks(cases), 1e9, _estimate, _startup, jobs=2)
    round_one = budget.plan(_tasks(cases), full.coverage_s, _estimate, _startup, jobs=2)
    cells = {_cell(k, by_id) for k in full.rounds}
    assert len(cells) == len(ADAPTERS) * len(AREAS) * len(DTYPES)
    # the budget of round 1 holds exactly one task per cell, the cheapest case of each
    assert Counter(_cell(k, by_id) for k in round_one.selected) == Counter({cell: 1 for cell in cells})
    assert {k[1] for k in round_one.selected} == {f"{area}-0" for area in AREAS}
    assert round_one.complete_coverage
    # every budget between: whole rounds, then part of the next; never a round past one not taken whole
    for seconds in (full.coverage_s * 0.5, full.coverage_s * 1.3, full.all_s * 0.7, full.all_s):
        chosen = budget.plan(_tasks(cases), seconds, _estimate, _startup, jobs=2)
        taken = Counter(full.rounds[k] for k in chosen.selected)
        offered = Counter(full.rounds.values())
        highest = max(taken, default=0)
        assert all(taken[r] == offered[r] for r in range(1, highest)), (seconds, taken)
        assert chosen.estimated_s <= seconds
        assert set(chosen.selected) | set(chosen.left_out) == set(full.rounds)
        assert not set(chosen.selected) & set(chosen.left_out)
    assert set(full.selected) == set(full.rounds) and not full.left_out


def test_a_short_budget_leaves_out_the_costliest_cells_first_and_says_so():
    cases = _cases()
    full = budget.plan(_tasks(cases), 1e9, _estimate, _startup, jobs=2)
    short = budget.plan(_tasks(cases), full.coverage_s * 0.5, _estimate, _startup, jobs=2)
    assert not short.complete_coverage
    assert all(short.rounds[k] == 1 for k in short.selected)
    left_out_adapters = Counter(k[0] for k in short.left_out if short.rounds[k] == 1)
    assert "cheap" not in left_out_adapters and left_out_adapters["compiling"] > 0


def test_tasks_already_done_count_for_coverage_and_cost_nothing():
    cases = _cases()
    full = budget.plan(_tasks(cases), 1e9, _estimate, _startup, jobs=2)
    done = {k for k, r in full.rounds.items() if r == 1}
    resumed = budget.plan(_tasks(cases), full.coverage_s, _estimate, _startup, jobs=2, done=done)
    assert not set(resumed.selected) & done
    assert {resumed.rounds[k] for k in resumed.selected} == {2}  # the next round goes on where the last stopped


# ---- the deadline, on simulated worker threads ----------------------------------------------------------

def simulate(tasks, deadline, grace, jobs, truth, extra=()):
    """Run the scheduler with a fake clock on ``jobs`` simulated threads; a task takes ``truth[adapter]`` times
    its estimate, a new process its adapter's STARTUP_MS. A task still running at ``deadline + grace`` is stopped
    there (the runner's clipped timeout) and dropped. (end time, task keys run, start times of each key)"""
    now = [0.0]
    scheduler = schedule.Scheduler(tasks, deadline=deadline, grace=grace, jobs=jobs, clock=lambda: now[0],
                                   startup_ms=dict(STARTUP_MS), extra=list(extra))
    events = [(0.0, thread) for thread in range(jobs)]
    current = [None] * jobs
    ran, started, end = [], {}, 0.0
    while events:
        now[0], thread = heapq.heappop(events)
        task = scheduler.next(current[thread])
        if task is None:
            end = max(end, now[0])
            continue
        if task is schedule.WAIT:  # until another thread's task ends
            assert events, "told to wait with no other thread running"
            heapq.heappush(events, (events[0][0] + 1e-9, thread))
            continue
        fresh = task.adapter != current[thread]
        current[thread] = task.adapter
        seconds = task.estimate_ms / 1000 * truth.get(task.adapter, 1.0) + (STARTUP_MS[task.adapter] / 1000 if fresh else 0)
        stop = now[0] + min(seconds, scheduler.timeout(1e9))
        if now[0] + seconds > deadline + grace:
            now[0] = stop
            scheduler.drop(task)
            current[thread] = None  # the worker was killed
            heapq.heappush(events, (stop, thread))
            continue
        for d in task.dtypes:
            ran.append((task.adapter, task.case.id, d))
            started[(task.adapter, task.case.id, d)] = now[0]
        scheduler.finished(task, seconds, fresh)
        heapq.heappush(events, (now[0] + seconds, thread))
    return end, ran, scheduler


def _scheduled(cases, chosen, estimate=_estimate, keys=None):
    by_id = {c.id: c for c in cases}
    out = []
    for adapter, case_id, dtype in (chosen.selected if keys is None else keys):
        key = (adapter, case_id, dtype)
        out.append(schedule.Task(adapter, by_id[case_id], [dtype], estimate(adapter, by_id[case_id], dtype),
                                 chosen.rounds[key]))
    return out


@pytest.mark.parametrize("truth", [{}, {"compiling": 1.6, "exporting": 1.3}, {"compiling": 0.5}, {"cheap": 3.0}])
@pytest.mark.parametrize("fraction", [0.6, 1.0, 1.5])
def test_the_run_ends_within_a_tenth_of_the_budget_and_keeps_coverage_first(truth, fraction):
    """Whatever the truth against the estimates, the run ends by the deadline plus its grace (a twentieth); and
    no cell runs a second task while the coverage of another cell was given up."""
    cases = _cases(6)
    by_id = {c.id: c for c in cases}
    full = budget.plan(_tasks(cases), 1e9, _estimate, _startup, jobs=2)
    seconds = fraction * full.coverage_s + 0.3 * (full.all_s - full.coverage_s)
    chosen = budget.plan(_tasks(cases), seconds, _estimate, _startup, jobs=2)
    grace = 0.05 * seconds
    end, ran, scheduler = simulate(_scheduled(cases, chosen), seconds, grace, 2, truth)
    assert end <= seconds + grace <= 1.1 * seconds
    dropped = {(t.adapter, t.case.id, d) for t in scheduler.dropped for d in t.dtypes}
    assert set(ran) | dropped == set(chosen.selected) and not set(ran) & dropped
    covered = Counter(_cell(k, by_id) for k in ran)
    uncovered = {_cell(k, by_id) for k in chosen.rounds} - set(covered)
    if uncovered:  # coverage was given up somewhere: then no cell ran a second task
        assert max(covered.values()) <= 1, (uncovered, covered.most_common(3))


def test_with_the_estimates_right_everything_planned_runs_in_time():
    cases = _cases(6)
    full = budget.plan(_tasks(cases), 1e9, _estimate, _startup, jobs=2)
    seconds = full.coverage_s + 0.5 * (full.all_s - full.coverage_s)
    chosen = budget.plan(_tasks(cases), seconds, _estimate, _startup, jobs=2)
    end, ran, scheduler = simulate(_scheduled(cases, chosen), seconds, 0.05 * seconds, 2, {})
    assert not scheduler.dropped and sorted(ran) == sorted(chosen.selected)
    assert end <= seconds
    assert end >= 0.7 * seconds  # the plan used the budget, it did not stop early


def test_when_the_estimates_were_pessimistic_what_was_planned_out_runs_in_the_time_left():
    cases = _cases(6)
    full = budget.plan(_tasks(cases), 1e9, _estimate, _startup, jobs=2)
    seconds = full.coverage_s + 0.3 * (full.all_s - full.coverage_s)
    chosen = budget.plan(_tasks(cases), seconds, _estimate, _startup, jobs=2)
    end, ran, scheduler = simulate(_scheduled(cases, chosen), seconds, 0.05 * seconds, 2,
                                   {name: 0.4 for name in ADAPTERS},
                                   extra=_scheduled(cases, chosen, keys=chosen.left_out))
    assert set(ran) > set(chosen.selected)  # more than was planned ran
    assert end <= 1.05 * seconds


def test_a_later_round_waits_while_an_unserved_adapter_still_needs_its_coverage():
    cases = _cases(2)
    by_id = {c.id: c for c in cases}
    tasks = [schedule.Task("compiling", by_id["shapes-1"], ["float32"], 1000, 2),
             schedule.Task("exporting", by_id["shapes-0"], ["float32"], 1000, 1)]
    now = [0.0]
    scheduler = schedule.Scheduler(tasks, deadline=6.0, jobs=1, clock=lambda: now[0], startup_ms=dict(STARTUP_MS))
    first = scheduler.next(None)
    assert (first.adapter, first.round) == ("exporting", 1)  # coverage first, whatever the order given
    now[0] = 5.0
    scheduler.finished(first, 5.0, fresh=True)
    assert scheduler.next("exporting") is None  # round 2 cannot end in time: dropped
    assert [(t.adapter, t.round) for t in scheduler.dropped] == [("compiling", 2)]


# ---- the accounting -------------------------------------------------------------------------------------

def test_not_run_counts_rows_per_adapter():
    keys = [("b", "c1", "float32"), ("a", "c1", "float32"), ("a", "c2", "float16")]
    rows = {"c1": 3, "c2": 12}
    assert budget.not_run_rows(keys, lambda key: rows[key[1]]) == {"a": 15, "b": 3}
    assert budget.not_run_rows([], lambda key: 1) == {}


def test_not_run_lines_name_every_adapter_and_the_command_for_the_rest():
    record = {"seconds": 300, "not_run": {"jax_dpa": 1200, "torch_flex": 40, "numpy_oracle": 0},
              "rest": "mhabench conform --resume --results results --quick"}
    lines = results.not_run_lines(record, "rows")
    assert lines[0] == "not run: budget (budget 300 s): 1,240 rows: jax_dpa 1,200, torch_flex 40"
    assert lines[1] == "not run: budget: the rest runs with: mhabench conform --resume --results results --quick"
    assert results.not_run_lines({"seconds": 300, "not_run": {}}, "rows") == []
    assert results.not_run_lines(None, "rows") == []


def test_the_report_says_what_the_budget_left_out(tmp_path):
    """The verdict lines (the page's, summary.md's and the terminal's) read the plan's budget record."""
    import shutil
    from pathlib import Path
    from mhabench.reports.collect import completeness
    from mhabench.reports.load import load_conformance
    shutil.copytree(Path(__file__).parent / "fixtures" / "sample" / "conformance", tmp_path / "r" / "conformance")
    plan_path = tmp_path / "r" / "conformance" / "plan.json"
    plan = json.loads(plan_path.read_text())
    plan["budget"] = {"seconds": 300, "not_run": {"flax_mha": 96}, "rest": "mhabench conform --resume --results r"}
    plan_path.write_text(json.dumps(plan))
    lines = completeness(load_conformance(tmp_path / "r"))
    assert "not run: budget (budget 300 s): 96 conformance rows: flax_mha 96" in lines
    assert "not run: budget: the rest runs with: mhabench conform --resume --results r" in lines


# ---- the main job's split --------------------------------------------------------------------------------

def test_durations_parse_and_nonsense_is_refused():
    assert [job_budget.parse_duration(t) for t in ("300", "300s", "5m", "5min", "1h30m", "0", "2 m 30 s")] == \
        [300, 300, 300, 300, 5400, 0, 150]
    for bad in ("", "-5", "5x", "m", "1e3", "five"):
        with pytest.raises(ValueError, match="--budget: expected a duration"):
            job_budget.parse_duration(bad)


def test_the_split_gives_coverage_first_then_the_work_left():
    needs = {"conform": job_budget.Need(100, 400), "bench": job_budget.Need(50, 100)}
    shares = job_budget.split(300, needs)
    assert sum(shares.values()) == pytest.approx(300)
    assert shares["conform"] >= 100 and shares["bench"] >= 50
    # the rest (150 s) in proportion to the work left: 300 and 50
    assert shares["conform"] == pytest.approx(100 + 150 * 300 / 350)
    # coverage alone does not fit: shares in its proportion
    assert job_budget.split(60, needs) == {"conform": pytest.approx(40), "bench": pytest.approx(20)}
    # more time than all the work: each gets all it can use, no more
    assert job_budget.split(1000, needs) == {"conform": pytest.approx(400), "bench": pytest.approx(100)}


# ---- the main job's plan ---------------------------------------------------------------------------------

def _run_args(**given):
    from argparse import Namespace
    return Namespace(**{"results": "r", "out": "o", "full": False, "kernels": False, "skip_conform": False,
                        "skip_bench": False, "budget": None, **given})


def test_the_main_job_has_five_minutes_unless_told_otherwise():
    from mhabench.cli import CLIError
    from mhabench.commands import run
    assert run.budget_seconds(_run_args()) == 300
    assert run.budget_seconds(_run_args(full=True)) == 0  # --full: everything, as before
    assert run.budget_seconds(_run_args(full=True, budget="20m")) == 1200
    assert run.budget_seconds(_run_args(budget="0")) == 0
    with pytest.raises(CLIError, match="--budget"):
        run.budget_seconds(_run_args(budget="soon"))


def test_the_main_job_gives_conform_its_share_and_bench_the_rest(tmp_path, monkeypatch):
    """Shares from the stages' needs; the bench stage gets --budget where it takes one, else its longest lengths
    are left out with --bench, by what a benchmark took here, and counted."""
    import re
    from mhabench.benchmarks import sweep
    from mhabench.commands import run
    monkeypatch.setenv("MHABENCH_CACHE_DIR", str(tmp_path))
    stages = run.stages_for(_run_args())
    learned = {"report_s": 10.0, "bench_s_per_benchmark": 0.2}
    monkeypatch.setattr(run, "conform_need", lambda stage: job_budget.Need(60, 200))
    bench = run.bench_need(stages[1], learned)
    shares = run.plan_shares(stages, 211 + bench.everything, learned)  # everything fits: each gets all it needs
    assert shares == {"conform": pytest.approx(200), "bench": pytest.approx(bench.everything), "report": 10}
    shares = run.plan_shares(stages, 160, learned)  # coverage first, the report kept aside
    assert shares["report"] == 10 and shares["conform"] + shares["bench"] == pytest.approx(150)
    assert shares["conform"] >= 60 and bench.coverage <= shares["bench"] < bench.everything

    # an accuracy case's methods share one measurement: the need counts the case once
    selected, _ = run.bench_selection(stages[1])
    cases = {(n.rpartition(".")[0], c) for n, c in selected if "Accuracy." in n}
    methods = [n for n, _ in selected if "Accuracy." in n]
    assert cases and len(methods) > len(cases)
    assert bench.everything == pytest.approx(run.CHILD_START_S + 0.2 * (len(selected) - len(methods) + len(cases)))

    monkeypatch.setattr(run, "bench_takes_budget", lambda: True)
    assert run.bench_budget_argv(stages[1], 123.4, learned) == (["--budget", "123"], 0)
    monkeypatch.setattr(run, "bench_takes_budget", lambda: False)
    selected, lengths = run.bench_selection(stages[1])
    everything = run.CHILD_START_S + 0.2 * len(selected)
    assert run.bench_budget_argv(stages[1], everything + 1, learned) == ([], 0)
    argv, left_out = run.bench_budget_argv(stages[1], everything * 0.6, learned)
    regex = argv[0].split("=", 1)[1]
    kept = sweep.selection("quick", [a for a in run.default_kernel_adapters()], ["cpu"], regex)
    kept_lengths = {int(c[2]) for n, c in kept if n.startswith("bench_attention")}
    assert kept_lengths == set(lengths[:len(kept_lengths)]) and 0 < len(kept_lengths) < len(lengths)
    assert any(n.startswith("bench_machine") for n, _ in kept)
    assert left_out == len(selected) - len(kept) > 0
    assert run.CHILD_START_S + 0.2 * len(kept) <= everything * 0.6
    assert re.compile(regex)


def test_a_stage_still_running_past_its_share_is_stopped(tmp_path, monkeypatch):
    """The main job's net under each stage's own planning: past its share and the grace, the stage is interrupted
    and reported as stopped at the budget, not as failed."""
    import sys
    import time
    from mhabench.commands import run
    sleeper = tmp_path / "stage"
    sleeper.write_text("#!/bin/sh\nexec sleep 60\n")
    sleeper.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(sleeper))
    stage = run.Stage("bench", ["bench"])
    started = time.monotonic()
    run.run_child(stage, tmp_path / "logs", lambda line: None, stop_at=started + 1)
    assert time.monotonic() - started < 15
    assert stage.status == "stopped" and stage.detail.startswith("not run: budget")
