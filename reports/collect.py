"""What a report shows: the results loaded, the tables computed from them, and the verdict lines."""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from mhabench import results

from . import tables
from .compare import Comparison
from .load import Benchmarks, Conformance, ResultsError, load_accuracy, load_results
from .units import format_value


@dataclass
class ReportData:
    results_dir: str
    generated: str
    conformance: Conformance | None
    benchmarks: Benchmarks | None
    environment: pd.DataFrame
    tables: dict = field(default_factory=dict)  # name -> DataFrame, each written as <name>.csv
    attention: pd.DataFrame = field(default_factory=pd.DataFrame)  # the attention benchmarks, with line labels
    accuracy: pd.DataFrame = field(default_factory=pd.DataFrame)  # bench/accuracy.jsonl's records, newest first
    peaks: dict = field(default_factory=dict)
    headline: dict = field(default_factory=dict)
    comparison: Comparison | None = None
    notes: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # "path:line: ..." for every line or file that could not be read
    comparison_only: bool = False  # `report --compare A B` without --results: the page is about the change
    reproducers: dict = field(default_factory=dict)  # file name -> source: the entries' standalone scripts

    def summary(self) -> dict:
        """The figures of the verdict line."""
        out = {"adapters": [], "rows": 0, "divergences": 0, "statuses": {}}
        if self.conformance is not None:
            rows = self.conformance.rows
            out["adapters"] = sorted(set(rows["adapter"]))
            out["rows"] = len(rows)
            out["statuses"] = {k: int(v) for k, v in rows["status"].value_counts().items()}
            out["divergences"] = int(rows["divergence"].dropna().nunique())
        attention = self.tables.get("benchmarks")
        if attention is not None and not attention.empty and "adapter" in attention:
            bench_adapters = set(attention["adapter"].dropna().astype(str))
            out["adapters"] = sorted(set(out["adapters"]) | bench_adapters)
        out.update(self.headline)
        return out


