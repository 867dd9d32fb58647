"""``mhabench run``: the main job. Conformance suite, quick benchmarks, report, over every installed adapter.

Conformance and benchmarks run as child processes (``python -m mhabench ...``) so that a crash or a
framework abort in one stage cannot take the others down; each child's output goes to a log file
under the results directory while a bar per stage shows how far it is: the children write plain progress
lines (``mhabench.progress``) into that output, and the bar follows them.

Under a time budget (``--budget``, 5 minutes by default) each stage gets a share (``mhabench.budget.split``):
the conformance stage its share up front, planned coverage first by the cost model of ``conformance``;
the benchmark stage what is left when it starts, less the report's time. Each stage records what it
left out ("not run: budget") where the report reads it.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from mhabench.cli import printable

from .report import DEFAULT_OUT, DEFAULT_RESULTS

HELP = ("the main job: run the conformance suite (the reduced matrix; --full for all of it), the quick benchmark "
        "profile and the report, within a time budget (5 minutes by default)")
PROGRESS_EVERY = 2  # seconds between the conform stage's progress lines, which move its bar
DEFAULT_BUDGET = "5m"
CHILD_START_S = 3.0   # a stage's process: Python, mhabench and its plan, before its own budget starts
REPORT_S = 15.0       # the report, until this machine has measured one
BENCHMARK_S = 2.6     # one benchmark of the quick profile until one is measured here (923 s for 349 on 2 AVX2 cores)
COVERAGE_LENGTHS = 4  # the shortest lengths of each benchmark class every adapter gets first
GRACE = 0.05          # of the budget: how long past its share a stage may go before it is stopped


def register(parser):
    parser.add_argument("--results", default=DEFAULT_RESULTS, metavar="DIR",
                        help=f"results directory (default: {DEFAULT_RESULTS})")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"report directory (default: {DEFAULT_OUT})")
    parser.add_argument("--full", action="store_true",
                        help="run the whole conformance matrix (as the nightly job does) instead of the reduced one")
    parser.add_argument("--kernels", action="store_true",
                        help="also run the kernel variants (torch_sdpa+flash, jax_dpa+xla, ...); by default the main "
                             "job runs each framework's default kernel, as its users do")
    parser.add_argument("--budget", default=None, metavar="DURATION",
                        help=f"end within this time (300, 90s, 5m, 1h; default {DEFAULT_BUDGET}, or 0 with --full): "
                             "coverage first (a conformance row for every adapter x area x dtype, 4 lengths per "
                             "benchmark class for every adapter), then as much more as fits; 0: everything. What "
                             "does not fit is reported as 'not run: budget' with the command that runs it")
    parser.add_argument("--skip-conform", action="store_true", help="do not run the conformance suite")
    parser.add_argument("--skip-bench", action="store_true", help="do not run the benchmarks")


@dataclass
class Stage:
    name: str
    argv: list  # mhabench arguments; None for the in-process report
    status: str = "pending"  # pending | ok | findings | failed | skipped | stopped (at the budget)
    detail: str = ""
    seconds: float = 0.0
    log: Path | None = None
    task: int | None = None  # its line in the progress display


def stages_for(args) -> list[Stage]:
    results = str(args.results)
    # the reduced matrix (every area, each feature at least once) by default: the whole one is the nightly job's
    conform = ["conform", "--results", results, "--progress-every", str(PROGRESS_EVERY)]
    chosen = [] if getattr(args, "kernels", False) else ["--adapters", ",".join(default_kernel_adapters())]
    stages = [Stage("conform", conform + chosen + ([] if getattr(args, "full", False) else ["--quick"])),
              Stage("bench", ["bench", "--quick", "--results", results, *chosen]),
              Stage("report", None)]
    for stage in stages:
        if getattr(args, f"skip_{stage.name}", False):
            stage.status, stage.detail = "skipped", f"--skip-{stage.name}"
    return stages


# ---- the budget ---------------------------------------------------------------------------------------

def budget_seconds(args) -> float:
    """The job's budget in seconds, 0 for none: ``--budget``, else 5 minutes (none with ``--full``)."""
    from mhabench.budget import parse_duration
    from mhabench.cli import CLIError
    text = args.budget if getattr(args, "budget", None) is not None else \
        ("0" if getattr(args, "full", False) else DEFAULT_BUDGET)
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise CLIError(str(exc)) from None


def _option(argv: list, name: str):
    return argv[argv.index(name) + 1] if name in argv else None


