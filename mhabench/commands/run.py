"""``mhabench run``: the main job. Conformance suite, quick benchmarks, report, over every installed adapter.

Conformance and benchmarks run as child processes (``python -m mhabench ...``) so that a crash or a
framework abort in one stage cannot take the others down; each child's output goes to a log file
under the results directory while a bar per stage shows how far it is: the children write plain progress
lines (``mhabench.progress``) into that output, and the bar follows them.
"""
from __future__ import annotations

import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from mhabench.cli import printable

from .report import DEFAULT_OUT, DEFAULT_RESULTS

HELP = ("the main job: run the conformance suite (the reduced matrix; --full for all of it), the quick benchmark "
        "profile and the report")
PROGRESS_EVERY = 2  # seconds between the conform stage's progress lines, which move its bar


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
    parser.add_argument("--skip-conform", action="store_true", help="do not run the conformance suite")
    parser.add_argument("--skip-bench", action="store_true", help="do not run the benchmarks")


@dataclass
class Stage:
    name: str
    argv: list  # mhabench arguments; None for the in-process report
    status: str = "pending"  # pending | ok | findings | failed | skipped
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


def default_kernel_adapters() -> list[str]:
    """The installed adapters that let their framework choose its kernel (no forced-kernel variant)."""
    from mhabench import impls
    adapters = [impls.get_adapter(name) for name in impls.list_adapters()]
    return [a.name for a in adapters if a.kernel == "default" and a.looks_installed()]


def run_child(stage: Stage, log_dir: Path, on_line) -> None:
    """Run one stage as ``python -m mhabench ...``; its output goes to a log, its last line to ``on_line``."""
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
    if code == 0:
        stage.status = "ok"
    elif code == 1:
        # conform and bench exit 1 when they ran to the end but found failing rows or benchmarks
        stage.status, stage.detail = "findings", f"exit status 1 (ran to the end, with failures): {last}"
    else:
        stage.status, stage.detail = "failed", f"exit status {code}: {last}"


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

    console = Console()
    stages = stages_for(args)
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
            if stage.argv is not None:
                run_child(stage, log_dir, on_line)
            else:
                data, paths = run_report(stage, args)
            stage.seconds = time.monotonic() - started
            total = next(t.total for t in progress.tasks if t.id == stage.task) or 1
            progress.update(stage.task, total=total, completed=total,
                            line=("done" if stage.status == "ok" else printable(stage.detail)[:100]))
    failed = [s for s in stages if s.status == "failed"]
    findings = [s for s in stages if s.status == "findings"]
    console.print()
    if paths is not None:
        console.print(f"[bold]report:[/] {escape(str(paths['html'].resolve()))}")
        from mhabench import reports
        for line in reports.verdict(data):
            console.print(f"  {escape(printable(line))}")
    for stage in stages:
        colour = {"ok": "green", "findings": "yellow", "failed": "red", "skipped": "yellow"}.get(stage.status, "white")
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
