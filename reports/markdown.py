"""summary.md: the headline tables in Markdown (for a CI job summary or a pull request comment)."""
from __future__ import annotations

import html
import math
import re

import pandas as pd

from . import tables
from .collect import ReportData, verdict
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


def render_markdown(data: ReportData) -> str:
    out = ["# mhabench summary", "", f"Results: `{md(data.results_dir)}`, generated {md(data.generated)}", ""]
    out += [f"- {md(line)}" for line in verdict(data)] + [""]
    env = data.environment
    if not env.empty:
        keep = env[env["item"].isin(["created", "commit", "python", "platform", "cpu", "gpu", "bench machine",
                                     "bench cpu"]) | env["item"].str.startswith("version: ")]
        out += ["## Environment", "", md_table(keep, ["item", "value"])]
    if data.comparison_only:
        pass
    elif data.conformance is not None:
        out += ["## Conformance", "",
                md_table(data.tables["conformance_adapters"], ["adapter", "framework_version", *STATUSES, "pass_rate",
                                                              "divergences"], {"pass_rate": _percent}),
                "### Adapter × area (pass/total)", "", _matrix(data.tables["conformance_matrix"])]
        divergences = data.tables["divergences"]
        out += ["## Known divergences", "",
                md_table(divergences, ["id", "adapters", "rows", "summary", "upstream", "reproduced"])]
    else:
        out += ["## Conformance", "", "No conformance results.", ""]
    if data.benchmarks is not None and not data.attention.empty:
        scaling = data.tables["scaling"]
        exps = scaling[scaling["method"].isin(["time_forward", "track_peakmem_forward"])]
        shown = exps.assign(value_at_L_max=[format_value(v, u) for v, u in zip(exps["value_at_L_max"], exps["unit"])])
        out += ["## Scaling (fitted exponent of L)", "",
                md_table(shown, ["class", "method", "series", "L_max", "exponent", "value_at_L_max"],
                         {"exponent": lambda v: f"{v:.2f}" if math.isfinite(v) else "",
                          "L_max": lambda v: f"{v:.0f}" if math.isfinite(v) else ""})]
        peaks = ", ".join(f"{md(d)} {p:.1f} GFLOP/s" for d, p in data.peaks.items()) or "not measured"
        out += [f"## Fraction of GEMM peak ({peaks})", "",
                md_table(data.tables["peak_fraction"],
                         ["class", "method", "series", "best_gflops", "best_fraction", "fraction_at_L_max"],
                         {"best_fraction": _percent, "fraction_at_L_max": _percent})]
    elif data.benchmarks is None and not data.comparison_only:
        out += ["## Benchmarks", "", "No benchmark results.", ""]
    if data.comparison is not None:
        comparison = data.comparison
        flagged = comparison.table[comparison.table["change"].isin(["regression", "failed in B", "improvement",
                                                                   "fixed in B"])]
        out += [f"## Comparison B/A (threshold ±{comparison.threshold:.0%}, CI-aware)", "",
                f"A = `{md(comparison.label_a)}`, B = `{md(comparison.label_b)}`: "
                f"{len(comparison.regressions)} regressions, {len(comparison.improvements)} improvements.", "",
                md_table(flagged, ["change", "benchmark", "params", "ratio"],
                         {"ratio": lambda v: f"{v:.2f}" if math.isfinite(v) else "n/a"}, limit=SUMMARY_LIMIT)]
    return "\n".join(out).rstrip() + "\n"
