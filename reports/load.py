"""Read result files into tidy pandas tables.

Only files are read here, through the one module that defines the results directory
(``mhabench.results``): conformance results (results.json, or the journal of an interrupted run,
with its plan and the catalogue it checked), asv results (benchmarks.json, machine.json,
<commit>-<env>.json) and the benchmark skip log. No framework is imported, so a report can be
built on a machine that has none installed.
"""
from __future__ import annotations

import ast
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mhabench import results
from mhabench.results import AREAS, STATUSES  # noqa: F401  (the schema, defined once there)

BENCH_PARAMS = ("adapter", "mode", "seq_len", "num_heads", "device")


class ResultsError(ValueError):
    """A results file or directory is missing or unreadable; the message is one line."""


@dataclass
class Conformance:
    meta: dict
    rows: pd.DataFrame
    catalogue: dict  # divergence id -> the entry as the run checked it (catalogue.json), possibly empty
    source: Path
    problems: list = field(default_factory=list)  # "path:line: ..." for everything that could not be read
    complete: bool = True       # the run reached its end (results.json written)
    planned: int | None = None  # rows the run planned, when it recorded a plan

    @property
    def missing(self) -> int | None:
        return None if self.planned is None else max(0, int(self.planned) - len(self.rows))


@dataclass
class Benchmarks:
    results: pd.DataFrame  # one row per benchmark x parameter combination
    machines: dict  # machine name -> machine.json contents
    runs: pd.DataFrame  # one row per asv result file: machine, commit, env, date, python, params
    skips: pd.DataFrame
    source: Path
    notes: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # "path:line: ..." for every skip-log line not read


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except OSError as exc:
        raise ResultsError(f"cannot read {path}: {exc.strerror}") from None


# --- conformance --------------------------------------------------------------------------------

def load_conformance(results_dir: Path) -> Conformance | None:
    """The conformance results under a results directory (through ``mhabench.results``); None if absent."""
    try:
        found = results.read_results(results_dir)
    except ValueError as exc:
        raise ResultsError(str(exc)) from None
    if found is None:
        return None
    meta = dict(found.meta)
    rows = _tidy_conformance(found.rows)
    catalogue = {str(entry["id"]): entry for entry in found.catalogue if isinstance(entry, dict) and entry.get("id")}
    return Conformance(meta=meta, rows=rows, catalogue=catalogue, source=found.source, problems=found.problems,
                       complete=found.complete, planned=(found.plan or {}).get("rows"))


def _tidy_conformance(records: list) -> pd.DataFrame:
    rows = pd.DataFrame.from_records(records, columns=list(results.FIELDS)) if not records else \
        pd.DataFrame.from_records(records)
    for column in results.FIELDS:
        if column not in rows:
            rows[column] = None
    for column in results.NUMERIC:
        rows[column] = pd.to_numeric(rows[column], errors="coerce")
    rows["divergence"] = rows["divergence"].where(rows["divergence"].notna() & (rows["divergence"] != ""), None)
    return rows.reset_index(drop=True)


# --- asv ----------------------------------------------------------------------------------------

def find_asv_dir(path: Path) -> Path | None:
    """The asv results directory for a results dir, an asv results dir itself, or None."""
    path = Path(path)
    for candidate in (path / "asv", path):
        if candidate.is_dir() and any(p.name == "machine.json" for p in candidate.glob("*/machine.json")):
            return candidate
    return None


def load_benchmarks(path: Path, *, latest_only: bool = True) -> Benchmarks | None:
    """asv results under ``path`` (a results dir, an asv results dir, or one result file); None if absent.

    With ``latest_only`` only the most recent result file of each machine is kept, so repeated
    nightly runs do not mix in one chart (``--compare`` is the way to set two runs side by side).
    """
    path = Path(path)
    if path.is_file():
        files = [path]
        asv_dir = path.parent.parent
    else:
        asv_dir = find_asv_dir(path)
        if asv_dir is None:
            return None
        files = [p for p in sorted(asv_dir.glob("*/*.json")) if p.name != "machine.json"]
    benchmarks_meta = {}
    if (asv_dir / "benchmarks.json").is_file():
        benchmarks_meta = _read_json(asv_dir / "benchmarks.json")
    machines, runs, frames = {}, [], []
    for file in files:
        machine_json = file.parent / "machine.json"
        if machine_json.is_file():
            machines[file.parent.name] = _read_json(machine_json)
        data = _read_json(file)
        if not isinstance(data, dict) or "results" not in data:
            raise ResultsError(f"{file} is not an asv results file (no 'results')")
        run = _run_info(data, file)
        runs.append(run)
        frames.append(_tidy_asv(data, run, benchmarks_meta, file))
    if not runs:
        return None
    runs_frame = pd.DataFrame(runs)
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    notes = []
    if latest_only and len(runs_frame) > 1:
        latest = runs_frame.sort_values("date").groupby("machine").tail(1)
        dropped = len(runs_frame) - len(latest)
        if dropped:
            notes.append(f"{dropped} older asv result file(s) not shown; use --compare to set two runs side by side")
        frame = frame[frame["file"].isin(latest["file"])].reset_index(drop=True)
        runs_frame = latest.reset_index(drop=True)
    skips_dir = path if path.is_dir() else asv_dir.parent
    problems: list[str] = []
    skips = load_skips(skips_dir, problems)
    return Benchmarks(results=frame, machines=machines, runs=runs_frame, skips=skips, source=asv_dir, notes=notes,
                      problems=problems)


