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
    conformance/portability.json  ``conform --switches``: the rows whose verdict changes under each kernel switch
    conformance/reproducers/    ``repro --all --out``: one standalone script per catalogue entry (``reproducer_name``),
                                and status.json: which reproduce, which are stale (their script exits 0 here)
    switches/<name>-<setting>/  ``conform --switches``: the same selection under that setting (a results directory)
    bench/skips.jsonl           why a benchmark case did not run
    bench/plan.json             what a benchmark run set out to do (benchmarks planned, its shard K/N)
    bench/progress.jsonl        the benchmark chunks finished (for --resume)
    bench/peaks.jsonl           the machine's GEMM rate, measured before and after each chunk
    bench/flops.jsonl           the FLOPs of each benchmark case (GFLOP/s = FLOPs / asv's time), its kernel's facts
    bench/points.jsonl          one line per measured point: its samples' spread and count, why sampling stopped,
                                both memory figures, the plain-loop check (--verify); the newest line of a point wins
    bench/remeasured.jsonl      the points measured again because their line broke a plausibility rule
    asv/                        asv's own results (one folder per machine)
    logs/                       the main job's per-stage logs
    .lock                       held by the run writing into the directory
"""
from __future__ import annotations

import contextlib
import csv
import datetime
import io
import itertools
import json
import math
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# The row schema is the contract's (mhabench.schema): re-exported here, where readers of a results directory look.
from .schema import (AREAS, DEFAULT_KERNEL, DTYPES, FIELDS, NUMERIC, REQUIRED, STATUSES, DivergenceKind, Row, Status,
                     legacy_kernel)

PROBLEM_STATUSES = (Status.ERROR, Status.FAIL, Status.DIVERGENCE, Status.UNSUPPORTED, Status.SKIP)  # worst first

# The time of one call is sampled by the suite itself (asv ``track_time_*`` methods return the samples, which
# asv summarises with its own statistics); results written before that hold asv's own ``time_*`` timings. Both
# are the same quantity, named by the older method name wherever results are read.
SAMPLED_TIME = {"track_time_forward": "time_forward", "track_time_forward_backward": "time_forward_backward"}


def quantity(method: str) -> str:
    """The quantity an asv method measures: ``track_time_forward`` and ``time_forward`` are both "time_forward"."""
    return SAMPLED_TIME.get(method, method)


__all__ = ["AREAS", "DTYPES", "FIELDS", "NUMERIC", "REQUIRED", "STATUSES", "DEFAULT_KERNEL", "PROBLEM_STATUSES",
           "Row", "legacy_kernel", "Layout", "Journal", "read_rows", "RowWriter", "write_results", "read_results",
           "summarise", "meta", "WriteFailed", "atomic_write", "atomic_write_many", "append_jsonl", "reproducer_name",
           "read_reproducers", "read_reproducer_status", "REPRODUCER_STATUS", "DivergenceKind"]


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
        self.portability = self.conformance / "portability.json"
        self.reproducers = self.conformance / "reproducers"
        self.switches = self.root / "switches"
        self.bench = self.root / "bench"
        self.skips = self.bench / "skips.jsonl"
        self.progress = self.bench / "progress.jsonl"
        self.peaks = self.bench / "peaks.jsonl"
        self.flops = self.bench / "flops.jsonl"
        self.points = self.bench / "points.jsonl"
        self.remeasured = self.bench / "remeasured.jsonl"
        self.accuracy = self.bench / "accuracy.jsonl"
        self.bench_plan = self.bench / "plan.json"
        self.asv_config = self.bench / "asv.conf.json"
        self.asv = self.root / "asv"
        self.asv_html = self.root / "asv-html"
        self.logs = self.root / "logs"
        self.lock = self.root / ".lock"

    def switch_root(self, folder: str) -> Path:
        """The results directory of one kernel switch setting (``conform --switches``)."""
        return self.switches / folder

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


def iter_jsonl(path: str | os.PathLike, problem=lambda record: None, problems: list | None = None,
               batch: int = 10_000, parse=None):
    """The records of a JSON-lines file in lists of up to ``batch``, read as a stream (a journal of a
    million rows is never held whole); "path:line: what is wrong" goes to ``problems`` for every line
    not read.

    The one policy for a damaged journal: nothing is dropped silently. A half-written last line (a
    run killed mid-write) is reported as truncated; any other bad line as corrupt; a line that parses
    but ``problem(record)`` rejects, or ``parse(record)`` (which turns a record into what is kept)
    refuses with a ValueError, with that reason. Bad lines are left in the file.
    """
    path = Path(path)
    problems = [] if problems is None else problems
    if not path.exists():
        return
    with open(path, "rb") as lines:
        numbered = ((number, raw) for number, raw in enumerate(lines, start=1) if raw.strip())
        while chunk := list(itertools.islice(numbered, batch)):
            try:  # a batch of good lines is one parse, each line in a list of its own so none can merge
                wrapped = json.loads(b"[[" + b"],[".join(raw for _, raw in chunk) + b"]]")
                if len(wrapped) != len(chunk) or not all(type(one) is list and len(one) == 1 for one in wrapped):
                    raise ValueError("a line is not one JSON value")
                parsed = [one[0] for one in wrapped]
            except ValueError:  # some line is bad: each is parsed (and reported) on its own, in line order
                parsed = None
            records = []
            for index, (number, raw) in enumerate(chunk):
                record = parsed[index] if parsed is not None else _parse_line(path, number, raw, problems)
                if record is _BAD:
                    continue
                why = problem(record)
                if not why and parse is not None:
                    try:
                        record = parse(record)
                    except ValueError as exc:
                        why = str(exc)
                if why:
                    problems.append(f"{path}:{number}: not a valid record ({why}): "
                                    f"{raw[:80].decode('utf-8', 'replace')!r}")
                    continue
                records.append(record)
            if records:
                yield records


_BAD = object()


def _parse_line(path: Path, number: int, raw: bytes, problems: list):
    try:
        return json.loads(raw)
    except ValueError as exc:
        text = raw[:80].decode("utf-8", "replace")
        if not raw.endswith(b"\n"):  # only the last line can lack its newline
            problems.append(f"{path}:{number}: truncated last line (a run killed mid-write): {text!r}")
        else:
            problems.append(f"{path}:{number}: corrupt line ({exc}): {text!r}")
        return _BAD


def read_jsonl(path: str | os.PathLike, problem=lambda record: None, parse=None) -> tuple[list, list[str]]:
    """The records of a JSON-lines file, and "path:line: what is wrong" for every line not read (the
    policy of :func:`iter_jsonl`)."""
    problems: list[str] = []
    records = [record for chunk in iter_jsonl(path, problem, problems, parse=parse) for record in chunk]
    return records, problems


def read_rows(path: str | os.PathLike) -> Journal:
    """The rows of a rows.jsonl (see :func:`read_jsonl`); the rows of a bad line count as not run
    (``--resume`` runs them again)."""
    rows, problems = read_jsonl(path, parse=Row.from_dict)
    return Journal(rows, problems)


ACCURACY_FIGURES = ("max_rel_error", "rms_error", "sum_error", "grad_rel_rms_error")
# the asv accuracy classes (benchmarks/bench_attention.py), in the order a reader meets them
ACCURACY_CLASSES = ("SelfAccuracy", "CausalAccuracy", "PeakySelfAccuracy", "PeakyCausalAccuracy")


def is_accuracy(benchmark_class: str) -> bool:
    """Whether an asv benchmark class measures accuracy (``SelfAccuracy``, ...): its methods track errors
    against the oracle, not time or memory, and its records are in bench/accuracy.jsonl."""
    return str(benchmark_class).endswith("Accuracy")


def accuracy_problem(record) -> str | None:
    """Why ``record`` is not a line of bench/accuracy.jsonl, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    missing = [k for k in ("benchmark", "params", "dtype", "seq_len", "status") if k not in record]
    if missing:
        return f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
    return None if isinstance(record["params"], dict) else "params is not an object"


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


class WriteFailed(OSError):
    """An output file could not be written (a full disk, a read-only folder, a directory in its place).

    The message is one line naming the file. Whoever raised it left nothing half-written: a file is
    replaced whole or not at all, and an append either adds whole lines or none."""

    def __init__(self, path, exc: BaseException):
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        super().__init__(getattr(exc, "errno", None), f"cannot write {path}: {reason}")
        self.path = Path(path)

    def __str__(self):
        return self.strerror


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Appender:
    """Appends whole lines to a file, one fsync per batch. A batch the disk cannot take is taken back
    (the file is cut to where it was), so a reader never meets half a line this process wrote, and the
    failure is a WriteFailed naming the file."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise WriteFailed(self.path, exc) from None
        size = os.fstat(self.fd).st_size
        if size:
            with open(self.path, "rb") as f:
                f.seek(size - 1)
                self._pending_newline = f.read(1) != b"\n"  # a line cut short stays on its own line
        else:
            self._pending_newline = False

    def write_lines(self, lines) -> None:
        data = "".join(line + "\n" for line in lines).encode()
        if not data:
            return
        if self._pending_newline:
            data = b"\n" + data
        start = os.fstat(self.fd).st_size
        try:
            _write_all(self.fd, data)
            os.fsync(self.fd)
        except OSError as exc:
            try:
                os.ftruncate(self.fd, start)
            except OSError:
                pass
            raise WriteFailed(self.path, exc) from None
        self._pending_newline = False

    def close(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def append_jsonl(path: str | os.PathLike, records) -> None:
    """Append ``records`` to a JSON-lines file as whole lines (see :class:`Appender`)."""
    with Appender(path) as out:
        out.write_lines(json.dumps(_finite(r), allow_nan=False) for r in records)


class RowWriter(Appender):
    """Appends rows to rows.jsonl, one fsync per batch (see :class:`Appender`)."""

    def write(self, rows: list[Row]) -> None:
        self.write_lines(json.dumps(_finite(as_row(r).to_dict()), allow_nan=False) for r in rows)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def atomic_write_many(files: dict) -> None:
    """Write every ``{path: text or bytes}`` through a temporary file each, then rename them into place.

    Readers see the old files or the new ones: nothing is renamed until every file is written and
    fsynced, and a failure (a full disk, a read-only folder, a directory where a file goes) removes the
    temporary files and raises WriteFailed naming the file."""
    written: list[Path] = []
    current = None
    try:
        for path, content in files.items():
            current = path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                raise IsADirectoryError(21, "a directory is in the way")
            tmp = _temporary(path)
            written.append(tmp)
            data = content.encode("utf-8") if isinstance(content, str) else bytes(content)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
        for path in files:
            current = Path(path)
            os.replace(_temporary(current), current)
    except OSError as exc:
        for tmp in written:
            try:
                tmp.unlink()
            except OSError:
                pass
        raise WriteFailed(current, exc) from None


def atomic_write(path: Path, text: str | bytes) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers see the old or the new
    (see :func:`atomic_write_many`)."""
    atomic_write_many({Path(path): text})


def write_json(path: Path, data) -> None:
    atomic_write(Path(path), json.dumps(_finite(data), indent=1, allow_nan=False))


def read_json(path: Path):
    """A JSON file's contents; ValueError with the path for a file that does not parse."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None


def summary_meta_of(path: Path) -> dict:
    """The "meta" of a results.json, read from the head of the file (write_results puts it first), so a
    results.json of a million rows is not parsed to learn which run wrote it. ValueError naming the file
    when it does not start as one."""
    decoder = json.JSONDecoder()
    head = ""
    with open(path, encoding="utf-8", errors="replace") as f:
        while True:
            more = f.read(1 << 16)
            head += more
            start = head.find('"meta"')
            colon = head.find(":", start) if start >= 0 else -1
            if colon >= 0 and head[:start].strip() == "{":
                value = colon + 1 + len(head[colon + 1:]) - len(head[colon + 1:].lstrip())  # past the blanks
                try:
                    meta, _ = decoder.raw_decode(head, value)
                except ValueError:
                    meta = None
                if isinstance(meta, dict):
                    return meta
            if not more or len(head) > 1 << 24 or (start < 0 and len(head) > 1 << 16):
                raise ValueError(f"{path} is not a results file: it does not start with its \"meta\"")


def write_results(root: str | os.PathLike, rows: list[Row], meta_info: dict) -> tuple[Path, Path]:
    """results.json ({"meta", "rows"}) and results.csv (nested fields JSON-encoded) under a results
    directory ``root``, replaced together (:func:`atomic_write_many`)."""
    layout = Layout(root)
    records = [as_row(r).to_dict() for r in rows]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, extrasaction="ignore")
    writer.writeheader()
    for record in records:
        writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else ("" if v is None else v)
                         for k, v in _finite(record).items()})
    atomic_write_many({layout.results_json: json.dumps(_finite({"meta": meta_info, "rows": records}), indent=1,
                                                       allow_nan=False),
                       layout.results_csv: buffer.getvalue()})
    return layout.results_json, layout.results_csv


def new_run_id() -> str:
    """A fresh id for a conformance run: plan.json and results.json both carry it, so a reader can tell a
    results.json this run wrote from one an earlier run left."""
    import uuid
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}"


def reproducer_name(entry_id: str) -> str:
    """The file name of a catalogue entry's standalone reproducer (the entry id, safe as a file name)."""
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in str(entry_id)) + ".py"


