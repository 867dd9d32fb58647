"""The tidy tables a report is made of, computed from the loaded results."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from mhabench import results
from mhabench.results import AREAS, PROBLEM_STATUSES, STATUSES

from .load import Benchmarks, Conformance


# --- environment --------------------------------------------------------------------------------

def environment(conformance: Conformance | None, benchmarks: Benchmarks | None) -> pd.DataFrame:
    """Framework versions, machine, date and commit, one row per fact with where it came from."""
    rows = []

    def add(item, value, source):
        if value not in (None, "", {}, []):
            rows.append({"item": item, "value": _text(value), "source": source})

    if conformance is not None:
        meta = conformance.meta
        for key in ("created", "commit", "mhabench_version", "python", "platform", "cpu", "gpu"):
            add(key, meta.get(key), "conformance")
        versions = meta.get("versions") or {}
        if isinstance(versions, dict):
            for name, version in sorted(versions.items()):
                add(f"version: {name}", version, "conformance")
        if meta.get("partial"):
            add("note", "results.json missing: read the partial rows.jsonl of an interrupted run", "conformance")
    if benchmarks is not None:
        for name, machine in sorted(benchmarks.machines.items()):
            if not isinstance(machine, dict):
                continue
            for key in ("machine", "cpu", "num_cpu", "arch", "os", "ram", "gpu"):
                add(f"bench {key}", machine.get(key), f"asv machine.json ({name})")
        for run in benchmarks.runs.to_dict("records"):
            add("bench commit", run.get("commit"), "asv results")
            add("bench environment", run.get("env"), "asv results")
            if run.get("date"):
                add("bench date", pd.Timestamp(run["date"], unit="ms", tz="UTC").isoformat(timespec="seconds"),
                    "asv results")
            requirements = run.get("requirements") or {}
            if isinstance(requirements, dict):
                for name, version in sorted(requirements.items()):
                    add(f"bench requirement: {name}", version or "(unpinned)", "asv results")
    return pd.DataFrame(rows, columns=["item", "value", "source"])


def _text(value) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


# --- conformance --------------------------------------------------------------------------------

def conformance_matrix(rows: pd.DataFrame) -> pd.DataFrame:
    """Adapter x area: a count per status and the worst meaningful error ratio, as a long table.

    The cells are ``mhabench.results.summarise``'s, the same the terminal summary of ``conform`` shows."""
    columns = ["adapter", "area", *STATUSES, "total", "worst_error_ratio"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    records = rows[["adapter", "area", "status", "error_ratio", "tolerance_source"]].to_dict("records")
    summary = results.summarise(records)
    order = {area: i for i, area in enumerate(AREAS)}
    out = []
    for (adapter, area), cell in sorted(summary.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], len(order)),
                                                                          kv[0][1])):
        out.append({"adapter": adapter, "area": area, **{s: cell[s] for s in STATUSES},
                    "total": sum(cell[s] for s in STATUSES),
                    "worst_error_ratio": math.nan if cell["worst_ratio"] is None else cell["worst_ratio"]})
    return pd.DataFrame(out, columns=columns)


def matrix_areas(matrix: pd.DataFrame) -> list[str]:
    """The areas to show as columns: the known ones in order, then any others found."""
    seen = list(dict.fromkeys(matrix["area"]))
    return [a for a in AREAS if a in seen] + [a for a in seen if a not in AREAS]


cell_state = results.worst_status  # the worst status present in one matrix cell (drives its colour)


