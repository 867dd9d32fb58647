"""``mhabench bench --budget``: the planner on a fake cost model (its coverage order, its honoured deadline, its
"not run: budget" accounting), the cost model it learns, and the sweep's plausibility pass."""
import itertools

import pytest

from mhabench.benchmarks import budget, sweep
from mhabench.benchmarks.budget import Bench, Planner
from mhabench.benchmarks.sampling import Sampling

LENGTHS = (128, 256, 512, 1024, 2048, 4096)
METHODS = ("bench_attention.SelfAttention.track_time_forward", "bench_attention.SelfAttention.track_peakmem_forward",
           "bench_attention.CausalSelfAttention.track_time_forward",
           "bench_attention.CausalSelfAttention.track_peakmem_forward")
ADAPTERS = {"fused_a": ("g1", False), "fused_b": ("g2", False), "dense_a": ("g1", True), "dense_b": ("g2", True),
            "dense_c": ("g3", True)}


def benches(adapters=ADAPTERS, lengths=LENGTHS):
    return [Bench(m, (repr(a), "'eager'", str(L), "8", "'cpu'"))
            for a, m, L in itertools.product(adapters, METHODS, lengths)]


class FakeModel:
    """Seconds per point: 0.1 * (L / 128)^2 for a kernel holding the scores, 0.05 * (L / 128)^1.5 otherwise;
    5 s to start an asv run."""

    def point_seconds(self, bench, group):
        dense = ADAPTERS[bench.adapter][1]
        return (0.1 * (bench.seq_len / 128) ** 2) if dense else 0.05 * (bench.seq_len / 128) ** 1.5

    def step_seconds(self, group, members):
        return 5.0 + sum(self.point_seconds(b, group) for b in members)

    def knows(self, adapter):
        return True


def planner(budget_seconds, chosen=None):
    return Planner(chosen or benches(), lambda a: ADAPTERS[a][0], lambda a: ADAPTERS[a][1], FakeModel(),
                   coverage_lengths=4, budget=budget_seconds, started=0.0)


def drive(plan, slowdown=1.0):
    """Run the plan on a virtual clock: each step takes its predicted cost times ``slowdown``."""
    now, steps = 0.0, []
    while (step := plan.next_step(now)) is not None:
        steps.append(step)
        now += step.predicted * slowdown
    return steps, now


def test_coverage_comes_first_then_the_fused_kernels_then_one_length_at_a_time():
    steps, _ = drive(planner(10_000))
    keys = [s.key.split(":")[0] for s in steps]
    assert keys[:3] == ["coverage"] * 3  # one asv run per process group
    covered = {(b.adapter, b.seq_len) for s in steps[:3] for b in s.benches}
    assert covered == {(a, L) for a in ADAPTERS for L in LENGTHS[:4]}
    after = [(s.key.split(":")[0], {b.adapter for b in s.benches}) for s in steps[3:]]
    fused_steps = [k for k, adapters in after if adapters <= {"fused_a", "fused_b"}]
    assert [k for k, _ in after][:len(fused_steps)] == fused_steps == ["L2048", "L2048", "L4096", "L4096"]
    dense = [(s.key.split(":")[0], b.seq_len) for s in steps[3 + len(fused_steps):] for b in s.benches]
    assert [L for _, L in dense] == sorted(L for _, L in dense)  # every dense adapter at 2048 before any at 4096
    assert {b for s in steps for b in s.benches} == set(benches())  # an ample budget runs everything once
    assert sum(len(s.benches) for s in steps) == len(benches())


@pytest.mark.parametrize("budget_seconds", [60, 150, 400, 1500])
@pytest.mark.parametrize("slowdown", [1.0, 1.2])
def test_the_deadline_holds_and_nothing_is_lost_or_run_twice(budget_seconds, slowdown):
    plan = planner(budget_seconds)
    steps, end = drive(plan, slowdown)
    ran = [b for s in steps for b in s.benches]
    skipped = [b for s in plan.skipped for b in s.benches]
    assert sorted(ran + skipped, key=repr) == sorted(benches(), key=repr)  # each benchmark planned or skipped once
    # the planner keeps its reserve: what it plans to run ends within the budget when its predictions hold, and
    # within 10% of it when every step runs 20% over its prediction
    assert end <= budget_seconds * (1.0 if slowdown == 1.0 else 1.1)
    for item in plan.skipped:
        assert item.reason.startswith(budget.BUDGET_REASON) and item.predicted > 0


