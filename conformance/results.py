"""Conformance results on disk: rows.jsonl (append-only, durable per batch), results.json and results.csv.

rows.jsonl is the journal: each batch of rows is flushed and fsynced as it is
produced, so a killed run loses at most the case in flight. A line that does
not parse is reported with its path and line number, never dropped silently
and never overwritten; only a truncated *last* line (a kill mid-write) is
ignored, with a warning, and the rest kept. results.json and results.csv are
rewritten atomically (temp file + os.replace) from the journal.
"""
from __future__ import annotations

import csv
import datetime
import importlib.metadata
import io
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

FIELDS = ("row_id", "adapter", "framework", "framework_version", "case", "area", "dtype", "device", "quantity",
          "status", "max_abs_err", "max_rel_err", "tolerance", "reference_err", "error_ratio", "divergence",
          "message", "seed", "spec", "query_shape", "key_shape", "value_shape", "mask", "causal", "duration_s")
STATUSES = ("pass", "fail", "divergence", "unsupported", "error", "skip")
DISTRIBUTIONS = ("numpy", "ml_dtypes", "torch", "tensorflow", "tensorflow-cpu", "keras", "jax", "jaxlib", "flax")


@dataclass
class Journal:
    rows: list[dict]
    warnings: list[str] = field(default_factory=list)

    def latest(self) -> list[dict]:
        """One row per row_id, the last written winning (a --rerun appends a newer row)."""
        by_id = {}
        for row in self.rows:
            by_id.pop(row["row_id"], None)
            by_id[row["row_id"]] = row
        return list(by_id.values())


def conformance_dir(results: str | os.PathLike) -> Path:
    return Path(results) / "conformance"


def read_rows(path: str | os.PathLike) -> Journal:
    """Rows of a rows.jsonl, and a warning naming path:line for every line that is not a row."""
    path = Path(path)
    if not path.exists():
        return Journal([])
    data = path.read_bytes()
    lines = data.split(b"\n")
    ends_cleanly = data.endswith(b"\n")
    if ends_cleanly:
        lines = lines[:-1]
    rows, warnings = [], []
    for number, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            if not isinstance(row, dict) or "row_id" not in row or "status" not in row:
                raise ValueError("not a row object (needs row_id and status)")
        except ValueError as exc:
            text = raw[:80].decode("utf-8", "replace")
            if number == len(lines) and not ends_cleanly:
                warnings.append(f"{path}:{number}: truncated last line ignored (a run killed mid-write): {text!r}")
            else:
                warnings.append(f"{path}:{number}: corrupt line ({exc}); left in the file, its row will be "
                                f"run again: {text!r}")
            continue
        rows.append(row)
    return Journal(rows, warnings)


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

    def write(self, rows: list[dict]) -> None:
        self.file.write("".join(json.dumps(r, allow_nan=False) + "\n" for r in rows).encode())
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self):
        self.file.close()


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def meta(argv=None) -> dict:
    import mhabench
    versions = {}
    for dist in DISTRIBUTIONS:
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "mhabench_version": mhabench.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "cpu": _cpu(), "gpu": _gpu(), "commit": _commit(),
        "argv": list(sys.argv if argv is None else argv), "versions": versions,
    }


def write_results(directory: str | os.PathLike, rows: list[dict], meta_info: dict) -> tuple[Path, Path]:
    """results.json ({"meta", "rows"}) and results.csv (nested fields JSON-encoded), each written atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    json_path, csv_path = directory / "results.json", directory / "results.csv"
    _atomic_write(json_path, json.dumps({"meta": meta_info, "rows": rows}, indent=1, allow_nan=False))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=FIELDS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (dict, list)) else ("" if v is None else v)
                         for k, v in row.items()})
    _atomic_write(csv_path, buffer.getvalue())
    return json_path, csv_path


def summarise(rows: list[dict]) -> dict[tuple[str, str], dict]:
    """Per (adapter, area): a count per status and the worst error ratio.

    The worst ratio counts only rows whose tolerance the reference error set (not the floor): where the
    reference is exact by luck or by symmetry (a gradient that is zero in exact arithmetic), the ratio
    divides by almost nothing and says nothing.
    """
    from .tolerances import fudge
    table: dict[tuple[str, str], dict] = {}
    for row in rows:
        cell = table.setdefault((row["adapter"], row["area"]), {**{s: 0 for s in STATUSES}, "worst_ratio": None})
        cell[row["status"]] = cell.get(row["status"], 0) + 1
        ratio = row.get("error_ratio")
        meaningful = ratio is not None and row.get("reference_err") and row.get("tolerance") and \
            fudge(row["quantity"]) * row["reference_err"] >= row["tolerance"] * (1 - 1e-9)
        if meaningful and row["status"] in ("pass", "fail") and \
                (cell["worst_ratio"] is None or ratio > cell["worst_ratio"]):
            cell["worst_ratio"] = ratio
    return table