REPRODUCER_STATUS = "status.json"  # beside the scripts: {entry id: {"status", "script", "reason"}}


def read_reproducer_status(root) -> dict[str, dict]:
    """What ``repro --all --out`` found per entry, from the ``status.json`` beside a results directory's
    reproducers (none, or unreadable: an empty dict): ``{entry id: {"status": reproduces | stale | no script,
    "script", "reason"}}``."""
    try:
        status = json.loads((Layout(root).reproducers / REPRODUCER_STATUS).read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): v for k, v in status.items() if isinstance(v, dict)} if isinstance(status, dict) else {}


def read_reproducers(root) -> dict[str, str]:
    """``{file name: source}`` of the reproducers a results directory holds (none: an empty dict)."""
    folder = Layout(root).reproducers
    out = {}
    for path in sorted(folder.glob("*.py")) if folder.is_dir() else ():
        try:
            out[path.name] = path.read_text()
        except (OSError, UnicodeDecodeError):
            continue
    return out


@dataclass
class Results:
    """What a conformance run left in a results directory, read one way for every reader.

    The rows are the journal's (the latest row per id), judged against the plan: results.json is only a
    copy written at the end, and serves when there is no journal. A results.json that an earlier run
    wrote (plan.json names a newer run, killed before its end) is never taken for this run's."""

    meta: dict
    plan: dict | None               # rows planned when the run started (None: an older run wrote none)
    catalogue: list[dict]           # the entries the run checked, with their verdicts
    problems: list[str]             # every line or file that could not be read, with its path
    source: Path | None             # where the rows come from: the journal, else results.json; None: no rows
    complete: bool                  # the run plan.json describes reached its end (it wrote results.json)
    stale: Path | None = None       # a results.json an earlier run left, not read
    portability: dict | None = None  # conform --switches: the verdicts that change under each kernel switch
    _summary_rows: list | None = None  # results.json's rows, when they are the source
    _rows: list | None = None
    _read: bool = False

    def batches(self, size: int = 10_000, records: bool = False):
        """The rows in the order written, in lists of up to ``size`` (a row rerun later appears twice: the
        later one wins); with ``records``, each as the plain record ``Row.record`` gives instead of a Row
        (for a reader of a million rows). The journal is streamed; its unreadable lines join ``problems``
        as it is read."""
        if self._summary_rows is not None:
            for start in range(0, len(self._summary_rows), size):
                chunk = self._summary_rows[start:start + size]
                yield [row.to_dict() for row in chunk] if records else chunk
            return
        if self.source is None:
            return
        sink = [] if self._read else self.problems
        self._read = True
        yield from iter_jsonl(self.source, problems=sink, batch=size, parse=Row.record if records else Row.from_dict)

    @property
    def rows(self) -> list[Row]:
        """Every row, the latest per id (the whole list in memory: for small results)."""
        if self._rows is None:
            self._rows = Journal([r for chunk in self.batches() for r in chunk]).latest()
        return self._rows

    @property
    def missing(self) -> int | None:
        """Planned rows that are not in the results (None when no plan was recorded)."""
        if self.plan is None:
            return None
        return max(0, int(self.plan.get("rows", 0)) - len(self.rows))