def test_a_length_that_breaks_the_adapters_share_is_skipped_with_its_prediction_and_the_longer_ones_too():
    steps, _ = drive(planner(400))
    ran = {(b.adapter, b.seq_len) for s in steps for b in s.benches}
    assert {(a, L) for a in ADAPTERS for L in LENGTHS[:4]} <= ran  # coverage (131 s) fits
    assert ("fused_a", 4096) in ran and ("fused_b", 4096) in ran  # the fused kernels reach 4096 first (118 s)
    plan = planner(400)
    drive(plan)
    by_adapter = {}
    for item in plan.skipped:
        for b in item.benches:
            by_adapter.setdefault(b.adapter, set()).add(b.seq_len)
    assert by_adapter and all(a.startswith("dense") for a in by_adapter)
    for adapter, lengths in by_adapter.items():  # once a length does not fit, no longer one runs
        assert all((adapter, L) not in ran for L in lengths)
        assert all(L in lengths for L in LENGTHS if L > min(lengths))
    first = next(item for item in plan.skipped if "share" in item.reason)
    assert "predicted at" in first.reason and f"{first.predicted:.0f} s" in first.reason


def test_a_budget_too_small_for_coverage_drops_whole_adapters_and_says_so():
    plan = planner(30)
    steps, end = drive(plan)
    ran_adapters = {b.adapter for s in steps for b in s.benches}
    dropped = {b.adapter for item in plan.skipped for b in item.benches if "its coverage was predicted" in item.reason}
    assert dropped and ran_adapters and not ran_adapters & dropped and end <= 30
    # coverage first: while an adapter goes without its coverage, no other sweep goes longer
    assert all(b.seq_len <= LENGTHS[3] for s in steps for b in s.benches)
    assert any("no sweep goes longer" in item.reason for item in plan.skipped)


def test_the_cost_model_predicts_from_the_lines_fit_and_the_sampling_rules():
    rules = Sampling(max_samples=40, max_seconds=1.0, warmup_seconds=0.0, warmup_calls=2, memory_samples=5)
    model = budget.CostModel(rules, lambda b: 99.0)
    line = [b for b in benches(["dense_a"]) if b.name.endswith("SelfAttention.track_time_forward")
            and "Causal" not in b.name]
    for b in line[:4]:  # 128 ... 1024, quadratic
        model.observe(b, {"quantity": "time", "median": 1e-3 * (b.seq_len / 128) ** 2, "setup_seconds": 0.5,
                          "sampling_seconds": 1.0})
    at_2048 = model.call_seconds(line[4])
    assert at_2048 == pytest.approx(1e-3 * 16 ** 2, rel=1e-6)
    # a memory point of the other class reads the same adapter's times
    memory = next(b for b in benches(["dense_a"]) if "Causal" in b.name and "peakmem" in b.name
                  and b.seq_len == 2048)
    assert model.call_seconds(memory) == pytest.approx(at_2048)
    calls = 2 + max(3, min(40, 1.0 / at_2048))
    assert model.point_seconds(line[4], "g1") == pytest.approx(0.5 + at_2048 + calls * at_2048)
    # an adapter never measured: the static estimate, scaled by how far off it was for those measured
    other = benches(["dense_b"])[0]
    assert model.point_seconds(other, "g2") == pytest.approx(99.0 * model.calibration())
    assert model.calibration() == pytest.approx(1.5 / 99.0)


def test_the_steps_start_and_process_overhead_are_learned():
    model = budget.CostModel(Sampling(), lambda b: 1.0)
    points = benches(["dense_a"])[:3]
    records = []
    for i, b in enumerate(points):  # run from t=100: the first point ends at 112 after 2 s of its own
        record = {"quantity": "memory", "setup_seconds": 0.5, "sampling_seconds": 1.5, "time": 112.0 + 3 * i}
        model.observe(b, record)
        records.append((b, record))
    model.observe_step("g1", 100.0, 120.0, records)
    assert model.fixed["g1"] == pytest.approx(10.0)
    assert model.per_process["g1"] == pytest.approx((20.0 - 10.0 - 6.0) / 3)


