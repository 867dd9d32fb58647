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
    """The conformance results under a results directory (through ``mhabench.results``); None if absent."""
    try:
        found = results.read_results(results_dir)
    except ValueError as exc:
        raise ResultsError(str(exc)) from None
    if found is None:
        return None
    meta = dict(found.meta)
    rows = _tidy_conformance([row.to_dict() for row in found.rows])
    rows["results"] = str(Path(results_dir))
    catalogue = {str(entry["id"]): entry for entry in found.catalogue if isinstance(entry, dict) and entry.get("id")}
    plan = found.plan if isinstance(found.plan, dict) else {}
    return Conformance(meta=meta, rows=rows, catalogue=catalogue, source=found.source, problems=found.problems,
                       complete=found.complete, planned=plan.get("rows"), plan=plan,
                       machine=conformance_machine(meta, [], None))


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
    skips_dir = path if path.is_dir() else asv_dir.parent
    problems: list[str] = []
    skips = load_skips(skips_dir, problems)
    flops = load_flops(skips_dir, problems)
    frame = with_kernels(with_throughput(frame, flops), flops)
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
    """A ``kernel`` column: the kernel each benchmark case recorded with its FLOPs; for results written before
    kernels were recorded, the one its adapter's name gives (``legacy_kernel``, as ``Row`` reads old rows)."""
    if frame.empty or "adapter" not in frame:
        return frame
    recorded = {}
    for record in flops.values():
        params = record.get("params") or {}
        recorded[params.get("adapter")] = record.get("kernel")
    frame = frame.copy()
    frame["kernel"] = [None if a is None or a != a else recorded.get(a) or results.legacy_kernel(a)
                       for a in frame["adapter"]]
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
    benchmarks = load_benchmarks(results_dir)
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


def merge_conformance(parts: list[Conformance]) -> Conformance | None:
    """Several directories' conformance results as one: each row once per (machine, device, row id).

    Where two directories hold the same row (overlapping shards, two nights), the newer run's row is kept
    (meta ``created``; else the directory given later) and the overlap is reported in ``notes``.
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
    key = ["machine", "device", "row_id"]
    dropped = combined.duplicated(key, keep="last")
    notes = []
    for (machine, where), group in combined[dropped].groupby(["machine", "results"], sort=False):
        notes.append(f"machine {machine}: {len(group)} row(s) of {where} also appear in a newer results directory "
                     f"(overlapping shards or runs); each is counted once, the newer")
    missing_shards, repeated = shard_notes(parts)
    notes.extend(repeated)
    rows = combined[~dropped].reset_index(drop=True)
    planned = [p.planned for p in parts]
    return Conformance(meta=dict(parts[0].meta), rows=rows, catalogue=_merge_catalogues(parts), source=parts[0].source,
                       problems=[q for p in parts for q in p.problems],
                       complete=all(p.complete for p in parts) and not missing_shards,
                       planned=None if any(n is None for n in planned) else sum(int(n) for n in planned),
                       plan={}, machine=", ".join(dict.fromkeys(p.machine for p in parts)), parts=list(parts),
                       notes=notes, missing_shards=missing_shards)


def shard_notes(parts: list[Conformance]) -> tuple[list[str], list[str]]:
    """(shards missing, shards given twice), per machine and shard count (plan.json's optional "shard")."""
    groups: dict[tuple[str, int], list] = {}
    for part in parts:
        if part.shard is not None:
            groups.setdefault((part.machine, part.shard[1]), []).append(part)
    missing, repeated = [], []
    for (machine, count), members in sorted(groups.items()):
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
