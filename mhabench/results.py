"""The results directory, defined once: its layout, the row schema, the one reader and writer of each file.

Conformance, benchmarks, the report and the CLI all go through this module, so no reader guesses at
a schema and every reader treats a damaged file the same way.

Layout of a results directory::

    conformance/rows.jsonl      the journal: one row per line, appended and fsynced as rows are produced
    conformance/plan.json       what the run set out to do (rows planned; its shard K/N), written when it starts;
                                under a time budget also what it did not run ("budget", :func:`not_run_lines`)
    conformance/results.json    {"meta": ..., "rows": [...]}: the latest row per id, written at the end
    conformance/results.csv     the same rows, one per line
    conformance/catalogue.json  the divergence entries the run checked, each with its verdict
    bench/skips.jsonl           why a benchmark case did not run
    bench/plan.json             what a benchmark run set out to do (benchmarks planned, its shard K/N)
    bench/progress.jsonl        the benchmark chunks finished (for --resume)
    bench/peaks.jsonl           the machine's GEMM rate, measured before and after each chunk
    bench/flops.jsonl           the FLOPs of each benchmark case (GFLOP/s = FLOPs / asv's time)
    asv/                        asv's own results (one folder per machine)
    logs/                       the main job's per-stage logs
    .lock                       held by the run writing into the directory
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import io
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# The row schema is the contract's (mhabench.schema): re-exported here, where readers of a results directory look.
from .schema import AREAS, DEFAULT_KERNEL, DTYPES, FIELDS, NUMERIC, REQUIRED, STATUSES, Row, Status, legacy_kernel

PROBLEM_STATUSES = (Status.ERROR, Status.FAIL, Status.DIVERGENCE, Status.UNSUPPORTED, Status.SKIP)  # worst first

__all__ = ["AREAS", "DTYPES", "FIELDS", "NUMERIC", "REQUIRED", "STATUSES", "DEFAULT_KERNEL", "PROBLEM_STATUSES",
           "Row", "legacy_kernel", "Layout", "Journal", "read_rows", "RowWriter", "write_results", "read_results",
           "summarise", "meta"]


class Layout:
    """Where each file of a results directory lives."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.conformance = self.root / "conformance"
        self.rows = self.conformance / "rows.jsonl"
        self.plan = self.conformance / "plan.json"
        self.results_json = self.conformance / "results.json"
        self.results_csv = self.conformance / "results.csv"
        self.catalogue = self.conformance / "catalogue.json"
        self.bench = self.root / "bench"
        self.skips = self.bench / "skips.jsonl"
        self.progress = self.bench / "progress.jsonl"
        self.peaks = self.bench / "peaks.jsonl"
        self.flops = self.bench / "flops.jsonl"
        self.bench_plan = self.bench / "plan.json"
        self.asv_config = self.bench / "asv.conf.json"
        self.asv = self.root / "asv"
        self.asv_html = self.root / "asv-html"
        self.logs = self.root / "logs"
        self.lock = self.root / ".lock"

    def __repr__(self):
        return f"Layout({str(self.root)!r})"


# ---- the journal ---------------------------------------------------------------------------------

@dataclass
class Journal:
    rows: list[Row]
    problems: list[str] = field(default_factory=list)  # "path:line: what is wrong" for every line not read

    def latest(self) -> list[Row]:
        """One row per row_id, the last written winning (a --rerun appends a newer row)."""
        by_id = {}
        for row in self.rows:
            by_id.pop(row.row_id, None)
            by_id[row.row_id] = row
        return list(by_id.values())


def as_row(row: Row | dict) -> Row:
    """A Row from a Row or a record with the row fields (ValueError for one that is not a row)."""
    return row if isinstance(row, Row) else Row.from_dict(row)


def read_jsonl(path: str | os.PathLike, problem=lambda record: None, parse=None) -> tuple[list, list[str]]:
    """The records of a JSON-lines file, and "path:line: what is wrong" for every line not read.

    The one policy for a damaged journal: nothing is dropped silently. A half-written last line (a
    run killed mid-write) is reported as truncated; any other bad line as corrupt; a line that parses
    but ``problem(record)`` rejects, or ``parse(record)`` (which turns a record into what is kept)
    refuses with a ValueError, with that reason. Bad lines are left in the file.
    """
    path = Path(path)
    if not path.exists():
        return [], []
    data = path.read_bytes()
    lines = data.split(b"\n")
    ends_cleanly = data.endswith(b"\n")
    if ends_cleanly:
        lines = lines[:-1]
    records, problems = [], []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        text = raw[:80].decode("utf-8", "replace")
        try:
            record = json.loads(raw)
        except ValueError as exc:
            if number == len(lines) and not ends_cleanly:
                problems.append(f"{path}:{number}: truncated last line (a run killed mid-write): {text!r}")
            else:
                problems.append(f"{path}:{number}: corrupt line ({exc}): {text!r}")
            continue
        why = problem(record)
        if not why and parse is not None:
            try:
                record = parse(record)
            except ValueError as exc:
                why = str(exc)
        if why:
            problems.append(f"{path}:{number}: not a valid record ({why}): {text!r}")
            continue
        records.append(record)
    return records, problems