def test_implausible_lines_are_found_from_the_points_journal():
    def record(L, value, quantity="time"):
        return {"quantity": quantity, "median": value, "q25": value * 0.99, "q75": value * 1.01,
                "program_bytes": None, "charted": "probe", "probe_median": value}
    time_line = {b: record(b.seq_len, {1024: 0.8, 2048: 0.4}.get(b.seq_len, b.seq_len / 1000))
                 for b in benches(["torch_sdpa"]) if b.name.endswith("SelfAttention.track_time_forward")
                 and "Causal" not in b.name}
    found = sweep.implausible(time_line)
    assert {b.seq_len for b in found} == {1024, 2048}
    assert all(v.rule == "time falls with L" for v in found.values())


def test_exact_regexes_select_exactly_the_planned_benchmarks():
    import re
    chosen = [b for b in benches(["dense_a", "fused_a"]) if b.seq_len in (256, 2048)]
    regexes = sweep.exact_regexes(chosen)
    names = [f"{b.name}({', '.join(b.combo)})" for b in benches()]
    picked = {n for n in names if any(re.search(r, n) for r in regexes)}
    assert picked == {f"{b.name}({', '.join(b.combo)})" for b in chosen}


def test_a_point_record_maps_back_to_its_benchmark():
    b = benches(["dense_a"])[5]
    assert sweep.bench_of({"benchmark": b.name, "params": b.param_dict}) == b


@pytest.mark.parametrize("text, seconds", [("150", 150.0), ("0", None), (None, None), ("12.5", 12.5)])
def test_budget_option(text, seconds):
    assert sweep.parse_budget(text) == seconds


@pytest.mark.parametrize("text", ["-3", "soon", "nan"])
def test_bad_budget_is_a_one_line_error(text):
    with pytest.raises(sweep.SweepError, match="--budget"):
        sweep.parse_budget(text)


def test_points_of_an_implausible_line_are_measured_again_in_a_fresh_run_and_recorded(tmp_path, monkeypatch):
    import json
    import time
    from mhabench import results
    from mhabench.benchmarks import sampling
    layout = results.Layout(tmp_path)
    layout.bench.mkdir(parents=True)
    line = [b for b in benches(["torch_sdpa"]) if b.name.endswith(".SelfAttention.track_time_forward")]
    falling = {128: 1.0, 256: 2.0, 512: 4.0, 1024: 8.0, 2048: 3.0, 4096: 30.0}

    def write(values):
        with open(layout.points, "a") as fh:
            for b in line:
                v = values[b.seq_len]
                fh.write(json.dumps({"benchmark": b.name, "params": b.param_dict, "quantity": "time", "median": v,
                                     "q25": v * 0.99, "q75": v * 1.01, "samples": 6, "time": time.time()}) + "\n")
    write(falling)
    calls = []

    def step(self, key, group, regexes, count, *, extra_env=None, peaks=True, deadline=None):
        calls.append((key, regexes, extra_env))
        write({**falling, 1024: 8.0, 2048: 16.0})  # measured again: the fall was the machine
        return "ran"
    monkeypatch.setattr(sweep.Run, "step", step)
    run = sweep.Run(None, layout, None, "c", {}, set(), {}, False, lambda line: None)
    assert run.remeasure(set(line)) == 2
    [(key, regexes, env)] = calls
    assert key == "remeasure:torch" and env == {sampling.ENV_SCALE: str(sweep.REMEASURE_SCALE)}
    assert sweep.exact_regexes([b for b in line if b.seq_len in (1024, 2048)]) == regexes
    again = [json.loads(x) for x in layout.remeasured.read_text().splitlines()]
    assert {(r["params"]["seq_len"], r["before"], r["after"]) for r in again} == {(1024, 8.0, 8.0), (2048, 3.0, 16.0)}
    assert all(r["rule"] == "time falls with L" for r in again)
    assert run.remeasure(set(line)) == 0  # the line is plausible now: nothing to measure again


def test_an_asv_run_past_the_deadline_is_stopped_with_what_it_started(tmp_path):
    import sys
    import time
    import os
    pid_file = tmp_path / "child"
    script = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
              f"time.sleep(60)']); open({str(pid_file)!r}, 'w').write(str(child.pid)); print('started', flush=True); "
              "time.sleep(60)")
    said = []
    started = time.monotonic()
    code = sweep.stream([sys.executable, "-c", script], None, "[t]", verbose=True, say=said.append,
                        deadline=time.monotonic() + 2.0)
    assert code == sweep.STOPPED and time.monotonic() - started < 30 and said == ["[t] started"]
    child = int(pid_file.read_text())
    for _ in range(50):  # the child asv would have started (its forkserver) is stopped with it
        try:
            os.waitpid(child, os.WNOHANG)
        except ChildProcessError:
            pass
        if not os.path.exists(f"/proc/{child}") or open(f"/proc/{child}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the child of the stopped run is still running")


