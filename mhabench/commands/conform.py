"""``mhabench conform``: does every implementation compute the same attention, and where exactly does each differ?"""
from __future__ import annotations

import sys
import threading

HELP = "run the conformance matrix over the adapters; write rows.jsonl, results.json, results.csv; print a summary"
PROGRESS_EVERY = 5.0


def register(parser):
    from mhabench.conformance.session import DEFAULT_EXAMPLES, SELECTABLE_AREAS
    from mhabench.results import DTYPES
    parser.add_argument("--adapters", metavar="A,B", help="comma-separated adapters, built-in or named with "
                        "--adapter (default: every installed adapter and every --adapter plugin)")
    parser.add_argument("--dtypes", metavar="D,E", help=f"comma-separated dtypes (default: {','.join(DTYPES)})")
    parser.add_argument("--areas", metavar="A,B", help=f"comma-separated areas: {','.join(SELECTABLE_AREAS)} "
                                                       f"(default: all)")
    parser.add_argument("--results", default="results", help="results directory (default: ./results); "
                                                             "files go to RESULTS/conformance/")
    parser.add_argument("--resume", action="store_true", help="keep rows.jsonl and run only the rows it lacks")
    parser.add_argument("--rerun", metavar="ROW_ID", help="run exactly the case behind this row id again")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one case may take (default 120); "
                                                                     "past it the worker is killed and restarted")
    parser.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES,
                        help=f"random cases in the 'random' area (default {DEFAULT_EXAMPLES})")
    parser.add_argument("--adapter", action="append", default=[], metavar="MODULE:CLASS",
                        help="also run an adapter class not in the registry (repeatable); one that cannot be "
                             "loaded stops the run")
    parser.add_argument("--quick", action="store_true", help="the reduced matrix the pytest view runs by default")
    parser.add_argument("--every-case", action="store_true",
                        help="run the whole matrix also for adapters that declare reduced_matrix (each new shape "
                             "costs them a compilation or an export of seconds)")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes at a time; an adapter with much "
                        "work left gets several (default: one per core, 2 GiB of available memory each)")
    parser.add_argument("--self-check", action="store_true",
                        help="run the deliberately broken mutant adapters and print which rows catch each")
    parser.add_argument("--cache-dir", metavar="DIR", help="where compiled programs are kept between runs "
                        "(default: $MHABENCH_CACHE_DIR or ~/.cache/mhabench; 'off' keeps nothing)")
    parser.add_argument("--memory-budget", type=float, default=None, metavar="MIB",
                        help="skip cases estimated to need more (default: a quarter of available memory)")
    parser.add_argument("--shard", metavar="K/N", help="run part K of N of the tasks (adapter x case x dtype), "
                        "split evenly by estimated cost and the same on every machine: N shards with the same "
                        "options cover the whole run exactly once (merge them with mhabench report --results)")
    parser.add_argument("--machine", metavar="NAME", help="the machine name recorded with the results "
                        "(default: the host name); give every shard of one kind of machine the same name")
    parser.add_argument("--switch", action="append", default=[], metavar="NAME=SETTING",
                        help="run with a kernel switch forced in the workers of the adapters it reaches, to get "
                             "another machine's kernels on this one (repeatable): tf_onednn=on|off "
                             "(TF_ENABLE_ONEDNN_OPTS), torch_cpu=default|avx2|avx512 (ATEN_CPU_CAPABILITY); rows "
                             "record the facts the frameworks report")
    parser.add_argument("--switches", nargs="?", const="all", metavar="NAMES",
                        help="run the selection with the machine's own kernels, then once per setting of each "
                             "kernel switch the adapters declare (NAMES: a comma-separated few; settings this CPU "
                             "cannot run are left out) into RESULTS/switches/, and write the portability table "
                             "(RESULTS/conformance/portability.json): the rows whose verdict changes with each")
    parser.add_argument("--budget", default="0", metavar="DURATION",
                        help="end within this time (300, 90s, 5m; default 0: no budget), coverage first: every "
                             "adapter x area x dtype gets a row before any gets a second; what does not fit is "
                             "recorded as not run, with the command that runs the rest")
    parser.add_argument("--progress-every", type=float, default=PROGRESS_EVERY, metavar="SECONDS",
                        help=f"when stderr is not a terminal, a plain progress line this often (default "
                             f"{PROGRESS_EVERY:g}; 0: after every case); on a terminal, progress bars")


