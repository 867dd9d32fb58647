"""summary.md: the headline tables in Markdown (for a CI job summary or a pull request comment)."""
from __future__ import annotations

import html
import math
import re

import pandas as pd

from . import tables
from .collect import ReportData, alarms, verdict
from .units import format_value
from mhabench.results import STATUSES

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
SUMMARY_LIMIT = 30


def md(value) -> str:
    """Result text made inert in Markdown: no raw HTML, no table breaks, one line."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.3g}"
    text = _CONTROL.sub(" ", str(value))
    return html.escape(text, quote=False).replace("|", "\\|").replace("`", "\\`").replace("*", "\\*") \
        .replace("_", "\\_").replace("[", "\\[").replace("]", "\\]")


def md_code(value) -> str:
    """Result text inside a code span: one line, no backtick to end the span early."""
    return _CONTROL.sub(" ", str(value)).replace("`", "'")


def md_table(frame: pd.DataFrame, columns, formats=None, limit=None) -> str:
    if frame is None or frame.empty:
        return "_(none)_\n"
    formats = formats or {}
    lines = ["| " + " | ".join(md(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    records = frame.to_dict("records")
    for record in records[:limit] if limit else records:
        lines.append("| " + " | ".join(formats[c](record[c]) if c in formats else md(record.get(c))
                                       for c in columns) + " |")
    if limit and len(records) > limit:
        lines.append(f"\n_{len(records) - limit} more rows in the CSV._")
    return "\n".join(lines) + "\n"


def _percent(value) -> str:
    return f"{value:.1%}" if isinstance(value, float) and math.isfinite(value) else ""


def _matrix(matrix: pd.DataFrame) -> str:
    if matrix.empty:
        return "_(no rows)_\n"
    areas = tables.matrix_areas(matrix)
    cells = {(r["adapter"], r["area"]): r for r in matrix.to_dict("records")}
    lines = ["| adapter | " + " | ".join(md(a) for a in areas) + " |", "|---|" + "---|" * len(areas)]
    for adapter in dict.fromkeys(matrix["adapter"]):
        row = []
        for area in areas:
            record = cells.get((adapter, area))
            if record is None:
                row.append("")
                continue
            extra = ", ".join(f"{record[s]} {s}" for s in STATUSES if s != "pass" and record[s])
            row.append(f"{record['pass']}/{record['total']}" + (f" ({extra})" if extra else ""))
        lines.append(f"| {md(adapter)} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _failures(data: ReportData) -> list[str]:
    failures = data.tables["failures"]
    out = [f"### Failures and errors ({len(failures)})", ""]
    if failures.empty:
        return out + ["None.", ""]
    for record in failures.head(SUMMARY_LIMIT).to_dict("records"):
        where = f" on {md(record['machine'])}" if data.conformance.rows["machine"].nunique() > 1 else ""
        out.append(f"- **{md(record['status'])}** {md(record['row_id'])}{where}: {md(record['message'])}  ")
        out.append(f"  rerun: `{md_code(record['rerun'])}`")
    if len(failures) > SUMMARY_LIMIT:
        out.append(f"\n_{len(failures) - SUMMARY_LIMIT} more in failures.csv._")
    return out + [""]


def _divergences(data: ReportData) -> list[str]:
    table = data.tables["divergences"]
    stale, shown = table[table["status"] == "stale"], table[table["rows"] > 0]
    out = []
    if not stale.empty:
        out += [f"### Stale catalogue entries ({len(stale)})", ""]
        out += [f"- **{md(r['id'])}**: {md(r['message'])}" for r in stale.to_dict("records")] + [""]
    out += [f"## Known divergences ({len(shown)} entries, {int(shown['rows'].sum())} rows)", ""]
    for kind, title, part in tables.by_kind(shown):
        out += [f"### {title} ({len(part)} entries)", ""]
        for r in part.to_dict("records"):
            upstream = f" ({md(r['upstream'])})" if r["upstream"] else ""
            error = tables.error_text(r["largest_err"], r["largest_nonfinite"])
            out.append(f"- **{md(r['id'])}** (largest error {md(error)}; "
                       f"{r['rows']} rows): affects {md(r['affected'])}. {md(r['observed'])}{upstream}")
        out.append("")
    not_run = data.tables["not_run"]
    out += [f"### Unsupported or skipped, by reason ({int(not_run['rows'].sum()) if not not_run.empty else 0} rows)",
            "", md_table(not_run, ["status", "rows", "adapters", "reason"], limit=SUMMARY_LIMIT)]
    return out


def _kernels(data: ReportData) -> list[str]:
    kernels = data.tables.get("kernel_matrix")
    if kernels is None or kernels.empty or set(kernels["feature"]) == {"classic"}:
        return []
    return ["### Kernels × modern features (rows by status)", "",
            md_table(kernels, ["adapter", "kernel", "feature", *STATUSES, "total"])]


def _agreement(data: ReportData) -> list[str]:
    agreement = data.tables.get("agreement")
    if agreement is None or agreement.empty:
        return []
    adapters = sorted(set(agreement["adapter_a"]) | set(agreement["adapter_b"]))
    cells = {}
    for r in agreement.to_dict("records"):
        text = f"≤{r['upper_tol']:.2g} (n={r['compared']})" if r["compared"] else "n=0"
        if r["divergences"]:
            text += "; " + md(r["divergences"])
        cells[(r["adapter_a"], r["adapter_b"])] = cells[(r["adapter_b"], r["adapter_a"])] = text
    lines = ["## Frameworks side by side", "",
             "Upper bound of max\\|a − b\\| over the computations both adapters judged against the golden, in "
             "units of the row's tolerance (triangle inequality over each row's max\\|impl − golden\\|; ≤ 1 "
             "means they agree within the tolerance); catalogued divergences named. agreement.csv has the lower "
             "bound and the computation that differs most.", "",
             "| | " + " | ".join(md(a) for a in adapters) + " |", "|---|" + "---|" * len(adapters)]
    for a in adapters:
        lines.append(f"| {md(a)} | " + " | ".join("—" if a == b else cells.get((a, b), "") for b in adapters) + " |")
    return lines + [""]


def _machines(data: ReportData) -> list[str]:
    matrix, facts = data.tables["machines"], data.tables.get("machine_facts")
    out = []
    if facts is not None and not facts.empty:
        out += ["### What chose the kernels", "", md_table(facts, list(facts.columns)),
                md_table(data.tables["kernel_facts"], ["machine", "adapter", "facts", "rows"])]
    if len(matrix[["machine", "device"]].drop_duplicates()) < 2:
        return ["## Machines", "", *out] if out else []
    cross = data.tables["cross_machine"]
    return ["## Machines", "", *out, f"### The same adapter and case, a different verdict per machine ({len(cross)})",
            "", md_table(cross, list(cross.columns), limit=SUMMARY_LIMIT), "### Per machine × device", "",
            md_table(matrix, list(matrix.columns))]


def _version_changes(data: ReportData) -> list[str]:
    if not data.tables["conformance_adapters"]["adapter"].duplicated().any():
        return []
    changes = data.tables["version_changes"]
    return [f"### The same adapter and case, a different verdict per framework version ({len(changes)})", "",
            md_table(changes, list(changes.columns), limit=SUMMARY_LIMIT) if not changes.empty else
            "Every version gives the same verdict on every case.", ""]


def _portability(data: ReportData) -> list[str]:
    settings, changes = data.tables.get("portability"), data.tables.get("portability_changes")
    if settings is None or settings.empty:
        return []
    return ["## Portability: verdicts that depend on the machine", "",
            "Each kernel switch setting run on this machine (`mhabench conform --switches`): rows whose verdict "
            "differs from the machine's own choice.", "",
            md_table(settings, ["machine", "switch", "setting", "rows", "changed", "fail", "error", "stale",
                                "changed_by_adapter"]),
            md_table(changes, ["machine", "switch", "setting", "row_id", "own_choice", "switched", "facts"],
                     limit=SUMMARY_LIMIT)]


def _scaling(data: ReportData) -> list[str]:
    winners, lines = data.tables["scaling_winners"], data.tables["scaling_lines"]
    exponent = lambda v: f"{v:.2f}" if isinstance(v, float) and math.isfinite(v) else ""
    shown = lines.assign(fraction_of_peak_at_L_max=[md(f) if f else _percent(v) for v, f in
                                                    zip(lines["fraction_of_peak_at_L_max"], lines["fault"])])
    return ["## Scaling summary", "",
            md_table(winners.assign(time=[format_value(v, "seconds") for v in winners["time"]],
                                    memory=[format_value(v, "bytes") for v in winners["memory"]]),
                     ["class", "device", "L", "fastest", "time", "leanest", "memory"]),
            md_table(shown, ["class", "device", "series", "kernel", "time_exponent", "time_fit", "memory_exponent",
                             "memory_fit", "fraction_of_peak_at_L_max", "implausible"],
                     {"time_exponent": exponent, "memory_exponent": exponent})]


def _accuracy(data: ReportData) -> list[str]:
    lines = data.tables.get("accuracy_lines")
    if lines is None or lines.empty:
        return []
    error = lambda v: f"{v:.3g}" if isinstance(v, float) and math.isfinite(v) else ""
    exponent = lambda v: f"{v:.2f}" if isinstance(v, float) and math.isfinite(v) else ""
    lines = lines.sort_values("ratio_rms_error", ascending=False)  # the worst against a plain implementation first
    return ["## Accuracy at the largest length (error against the float64 oracle), worst ratio first", "",
            "rms_error is the RMS error, max_rel_error the largest error over the output's largest magnitude; "
            "ratio_rms_error is the RMS error over the same-precision reference's (the oracle rounded in the dtype): "
            "above 1, worse than a plain implementation in that dtype. Exponents of L over the three largest "
            "lengths.", "",
            md_table(lines, ["class", "dtype", "rank", "series", "L_max", "max_rel_error", "rms_error",
                             "ratio_rms_error", "exponent", "reference_exponent", "grows_faster"],
                     {c: error for c in ("max_rel_error", "rms_error", "ratio_rms_error")}
                     | {c: exponent for c in ("exponent", "reference_exponent")}, limit=SUMMARY_LIMIT)]


def render_markdown(data: ReportData) -> str:
    out = ["# mhabench summary", "", f"Results: `{md(data.results_dir)}`, generated {md(data.generated)}", ""]
    red = alarms(data)
    out += [f"- **RED: {md(line)}**" for line in red]
    if not red and data.conformance is not None and not data.comparison_only:
        out.append("- **green: no fail or error rows, no stale catalogue entries**")
    out += [f"- {md(line)}" for line in verdict(data)] + [""]
    if data.problems:
        out += ["## Unreadable lines", ""] + [f"- `{md_code(p)}`" for p in data.problems] + [""]
    env = data.environment
    if not env.empty:
        keep = env[env["item"].isin(["machine", "created", "commit", "python", "platform", "cpu", "gpu",
                                     "bench machine", "bench cpu"]) | env["item"].str.startswith("version: ")]
        out += ["## Environment", "", md_table(keep, ["item", "value", "source"])]
    if data.comparison_only:
        pass
    elif data.conformance is not None:
        out += ["## Conformance", "",
                md_table(data.tables["conformance_adapters"], ["adapter", "kernel", "framework_version", *STATUSES,
                                                              "pass_rate", "divergences"], {"pass_rate": _percent}),
                *_version_changes(data),
                "### Adapter × area (pass/total)", "", _matrix(data.tables["conformance_matrix"]),
                *_kernels(data),
                "## What did not pass", ""]
        out += _failures(data) + _divergences(data) + _agreement(data) + _machines(data) + _portability(data)
    else:
        out += ["## Conformance", "", "No conformance results.", ""]
    if data.benchmarks is not None and not data.attention.empty:
        out += _scaling(data)
        scaling = data.tables["scaling"]
        exps = scaling[scaling["method"].isin(["time_forward", "track_peakmem_forward"])]
        shown = exps.assign(value_at_L_max=[format_value(v, u) for v, u in zip(exps["value_at_L_max"], exps["unit"])])
        out += ["## Scaling (exponent of L, fitted over the three largest lengths)", "",
                md_table(shown, ["class", "method", "series", "L_max", "exponent", "value_at_L_max"],
                         {"exponent": lambda v: f"{v:.2f}" if math.isfinite(v) else "",
                          "L_max": lambda v: f"{v:.0f}" if math.isfinite(v) else ""})]
        peaks = ", ".join(f"{md(tables.peak_label(k, data.peaks))} {p:.1f} GFLOP/s" for k, p in data.peaks.items()) \
            or "not measured"
        fraction = data.tables["peak_fraction"]
        out += [f"## Fraction of GEMM peak ({peaks})", "",
                "A fraction above 100% is a measurement fault (the peak was measured low), not a result.", "",
                md_table(fraction, ["class", "method", "series", "best_gflops", "best_fraction", "fraction_at_L_max",
                                    "fault"], {"best_fraction": _percent, "fraction_at_L_max": _percent})]
    elif data.benchmarks is None and not data.comparison_only:
        out += ["## Benchmarks", "", "No benchmark results.", ""]
    if not data.comparison_only:
        out += _accuracy(data)
    if data.comparison is not None:
        comparison = data.comparison
        flagged = comparison.table[comparison.table["change"].isin(["regression", "failed in B", "improvement",
                                                                   "fixed in B"])]
        out += [f"## Comparison B/A (threshold ±{comparison.threshold:.0%} and the runs' noise)", "",
                f"A = `{md(comparison.label_a)}`, B = `{md(comparison.label_b)}`: "
                f"{len(comparison.regressions)} regressions, {len(comparison.improvements)} improvements; "
                f"{md(comparison.rule())}.", "",
                md_table(flagged, ["change", "benchmark", "params", "ratio", "noise"],
                         {"ratio": lambda v: f"{v:.2f}" if math.isfinite(v) else "n/a",
                          "noise": lambda v: f"{v:.2f}" if math.isfinite(v) else ""}, limit=SUMMARY_LIMIT)]
    return "\n".join(out).rstrip() + "\n"