def adapter_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per adapter: counts and the pass rate over the rows that ran to a verdict."""
    columns = ["adapter", "framework", "framework_version", *STATUSES, "total", "pass_rate", "divergences"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    out = []
    for adapter, group in rows.groupby("adapter", sort=True):
        counts = group["status"].value_counts()
        record = {"adapter": adapter,
                  "framework": _first(group.get("framework")),
                  "framework_version": _first(group.get("framework_version"))}
        for status in STATUSES:
            record[status] = int(counts.get(status, 0))
        record["total"] = len(group)
        judged = sum(record[s] for s in ("pass", "fail", "divergence", "error"))
        record["pass_rate"] = record["pass"] / judged if judged else math.nan
        record["divergences"] = int(group["divergence"].dropna().nunique())
        out.append(record)
    return pd.DataFrame(out, columns=columns)


def _first(series):
    if series is None:
        return None
    values = series.dropna()
    return None if values.empty else str(values.iloc[0])


def non_passing(rows: pd.DataFrame) -> pd.DataFrame:
    """The drill-down: every row that did not pass, worst status first, then worst error ratio."""
    columns = ["row_id", "adapter", "area", "case", "dtype", "quantity", "status", "error_ratio",
               "max_abs_err", "tolerance", "divergence", "message"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    bad = rows[rows["status"] != "pass"].copy()
    for column in columns:
        if column not in bad:
            bad[column] = None
    rank = {s: i for i, s in enumerate(PROBLEM_STATUSES)}
    bad["_rank"] = bad["status"].map(lambda s: rank.get(s, -1))
    bad = bad.sort_values(["_rank", "error_ratio", "adapter", "row_id"], ascending=[True, False, True, True],
                          na_position="last")
    return bad[columns].reset_index(drop=True)


def divergence_catalogue(rows: pd.DataFrame, catalogue: dict) -> pd.DataFrame:
    """One row per divergence id seen in the rows or checked by the run (``catalogue.json``)."""
    columns = ["id", "framework", "adapters", "rows", "cases", "observed", "how", "upstream", "status"]
    seen = rows[rows["divergence"].notna()] if not rows.empty else rows
    ids = list(dict.fromkeys(list(seen["divergence"].astype(str)) if not seen.empty else []))
    ids += [i for i in catalogue if i not in ids]
    out = []
    for div_id in ids:
        entry = catalogue.get(div_id, {})
        group = seen[seen["divergence"].astype(str) == div_id] if not seen.empty else seen
        cases = sorted(set(group["case"].dropna().astype(str))) if not group.empty else []
        out.append({
            "id": div_id,
            "framework": entry.get("framework") or (_first(group["framework"]) if not group.empty else ""),
            "adapters": ", ".join(sorted(set(group["adapter"]))) if not group.empty
            else ", ".join(entry.get("adapters") or []),
            "rows": len(group),
            "cases": ", ".join(cases[:8]) + (f" (+{len(cases) - 8} more)" if len(cases) > 8 else ""),
            "observed": entry.get("observed") or (_first(group["message"]) if not group.empty else "") or "",
            "how": entry.get("how") or "",
            "upstream": entry.get("upstream") or "",
            "status": entry.get("status") or ("ok" if len(group) else "not in this run"),
        })
    return pd.DataFrame(out, columns=columns)


# --- benchmarks ---------------------------------------------------------------------------------

def fit_exponent(lengths, values) -> float:
    """Least-squares slope of log(value) on log(length): 1 for O(L), 2 for O(L^2)."""
    x = np.asarray(lengths, dtype=float)
    y = np.asarray(values, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    x, y = x[keep], y[keep]
    if len(np.unique(x)) < 2:
        return math.nan
    slope, _ = np.polyfit(np.log(x), np.log(y), 1)
    return float(slope)


def series_label(record) -> str:
    """One line per adapter (+ mode when it is not the plain eager one)."""
    adapter, mode = str(record["adapter"]), record.get("mode")
    return adapter if mode in (None, "", "eager") or (isinstance(mode, float) and math.isnan(mode)) \
        else f"{adapter} ({mode})"


def attention_results(benchmarks: Benchmarks | None) -> pd.DataFrame:
    """The measured attention benchmarks (those parametrised by adapter), with a line label.

    asv keeps a slot for every combination of the grid; the ones not run here, skipped or failed
    are NaN and left out (the skip log says why).
    """
    if benchmarks is None or benchmarks.results.empty:
        return pd.DataFrame()
    frame = benchmarks.results
    frame = frame[frame["adapter"].notna() & frame["seq_len"].notna() & np.isfinite(frame["value"])].copy()
    if frame.empty:
        return frame
    frame["series"] = frame.apply(series_label, axis=1)
    frame["seq_len"] = pd.to_numeric(frame["seq_len"], errors="coerce")
    frame["num_heads"] = pd.to_numeric(frame["num_heads"], errors="coerce")
    return frame


def default_heads(frame: pd.DataFrame) -> float:
    """The head count of the L sweep: the one measured at the most sequence lengths."""
    finite = frame[np.isfinite(frame["value"])]
    source = finite if not finite.empty else frame
    per_heads = source.groupby("num_heads")["seq_len"].nunique()
    if per_heads.empty:
        return math.nan
    best = per_heads.max()
    return float(min(h for h, n in per_heads.items() if n == best))


def sweep(frame: pd.DataFrame, klass: str, method: str, device: str | None = None) -> pd.DataFrame:
    """The L sweep of one benchmark: rows at the default head count."""
    part = frame[(frame["class"] == klass) & (frame["method"] == method)]
    if device is not None:
        part = part[part["device"] == device]
    if part.empty:
        return part
    heads = default_heads(part)
    return part[part["num_heads"] == heads].sort_values(["series", "seq_len"])


def heads_sweep(frame: pd.DataFrame, klass: str, method: str) -> pd.DataFrame:
    """Rows at the largest L measured with more than one head count."""
    part = frame[(frame["class"] == klass) & (frame["method"] == method) & np.isfinite(frame["value"])]
    if part.empty:
        return part
    per_length = part.groupby("seq_len")["num_heads"].nunique()
    lengths = per_length[per_length > 1]
    if lengths.empty:
        return part.iloc[0:0]
    return part[part["seq_len"] == lengths.index.max()].sort_values(["series", "num_heads"])


def scaling_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per benchmark and line: the fitted exponent in L and the value at the largest L."""
    columns = ["class", "method", "device", "series", "adapter", "mode", "num_heads", "points", "L_min", "L_max",
               "exponent", "value_at_L_max", "unit"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    out = []
    for (klass, method), part in frame.groupby(["class", "method"], sort=True):
        if method.startswith("track_gflops"):
            continue
        for device, by_device in part.groupby("device", dropna=False):
            rows = sweep(by_device, klass, method)
            for series, line in rows.groupby("series", sort=True):
                finite = line[np.isfinite(line["value"])]
                largest = finite.loc[finite["seq_len"].idxmax()] if not finite.empty else None
                out.append({
                    "class": klass, "method": method, "device": device, "series": series,
                    "adapter": line["adapter"].iloc[0], "mode": line["mode"].iloc[0],
                    "num_heads": line["num_heads"].iloc[0], "points": len(finite),
                    "L_min": finite["seq_len"].min() if len(finite) else math.nan,
                    "L_max": finite["seq_len"].max() if len(finite) else math.nan,
                    "exponent": fit_exponent(line["seq_len"], line["value"]),
                    "value_at_L_max": largest["value"] if largest is not None else math.nan,
                    "unit": line["unit"].iloc[0],
                })
    return pd.DataFrame(out, columns=columns)


def gemm_peaks(benchmarks: Benchmarks | None) -> dict:
    """device -> the machine's measured GEMM GFLOP/s (Machine.track_gemm_gflops)."""
    if benchmarks is None or benchmarks.results.empty:
        return {}
    frame = benchmarks.results
    peak = frame[(frame["method"] == "track_gemm_gflops") & np.isfinite(frame["value"])]
    result = {}
    for record in peak.to_dict("records"):
        device = record.get("device") or record.get("param0") or "cpu"
        result[str(device)] = max(result.get(str(device), 0.0), float(record["value"]))
    return result


def peak_fraction(frame: pd.DataFrame, peaks: dict) -> pd.DataFrame:
    """Per GFLOP/s benchmark and line: best and largest-L GFLOP/s, and their fraction of GEMM peak."""
    columns = ["class", "method", "device", "series", "adapter", "mode", "num_heads", "L_max", "gflops_at_L_max",
               "best_gflops", "gemm_peak_gflops", "fraction_at_L_max", "best_fraction"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    out = []
    flops = frame[frame["method"].str.startswith("track_gflops")]
    for (klass, method), part in flops.groupby(["class", "method"], sort=True):
        for device, by_device in part.groupby("device", dropna=False):
            rows = sweep(by_device, klass, method)
            peak = peaks.get(str(device), math.nan)
            for series, line in rows.groupby("series", sort=True):
                finite = line[np.isfinite(line["value"])]
                if finite.empty:
                    continue
                largest = finite.loc[finite["seq_len"].idxmax()]
                best = float(finite["value"].max())
                out.append({
                    "class": klass, "method": method, "device": device, "series": series,
                    "adapter": line["adapter"].iloc[0], "mode": line["mode"].iloc[0],
                    "num_heads": line["num_heads"].iloc[0], "L_max": largest["seq_len"],
                    "gflops_at_L_max": float(largest["value"]), "best_gflops": best, "gemm_peak_gflops": peak,
                    "fraction_at_L_max": float(largest["value"]) / peak if peak and peak > 0 else math.nan,
                    "best_fraction": best / peak if peak and peak > 0 else math.nan,
                })
    return pd.DataFrame(out, columns=columns)


def headline(frame: pd.DataFrame, klass: str = "SelfAttention") -> dict:
    """The fastest and leanest line at the largest L of the forward sweep, among the lines measured there."""
    result = {}
    for key, method in (("fastest", "time_forward"), ("leanest", "track_peakmem_forward")):
        rows = sweep(frame, klass, method) if not frame.empty else frame
        rows = rows[np.isfinite(rows["value"])] if not rows.empty else rows
        if rows.empty:
            continue
        largest = rows["seq_len"].max()
        at_largest = rows[rows["seq_len"] == largest]
        best = at_largest.loc[at_largest["value"].idxmin()]
        result[key] = {"series": best["series"], "seq_len": int(largest), "value": float(best["value"]),
                       "unit": best["unit"], "num_heads": best["num_heads"],
                       "lines": int(at_largest["series"].nunique())}
    return result