def test_a_compiled_adapter_nothing_is_known_of_gets_its_coverage_alone():
    compiled = [Bench(b.name, (b.combo[0], "'compiled'", *b.combo[2:])) for b in benches(["dense_c"])]
    known = budget.CostModel(Sampling(), lambda b: 1.0)
    plan = Planner(benches(["fused_a", "dense_a"]) + compiled, lambda a: "g1", lambda a: ADAPTERS[a][1], known,
                   coverage_lengths=4, budget=1e6, started=0.0)
    assert plan.coverage_units() == [["fused_a", "dense_a"], ["dense_c"]]
    known.observe(compiled[0], {"quantity": "time", "median": 1e-3, "setup_seconds": 30.0, "sampling_seconds": 1.0})
    assert plan.coverage_units() == [["fused_a", "dense_a", "dense_c"]]  # measured before: it joins its group


def test_the_accuracy_methods_of_a_case_share_its_one_measurement():
    """A case's first accuracy method builds and calls a layer per dtype (and the oracle's golden); the rest read
    what it recorded: the planner predicts the work once per case, split over the case's selected methods."""
    from mhabench.benchmarks.accuracy import DTYPES, ORACLE_CALLS
    rules = Sampling(max_samples=10, max_seconds=1.0, warmup_seconds=0.0)
    model = budget.CostModel(rules, lambda b: 1.0)
    time_bench = Bench("bench_attention.SelfAttention.track_time_forward", ("'a'", "'eager'", "512", "8", "'cpu'"))
    model.observe(time_bench, {"quantity": "time", "median": 0.01, "setup_seconds": 2.0, "sampling_seconds": 0.1})
    accuracy = [Bench(f"bench_attention.SelfAccuracy.track_rms_error_{d}", ("'a'", "'eager'", "512", "8", "'cpu'"))
                for d in DTYPES]
    Planner(accuracy, lambda a: "g", lambda a: True, model, coverage_lengths=4, budget=100.0, started=0.0)
    work = len(DTYPES) * (2.0 + 0.01) + ORACLE_CALLS * 0.01
    assert [model.point_seconds(b, "g") for b in accuracy] == pytest.approx([work / len(DTYPES)] * len(DTYPES))


def test_a_run_stopped_at_the_deadline_records_every_benchmark_it_never_reached():
    """An asv run stopped at the deadline ends the sweep: its benchmarks and those of every group the plan had not
    reached yet are "not run: budget", each with why; none goes missing without a word."""
    plan = planner(10_000)
    first = plan.next_step(0.0)
    second = plan.next_step(first.predicted)
    plan.stop(second)
    assert plan.next_step(1e9) is None
    skipped = {b: s.reason for s in plan.skipped for b in s.benches}
    assert set(first.benches) | set(skipped) == set(benches()) and not set(first.benches) & set(skipped)
    assert {skipped[b] for b in second.benches} == {f"{budget.BUDGET_REASON}: its asv run was stopped at the "
                                                     f"budget's deadline"}
    rest = [b for b in benches() if b not in set(first.benches) | set(second.benches)]
    assert rest and all("ran out before its turn" in skipped[b] for b in rest)


def test_coverage_of_an_adapter_nothing_is_known_of_is_tried_and_what_is_measured_is_remembered(tmp_path,
                                                                                                monkeypatch):
    """With no measurement of this machine the prediction is the static estimate: coverage is tried rather than
    dropped on it. The points measured go to the cache, so the next run, into another results directory, plans
    from them."""
    import json
    monkeypatch.setenv("MHABENCH_CACHE_DIR", str(tmp_path / "cache"))
    rules = Sampling(max_samples=10, max_seconds=1.0, warmup_seconds=0.0)
    model = budget.CostModel(rules, lambda b: 1000.0)  # a prior far above the budget
    plan = Planner(benches(["fused_a"]), lambda a: "g1", lambda a: False, model, coverage_lengths=4, budget=100.0,
                   started=0.0)
    step = plan.next_step(0.0)
    assert step is not None and {b.seq_len for b in step.benches} == set(LENGTHS[:4])
    record = {"benchmark": step.benches[0].name, "params": step.benches[0].param_dict, "quantity": "time",
              "median": 0.001, "setup_seconds": 0.5, "sampling_seconds": 0.2, "time": 1.0, "q25": 1}
    sweep.remember_points([(step.benches[0], record)])
    [(bench, kept)] = sweep.remembered_points()
    assert bench == step.benches[0] and "q25" not in kept and kept["setup_seconds"] == 0.5
    later = budget.CostModel(rules, lambda b: 1000.0)
    later.observe(bench, kept)
    assert later.knows("fused_a")
    later_plan = Planner(benches(["fused_a"]), lambda a: "g1", lambda a: False, later, coverage_lengths=4,
                         budget=1.0, started=0.0)
    later_plan.next_step(0.0)
    assert "fused_a" in later_plan.uncovered  # known, and predicted beyond the budget: not tried
    assert json.loads((tmp_path / "cache" / "costs" / sweep.REMEMBERED_POINTS).read_text())["median"] == 0.001