def conform_need(stage: Stage):
    """What the conform stage needs on this machine (``conformance.session.needs``)."""
    from mhabench.budget import Need
    from mhabench.conformance import session
    plan = session.make_plan(_option(stage.argv, "--adapters"), quick="--quick" in stage.argv)
    return Need(*(seconds + CHILD_START_S for seconds in session.needs(plan)))


def bench_selection(stage: Stage) -> tuple[list, list[int]]:
    """The benchmarks the bench stage selects, and the profile's lengths, shortest first."""
    from mhabench.benchmarks import sweep
    from mhabench.benchmarks.profiles import get_profile
    from mhabench.options import runnable_adapters
    adapters = (_option(stage.argv, "--adapters") or "").split(",") if "--adapters" in stage.argv \
        else runnable_adapters(installed_only=False)
    devices = ["cpu", "cuda"] if sweep.gpu_present() else ["cpu"]
    return sweep.selection("quick", adapters, devices, None), sorted(get_profile("quick").seq_lens)


def bench_units(selected) -> int:
    """The measurements of ``selected`` (benchmark name, params): one per benchmark, except that the accuracy
    methods of one case share one measurement (``benchmarks.common.accuracy_records``), so a case counts once."""
    from mhabench.results import is_accuracy
    return len({(name.rpartition(".")[0], combo) if is_accuracy(name.split(".")[1]) else (name, combo)
                for name, combo in selected})


def bench_need(stage: Stage, learned: dict):
    """What the bench stage needs: its measurements at the shortest ``COVERAGE_LENGTHS`` lengths, and all of them,
    at what one took here before (``BENCHMARK_S`` until measured)."""
    from mhabench.budget import Need
    selected, lengths = bench_selection(stage)
    per = float(learned.get("bench_s_per_benchmark", BENCHMARK_S))
    covered = [b for b in selected if not b[0].startswith("bench_attention") or int(b[1][2]) in lengths[:COVERAGE_LENGTHS]]
    return Need(CHILD_START_S + per * bench_units(covered), CHILD_START_S + per * bench_units(selected))


def plan_shares(stages: list[Stage], seconds: float, learned: dict) -> dict[str, float]:
    """Each stage's share of the budget (``mhabench.budget.split``), the report's measured time kept aside."""
    from mhabench.budget import Need, split
    needs = {}
    for stage in stages:
        if stage.status == "skipped" or stage.argv is None:
            continue
        needs[stage.name] = conform_need(stage) if stage.name == "conform" else bench_need(stage, learned)
    shares = split(max(0.0, seconds - report_seconds(learned)), needs)
    shares["report"] = report_seconds(learned)
    return shares


def report_seconds(learned: dict) -> float:
    return float(learned.get("report_s", REPORT_S))


def bench_takes_budget() -> bool:
    """Whether ``mhabench bench`` plans itself against ``--budget SECONDS``."""
    import argparse
    from . import bench
    parser = argparse.ArgumentParser(add_help=False)
    bench.register(parser)
    known, rest = parser.parse_known_args(["--budget", "1"])
    return not rest and getattr(known, "budget", None) is not None


def bench_budget_argv(stage: Stage, seconds: float, learned: dict) -> tuple[list[str], int]:
    """The bench stage's options for ``seconds``, and how many benchmarks they leave out up front. With
    ``bench --budget`` the stage plans and accounts for itself; otherwise the longest lengths that do not fit,
    by what a benchmark took here before, are left out with ``--bench`` (at least the shortest is kept)."""
    if bench_takes_budget():
        return ["--budget", f"{max(1, int(seconds))}"], 0
    selected, lengths = bench_selection(stage)
    per = float(learned.get("bench_s_per_benchmark", BENCHMARK_S))
    attention = [int(combo[2]) for name, combo in selected if name.startswith("bench_attention")]

    def left_out(count):
        return sum(n not in lengths[:count] for n in attention)
    keep = next((count for count in range(len(lengths), 0, -1)
                 if CHILD_START_S + per * (len(selected) - left_out(count)) <= seconds), 1)
    if keep >= len(lengths):
        return [], 0
    shown = "|".join(str(n) for n in lengths[:keep])
    return [f"--bench=^bench_machine\\.|^bench_attention\\.\\w+\\.\\w+\\('[^']*', '[^']*', ({shown}), "], \
        left_out(keep)


