"""The report's tables, comparison and escaping, checked against the committed fixture results.

Expected values are recomputed here straight from the raw result files (json, not the reports
package), so a loader or table bug shows up as a mismatch.
"""
from __future__ import annotations

import itertools
import json
import math
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")

from mhabench import reports  # noqa: E402
from mhabench import cli  # noqa: E402
from mhabench.reports import tables  # noqa: E402
from mhabench.reports.compare import classify  # noqa: E402

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "sample"
HOSTILE = "<script>alert('x')</script>\x1b[31m\x07&\"evil\""


# --- raw readers (independent of reports.load) ---------------------------------------------------

def raw_rows():
    with open(FIXTURE / "conformance" / "results.json") as fh:
        rows = json.load(fh)["rows"]
    latest = {}
    for row in rows:
        latest.pop(row["row_id"], None)
        latest[row["row_id"]] = row
    return list(latest.values())


def asv_files(root=FIXTURE / "asv"):
    return [p for p in sorted(root.glob("*/*.json")) if p.name != "machine.json"]


def raw_asv(name_suffix, root=FIXTURE / "asv"):
    """{param tuple: value} of the first benchmark whose name ends with name_suffix, and its param names."""
    meta = json.loads((root / "benchmarks.json").read_text())
    data = json.loads(asv_files(root)[-1].read_text())
    columns = data["result_columns"]
    for name, values in data["results"].items():
        if name.endswith(name_suffix):
            entry = dict(zip(columns, values))
            combos = itertools.product(*entry["params"])
            names = meta[name]["param_names"]
            return {tuple(eval(v) for v in combo): r for combo, r in zip(combos, entry["result"])}, names
    raise KeyError(name_suffix)


def fixture_report(tmp_path_factory):
    """The report of the fixture results, drawn once per test session (the charts are the slow part)."""
    out = tmp_path_factory.getbasetemp() / "fixture-report"
    data = reports.collect(FIXTURE)
    if (out / "index.html").is_file():
        paths = {name: out / f"{name}.csv" for name in data.tables}
        paths.update(html=out / "index.html", markdown=out / "summary.md")
    else:
        paths = reports.write_report(data, out)
    return data, paths


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    return fixture_report(tmp_path_factory)


# --- conformance --------------------------------------------------------------------------------

def test_matrix_counts_match_the_rows(report):
    data, paths = report
    expected = Counter((r["adapter"], r["area"], r["status"]) for r in raw_rows())
    matrix = data.tables["conformance_matrix"]
    assert len(matrix) == len({(a, b) for a, b, _ in expected})
    for record in matrix.to_dict("records"):
        for status in ("pass", "fail", "divergence", "unsupported", "error", "skip"):
            assert record[status] == expected.get((record["adapter"], record["area"], status), 0), (record, status)
        assert record["total"] == sum(v for (a, b, _), v in expected.items()
                                      if (a, b) == (record["adapter"], record["area"]))
    # the CSV next to the page holds the same table
    csv = paths["conformance_matrix"].read_text()
    assert csv.splitlines()[0].startswith("adapter,area,pass,fail,divergence")


def test_worst_error_ratio_is_over_judged_rows_whose_reference_set_the_tolerance(report):
    data, _ = report
    for record in data.tables["conformance_matrix"].to_dict("records"):
        cell = (record["adapter"], record["area"])
        ratios = [r["error_ratio"] for r in raw_rows() if (r["adapter"], r["area"]) == cell
                  and r["status"] in ("pass", "fail") and r.get("error_ratio") is not None
                  and r["tolerance_source"] == "reference"]
        if ratios:
            assert record["worst_error_ratio"] == pytest.approx(max(ratios))
        else:
            assert math.isnan(record["worst_error_ratio"])


def test_pass_rate_and_drill_down(report):
    data, _ = report
    rows = raw_rows()
    summary = data.tables["conformance_adapters"].set_index("adapter")
    for adapter in {r["adapter"] for r in rows}:
        mine = [r for r in rows if r["adapter"] == adapter]
        judged = [r for r in mine if r["status"] in ("pass", "fail", "divergence", "error")]
        passed = sum(r["status"] == "pass" for r in mine)
        if judged:
            assert summary.at[adapter, "pass_rate"] == pytest.approx(passed / len(judged))
    bad = data.tables["conformance_non_passing"]
    assert sorted(bad["row_id"]) == sorted(r["row_id"] for r in rows if r["status"] != "pass")


def test_divergences_listed_with_their_rows(report):
    data, _ = report
    ids = Counter(r["divergence"] for r in raw_rows() if r.get("divergence"))
    catalogue = data.tables["divergences"].set_index("id")
    for div_id, count in ids.items():
        assert catalogue.at[div_id, "rows"] == count
        assert catalogue.at[div_id, "status"] == "ok"


