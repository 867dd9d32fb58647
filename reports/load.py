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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mhabench import results
from mhabench.results import AREAS, STATUSES  # noqa: F401  (the schema, defined once there)

BENCH_PARAMS = ("adapter", "mode", "seq_len", "num_heads", "device")


class ResultsError(ValueError):
    """A results file or directory is missing or unreadable; the message is one line."""


@dataclass
class Conformance:
    meta: dict
    rows: pd.DataFrame  # the rows, with a ``machine`` and a ``results`` (directory) column added
    catalogue: dict  # divergence id -> the entry as the run checked it (catalogue.json), possibly empty
    source: Path
    problems: list = field(default_factory=list)  # "path:line: ..." for everything that could not be read
    complete: bool = True       # the run reached its end (results.json written)
    planned: int | None = None  # rows the run planned, when it recorded a plan
    plan: dict = field(default_factory=dict)
    machine: str = "unknown"
    parts: list = field(default_factory=list)  # merged: the Conformance of each directory, in the order given
    notes: list = field(default_factory=list)  # merged: overlapping rows, repeated shards
    missing_shards: list = field(default_factory=list)  # "machine M: shard 2/3 missing ..." per gap
    portability: dict | None = None  # conform --switches: the verdicts that change under each kernel switch
    stale: Path | None = None  # a results.json an earlier run left (the latest run did not reach its end)

    @property
    def missing(self) -> int | None:
        """Planned rows absent (per directory when merged: an overlap elsewhere does not hide a gap)."""
        if self.parts:
            counts = [p.missing for p in self.parts]
            return None if any(c is None for c in counts) else sum(counts)
        return None if self.planned is None else max(0, int(self.planned) - len(self.rows))

    @property
    def shard(self) -> tuple[int, int] | None:
        """(K, N) when the run was shard K of N (plan.json's optional "shard")."""
        shard = self.plan.get("shard")
        try:
            k, n = (int(v) for v in shard)
        except (TypeError, ValueError):
            return None
        return (k, n) if 1 <= k <= n else None


@dataclass
class Benchmarks:
    results: pd.DataFrame  # one row per benchmark x parameter combination
    machines: dict  # machine name -> machine.json contents
    runs: pd.DataFrame  # one row per asv result file: machine, commit, env, date, python, params
    skips: pd.DataFrame
    source: Path
    notes: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # "path:line: ..." for every skip-log line not read
    peaks: list = field(default_factory=list)  # GEMM peaks measured next to the chunks: {machine, device, gflops}


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
    """The conformance results under a results directory (through ``mhabench.results``); None if absent.

    The rows are read as a stream and held compactly (see :func:`_tidy_conformance`), so a journal of a
    million rows fits in a few hundred MB."""
    try:
        found = results.read_results(results_dir)
    except ValueError as exc:
        raise ResultsError(str(exc)) from None
    if found is None:
        return None
    meta = dict(found.meta)
    rows = _tidy_conformance(found.batches(records=True))
    rows["results"] = str(Path(results_dir))
    catalogue = {str(entry["id"]): entry for entry in found.catalogue if isinstance(entry, dict) and entry.get("id")}
    plan = found.plan if isinstance(found.plan, dict) else {}
    return Conformance(meta=meta, rows=rows, catalogue=catalogue, source=found.source or results.Layout(results_dir).rows,
                       problems=found.problems, complete=found.complete, planned=plan.get("rows"), plan=plan,
                       machine=conformance_machine(meta, [], None), stale=found.stale, portability=found.portability)