def default_kernel_adapters() -> list[str]:
    """The installed adapters that let their framework choose its kernel (no forced-kernel variant)."""
    from mhabench import impls
    adapters = [impls.get_adapter(name) for name in impls.list_adapters()]
    return [a.name for a in adapters if a.kernel == "default" and a.looks_installed()]


def run_child(stage: Stage, log_dir: Path, on_line, stop_at: float | None = None) -> None:
    """Run one stage as ``python -m mhabench ...``; its output goes to a log, its last line to ``on_line``.

    ``stop_at`` (a ``time.monotonic()``): past it the stage is interrupted (SIGINT: asv's runs are stopped and
    what finished is kept), then killed 10 s later; its status is "stopped"."""
    log_dir.mkdir(parents=True, exist_ok=True)
    stage.log = log_dir / f"{stage.name}.log"
    tail = deque(maxlen=5)
    command = [sys.executable, "-m", "mhabench", *stage.argv]
    with open(stage.log, "w", encoding="utf-8") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        # a stage dies with the main job, however that dies: a SIGKILLed main job would otherwise leave its
        # conform or bench stage running, writing into the results directory
        import signal
        from mhabench.impls.worker import dies_with_parent
        try:
            child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     errors="replace", bufsize=1, preexec_fn=dies_with_parent(signal.SIGTERM))
        except OSError as exc:
            stage.status, stage.detail = "failed", f"could not start: {exc}"
            return
        stopped = threading.Event()
        watch = threading.Thread(target=_stop_at, args=(child, stop_at, stopped), daemon=True) \
            if stop_at is not None else None
        if watch is not None:
            watch.start()
        try:
            for line in child.stdout:
                log.write(line)
                log.flush()
                if line.strip():
                    tail.append(line.rstrip())
                    on_line(line.strip())
            code = child.wait()
        except BaseException:
            child.kill()
            child.wait()
            raise
    last = tail[-1] if tail else "no output"
    if stopped.is_set():
        stage.status = "stopped"
        stage.detail = " ".join(filter(None, ["not run: budget: stopped at the end of its share (what it finished "
                                              "is kept);", stage.detail]))
    elif code == 0:
        stage.status = "ok"
    elif code == 1:
        # conform and bench exit 1 when they ran to the end but found failing rows or benchmarks
        stage.status, stage.detail = "findings", f"exit status 1 (ran to the end, with failures): {last}"
    else:
        stage.status, stage.detail = "failed", f"exit status {code}: {last}"


def _stop_at(child, when: float, stopped: threading.Event) -> None:
    import signal
    while child.poll() is None:
        if time.monotonic() >= when:
            stopped.set()
            child.send_signal(signal.SIGINT)
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
            return
        time.sleep(0.5)


def remember_costs(stages: list[Stage], results_dir) -> None:
    """Keep what the report took, and what a benchmark took, for the next budget's split."""
    from mhabench import budget as job_budget
    from mhabench import results
    figures = {}
    for stage in stages:
        if stage.name == "report" and stage.status == "ok":
            figures["report_s"] = round(stage.seconds, 1)
        if stage.name == "bench" and stage.status in ("ok", "findings"):
            try:
                plan = results.read_json(results.Layout(results_dir).bench_plan)
                ran = int(plan.get("benchmarks", 0)) - sum((plan.get("not_run_budget") or {}).values())
            except (OSError, ValueError, TypeError, AttributeError):
                continue
            if ran > 0:  # per measurement: an accuracy case's methods share one
                selected, _ = bench_selection(stage)
                ran *= bench_units(selected) / max(1, len(selected))
                figures["bench_s_per_benchmark"] = round((stage.seconds - CHILD_START_S) / ran, 2)
    job_budget.remember(**figures)


def run_report(stage: Stage, args):
    from mhabench.cli import CLIError
    from . import report
    try:
        data, paths = report.build(args.results, args.out)
    except CLIError as exc:
        stage.status, stage.detail = "failed", str(exc)
        return None, None
    except Exception as exc:  # the verdict must still be printed, whatever broke in the report
        stage.status, stage.detail = "failed", f"{type(exc).__name__}: {exc}"
        return None, None
    stage.status = "ok"
    return data, paths