def test_the_catalogue_the_run_checked_is_read_as_written(tmp_path):
    results = tmp_path / "r"
    shutil.copytree(FIXTURE / "conformance", results / "conformance")
    written = json.loads((results / "conformance" / "catalogue.json").read_text())
    written.append({"id": "demo-never-seen", "framework": "demo", "adapters": ["x"], "cases": ["*"], "dtypes": None,
                    "quantities": None, "observed": "it differs", "how": "check finite_and_off",
                    "upstream": "https://example.org/issue/1", "status": "unchecked", "message": "", "rows": 0})
    (results / "conformance" / "catalogue.json").write_text(json.dumps(written))
    conformance = reports.load_conformance(results)
    table = tables.divergence_catalogue(conformance.rows, conformance.catalogue).set_index("id")
    assert table.at["demo-never-seen", "observed"] == "it differs"
    assert table.at["demo-never-seen", "status"] == "unchecked" and table.at["demo-never-seen", "rows"] == 0
    assert table.at["demo-never-seen", "upstream"] == "https://example.org/issue/1"
    stale = [e["id"] for e in written if e["status"] == "stale"]
    assert all(table.at[i, "status"] == "stale" for i in stale)


# --- benchmarks ---------------------------------------------------------------------------------

def test_fit_exponent_recovers_a_power_law():
    lengths = np.array([128, 256, 512, 1024])
    assert tables.fit_exponent(lengths, 3e-6 * lengths ** 1.7) == pytest.approx(1.7)
    assert tables.fit_exponent(lengths, 5.0 * lengths) == pytest.approx(1.0)
    assert math.isnan(tables.fit_exponent([256], [1.0]))
    assert tables.fit_exponent([128, 256, 512], [1.0, float("nan"), 4.0]) == pytest.approx(1.0)


def test_scaling_exponent_matches_the_raw_timings(report):
    data, _ = report
    raw, names = raw_asv("SelfAttention.time_forward")
    scaling = data.tables["scaling"]
    rows = scaling[(scaling["class"] == "SelfAttention") & (scaling["method"] == "time_forward")]
    assert not rows.empty
    checked = 0
    for record in rows.to_dict("records"):
        points = [(p[names.index("seq_len")], v) for p, v in raw.items()
                  if p[names.index("adapter")] == record["adapter"] and p[names.index("mode")] == record["mode"]
                  and p[names.index("num_heads")] == record["num_heads"]
                  and p[names.index("device")] == record["device"]
                  and v is not None and v == v]
        if len({length for length, _ in points}) >= 2:
            slope = np.polyfit(np.log([p[0] for p in points]), np.log([p[1] for p in points]), 1)[0]
            assert record["exponent"] == pytest.approx(slope, rel=1e-9)
            checked += 1
    assert checked >= 1


def test_fraction_of_peak_matches_the_raw_values(report):
    data, _ = report
    peaks, _ = raw_asv("Machine.track_gemm_gflops")
    peak = max(v for v in peaks.values() if v is not None)
    raw, names = raw_asv("SelfAttention.track_gflops_forward")
    fraction = data.tables["peak_fraction"]
    rows = fraction[(fraction["class"] == "SelfAttention") & (fraction["method"] == "track_gflops_forward")]
    assert not rows.empty
    for record in rows.to_dict("records"):
        values = [v for p, v in raw.items() if p[names.index("adapter")] == record["adapter"]
                  and p[names.index("mode")] == record["mode"] and p[names.index("num_heads")] == record["num_heads"]
                  and v is not None and v == v]
        assert record["gemm_peak_gflops"] == pytest.approx(peak)
        assert record["best_fraction"] == pytest.approx(max(values) / peak)


def test_verdict_names_the_fastest_line(report):
    data, _ = report
    raw, names = raw_asv("SelfAttention.time_forward")
    fastest = data.summary()["fastest"]
    at_largest = {p: v for p, v in raw.items() if p[names.index("seq_len")] == fastest["seq_len"]
                  and p[names.index("num_heads")] == fastest["num_heads"] and v is not None and v == v}
    assert fastest["value"] == pytest.approx(min(at_largest.values()))
    assert any("fastest at L=" in line for line in reports.verdict(data))


# --- comparison ---------------------------------------------------------------------------------

