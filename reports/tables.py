"""The tidy tables a report is made of, computed from the loaded results."""
from __future__ import annotations

import json
import math
import re
import shlex
from collections import Counter

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

    parts = (conformance.parts or [conformance]) if conformance is not None else []
    for part in parts:
        where = "conformance" if len(parts) == 1 else f"conformance ({part.machine}: {part.source.parent.parent})"
        meta = part.meta
        add("machine", part.machine, where)
        for key in ("created", "commit", "mhabench_version", "python", "platform", "cpu", "gpu"):
            add(key, meta.get(key), where)
        versions = meta.get("versions") or {}
        if isinstance(versions, dict):
            for name, version in sorted(versions.items()):
                add(f"version: {name}", version, where)
        if part.shard is not None:
            add("shard", f"{part.shard[0]}/{part.shard[1]}", where)
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
    columns = ["adapter", "area", *STATUSES, "total", "worst_error_ratio", "kernel"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    records = rows[["adapter", "area", "status", "error_ratio", "tolerance_source"]].to_dict("records")
    summary = results.summarise(records)
    kernels = _kernels(rows)
    order = {area: i for i, area in enumerate(AREAS)}
    out = []
    for (adapter, area), cell in sorted(summary.items(), key=lambda kv: (kv[0][0], order.get(kv[0][1], len(order)),
                                                                          kv[0][1])):
        out.append({"adapter": adapter, "kernel": kernels.get(adapter), "area": area, **{s: cell[s] for s in STATUSES},
                    "total": sum(cell[s] for s in STATUSES),
                    "worst_error_ratio": math.nan if cell["worst_ratio"] is None else cell["worst_ratio"]})
    return pd.DataFrame(out, columns=columns)


def matrix_areas(matrix: pd.DataFrame) -> list[str]:
    """The areas to show as columns: the known ones in order, then any others found."""
    seen = list(dict.fromkeys(matrix["area"]))
    return [a for a in AREAS if a in seen] + [a for a in seen if a not in AREAS]


cell_state = results.worst_status  # the worst status present in one matrix cell (drives its colour)


def _kernels(rows: pd.DataFrame) -> dict:
    """adapter -> the kernel its rows recorded (one per adapter: a kernel variant is its own adapter)."""
    if "kernel" not in rows:
        return {a: results.DEFAULT_KERNEL for a in rows["adapter"].unique()}
    return dict(zip(rows["adapter"], rows["kernel"]))


def kernel_matrix(rows: pd.DataFrame) -> pd.DataFrame:
    """Framework x kernel x modern feature: the status counts of the rows that use the feature, one row per
    (adapter, kernel, feature); ``classic`` for the rows that use none. How each kernel agrees, feature by feature."""
    columns = ["adapter", "kernel", "feature", *STATUSES, "total"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    kernels = _kernels(rows)
    feature_of = lambda r: [name for name, on in (
        ("gqa", _gqa(r.get("spec"))), ("causal_bottom_right", r.get("causal") == "bottom_right"),
        ("window", _given(r.get("window"))), ("bias", _given(r.get("bias"))),
        ("lengths", _given(r.get("lengths")))) if on] or ["classic"]
    counts: dict = {}
    for record in rows[rows["quantity"] != "raises"].to_dict("records"):
        for feature in feature_of(record):
            cell = counts.setdefault((record["adapter"], feature), Counter())
            cell[record["status"]] += 1
    order = ["classic", "gqa", "causal_bottom_right", "window", "bias", "lengths"]
    out = [{"adapter": adapter, "kernel": kernels.get(adapter), "feature": feature,
            **{s: cell.get(s, 0) for s in STATUSES}, "total": sum(cell.values())}
           for (adapter, feature), cell in sorted(counts.items(), key=lambda kv: (kv[0][0], order.index(kv[0][1])))]
    return pd.DataFrame(out, columns=columns)


def _given(value) -> bool:
    return value is not None and value == value and value != "" and value != []


def _gqa(spec) -> bool:
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except ValueError:
            return False
    return isinstance(spec, dict) and spec.get("num_kv_heads") not in (None, spec.get("num_heads"))


def adapter_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per adapter: counts and the pass rate over the rows that ran to a verdict."""
    columns = ["adapter", "framework", "framework_version", *STATUSES, "total", "pass_rate", "divergences", "kernel",
               "opset"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    out = []
    kernels = _kernels(rows)
    for adapter, group in rows.groupby("adapter", sort=True):
        counts = group["status"].value_counts()
        record = {"adapter": adapter, "kernel": kernels.get(adapter),
                  "framework": _first(group.get("framework")),
                  "framework_version": _first(group.get("framework_version"))}
        for status in STATUSES:
            record[status] = int(counts.get(status, 0))
        record["total"] = len(group)
        judged = sum(record[s] for s in ("pass", "fail", "divergence", "error"))
        record["pass_rate"] = record["pass"] / judged if judged else math.nan
        record["divergences"] = int(group["divergence"].dropna().nunique())
        record["opset"] = _first(group["opset"].astype("Int64")) if "opset" in group else None
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


OPTIONAL = ("path", "kernel", "mode")  # row fields shown where a run recorded them


def present(rows: pd.DataFrame, names) -> list[str]:
    """The columns among ``names`` that hold a value in some row (fields a newer harness adds)."""
    return [n for n in names if n in rows and rows[n].notna().any() and (rows[n].astype(str) != "").any()]


def rerun_command(row_id: str, results_dir: str, plugins=()) -> str:
    """The command that runs exactly this row again into its own results directory."""
    adapters = "".join(f"--adapter {shlex.quote(str(t))} " for t in plugins)
    return f"mhabench conform {adapters}--rerun {shlex.quote(str(row_id))} --results {shlex.quote(str(results_dir))}"


def failures(rows: pd.DataFrame, plugins: dict | None = None) -> pd.DataFrame:
    """Every ``error`` and ``fail`` row, errors first, each with the command that reruns it.

    ``plugins``: results directory -> the ``--adapter`` targets its run loaded (plan.json's "adhoc"),
    so the command also works for a plugin adapter."""
    columns = ["status", "row_id", "machine", "device", "adapter", "area", "case", "dtype", "quantity",
               *present(rows, OPTIONAL), "error_ratio", "max_abs_err", "tolerance", "message", "rerun"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    bad = rows[rows["status"].isin(["error", "fail"])].copy()
    bad["_rank"] = bad["status"].map({"error": 0, "fail": 1})
    bad = bad.sort_values(["_rank", "adapter", "row_id"])
    bad["rerun"] = [rerun_command(r, d, (plugins or {}).get(d, ())) for r, d in zip(bad["row_id"], bad["results"])]
    return bad[columns].reset_index(drop=True)


def join_values(values, limit=None) -> str:
    """Distinct values, sorted and comma-separated (blanks left out; past ``limit``, a count of the rest)."""
    values = sorted({str(v) for v in values if v is not None and v == v and v != ""})
    if limit and len(values) > limit:
        return ", ".join(values[:limit]) + f" (+{len(values) - limit} more)"
    return ", ".join(values)


def divergence_catalogue(rows: pd.DataFrame, catalogue: dict) -> pd.DataFrame:
    """One line per divergence entry: the ones the rows show, stale entries first, then those not shown here.

    ``rows`` counts the rows that carry the id, so an entry's line and its expanded rows agree."""
    columns = ["id", "framework", "adapters", "dtypes", "quantities", "machines", "rows", "cases", "observed", "how",
               "upstream", "status", "message"]
    seen = rows[rows["divergence"].notna()] if not rows.empty else rows
    ids = list(dict.fromkeys(seen["divergence"].astype(str))) if not seen.empty else []
    ids += [i for i in catalogue if i not in ids]
    out = []
    for div_id in ids:
        entry = catalogue.get(div_id, {})
        group = seen[seen["divergence"].astype(str) == div_id] if not seen.empty else seen
        shown = not group.empty
        out.append({
            "id": div_id,
            "framework": entry.get("framework") or (_first(group["framework"]) if shown else "") or "",
            "adapters": join_values(group["adapter"] if shown else entry.get("adapters") or []),
            "dtypes": join_values(group["dtype"] if shown else entry.get("dtypes") or []),
            "quantities": join_values(group["quantity"] if shown else entry.get("quantities") or []),
            "machines": join_values(group["machine"]) if shown and "machine" in group else "",
            "rows": len(group),
            "cases": join_values(group["case"], limit=8) if shown else join_values(entry.get("cases") or []),
            "observed": entry.get("observed") or (_first(group["message"]) if shown else "") or "",
            "how": entry.get("how") or "",
            "upstream": entry.get("upstream") or "",
            "status": entry.get("status") or ("ok" if shown else "not in this run"),
            "message": entry.get("message") or "",
        })
    table = pd.DataFrame(out, columns=columns)
    if table.empty:
        return table
    order = table["status"].map(lambda s: 0 if s == "stale" else 1) * 2 + (table["rows"] == 0).astype(int)
    return table.assign(_o=order).sort_values(["_o", "framework", "id"], kind="stable") \
        .drop(columns="_o").reset_index(drop=True)


NOT_RUN = ("unsupported", "skip")


def not_run_groups(rows: pd.DataFrame) -> pd.DataFrame:
    """``unsupported`` and ``skip`` rows grouped by reason (the row's message), largest group first."""
    columns = ["status", "reason", "rows", "adapters", "areas", "dtypes", "cases"]
    part = rows[rows["status"].isin(NOT_RUN)] if not rows.empty else rows
    if part.empty:
        return pd.DataFrame(columns=columns)
    out = []
    for (status, reason), group in part.groupby(["status", part["message"].fillna("").astype(str)], sort=False):
        out.append({"status": status, "reason": reason, "rows": len(group),
                    "adapters": join_values(group["adapter"]), "areas": join_values(group["area"]),
                    "dtypes": join_values(group["dtype"]), "cases": group["case"].nunique()})
    table = pd.DataFrame(out, columns=columns)
    return table.sort_values(["status", "rows", "reason"], ascending=[False, False, True]).reset_index(drop=True)


# --- frameworks side by side ------------------------------------------------------------------------

JUDGED = ("pass", "fail")  # rows whose figures are against the canonical golden (a divergence's are not)


def pair_key(rows: pd.DataFrame) -> list[str]:
    """What makes two adapters' rows the same computation: machine, device, case, dtype, quantity, call path."""
    return [c for c in ("machine", "device", "case", "dtype", "quantity", "path") if c in rows]


def _explain(div_id, catalogue: dict) -> str:
    if div_id is None or div_id != div_id:
        return "canonical"
    entry = catalogue.get(str(div_id), {})
    return str(entry.get("how") or div_id)


def agreement(rows: pd.DataFrame, catalogue: dict | None = None) -> pd.DataFrame:
    """Adapter x adapter: how far apart two adapters' outputs can be, from their rows alone.

    A row holds e = max|impl - golden| over the finite elements, not the output, so for adapters a and b
    on the same computation the triangle inequality bounds max|a - b| to [|e_a - e_b|, e_a + e_b]. Both
    ends are given relative to the row's tolerance (the error a faithful implementation in that dtype
    may have; both rows share it), maximised over every computation both judged against the golden.
    Upper <= 1: they agree within the tolerance; lower > 1: they certainly differ. Divergence rows are
    measured against the catalogued behaviour, not the golden, so they are named instead of bounded.
    """
    columns = ["adapter_a", "adapter_b", "compared", "cases", "dtypes", "upper_tol", "lower_tol", "upper_abs",
               "worst_case", "worst_dtype", "worst_quantity", "worst_machine", "worst_device", "worst_row_a",
               "worst_row_b", "fails", "divergent", "divergences", "not_compared", "kernel_a", "kernel_b"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    catalogue = catalogue or {}
    key = pair_key(rows)
    fields = ["adapter", "row_id", "status", "max_abs_err", "tolerance", "divergence"]
    ran = rows[rows["status"].isin(STATUSES) & (rows["quantity"] != "raises")][key + fields]
    pairs = ran.merge(ran, on=key, suffixes=("_a", "_b"))
    pairs = pairs[pairs["adapter_a"] < pairs["adapter_b"]].reset_index(drop=True)
    if pairs.empty:
        return pd.DataFrame(columns=columns)
    ea, eb, ta, tb = (pairs[c] for c in ("max_abs_err_a", "max_abs_err_b", "tolerance_a", "tolerance_b"))
    judged = pairs["status_a"].isin(JUDGED) & pairs["status_b"].isin(JUDGED) & np.isfinite(ea) & np.isfinite(eb) \
        & (ta > 0) & (tb > 0)
    # conservative both ways should the two rows' tolerances ever differ: the smaller for the upper bound
    pairs["_upper_abs"] = (ea + eb).where(judged)
    pairs["_upper"] = pairs["_upper_abs"] / np.minimum(ta, tb)
    pairs["_lower"] = ((ea - eb).abs() / np.maximum(ta, tb)).where(judged)
    pairs["_fail"] = judged & ((pairs["status_a"] == "fail") | (pairs["status_b"] == "fail"))
    ran_both = pairs["status_a"].isin([*JUDGED, "divergence"]) & pairs["status_b"].isin([*JUDGED, "divergence"])
    divergent = ran_both & ((pairs["status_a"] == "divergence") | (pairs["status_b"] == "divergence"))
    pairs["_not_compared"] = ~ran_both
    pairs["_divergent"] = divergent
    pairs["_case"] = pairs["case"].where(judged)
    pairs["_dtype"] = pairs["dtype"].where(judged)
    texts = {}
    shown = pairs[divergent]
    explained = Counter((a, b, f"{_explain(x, catalogue)} vs {_explain(y, catalogue)}") for a, b, x, y in
                        zip(shown["adapter_a"], shown["adapter_b"], shown["divergence_a"], shown["divergence_b"]))
    for (a, b, text), count in explained.most_common():
        texts[(a, b)] = (texts[(a, b)] + "; " if (a, b) in texts else "") + f"{text} ({count})"
    summary = pairs.groupby(["adapter_a", "adapter_b"]).agg(
        compared=("_upper", "count"), cases=("_case", "nunique"), dtypes=("_dtype", join_values),
        upper_tol=("_upper", "max"), lower_tol=("_lower", "max"), upper_abs=("_upper_abs", "max"),
        fails=("_fail", "sum"), not_compared=("_not_compared", "sum"), divergent=("_divergent", "sum"),
        worst=("_upper", lambda u: u.idxmax() if u.notna().any() else -1))
    out = []
    kernels = _kernels(rows)
    for (a, b), record in summary.iterrows():
        worst = pairs.loc[record["worst"]] if record["worst"] >= 0 else {}
        out.append({"adapter_a": a, "kernel_a": kernels.get(a), "adapter_b": b, "kernel_b": kernels.get(b),
                    **record.drop("worst").to_dict(),
                    **{k: int(record[k]) for k in ("compared", "fails", "not_compared", "divergent")},
                    "divergences": texts.get((a, b), ""),
                    **{f"worst_{k}": worst.get(k) for k in ("case", "dtype", "quantity", "machine", "device")},
                    "worst_row_a": worst.get("row_id_a"), "worst_row_b": worst.get("row_id_b")})
    return pd.DataFrame(out, columns=columns)


# --- machines -------------------------------------------------------------------------------------

def machine_matrix(rows: pd.DataFrame) -> pd.DataFrame:
    """Per machine x device x adapter: a count per status (conformance per machine)."""
    columns = ["machine", "device", "adapter", *STATUSES, "total"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    counts = rows.groupby(["machine", rows["device"].fillna(""), "adapter", "status"]).size().unstack(fill_value=0)
    counts = counts.reindex(columns=list(STATUSES), fill_value=0)
    counts["total"] = counts.sum(axis=1)
    return counts.reset_index()[columns]


def cross_machine(rows: pd.DataFrame) -> pd.DataFrame:
    """Rows of the same adapter on the same case, dtype and quantity whose verdict differs between machines
    (or devices): one line each, the outcome per machine / device side by side."""
    key = ["row_id", "adapter", "case", "dtype", "quantity", *(["path"] if "path" in rows else [])]
    if rows.empty or rows.groupby(["machine", rows["device"].fillna("")]).ngroups < 2:
        return pd.DataFrame(columns=key)
    rows = rows.assign(**{k: rows[k].fillna("") for k in key if k == "path"})  # pivot_table drops NaN keys
    where = rows["machine"].astype(str) + " / " + rows["device"].fillna("").astype(str)
    outcome = rows["status"] + rows["divergence"].map(lambda d: f" ({d})" if isinstance(d, str) else "")
    wide = rows.assign(_where=where, _outcome=outcome).pivot_table(index=key, columns="_where", values="_outcome",
                                                                  aggfunc="last")
    differs = wide.apply(lambda r: r.dropna().nunique() > 1, axis=1)
    wide = wide[differs].fillna("(not run)")
    return wide.reset_index().rename_axis(columns=None)


# --- benchmarks ---------------------------------------------------------------------------------

FIT_POINTS = 3  # the exponent is fitted over this many of the largest lengths measured


def fit_exponent(lengths, values, points: int = FIT_POINTS) -> float:
    """Least-squares slope of log(value) on log(length) over the ``points`` largest lengths: 1 for O(L), 2 for
    O(L^2). The largest lengths only, because that is where the growth shows: at small L the per-call overhead
    and the projections (O(L)) dominate and pull a quadratic kernel's slope down (torch_sdpa's forward on this
    suite's 2-core CPU: 1.31 over 128-4096, 1.67 over 1024-4096)."""
    x = np.asarray(lengths, dtype=float)
    y = np.asarray(values, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0) & (y > 0)
    x, y = x[keep], y[keep]
    if len(np.unique(x)) < 2:
        return math.nan
    largest = np.sort(np.unique(x))[-points:]
    x, y = x[np.isin(x, largest)], y[np.isin(x, largest)]
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
    if frame["machine"].nunique() > 1:  # one line per machine x adapter
        frame["series"] = frame["machine"].astype(str) + ": " + frame["series"]
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
    columns = ["class", "method", "device", "machine", "series", "adapter", "mode", "num_heads", "points", "L_min",
               "L_max", "exponent", "value_at_L_max", "unit", "kernel"]
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
                    "class": klass, "method": method, "device": device, "machine": line["machine"].iloc[0],
                    "series": series, "adapter": line["adapter"].iloc[0],
                    "kernel": line["kernel"].iloc[0] if "kernel" in line else results.DEFAULT_KERNEL,
                    "mode": line["mode"].iloc[0],
                    "num_heads": line["num_heads"].iloc[0], "points": len(finite),
                    "L_min": finite["seq_len"].min() if len(finite) else math.nan,
                    "L_max": finite["seq_len"].max() if len(finite) else math.nan,
                    "exponent": fit_exponent(line["seq_len"], line["value"]),
                    "value_at_L_max": largest["value"] if largest is not None else math.nan,
                    "unit": line["unit"].iloc[0],
                })
    return pd.DataFrame(out, columns=columns)


def gemm_peaks(benchmarks: Benchmarks | None) -> dict:
    """(machine, device) -> that machine's GEMM GFLOP/s: the best of Machine.track_gemm_gflops and the peaks
    measured before and after each benchmark chunk (background work only ever lowers a GEMM rate)."""
    if benchmarks is None or benchmarks.results.empty:
        return {}
    frame = benchmarks.results
    peak = frame[(frame["method"] == "track_gemm_gflops") & np.isfinite(frame["value"])]
    result = {}
    measured = [{"machine": r["machine"], "device": r.get("device") or r.get("param0") or "cpu", "gflops": r["value"]}
                for r in peak.to_dict("records")] + list(getattr(benchmarks, "peaks", []))
    for record in measured:
        key = (str(record["machine"]), str(record["device"]))
        result[key] = max(result.get(key, 0.0), float(record["gflops"]))
    return result


def peak_label(key: tuple[str, str], peaks: dict) -> str:
    """A peak's name: the device alone on one machine, "machine device" across several."""
    return key[1] if len({m for m, _ in peaks}) <= 1 else f"{key[0]} {key[1]}"


FAULT = "measurement fault: {value:.0%} of the GEMM peak (the peak was measured low); not a result"


def peak_fraction(frame: pd.DataFrame, peaks: dict) -> pd.DataFrame:
    """Per GFLOP/s benchmark and line: best and largest-L GFLOP/s, and their fraction of its machine's GEMM peak.

    A fraction above 1 cannot be a result (nothing beats the machine's GEMM); it is blanked and named a
    measurement fault in ``fault``."""
    columns = ["class", "method", "device", "machine", "series", "adapter", "mode", "num_heads", "L_max",
               "gflops_at_L_max", "best_gflops", "gemm_peak_gflops", "fraction_at_L_max", "best_fraction", "fault"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    out = []
    flops = frame[frame["method"].str.startswith("track_gflops")]
    for (klass, method), part in flops.groupby(["class", "method"], sort=True):
        for device, by_device in part.groupby("device", dropna=False):
            rows = sweep(by_device, klass, method)
            for series, line in rows.groupby("series", sort=True):
                finite = line[np.isfinite(line["value"])]
                if finite.empty:
                    continue
                machine = str(line["machine"].iloc[0])
                peak = peaks.get((machine, str(device)), math.nan)
                largest = finite.loc[finite["seq_len"].idxmax()]
                best = float(finite["value"].max())
                at_max = float(largest["value"]) / peak if peak and peak > 0 else math.nan
                best_fraction = best / peak if peak and peak > 0 else math.nan
                fault = FAULT.format(value=best_fraction) if best_fraction > 1 else ""
                out.append({
                    "class": klass, "method": method, "device": device, "machine": machine, "series": series,
                    "adapter": line["adapter"].iloc[0], "mode": line["mode"].iloc[0],
                    "num_heads": line["num_heads"].iloc[0], "L_max": largest["seq_len"],
                    "gflops_at_L_max": float(largest["value"]), "best_gflops": best, "gemm_peak_gflops": peak,
                    "fraction_at_L_max": math.nan if fault else at_max,
                    "best_fraction": math.nan if fault else best_fraction, "fault": fault,
                })
    return pd.DataFrame(out, columns=columns)


def chart_id(klass: str, device, what: str) -> str:
    """The page anchor of one chart, so a summary row can link to it."""
    return re.sub(r"[^A-Za-z0-9_-]+", "-", f"chart-{klass}-{device}-{what}")


def scaling_winners(frame: pd.DataFrame) -> pd.DataFrame:
    """Per class, device and L of the forward sweep: the fastest and the leanest line, among those measured."""
    columns = ["class", "device", "L", "fastest", "time", "leanest", "memory", "lines", "chart"]
    if frame.empty:
        return pd.DataFrame(columns=columns)
    out = {}
    for what, method in (("time", "time_forward"), ("memory", "track_peakmem_forward")):
        for (klass, device), part in frame.groupby(["class", "device"], sort=False, dropna=False):
            rows = sweep(part, klass, method)
            rows = rows[np.isfinite(rows["value"])] if not rows.empty else rows
            for length, at_length in rows.groupby("seq_len"):
                best = at_length.loc[at_length["value"].idxmin()]
                record = out.setdefault((klass, device, length), {
                    "class": klass, "device": device, "L": int(length), "fastest": "", "time": math.nan,
                    "leanest": "", "memory": math.nan, "lines": 0, "chart": chart_id(klass, device, "time")})
                record["fastest" if what == "time" else "leanest"] = best["series"]
                record[what] = float(best["value"])
                record["lines"] = max(record["lines"], int(at_length["series"].nunique()))
    table = pd.DataFrame(list(out.values()), columns=columns)
    return table.assign(_o=table["class"].map(class_rank)).sort_values(["_o", "class", "device", "L"]) \
        .drop(columns="_o").reset_index(drop=True)


def class_rank(klass: str) -> int:
    """Self, causal, cross: the order a reader meets them in; any other class after."""
    order = ("SelfAttention", "CausalSelfAttention", "CrossAttention")
    return order.index(klass) if klass in order else len(order)


def scaling_lines(scaling: pd.DataFrame, fraction: pd.DataFrame) -> pd.DataFrame:
    """Per class, device and line: fitted time and memory exponents, and the fraction of peak at the largest L."""
    columns = ["class", "device", "series", "L_max", "time_exponent", "memory_exponent", "fraction_of_peak_at_L_max",
               "fault", "chart", "kernel"]
    if scaling.empty:
        return pd.DataFrame(columns=columns)
    out = {}
    for record in scaling.to_dict("records"):
        what = {"time_forward": "time_exponent", "track_peakmem_forward": "memory_exponent"}.get(record["method"])
        if what is None:
            continue
        line = out.setdefault((record["class"], record["device"], record["series"]), {
            "class": record["class"], "device": record["device"], "series": record["series"],
            "kernel": record.get("kernel"), "L_max": math.nan,
            "time_exponent": math.nan, "memory_exponent": math.nan, "fraction_of_peak_at_L_max": math.nan,
            "fault": "", "chart": chart_id(record["class"], record["device"], "time")})
        line[what] = record["exponent"]
        line["L_max"] = np.nanmax([line["L_max"], record["L_max"]])
    for record in fraction[fraction["method"] == "track_gflops_forward"].to_dict("records") if not fraction.empty \
            else []:
        line = out.get((record["class"], record["device"], record["series"]))
        if line is not None:
            line["fraction_of_peak_at_L_max"] = record["fraction_at_L_max"]
            line["fault"] = record["fault"]
    table = pd.DataFrame(list(out.values()), columns=columns)
    return table.assign(_o=table["class"].map(class_rank)).sort_values(["_o", "class", "device", "series"]) \
        .drop(columns="_o").reset_index(drop=True)


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