def stage_columns():
    """Spinner, stage, its bar and counts (from the child's progress lines), elapsed, the child's last line."""
    from rich.progress import BarColumn, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Column
    return (SpinnerColumn(), TextColumn("[bold]{task.description}", table_column=Column(min_width=8, no_wrap=True)),
            BarColumn(bar_width=24), TextColumn("{task.fields[counts]}", markup=False,
                                                table_column=Column(min_width=9, no_wrap=True)),
            TimeElapsedColumn(table_column=Column(min_width=7, no_wrap=True)),
            TextColumn("{task.fields[line]}", markup=False,
                       table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")))


def follow(progress, task, line: str) -> None:
    """Show a child's output line on its stage; a progress line (``mhabench.progress``) also moves the bar."""
    from mhabench.progress import parse
    found = parse(line)
    if found is not None:
        done, total, unit = found
        progress.update(task, total=max(total, 1), completed=done, counts=f"{done}/{total} {unit}")
    progress.update(task, line=printable(line)[:100])


def main(args) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import Progress

    from mhabench import budget as job_budget

    job_started = time.monotonic()
    console = Console()
    stages = stages_for(args)
    seconds = budget_seconds(args)
    learned = job_budget.learned()
    shares = plan_shares(stages, seconds, learned) if seconds else {}
    if "conform" in shares:
        stages[0].argv += ["--budget", f"{shares['conform']:.1f}"]
    log_dir = Path(args.results) / "logs"
    data = paths = None
    with Progress(*stage_columns(), console=console, transient=False) as progress:
        for stage in stages:
            # no total until the child's first progress line: the bar pulses
            task = progress.add_task(stage.name, total=1 if stage.status == "skipped" else None, counts="",
                                     line="skipped" if stage.status == "skipped" else "waiting")
            stage.task = task
        for stage in stages:
            if stage.status == "skipped":
                progress.update(stage.task, completed=1)
                continue
            started = time.monotonic()

            def on_line(line, task=stage.task):
                follow(progress, task, line)
            on_line("running")
            if stage.name == "bench" and seconds:
                left = job_started + seconds - time.monotonic() - report_seconds(learned)
                options, left_out = bench_budget_argv(stage, left, learned)
                stage.argv += options
                shares["bench"] = left
                if left_out:
                    stage.detail = (f"not run: budget: {left_out} benchmarks at the longest lengths (bench has no "
                                    f"--budget here); the rest runs with: mhabench bench --quick --results "
                                    f"{args.results}")
            if stage.argv is not None:
                # the stage plans itself within its share; past it and the grace it is stopped
                stop_at = (time.monotonic() + shares[stage.name] + GRACE * seconds) if seconds else None
                run_child(stage, log_dir, on_line, stop_at)
            else:
                data, paths = run_report(stage, args)
            stage.seconds = time.monotonic() - started
            total = next(t.total for t in progress.tasks if t.id == stage.task) or 1
            progress.update(stage.task, total=total, completed=total,
                            line=("done" if stage.status == "ok" else printable(stage.detail)[:100]))
    remember_costs(stages, args.results)
    failed = [s for s in stages if s.status == "failed"]  # "stopped" is the budget's, reported as not run
    findings = [s for s in stages if s.status == "findings"]
    console.print()
    if seconds:
        planned = ", ".join(f"{name} {share:.0f} s" for name, share in shares.items())
        console.print(f"[bold]budget:[/] {job_budget.format_duration(seconds)} ({escape(planned)}); the job took "
                      f"{time.monotonic() - job_started:.0f} s")
    if paths is not None:
        console.print(f"[bold]report:[/] {escape(str(paths['html'].resolve()))}")
        from mhabench import reports
        for line in reports.verdict(data):
            console.print(f"  {escape(printable(line))}")
    for stage in stages:
        colour = {"ok": "green", "findings": "yellow", "failed": "red", "skipped": "yellow",
                  "stopped": "yellow"}.get(stage.status, "white")
        where = f" (log: {stage.log})" if stage.log and stage.status in ("failed", "findings") else ""
        console.print(f"  [{colour}]{stage.name}: {stage.status}[/] {escape(printable(stage.detail))}"
                      f"{escape(where)}" + (escape(f" [{stage.seconds:.0f} s]") if stage.seconds else ""))
    if failed:
        console.print(f"[red bold]verdict: {len(failed)} stage(s) failed: {', '.join(s.name for s in failed)}[/]")
        return 1
    if findings:
        console.print(f"[yellow bold]verdict: every stage ran; {', '.join(s.name for s in findings)} "
                      "found failures (see the report)[/]")
        return 1
    console.print("[green bold]verdict: every stage ran, nothing failed[/]")
    return 0