def collect(results_dir, comparison: Comparison | None = None, machines=None) -> ReportData:
    """Everything the page and the summary show.

    ``results_dir``: one results directory or a list of them (merged: shards, machines, nights); None for a
    comparison-only report. ``machines``: the machine name for every directory, or one per directory.
    """
    if results_dir is None:
        if comparison is None:
            raise ResultsError("nothing to report: give a results directory")
        sides = [tables.environment(comparison.conf_a, comparison.bench_a).assign(side="A"),
                 tables.environment(comparison.conf_b, comparison.bench_b).assign(side="B")]
        environment = pd.concat(sides, ignore_index=True)
        environment["source"] = environment["side"] + ": " + environment["source"]
        data = ReportData(results_dir=f"A = {comparison.label_a}, B = {comparison.label_b}",
                          generated=_now(), conformance=None, benchmarks=None,
                          environment=environment.drop(columns="side"), comparison=comparison, comparison_only=True)
        data.tables["comparison"] = comparison.table
        data.tables["conformance_changes"] = comparison.conformance_changes
        data.tables["environment"] = data.environment
        return data
    conformance, benchmarks = load_results(results_dir, machines)
    label = results_dir if isinstance(results_dir, (str, Path)) else " + ".join(str(d) for d in results_dir)
    data = ReportData(results_dir=str(label), generated=_now(), conformance=conformance, benchmarks=benchmarks,
                      environment=tables.environment(conformance, benchmarks), comparison=comparison)
    scripts_found = {}
    for directory in ([results_dir] if isinstance(results_dir, (str, Path)) else results_dir):
        data.reproducers.update(results.read_reproducers(directory))
        scripts_found.update(results.read_reproducer_status(directory))
    if conformance is not None:
        data.problems.extend(conformance.problems)
        data.notes.extend(conformance.notes)
        rows = conformance.rows
        plugins = {str(p.source.parent.parent): p.plan.get("adhoc") or [] for p in conformance.parts or [conformance]}
        data.tables["conformance_adapters"] = tables.adapter_summary(rows)
        data.tables["conformance_matrix"] = tables.conformance_matrix(rows)
        data.tables["kernel_matrix"] = tables.kernel_matrix(rows)
        data.tables["conformance_non_passing"] = tables.non_passing(rows)
        data.tables["failures"] = tables.failures(rows, plugins)
        data.tables["divergences"] = tables.divergence_catalogue(rows, conformance.catalogue, scripts_found)
        data.tables["not_run"] = tables.not_run_groups(rows)
        data.tables["agreement"] = tables.agreement(rows, conformance.catalogue)
        data.tables["machines"] = tables.machine_matrix(rows)
        data.tables["cross_machine"] = tables.cross_machine(rows, tables.machine_facts_map(conformance))
        data.tables["version_changes"] = tables.version_changes(rows)
        data.tables["machine_facts"] = tables.machine_facts_table(conformance)
        data.tables["kernel_facts"] = tables.kernel_facts(rows)
        data.tables["portability"], data.tables["portability_changes"] = tables.portability(conformance)
    if benchmarks is not None:
        attention = tables.attention_results(benchmarks)
        data.peaks = tables.gemm_peaks(benchmarks)
        measured = benchmarks.results[np.isfinite(benchmarks.results["value"])]  # not asv's empty grid slots
        data.tables["benchmarks"] = measured.drop(columns=["samples", "file"], errors="ignore")
        data.tables["scaling"] = tables.scaling_table(attention)
        flagged = tables.flagged_lines(data.tables["scaling"])
        data.tables["peak_fraction"] = tables.peak_fraction(attention, data.peaks)
        data.tables["scaling_winners"] = tables.scaling_winners(attention, flagged)
        data.tables["scaling_lines"] = tables.scaling_lines(data.tables["scaling"], data.tables["peak_fraction"])
        data.tables["verify"] = tables.verify_ratios(attention)
        data.tables["bench_skips"] = benchmarks.skips
        data.headline = tables.headline(attention, flagged=flagged) if not attention.empty else {}
        data.notes.extend(benchmarks.notes)
        data.problems.extend(benchmarks.problems)
        data.attention = attention
    data.accuracy = load_accuracy([results_dir] if isinstance(results_dir, (str, Path)) else results_dir,
                                  data.problems)
    if not data.accuracy.empty:
        data.tables["accuracy"] = data.accuracy
        data.tables["accuracy_lines"] = tables.accuracy_lines(data.accuracy)
        data.tables["accuracy_skips"] = tables.accuracy_skips(data.accuracy)
    if comparison is not None:
        data.tables["comparison"] = comparison.table
        data.tables["conformance_changes"] = comparison.conformance_changes
    data.tables["environment"] = data.environment
    return data


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def alarms(data: ReportData) -> list[str]:
    """What makes the run red, worst first, each with its first instance named: error rows, fail rows, stale
    catalogue entries, and the kernel switch settings (``conform --switches``) that have any of them. Empty
    when the run is green."""
    if data.conformance is None or data.comparison_only:
        return []
    lines = []
    failures = data.tables.get("failures")
    several = data.conformance.rows["machine"].nunique() > 1
    for status in ("error", "fail"):
        found = failures[failures["status"] == status] if failures is not None and not failures.empty else failures
        if found is None or found.empty:
            continue
        first = found.iloc[0]
        where = f" on {first['machine']}" if several else ""
        lines.append(f"{len(found)} {status} row{'s' if len(found) > 1 else ''}, first {first['row_id']}{where}: "
                     f"{_short(first['message'])}")
    divergences = data.tables.get("divergences")
    if divergences is not None and not divergences.empty:
        stale = divergences[divergences["status"] == "stale"]
        if not stale.empty:
            first = stale.iloc[0]
            lines.append(f"{len(stale)} stale catalogue entr{'ies' if len(stale) > 1 else 'y'}, first {first['id']}: "
                         f"{_short(first['message'])}")
    settings = data.tables.get("portability")
    if settings is not None and not settings.empty:
        red = settings[(settings["fail"] > 0) | (settings["error"] > 0) | (settings["stale"] != "")]
        for record in red.to_dict("records"):
            stale = [s for s in str(record["stale"]).split(", ") if s]
            where = f" on {record['machine']}" if several else ""
            lines.append(f"under {record['switch']}={record['setting']}{where}: {record['fail']} fail, "
                         f"{record['error']} error rows, {len(stale)} stale entries"
                         + (f", first {stale[0]}" if stale else ""))
    return lines


def strict_failures(data: ReportData) -> list[str]:
    """Why ``mhabench report --strict`` exits 1: the alarms (error and fail rows, stale catalogue entries, red
    kernel switch settings), an incomplete conformance run (a missing shard, rows missing against the plan),
    result lines that could not be read, and with ``--compare`` the regressions. Empty when the run is green."""
    lines = alarms(data)
    if data.conformance is not None and not data.comparison_only:
        lines += [line for line in completeness(data.conformance) if line.startswith("INCOMPLETE")]
    if data.problems:
        lines.append(f"{len(data.problems)} unreadable line(s) in the results, first {data.problems[0]}")
    if data.comparison is not None and len(data.comparison.regressions):
        lines.append(f"{len(data.comparison.regressions)} regressions in B against A")
    return lines


