"""Read result files into tidy pandas tables.

Only files are read here: conformance results (JSON/JSONL/CSV), asv results
(benchmarks.json, machine.json, <commit>-<env>.json) and the benchmark skip
log. Nothing from the suite's other packages is imported, so a report can be
built on a machine that has none of the frameworks installed.
"""
from __future__ import annotations

import ast
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

try:
    import tomllib
except ImportError:  # Python 3.10: the catalogue copy is optional, the rest of the report still works
    tomllib = None

AREAS = ("shapes", "masks", "axes", "dtypes", "gradients", "invalid", "special", "random", "plugin")
STATUSES = ("pass", "fail", "divergence", "unsupported", "error", "skip")
BENCH_PARAMS = ("adapter", "mode", "seq_len", "num_heads", "device")


class ResultsError(ValueError):
    """A results file or directory is missing or unreadable; the message is one line."""


@dataclass
class Conformance:
    meta: dict
    rows: pd.DataFrame
    catalogue: dict  # divergence id -> entry (dict), possibly empty
    source: Path


@dataclass
class Benchmarks:
    results: pd.DataFrame  # one row per benchmark x parameter combination
    machines: dict  # machine name -> machine.json contents
    runs: pd.DataFrame  # one row per asv result file: machine, commit, env, date, python, params
    skips: pd.DataFrame
    source: Path
    notes: list = field(default_factory=list)


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path} is not valid JSON (line {exc.lineno}: {exc.msg})") from None
    except OSError as exc:
        raise ResultsError(f"cannot read {path}: {exc.strerror}") from None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                # rows.jsonl is append-only and may end in a half-written line when a run was cut off
                continue
    return rows


# --- conformance --------------------------------------------------------------------------------

def load_conformance(results_dir: Path) -> Conformance | None:
    """The conformance rows under ``results_dir`` (or ``results_dir/conformance``); None if absent."""
    results_dir = Path(results_dir)
    base = results_dir / "conformance" if (results_dir / "conformance").is_dir() else results_dir
    meta: dict = {}
    if (base / "results.json").is_file():
        data = _read_json(base / "results.json")
        if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
            raise ResultsError(f"{base / 'results.json'} has no 'rows' list")
        meta = data.get("meta") or {}
        records, source = data["rows"], base / "results.json"
    elif (base / "rows.jsonl").is_file():
        records, source = _read_jsonl(base / "rows.jsonl"), base / "rows.jsonl"
        meta = {"partial": True}
    elif (base / "results.csv").is_file():
        try:
            frame = pd.read_csv(base / "results.csv")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
            raise ResultsError(f"{base / 'results.csv'} is not a readable CSV ({exc})") from None
        records, source = frame.to_dict("records"), base / "results.csv"
    else:
        return None
    if not isinstance(meta, dict):
        raise ResultsError(f"{source}: 'meta' is not an object")
    rows = _tidy_conformance(records, source)
    return Conformance(meta=meta, rows=rows, catalogue=load_catalogue(base, meta), source=source)


def _tidy_conformance(records: list, source: Path) -> pd.DataFrame:
    if not all(isinstance(r, dict) for r in records):
        raise ResultsError(f"{source}: every row must be a JSON object")
    rows = pd.DataFrame.from_records(records)
    for column in ("row_id", "adapter", "framework", "case", "area", "dtype", "quantity", "status",
                   "divergence", "message"):
        if column not in rows:
            rows[column] = None
    for column in ("max_abs_err", "max_rel_err", "tolerance", "reference_err", "error_ratio", "duration_s"):
        rows[column] = pd.to_numeric(rows[column], errors="coerce") if column in rows else math.nan
    if len(rows):
        missing = rows["adapter"].isna() | rows["status"].isna()
        if missing.all():
            raise ResultsError(f"{source}: rows carry no 'adapter'/'status' fields")
        rows = rows[~missing].copy()
    rows["status"] = rows["status"].astype(str).str.lower()
    rows["area"] = rows["area"].fillna("other").astype(str)
    rows["adapter"] = rows["adapter"].astype(str)
    rows["divergence"] = rows["divergence"].where(rows["divergence"].notna() & (rows["divergence"] != ""), None)
    # a rerun appends a newer row with the same id to the journal: the last one written is the verdict
    with_id = rows["row_id"].notna()
    rows = pd.concat([rows[with_id].drop_duplicates("row_id", keep="last"), rows[~with_id]])
    return rows.sort_index().reset_index(drop=True)


def load_catalogue(conformance_dir: Path, meta: dict) -> dict:
    """Divergence entries by id, from meta (if the harness copied them) and any TOML files found."""
    entries: dict = {}
    for key in ("divergences", "catalogue", "divergence_catalogue"):
        _collect_entries(meta.get(key), entries, source=None)
    directory = Path(conformance_dir) / "divergences"
    if directory.is_dir() and tomllib is not None:
        for path in sorted(directory.glob("*.toml")):
            try:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
            except (ValueError, OSError, UnicodeDecodeError) as exc:
                raise ResultsError(f"divergence catalogue {path} is not valid TOML ({exc})") from None
            _collect_entries(data, entries, source=path.stem)
    return entries


def _collect_entries(data, entries: dict, source: str | None) -> None:
    """Accept the shapes a catalogue may take: a list of entries with "id", or tables keyed by id."""
    if isinstance(data, list):
        for item in data:
            if isinstance(item, dict) and item.get("id"):
                entries[str(item["id"])] = {**({"framework": source} if source else {}), **item}
            else:
                _collect_entries(item, entries, source)
    elif isinstance(data, dict):
        for key, value in data.items():
            if isinstance(value, dict) and ("observed" in value or "description" in value or "summary" in value):
                entries[str(value.get("id", key))] = {**({"framework": source} if source else {}),
                                                      "id": str(value.get("id", key)), **value}
            elif isinstance(value, (list, dict)):
                _collect_entries(value, entries, source)


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
    results = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    notes = []
    if latest_only and len(runs_frame) > 1:
        latest = runs_frame.sort_values("date").groupby("machine").tail(1)
        dropped = len(runs_frame) - len(latest)
        if dropped:
            notes.append(f"{dropped} older asv result file(s) not shown; use --compare to set two runs side by side")
        results = results[results["file"].isin(latest["file"])].reset_index(drop=True)
        runs_frame = latest.reset_index(drop=True)
    skips_dir = path if path.is_dir() else asv_dir.parent
    return Benchmarks(results=results, machines=machines, runs=runs_frame,
                      skips=load_skips(skips_dir), source=asv_dir, notes=notes)


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


def load_skips(results_dir: Path) -> pd.DataFrame:
    path = Path(results_dir) / "bench" / "skips.jsonl"
    columns = ["benchmark", "params", "status", "reason"]
    if not path.is_file():
        return pd.DataFrame(columns=columns)
    rows = [r for r in _read_jsonl(path) if isinstance(r, dict)]
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