def check_options(args) -> None:
    from mhabench.cli import CLIError
    conflicts = [("--self-check", args.self_check, "--rerun", args.rerun), ("--self-check", args.self_check,
                 "--resume", args.resume), ("--resume", args.resume, "--rerun", args.rerun),
                 ("--shard", args.shard, "--rerun", args.rerun), ("--shard", args.shard, "--self-check",
                                                                   args.self_check),
                 ("--switches", args.switches, "--switch", args.switch), ("--switches", args.switches, "--rerun",
                                                                         args.rerun),
                 ("--switches", args.switches, "--resume", args.resume),
                 ("--switches", args.switches, "--self-check", args.self_check)]
    for a, a_set, b, b_set in conflicts:
        if a_set and b_set:
            raise CLIError(f"{a} and {b} cannot be used together")
    if not args.timeout > 0:
        raise CLIError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    if args.jobs is not None and args.jobs < 1:
        raise CLIError(f"--jobs must be an integer >= 1, got {args.jobs}")
    if args.memory_budget is not None and not args.memory_budget > 0:
        raise CLIError(f"--memory-budget must be a positive number of MiB, got {args.memory_budget:g}")
    if args.examples < 0:
        raise CLIError(f"--examples must be an integer >= 0, got {args.examples}")
    if not args.progress_every >= 0:
        raise CLIError(f"--progress-every must be a number of seconds >= 0, got {args.progress_every}")
    from mhabench.budget import parse_duration
    from mhabench.results import machine_name
    try:
        machine_name(args.machine)
        args.budget_seconds = parse_duration(args.budget)
    except ValueError as exc:
        raise CLIError(str(exc)) from None
    for option, given in (("--rerun", args.rerun), ("--self-check", args.self_check), ("--switches", args.switches)):
        if args.budget_seconds and given:  # --switches runs the selection once per setting: one budget each is not one
            raise CLIError(f"--budget and {option} cannot be used together")


def main(args) -> int:
    import time
    started = time.monotonic()
    from mhabench import results
    from mhabench.cli import CLIError, printable
    from mhabench.conformance import session

    check_options(args)
    if args.self_check:
        from mhabench.conformance import mutants
        return 0 if mutants.print_catch_table(mutants.self_check()) else 1
    try:
        plan = session.make_plan(args.adapters, args.dtypes, args.areas, quick=args.quick, examples=args.examples,
                                 adhoc=args.adapter, shard=args.shard, every_case=args.every_case,
                                 switches=args.switch, timeout=args.timeout)
        names = switch_names(args.switches, plan.adapters)
    except session.SelectionError as exc:
        raise CLIError(str(exc)) from None
    if not args.adapters:
        for name, reason in session.broken_plugins():
            print(printable(f"mhabench conform: skipping {name}: {reason}"), file=sys.stderr)
    if not plan.adapters:
        raise CLIError("no adapter to run: none is installed here (see `mhabench adapters`)")
    warn = lambda text: print(printable(f"mhabench conform: warning: {text}"), file=sys.stderr)
    from mhabench.impls.facts import isa_cap_warning
    if isa_cap_warning():
        warn(isa_cap_warning())
    budget = int(args.memory_budget * 2**20) if args.memory_budget else None
    layout = results.Layout(args.results)
    displays = [progress_display(sys.stderr, args.progress_every)]  # one per run (--switches runs several)
    journal = [layout.rows]  # where the current run's rows go

    def start(tally):
        plan = tally.plan
        shard = f" (shard {plan.shard[0]}/{plan.shard[1]}: {plan.rows} of {plan.rows_all_shards} rows)" \
            if plan.shard else ""
        print(f"mhabench conform: {len(plan.cases)} cases x {len(plan.adapters)} adapters x {len(plan.dtypes)} "
              f"dtypes = {plan.rows_all_shards} rows{shard} -> {journal[-1]}", file=sys.stderr, flush=True)
        for name, why in plan.reduced.items():
            print(f"  {name}: the reduced matrix only (--every-case for all): {why}", file=sys.stderr, flush=True)
        displays[-1].start(tally)
    options = dict(timeout=args.timeout, jobs=args.jobs, memory_budget=budget, on_start=start,
                   on_rows=lambda rows: displays[-1].update(rows), warn=warn, machine=args.machine,
                   budget=args.budget_seconds or None, started=started)

    def next_setting(label, root):
        if displays[-1].tally is not None:  # the previous run's display ends before the next one starts
            displays[-1].finish()
            displays.append(progress_display(sys.stderr, args.progress_every))
        journal.append(results.Layout(root).rows)
        print(f"mhabench conform: kernels: {label}", file=sys.stderr, flush=True)
    if plan.switches:
        print(f"mhabench conform: kernel switches forced: "
              f"{', '.join(f'{k}={v}' for k, v in sorted(plan.switches.items()))}", file=sys.stderr, flush=True)
    try:
        with results.locked(layout.root, " ".join(["mhabench", *sys.argv[1:]])):
            try:
                if names is not None:
                    from mhabench.conformance import portability
                    outcome, _, table = portability.run(plan, layout.root, names, on_setting=next_setting,
                                                        **options)
                else:
                    outcome = session.run(plan, layout.root, resume=args.resume, rerun=args.rerun, **options)
            finally:
                displays[-1].finish()
    except (session.SelectionError, results.ResultsLocked) as exc:
        raise CLIError(str(exc)) from None
    except results.WriteFailed as exc:
        again = "run the same command again" if args.rerun else "run the same command with --resume to finish it"
        raise CLIError(f"{exc}; the run stopped. Every row written so far is kept in {layout.rows}: free "
                       f"space and {again}") from None
    except OSError as exc:
        raise CLIError(f"results directory {layout.root}: {exc.strerror or exc}") from None
    status = print_summary(outcome, args.rerun)
    if names is None:
        return status
    return max(status, print_portability(table, layout))