def read_rows(path: str | os.PathLike) -> Journal:
    """The rows of a rows.jsonl (see :func:`read_jsonl`); the rows of a bad line count as not run
    (``--resume`` runs them again)."""
    rows, problems = read_jsonl(path, parse=Row.from_dict)
    return Journal(rows, problems)


def skip_problem(record) -> str | None:
    """Why ``record`` is not a line of bench/skips.jsonl, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    missing = [k for k in ("benchmark", "params", "status", "reason") if k not in record]
    return f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}" if missing else None


def _finite(value):
    """JSON-safe: non-finite floats become None (rows never carry NaN figures)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class RowWriter:
    """Appends rows to rows.jsonl, one fsync per batch."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        needs_newline = self.path.exists() and self.path.stat().st_size > 0 and \
            not self.path.read_bytes().endswith(b"\n")
        self.file = open(self.path, "ab")
        if needs_newline:  # a truncated last line stays on its own line, reported by read_rows
            self.file.write(b"\n")

    def write(self, rows: list[Row]) -> None:
        self.file.write("".join(json.dumps(_finite(as_row(r).to_dict()), allow_nan=False) + "\n"
                                for r in rows).encode())
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        self.file.close()


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old or the new."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, data) -> None:
    atomic_write(Path(path), json.dumps(_finite(data), indent=1, allow_nan=False))


def read_json(path: Path):
    """A JSON file's contents; ValueError with the path for a file that does not parse."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None


def write_results(root: str | os.PathLike, rows: list[Row], meta_info: dict) -> tuple[Path, Path]:
    """results.json ({"meta", "rows"}) and results.csv (nested fields JSON-encoded) under a results
    directory ``root``, each written atomically."""
    layout = Layout(root)
    records = [as_row(r).to_dict() for r in rows]
    write_json(layout.results_json, {"meta": meta_info, "rows": records})
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, extrasaction="ignore")
    writer.writeheader()
    for record in records:
        writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else ("" if v is None else v)
                         for k, v in _finite(record).items()})
    atomic_write(layout.results_csv, buffer.getvalue())
    return layout.results_json, layout.results_csv


@dataclass
class Results:
    """What a conformance run left in a results directory, read one way for every reader."""

    meta: dict
    rows: list[Row]
    plan: dict | None               # rows planned when the run started (None: an older run wrote none)
    catalogue: list[dict]           # the entries the run checked, with their verdicts
    problems: list[str]             # every line or file that could not be read, with its path
    source: Path
    complete: bool                  # results.json written (the run reached its end)

    @property
    def missing(self) -> int | None:
        """Planned rows that are not in the results (None when no plan was recorded)."""
        if self.plan is None:
            return None
        return max(0, int(self.plan.get("rows", 0)) - len(self.rows))


def read_results(root: str | os.PathLike) -> Results | None:
    """The conformance results under ``root`` (a results directory); None when there are none.

    results.json when the run finished; otherwise the journal of an interrupted run, with its problems.
    """
    layout = Layout(root)
    if not layout.conformance.is_dir():
        return None
    problems: list[str] = []
    plan = None
    if layout.plan.is_file():
        try:
            plan = read_json(layout.plan)
        except ValueError as exc:
            problems.append(str(exc))
    catalogue = []
    if layout.catalogue.is_file():
        try:
            catalogue = list(read_json(layout.catalogue))
        except (ValueError, TypeError) as exc:
            problems.append(str(exc))
    if layout.results_json.is_file():
        data = read_json(layout.results_json)
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            raise ValueError(f"{layout.results_json} has no 'rows' list")
        rows = []
        for index, record in enumerate(data["rows"]):
            try:
                rows.append(Row.from_dict(record))
            except ValueError as exc:
                problems.append(f"{layout.results_json}: row {index}: {exc}")
        return Results(data.get("meta") or {}, rows, plan, catalogue, problems, layout.results_json, True)
    if layout.rows.is_file():
        journal = read_rows(layout.rows)
        return Results({}, journal.latest(), plan, catalogue, problems + journal.problems, layout.rows, False)
    return None


# ---- one run at a time per directory -----------------------------------------------------------------

class ResultsLocked(RuntimeError):
    """Another live process is writing into this results directory."""