def _optional_json(path: Path, problems: list[str], shape=lambda value: value):
    """``shape`` of the JSON in ``path``; None when there is no such file or it cannot be read or shaped (the
    reason joins ``problems``): a reader of a results directory keeps going past one damaged file."""
    if not path.is_file():
        return None
    try:
        return shape(read_json(path))
    except (ValueError, TypeError) as exc:
        problems.append(str(exc))
        return None


def read_results(root: str | os.PathLike) -> Results | None:
    """The conformance results under ``root`` (a results directory); None when there are none.

    The journal when there is one (a finished run's, or an interrupted run's with its problems), else
    results.json; ``complete`` when results.json is the run's that plan.json describes.
    """
    layout = Layout(root)
    if not layout.conformance.is_dir():
        return None
    problems: list[str] = []
    plan = _optional_json(layout.plan, problems)
    plan = plan if isinstance(plan, dict) else None
    catalogue = _optional_json(layout.catalogue, problems, list) or []

    def portability_table(value):
        if not isinstance(value, dict) or not isinstance(value.get("changes"), list):
            raise ValueError(f"{layout.portability} has no 'changes' list")
        return value
    portability = _optional_json(layout.portability, problems, portability_table)
    run = (plan or {}).get("run")
    if layout.rows.is_file():  # the journal: results.json is read for its meta only (it may be a GB of rows)
        summary_meta = None
        if layout.results_json.is_file():
            try:
                summary_meta = summary_meta_of(layout.results_json)
            except ValueError as exc:
                problems.append(str(exc))
        current = summary_meta is not None and (run is None or summary_meta.get("run") == run)
        meta = summary_meta if current else dict((plan or {}).get("meta") or {})
        stale = layout.results_json if summary_meta is not None and not current else None
        return Results(meta, plan, catalogue, problems, layout.rows, current, stale, portability)
    summary = None
    if layout.results_json.is_file():
        summary = read_json(layout.results_json)
        if not isinstance(summary, dict) or not isinstance(summary.get("rows"), list):
            raise ValueError(f"{layout.results_json} has no 'rows' list")
    summary_meta = (summary or {}).get("meta") or {}
    current = summary is not None and (run is None or summary_meta.get("run") == run)
    meta = summary_meta if current else dict((plan or {}).get("meta") or {})
    stale = layout.results_json if summary is not None and not current else None
    if current:
        rows = []
        for index, record in enumerate(summary["rows"]):
            try:
                rows.append(Row.from_dict(record))
            except ValueError as exc:
                problems.append(f"{layout.results_json}: row {index}: {exc}")
        return Results(meta, plan, catalogue, problems, layout.results_json, True, None, portability, rows)
    if plan is None and summary is None:
        return None
    return Results(meta, plan, catalogue, problems, None, False, stale, portability)


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
        try:  # who holds it, for the message of a second run; a full disk must not stop the run here
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} ({command})".encode())
        except OSError:
            pass
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


def meta(versions: dict, argv=None, machine: str | None = None, facts: dict | None = None,
         switches: dict | None = None) -> dict:
    """The facts written with every results file: when, what code, which frameworks, which machine.

    ``facts``: the machine's facts that choose kernels (``impls.facts.machine_facts``: CPU model, ISA set, vector
    width, numpy's BLAS, threads, the kernel variables set); ``switches``: the kernel switches the run forced
    ({name: setting}; empty: the machine's own choice)."""
    from . import __version__
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_name(machine), "mhabench_version": __version__, "python": platform.python_version(),
        "platform": platform.platform(), "cpu": _cpu(), "gpu": _gpu(), "commit": commit(),
        "argv": list(sys.argv if argv is None else argv), "versions": dict(versions),
        "machine_facts": dict(facts or {}), "switches": dict(switches or {}),
    }
