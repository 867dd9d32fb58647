"""Compare two result sets (two commits, two machines or two framework versions).

A change is flagged, as a regression or an improvement, only when it is larger than both

- the threshold (``--threshold``, 10% by default: asv compare's default ``--factor`` of 1.1), and
- the two runs' combined noise at that point: ``NOISE_Z`` standard errors of sqrt(a² + b² + scatter²) in log
  space, counted from how far B moved from A as a whole. a and b are each run's sampling noise at the point
  (the half-width of asv's 99% interval of its median, as a standard error); how far B moved as a whole is the
  median log ratio over every benchmark of the same unit both runs measured, *other adapters' only*, and
  scatter is 1.4826 times the median absolute deviation of those log ratios. A machine busier during one run
  slows every benchmark of that run together, which no single point's interval sees; a real change of one
  adapter moves its own points away from the rest, and counted in the scatter they would hide themselves.

So a change common to every benchmark is not flagged point by point: the comparison states it (``shift``),
and says that a whole run moving together is the machine or a change common to everything. A change past
the threshold but within the noise is "within noise". Memory is judged the same way (its points carry their
spread; a compiler's exact figure has no sampling noise). GFLOP/s is the FLOPs over the time, so it is not
judged on its own: it takes its time's verdict ("follows time").
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from mhabench import results

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
    drift: dict  # unit -> Drift: how B moved from A as a whole
    bench_a: Benchmarks | None
    bench_b: Benchmarks | None
    conf_a: Conformance | None
    conf_b: Conformance | None

    @property
    def versions_changed(self) -> list[str]:
        """The framework versions that changed from A to B, as recorded by the conformance runs."""
        return version_changes(self.conf_a, self.conf_b)

    def rule(self) -> str:
        """The flagging rule in words, with how B moved from A as a whole per unit."""
        moved = "; ".join(f"{unit}: B moved {math.expm1(d.shift):+.1%} as a whole, scatter {math.expm1(d.scatter):.1%} "
                          f"over {d.benchmarks} benchmarks" for unit, d in sorted(self.drift.items()) if d.benchmarks
                          >= DRIFT_MIN_BENCHMARKS)
        return (f"a change is flagged past ±{self.threshold:.0%} and past the two runs' combined noise, "
                f"{NOISE_Z:g} standard errors of each point's sampling (its 99% interval) and of the runs' scatter, "
                f"counted from how far B moved as a whole ({moved or 'too few benchmarks to tell how B moved'}); "
                f"a change common to every benchmark is the machine or a change common to everything, not flagged "
                f"point by point; GFLOP/s follows its time")

    @property
    def regressions(self) -> pd.DataFrame:
        return self.table[self.table["change"].isin(["regression", "failed in B"])]

    @property
    def not_run_in_b(self) -> pd.DataFrame:
        """Benchmarks A measured that B did not set out to run (outside B's selection): not regressions."""
        return self.table[self.table["change"] == "not run in B"]

    @property
    def improvements(self) -> pd.DataFrame:
        return self.table[self.table["change"].isin(["improvement", "fixed in B"])]


NOISE_Z = 3.0          # standard errors a change must exceed
DRIFT_MIN_BENCHMARKS = 8  # fewer shared benchmarks of a unit tell nothing about the runs' drift
CI_Z = 2.576          # asv's interval is 99%: its half-width is this many standard errors


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


def sampling_noise(record: dict) -> float:
    """One run's noise at a point, in log space: the half-width of asv's 99% interval of the median over the
    median, as a standard error (0 where the figure carries no interval: a compiler's exact figure)."""
    value = record.get("value", math.nan)
    if not _has_interval(record) or not (math.isfinite(value) and value > 0):
        return 0.0
    reach = max(value - record["ci_low"], record["ci_high"] - value, 0.0)
    return math.log1p(reach / value) / CI_Z


@dataclass(frozen=True)
class Drift:
    """How B moved from A as a whole, for one unit, in log space: the median log ratio (``shift``) and the
    scatter of the log ratios about it (1.4826 times their median absolute deviation, a standard deviation
    for normal scatter); both 0 with too few benchmarks to tell."""

    shift: float = 0.0
    scatter: float = 0.0
    benchmarks: int = 0


def drift(log_ratios) -> Drift:
    values = np.asarray([v for v in log_ratios if math.isfinite(v)], float)
    if len(values) < DRIFT_MIN_BENCHMARKS:
        return Drift(0.0, 0.0, len(values))
    shift = float(np.median(values))
    return Drift(shift, float(1.4826 * np.median(np.abs(values - shift))), len(values))


def classify(a: dict, b: dict, factor: float, moved: Drift = Drift()) -> tuple[str, float, float, float]:
    """(change, ratio B/A, how much worse B is as a factor >= 0, the noise as a factor >= 1) for one benchmark
    present in both; ``moved``: how the two runs moved apart as a whole in this benchmark's unit."""
    value_a, value_b = a["value"], b["value"]
    if a.get("version") and b.get("version") and a["version"] != b["version"]:
        ratio = value_b / value_a if math.isfinite(value_a) and math.isfinite(value_b) and value_a else math.nan
        return "not comparable", ratio, 0.0, math.nan
    if math.isfinite(value_a) and not math.isfinite(value_b):
        return "failed in B", math.nan, math.inf, math.nan
    if not math.isfinite(value_a) and math.isfinite(value_b):
        return "fixed in B", math.nan, 0.0, math.nan
    if not (math.isfinite(value_a) and math.isfinite(value_b)):
        return "n/a in both", math.nan, 0.0, math.nan
    if value_a == 0 or value_b == 0:
        ratio = math.inf if value_a == 0 and value_b else (1.0 if value_a == value_b else 0.0)
    else:
        ratio = value_b / value_a
    worse = (1 / ratio if ratio else math.inf) if higher_is_better(a["method"]) else ratio
    improved_by = 1 / worse if worse > 0 else math.inf
    sigma = math.sqrt(sampling_noise(a) ** 2 + sampling_noise(b) ** 2 + moved.scatter ** 2)
    noise = math.exp(NOISE_Z * sigma)
    if worse <= factor and improved_by <= factor:
        return "unchanged", ratio, worse, noise
    beyond_the_run = abs(math.log(ratio) - moved.shift) if 0 < ratio < math.inf else math.inf
    if beyond_the_run <= math.log(noise):
        return "within noise", ratio, worse, noise
    return ("regression" if worse > factor else "improvement"), ratio, worse, noise


DERIVED = {"track_gflops_forward": "time_forward", "track_gflops_forward_backward": "time_forward_backward"}


def selected(bench: Benchmarks):
    """Whether a run set out to measure a benchmark (``{"benchmark", "params_key", "adapter"}``): inside the
    selection its bench/plan.json records (``--adapters``, ``--bench``), or, with no plan, an adapter of which
    it measured anything. A benchmark outside it is "not run" there, never "failed": comparing a whole run
    with a run of two adapters is not hundreds of regressions."""
    try:
        plan = results.read_json(results.Layout(Path(bench.source).parent).bench_plan)
    except (OSError, ValueError):
        plan = None
    if isinstance(plan, dict) and plan.get("adapters"):
        adapters, pattern = set(plan["adapters"]), plan.get("bench")
        return lambda record: record["adapter"] in adapters and (
            not pattern or re.search(pattern, f"{record['benchmark']}({record['params_key']})") is not None)
    measured = set(bench.results.loc[np.isfinite(bench.results["value"]), "adapter"].dropna())
    return lambda record: record["adapter"] in measured


def _adapter(record: dict):
    """The adapter a merged record measures (None for the machine's own benchmarks)."""
    value = record.get("adapter_a", record.get("adapter"))
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else value


def compare_benchmarks(bench_a: Benchmarks, bench_b: Benchmarks, threshold: float = DEFAULT_THRESHOLD):
    """The comparison table, the number measured only in A and only in B, and the drift per unit (log space)."""
    if not 0 <= threshold < 10:
        raise ValueError(f"threshold must be a fraction in [0, 10), e.g. 0.1 for 10%; got {threshold!r}")
    factor = 1.0 + threshold
    # asv keeps a slot for every grid combination; one measured on neither side is not in common
    a = bench_a.results.drop_duplicates(KEY, keep="last")
    b = bench_b.results.drop_duplicates(KEY, keep="last")
    merged = a.merge(b, on=KEY, suffixes=("_a", "_b"))
    merged = merged[np.isfinite(merged["value_a"]) | np.isfinite(merged["value_b"])]
    fields = ("value", "ci_low", "ci_high", "repeat", "method", "unit", "version")
    pairs = [({f: record[f"{f}_a"] for f in fields}, {f: record[f"{f}_b"] for f in fields}, record)
             for record in merged.to_dict("records")]
    by_unit: dict[str, list[tuple[object, float]]] = {}  # unit -> (adapter, log ratio) of every shared benchmark
    for rec_a, rec_b, record in pairs:
        if rec_a["method"] in DERIVED or not (rec_a["value"] > 0 and rec_b["value"] > 0):
            continue
        by_unit.setdefault(rec_a["unit"], []).append((_adapter(record), math.log(rec_b["value"] / rec_a["value"])))
    drifts = {unit: drift(v for _, v in values) for unit, values in by_unit.items()}
    if "GFLOP/s" in drifts:  # older results hold GFLOP/s as asv benchmarks of their own: it follows the time
        del drifts["GFLOP/s"]
    # A benchmark is judged against how the *other* adapters' benchmarks moved: a real change of one adapter moves
    # all of its points, and counted in the runs' scatter it would hide itself (a 20% slowdown of one adapter
    # out of six raised the scatter from 6.5% to 9.2% and went unflagged).
    others: dict[tuple, Drift] = {}

    def moved(unit, adapter) -> Drift:
        if unit not in drifts:
            return Drift()
        if (unit, adapter) not in others:
            rest = [v for a, v in by_unit[unit] if a != adapter]
            others[(unit, adapter)] = drift(rest) if len(rest) >= DRIFT_MIN_BENCHMARKS else drifts[unit]
        return others[(unit, adapter)]
    rows, verdicts = [], {}
    in_a, in_b = selected(bench_a), selected(bench_b)
    for rec_a, rec_b, record in pairs:
        change, ratio, worse, noise = classify(rec_a, rec_b, factor, moved(rec_a["unit"], _adapter(record)))
        record = {**record, "adapter": _adapter(record)}
        if change == "failed in B" and not in_b(record):
            change, worse = "not run in B", 0.0
        elif change == "fixed in B" and not in_a(record):
            change = "not run in A"
        verdicts[(record["benchmark"].rpartition(".")[0], rec_a["method"], record["params_key"])] = change
        rows.append({
            "benchmark": record["benchmark"], "params": record["params_key"], "method": rec_a["method"],
            "unit": rec_a["unit"], "a": rec_a["value"], "b": rec_b["value"], "ratio": ratio, "worse_by": worse,
            "noise": noise, "change": change, "a_ci": _interval(rec_a), "b_ci": _interval(rec_b),
            "better": "higher" if higher_is_better(rec_a["method"]) else "lower",
        })
    for row in rows:  # GFLOP/s takes the verdict of the time it is computed from
        timed = DERIVED.get(row["method"])
        if timed:
            found = verdicts.get((row["benchmark"].rpartition(".")[0], timed, row["params"]))
            row["change"] = f"follows time ({found})" if found else "follows time"
    common = set(map(tuple, merged[KEY].values))
    only_a = len(set(map(tuple, a.loc[np.isfinite(a["value"]), KEY].values)) - common)
    only_b = len(set(map(tuple, b.loc[np.isfinite(b["value"]), KEY].values)) - common)
    columns = ["benchmark", "params", "method", "unit", "a", "b", "ratio", "worse_by", "noise", "change", "a_ci",
               "b_ci", "better"]
    table = pd.DataFrame(rows, columns=columns)
    if not table.empty:
        table = table.sort_values(["worse_by", "benchmark", "params"], ascending=[False, True, True],
                                  na_position="last").reset_index(drop=True)
    return table, only_a, only_b, drifts


def _interval(record: dict) -> str:
    if not _has_interval(record):
        return ""
    return f"[{record['ci_low']:.4g}, {record['ci_high']:.4g}]"


CONFORMANCE_CHANGE_COLUMNS = ["row_id", "adapter", "status_a", "status_b", "framework_version_a",
                              "framework_version_b", "error_ratio_a", "error_ratio_b"]


def compare_conformance(conf_a: Conformance, conf_b: Conformance) -> pd.DataFrame:
    """Rows whose status changed between A and B (matched on row_id), each beside the framework version that
    computed it on either side: an upgrade between two nights shows next to the verdicts it changed."""
    a = conf_a.rows.dropna(subset=["row_id"]).drop_duplicates("row_id", keep="last").set_index("row_id")
    b = conf_b.rows.dropna(subset=["row_id"]).drop_duplicates("row_id", keep="last").set_index("row_id")
    common = a.index.intersection(b.index)
    changed = [r for r in common if a.at[r, "status"] != b.at[r, "status"]]
    version = lambda side, r: side.at[r, "framework_version"] if "framework_version" in side else None
    return pd.DataFrame([{"row_id": r, "adapter": b.at[r, "adapter"], "status_a": a.at[r, "status"],
                          "status_b": b.at[r, "status"], "framework_version_a": version(a, r),
                          "framework_version_b": version(b, r), "error_ratio_a": a.at[r, "error_ratio"],
                          "error_ratio_b": b.at[r, "error_ratio"]} for r in changed],
                        columns=CONFORMANCE_CHANGE_COLUMNS)


def version_changes(conf_a: Conformance | None, conf_b: Conformance | None) -> list[str]:
    """The distributions whose recorded version differs between A's and B's conformance runs (meta
    ``versions``), as "torch 2.12.1 -> 2.13.0"; "(none)" for a side that did not record it."""
    recorded = [c.meta.get("versions") if c is not None and isinstance(c.meta.get("versions"), dict) else {}
                for c in (conf_a, conf_b)]
    a, b = recorded
    return [f"{name} {a.get(name) or '(none)'} -> {b.get(name) or '(none)'}"
            for name in sorted(set(a) | set(b)) if a.get(name) != b.get(name)]


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
    table = pd.DataFrame(columns=["benchmark", "params", "method", "unit", "a", "b", "ratio", "worse_by", "noise",
                                  "change", "a_ci", "b_ci", "better"])
    only_a = only_b = 0
    drifts = {}
    if bench_a is not None and bench_b is not None:
        table, only_a, only_b, drifts = compare_benchmarks(bench_a, bench_b, threshold)
    changes = compare_conformance(conf_a, conf_b) if conf_a is not None and conf_b is not None \
        else pd.DataFrame(columns=CONFORMANCE_CHANGE_COLUMNS)
    shared_rows = (conf_a is not None and conf_b is not None
                   and len(set(conf_a.rows["row_id"].dropna()) & set(conf_b.rows["row_id"].dropna())) > 0)
    if table.empty and not shared_rows:
        raise ResultsError(f"nothing in common to compare between {path_a} and {path_b} "
                           "(no benchmark with the same parameters, no conformance row with the same id)")
    return Comparison(label_a=str(path_a), label_b=str(path_b), table=table, conformance_changes=changes,
                      threshold=threshold, only_a=only_a, only_b=only_b, drift=drifts, bench_a=bench_a, bench_b=bench_b,
                      conf_a=conf_a, conf_b=conf_b)
