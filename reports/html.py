"""The self-contained HTML page: CSS inline, charts as data URIs, every result string escaped."""
from __future__ import annotations

import html
import math
import re

import numpy as np
import pandas as pd

from . import charts, tables
from .collect import ReportData, alarms, verdict
from .units import format_value
from mhabench import plausibility, results
from mhabench.results import STATUSES

DRILL_DOWN_LIMIT = 400  # rows shown in the page; the CSV next to it has them all
ENTRY_ROWS = 12  # a divergence entry with more rows shows them grouped (adapter, area, dtype), counted

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
.verdict li{margin:2px 0}.verdict.red{background:#fdecea;border:2px solid #c62828}
.verdict li.alarm{color:#b71c1c;font-weight:600}.verdict li.green{color:#1b5e20;font-weight:600}
.pass{background:#d8f0d9}.fail{background:#f8d0cf}.divergence{background:#ffe2bf}
.unsupported{background:#e7e7e7}.error{background:#e9d2f0}.skip{background:#f1f4f5}.empty{background:#fff}
td.cell{min-width:88px;font-size:.92em}td.cell b{font-size:1.05em}
.regression{background:#f8d0cf}.improvement{background:#d8f0d9}.insignificant{color:#66707a}
.legend span{display:inline-block;padding:1px 8px;margin-right:6px;border:1px solid #dfe3e8}
figure{margin:10px 0}img.chart{max-width:100%;border:1px solid #eceff1}
details.fg,details{margin:4px 0;border:1px solid #dfe3e8;border-radius:4px;padding:4px 8px}
summary{cursor:pointer}.observed{color:#3d4650;font-size:.9em}.affected{color:#1f3b57;font-size:.9em}h4.kind{margin:1.1em 0 .3em;border-bottom:1px solid #d0d7de}.fault{background:#fff3e0;color:#8a4b00}
.filters{position:sticky;top:0;background:#f8fafc;border:1px solid #dfe3e8;padding:6px 10px;z-index:1}
.filters label{margin-right:12px}.filters button{border:1px solid #b0bac4;border-radius:10px;margin:0 2px;
padding:1px 8px;cursor:pointer}.filters button[aria-pressed=false]{opacity:.35;text-decoration:line-through}
table.sortable th{cursor:pointer}th[data-sort=asc]:after{content:" ▲"}th[data-sort=desc]:after{content:" ▼"}
.rerun{margin-top:4px;color:#3d4650}.rerun code{background:#f3f5f7;padding:0 3px}
tr:target{outline:2px solid #1e88e5}table.agree td.cell{max-width:220px}.why{font-size:.85em}
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


def figure(uri: str | None, caption: str, anchor: str | None = None) -> str:
    if not uri:
        return ""
    where = f' id="{esc(anchor)}"' if anchor else ""
    return f'<figure{where}><img class="chart" src="{uri}" alt="{esc(caption)}"><figcaption class="muted">' \
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
    out.append(table(summary, ["adapter", "kernel", "framework", "framework_version", *STATUSES, "total",
                               "pass_rate", "divergences", *(["machines"] if _machines(data) > 1 else [])],
                     cell=lambda c, v, r: f'<td class="num">{v:.1%}</td>' if c == "pass_rate" and v == v else None))
    changes = data.tables.get("version_changes")
    if summary["adapter"].duplicated().any():
        out.append(f"<h3 id='version-changes'>The same adapter and case, a different verdict per framework version "
                   f"({len(changes)})</h3><p class='muted'>The results hold rows of an adapter computed by several "
                   "versions of its framework: each version's rows are kept, with a line per version above. Here, "
                   "the rows whose verdict differs between versions on one machine and device; between machines, "
                   "the Machines section names the versions in <code>differs</code>.</p>")
        out.append(table(changes, limit=DRILL_DOWN_LIMIT, row_class=None) if not changes.empty else
                   "<p class='muted'>Every version gives the same verdict on every case.</p>")
    out.append("<h3>Matrix: adapter × area</h3>")
    out.append("<p class='legend'>" + "".join(f"<span class='{s}'>{s}</span>" for s in STATUSES)
               + " · a cell is coloured by its worst status; r = worst error ratio "
               "(|golden − impl| / |golden − reference|)"
               + (", over every machine" if _machines(data) > 1 else "") + ".</p>")
    out.append(matrix_html(data.tables["conformance_matrix"]))
    kernels = data.tables.get("kernel_matrix")
    if kernels is not None and not kernels.empty:
        out.append("<h3 id='kernels'>Kernels × modern features</h3><p class='muted'>Per adapter (a kernel variant "
                   "is its own adapter, <code>name+kernel</code>; <code>default</code> lets the framework choose): the "
                   "rows that use each modern feature, by status (a row using several counts under each; "
                   "<code>classic</code> uses none).</p>")
        out.append(table(kernels, ["adapter", "kernel", "feature", *STATUSES, "total"]))
    return "".join(out)


def _machines(data: ReportData) -> int:
    return data.conformance.rows["machine"].nunique() if data.conformance is not None else 0


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


# --- the drill-down: what did not pass, most important first ----------------------------------------

FILTERS = ("machine", "adapter", "area", "dtype")


def _data_attrs(record: dict, count: int | None = None) -> str:
    """The attributes the filter script reads (one per filter, and the row's status)."""
    attrs = "".join(f' data-{k}="{esc(record.get(k))}"' for k in (*FILTERS, "status"))
    return attrs + (f' data-n="{count}"' if count is not None else "")


def _row(record: dict, columns, count=None, cell=None, filterable=True, anchor=None) -> str:
    cells = []
    for column in columns:
        value = record.get(column)
        custom = cell(column, value, record) if cell else None
        if custom is not None:
            cells.append(custom)
        elif isinstance(value, (float, np.floating, int, np.integer)) and not isinstance(value, bool):
            number = "" if value != value else f' data-v="{float(value)!r}"'
            cells.append(f'<td class="num"{number}>{fmt(value)}</td>')
        elif column in ("message", "observed", "reason"):
            cells.append(f'<td class="msg">{esc(value)}</td>')
        else:
            cells.append(f"<td>{fmt(value)}</td>")
    attrs = f' class="f"{_data_attrs(record, count)}' if filterable else ""
    attrs += f' id="{anchor}"' if anchor else ""
    return f'<tr{attrs}>{"".join(cells)}</tr>'


def _sortable(columns, rows_html: list[str], total: int, csv: str) -> str:
    head = "".join(f'<th title="sort">{esc(c)}</th>' for c in columns)
    more = f'<p class="muted">{total - len(rows_html)} more rows in {esc(csv)}.</p>' if total > len(rows_html) else ""
    return f"<table class='sortable'><thead><tr>{head}</tr></thead><tbody>{''.join(rows_html)}</tbody></table>{more}"


def filter_bar(data: ReportData) -> str:
    """Selects and status toggles; hidden until the script runs, so the page reads the same without it."""
    rows = data.conformance.rows
    bad = rows[rows["status"] != "pass"]
    selects = []
    for name in FILTERS:
        values = sorted(set(bad[name].dropna().astype(str))) if name in bad else []
        if len(values) < 2:
            continue
        options = "".join(f'<option value="{esc(v)}">{esc(v)}</option>' for v in values)
        selects.append(f'<label>{name} <select name="{name}"><option value="">all</option>{options}</select></label>')
    counts = bad["status"].value_counts()
    chips = "".join(f'<button type="button" class="{s}" data-status="{s}" aria-pressed="true">{s} '
                    f'{int(counts[s])}</button>' for s in PROBLEM_ORDER if counts.get(s))
    return (f"<div id='filters' class='filters' hidden>{''.join(selects)} <span>status {chips}</span> "
            f"<span id='fcount' class='muted'></span></div>")


PROBLEM_ORDER = ("error", "fail", "divergence", "unsupported", "skip")


def section_drill_down(data: ReportData) -> str:
    out = ["<h2 id='drill-down'>What did not pass</h2>"]
    if data.conformance is None:
        return out[0] + "<p class='muted'>No conformance results.</p>"
    out.append("<p class='muted'>Most important first: failures and errors one by one, then one line per "
               "catalogued divergence (click to expand its rows), grouped by what it means to a model porter (a different "
               "answer first, then reduced precision, non-finite handling, rows with no allowed key) and largest "
               "error first, then what could not run, grouped by reason. "
               "Click a column heading to sort; every row is in the CSV next to this page.</p>")
    out.append(filter_bar(data))
    rows = data.conformance.rows
    failures = data.tables["failures"]
    out.append(f"<h3 id='failures'>Failures and errors ({len(failures)})</h3>")
    if failures.empty:
        out.append("<p class='pass-note'>No row failed and no adapter raised an error.</p>")
    else:
        left_out = ("rerun", "message", "adapter", "device", "case", "quantity") + \
            (("machine",) if _machines(data) < 2 else ())  # the row id names adapter, case and quantity
        columns = [c for c in failures.columns if c not in left_out]
        columns.append("message")
        shown = failures.head(DRILL_DOWN_LIMIT).to_dict("records")
        out.append(_sortable(columns, [_row(r, columns, cell=_failure_cell) for r in shown], len(failures),
                             "failures.csv"))
    divergences = data.tables["divergences"]
    stale = divergences[divergences["status"] == "stale"]
    if not stale.empty:
        out.append(f"<h3 id='stale'>Stale catalogue entries ({len(stale)})</h3><p>A stale entry no longer "
                   "describes what its framework does (fixed upstream, or different now): update the catalogue.</p>")
        out.append(table(stale, ["id", "adapters", "rows", "message", "upstream"],
                         cell=lambda c, v, r: f"<td>{link_list(v)}</td>" if c == "upstream" else None))
    shown_entries = divergences[divergences["rows"] > 0]
    out.append(f"<h3 id='divergences'>Catalogued divergences ({len(shown_entries)} entries, "
               f"{int(shown_entries['rows'].sum())} rows)</h3>")
    if not shown_entries.empty:
        linked = int(shown_entries["upstream"].fillna("").astype(bool).sum())
        out.append(f"<p>{linked} of these {len(shown_entries)} entries link an upstream report; the other "
                   f"{len(shown_entries) - linked} have none filed that we know of.</p>")
    if not data.conformance.catalogue:
        out.append("<p class='muted'>The results carry no catalogue.json (an interrupted run); entries are named by "
                   "the ids recorded on the rows.</p>")
    groups = dict(list(rows[rows["divergence"].notna()].groupby("divergence", sort=False)))
    columns = ["row_id", *(["machine"] if _machines(data) > 1 else []), "device", "dtype", "quantity",
               *tables.present(rows, tables.OPTIONAL), "error_ratio", "max_abs_err"]
    for kind, title, part in tables.by_kind(shown_entries):
        out.append(f"<h4 class='kind' id='{_anchor('kind', kind or 'none')}'>{esc(title)} ({len(part)} entries, "
                   f"{int(part['rows'].sum())} rows)</h4>")
        out += [_divergence_entry(entry, groups.get(entry["id"], rows.iloc[0:0]), columns, data)
                for entry in part.to_dict("records")]
    absent = divergences[(divergences["rows"] == 0) & (divergences["status"] != "stale")]
    absent = divergences[(divergences["rows"] == 0) & (divergences["status"] != "stale")]
    if not absent.empty:
        out.append(f"<details><summary>{len(absent)} catalogue entries with no row in this run (their adapter, "
                   "case or dtype was not selected)</summary>"
                   + table(absent, ["id", "adapters", "dtypes", "status", "message"]) + "</details>")
    not_run = rows[rows["status"].isin(tables.NOT_RUN)]
    groups_table = data.tables["not_run"]
    out.append(f"<h3 id='not-run'>Unsupported or skipped, by reason ({len(not_run)} rows, "
               f"{len(groups_table)} reasons)</h3>")
    if groups_table.empty:
        out.append("<p class='muted'>Every adapter ran every selected case.</p>")
    columns = ["adapter", *(["machine"] if _machines(data) > 1 else []), "area", "dtype", "rows", "cases"]
    by_reason = dict(list(not_run.groupby(["status", not_run["message"].fillna("").astype(str)], sort=False)))
    for group in groups_table.to_dict("records"):
        part = by_reason[(group["status"], group["reason"])]
        detail = part.groupby(["adapter", "machine", "area", "dtype"], sort=True).agg(
            rows=("row_id", "size"), cases=("case", lambda c: tables.join_values(c, limit=6))).reset_index()
        detail["status"] = group["status"]
        rendered = [_row(r, columns, count=r["rows"]) for r in detail.to_dict("records")]
        out.append(f"<details class='fg'><summary><span class='{esc(group['status'])}'>{esc(group['status'])}"
                   f"</span> · <span class='shown'>{group['rows']}</span> of {group['rows']} rows · "
                   f"{esc(group['adapters'])}<br><span class='observed'>{esc(group['reason'])}</span></summary>"
                   + _sortable(columns, rendered, len(detail), "not_run.csv") + "</details>")
    return "".join(out)


def _divergence_entry(entry: dict, group: pd.DataFrame, columns: list[str], data: ReportData) -> str:
    """One catalogued divergence: its id, largest error, who it affects and what it does, its rows folded under
    it, its upstream report and standalone script."""
    if len(group) <= ENTRY_ROWS:  # few rows: each one
        rendered, shown_columns, total = [_row(r, columns) for r in group.to_dict("records")], columns, len(group)
    else:  # many: one line per adapter x area x dtype x quantity, counted, with its worst row
        rendered, shown_columns = _entry_groups(group)
        total = len(rendered)
    upstream = f" · upstream: {link_list(entry['upstream'])}" if entry["upstream"] else " · no upstream issue"
    script = results.reproducer_name(entry["id"])
    if script in data.reproducers:
        upstream += f" · <a href='reproducers/{esc(script)}'>standalone script</a>"
    error = tables.error_text(entry["largest_err"], entry["largest_nonfinite"])
    return (f"<details class='fg' id='{_anchor('div', entry['id'])}'><summary><b>{esc(entry['id'])}</b> · "
            f"largest error <b class='err'>{esc(error)}</b> · {esc(entry['adapters'])} · "
            f"<span class='shown'>{entry['rows']}</span> of {entry['rows']} rows{upstream}"
            f"<br><span class='affected'>affects: {esc(entry['affected'])}</span>"
            f"<br><span class='observed'>{esc(entry['observed'])}</span></summary>"
            + _sortable(shown_columns, rendered, total, "conformance_non_passing.csv") + "</details>")


def _entry_groups(group: pd.DataFrame) -> tuple[list[str], list[str]]:
    """A divergence entry's rows as one line per adapter x area x dtype: how many rows, which quantities, and the
    row with the largest error ratio (its id reruns it). Each line counts its rows for the filters (``data-n``)."""
    keys = ["adapter", *(["machine"] if "machine" in group and group["machine"].nunique() > 1 else []),
            "area", "dtype"]
    worst = group.assign(_ratio=pd.to_numeric(group["error_ratio"], errors="coerce").fillna(-1.0))
    worst = worst.sort_values("_ratio", ascending=False).drop_duplicates(keys).sort_values(keys)
    grouped = group.groupby(keys, sort=False)
    counts, quantities = grouped.size(), grouped["quantity"].agg(lambda q: tables.join_values(q, limit=4))
    columns = [*keys, "rows", "quantities", "worst row", "error_ratio"]
    rendered = []
    for record in worst.to_dict("records"):
        key = tuple(record[k] for k in keys)
        n = int(counts[key])
        line = {**record, "rows": n, "quantities": quantities[key], "worst row": record["row_id"]}
        rendered.append(_row(line, columns, count=n))
    return rendered, columns


def _anchor(prefix: str, name) -> str:
    return f"{prefix}-" + re.sub(r"[^A-Za-z0-9_.-]+", "_", str(name))


def _failure_cell(column, value, record):
    if column == "status":
        return f'<td class="{esc(value)}">{esc(value)}</td>'
    if column == "row_id":
        return f'<td class="id">{esc(value)}</td>'
    if column == "message":  # the rerun command under the message: the cell a reader acts on
        return f'<td class="msg">{esc(value)}<div class="rerun">rerun: <code>{esc(record["rerun"])}</code></div></td>'
    return None


# --- frameworks side by side --------------------------------------------------------------------------

AGREEMENT_METHOD = (
    "A conformance row records e = max|impl − golden| over the output's finite elements, not the output itself, so "
    "for two adapters a and b on the same computation (machine, device, case, dtype, quantity) the triangle "
    "inequality bounds their difference: |e<sub>a</sub> − e<sub>b</sub>| ≤ max|a − b| ≤ e<sub>a</sub> + "
    "e<sub>b</sub>. A cell gives the upper bound's maximum over every computation both judged against the golden, "
    "in units of the row's tolerance (the error a faithful implementation in that dtype may have; both rows share "
    "it), and n, the number of computations compared. <b>≤ 1</b>: the two agree within the tolerance (green). "
    "A lower bound above 1: they certainly differ (red). Otherwise the rows cannot tell (amber). It is an upper "
    "bound, not the difference: the exact figure needs both outputs, which the results do not keep. Not an "
    "element-wise relative difference: golden elements that are exactly zero (many gradients) make that "
    "unbounded. Divergence rows are measured against the catalogued behaviour, so they are named in the cell "
    "instead (for example \"oracle policy nan vs canonical\": a fully masked row gives NaN in one and zeros in "
    "the other).")


def section_agreement(data: ReportData) -> str:
    out = ["<h2 id='agreement'>Frameworks side by side</h2>"]
    agreement = data.tables.get("agreement")
    if agreement is None or agreement.empty:
        return out[0] + "<p class='muted'>Fewer than two adapters ran the same cases.</p>"
    out.append(f"<p class='muted'>{AGREEMENT_METHOD}</p>")
    adapters = sorted(set(agreement["adapter_a"]) | set(agreement["adapter_b"]))
    cells = {}
    for record in agreement.to_dict("records"):
        cells[(record["adapter_a"], record["adapter_b"])] = cells[(record["adapter_b"], record["adapter_a"])] = record
    head = "<th></th>" + "".join(f"<th>{esc(a)}</th>" for a in adapters)
    body = []
    for a in adapters:
        row = [f"<th>{esc(a)}</th>"]
        for b in adapters:
            record = cells.get((a, b))
            if a == b:
                row.append("<td class='cell empty'>—</td>")
            else:
                row.append(_agreement_cell(record) if record else "<td class='cell empty'>no shared rows</td>")
        body.append(f"<tr>{''.join(row)}</tr>")
    out.append(f"<table class='agree'><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
    out.append("<h3>Each pair, with the computation that differs most</h3>")
    columns = ["adapter_a", "kernel_a", "adapter_b", "kernel_b", "compared", "cases", "dtypes", "upper_tol",
               "lower_tol", "upper_abs", "differs_most", "fails", "divergences", "not_compared"]
    records = [{**r, "differs_most": " · ".join(str(r[k]) for k in ("worst_case", "worst_dtype", "worst_quantity",
                                                                     "worst_machine", "worst_device")
                                                 if isinstance(r[k], str))}
               for r in agreement.to_dict("records")]
    rendered = [_row(r, columns, filterable=False, anchor=_pair_anchor(r)) for r in records]
    out.append(_sortable(columns, rendered, len(rendered), "agreement.csv"))
    return "".join(out)


def agreement_state(record: dict) -> str:
    """green (agree within the tolerance), red (certainly differ), amber (the rows cannot tell)."""
    if not record["compared"]:
        return "empty"
    if record["lower_tol"] > 1:
        return "fail"
    return "pass" if record["upper_tol"] <= 1 else "divergence"


def _pair_anchor(record: dict) -> str:
    return _anchor("pair", f"{record['adapter_a']}--{record['adapter_b']}")


def _agreement_cell(record: dict) -> str:
    link = _pair_anchor(record)
    parts = []
    if record["compared"]:
        worst = " ".join(esc(record[k]) for k in ("worst_case", "worst_dtype", "worst_quantity"))
        parts.append(f"<a href='#{link}' title='lower bound {fmt(record['lower_tol'])} tol; the computation that "
                     f"differs most: {worst}'>≤ {fmt(record['upper_tol'])} tol</a> · n={record['compared']}")
    else:
        parts.append(f"<a href='#{link}'>no shared judged rows</a>")
    if record["fails"]:
        parts.append(f"{record['fails']} with a fail")
    if record["divergences"]:
        first, _, rest = str(record["divergences"]).partition("; ")
        parts.append(f"<span class='why'>{esc(first)}</span>" + (f" <a href='#{link}'>+more</a>" if rest else ""))
    return f"<td class='cell {agreement_state(record)}'>{'<br>'.join(parts)}</td>"


# --- machines -------------------------------------------------------------------------------------

def machine_facts_html(data: ReportData) -> str:
    """The facts that chose the kernels, per machine: the run's (CPU, ISA, vector width, BLAS, threads, kernel
    variables, switches forced) and each adapter's (as its framework reported them in its process)."""
    facts, kernels = data.tables.get("machine_facts"), data.tables.get("kernel_facts")
    out = []
    if facts is not None and not facts.empty:
        out.append("<h3 id='machine-facts'>What chose the kernels</h3><p class='muted'>Frameworks pick kernels by "
                   "the machine (TensorFlow turns oneDNN on by default only on CPUs with AVX512_VNNI, AVX512_BF16, "
                   "AVX_VNNI or AMX; torch's vectorised kernels run 16 float lanes under AVX-512, 8 under AVX2), so "
                   "a verdict holds for the facts it was reached under.</p>")
        out.append(table(facts, ["machine", "cpu_model", "isa", "vector_bits", "numpy_blas", "cpu_threads",
                                 "environment", "switches"]))
    if kernels is not None and not kernels.empty:
        out.append("<p class='muted'>Per adapter, as each framework reported them in the process that ran it "
                   "(recorded on every row as <code>facts</code>):</p>")
        out.append(table(kernels, ["machine", "adapter", "facts", "rows"]))
    return "".join(out)


def section_machines(data: ReportData) -> str:
    if data.conformance is None:
        return ""
    matrix = data.tables["machines"]
    places = matrix[["machine", "device"]].drop_duplicates()
    out = ["<h2 id='machines'>Machines</h2>"]
    if len(places) < 2:
        place = places.iloc[0] if not places.empty else {"machine": "unknown", "device": ""}
        return out[0] + (f"<p>Every row comes from one machine and device: <b>{esc(place['machine'])}</b> "
                         f"({esc(place['device'])}). Merge several results directories with "
                         "<code>mhabench report --results DIR DIR ...</code> to set machines side by side.</p>") \
            + machine_facts_html(data)
    out.append(machine_facts_html(data))
    cross = data.tables["cross_machine"]
    out.append(f"<h3 id='cross-machine'>The same adapter and case, a different verdict per machine ({len(cross)})</h3>"
               "<p class='muted'><code>differs</code> names the facts that chose the kernels whose values differ "
               "between the machines: the likely reason, reproducible on one machine with "
               "<code>mhabench conform --switch</code>.</p>")
    out.append(table(cross, limit=DRILL_DOWN_LIMIT, row_class=None) if not cross.empty else
               "<p class='muted'>Every adapter gives the same verdict on every case on every machine and device.</p>")
    out.append("<h3>Per machine × device</h3>")
    adapters = sorted(set(matrix["adapter"]))
    head = "<th>machine</th><th>device</th>" + "".join(f"<th>{esc(a)}</th>" for a in adapters)
    body = []
    for (machine, device), group in matrix.groupby(["machine", "device"], sort=True):
        cells = {r["adapter"]: r for r in group.to_dict("records")}
        row = [f"<th>{esc(machine)}</th><td>{esc(device)}</td>"]
        for adapter in adapters:
            record = cells.get(adapter)
            if record is None:
                row.append("<td class='cell empty'></td>")
                continue
            extra = "".join(f"<br>{record[s]} {s}" for s in STATUSES if s != "pass" and record[s])
            row.append(f"<td class='cell {tables.cell_state(record)}'><b>{record['pass']}</b>/{record['total']} pass"
                       f"{extra}</td>")
        body.append(f"<tr>{''.join(row)}</tr>")
    out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>")
    return "".join(out)


def section_portability(data: ReportData) -> str:
    """``conform --switches``: per kernel switch setting, the rows whose verdict changes, and what decides it."""
    settings, changes = data.tables.get("portability"), data.tables.get("portability_changes")
    if settings is None or settings.empty:
        return ""
    out = ["<h2 id='portability'>Portability: verdicts that depend on the machine</h2>"
           "<p class='muted'>The same selection run on this machine under each setting of each kernel switch "
           "(<code>mhabench conform --switches</code>): another machine's kernels, reproduced. A row listed below "
           "gets a different verdict on a machine whose framework makes the other choice; a setting with a fail row "
           "or a stale entry is red on such a machine.</p>"]
    columns = [*(["machine"] if settings["machine"].nunique() > 1 else []), "switch", "setting", "variable", "value",
               "rows", "changed", "fail", "error", "stale", "changed_by_adapter", "warnings"]
    state = lambda r: "fail" if r["fail"] or r["stale"] else "error" if r["error"] else "pass"
    out.append(table(settings, columns, row_class=state))
    if changes is not None and not changes.empty:
        out.append(f"<h3>Rows whose verdict changes ({len(changes)})</h3>")
        out.append(table(changes, [*(["machine"] if changes["machine"].nunique() > 1 else []), "switch", "setting",
                                   "adapter", "row_id", "own_choice", "switched", "facts"], limit=DRILL_DOWN_LIMIT))
    return "".join(out)


MEMORY_NOTE = (
    "Memory per call is what one forward call allocates beyond its inputs and weights (its temporaries and its "
    "output), measured after the same warm-up as the time. For compiled JAX programs (jax_dpa, flax_mha, "
    "Keras on JAX) the chart shows XLA's own figure, the compiler's buffer assignment (temp + output, from "
    "<code>jax.stages.Compiled.memory_analysis()</code>), drawn as hollow markers: XLA:CPU keeps memory resident "
    "between calls, so the process's high-water mark rises by only what the allocator did not already hold, "
    "which is nearly nothing at small L (the dip that made earlier charts' JAX memory exponents 3 to 5). Every "
    "other line is the adapter's probe: the rise of the process high-water mark (VmHWM) during the call on CPU, "
    "or the framework's allocator peak where it pools memory (TensorFlow). The table of points gives both "
    "figures where there are two.")


def section_scaling_summary(data: ReportData) -> str:
    """Who wins where, above the charts: each row links to the chart it summarises."""
    winners, lines = data.tables.get("scaling_winners"), data.tables.get("scaling_lines")
    if winners is None or (winners.empty and lines.empty):
        return ""
    out = ["<h3 id='scaling-summary'>Summary: who is fastest and leanest</h3>",
           "<p class='muted'>Forward pass at the sweep's head count. Per class and L: the fastest and the leanest "
           "line among those measured there that break no plausibility rule. Per line: the power law fitted over "
           "its three largest lengths for time and per-call memory (exponent 1 is O(L), 2 is O(L²)), with the "
           "fit's residual (how far the points lie from the law, typically) and in words how well a power law fits "
           "(good: within 5%; fair: within 15%; poor: not one power law there), and GFLOP/s as a fraction of the "
           "machine's GEMM peak at the largest L.</p>"]
    shown = winners.assign(time=[format_value(v, "seconds") for v in winners["time"]],
                           memory=[format_value(v, "bytes") for v in winners["memory"]])
    link = lambda c, v, r: f"<td><a href='#{esc(r['chart'])}'>{esc(v)}</a></td>" if c == "class" else None
    out.append(table(shown, ["class", "device", "L", "fastest", "time", "leanest", "memory", "lines"], cell=link))

    def fitted(exponent, residual, quality):
        if exponent != exponent:
            return "one L"
        return f"{exponent:.2f} (±{residual:.0%}, {quality})" if residual == residual else f"{exponent:.2f}"

    compact = lines.assign(
        time=[fitted(*v) for v in zip(lines["time_exponent"], lines["time_fit_residual"], lines["time_fit"])],
        memory=[fitted(*v) for v in zip(lines["memory_exponent"], lines["memory_fit_residual"],
                                        lines["memory_fit"])],
        time_noise=[f"{v:.0%}" if v == v else "" for v in lines["time_widest_spread"]])

    def line_cell(column, value, record):
        if column == "class":
            return link(column, value, record)
        if column == "fraction_of_peak_at_L_max":
            if record["fault"]:
                return f"<td class='fault' title='{esc(record['fault'])}'>measurement fault</td>"
            return f'<td class="num">{value:.1%}</td>' if value == value else "<td></td>"
        if column in ("time", "memory"):
            return f"<td class='num'>{esc(value)}</td>"
        if column == "implausible":
            return f"<td class='fault why'>{esc(value)}</td>" if value else "<td></td>"
        return None
    out.append("<p class='muted'>Per line: time and memory exponent (± the fit's residual, how well a power law "
               "fits); time_noise, the widest interquartile range of its time points over their median (the "
               "charts draw each point's as an error bar); the full figures are in <code>scaling_lines.csv</code>."
               "</p>")
    out.append(table(compact, ["class", "device", "series", "L_max", "time", "time_noise", "memory",
                               "fraction_of_peak_at_L_max", "implausible", "remeasured"], cell=line_cell,
                     row_class=lambda r: "fault" if r.get("implausible") else None))
    return "".join(out)


def section_implausible(data: ReportData) -> str:
    """The lines that break a plausibility rule, each with the rule and the numbers: above the charts, since
    what they show of those lines is not a result."""
    scaling = data.tables.get("scaling")
    if scaling is None or scaling.empty:
        return ""
    bad = scaling[scaling["implausible"].astype(str) != ""]
    rules = "".join(f"<li>{esc(rule)}</li>" for rule in plausibility.RULES)
    head = ("<p class='muted'>Each line is checked against physical bounds: " f"<ul>{rules}</ul>"
            "A point of a line that breaks one is measured again by <code>mhabench bench</code>, with four times the "
            "samples and in a fresh process; a line that still breaks it is flagged here and in its chart (dotted, "
            "crosses), and the verdict does not quote it.</p>")
    if bad.empty:
        return "<h3 id='plausibility'>Plausibility</h3>" + head + "<p>Every line passes.</p>"
    items = "".join(f"<li><b>{esc(r['series'])}</b>, {esc(r['class'])} {esc(charts.METHOD_TITLES.get(r['method'], r['method']))}"
                    f" ({esc(r['device'])}): {esc(r['implausible'])}"
                    + (f" <span class='muted'>Measured again: {esc(r['remeasured'])}.</span>" if r["remeasured"] else
                       " <span class='muted'>Not measured again.</span>") + "</li>"
                    for r in bad.to_dict("records"))
    return (f"<h3 id='plausibility'>Plausibility</h3>{head}<div class='note'><b>{len(bad)} line(s) break a "
            f"plausibility rule</b><ul>{items}</ul></div>")


def section_verify(data: ReportData) -> str:
    verify = data.tables.get("verify")
    if verify is None or verify.empty:
        return ""
    low, high = plausibility.VERIFY_RANGE
    outside = verify[verify["flag"] != ""]
    shown = verify.assign(suite=[format_value(v, "seconds") for v in verify["suite"]],
                          plain=[format_value(v, "seconds") for v in verify["plain"]])
    ratio = lambda c, v, r: (f"<td class='num{' fault' if r['flag'] else ''}'>{v:.3f}</td>"
                             if c in ("ratio", "paired_ratio") and v == v else None)
    return (f"<h3 id='verify'>Timings checked against plain timing</h3><p class='muted'><code>mhabench bench "
            f"--verify</code> timed each point's forward call a second way, in the same process: perf_counter_ns "
            f"around the call alone (which ends with the adapter's own sync), once after each of the suite's own "
            f"samples, so both see the same load; the plain figure is the median. The ratio is suite / plain; "
            f"the paired ratio is the median of each sample over the plain call right after it, which load that "
            f"changes from second to second does not move. Outside [{low}, {high}] (the paired ratio) is "
            f"flagged: {len(outside)} of {len(verify)} points. This checks how the suite times "
            f"the adapter's call (its sampling, asv's statistics, what reaches this page); it does not check the "
            f"adapter's call against attention written by hand.</p>"
            + table(shown, ["class", "device", "series", "L", "suite", "plain", "ratio", "paired_ratio", "samples",
                            "plain_samples", "flag"], cell=ratio, limit=DRILL_DOWN_LIMIT))


def section_points(data: ReportData) -> str:
    """Every forward point with its spread and sample count, and both memory figures where there are two."""
    attention = data.attention
    if attention.empty:
        return ""
    forward = attention[attention["method"].isin(["time_forward", "track_peakmem_forward"])].copy()
    if forward.empty:
        return ""
    spread = lambda r: (format_value(r["q25"], r["unit"]) + " – " + format_value(r["q75"], r["unit"])
                        if r["q25"] == r["q25"] else "exact")
    forward["median"] = [format_value(v, u) for v, u in zip(forward["value"], forward["unit"])]
    forward["IQR"] = [spread(r) for r in forward.to_dict("records")]
    forward["samples"] = forward["repeat"]
    forward["probe"] = [format_value(v, "bytes") if v == v and v is not None else "" for v in forward["probe_bytes"]]
    forward["charted"] = [{"program": "XLA", "probe": "probe"}.get(c, "") for c in forward["memory_charted"]]
    forward = forward.assign(_o=forward["class"].map(tables.class_rank)).sort_values(
        ["_o", "method", "series", "seq_len"])
    return ("<details><summary>Every forward point: median, spread (IQR) and samples; why sampling stopped; both "
            "memory figures</summary>" + table(forward, ["class", "method", "series", "seq_len", "median", "IQR",
                                                         "samples", "stopped", "charted", "probe", "memory_probe"],
                                               limit=DRILL_DOWN_LIMIT) + "</details>")


def section_benchmarks(data: ReportData) -> str:
    out = ["<h2 id='scaling'>Scaling</h2>"]
    if data.benchmarks is None:
        return out[0] + "<p class='note'>No benchmark results (run <code>mhabench bench</code>).</p>"
    attention = data.attention
    if attention.empty:
        out.append("<p class='muted'>No attention benchmarks in the results.</p>")
    else:
        flagged = tables.flagged_lines(data.tables["scaling"])
        out.append(section_scaling_summary(data))
        out.append(section_implausible(data))
        out.append(section_verify(data))
        devices = list(dict.fromkeys(attention["device"]))
        classes = sorted(dict.fromkeys(attention["class"]), key=tables.class_rank)
        out.append("<p class='muted'>The charts: one panel per framework family, each with torch_sdpa as the "
                   "reference (grey) and the O(L) and O(L²) guides (dashed, dotted); a legend under each panel lists "
                   "its lines in the order they end at the largest L, each with its fitted exponent. Error bars: "
                   "each point's interquartile range. Dotted with crosses: a line that breaks a plausibility "
                   "rule.</p>")
        for klass in classes:
            for device in devices:
                for method, what in (("time_forward", "time"), ("time_forward_backward", "time-backward")):
                    out.append(figure(charts.scaling_chart(attention, klass, method, device, flagged),
                                      f"{klass}: {charts.METHOD_TITLES[method]} against L ({device})",
                                      tables.chart_id(klass, device, what)))
                for method, what in (("track_peakmem_forward", "memory"),
                                     ("track_peakmem_forward_backward", "memory-backward")):
                    out.append(figure(charts.scaling_chart(attention, klass, method, device, flagged),
                                      f"{klass}: {charts.METHOD_TITLES[method]} against L ({device}); hollow "
                                      f"markers: XLA's figure", tables.chart_id(klass, device, what)))
        out.append(f"<p class='muted'>{MEMORY_NOTE}</p>")
        out.append(section_points(data))
        out.append("<h3>Fitted exponents</h3><p class='muted'>Least-squares slope of log(value) on log(L) over "
                   "the three largest lengths of the sweep (L_min to L_max and points: what was measured) at the "
                   "default head count: 1 is O(L), 2 is O(L²); the residual is how far those points lie from the "
                   "power law, typically.</p>")
        scaling = data.tables["scaling"].copy()
        if not scaling.empty and scaling["exponent"].isna().all():
            out.append("<p class='note'>Every sweep here has a single sequence length, so no exponent can be "
                       "fitted; <code>mhabench bench</code> sweeps L.</p>")
        scaling["value_at_L_max"] = [format_value(v, u) for v, u in zip(scaling["value_at_L_max"], scaling["unit"])]
        out.append(table(scaling, ["class", "method", "device", "series", "kernel", "num_heads", "points", "L_min",
                                   "L_max", "exponent", "fit_residual", "fit", "value_at_L_max", "implausible"]))
        out.append("<h3 id='heads'>Heads sweep</h3>")
        heads = [figure(charts.heads_chart(attention, klass, "time_forward"), f"{klass} time against heads")
                 for klass in classes]
        out.append("".join(heads) or "<p class='muted'>No run with more than one head count.</p>")
        out.append("<h3 id='gflops'>Fraction of peak</h3><p class='muted'>GFLOP/s (the FLOPs of the call over its "
                   "time) as a fraction of this machine's float32 GEMM rate, against L.</p>")
        for klass in classes:
            for device in devices:
                peaks = {k: v for k, v in data.peaks.items() if k[1] == str(device)}
                out.append(figure(charts.fraction_chart(attention, klass, "track_gflops_forward", device, peaks,
                                                        flagged),
                                  f"{klass}: forward GFLOP/s as a fraction of the GEMM peak against L ({device})",
                                  tables.chart_id(klass, device, "gflops")))
        peaks = ", ".join(f"{esc(tables.peak_label(k, data.peaks))}: {p:.1f} GFLOP/s"
                          for k, p in data.peaks.items()) or "not measured"
        out.append(f"<p>Machine GEMM peak (the best of the measurements next to the benchmarks): {peaks}.</p>")
        fraction = data.tables["peak_fraction"]
        if not fraction.empty and (fraction["fault"] != "").any():
            out.append("<p class='note'>A fraction of the GEMM peak above 100% is a measurement fault, not a "
                       "result: the peak was measured low (a busy machine, or a GEMM size that does not reach this "
                       "machine's best). Those fractions are left out below.</p>")

        def fraction_cell(column, value, record):
            if "fraction" in column:
                if record["fault"]:
                    return f"<td class='fault'>{'fault' if column == 'best_fraction' else esc(record['fault'])}</td>"
                return f'<td class="num">{value:.1%}</td>' if value == value else "<td></td>"
            return None
        out.append(table(fraction, ["class", "method", "device", "series", "L_max", "gflops_at_L_max", "best_gflops",
                                    "gemm_peak_gflops", "fraction_at_L_max", "best_fraction"], cell=fraction_cell))
    skips = data.tables.get("bench_skips")
    out.append(f"<h3>Skipped or failed benchmark cases ({0 if skips is None else len(skips)})</h3>")
    out.append(table(skips, limit=DRILL_DOWN_LIMIT))
    return "".join(out)


def _error(value) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) and math.isfinite(value) else ""


def section_accuracy(data: ReportData) -> str:
    """Error against L, kernel by kernel and dtype by dtype, against a plain implementation in the same dtype."""
    accuracy = data.accuracy
    if accuracy.empty:
        return ""
    lines = data.tables["accuracy_lines"]
    out = ["<h2 id='accuracy'>Accuracy</h2>",
           "<p class='muted'>Each adapter's output in each dtype against the float64 oracle, on the same seeded "
           "inputs and weights, through the public call (<code>benchmarks/accuracy.py</code>): <b>max_rel_error</b> "
           "is the largest absolute error over the largest magnitude of the exact output; <b>rms_error</b> the root "
           "mean square of the error; <b>sum_error</b> the error of the output-weighted sum Σ w·y (the scalar a loss "
           "sees), relative to Σ|w·y|. The <b>reference</b> is the oracle run in the same dtype, every stage rounded "
           "as the kernels round: a ratio above 1 is worse than a plain implementation in that dtype. Inputs: "
           "self-attention's, one input as query, key and value: standard normals (the logits' spread is about 1), "
           "and <i>peaky</i>, scaled so the logits' spread is 8 and each softmax row is dominated by a few keys. <b>grad_rel_rms_error</b>: the gradients of Σ w·y (inputs and "
           "weights) against the oracle's backward, the largest relative RMS error of any of them, at the largest L "
           "where it was measured (<b>grad_L_max</b>: the oracle's backward holds the scores, so up to 2048). "
           "The exponents are fitted over the three largest lengths; "
           f"<b>grows_faster</b>: the error's exponent exceeds the reference's by more than "
           f"{tables.FASTER_GROWTH}.</p>"]
    shown = lines.copy()
    for column in ("max_rel_error", "rms_error", "sum_error", "reference_rms_error", "ratio_rms_error",
                   "ratio_max_rel_error", "exponent", "reference_exponent", "ratio_exponent", "grad_rel_rms_error",
                   "ratio_grad_rel_rms_error"):
        shown[column] = [_error(v) if "exponent" not in column else (f"{v:.2f}" if v == v else "")
                         for v in shown[column]]
    out.append("<h3 id='accuracy-ranking'>At the largest length, ranked by RMS error</h3>")
    out.append(table(shown, ["class", "device", "dtype", "rank", "series", "kernel", "L_max", "max_rel_error",
                             "rms_error", "sum_error", "reference_rms_error", "ratio_rms_error", "exponent",
                             "reference_exponent", "grows_faster", "grad_L_max", "grad_rel_rms_error",
                             "ratio_grad_rel_rms_error"],
                     row_class=lambda r: "fault" if r.get("grows_faster") else None))
    devices = list(dict.fromkeys(accuracy["device"]))
    classes = sorted(dict.fromkeys(accuracy["class"]), key=tables.accuracy_class_rank)
    for klass in classes:
        for device in devices:
            for figure_name in ("rms_error", "ratio_rms_error"):
                out.append(figure(charts.accuracy_chart(accuracy, klass, device, figure_name),
                                  f"{klass}: {charts.ACCURACY_TITLES[figure_name]} against L ({device}); line style: "
                                  f"dtype (solid float32, dashed float16, dotted bfloat16)",
                                  tables.chart_id(klass, device, figure_name)))
    skips = data.tables.get("accuracy_skips")
    if skips is not None and not skips.empty:
        out.append(f"<h3>Dtypes not measured ({len(skips)})</h3>")
        out.append(table(skips))
    return "".join(out)


def section_comparison(data: ReportData) -> str:
    comparison = data.comparison
    if comparison is None:
        return ""
    out = [f"<h2 id='comparison'>Comparison: B / A</h2><p>A = <code>{esc(comparison.label_a)}</code>, "
           f"B = <code>{esc(comparison.label_b)}</code>: {esc(comparison.rule())}. A change past the threshold "
           "but within the noise is marked 'within noise'; noise is the factor a change had to exceed. "
           "For GFLOP/s higher is better; for time and memory lower is better.</p>"]
    counts = comparison.table["change"].value_counts()
    out.append("<p>" + ", ".join(f"{int(n)} {esc(k)}" for k, n in counts.items()) +
               f"; {comparison.only_a} only in A, {comparison.only_b} only in B.</p>")
    shown = comparison.table.copy()
    shown["a"] = [format_value(v, u) for v, u in zip(shown["a"], shown["unit"])]
    shown["b"] = [format_value(v, u) for v, u in zip(shown["b"], shown["unit"])]
    out.append(table(shown, ["benchmark", "params", "a", "b", "ratio", "noise", "change", "better", "a_ci", "b_ci"],
                     limit=DRILL_DOWN_LIMIT,
                     row_class=lambda r: {"regression": "regression", "failed in B": "regression",
                                          "improvement": "improvement", "fixed in B": "improvement",
                                          "within noise": "insignificant"}.get(r["change"])))
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


SCRIPT = """(function(){
var bar=document.getElementById('filters');if(!bar)return;bar.hidden=false;
var sels=bar.querySelectorAll('select'),chips=bar.querySelectorAll('button[data-status]');
function apply(){var want={},off={},shown=0,total=0;
sels.forEach(function(s){if(s.value)want[s.name]=s.value;});
chips.forEach(function(c){if(c.getAttribute('aria-pressed')==='false')off[c.dataset.status]=1;});
document.querySelectorAll('tr.f').forEach(function(tr){var ok=!off[tr.dataset.status],n=+(tr.dataset.n||1);
for(var k in want)if(tr.dataset[k]!==want[k])ok=false;tr.hidden=!ok;total+=n;if(ok)shown+=n;});
document.querySelectorAll('.fg').forEach(function(g){var v=0;
g.querySelectorAll('tr.f').forEach(function(tr){if(!tr.hidden)v+=+(tr.dataset.n||1);});
g.hidden=v===0;var c=g.querySelector('.shown');if(c)c.textContent=v;});
document.getElementById('fcount').textContent=shown+' of '+total+' rows shown';}
sels.forEach(function(s){s.addEventListener('change',apply);});
chips.forEach(function(c){c.addEventListener('click',function(){
c.setAttribute('aria-pressed',c.getAttribute('aria-pressed')==='false'?'true':'false');apply();});});
function key(td){var t=td?(td.dataset.v!==undefined?td.dataset.v:td.textContent.trim()):'';var n=Number(t);
return t!==''&&!isNaN(n)?[0,n]:[1,t.toLowerCase()];}
document.querySelectorAll('table.sortable th').forEach(function(th){th.addEventListener('click',function(){
var tr=th.parentNode,i=Array.prototype.indexOf.call(tr.children,th),body=th.closest('table').tBodies[0];
var asc=th.dataset.sort!=='asc';tr.querySelectorAll('th').forEach(function(h){delete h.dataset.sort;});
th.dataset.sort=asc?'asc':'desc';var rows=Array.prototype.slice.call(body.rows);
rows.sort(function(a,b){var x=key(a.cells[i]),y=key(b.cells[i]);
var d=x[0]-y[0]||(x[1]<y[1]?-1:x[1]>y[1]?1:0);return asc?d:-d;});
rows.forEach(function(r){body.appendChild(r);});});});
apply();})();"""


def render_html(data: ReportData) -> str:
    if data.comparison_only:
        sections, nav = [section_environment(data), section_comparison(data)], ["environment", "comparison"]
    else:
        sections = [section_conformance(data), section_drill_down(data), section_agreement(data),
                    section_machines(data), section_portability(data), section_benchmarks(data),
                    section_accuracy(data), section_comparison(data), section_environment(data)]
        nav = ["conformance", "drill-down", "agreement", "machines", "portability", "scaling", "accuracy"] + \
            (["comparison"] if data.comparison else []) + ["environment"]
        nav = [n for n in nav if f"id='{n}'" in "".join(sections)]
    red = alarms(data)
    verdict_items = "".join(f"<li class='alarm'>{esc(line)}</li>" for line in red)
    if not red and data.conformance is not None and not data.comparison_only:
        verdict_items += "<li class='green'>no fail or error rows, no stale catalogue entries</li>"
    verdict_items += "".join(f"<li>{esc(line)}</li>" for line in verdict(data))
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        "<title>mhabench report</title>"
        f"<style>{CSS}</style></head><body><main>"
        "<h1>mhabench: multi-head attention conformance and benchmarks</h1>"
        f"<p class='muted'>Results: <code>{esc(data.results_dir)}</code> · generated {esc(data.generated)}</p>"
        f"<nav>{''.join(f'<a href=#{n}>{n}</a>' for n in nav)}</nav>"
        f"<div class='verdict{' red' if red else ''}'><b>Verdict</b><ul>{verdict_items}</ul></div>"
        + section_problems(data) + "".join(sections) +
        f"</main><script>{SCRIPT}</script></body></html>\n"
    )
