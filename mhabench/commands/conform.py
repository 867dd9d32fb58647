"""``mhabench conform``: does every implementation compute the same attention, and where exactly does each differ?"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

HELP = "run the conformance matrix over the adapters; write rows.jsonl, results.json, results.csv; print a summary"

DTYPES = ("float64", "float32", "float16", "bfloat16")


def register(parser):
    parser.add_argument("--adapters", help="comma-separated adapter names (default: every installed adapter)")
    parser.add_argument("--dtypes", help=f"comma-separated dtypes (default: {','.join(DTYPES)})")
    parser.add_argument("--areas", help="comma-separated areas: shapes,masks,axes,dtypes,special,invalid,"
                                        "gradients,random (default: all)")
    parser.add_argument("--results", default="results", help="results directory (default: ./results); "
                                                             "files go to RESULTS/conformance/")
    parser.add_argument("--resume", action="store_true", help="keep rows.jsonl and run only the rows it lacks")
    parser.add_argument("--rerun", metavar="ROW_ID", help="run exactly the case behind this row id again")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds one case may take (default 120); "
                                                                     "past it the worker is killed and restarted")
    parser.add_argument("--examples", type=int, default=25, help="random cases in the 'random' area (default 25)")
    parser.add_argument("--adapter", action="append", default=[], metavar="MODULE:CLASS",
                        help="also run an adapter class not in the registry (repeatable)")
    parser.add_argument("--quick", action="store_true", help="the reduced matrix the pytest view runs by default")
    parser.add_argument("--jobs", type=int, default=None, help="adapters run in parallel (default: CPU count)")
    parser.add_argument("--self-check", action="store_true",
                        help="run the deliberately broken mutant adapters and print which rows catch each")
    parser.add_argument("--memory-budget", type=float, default=None, metavar="MIB",
                        help="skip cases estimated to need more (default: a quarter of available memory)")


def _csv(value, known, what):
    from mhabench.cli import CLIError
    if value is None:
        return None
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in known]
    if unknown or not items:
        raise CLIError(f"unknown {what} {', '.join(unknown) or repr(value)}; known: {', '.join(known)}")
    return items


def _load_adhoc(targets) -> list[str]:
    from mhabench.cli import CLIError
    if not targets:
        return []
    try:
        from impls import plugins
    except ImportError as exc:
        raise CLIError(f"--adapter needs impls.plugins, which cannot be imported here ({exc})") from None
    import impls
    names = []
    for target in targets:
        try:
            name = plugins.load_adhoc(target)
        except ValueError as exc:  # not of the form module:Class
            raise CLIError(f"--adapter {target}: {exc}") from None
        ok, why = impls.get_adapter(name).availability()
        if not ok:  # a broken plugin is reported and skipped; the rest of the run goes on
            print(f"mhabench conform: skipping --adapter {target}: {why}", file=sys.stderr)
            continue
        names.append(name)
    return names


def _report_broken_plugins(registered) -> None:
    """Entry-point plugins that failed to load are left out of the run, but never silently."""
    import impls
    from impls.registry import BrokenAdapter
    for name in registered:
        adapter = impls.get_adapter(name)
        if isinstance(adapter, BrokenAdapter):
            print(f"mhabench conform: skipping {name}: {adapter.availability()[1]}", file=sys.stderr)


def _writable(directory: Path):
    from mhabench.cli import CLIError
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise CLIError(f"results directory {directory} is not writable ({exc.strerror or exc})") from None


def _split_row_id(row_id: str, adapters) -> tuple[str, str, str, str] | None:
    """``adapter-case-dtype-quantity`` -> its parts (adapter names may contain '-', so match the registry)."""
    for name in sorted(adapters, key=len, reverse=True):
        if row_id.startswith(name + "-"):
            parts = row_id[len(name) + 1:].rsplit("-", 2)
            if len(parts) == 3 and parts[1] in DTYPES:
                return (name, *parts)
    return None


def main(args) -> int:
    import impls
    from conformance import cases as cases_mod, catalogue, results, runner
    from conformance.strategies import random_cases
    from mhabench.cli import CLIError

    if args.self_check:
        from conformance import mutants
        return 0 if mutants.print_catch_table(mutants.self_check()) else 1
    adhoc_names = _load_adhoc(args.adapter)
    registered = impls.list_adapters()
    if not args.adapters:
        _report_broken_plugins(registered)
    adapters = _csv(args.adapters, registered, "adapter") or \
        [n for n in registered if runner.looks_available(n) and n not in adhoc_names]
    adapters += [n for n in adhoc_names if n not in adapters]
    dtypes = _csv(args.dtypes, DTYPES, "dtype") or list(DTYPES)
    areas = _csv(args.areas, [a for a in cases_mod.AREAS if a != "plugin"], "area")
    if args.timeout <= 0:
        raise CLIError(f"--timeout must be positive, got {args.timeout}")
    if args.examples < 0:
        raise CLIError(f"--examples must be >= 0, got {args.examples}")
    out_dir = results.conformance_dir(args.results)
    _writable(out_dir)
    try:
        entries = catalogue.load()
    except ValueError as exc:
        raise CLIError(f"divergence catalogue: {exc}") from None

    matrix = cases_mod.default_cases() + (random_cases(args.examples) if areas is None or "random" in areas else [])
    matrix = cases_mod.select(matrix, areas, quick=args.quick)
    rows_path = out_dir / "rows.jsonl"
    skip: set[str] = set()
    if args.rerun:
        found = _rerun_target(args.rerun, rows_path, registered, matrix)
        adapters, matrix, dtypes = [found[0]], [found[1]], [found[2]]
    elif args.resume:
        journal = results.read_rows(rows_path)
        for warning in journal.warnings:
            print(f"mhabench conform: warning: {warning}", file=sys.stderr)
        skip = {r["row_id"] for r in journal.rows}
        print(f"resuming: {len(skip)} finished rows in {rows_path} kept", file=sys.stderr)
    elif rows_path.exists():
        os.replace(rows_path, rows_path.with_suffix(".jsonl.prev"))  # a fresh run: the old journal is kept aside

    budget = int(args.memory_budget * 2**20) if args.memory_budget else None
    writer = results.RowWriter(rows_path)
    started = time.perf_counter()
    print(f"mhabench conform: {len(matrix)} cases x {len(adapters)} adapters x {len(dtypes)} dtypes -> {rows_path}",
          file=sys.stderr)
    try:
        runner.run_rows(adapters, matrix, dtypes, timeout=args.timeout, jobs=args.jobs, memory_budget=budget,
                        on_rows=writer.write, skip=skip, adhoc=args.adapter)
    finally:
        writer.close()
    elapsed = time.perf_counter() - started

    journal = results.read_rows(rows_path)
    for warning in journal.warnings:
        print(f"mhabench conform: warning: {warning}", file=sys.stderr)
    rows = journal.latest()
    full = not args.rerun and not args.quick and areas is None and dtypes == list(DTYPES)
    checks = catalogue.check(entries, rows, adapters, full_matrix=full)
    results.write_results(out_dir, rows, results.meta())
    return _print_summary(rows, checks, elapsed, out_dir, args.rerun)


def _rerun_target(row_id, rows_path, registered, matrix):
    from conformance import cases as cases_mod, results
    from mhabench.cli import CLIError
    previous = {r["row_id"]: r for r in results.read_rows(rows_path).rows}
    if row_id in previous:
        r = previous[row_id]
        adapter, case_id, dtype = r["adapter"], r["case"], r["dtype"]
    else:
        parts = _split_row_id(row_id, registered)
        if parts is None:
            raise CLIError(f"--rerun {row_id}: not a row id of the form adapter-case-dtype-quantity "
                           f"(adapters: {', '.join(registered)})")
        adapter, case_id, dtype, _ = parts
    if adapter not in registered:
        raise CLIError(f"--rerun {row_id}: adapter {adapter!r} is not registered (pass --adapter MODULE:CLASS)")
    case = cases_mod.find_case(case_id, extra=matrix)
    if case is None:
        raise CLIError(f"--rerun {row_id}: no case {case_id!r} in the matrix")
    return adapter, case, dtype


def _print_summary(rows, checks, elapsed, out_dir, rerun) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from conformance.results import summarise
    console = Console(width=None if sys.stdout.isatty() else 200)
    table_data = summarise(rows)
    adapters = sorted({a for a, _ in table_data})
    areas = [a for a in ("shapes", "masks", "axes", "dtypes", "special", "invalid", "gradients", "random", "plugin")
             if any(k[1] == a for k in table_data)]
    table = Table(title=f"conformance: {len(rows)} rows in {elapsed:.1f} s "
                        f"(p=pass f=fail d=divergence u=unsupported e=error s=skip; r=worst error ratio)")
    table.add_column("adapter")
    for area in areas:
        table.add_column(area, justify="right")
    for adapter in adapters:
        cells = []
        for area in areas:
            c = table_data.get((adapter, area))
            if c is None:
                cells.append("-")
                continue
            counts = " ".join(f"{c[s]}{s[0]}" for s in ("pass", "fail", "divergence", "unsupported", "error", "skip")
                              if c[s])
            bad = c["fail"] or c["error"]
            ratio = f" r{c['worst_ratio']:.2g}" if c["worst_ratio"] is not None else ""
            cells.append(f"[{'red' if bad else 'green'}]{counts}[/]{ratio}")
        table.add_row(escape(adapter), *cells)
    console.print(table)
    failing = [r for r in rows if r["status"] in ("fail", "error") and (not rerun or r["row_id"] == rerun)]
    for r in failing[:25]:
        console.print(f"[red]{r['status']}[/] {escape(r['row_id'])}: {escape(str(r['message'])[:300])}")
    if len(failing) > 25:
        console.print(f"... and {len(failing) - 25} more failing rows (see {escape(str(out_dir))}/results.csv)")
    stale = [c for c in checks if c.status == "stale"]
    for c in stale:
        console.print(f"[red]stale divergence entry[/] {escape(c.id)}: {escape(c.message)}")
    if rerun:
        for r in rows:
            if r["row_id"] == rerun:
                console.print(f"{escape(rerun)}: {r['status']} {escape(str(r['message']))}")
    console.print(f"results: {escape(str(out_dir))}/results.json, results.csv, rows.jsonl")
    return 1 if failing or stale else 0