def _frozen(value):
    """A hashable stand-in for a value read from JSON, equal for equal values of the same types."""
    if isinstance(value, dict):
        return ("dict", tuple((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("list", tuple(_frozen(v) for v in value))
    return (type(value).__name__, value)


class _Shared:
    """One object per distinct value across the batches of a load: a million rows repeat a few hundred
    adapters, cases, statuses and specs, so the table holds references to shared values instead of a
    million copies of each."""

    def __init__(self):
        self.values: dict = {}

    def one(self, value):
        """The shared copy of a string, dict or list (another value is returned as it is: sharing 1 and
        True, which hash alike, would change a row)."""
        if isinstance(value, str):
            return self.values.setdefault(value, value)
        if isinstance(value, (dict, list)):
            return self.values.setdefault(_frozen(value), value)
        return value

    def column(self, values: pd.Series) -> pd.Series:
        """``values`` with each string, dict and list replaced by its shared copy; a column of strings is
        hashed in C."""
        kind = pd.api.types.infer_dtype(values, skipna=True)
        if kind in ("string", "empty"):
            codes, uniques = pd.factorize(values)
            table = np.array([self.one(v) for v in uniques] + [None], dtype=object)
            out = table[codes]  # code -1, a missing value, takes the last slot: None
            return pd.Series(out, index=values.index, dtype=object)
        if kind == "mixed":  # dicts and lists (a spec, a shape), or strings among other values
            return pd.Series([self.one(v) for v in values], index=values.index, dtype=object)
        return values


def _blank(name: str, count: int) -> np.ndarray:
    """``count`` rows of a field that was not written: NaN for a figure, None otherwise."""
    return np.full(count, np.nan) if name in results.NUMERIC else np.full(count, None, dtype=object)


def _tidy_conformance(batches) -> pd.DataFrame:
    """The rows as a table, from batches of row records (the last row per row_id wins, in the place it was
    written); every field of the schema present, figures as floats."""
    shared = _Shared()
    parts: dict[str, list] = {}  # field -> its arrays, one per batch
    count = 0
    for batch in batches:
        read = pd.DataFrame.from_records(batch)
        for name in read.columns:  # each field's own array: the parsed copies are let go with the batch
            column = read[name].astype(object)
            if name in results.NUMERIC:
                values = pd.to_numeric(column, errors="coerce").to_numpy(float)
            elif name == "row_id":  # unique per row: nothing to share
                values = column.to_numpy(object, copy=True)
            else:  # a copy: a view would keep the whole batch alive
                values = shared.column(column).to_numpy(object, copy=True)
            missing = count - sum(len(p) for p in parts.get(name, []))  # a field earlier batches lacked
            parts.setdefault(name, []).extend([_blank(name, missing)] if missing else [])
            parts[name].append(values)
        count += len(read)
        del read
    columns = {}
    for name in [*results.FIELDS, *(n for n in parts if n not in results.FIELDS)]:
        arrays = parts.pop(name, [])  # joined one field at a time, each batch's arrays let go as it goes
        have = sum(len(a) for a in arrays)
        pieces = arrays + ([_blank(name, count - have)] if count > have else [])
        columns[name] = np.concatenate(pieces) if pieces else _blank(name, 0)  # no line readable: no rows
        del arrays
    rows = pd.DataFrame(columns)
    if rows["row_id"].duplicated().any():
        rows = rows.drop_duplicates("row_id", keep="last")
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

    With ``latest_only`` each measurement is kept once per machine, the newest (see
    :func:`newest_measurements`), so repeated runs are never counted twice.
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
    problems: list[str] = []

    def read(json_file: Path):
        """A file of the tree; in a directory, one that is damaged (a full disk, a run killed while asv wrote
        it) is left out and listed, so the rest is still reported."""
        try:
            return _read_json(json_file)
        except ResultsError as exc:
            if path.is_file():
                raise
            problems.append(f"{exc}: left out (mhabench bench --repair --results {asv_dir.parent} moves it aside)")
            return None
    benchmarks_meta = {}
    if (asv_dir / "benchmarks.json").is_file():
        benchmarks_meta = read(asv_dir / "benchmarks.json") or {}
    machines, runs, frames = {}, [], []
    for file in files:
        machine_json = file.parent / "machine.json"
        if machine_json.is_file() and file.parent.name not in machines:
            machines[file.parent.name] = read(machine_json)
        data = read(file)
        if data is None:
            continue
        if not isinstance(data, dict) or "results" not in data:
            raise ResultsError(f"{file} is not an asv results file (no 'results')")
        run = _run_info(data, file)
        runs.append(run)
        frames.append(_tidy_asv(data, run, benchmarks_meta, file))
    if not runs:
        if problems:
            raise ResultsError(problems[0])
        return None
    runs_frame = pd.DataFrame(runs)
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    skips_dir = path if path.is_dir() else asv_dir.parent
    skips = load_skips(skips_dir, problems)
    flops = load_flops(skips_dir, problems)
    frame = with_kernels(with_throughput(frame, flops), flops)
    frame = with_points(frame, load_points(skips_dir, problems), load_remeasured(skips_dir, problems))
    bench = Benchmarks(results=frame, machines=machines, runs=runs_frame, skips=skips, source=asv_dir,
                       problems=problems, peaks=load_peaks(skips_dir, runs_frame, problems))
    return newest_measurements(bench) if latest_only else bench


THROUGHPUT = {"time_forward": ("track_gflops_forward", "forward"),
              "time_forward_backward": ("track_gflops_forward_backward", "forward_backward")}


def load_flops(results_dir: Path, problems: list) -> dict:
    """bench/flops.jsonl: (benchmark class, adapter, mode, seq_len, num_heads, device) -> FLOPs per call kind."""
    path = results.Layout(results_dir).flops
    if not path.is_file():
        return {}
    check = lambda r: None if isinstance(r, dict) and {"benchmark", "params", "forward"} <= set(r) else \
        "needs benchmark, params and forward"
    records, bad = results.read_jsonl(path, check)
    problems.extend(bad)
    return {(r["benchmark"], *(r["params"].get(k) for k in BENCH_PARAMS)): r for r in records}


def with_kernels(frame: pd.DataFrame, flops: dict) -> pd.DataFrame:
    """The facts of each benchmark case's kernel, as recorded with its FLOPs: ``kernel`` (for results written
    before kernels were recorded, the one its adapter's name gives: ``legacy_kernel``, as ``Row`` reads old
    rows), ``family`` (the framework family its adapter declares) and ``holds_scores`` (whether the kernel holds
    the [B, H, T, S] scores; None where not recorded)."""
    if frame.empty or "adapter" not in frame:
        return frame
    recorded = {}
    for record in flops.values():
        params = record.get("params") or {}
        recorded[params.get("adapter")] = record
    frame = frame.copy()
    known = lambda a: a is not None and a == a
    frame["kernel"] = [recorded.get(a, {}).get("kernel") or results.legacy_kernel(a) if known(a) else None
                       for a in frame["adapter"]]
    frame["family"] = [recorded.get(a, {}).get("family") if known(a) else None for a in frame["adapter"]]
    frame["holds_scores"] = [recorded.get(a, {}).get("holds_scores") if known(a) else None for a in frame["adapter"]]
    return frame


POINT_COLUMNS = {"stopped": "stopped", "charted": "memory_charted", "program_bytes": "program_bytes",
                 "probe_median": "probe_bytes", "probe": "memory_probe", "program_source": "memory_program"}


def _point_key(benchmark: str, params: dict) -> tuple:
    return (results.quantity(benchmark.rpartition(".")[2]), benchmark.split(".")[-2] if "." in benchmark else "",
            *(params.get(k) for k in BENCH_PARAMS))


def load_points(results_dir: Path, problems: list) -> dict:
    """bench/points.jsonl: the newest line of each measured point, keyed like a results row."""
    path = results.Layout(results_dir).points
    if not path.is_file():
        return {}
    check = lambda r: None if isinstance(r, dict) and {"benchmark", "params", "quantity"} <= set(r) and \
        isinstance(r["params"], dict) else "needs benchmark, params and quantity"
    records, bad = results.read_jsonl(path, check)
    problems.extend(bad)
    return {_point_key(r["benchmark"], r["params"]): r for r in records}


def load_remeasured(results_dir: Path, problems: list) -> dict:
    """bench/remeasured.jsonl: the newest re-measurement of each point, keyed like a results row."""
    path = results.Layout(results_dir).remeasured
    if not path.is_file():
        return {}
    check = lambda r: None if isinstance(r, dict) and {"benchmark", "params", "rule", "before"} <= set(r) and \
        isinstance(r["params"], dict) else "needs benchmark, params, rule and before"
    records, bad = results.read_jsonl(path, check)
    problems.extend(bad)
    return {_point_key(r["benchmark"], r["params"]): r for r in records}


def with_points(frame: pd.DataFrame, points: dict, remeasured: dict) -> pd.DataFrame:
    """What the suite recorded of each point beside asv's figures: why its sampling stopped, both memory figures
    and which one is the result, the plain timing's median (``--verify``) and, for a point measured again
    because its line broke a plausibility rule, the rule and the value before."""
    columns = [*POINT_COLUMNS.values(), "verify_median", "verify_samples", "verify_paired_ratio", "remeasured_rule",
               "remeasured_before"]
    frame = frame.copy()
    for column in columns:
        frame[column] = None
    if frame.empty or "adapter" not in frame or not (points or remeasured):
        return frame
    keys = [(m, c, *(r.get(k) for k in BENCH_PARAMS)) for m, c, r in
            zip(frame["method"], frame["class"], frame[list(BENCH_PARAMS)].to_dict("records"))]
    for column, source in (("verify_median", "median"), ("verify_samples", "samples"),
                           ("verify_paired_ratio", "paired_ratio")):
        frame[column] = [((points.get(k) or {}).get("verify") or {}).get(source) for k in keys]
    for field_name, column in POINT_COLUMNS.items():
        frame[column] = [(points.get(k) or {}).get(field_name) for k in keys]
    frame["remeasured_rule"] = [(remeasured.get(k) or {}).get("rule") for k in keys]
    frame["remeasured_before"] = [(remeasured.get(k) or {}).get("before") for k in keys]
    return frame


def with_throughput(frame: pd.DataFrame, flops: dict) -> pd.DataFrame:
    """GFLOP/s rows (``track_gflops_forward``, ``..._backward``) derived from each time row: the recorded FLOPs
    over asv's steady-state time, so throughput is the same measurement as the time, never a second one."""
    if frame.empty or not flops:
        return frame
    timed = frame[frame["method"].isin(list(THROUGHPUT))]
    derived = []
    for record in timed.to_dict("records"):
        prefix = record["benchmark"].rpartition(".")[0]
        found = flops.get((prefix, *(record.get(k) for k in BENCH_PARAMS)))
        if not found:
            continue
        method, kind = THROUGHPUT[record["method"]]
        count = found.get(kind)
        to_rate = lambda seconds: count / seconds / 1e9 if count and seconds and seconds > 0 else math.nan
        derived.append({**record, "benchmark": f"{prefix}.{method}", "method": method, "kind": "track",
                        "unit": "GFLOP/s", "value": to_rate(record["value"]),
                        # a faster time is a higher rate: the interval's ends swap
                        "ci_low": to_rate(record.get("ci_high")), "ci_high": to_rate(record.get("ci_low")),
                        "q25": to_rate(record.get("q75")), "q75": to_rate(record.get("q25"))})
    return pd.concat([frame, pd.DataFrame(derived)], ignore_index=True) if derived else frame


def load_peaks(results_dir: Path, runs: pd.DataFrame, problems: list) -> list[dict]:
    """bench/peaks.jsonl: the GEMM rate measured before and after each chunk, under this directory's asv
    machine name (none when the directory holds several machines' asv results: a peak is one machine's)."""
    path = results.Layout(results_dir).peaks
    if not path.is_file() or runs.empty or runs["machine"].nunique() != 1:
        return []
    check = lambda r: None if isinstance(r, dict) and "device" in r and "gflops" in r else "needs device and gflops"
    records, bad = results.read_jsonl(path, check)
    problems.extend(bad)
    machine = str(runs["machine"].iloc[0])
    return [{"machine": machine, "device": str(r["device"]), "gflops": float(r["gflops"])} for r in records]


def newest_measurements(bench: Benchmarks) -> Benchmarks:
    """One measurement per machine, benchmark and parameters: the newest finite one, else the newest slot.

    Shards of one run measure disjoint parameters, so they merge whole; a measurement present in more
    than one result file of a machine (an overlapping shard, an older night) is shown once, and counted
    in a note. (``--compare`` is the way to set two runs side by side.)
    """
    frame = bench.results
    if frame.empty:
        return bench
    dates = dict(zip(bench.runs["file"], bench.runs["date"]))
    key = ["machine", "benchmark", "params_key"]
    frame = frame.assign(_finite=np.isfinite(frame["value"]), _date=frame["file"].map(dates).fillna(0))
    frame = frame.sort_values(["_finite", "_date"], kind="stable")
    finite = frame[frame["_finite"]]
    repeated = finite[finite.duplicated(key, keep="last")]
    for machine, group in repeated.groupby("machine", sort=True):
        bench.notes.append(f"machine {machine}: {len(group)} measurement(s) appear in more than one asv result "
                           f"file (overlapping shards or several runs); each is shown once, the newest")
    kept = frame.drop_duplicates(key, keep="last").sort_index()
    bench.results = kept.drop(columns=["_finite", "_date"]).reset_index(drop=True)
    return bench


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
        method = results.quantity(method)  # the suite's sampled time and asv's own timing are one quantity
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


ACCURACY_COLUMNS = ["class", "adapter", "mode", "num_heads", "device", "kernel", "family", "kind", "inputs",
                    "dtype", "seq_len", "status", "reason", *results.ACCURACY_FIGURES,
                    *(f"reference_{m}" for m in results.ACCURACY_FIGURES),
                    *(f"ratio_{m}" for m in results.ACCURACY_FIGURES), "source"]


def load_accuracy(results_dirs, problems: list | None = None) -> pd.DataFrame:
    """The accuracy records of bench/accuracy.jsonl (``benchmarks.accuracy``), one row per class, adapter, mode,
    device, dtype and L: the newest record wins, so a run into the same directory replaces an earlier one's
    figures. Every line that cannot be read is added to ``problems``."""
    rows = []
    for directory in ([results_dirs] if isinstance(results_dirs, (str, Path)) else results_dirs):
        path = results.Layout(directory).accuracy
        if not path.is_file():
            continue
        records, bad = results.read_jsonl(path, results.accuracy_problem)
        if problems is not None:
            problems.extend(bad)
        for rec in records:
            params = rec["params"]
            row = {"class": str(rec["benchmark"]).rpartition(".")[2], **{k: params.get(k) for k in
                   ("adapter", "mode", "num_heads", "device")}, "source": str(directory), "time": rec.get("time")}
            row.update({k: rec.get(k) for k in ("kernel", "family", "kind", "inputs", "dtype", "seq_len", "status",
                                                 "reason")})
            for m in results.ACCURACY_FIGURES:
                row[m] = _num(rec.get(m))
                row[f"reference_{m}"] = _num((rec.get("reference") or {}).get(m))
                row[f"ratio_{m}"] = _num((rec.get("ratio") or {}).get(m))
            rows.append(row)
    if not rows:
        return pd.DataFrame(columns=ACCURACY_COLUMNS)
    frame = pd.DataFrame.from_records(rows)
    frame["seq_len"] = pd.to_numeric(frame["seq_len"], errors="coerce")
    frame["time"] = pd.to_numeric(frame["time"], errors="coerce").fillna(0)
    key = ["class", "adapter", "mode", "device", "dtype", "seq_len", "source"]
    frame = frame.sort_values("time").drop_duplicates(key, keep="last")
    return frame[ACCURACY_COLUMNS].sort_values(["class", "adapter", "dtype", "seq_len"]).reset_index(drop=True)


def load_results(results_dirs, machines=None) -> tuple[Conformance | None, Benchmarks | None]:
    """Both halves of one or several results directories, merged; a ResultsError when a directory holds neither.

    ``machines``: None, one name for every directory, or one per directory (``report --machine``).
    """
    dirs = [Path(results_dirs)] if isinstance(results_dirs, (str, Path)) else [Path(d) for d in results_dirs]
    if not dirs:
        raise ResultsError("--results needs at least one directory")
    overrides = _overrides(dirs, machines)
    conformances, benches = [], []
    for directory, override in zip(dirs, overrides):
        conformance, benchmarks = _load_one(directory, override)
        if conformance is not None:
            conformances.append(conformance)
        if benchmarks is not None:
            benches.append(benchmarks)
    return merge_conformance(conformances), merge_benchmarks(benches)


def _overrides(dirs: list[Path], machines) -> list[str | None]:
    if machines is None or (isinstance(machines, (list, tuple)) and not machines):
        return [None] * len(dirs)
    names = [machines] if isinstance(machines, str) else list(machines)
    for name in names:
        if not str(name).strip() or any(not ch.isprintable() for ch in str(name)):
            raise ResultsError(f"--machine {name!r}: a machine name must be printable and not empty")
    if len(names) == 1:
        return names * len(dirs)
    if len(names) != len(dirs):
        raise ResultsError(f"--machine takes one name (for every directory) or one per --results directory: "
                           f"got {len(names)} names for {len(dirs)} directories")
    return names


def _load_one(results_dir: Path, override: str | None):
    """One directory's conformance and asv results, each row labelled with its machine."""
    if not results_dir.exists():
        raise ResultsError(f"results directory {results_dir} does not exist "
                           "(run `mhabench conform` and `mhabench bench` first, or `mhabench run`)")
    if not results_dir.is_dir():
        raise ResultsError(f"{results_dir} is not a directory")
    conformance = load_conformance(results_dir)
    try:
        benchmarks = load_benchmarks(results_dir)
    except ResultsError as exc:  # no asv results file could be read: the conformance half is still reported
        if conformance is None:
            raise
        conformance.problems.append(str(exc))
        benchmarks = None
    if conformance is None and benchmarks is None:
        raise ResultsError(f"no conformance or benchmark results in {results_dir} "
                           "(expected conformance/results.json or asv/<machine>/*.json)")
    asv_machines = sorted(set(benchmarks.runs["machine"].astype(str))) if benchmarks is not None else []
    if benchmarks is not None:
        if override is not None:
            if len(asv_machines) > 1:
                raise ResultsError(f"--machine cannot give {results_dir} one name: its asv results hold several "
                                   f"machines ({', '.join(asv_machines)})")
            benchmarks.results["machine"] = override
            benchmarks.runs["machine"] = override
            benchmarks.machines = {override: m for m in benchmarks.machines.values()}
        local = override or (asv_machines[0] if len(asv_machines) == 1 else "unknown")
        benchmarks.skips["machine"] = local
    if conformance is not None:
        conformance.machine = conformance_machine(conformance.meta, asv_machines, override)
        rows = conformance.rows
        if override is None and len(asv_machines) != 1 and "machine" in rows:  # a row's own machine, if any
            rows["machine"] = rows["machine"].where(rows["machine"].notna() & (rows["machine"] != ""),
                                                    conformance.machine).astype(str)
        else:
            rows["machine"] = conformance.machine
    return conformance, benchmarks


def conformance_machine(meta: dict, asv_machines: list[str], override: str | None) -> str:
    """The machine of a directory's conformance rows: ``--machine``; else asv's machine name where asv ran
    in the same directory (so both halves of one box line up); else the host the run recorded
    (``meta["machine"]``); else its CPU (and GPU); else "unknown"."""
    if override:
        return str(override)
    if len(asv_machines) == 1:
        return asv_machines[0]
    if meta.get("machine"):
        return str(meta["machine"])
    return " + ".join(str(meta[k]) for k in ("cpu", "gpu") if meta.get(k)) or "unknown"


MERGE_KEY = ["machine", "device", "row_id", "framework_version"]


def merge_conformance(parts: list[Conformance]) -> Conformance | None:
    """Several directories' conformance results as one: each row once per (machine, device, row id, framework
    version).

    Where two directories hold the same row computed by the same framework version (overlapping shards, two
    nights), the newer run's row is kept (meta ``created``; else the directory given later) and the overlap is
    reported in ``notes``. Rows computed by different versions of their framework are different results: each
    version's are kept, and ``notes`` names the versions per machine.
    """
    if not parts:
        return None
    if len(parts) == 1:
        part = parts[0]
        part.missing_shards, repeated = shard_notes(parts)
        part.notes.extend(repeated)
        part.complete = part.complete and not part.missing_shards
        return part
    ordered = sorted(parts, key=lambda p: str(p.meta.get("created") or ""))  # stable: the given order breaks ties
    combined = pd.concat([p.rows for p in ordered], ignore_index=True)
    dropped = combined.duplicated(MERGE_KEY, keep="last")
    notes = []
    for (machine, where), group in combined[dropped].groupby(["machine", "results"], sort=False):
        notes.append(f"machine {machine}: {len(group)} row(s) of {where} also appear in a newer results directory "
                     f"with the same framework versions (overlapping shards or runs); each is counted once, the newer")
    missing_shards, repeated = shard_notes(parts)
    notes.extend(repeated)
    rows = combined[~dropped].reset_index(drop=True)
    notes.extend(version_notes(rows))
    planned = [p.planned for p in parts]
    return Conformance(meta=dict(parts[0].meta), rows=rows, catalogue=_merge_catalogues(parts), source=parts[0].source,
                       problems=[q for p in parts for q in p.problems],
                       complete=all(p.complete for p in parts) and not missing_shards,
                       planned=None if any(n is None for n in planned) else sum(int(n) for n in planned),
                       plan={}, machine=", ".join(dict.fromkeys(p.machine for p in parts)), parts=list(parts),
                       notes=notes, missing_shards=missing_shards)


def version_notes(rows: pd.DataFrame) -> list[str]:
    """Per machine, the adapters whose rows were computed by more than one version of their framework, each
    version with the results directories that recorded it (oldest run first, the order of ``rows``)."""
    if "framework_version" not in rows:
        return []
    recorded = rows.loc[rows["framework_version"].notna(), ["machine", "adapter", "framework_version", "results"]]
    recorded = recorded.drop_duplicates()
    notes = []
    for machine, on_machine in recorded.groupby("machine", sort=True):
        several = on_machine.groupby("adapter")["framework_version"].nunique()
        adapters = sorted(several[several > 1].index)
        if not adapters:
            continue
        where = on_machine[on_machine["adapter"].isin(adapters)].groupby("framework_version", sort=False)["results"]
        versions = "; ".join(f"{version} in {', '.join(dict.fromkeys(dirs))}" for version, dirs in where)
        notes.append(f"machine {machine}: {', '.join(adapters)} ran under several framework versions ({versions}); "
                     f"each version's rows are kept, side by side")
    return notes


def shard_notes(parts: list[Conformance]) -> tuple[list[str], list[str]]:
    """(shards missing, shards given twice), per machine, framework versions and shard count (plan.json's
    optional "shard"): the shards of two runs with different versions are two runs, not one shard twice."""
    groups: dict[tuple, list] = {}
    for part in parts:
        if part.shard is not None:
            versions = part.meta.get("versions") if isinstance(part.meta.get("versions"), dict) else {}
            groups.setdefault((part.machine, part.shard[1], _frozen(versions)), []).append(part)
    missing, repeated = [], []
    for (machine, count, _versions), members in sorted(groups.items(), key=lambda kv: kv[0][:2]):
        seen = Counter(p.shard[0] for p in members)
        absent = [f"{k}/{count}" for k in range(1, count + 1) if k not in seen]
        if absent:
            missing.append(f"machine {machine}: shard{'s' if len(absent) > 1 else ''} {', '.join(absent)} missing "
                         f"(present: {', '.join(f'{k}/{count}' for k in sorted(seen))}): their rows are not in this "
                         f"report")
        for k, times in sorted(seen.items()):
            if times > 1:
                where = ", ".join(str(p.source.parent.parent) for p in members if p.shard[0] == k)
                repeated.append(f"machine {machine}: shard {k}/{count} given {times} times ({where}); "
                                f"its rows are counted once")
    return missing, repeated


def _merge_catalogues(parts: list[Conformance]) -> dict:
    """One entry per id; where machines disagree on an entry's verdict, the worst wins and each is named."""
    rank = {"stale": 0, "ok": 1, "unchecked": 2}
    merged: dict[str, dict] = {}
    verdicts: dict[str, dict] = {}
    for part in parts:
        for div_id, entry in part.catalogue.items():
            verdicts.setdefault(div_id, {})[part.machine] = entry.get("status")
            if div_id not in merged or rank.get(entry.get("status"), 3) < rank.get(merged[div_id].get("status"), 3):
                merged[div_id] = dict(entry)
    for div_id, by_machine in verdicts.items():
        if len(set(by_machine.values())) > 1:
            merged[div_id]["message"] = "; ".join(f"{m}: {v}" for m, v in by_machine.items()) + \
                (f" ({merged[div_id]['message']})" if merged[div_id].get("message") else "")
    return merged


def merge_benchmarks(parts: list[Benchmarks]) -> Benchmarks | None:
    """Several directories' asv results as one (machines side by side; see :func:`newest_measurements`)."""
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    machines = {}
    for part in parts:
        machines.update(part.machines)
    skips = pd.concat([p.skips for p in parts], ignore_index=True).drop_duplicates().reset_index(drop=True)
    merged = Benchmarks(results=pd.concat([p.results for p in parts], ignore_index=True), machines=machines,
                        runs=pd.concat([p.runs for p in parts], ignore_index=True), skips=skips,
                        source=parts[0].source, notes=[n for p in parts for n in p.notes],
                        problems=[q for p in parts for q in p.problems], peaks=[k for p in parts for k in p.peaks])
    return newest_measurements(merged)