def _run_info(data: dict, file: Path) -> dict:
    params = data.get("params") or {}
    return {"file": str(file), "machine": params.get("machine", file.parent.name),
            "commit": data.get("commit_hash"), "env": data.get("env_name"),
            "date": data.get("date") or 0, "python": data.get("python"),
            "requirements": data.get("requirements") or {}, "params": params}


def _literal(text):
    """asv stores parameter values as their repr; turn them back into values."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError):
        return text


def _tidy_asv(data: dict, run: dict, benchmarks_meta: dict, file: Path) -> pd.DataFrame:
    columns = data.get("result_columns") or ["result", "params"]
    records = []
    for name, values in data["results"].items():
        if not isinstance(values, list):
            raise ResultsError(f"{file}: result for {name!r} is not a list")
        entry = dict(zip(columns, values))
        meta = benchmarks_meta.get(name, {}) if isinstance(benchmarks_meta, dict) else {}
        param_values = entry.get("params") or []
        param_names = meta.get("param_names") or [f"param{i}" for i in range(len(param_values))]
        combos = list(itertools.product(*param_values)) if param_values else [()]
        result = entry.get("result")
        if not isinstance(result, list):
            result = [result] * len(combos)

        def column(key, count=len(combos)):
            value = entry.get(key)
            return value if isinstance(value, list) else [value] * count

        lo, hi, q25, q75 = column("stats_ci_99_a"), column("stats_ci_99_b"), column("stats_q_25"), column("stats_q_75")
        repeat, number, samples = column("stats_repeat"), column("stats_number"), column("samples")
        klass, _, method = name.rpartition(".")
        klass = klass.rpartition(".")[2] if "." in klass else klass
        for j, combo in enumerate(combos):
            record = {
                "benchmark": name, "class": klass or name, "method": method,
                "kind": method.split("_")[0], "unit": meta.get("unit") or _default_unit(method),
                "value": _num(result[j] if j < len(result) else None),
                "ci_low": _num(lo[j] if j < len(lo) else None), "ci_high": _num(hi[j] if j < len(hi) else None),
                "q25": _num(q25[j] if j < len(q25) else None), "q75": _num(q75[j] if j < len(q75) else None),
                "repeat": repeat[j] if j < len(repeat) else None, "number": number[j] if j < len(number) else None,
                "samples": samples[j] if j < len(samples) else None,
                "params_key": ", ".join(str(v) for v in combo),
                "machine": run["machine"], "commit": run["commit"], "env": run["env"], "file": run["file"],
                "version": entry.get("version"),
            }
            for pname, pvalue in zip(param_names, combo):
                record[pname] = _literal(pvalue)
            records.append(record)
    frame = pd.DataFrame.from_records(records)
    for pname in BENCH_PARAMS:
        if pname not in frame:
            frame[pname] = None
    return frame


def _default_unit(method: str) -> str:
    if method.startswith("time_"):
        return "seconds"
    if "peakmem" in method or method.startswith("mem_"):
        return "bytes"
    return "unit"


def _num(value) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return math.nan
    return number


def load_skips(results_dir: Path, problems: list | None = None) -> pd.DataFrame:
    """The benchmark skip log; every line that cannot be read is added to ``problems`` (path:line)."""
    path = results.Layout(results_dir).skips
    columns = ["benchmark", "params", "status", "reason"]
    if not path.is_file():
        return pd.DataFrame(columns=columns)
    rows, bad = results.read_jsonl(path, results.skip_problem)
    if problems is not None:
        problems.extend(bad)
    frame = pd.DataFrame.from_records(rows)
    for column in columns:
        if column not in frame:
            frame[column] = None
    frame["params"] = frame["params"].map(lambda p: json.dumps(p, sort_keys=True) if isinstance(p, dict) else str(p))
    # a case retried on every sweep is logged each time; the report needs it once
    return frame[columns].drop_duplicates().reset_index(drop=True)


def load_results(results_dir: Path) -> tuple[Conformance | None, Benchmarks | None]:
    """Both halves of a results directory; a ResultsError when neither is there."""
    results_dir = Path(results_dir)
    if not results_dir.exists():
        raise ResultsError(f"results directory {results_dir} does not exist "
                           "(run `mhabench conform` and `mhabench bench` first, or `mhabench run`)")
    if not results_dir.is_dir():
        raise ResultsError(f"{results_dir} is not a directory")
    conformance = load_conformance(results_dir)
    benchmarks = load_benchmarks(results_dir)
    if conformance is None and benchmarks is None:
        raise ResultsError(f"no conformance or benchmark results in {results_dir} "
                           "(expected conformance/results.json or asv/<machine>/*.json)")
    return conformance, benchmarks
