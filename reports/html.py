"""The self-contained HTML page: CSS inline, charts as data URIs, every result string escaped."""
from __future__ import annotations

import html
import math
import re

import numpy as np
import pandas as pd

from . import charts, tables
from .collect import ReportData, verdict
from .units import format_value
from mhabench.results import STATUSES

DRILL_DOWN_LIMIT = 400  # rows shown in the page; the CSV next to it has them all

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1d2329;
background:#fff}
main{max-width:1320px;margin:0 auto;padding:18px 28px 60px;overflow-x:auto}
h1{font-size:1.6em;margin:.2em 0}h2{border-bottom:2px solid #dfe3e8;padding-bottom:4px;margin-top:1.8em}
h3{margin-top:1.3em}.muted{color:#66707a}.note{background:#fff8e1;border-left:4px solid #ffb300;padding:6px 10px}
nav a{margin-right:14px}table{border-collapse:collapse;margin:8px 0;font-size:.86em}
th,td{border:1px solid #dfe3e8;padding:3px 7px;text-align:left;vertical-align:top}
th{background:#f3f5f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
td.msg{min-width:340px;max-width:620px;white-space:pre-wrap;overflow-wrap:anywhere;font-family:ui-monospace,monospace;
font-size:.92em}td.id{max-width:330px;overflow-wrap:anywhere}
.verdict{background:#eef5ff;border:1px solid #c9dcf5;padding:10px 14px;border-radius:6px}
.verdict li{margin:2px 0}
.pass{background:#d8f0d9}.fail{background:#f8d0cf}.divergence{background:#ffe2bf}
.unsupported{background:#e7e7e7}.error{background:#e9d2f0}.skip{background:#f1f4f5}.empty{background:#fff}
td.cell{min-width:88px;font-size:.92em}td.cell b{font-size:1.05em}
.regression{background:#f8d0cf}.improvement{background:#d8f0d9}.insignificant{color:#66707a}
.legend span{display:inline-block;padding:1px 8px;margin-right:6px;border:1px solid #dfe3e8}
figure{margin:10px 0}img.chart{max-width:100%;border:1px solid #eceff1}
"""

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def esc(value) -> str:
    """Text from results, made inert: control characters replaced, then HTML-escaped (quotes too)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return html.escape(_CONTROL.sub("\N{REPLACEMENT CHARACTER}", str(value)), quote=True)


def fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return ""
        if math.isinf(value):
            return "∞" if value > 0 else "-∞"
        return f"{value:.0f}" if value == int(value) and abs(value) < 1e6 else f"{value:.3g}"
    return esc(value)


def link_list(text: str) -> str:
    """Upstream references: http(s) URLs become links, anything else is shown as escaped text."""
    parts = []
    for token in str(text or "").split():
        if re.fullmatch(r"https?://[^\s\"'<>]+", token):
            parts.append(f'<a href="{esc(token)}" rel="noreferrer">{esc(token)}</a>')
        else:
            parts.append(esc(token))
    return " ".join(parts)


def table(frame: pd.DataFrame, columns=None, *, limit: int | None = None, row_class=None, cell=None,
          numeric=()) -> str:
    """A plain table; ``cell(column, value, record)`` may return ready HTML for a cell."""
    if frame is None or frame.empty:
        return '<p class="muted">(none)</p>'
    columns = list(columns or frame.columns)
    head = "".join(f"<th>{esc(c)}</th>" for c in columns)
    body = []
    records = frame.to_dict("records")
    for record in records[:limit] if limit else records:
        cls = f' class="{esc(row_class(record))}"' if row_class and row_class(record) else ""
        cells = []
        for column in columns:
            value = record.get(column)
            custom = cell(column, value, record) if cell else None
            if custom is not None:
                cells.append(custom)
            elif column in numeric or isinstance(value, (float, np.floating, int, np.integer)) \
                    and not isinstance(value, bool):
                cells.append(f'<td class="num">{fmt(value)}</td>')
            elif column in ("message", "observed", "summary", "reason"):
                cells.append(f'<td class="msg">{esc(value)}</td>')
            else:
                cells.append(f"<td>{fmt(value)}</td>")
        body.append(f"<tr{cls}>{''.join(cells)}</tr>")
    more = ""
    if limit and len(records) > limit:
        more = f'<p class="muted">{len(records) - limit} more rows in the CSV.</p>'
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>{more}"


def figure(uri: str | None, caption: str) -> str:
    if not uri:
        return ""
    return f'<figure><img class="chart" src="{uri}" alt="{esc(caption)}"><figcaption class="muted">' \
           f"{esc(caption)}</figcaption></figure>"


# --- sections -----------------------------------------------------------------------------------

def section_environment(data: ReportData) -> str:
    return "<h2 id='environment'>Environment</h2>" + table(data.environment, ["item", "value", "source"])


def section_conformance(data: ReportData) -> str:
    out = ["<h2 id='conformance'>Conformance</h2>"]
    if data.conformance is None:
        return out[0] + "<p class='note'>No conformance results (run <code>mhabench conform</code>).</p>"
    summary = data.tables["conformance_adapters"]
    out.append("<h3>Per adapter</h3>")
    out.append(figure(charts.status_chart(summary), "conformance rows per adapter, by status"))
    out.append(table(summary, ["adapter", "framework", "framework_version", *STATUSES, "total", "pass_rate",
                               "divergences"],
                     cell=lambda c, v, r: f'<td class="num">{v:.1%}</td>' if c == "pass_rate" and v == v else None))
    out.append("<h3>Matrix: adapter × area</h3>")
    out.append("<p class='legend'>" + "".join(f"<span class='{s}'>{s}</span>" for s in STATUSES)
               + " · a cell is coloured by its worst status; r = worst error ratio "
               "(|golden − impl| / |golden − reference|).</p>")
    out.append(matrix_html(data.tables["conformance_matrix"]))
    bad = data.tables["conformance_non_passing"]
    out.append(f"<h3>Rows that did not pass ({len(bad)})</h3>")
    # the row id already names adapter, case, dtype and quantity; the CSV has every column
    out.append(table(bad, ["row_id", "area", "status", "error_ratio", "max_abs_err", "divergence", "message"],
                     limit=DRILL_DOWN_LIMIT, cell=_drill_down_cell))
    return "".join(out)


def _drill_down_cell(column, value, record):
    if column == "status":
        return f'<td class="{esc(value)}">{esc(value)}</td>'
    if column in ("row_id", "divergence"):
        return f'<td class="id">{esc(value)}</td>'
    return None


def matrix_html(matrix: pd.DataFrame) -> str:
    if matrix.empty:
        return '<p class="muted">(no rows)</p>'
    areas = tables.matrix_areas(matrix)
    cells = {(r["adapter"], r["area"]): r for r in matrix.to_dict("records")}
    head = "<th>adapter</th>" + "".join(f"<th>{esc(a)}</th>" for a in areas)
    body = []
    for adapter in dict.fromkeys(matrix["adapter"]):
        row = [f"<th>{esc(adapter)}</th>"]
        for area in areas:
            record = cells.get((adapter, area))
            if record is None:
                row.append('<td class="cell empty"></td>')
                continue
            parts = [f"<b>{record['pass']}</b>/{record['total']} pass"]
            parts += [f"{record[s]} {s}" for s in STATUSES if s != "pass" and record[s]]
            ratio = record["worst_error_ratio"]
            if ratio == ratio and ratio is not None:
                parts.append(f"r={fmt(ratio)}")
            row.append(f'<td class="cell {tables.cell_state(record)}">{"<br>".join(parts)}</td>')
        body.append(f"<tr>{''.join(row)}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def section_divergences(data: ReportData) -> str:
    out = ["<h2 id='divergences'>Divergence catalogue</h2>"]
    if data.conformance is None:
        return out[0] + "<p class='muted'>No conformance results.</p>"
    catalogue = data.tables["divergences"]
    if not data.conformance.catalogue:
        out.append("<p class='muted'>The results carry no catalogue.json (an interrupted run); entries are named by "
                   "the ids recorded on the rows.</p>")
    columns = ["id", "framework", "adapters", "rows", "cases", "observed", "how", "upstream", "status"]
    out.append(table(catalogue, columns,
                     cell=lambda c, v, r: f"<td>{link_list(v)}</td>" if c == "upstream" else None))
    return "".join(out)


def section_benchmarks(data: ReportData) -> str:
    out = ["<h2 id='scaling'>Scaling</h2>"]
    if data.benchmarks is None:
        return out[0] + "<p class='note'>No benchmark results (run <code>mhabench bench</code>).</p>"
    for note in data.notes:
        out.append(f"<p class='note'>{esc(note)}</p>")
    attention = data.attention
    if attention.empty:
        out.append("<p class='muted'>No attention benchmarks in the results.</p>")
    else:
        devices = list(dict.fromkeys(attention["device"]))
        classes = list(dict.fromkeys(attention["class"]))
        for klass in classes:
            for device in devices:
                out.append(figure(charts.scaling_chart(attention, klass, ("time_forward", "time_forward_backward"),
                                                       device), f"{klass} time against L ({device})"))
                out.append(figure(charts.scaling_chart(attention, klass, ("track_peakmem_forward",
                                                                          "track_peakmem_forward_backward"), device),
                                  f"{klass} peak memory per call against L ({device})"))
        out.append("<h3>Fitted exponents</h3><p class='muted'>Least-squares slope of log(value) on log(L) over "
                   "the sweep at the default head count: 1 is O(L), 2 is O(L²).</p>")
        scaling = data.tables["scaling"].copy()
        if not scaling.empty and scaling["exponent"].isna().all():
            out.append("<p class='note'>Every sweep here has a single sequence length (the quick profile), so no "
                       "exponent can be fitted; <code>mhabench bench</code> (default profile) sweeps L.</p>")
        scaling["value_at_L_max"] = [format_value(v, u) for v, u in zip(scaling["value_at_L_max"], scaling["unit"])]
        out.append(table(scaling, ["class", "method", "device", "series", "num_heads", "points", "L_min", "L_max",
                                   "exponent", "value_at_L_max"]))
        out.append("<h3 id='heads'>Heads sweep</h3>")
        heads = [figure(charts.heads_chart(attention, klass, "time_forward"), f"{klass} time against heads")
                 for klass in classes]
        out.append("".join(heads) or "<p class='muted'>No run with more than one head count.</p>")
        out.append("<h3 id='gflops'>Throughput</h3>")
        for klass in classes:
            for device in devices:
                out.append(figure(charts.gflops_chart(attention, klass, ("track_gflops_forward",
                                                                         "track_gflops_forward_backward"),
                                                      device, data.peaks.get(str(device))),
                                  f"{klass} GFLOP/s against L ({device})"))
        peaks = ", ".join(f"{esc(d)}: {p:.1f} GFLOP/s" for d, p in data.peaks.items()) or "not measured"
        out.append(f"<p>Machine GEMM peak (Machine.track_gemm_gflops): {peaks}.</p>")
        fraction = data.tables["peak_fraction"]
        if not fraction.empty and (fraction["best_fraction"] > 1).any():
            out.append("<p class='note'>Some lines exceed 100% of the GEMM peak: the peak was measured low "
                       "(a busy machine, or a GEMM size that does not reach this machine's best); read the "
                       "fractions as relative to each other.</p>")
        out.append(table(fraction, ["class", "method", "device", "series", "L_max", "gflops_at_L_max", "best_gflops",
                                    "gemm_peak_gflops", "fraction_at_L_max", "best_fraction"],
                         cell=lambda c, v, r: f'<td class="num">{v:.1%}</td>'
                         if "fraction" in c and v == v else None))
    skips = data.tables.get("bench_skips")
    out.append(f"<h3>Skipped or failed benchmark cases ({0 if skips is None else len(skips)})</h3>")
    out.append(table(skips, limit=DRILL_DOWN_LIMIT))
    return "".join(out)


def section_comparison(data: ReportData) -> str:
    comparison = data.comparison
    if comparison is None:
        return ""
    out = [f"<h2 id='comparison'>Comparison: B / A</h2><p>A = <code>{esc(comparison.label_a)}</code>, "
           f"B = <code>{esc(comparison.label_b)}</code>. A change is flagged past ±{comparison.threshold:.0%} "
           "unless the asv 99% confidence intervals of A and B overlap (then it is marked insignificant). "
           "For GFLOP/s higher is better; for time and memory lower is better.</p>"]
    counts = comparison.table["change"].value_counts()
    out.append("<p>" + ", ".join(f"{int(n)} {esc(k)}" for k, n in counts.items()) +
               f"; {comparison.only_a} only in A, {comparison.only_b} only in B.</p>")
    shown = comparison.table.copy()
    shown["a"] = [format_value(v, u) for v, u in zip(shown["a"], shown["unit"])]
    shown["b"] = [format_value(v, u) for v, u in zip(shown["b"], shown["unit"])]
    out.append(table(shown, ["benchmark", "params", "a", "b", "ratio", "change", "better", "a_ci", "b_ci"],
                     limit=DRILL_DOWN_LIMIT,
                     row_class=lambda r: {"regression": "regression", "failed in B": "regression",
                                          "improvement": "improvement", "fixed in B": "improvement",
                                          "insignificant": "insignificant"}.get(r["change"])))
    if not comparison.conformance_changes.empty:
        out.append("<h3>Conformance rows whose status changed</h3>")
        out.append(table(comparison.conformance_changes, limit=DRILL_DOWN_LIMIT))
    return "".join(out)


def section_problems(data: ReportData) -> str:
    if not data.problems:
        return ""
    items = "".join(f"<li><code>{esc(p)}</code></li>" for p in data.problems)
    return (f"<div class='note' id='problems'><b>{len(data.problems)} line(s) of the results could not be read</b> "
            f"(left in place; their rows count as not run)<ul>{items}</ul></div>")


def render_html(data: ReportData) -> str:
    if data.comparison_only:
        sections, nav = [section_environment(data), section_comparison(data)], ["environment", "comparison"]
    else:
        sections = [section_environment(data), section_conformance(data), section_divergences(data),
                    section_benchmarks(data), section_comparison(data)]
        nav = ["environment", "conformance", "divergences", "scaling"] + (["comparison"] if data.comparison else [])
    verdict_items = "".join(f"<li>{esc(line)}</li>" for line in verdict(data))
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<title>mhabench report</title>"
        f"<style>{CSS}</style></head><body><main>"
        "<h1>mhabench: multi-head attention conformance and benchmarks</h1>"
        f"<p class='muted'>Results: <code>{esc(data.results_dir)}</code> · generated {esc(data.generated)}</p>"
        f"<nav>{''.join(f'<a href=#{n}>{n}</a>' for n in nav)}</nav>"
        f"<div class='verdict'><b>Verdict</b><ul>{verdict_items}</ul></div>"
        + section_problems(data) + "".join(sections) +
        "</main></body></html>\n"
    )