@contextlib.contextmanager
def locked(root: str | os.PathLike, command: str):
    """Hold the results directory's lock for the duration: an OS file lock, released when the process
    ends however it ends (a SIGKILLed run leaves no stale lock). A second run into a locked directory
    gets ResultsLocked at once, naming the holder's pid and command."""
    import fcntl
    layout = Layout(root)
    layout.root.mkdir(parents=True, exist_ok=True)
    fd = os.open(layout.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        raise ResultsLocked(f"results directory {layout.root} is in use by {holder}; wait for it to finish "
                            f"or choose another --results") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} ({command})".encode())
        yield layout
    finally:
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


# ---- the summary matrix ----------------------------------------------------------------------------

def meaningful_ratio(row: Row | dict) -> float | None:
    """The row's error ratio where it says something: a judged row whose tolerance the reference's error
    set, not the floor (where the reference is exact by luck or by symmetry, a gradient zero in exact
    arithmetic, the ratio divides by almost nothing)."""
    ratio = row.get("error_ratio")
    if row.get("status") not in ("pass", "fail") or row.get("tolerance_source") != "reference":
        return None
    if not isinstance(ratio, (int, float)) or isinstance(ratio, bool) or not math.isfinite(ratio):
        return None
    return float(ratio)


NOT_RUN_BUDGET = "not run: budget"  # what a time budget left out, on the terminal, the page and the summary


def not_run_lines(budget, unit: str) -> list[str]:
    """What a run under a time budget left out, from its plan's ``budget`` record ({"seconds", "not_run":
    {adapter: count}, "rest": command}): the counts per adapter, then the command that runs the rest.
    Nothing when everything ran or no budget was given."""
    if not isinstance(budget, dict) or not isinstance(budget.get("not_run"), dict):
        return []
    counts = {str(a): int(n) for a, n in budget["not_run"].items() if isinstance(n, (int, float)) and n > 0}
    if not counts:
        return []
    seconds = budget.get("seconds")
    within = f" (budget {seconds:g} s)" if isinstance(seconds, (int, float)) else ""
    per_adapter = ", ".join(f"{a} {n:,}" for a, n in sorted(counts.items(), key=lambda item: (-item[1], item[0])))
    lines = [f"{NOT_RUN_BUDGET}{within}: {sum(counts.values()):,} {unit}: {per_adapter}"]
    if budget.get("rest"):
        lines.append(f"{NOT_RUN_BUDGET}: the rest runs with: {budget['rest']}")
    return lines


def summarise(rows) -> dict[tuple[str, str], dict]:
    """Per (adapter, area): a count per status and the worst meaningful error ratio, from rows (or records
    with their ``adapter``, ``area``, ``status``, ``error_ratio`` and ``tolerance_source``).

    The one summary the terminal and the page both show."""
    table: dict[tuple[str, str], dict] = {}
    for row in rows:
        cell = table.setdefault((row["adapter"], row["area"]), {**{s: 0 for s in STATUSES}, "worst_ratio": None})
        cell[row["status"]] += 1
        ratio = meaningful_ratio(row)
        if ratio is not None and (cell["worst_ratio"] is None or ratio > cell["worst_ratio"]):
            cell["worst_ratio"] = ratio
    return table


def worst_status(cell: dict) -> str:
    """The worst status present in one summary cell (drives its colour)."""
    for status in PROBLEM_STATUSES:
        if cell.get(status, 0):
            return status
    return "pass" if cell.get("pass", 0) else "empty"


# ---- the environment -------------------------------------------------------------------------------

def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"


def _gpu() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def commit() -> str | None:
    """The git commit of the sources running, or None outside a checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_name(override: str | None = None) -> str:
    """The machine results are keyed by: ``override`` (``--machine``), else the host name.

    Shards of one run that land on different hosts of one kind (CI runners with random host names) all
    name the same machine with ``--machine``, so a merge sees them as one machine's shards. A name is a
    folder of asv's results too: ValueError (naming ``--machine``) for one that is empty, not printable or
    holds a '/'."""
    if override is None:
        return platform.node() or "unknown"
    name = str(override)
    if not name.strip() or not name.isprintable() or "/" in name:
        raise ValueError(f"--machine {name!r}: a machine name must be printable, not empty, without '/'")
    return name


def meta(versions: dict, argv=None, machine: str | None = None) -> dict:
    """The facts written with every results file: when, what code, which frameworks, which machine."""
    from . import __version__
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_name(machine), "mhabench_version": __version__, "python": platform.python_version(),
        "platform": platform.platform(), "cpu": _cpu(), "gpu": _gpu(), "commit": commit(),
        "argv": list(sys.argv if argv is None else argv), "versions": dict(versions),
    }