def _plant(root: Path, suffix: str, index: int, factor: float, ci: float | None):
    """Scale one result of a copied results dir's asv tree; ci sets its 99% interval to value*(1±ci)."""
    path = asv_files(root / "asv")[-1]
    data = json.loads(path.read_text())
    columns = data["result_columns"]
    name = next(n for n in data["results"] if n.endswith(suffix))
    entry = data["results"][name]
    while len(entry) < len(columns):
        entry.append(None)
    result = entry[columns.index("result")]
    result[index] *= factor
    if ci is not None:
        for key, sign in (("stats_ci_99_a", -1), ("stats_ci_99_b", 1)):
            col = columns.index(key)
            entry[col] = entry[col] or [None] * len(result)
            entry[col][index] = result[index] * (1 + sign * ci)
        col = columns.index("stats_repeat")
        entry[col] = entry[col] or [None] * len(result)
        entry[col][index] = 10
    path.write_text(json.dumps(data))
    return name


def _first_finite_index(suffix):
    raw, _ = raw_asv(suffix)
    return next(i for i, v in enumerate(raw.values()) if v is not None and v == v)


@pytest.fixture()
def pair(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(FIXTURE / "asv", a / "asv")
    shutil.copytree(FIXTURE / "asv", b / "asv")
    return a, b


def _change(comparison, name, index):
    """The change recorded for the index-th parameter combination (asv order) of benchmark ``name``."""
    a_bench = reports.load_benchmarks(Path(comparison.label_a))
    key = a_bench.results[a_bench.results["benchmark"] == name]["params_key"].iloc[index]
    return comparison.table[comparison.table["benchmark"] == name].set_index("params")["change"][key]


def test_compare_flags_a_30_percent_slowdown_and_ignores_3(pair):
    a, b = pair
    index = _first_finite_index("SelfAttention.time_forward")
    slow = _plant(a, "SelfAttention.time_forward", index, 1.0, ci=0.02)
    _plant(b, "SelfAttention.time_forward", index, 1.30, ci=0.02)
    peak_index = _first_finite_index("SelfAttention.track_peakmem_forward")
    small = _plant(b, "SelfAttention.track_peakmem_forward", peak_index, 1.03, ci=None)
    comparison = reports.compare(a, b)
    assert _change(comparison, slow, index) == "regression"
    assert _change(comparison, small, peak_index) == "unchanged"
    worst = comparison.table.iloc[0]
    assert worst["benchmark"] == slow and worst["ratio"] == pytest.approx(1.30)
    assert len(comparison.regressions) == 1 and len(comparison.improvements) == 0


def test_compare_does_not_flag_when_intervals_overlap(pair):
    a, b = pair
    index = _first_finite_index("SelfAttention.time_forward")
    _plant(a, "SelfAttention.time_forward", index, 1.0, ci=0.25)
    name = _plant(b, "SelfAttention.time_forward", index, 1.30, ci=0.25)
    assert _change(reports.compare(a, b), name, index) == "insignificant"


def test_compare_gflops_higher_is_better(pair):
    a, b = pair
    index = _first_finite_index("SelfAttention.track_gflops_forward")
    name = _plant(b, "SelfAttention.track_gflops_forward", index, 0.7, ci=None)
    assert _change(reports.compare(a, b), name, index) == "regression"


def test_classify_mirrors_asv_compare():
    base = {"method": "time_forward", "version": "v", "repeat": 10}
    a = {**base, "value": 1.0, "ci_low": 0.99, "ci_high": 1.01}
    assert classify(a, {**base, "value": 1.3, "ci_low": 1.29, "ci_high": 1.31}, 1.1)[0] == "regression"
    assert classify(a, {**base, "value": 0.7, "ci_low": 0.69, "ci_high": 0.71}, 1.1)[0] == "improvement"
    assert classify(a, {**base, "value": 1.05, "ci_low": 1.04, "ci_high": 1.06}, 1.1)[0] == "unchanged"
    # a single repeat carries no usable interval: the factor alone decides, as in asv
    single = {**base, "repeat": 1, "value": 1.3, "ci_low": 0.5, "ci_high": 2.0}
    assert classify({**a, "repeat": 1}, single, 1.1)[0] == "regression"
    assert classify(a, {**base, "value": math.nan}, 1.1)[0] == "failed in B"
    assert classify(a, {**a, "version": "other", "value": 5.0}, 1.1)[0] == "not comparable"


def test_compare_nothing_in_common_is_one_line_exit_2(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(FIXTURE / "asv", a / "asv")
    shutil.copytree(FIXTURE / "asv", b / "asv")
    path = asv_files(b / "asv")[-1]
    data = json.loads(path.read_text())
    data["results"] = {f"renamed.{k}": v for k, v in data["results"].items()}
    path.write_text(json.dumps(data))
    code = cli.main(["report", "--compare", str(a), str(b), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert "nothing in common" in err and len(err.strip().splitlines()) == 1


def test_compare_command_writes_the_comparison(pair, tmp_path, capsys):
    a, b = pair
    index = _first_finite_index("SelfAttention.time_forward")
    _plant(a, "SelfAttention.time_forward", index, 1.0, ci=0.02)
    _plant(b, "SelfAttention.time_forward", index, 1.5, ci=0.02)
    out = tmp_path / "out"
    assert cli.main(["report", "--compare", str(a), str(b), "--out", str(out)]) == 0
    assert "1 regressions" in capsys.readouterr().out
    assert "regression" in (out / "comparison.csv").read_text()
    assert "Comparison" in (out / "index.html").read_text()


# --- inputs and escaping ------------------------------------------------------------------------

def test_missing_and_corrupt_inputs_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["report", "--results", str(tmp_path / "absent"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", "--results", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "no conformance or benchmark results" in capsys.readouterr().err
    broken = tmp_path / "broken" / "conformance"
    broken.mkdir(parents=True)
    (broken / "results.json").write_text('{"meta": {}, "rows": [')
    assert cli.main(["report", "--results", str(tmp_path / "broken"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert "not valid JSON" in err and len(err.splitlines()) == 1


def test_one_half_only_gets_a_section_saying_so(tmp_path):
    only_conf = tmp_path / "c"
    shutil.copytree(FIXTURE / "conformance", only_conf / "conformance")
    data, paths = reports.build_report(only_conf, tmp_path / "oc")
    assert "No benchmark results" in paths["html"].read_text()
    assert "No benchmark results" in paths["markdown"].read_text()
    only_bench = tmp_path / "b"
    shutil.copytree(FIXTURE / "asv", only_bench / "asv")
    # the charts are not what this test is about: leave them out to keep it fast
    data = reports.collect(only_bench)
    data.benchmarks.results = data.benchmarks.results.iloc[0:0]
    data.attention = data.attention.iloc[0:0]
    paths = reports.write_report(data, tmp_path / "ob")
    assert "No conformance results" in paths["html"].read_text()


def _hostile_results(root: Path) -> Path:
    rows = raw_rows()[:6]
    for i, row in enumerate(rows):
        row["adapter"] = HOSTILE + str(i % 2)
        row["message"] = "<img src=x onerror=alert(1)>\x00" + HOSTILE
        row["case"] = "</td></tr></table><script>bad()</script>"
        row["status"] = ["fail", "divergence", "error"][i % 3]
        row["divergence"] = HOSTILE if row["status"] == "divergence" else None
    meta = {"cpu": HOSTILE, "versions": {HOSTILE: HOSTILE},
            "divergences": [{"id": HOSTILE, "observed": "<script>x()</script>", "upstream": "javascript:alert(1)"}]}
    (root / "conformance").mkdir(parents=True)
    (root / "conformance" / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    return root


def test_hostile_strings_are_escaped(tmp_path):
    data, paths = reports.build_report(_hostile_results(tmp_path / "r"), tmp_path / "out")
    page = paths["html"].read_text()
    assert "<script" not in page.lower()
    # the only images are the report's own inline charts
    assert all(tag.startswith('<img class="chart" src="data:image/png;base64,')
               for tag in re.findall(r"<img[^>]*>", page, flags=re.I))
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page
    assert 'href="javascript' not in page
    for ch in ("\x00", "\x07", "\x1b"):
        assert ch not in page
        assert ch not in paths["markdown"].read_text()
    summary = paths["markdown"].read_text()
    assert "<script" not in summary.lower()
    # the table structure survived: every opened row is closed
    assert page.count("<tr>") + page.count("<tr ") == page.count("</tr>")


def test_markdown_summary_has_the_headline_tables(report):
    data, paths = report
    summary = paths["markdown"].read_text()
    for heading in ("## Conformance", "## Known divergences", "## Scaling", "## Fraction of GEMM peak"):
        assert heading in summary
    for adapter in data.tables["conformance_adapters"]["adapter"]:
        assert reports.markdown.md(adapter) in summary


# --- the main job -------------------------------------------------------------------------------

def test_run_keeps_going_when_a_stage_fails(tmp_path, monkeypatch, capsys):
    from mhabench.commands import run as run_command
    results = tmp_path / "results"
    shutil.copytree(FIXTURE / "conformance", results / "conformance")
    original = run_command.stages_for

    def broken_conform(args):
        stages = original(args)
        stages[0].argv = ["no-such-command"]
        return stages
    monkeypatch.setattr(run_command, "stages_for", broken_conform)
    code = cli.main(["run", "--results", str(results), "--out", str(tmp_path / "out"), "--skip-bench"])
    out = capsys.readouterr().out
    assert code == 1
    assert "conform: failed" in out and "bench: skipped" in out and "report: ok" in out
    assert (tmp_path / "out" / "index.html").is_file()
    assert (results / "logs" / "conform.log").is_file()