def switch_names(text, adapters) -> list[str] | None:
    """The switches ``--switches`` names (all the adapters declare for "all"); None without ``--switches``."""
    from mhabench.conformance import session
    if text is None:
        return None
    declared = [s.name for s in session.declared_switches(adapters)]
    if not declared:
        raise session.SelectionError("--switches: no selected adapter declares a kernel switch")
    if text == "all":
        return declared
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in declared]
    if unknown or not names:
        raise session.SelectionError(f"--switches {text!r}: expected some of {', '.join(declared)}")
    return names


def print_portability(table: dict, layout, console=None) -> int:
    """Per switch setting, the rows whose verdict changed and what decides the run there; 1 when any setting
    has a failing row or a stale entry."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from mhabench.cli import printable
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    own = table["own_choice"]
    grid = Table(title=f"portability: verdicts that change with a kernel switch (own choice: {own['rows']} rows, "
                       f"{own['fail']} fail or error, {len(own['stale'])} stale)")
    for column in ("switch", "adapters", "rows", "changed", "fail", "error", "stale", "changed per adapter"):
        grid.add_column(column)
    bad = 0
    for s in table["settings"]:
        per = {}
        for c in table["changes"]:
            if (c["switch"], c["setting"]) == (s["switch"], s["setting"]):
                per[c["adapter"]] = per.get(c["adapter"], 0) + 1
        red = s["fail"] or s["error"] or s["stale"]
        bad += bool(s["fail"] or s["stale"])
        grid.add_row(escape(f"{s['switch']}={s['setting']} ({s['variable']}={s['value']})"), str(len(s["adapters"])),
                     str(s["rows"]), str(s["changed"]), f"[{'red' if s['fail'] else 'green'}]{s['fail']}[/]",
                     str(s["error"]), f"[{'red' if s['stale'] else 'green'}]{len(s['stale'])}[/]",
                     escape(", ".join(f"{a} {n}" for a, n in sorted(per.items())) or "-"),
                     style="red" if red else None)
        for line in s["warnings"]:
            console.print(f"[yellow]warning[/] {escape(printable(line))}")
    console.print(grid)
    for s in table["settings"]:
        for entry in s["stale"]:
            console.print(f"[red]stale under {escape(s['switch'])}={escape(s['setting'])}[/] {escape(entry)} "
                          f"({escape(str(layout.root / s['results']))})")
    console.print(f"portability table: {escape(str(layout.portability))}")
    return 1 if bad or own["fail"] or own["stale"] else 0


# ---- progress --------------------------------------------------------------------------------------

def progress_display(stream, every: float):
    """Bars on a terminal, plain lines in a log."""
    return ProgressBars(stream) if stream.isatty() else ProgressLines(stream, every)


class ProgressLines:
    """Off a terminal: the tally's plain line (``mhabench.progress``) every ``every`` seconds, whether or not
    rows came in (a log shows the run is alive), and once at the end; ``every`` 0: a line per batch of rows.

    ``mhabench run`` reads these lines back from its conform stage to draw that stage's bar."""

    def __init__(self, stream, every: float):
        self.stream, self.every = stream, every
        self.tally = None
        self._stop = threading.Event()
        self._ticker = None

    def start(self, tally):
        self.tally = tally
        self._write()
        if self.every > 0:
            self._ticker = threading.Thread(target=self._tick, daemon=True)
            self._ticker.start()

    def _tick(self):
        while not self._stop.wait(self.every):
            if self.tally.completed < self.tally.total:
                self._write()

    def update(self, rows):
        if self.tally is not None and self.every == 0:
            self._write()

    def finish(self):
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self.tally is not None:
            self._write()
            self.tally = None

    def _write(self):
        from mhabench.cli import printable
        print(printable(f"mhabench conform: {self.tally.line()}"), file=self.stream, flush=True)


