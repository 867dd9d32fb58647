"""Compare two result sets (two commits, two machines or two framework versions).

The flagging mirrors ``asv compare``: a change counts when B is worse (or
better) than A by more than ``factor`` AND, where both sides carry asv's 99%
confidence intervals from more than one repeat, those intervals do not
overlap. A change past the factor whose intervals overlap is shown as
"insignificant" rather than flagged.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .load import Benchmarks, Conformance, ResultsError, load_benchmarks, load_conformance

DEFAULT_THRESHOLD = 0.10
KEY = ["benchmark", "params_key"]


@dataclass
class Comparison:
    label_a: str
    label_b: str
    table: pd.DataFrame  # one row per benchmark x params present in both
    conformance_changes: pd.DataFrame
    threshold: float
    only_a: int
    only_b: int
    bench_a: Benchmarks | None
    bench_b: Benchmarks | None
    conf_a: Conformance | None
    conf_b: Conformance | None

    @property
    def regressions(self) -> pd.DataFrame:
        return self.table[self.table["change"].isin(["regression", "failed in B"])]

    @property
    def improvements(self) -> pd.DataFrame:
        return self.table[self.table["change"].isin(["improvement", "fixed in B"])]


def higher_is_better(method: str) -> bool:
    return "gflops" in method


def _has_interval(record: dict) -> bool:
    repeat = record.get("repeat")
    try:
        single = repeat is not None and not (isinstance(repeat, float) and math.isnan(repeat)) and int(repeat) == 1
    except (TypeError, ValueError):
        single = False
    return (not single) and math.isfinite(record.get("ci_low", math.nan)) \
        and math.isfinite(record.get("ci_high", math.nan))


def intervals_overlap(a: dict, b: dict) -> bool | None:
    """True/False when both sides have confidence intervals, None when either lacks them."""
    if not (_has_interval(a) and _has_interval(b)):
        return None
    return a["ci_high"] >= b["ci_low"] and a["ci_low"] <= b["ci_high"]


def classify(a: dict, b: dict, factor: float) -> tuple[str, float, float]:
    """(change, ratio B/A, how much worse B is as a factor >= 0) for one benchmark present in both."""
    value_a, value_b = a["value"], b["value"]
    if a.get("version") and b.get("version") and a["version"] != b["version"]:
        ratio = value_b / value_a if math.isfinite(value_a) and math.isfinite(value_b) and value_a else math.nan
        return "not comparable", ratio, 0.0
    if math.isfinite(value_a) and not math.isfinite(value_b):
        return "failed in B", math.nan, math.inf
    if not math.isfinite(value_a) and math.isfinite(value_b):
        return "fixed in B", math.nan, 0.0
    if not (math.isfinite(value_a) and math.isfinite(value_b)):
        return "n/a in both", math.nan, 0.0
    if value_a == 0 or value_b == 0:
        ratio = math.inf if value_a == 0 and value_b else (1.0 if value_a == value_b else 0.0)
    else:
        ratio = value_b / value_a
    worse = (1 / ratio if ratio else math.inf) if higher_is_better(a["method"]) else ratio
    improved_by = 1 / worse if worse > 0 else math.inf
    if worse <= factor and improved_by <= factor:
        return "unchanged", ratio, worse
    if intervals_overlap(a, b):
        return "insignificant", ratio, worse
    return ("regression" if worse > factor else "improvement"), ratio, worse


def compare_benchmarks(bench_a: Benchmarks, bench_b: Benchmarks, threshold: float = DEFAULT_THRESHOLD):
    if not 0 <= threshold < 10:
        raise ValueError(f"threshold must be a fraction in [0, 10), e.g. 0.1 for 10%; got {threshold!r}")
    factor = 1.0 + threshold
    # asv keeps a slot for every grid combination; one measured on neither side is not in common
    a = bench_a.results.drop_duplicates(KEY, keep="last")
    b = bench_b.results.drop_duplicates(KEY, keep="last")
    merged = a.merge(b, on=KEY, suffixes=("_a", "_b"))
    merged = merged[np.isfinite(merged["value_a"]) | np.isfinite(merged["value_b"])]
    fields = ("value", "ci_low", "ci_high", "repeat", "method", "unit", "version")
    rows = []
    for record in merged.to_dict("records"):
        rec_a = {f: record[f"{f}_a"] for f in fields}
        rec_b = {f: record[f"{f}_b"] for f in fields}
        change, ratio, worse = classify(rec_a, rec_b, factor)
        rows.append({
            "benchmark": record["benchmark"], "params": record["params_key"], "method": rec_a["method"],
            "unit": rec_a["unit"], "a": rec_a["value"], "b": rec_b["value"], "ratio": ratio, "worse_by": worse,
            "change": change, "a_ci": _interval(rec_a), "b_ci": _interval(rec_b),
            "better": "higher" if higher_is_better(rec_a["method"]) else "lower",
        })
    common = set(map(tuple, merged[KEY].values))
    only_a = len(set(map(tuple, a.loc[np.isfinite(a["value"]), KEY].values)) - common)
    only_b = len(set(map(tuple, b.loc[np.isfinite(b["value"]), KEY].values)) - common)
    columns = ["benchmark", "params", "method", "unit", "a", "b", "ratio", "worse_by", "change", "a_ci", "b_ci",
               "better"]
    table = pd.DataFrame(rows, columns=columns)
    if not table.empty:
        table = table.sort_values(["worse_by", "benchmark", "params"], ascending=[False, True, True],
                                  na_position="last").reset_index(drop=True)
    return table, only_a, only_b


def _interval(record: dict) -> str:
    if not _has_interval(record):
        return ""
    return f"[{record['ci_low']:.4g}, {record['ci_high']:.4g}]"


def compare_conformance(conf_a: Conformance, conf_b: Conformance) -> pd.DataFrame:
    """Rows whose status changed between A and B (matched on row_id)."""
    columns = ["row_id", "adapter", "status_a", "status_b", "error_ratio_a", "error_ratio_b"]
    a = conf_a.rows.dropna(subset=["row_id"]).drop_duplicates("row_id", keep="last").set_index("row_id")
    b = conf_b.rows.dropna(subset=["row_id"]).drop_duplicates("row_id", keep="last").set_index("row_id")
    common = a.index.intersection(b.index)
    changed = [r for r in common if a.at[r, "status"] != b.at[r, "status"]]
    return pd.DataFrame([{"row_id": r, "adapter": b.at[r, "adapter"], "status_a": a.at[r, "status"],
                          "status_b": b.at[r, "status"], "error_ratio_a": a.at[r, "error_ratio"],
                          "error_ratio_b": b.at[r, "error_ratio"]} for r in changed], columns=columns)


def _load_side(path: Path, label: str):
    path = Path(path)
    if not path.exists():
        raise ResultsError(f"{label} {path} does not exist")
    bench = load_benchmarks(path)
    conf = load_conformance(path) if path.is_dir() else None
    if bench is not None and bench.runs["machine"].nunique() > 1:
        machines = ", ".join(sorted(bench.runs["machine"]))
        raise ResultsError(f"{label} {path} holds results of several machines ({machines}); "
                           "name one machine's directory or result file")
    if bench is None and conf is None:
        raise ResultsError(f"{label} {path} holds no asv results and no conformance results")
    return bench, conf


def compare(path_a: Path, path_b: Path, threshold: float = DEFAULT_THRESHOLD) -> Comparison:
    bench_a, conf_a = _load_side(path_a, "A")
    bench_b, conf_b = _load_side(path_b, "B")
    table = pd.DataFrame(columns=["benchmark", "params", "method", "unit", "a", "b", "ratio", "worse_by", "change",
                                  "a_ci", "b_ci", "better"])
    only_a = only_b = 0
    if bench_a is not None and bench_b is not None:
        table, only_a, only_b = compare_benchmarks(bench_a, bench_b, threshold)
    changes = compare_conformance(conf_a, conf_b) if conf_a is not None and conf_b is not None \
        else pd.DataFrame(columns=["row_id", "adapter", "status_a", "status_b", "error_ratio_a", "error_ratio_b"])
    shared_rows = (conf_a is not None and conf_b is not None
                   and len(set(conf_a.rows["row_id"].dropna()) & set(conf_b.rows["row_id"].dropna())) > 0)
    if table.empty and not shared_rows:
        raise ResultsError(f"nothing in common to compare between {path_a} and {path_b} "
                           "(no benchmark with the same parameters, no conformance row with the same id)")
    return Comparison(label_a=str(path_a), label_b=str(path_b), table=table, conformance_changes=changes,
                      threshold=threshold, only_a=only_a, only_b=only_b, bench_a=bench_a, bench_b=bench_b,
                      conf_a=conf_a, conf_b=conf_b)
