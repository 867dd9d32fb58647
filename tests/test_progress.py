"""Progress you can see: bars on a terminal, plain lines in a log, read back by ``mhabench run``."""
import io
import math
import subprocess
import sys

from mhabench import progress
from mhabench.commands import conform as conform_command
from mhabench.conformance import session
from mhabench.schema import Row


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_fraction_weighs_groups_by_estimated_cost_and_gives_the_time_left():
    clock = Clock()
    tally = progress.Tally({"jax_dpa": 100, "numpy_oracle": 100}, {"jax_dpa": 9.0, "numpy_oracle": 1.0}, clock=clock)
    assert math.isnan(tally.eta()) and tally.fraction() == 0
    tally.add("numpy_oracle", 100)  # the cheap half of the rows is a tenth of the work
    clock.now += 10
    assert math.isclose(tally.fraction(), 0.1) and math.isclose(tally.eta(), 90.0)
    tally.add("jax_dpa", 50)
    assert math.isclose(tally.fraction(), 0.55)
    line = tally.line()
    assert line.startswith("progress: 150/200 rows (55% of the estimated work), 10 s elapsed, about 8 s left")
    assert "jax_dpa 50/100" in line and "numpy_oracle" not in line  # only the groups under way
    assert progress.parse("mhabench conform: " + line) == (150, 200, "rows")
    tally.add("jax_dpa", 50)
    assert tally.eta() == 0 and "done" in tally.line()


def test_a_resumed_run_counts_its_pace_from_what_it_did_itself():
    clock = Clock()
    tally = progress.Tally({"a": 100}, done={"a": 90}, clock=clock)
    assert tally.completed == 90 and tally.fraction() == 0
    tally.add("a", 5)
    clock.now += 5
    assert math.isclose(tally.fraction(), 0.5) and math.isclose(tally.eta(), 5.0)


def test_parse_ignores_other_lines():
    assert progress.parse("[3/7 torch] bench_attention.SelfAttention.time_forward 1.2ms") is None
    assert progress.parse("no progress: here") is None


def _tally():
    plan = session.make_plan("numpy_oracle,torch_sdpa", "float32", "masks")
    tally = session.progress_tally(plan, {})
    assert tally.plan is plan  # whoever shows the tally reads the plan from it
    return tally, plan


def test_plain_lines_off_a_terminal_count_up_to_the_plan():
    tally, plan = _tally()
    out = io.StringIO()
    display = conform_command.ProgressLines(out, every=0)
    display.start(tally)
    for adapter in plan.adapters:
        for _ in range(plan.rows_by_adapter()[adapter]):
            tally.add(adapter)
        display.update([{"adapter": adapter}])
    display.finish()
    counts = [progress.parse(line)[:2] for line in out.getvalue().splitlines()]
    assert counts[0] == (0, plan.rows) and counts[-1] == (plan.rows, plan.rows)
    assert [d for d, _ in counts] == sorted(d for d, _ in counts)
    assert all(line.startswith("mhabench conform: progress: ") for line in out.getvalue().splitlines())


def test_bars_on_a_terminal_show_each_adapter_and_the_time_left():
    from rich.console import Console
    tally, plan = _tally()
    out = io.StringIO()
    bars = conform_command.ProgressBars(console=Console(file=out, force_terminal=True, width=120))
    bars.start(tally)
    half = plan.rows_by_adapter()["numpy_oracle"] // 2
    tally.add("numpy_oracle", half)
    bars.update([Row(adapter="numpy_oracle", case="c", area="shapes", dtype="float32", quantity="output",
                     status="pass")])
    bars.progress.refresh()
    screen = out.getvalue()
    bars.finish()
    assert f"{half}/{plan.rows_by_adapter()['numpy_oracle']}" in screen
    assert f"0/{plan.rows_by_adapter()['torch_sdpa']}" in screen
    assert f"{half}/{plan.rows}" in screen and "elapsed" in screen and "left" in screen
    assert "━" in screen and "\x1b[" in screen  # a drawn bar, with terminal colours


def test_conform_in_a_log_writes_progress_lines(tmp_path):
    out = subprocess.run([sys.executable, "-m", "mhabench", "conform", "--adapters", "numpy_oracle", "--areas",
                          "masks", "--dtypes", "float32", "--results", str(tmp_path), "--progress-every", "0"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode in (0, 1), out.stderr
    counts = [progress.parse(line) for line in out.stderr.splitlines() if progress.parse(line)]
    rows = sum(1 for _ in (tmp_path / "conformance" / "rows.jsonl").open())
    assert len(counts) >= 3 and counts[-1] == (rows, rows, "rows")
    assert "\x1b[" not in out.stderr  # no terminal codes in a log


def test_mhabench_run_moves_a_stage_bar_with_its_childs_progress_lines():
    from rich.console import Console
    from rich.progress import Progress
    from mhabench.commands import run as run_command
    out = io.StringIO()
    with Progress(*run_command.stage_columns(), console=Console(file=out, force_terminal=True, width=150)) as bars:
        task = bars.add_task("conform", total=None, counts="", line="waiting")
        run_command.follow(bars, task, "mhabench conform: 30 cases x 2 adapters x 1 dtypes = 782 rows -> x")
        assert bars.tasks[0].total is None  # no progress line yet: a pulsing bar
        run_command.follow(bars, task, "mhabench conform: progress: 391/782 rows (12% of the estimated work), "
                                       "3 s elapsed, about 22 s left; torch_sdpa 0/391")
        assert (bars.tasks[0].completed, bars.tasks[0].total) == (391, 782)
        run_command.follow(bars, task, "[2/4 torch] bench_attention.SelfAttention.time_forward ok")
        assert bars.tasks[0].completed == 391 and "time_forward" in bars.tasks[0].fields["line"]
        bars.refresh()
    assert "391/782 rows" in out.getvalue() and "━" in out.getvalue()


def test_the_main_job_asks_its_conform_stage_for_progress_lines():
    from argparse import Namespace
    from mhabench.commands import run as run_command
    [conform, bench, _] = run_command.stages_for(Namespace(results="r", skip_conform=False, skip_bench=False))
    assert "--progress-every" in conform.argv and bench.argv[:2] == ["bench", "--quick"]
    assert "--quick" in conform.argv  # the reduced matrix; --full runs all of it
    chosen = conform.argv[conform.argv.index("--adapters") + 1].split(",")  # the default kernels; --kernels adds
    assert "torch_sdpa" in chosen and not any("+" in name for name in chosen)  # the variants
    assert bench.argv[bench.argv.index("--adapters") + 1].split(",") == chosen
    [conform, _, _] = run_command.stages_for(Namespace(results="r", full=True, kernels=True, skip_conform=False,
                                                       skip_bench=False))
    assert "--quick" not in conform.argv and "--adapters" not in conform.argv


def test_a_stage_dies_with_the_main_job():
    """A SIGKILLed `mhabench run` takes its running stage with it (the stage would otherwise go on writing)."""
    import subprocess
    import sys
    import time
    code = ("import signal, subprocess, sys, time; from mhabench.impls.worker import dies_with_parent; "
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
            "preexec_fn=dies_with_parent(signal.SIGTERM)); print(p.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    stage = int(parent.stdout.readline())
    parent.kill()
    parent.wait()

    def gone() -> bool:
        try:
            with open(f"/proc/{stage}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie has died
        except FileNotFoundError:
            return True
    deadline = time.monotonic() + 10
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone()