class ProgressBars:
    """On a terminal: one bar per adapter (rows done / planned), one for the run with elapsed and time left."""

    def __init__(self, stream=None, console=None):
        from rich.console import Console
        self.console = console or Console(file=stream, stderr=stream is None)
        self.progress = self.tally = None
        self.tasks: dict[str, int] = {}

    def start(self, tally):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn
        from rich.table import Column
        from rich.text import Text
        from mhabench.progress import format_seconds

        class Timing(ProgressColumn):
            """Elapsed and time left of the whole run, from the tally's weighted fraction."""

            def render(self, task):
                if not task.fields.get("overall"):
                    return Text("done" if task.finished else "", style="green")
                eta = tally.eta()
                left = "done" if task.finished else ("time left unknown" if eta != eta else
                                                     f"about {format_seconds(eta)} left")
                return Text(f"{format_seconds(tally.elapsed())} elapsed, {left}")

        self.tally = tally
        self.progress = Progress(TextColumn("{task.description}", table_column=Column(no_wrap=True)),
                                 BarColumn(), MofNCompleteColumn(), Timing(), console=self.console,
                                 transient=False)
        self.progress.start()
        self.tasks["\0overall"] = self.progress.add_task(f"all ({tally.unit})", total=tally.total,
                                                          completed=tally.completed, overall=True)
        for adapter, planned in tally.planned.items():
            self.tasks[adapter] = self.progress.add_task(adapter, total=planned, completed=tally.done[adapter])

    def update(self, rows):
        if self.progress is None:
            return
        for adapter in {r.adapter for r in rows}:
            if adapter not in self.tasks:
                self.tasks[adapter] = self.progress.add_task(adapter, total=self.tally.planned[adapter])
            self.progress.update(self.tasks[adapter], completed=self.tally.done[adapter],
                                 total=self.tally.planned[adapter])
        self.progress.update(self.tasks["\0overall"], completed=self.tally.completed, total=self.tally.total)

    def finish(self):
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def print_summary(outcome, rerun, console=None) -> int:
    """The adapter x area summary, failing rows and stale entries; 1 when anything failed."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from mhabench.cli import printable
    from mhabench.results import AREAS, STATUSES
    rows = outcome.rows
    console = console or Console(width=None if sys.stdout.isatty() else 200)
    table_data = outcome.summary()
    adapters = sorted({a for a, _ in table_data})
    areas = [a for a in AREAS if any(k[1] == a for k in table_data)]
    def cell(adapter, area):
        c = table_data.get((adapter, area))
        if c is None:
            return "-"
        counts = " ".join(f"{c[s]}{s[0]}" for s in STATUSES if c[s])
        ratio = f" r{c['worst_ratio']:.2g}" if c["worst_ratio"] is not None else ""
        return f"[{'red' if c['fail'] or c['error'] else 'green'}]{counts}[/]{ratio}"

    title = (f"conformance: {len(rows)} rows in {outcome.elapsed:.1f} s "
             f"(p=pass f=fail d=divergence u=unsupported e=error s=skip; r=worst error ratio)")
    wide = console.width >= 22 + 16 * len(areas)
    table = Table(title=title)
    table.add_column("adapter", no_wrap=True)
    if wide:  # one column per area
        for area in areas:
            table.add_column(area, justify="right")
        for adapter in adapters:
            table.add_row(escape(printable(adapter)), *[cell(adapter, a) for a in areas])
    else:  # a narrow terminal: the areas of an adapter as wrapping text, so no name is ever cut
        table.add_column("areas")
        for adapter in adapters:
            table.add_row(escape(printable(adapter)),
                          " · ".join(f"{area} {cell(adapter, area)}" for area in areas if (adapter, area) in table_data))
    console.print(table)
    failing = [r for r in outcome.failing if not rerun or r.row_id == rerun]
    for r in failing[:25]:
        console.print(f"[red]{r.status}[/] {escape(printable(r.row_id))}: {escape(printable(r.message)[:300])}")
    if len(failing) > 25:
        console.print(f"... and {len(failing) - 25} more failing rows (see {escape(str(outcome.layout.results_csv))})")
    for c in outcome.stale:
        console.print(f"[red]stale divergence entry[/] {escape(c.id)}: {escape(printable(c.message))}")
    if rerun:
        for r in rows:
            if r.row_id == rerun:
                console.print(f"{escape(printable(rerun))}: {r.status} {escape(printable(r.message))}")
    for line in budget_lines(outcome.plan.budget):
        console.print(f"[yellow]{escape(printable(line))}[/]")
    console.print(f"results: {escape(str(outcome.layout.conformance))}/results.json, results.csv, rows.jsonl")
    return 1 if failing or outcome.stale else 0


def budget_lines(budget: dict | None) -> list[str]:
    """What a budgeted run left out, per adapter, and the command that runs it (nothing when all ran)."""
    from mhabench.results import not_run_lines
    return not_run_lines(budget, "rows")