def _short(text, limit: int = 200) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def verdict(data: ReportData) -> list[str]:
    """A few plain lines: adapters, rows, divergences, fastest and leanest at the largest L."""
    s = data.summary()
    lines = []
    if data.comparison is not None:
        c = data.comparison
        lines.append(f"comparison B/A: {len(c.regressions)} regressions, {len(c.improvements)} improvements "
                     f"past ±{c.threshold:.0%} and the runs' noise in {len(c.table)} shared benchmarks; "
                     f"{len(c.conformance_changes)} conformance rows changed status"
                     + (f"; {len(c.not_run_in_b)} benchmarks of A not run in B (outside its selection)"
                        if len(c.not_run_in_b) else "")
                     + (f"; framework versions changed: {', '.join(c.versions_changed)}" if c.versions_changed else ""))
        if data.comparison_only:
            return lines
    if data.conformance is not None:
        lines.extend(completeness(data.conformance))
        if data.problems:
            lines.append(f"{len(data.problems)} unreadable line(s) in the results, listed below: "
                         f"{data.problems[0]}" + (" ..." if len(data.problems) > 1 else ""))
        statuses = ", ".join(f"{s['statuses'].get(k, 0)} {k}" for k in ("pass", "fail", "divergence", "unsupported",
                                                                       "error", "skip") if s["statuses"].get(k))
        lines.append(f"conformance: {len(set(data.conformance.rows['adapter']))} adapters, {s['rows']} rows "
                     f"({statuses or 'none'}), {s['divergences']} distinct known divergences")
    else:
        lines.append("conformance: no results")
    if data.benchmarks is not None:
        fastest, leanest = s.get("fastest"), s.get("leanest")
        excluded = lambda h: f"; {h['excluded']} implausible line(s) left out" if h.get("excluded") else ""
        if fastest:
            lines.append(f"fastest at L={fastest['seq_len']} (of {fastest['lines']} measured there{excluded(fastest)}): "
                         f"{fastest['series']} "
                         f"({format_value(fastest['value'], fastest['unit'])} per forward call)")
        if leanest:
            lines.append(f"leanest at L={leanest['seq_len']} (of {leanest['lines']}{excluded(leanest)}): "
                         f"{leanest['series']} "
                         f"({format_value(leanest['value'], leanest['unit'])} per forward call)")
        if not fastest and not leanest:
            lines.append("benchmarks: no attention timings in the results")
    else:
        lines.append("benchmarks: no results")
    return lines + [f"note: {note}" for note in data.notes]


def completeness(conformance: Conformance) -> list[str]:
    """Whether the conformance run is complete: rows present against rows planned (plan.json), per
    directory, and the shards that are missing. "INCOMPLETE" starts every line that says it is not."""
    parts = conformance.parts or [conformance]
    lines = []
    for part in parts:
        where = "" if len(parts) == 1 else f" in {part.source.parent.parent}"
        present = f"{len(part.rows)} of {part.planned} planned rows present" if part.planned is not None else \
            f"{len(part.rows)} rows present, the number planned unknown (no plan.json)"
        if not part.complete and part.stale is not None:
            lines.append(f"INCOMPLETE conformance run{where} (the latest run was interrupted; {part.stale} is an "
                         f"earlier run's and is not counted): {present}")
        elif not part.complete:
            lines.append(f"INCOMPLETE conformance run{where} (no results.json: interrupted?): {present}")
        elif part.missing:
            lines.append(f"INCOMPLETE conformance run{where}: {present}")
    lines += [f"INCOMPLETE: {note}" for note in conformance.missing_shards]
    budget = []  # what a time budget left out, per directory
    for part in parts:
        where = "" if len(parts) == 1 else f"{part.source.parent.parent}: "
        budget += [where + line for line in results.not_run_lines(part.plan.get("budget"), "conformance rows")]
    if not lines:
        present = sum(len(p.rows) for p in parts)
        where = f" in {len(parts)} directories" if len(parts) > 1 else ""
        lines.append(f"conformance run complete: {present} of {conformance.planned} planned rows present{where}"
                     if conformance.planned is not None else
                     f"conformance run finished (results.json written): {present} rows{where}; the number planned "
                     f"was not recorded (no plan.json)")
    return lines + budget
