"""``mhabench report``: one self-contained HTML page, a Markdown summary and the tidy CSVs."""
from __future__ import annotations

import sys
from pathlib import Path

from mhabench.cli import printable

HELP = "build the HTML report and Markdown summary from conformance and benchmark results (or compare two)"

DEFAULT_RESULTS = "results"
DEFAULT_OUT = "reports/out"


def register(parser):
    parser.add_argument("--results", default=None, nargs="+", metavar="DIR",
                        help=f"results directories written by conform and bench (default: {DEFAULT_RESULTS}; "
                             "with --compare, only when given); several are merged into one report (shards, "
                             "machines, nights), each row once per machine and device")
    parser.add_argument("--machine", nargs="+", metavar="NAME",
                        help="the machine name of the results: one name for every --results directory, or one per "
                             "directory in order (default: asv's machine name where asv ran, else the host "
                             "the conformance run recorded, else its CPU)")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help=f"where index.html, summary.md and the CSVs go (default: {DEFAULT_OUT})")
    parser.add_argument("--compare", nargs=2, metavar=("A", "B"),
                        help="compare two results directories or asv result files: ratio B/A per benchmark, "
                             "regressions and improvements flagged")
    parser.add_argument("--threshold", type=float, default=10.0, metavar="PERCENT",
                        help="smallest change flagged by --compare, in percent (default: 10)")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when the results are red or incomplete: fail or error rows, stale catalogue "
                             "entries, a missing shard or planned rows missing, unreadable result lines, and with "
                             "--compare any regression (the report is written either way)")


def _percent(value: float) -> float:
    from mhabench.cli import CLIError
    if not 0 <= value < 1000:
        raise CLIError(f"--threshold must be a percentage between 0 and 1000, got {value}")
    return value / 100


def build(results, out: str | Path, compare=None, threshold: float = 0.10, machines=None):
    """Build the report; a CLIError for anything wrong with the inputs. Returns (data, paths).

    ``results``: a results directory, a list of them (merged), or None (a comparison only)."""
    from mhabench.cli import CLIError
    from mhabench import reports
    if isinstance(results, (str, Path)):
        results = [results]
    if machines and not results:
        raise CLIError("--machine names the machines of --results directories; give --results too")
    try:
        comparison = reports.compare(Path(compare[0]), Path(compare[1]), threshold) if compare else None
        dirs = [Path(r) for r in results] if results is not None else None
        return reports.build_report(dirs, Path(out), comparison, machines)
    except reports.ResultsError as exc:
        raise CLIError(str(exc)) from None


def main(args) -> int:
    threshold = _percent(args.threshold)
    # --compare alone reports on A vs B (the page shows B); an explicit --results is shown instead
    results = args.results if args.compare else (args.results or [DEFAULT_RESULTS])
    data, paths = build(results, args.out, args.compare, threshold, args.machine)
    from mhabench import reports
    for line in reports.verdict(data):
        print(printable(line))
    for problem in data.problems:
        print(printable(f"unreadable: {problem}"), file=sys.stderr)
    if data.comparison is not None:
        _print_comparison(data.comparison)
    print(f"report: {paths['html'].resolve()}")
    print(f"summary: {paths['markdown'].resolve()}")
    if args.strict:
        failures = reports.strict_failures(data)
        for line in failures:
            print(printable(f"strict: {line}"), file=sys.stderr)
        return 1 if failures else 0
    return 0


def _print_comparison(comparison) -> None:
    table = comparison.table
    flagged = table[table["change"].isin(["regression", "failed in B", "improvement", "fixed in B"])]
    for record in flagged.head(20).to_dict("records"):
        ratio = f"{record['ratio']:.2f}" if record["ratio"] == record["ratio"] else "n/a"
        print(printable(f"  {record['change']:<12} {ratio:>6}  {record['benchmark']}({record['params']})"))
    for record in comparison.conformance_changes.head(20).to_dict("records"):
        version_a, version_b = record.get("framework_version_a"), record.get("framework_version_b")
        upgraded = f"  ({version_a} -> {version_b})" if version_a != version_b else ""
        print(printable(f"  {record['status_a']} -> {record['status_b']}  {record['row_id']}{upgraded}"))