def test_accuracy_comes_after_every_adapters_time_and_memory_coverage_and_before_any_longer_sweep():
    accuracy = [Bench(f"bench_attention.SelfAccuracy.track_rms_error_{d}", (repr(a), "'eager'", str(L), "8", "'cpu'"))
                for a in ADAPTERS for d in ("float32", "float16") for L in LENGTHS[:4]]
    plan = Planner(benches() + accuracy, lambda a: ADAPTERS[a][0], lambda a: ADAPTERS[a][1], FakeModel(),
                   coverage_lengths=4, budget=10_000, started=0.0)
    steps, _ = drive(plan)
    kinds = [s.key.split(":")[0] for s in steps]
    first_accuracy = kinds.index("accuracy")
    assert set(kinds[:first_accuracy]) == {"coverage"} and not any(b.accuracy for s in steps[:first_accuracy]
                                                                     for b in s.benches)
    assert sorted((b for s in steps if s.key.startswith("accuracy") for b in s.benches), key=repr) == \
        sorted(accuracy, key=repr)
    assert all(s.key.startswith("L") for s in steps[first_accuracy:] if not s.key.startswith("accuracy"))
    # when the budget is short, the accuracy is what gives way, recorded with its prediction
    tight = Planner(benches() + accuracy, lambda a: ADAPTERS[a][0], lambda a: ADAPTERS[a][1], FakeModel(),
                    coverage_lengths=4, budget=160, started=0.0)
    drive(tight)
    assert any("its accuracy at the coverage lengths was predicted" in s.reason for s in tight.skipped)


def test_a_groups_run_that_would_take_much_of_what_is_left_is_split_by_adapter():
    """asv writes a run's results only at its end: a run stopped at the deadline loses everything it measured, so
    where one group's run would take more than SPLIT_FRACTION of the time left, each adapter gets its own run."""
    roomy, _ = drive(planner(100_000))
    assert [s.key for s in roomy[:3]] == ["coverage:g1", "coverage:g2", "coverage:g3"]
    tight = planner(120)
    step = tight.next_step(0.0)
    assert step.key == "coverage:g1:fused_a" and {b.adapter for b in step.benches} == {"fused_a"}
    assert tight.next_step(step.predicted).key == "coverage:g1:dense_a"


def test_the_accuracy_is_decided_one_group_at_a_time_from_what_the_runs_before_it_cost():
    """Decided all at once, predictions that were too dear used up the budget on paper and left the later groups'
    accuracy "not run" with most of the budget unspent; one group at a time, each decision reads the clock."""
    accuracy = [Bench(f"bench_attention.SelfAccuracy.track_rms_error_{d}", (repr(a), "'eager'", str(L), "8", "'cpu'"))
                for a in ADAPTERS for d in ("float32", "float16") for L in LENGTHS[:4]]
    plan = Planner(benches() + accuracy, lambda a: ADAPTERS[a][0], lambda a: ADAPTERS[a][1], FakeModel(),
                   coverage_lengths=4, budget=220, started=0.0)
    now, groups = 0.0, []
    while (step := plan.next_step(now)) is not None:
        if step.key.startswith("accuracy"):
            groups.append(step.group)
        now += step.predicted * (0.2 if step.key.startswith("accuracy") else 1.0)  # cheaper than predicted
    assert list(dict.fromkeys(groups)) == ["g1", "g2", "g3"]
    assert not any("its accuracy" in s.reason for s in plan.skipped)
