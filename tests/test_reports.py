"""The report's tables, comparison and escaping, checked against the committed fixture results.

Expected values are recomputed here straight from the raw result files (json, not the reports
package), so a loader or table bug shows up as a mismatch.
"""
from __future__ import annotations

import html
import itertools
import json
import math
import re
import shlex
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("matplotlib")

from mhabench import reports  # noqa: E402
from mhabench import cli  # noqa: E402
from mhabench import results  # noqa: E402
from mhabench.reports import tables  # noqa: E402
from mhabench.schema import Row  # noqa: E402
from mhabench.reports.compare import Drift, classify, drift  # noqa: E402

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "sample"
MIXED = FIXTURE.parent / "mixed"  # fail, error and unsupported rows; asv over three classes and four lengths
HOSTILE = "<script>alert('x')</script>\x1b[31m\x07&\"evil\""


# --- raw readers (independent of reports.load) ---------------------------------------------------

def raw_rows(root=FIXTURE):
    with open(root / "conformance" / "results.json") as fh:
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


# --- the drill-down: failures first, then divergences, then what could not run -------------------

@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """The report of the fixture with fail, error and unsupported rows (and asv over three classes)."""
    return reports.build_report(MIXED, tmp_path_factory.mktemp("mixed-report"))


def test_failures_come_first_each_with_its_rerun_command(mixed):
    data, paths = mixed
    page = paths["html"].read_text()
    starts = [page.index(f"id='{anchor}'") for anchor in ("failures", "divergences", "not-run", "agreement")]
    assert starts == sorted(starts), "failures, then divergences, then unsupported, then the side-by-side view"
    expected = [r for r in raw_rows(MIXED) if r["status"] in ("fail", "error")]
    assert {r["status"] for r in expected} == {"fail", "error"}, "the fixture must hold both"
    failures = data.tables["failures"]
    assert sorted(failures["row_id"]) == sorted(r["row_id"] for r in expected)
    assert list(failures["status"]) == sorted(failures["status"], key=["error", "fail"].index)  # errors first
    section = page[starts[0]:starts[1]]
    assert section.count('<tr class="f"') == len(expected) == section.count("rerun: <code>")
    for r in expected:
        assert f">{html.escape(r['row_id'])}<" in section and html.escape(r["message"]) in section


def test_rerun_command_names_exactly_the_row_and_its_plugins(mixed):
    data, _ = mixed
    plan = json.loads((MIXED / "conformance" / "plan.json").read_text())
    for record in data.tables["failures"].to_dict("records"):
        argv = shlex.split(record["rerun"])
        assert argv[0] == "mhabench"
        args = cli.build_parser().parse_args(argv[1:])
        assert args.command == "conform" and args.rerun == record["row_id"] and args.results == str(MIXED)
        assert args.adapter == plan["adhoc"]  # a plugin adapter's row reruns only with its --adapter


@pytest.mark.parametrize("which", ["report", "mixed"])
def test_each_divergence_entry_is_one_line_that_expands_to_its_rows(which, request):
    from mhabench.reports.html import ENTRY_ROWS
    data, paths = request.getfixturevalue(which)
    page = paths["html"].read_text()
    counts = Counter(r["divergence"] for r in raw_rows(FIXTURE if which == "report" else MIXED) if r["divergence"])
    assert counts
    table = data.tables["divergences"].set_index("id")
    for div_id, count in counts.items():
        assert table.at[div_id, "rows"] == count
        block = page.split(f"id='div-{div_id}'>", 1)[1].split("</details>", 1)[0]
        summary, rows = block.split("</summary>", 1)
        assert f"<span class='shown'>{count}</span> of {count} rows" in summary
        lines = rows.count('<tr class="f"')
        if count <= ENTRY_ROWS:
            assert lines == count  # expanded: exactly the rows the line counts
        else:  # grouped, each group counting its rows for the filters
            assert lines < count and sum(map(int, re.findall(r'data-n="(\d+)"', rows))) == count
        assert set(re.findall(r'data-status="(\w+)"', rows)) == {"divergence"}
    assert page.index("id='failures'") < page.index("id='div-")


def test_unsupported_rows_grouped_by_reason(mixed):
    data, paths = mixed
    expected = Counter(r["message"] for r in raw_rows(MIXED) if r["status"] == "unsupported")
    assert len(expected) > 1
    groups = data.tables["not_run"]
    assert dict(zip(groups["reason"], groups["rows"])) == dict(expected)
    page = paths["html"].read_text()
    section = page[page.index("id='not-run'"):page.index("id='agreement'")]
    for block in section.split("<details class='fg'>")[1:]:
        reason = html.unescape(block.split("<span class='observed'>", 1)[1].split("</span>", 1)[0])
        counts = [int(n) for n in re.findall(r'data-n="(\d+)"', block)]
        assert sum(counts) == expected[reason]  # the group's rows add up to the reason's rows


def test_page_reads_without_javascript(mixed):
    _, paths = mixed
    page = paths["html"].read_text()
    # the filter bar is the only thing hidden; expanding is <details>, which needs no script
    assert page.count(" hidden") == 1 and "<div id='filters' class='filters' hidden>" in page
    assert "<details" in page and not re.search(r"<(?:script|link|img|iframe)[^>]*\s(?:src|href)=\"?https?:", page)


# --- frameworks side by side ---------------------------------------------------------------------

def hand_agreement(rows, a, b):
    """The agreement of two adapters computed straight from their rows: the bound's maximum and n."""
    by_key = {}
    for r in rows:
        by_key.setdefault((r["case"], r["dtype"], r["quantity"]), {})[r["adapter"]] = r
    upper, lower = [], []
    for pair in by_key.values():
        if a in pair and b in pair:
            x, y = pair[a], pair[b]
            if {x["status"], y["status"]} <= {"pass", "fail"} and x["max_abs_err"] is not None \
                    and y["max_abs_err"] is not None and x["tolerance"] and y["tolerance"]:
                upper.append((x["max_abs_err"] + y["max_abs_err"]) / x["tolerance"])
                lower.append(abs(x["max_abs_err"] - y["max_abs_err"]) / x["tolerance"])
                assert x["tolerance"] == y["tolerance"]  # the tolerance is the computation's, not the adapter's
    return len(upper), max(upper), max(lower)


@pytest.mark.parametrize("a,b", [("numpy_oracle", "torch_sdpa"), ("jax_dpa", "torch_mha"), ("jax_dpa", "torch_sdpa")])
def test_agreement_matrix_matches_the_rows(report, a, b):
    data, paths = report
    n, upper, lower = hand_agreement(raw_rows(), a, b)
    record = data.tables["agreement"].set_index(["adapter_a", "adapter_b"]).loc[(a, b)]
    assert record["compared"] == n and n > 20
    assert record["upper_tol"] == pytest.approx(upper) and record["lower_tol"] == pytest.approx(lower)
    csv = pd.read_csv(paths["agreement"]).set_index(["adapter_a", "adapter_b"]).loc[(a, b)]
    assert csv["upper_tol"] == pytest.approx(upper) and csv["compared"] == n
    page = paths["html"].read_text()
    anchor = f"pair-{a}--{b}"
    assert f"href='#{anchor}'" in page and f'id="{anchor}"' in page  # the worst case is one click away
    assert f"≤ {reports.html.fmt(upper)} tol</a> · n={n}" in page
    assert f"≤{upper:.2g} (n={n})" in paths["markdown"].read_text()


def test_catalogued_divergences_are_named_in_the_cell(report):
    data, paths = report
    rows, catalogue = raw_rows(), json.loads((FIXTURE / "conformance" / "catalogue.json").read_text())
    how = {e["id"]: e["how"] for e in catalogue}
    by_key = {}
    for r in rows:
        by_key.setdefault((r["case"], r["dtype"], r["quantity"]), {})[r["adapter"]] = r
    both = Counter((how[p["jax_dpa"]["divergence"]], how[p["torch_mha"]["divergence"]]) for p in by_key.values()
                   if p.get("jax_dpa", {}).get("divergence") and p.get("torch_mha", {}).get("divergence"))
    assert both, "the fixture has rows where both diverge, each its own way"
    (x, y), count = both.most_common(1)[0]
    text = f"{x} vs {y} ({count})"  # e.g. uniform weights in JAX against NaN in torch for a fully masked row
    assert text in data.tables["agreement"].set_index(["adapter_a", "adapter_b"]).at[("jax_dpa", "torch_mha"),
                                                                                     "divergences"]
    assert html.escape(text) in paths["html"].read_text()


def test_agreement_bound_contains_the_true_difference_of_real_arrays():
    """The method, checked where the outputs are known: the interval the table gives from two rows'
    errors contains max|a - b| of the arrays behind them."""
    rng = np.random.default_rng(0)
    rows, truth = [], {}
    for case in range(40):
        golden = rng.normal(size=64)
        out = {name: golden + rng.normal(scale=rng.uniform(0, 2e-5), size=64) for name in ("x", "y")}
        truth[f"c{case}"] = float(np.max(np.abs(out["x"] - out["y"])))
        for name, actual in out.items():
            rows.append({"row_id": f"{name}-c{case}", "adapter": name, "machine": "m", "device": "cpu",
                         "case": f"c{case}", "dtype": "float32", "quantity": "output", "status": "pass",
                         "max_abs_err": float(np.max(np.abs(actual - golden))), "tolerance": 1e-5,
                         "divergence": None})
    record = tables.agreement(pd.DataFrame(rows)).iloc[0]
    assert record["compared"] == 40
    worst = max(truth.values()) / 1e-5
    assert record["lower_tol"] <= worst <= record["upper_tol"]
    assert truth[record["worst_case"]] <= record["upper_tol"] * 1e-5


# --- completeness and unreadable lines (issue 15) -------------------------------------------------

def test_a_complete_run_says_so(report):
    data, _ = report
    planned = json.loads((FIXTURE / "conformance" / "plan.json").read_text())["rows"]
    assert f"conformance run complete: {len(raw_rows())} of {planned} planned rows present" in reports.verdict(data)


def test_killed_run_with_bad_lines_is_reported_incomplete_with_every_line(tmp_path, capsys):
    root = tmp_path / "killed"
    (root / "conformance").mkdir(parents=True)
    shutil.copy(MIXED / "conformance" / "plan.json", root / "conformance" / "plan.json")
    rows = raw_rows(MIXED)
    mangled = {("stat" if k == "status" else k): v for k, v in rows[50].items()}  # valid JSON, a key mangled
    lines = [json.dumps(r) for r in rows[:50]] + ['{"row_id": "x", "adapter": corrupt'] + [json.dumps(mangled)] \
        + [json.dumps(r) for r in rows[51:60]]
    journal = root / "conformance" / "rows.jsonl"
    journal.write_text("\n".join(lines) + "\n" + json.dumps(rows[60])[:40])  # killed mid-write: no newline
    code = cli.main(["report", "--results", str(root), "--out", str(tmp_path / "out")])
    out, err = capsys.readouterr()
    assert code == 0
    planned = json.loads((MIXED / "conformance" / "plan.json").read_text())["rows"]
    assert f"INCOMPLETE conformance run (no results.json: interrupted?): 59 of {planned} planned rows present" in out
    expected = [f"{journal}:51: corrupt line", f"{journal}:52: not a valid record (missing field status)",
                f"{journal}:62: truncated last line"]
    unreadable = [line for line in err.splitlines() if line.startswith("unreadable: ")]
    assert len(unreadable) == 3 and all(e in u for e, u in zip(expected, unreadable))
    page = (tmp_path / "out" / "index.html").read_text()
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "INCOMPLETE conformance run" in page and "59 of" in summary
    for e in expected:
        assert html.escape(e) in page and e in summary


def test_a_bad_row_in_results_json_is_listed(tmp_path):
    root = tmp_path / "r"
    shutil.copytree(MIXED / "conformance", root / "conformance")
    data = json.loads((root / "conformance" / "results.json").read_text())
    del data["rows"][7]["status"]
    (root / "conformance" / "results.json").write_text(json.dumps(data))
    report = reports.collect(root)
    assert any(p.endswith("results.json: row 7: missing field status") for p in report.problems)
    assert any("INCOMPLETE conformance run: 221 of 222" in line for line in reports.verdict(report))


def test_a_run_killed_after_a_finished_one_is_incomplete_not_the_old_summary(tmp_path, monkeypatch, capsys):
    """A finished run, then a second run into the same directory killed after its first rows: the report
    counts the second run's journal against its plan, never the first run's results.json."""
    from mhabench.conformance import session
    root = tmp_path / "r"
    plan = session.make_plan("numpy_oracle", "float32", "masks")
    session.run(plan, root, jobs=1)
    assert any(line.startswith("conformance run complete") for line in reports.verdict(reports.collect(root)))

    real_run_rows = session.run_rows

    def killed_after_the_first_batch(*args, on_rows, **kwargs):
        def write_then_die(batch):
            on_rows(batch)
            raise KeyboardInterrupt
        return real_run_rows(*args, on_rows=write_then_die, **kwargs)
    monkeypatch.setattr(session, "run_rows", killed_after_the_first_batch)
    with pytest.raises(KeyboardInterrupt):
        session.run(plan, root, jobs=1)
    journal = [json.loads(line) for line in (root / "conformance" / "rows.jsonl").read_text().splitlines()]
    assert 0 < len(journal) < plan.rows
    assert cli.main(["report", "--results", str(root), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"INCOMPLETE conformance run (the latest run was interrupted; {root / 'conformance' / 'results.json'} " \
           f"is an earlier run's and is not counted): {len(journal)} of {plan.rows} planned rows present" in out
    assert f"conformance: 1 adapters, {len(journal)} rows" in out


def test_a_run_killed_before_its_first_row_is_reported_as_incomplete_with_no_rows(tmp_path, monkeypatch, capsys):
    """A second run killed before it wrote a row (its frameworks still starting) leaves a plan and an empty
    journal: the report says so in one line, without the first run's rows and without a traceback."""
    from mhabench.conformance import session
    root = tmp_path / "r"
    plan = session.make_plan("numpy_oracle", "float32", "masks")
    session.run(plan, root, jobs=1)

    def killed_before_any_row(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(session, "run_rows", killed_before_any_row)
    with pytest.raises(KeyboardInterrupt):
        session.run(plan, root, jobs=1)
    assert (root / "conformance" / "rows.jsonl").read_text() == ""
    assert cli.main(["report", "--results", str(root), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert f"is an earlier run's and is not counted): 0 of {plan.rows} planned rows present" in out
    assert "conformance: 0 adapters, 0 rows" in out
    assert (tmp_path / "out" / "index.html").read_text().rstrip().endswith("</html>")


def test_a_report_the_disk_cannot_hold_leaves_the_previous_one_whole(tmp_path, monkeypatch, capsys):
    import errno
    import os
    out = tmp_path / "out"
    assert cli.main(["report", "--results", str(MIXED), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real, calls = os.fsync, [0]

    def fsync(fd):  # the disk fills up while the new report is being written
        calls[0] += 1
        if calls[0] > 5:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)
    monkeypatch.setattr(os, "fsync", fsync)
    capsys.readouterr()
    assert cli.main(["report", "--results", str(FIXTURE), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and "Traceback" not in err
    assert re.search(rf"cannot write {re.escape(str(out))}/\S+: No space left on device", err)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "the old report is whole, no temporary file"
    monkeypatch.undo()
    (out / "summary.md").unlink()
    (out / "summary.md").mkdir()  # a directory where a file goes
    assert cli.main(["report", "--results", str(FIXTURE), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mhabench report: error: cannot write {out / 'summary.md'}: a directory is in the way; the " \
                  f"report in {out} was left as it was"
    assert (out / "index.html").read_bytes() == before["index.html"]


def test_the_agreement_does_not_depend_on_how_the_rows_are_chunked(report):
    data, _ = report
    rows = data.conformance.rows
    whole = tables.agreement(rows, data.conformance.catalogue, chunk_rows=10 ** 9)
    assert whole["compared"].sum() > 0
    for chunk_rows in (1, 37, 500):
        pd.testing.assert_frame_equal(tables.agreement(rows, data.conformance.catalogue, chunk_rows=chunk_rows), whole)


def test_loaded_rows_share_one_object_per_distinct_value():
    rows = reports.collect(MIXED).conformance.rows
    for column in ("adapter", "case", "status", "spec"):
        assert len({id(v) for v in rows[column]}) == len({json.dumps(v, sort_keys=True) for v in rows[column]}), column


@pytest.mark.slow
def test_the_report_of_a_large_journal_stays_within_bounded_memory(tmp_path):
    """200,000 rows: the report streams the journal and holds shared values, so its peak stays a fraction
    of what reading the rows whole took (about 1.6 GB at this size; 8 GB at a million rows)."""
    import importlib.util
    import resource
    import subprocess
    import sys
    spec = importlib.util.spec_from_file_location("large_results", FIXTURE.parent / "large_results.py")
    large = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(large)
    large.write(tmp_path / "big", 200_000)
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    done = subprocess.run([sys.executable, "-m", "mhabench", "report", "--results", str(tmp_path / "big"), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "conformance run complete: 200000 of 200000 planned rows present" in done.stdout
    peak_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    assert peak_mib < 600 or before / 1024 >= 600, f"peak RSS {peak_mib:.0f} MiB"


# --- several results directories: machines, shards, nights (issue 19) -----------------------------

def _copy(source: Path, target: Path, parts=("conformance", "asv")) -> Path:
    for part in parts:
        shutil.copytree(source / part, target / part)
    return target


def test_two_machines_merge_with_the_machine_dimension(tmp_path, capsys):
    a, b = _copy(MIXED, tmp_path / "a"), _copy(MIXED, tmp_path / "b")
    results = json.loads((b / "conformance" / "results.json").read_text())
    changed = next(r for r in results["rows"] if r["status"] == "pass" and r["adapter"] == "torch_mha")
    changed.update(status="fail", message="differs on this machine")
    (b / "conformance" / "results.json").write_text(json.dumps(results))
    data = reports.collect([a, b], machines=["cpu-box", "gpu-box"])
    rows = data.conformance.rows
    assert len(rows) == 2 * len(raw_rows(MIXED)) and set(rows["machine"]) == {"cpu-box", "gpu-box"}
    per_machine = data.tables["machines"].groupby("machine")["total"].sum()
    assert dict(per_machine) == {"cpu-box": len(raw_rows(MIXED)), "gpu-box": len(raw_rows(MIXED))}
    cross = data.tables["cross_machine"]
    assert list(cross["row_id"]) == [changed["row_id"]]
    assert cross.iloc[0]["cpu-box / cpu"] == "pass" and cross.iloc[0]["gpu-box / cpu"] == "fail"
    # one line per machine x adapter in the charts; both machines' measurements kept
    series = set(data.attention["series"])
    assert {"cpu-box: torch_sdpa", "gpu-box: torch_sdpa"} <= series
    single = reports.collect(MIXED).attention
    assert len(data.attention) == 2 * len(single)
    assert f"conformance run complete: {2 * len(raw_rows(MIXED))} of {2 * 222} planned rows present in 2 " \
           "directories" in reports.verdict(data)
    # the CLI takes the same
    code = cli.main(["report", "--results", str(a), str(b), "--machine", "cpu-box", "gpu-box",
                     "--out", str(tmp_path / "out")])
    assert code == 0 and "in 2 directories" in capsys.readouterr().out
    page = (tmp_path / "out" / "index.html").read_text()
    assert page.index("id='cross-machine'") < page.index("Per machine × device") < page.index("id='scaling'")
    assert html.escape(changed["row_id"]) in page.split("id='cross-machine'")[1].split("Per machine")[0]
    assert "cpu-box" in page and "gpu-box" in page


def test_the_same_results_twice_are_counted_once(tmp_path):
    a, b = _copy(MIXED, tmp_path / "a"), _copy(MIXED, tmp_path / "b")
    data = reports.collect([a, b])
    assert len(data.conformance.rows) == len(raw_rows(MIXED))
    assert len(data.attention) == len(reports.collect(MIXED).attention)
    notes = " ".join(data.notes)
    assert f"{len(raw_rows(MIXED))} row(s) of {a} also appear in a newer results directory" in notes
    assert "appear in more than one asv result file" in notes


def _with_torch(root: Path, version: str, created: str, fail: str | None = None) -> Path:
    """``root``'s conformance results as recorded under another torch: its rows' framework_version and the run's
    meta; ``fail``: a row id that fails under this version."""
    path = root / "conformance" / "results.json"
    results = json.loads(path.read_text())
    results["meta"].update(created=created, versions={**results["meta"]["versions"], "torch": version})
    for row in results["rows"]:
        if row["adapter"] == "torch_mha":
            row["framework_version"] = f"torch {version}"
        if row["row_id"] == fail:
            row.update(status="fail", message="fails under this version")
    path.write_text(json.dumps(results))
    return root


def _three_torches(tmp_path: Path):
    """MIXED's conformance run as three nights of one machine under torch 2.13.0, 2.12.1 and 2.9.0 (oldest first,
    given in another order), a torch_mha row failing under 2.9.0 only; and that row's id."""
    changed = next(r["row_id"] for r in raw_rows(MIXED) if r["status"] == "pass" and r["adapter"] == "torch_mha")
    nights = {version: _with_torch(_copy(MIXED, tmp_path / version, ("conformance",)), version,
                                   f"2026-12-0{day}T00:00:00+00:00", changed if version == "2.9.0" else None)
              for day, version in ((1, "2.13.0"), (2, "2.12.1"), (3, "2.9.0"))}
    return [nights["2.9.0"], nights["2.13.0"], nights["2.12.1"]], changed


def test_rows_of_different_framework_versions_are_all_kept_by_a_merge(tmp_path, capsys):
    dirs, changed = _three_torches(tmp_path)
    data = reports.collect(dirs)
    rows = data.conformance.rows
    torch_rows = sum(r["adapter"] == "torch_mha" for r in raw_rows(MIXED))
    assert len(rows) == len(raw_rows(MIXED)) + 2 * torch_rows  # numpy's rows, one version, counted once
    torch = rows[rows["adapter"] == "torch_mha"]
    assert torch.groupby("framework_version").size().to_dict() == \
        {f"torch {v}": torch_rows for v in ("2.13.0", "2.12.1", "2.9.0")}
    notes = " ".join(data.notes)
    assert f"{len(raw_rows(MIXED)) - torch_rows} row(s) of {dirs[1]} also appear" in notes  # the numpy rows only
    assert f"torch_mha ran under several framework versions (torch 2.13.0 in {dirs[1]}; torch 2.12.1 in " \
           f"{dirs[2]}; torch 2.9.0 in {dirs[0]})" in notes
    summary = data.tables["conformance_adapters"]
    lines = summary[summary["adapter"] == "torch_mha"]
    assert list(lines["framework_version"]) == ["torch 2.13.0", "torch 2.12.1", "torch 2.9.0"]  # run order
    assert list(lines["total"]) == [torch_rows] * 3 and list(lines["fail"].diff().fillna(0)) == [0, 0, 1]
    changes = data.tables["version_changes"]
    assert list(changes["row_id"]) == [changed]
    assert changes.iloc[0]["versions"] == "torch 2.13.0 → torch 2.12.1 → torch 2.9.0"
    assert changes.iloc[0]["outcomes"] == "pass → pass → fail"
    code = cli.main(["report", "--results", *map(str, dirs), "--out", str(tmp_path / "out")])
    assert code == 0 and "ran under several framework versions" in capsys.readouterr().out
    page = (tmp_path / "out" / "index.html").read_text()
    section = page.split("id='version-changes'")[1].split("<h3")[0]
    assert html.escape(changed) in section and "torch 2.13.0 → torch 2.12.1 → torch 2.9.0" in section
    summary_md = (tmp_path / "out" / "summary.md").read_text()
    assert "a different verdict per framework version (1)" in summary_md


def test_machines_of_different_framework_versions_are_labelled_with_their_own(tmp_path):
    dirs, changed = _three_torches(tmp_path)
    data = reports.collect(dirs, machines=["old-box", "new-box", "mid-box"])
    summary = data.tables["conformance_adapters"]
    lines = summary[summary["adapter"] == "torch_mha"].set_index("machines")["framework_version"]
    assert lines.to_dict() == {"new-box": "torch 2.13.0", "mid-box": "torch 2.12.1", "old-box": "torch 2.9.0"}
    cross = data.tables["cross_machine"].set_index("row_id")
    assert list(cross.index) == [changed] and cross.at[changed, "old-box / cpu"] == "fail"
    assert cross.at[changed, "differs"].startswith("framework_version: ")
    assert "old-box / cpu torch 2.9.0" in cross.at[changed, "differs"]
    assert data.tables["version_changes"].empty  # each machine ran one version


def test_a_comparison_shows_the_version_change_beside_the_verdict_change(tmp_path, capsys):
    dirs, changed = _three_torches(tmp_path)
    old, new = dirs[1], dirs[2]
    _with_torch(new, "2.13.1", "2026-12-05T00:00:00+00:00", changed)  # the next night upgrades torch
    data = reports.collect(None, reports.compare(old, new))
    row = data.comparison.conformance_changes.set_index("row_id").loc[changed]
    assert (row["status_a"], row["status_b"]) == ("pass", "fail")
    assert (row["framework_version_a"], row["framework_version_b"]) == ("torch 2.13.0", "torch 2.13.1")
    assert "framework versions changed: torch 2.13.0 -> 2.13.1" in reports.verdict(data)[0]
    code = cli.main(["report", "--compare", str(old), str(new), "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert code == 0 and f"pass -> fail  {changed}  (torch 2.13.0 -> torch 2.13.1)" in out


def test_shards_of_two_runs_under_different_versions_are_two_runs(tmp_path):
    first, second = _shards(tmp_path / "night1", 2), _shards(tmp_path / "night2", 2)
    for root in second:
        _with_torch(root, "2.14.0", "2026-12-06T00:00:00+00:00")
    data = reports.collect([*first, *second])
    assert not any("given 2 times" in note for note in data.notes) and not data.conformance.missing_shards
    assert len(data.conformance.rows) == 222 + sum(r["adapter"] == "torch_mha" for r in raw_rows(MIXED))


def _shards(tmp_path: Path, count: int) -> list[Path]:
    """The fixture's rows split into ``count`` shard directories, each with its plan."""
    source = json.loads((MIXED / "conformance" / "results.json").read_text())
    plan = json.loads((MIXED / "conformance" / "plan.json").read_text())
    dirs = []
    for k in range(1, count + 1):
        rows = source["rows"][k - 1::count]
        root = tmp_path / f"shard{k}"
        (root / "conformance").mkdir(parents=True)
        (root / "conformance" / "results.json").write_text(json.dumps({"meta": source["meta"], "rows": rows}))
        (root / "conformance" / "plan.json").write_text(json.dumps({**plan, "rows": len(rows), "shard": [k, count]}))
        dirs.append(root)
    return dirs


def test_shards_merge_whole_and_a_missing_one_is_named(tmp_path):
    dirs = _shards(tmp_path, 3)
    whole = reports.collect(dirs)
    merged = whole.conformance.rows.set_index("row_id")["status"].sort_index()
    original = pd.Series({r["row_id"]: r["status"] for r in raw_rows(MIXED)}).sort_index()
    assert merged.to_dict() == original.to_dict()
    assert any(line.startswith("conformance run complete: 222 of 222") for line in reports.verdict(whole))
    machine = whole.conformance.machine
    gap = reports.verdict(reports.collect([dirs[0], dirs[2]]))
    assert f"INCOMPLETE: machine {machine}: shard 2/3 missing (present: 1/3, 3/3): their rows are not in this " \
           "report" in gap
    twice = reports.collect([*dirs, dirs[1]])
    assert len(twice.conformance.rows) == 222
    assert any("shard 2/3 given 2 times" in note for note in twice.notes)


def test_asv_results_of_several_machines_in_one_tree_are_read_together(tmp_path):
    root = _copy(MIXED, tmp_path / "r", parts=("asv",))
    shutil.copytree(root / "asv" / "vm", root / "asv" / "other")
    for path in (root / "asv" / "other").glob("*.json"):
        data = json.loads(path.read_text())
        (data.get("params") or data)["machine"] = "other"
        path.write_text(json.dumps(data))
    report = reports.collect(root)
    assert set(report.benchmarks.results["machine"]) == {"vm", "other"}
    assert {"vm: torch_sdpa", "other: torch_sdpa"} <= set(report.attention["series"])
    assert set(report.peaks) == {("vm", "cpu"), ("other", "cpu")}
    code = cli.main(["report", "--results", str(root), "--machine", "one", "--out", str(tmp_path / "o")])
    assert code == 2  # one name cannot cover a tree of two machines


def test_machine_option_errors_are_one_line(tmp_path, capsys):
    a, b = _copy(MIXED, tmp_path / "a", ("conformance",)), _copy(MIXED, tmp_path / "b", ("conformance",))
    code = cli.main(["report", "--results", str(a), str(b), "--machine", "x", "y", "z", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "--machine" in err and "3 names for 2 directories" in err


# --- the scaling summary --------------------------------------------------------------------------

def test_scaling_summary_names_the_fastest_and_leanest_per_class_and_length(mixed):
    data, paths = mixed
    winners = data.tables["scaling_winners"]
    assert set(winners["class"]) == {"SelfAttention", "CausalSelfAttention", "CrossAttention"}
    for suffix, column in (("time_forward", "fastest"), ("track_peakmem_forward", "leanest")):
        for klass in set(winners["class"]):
            raw, names = raw_asv(f".{klass}.{suffix}", MIXED / "asv")
            for record in winners[winners["class"] == klass].to_dict("records"):
                measured = {p[names.index("adapter")]: v for p, v in raw.items()
                            if p[names.index("seq_len")] == record["L"] and p[names.index("num_heads")] == 4
                            and v is not None and v == v}
                assert record[column] == min(measured, key=measured.get), (klass, record["L"], column)
    assert sorted(set(winners["L"])) == [128, 256, 512, 1024]
    lines = data.tables["scaling_lines"].set_index(["class", "series"])
    scaling = data.tables["scaling"]
    for record in scaling[scaling["method"] == "time_forward"].to_dict("records"):
        assert lines.at[(record["class"], record["series"]), "time_exponent"] == pytest.approx(record["exponent"])
    page = paths["html"].read_text()
    summary = page[page.index("id='scaling-summary'"):]
    assert summary.index("id='scaling-summary'") < summary.index("<figure")  # above the charts
    links = set(re.findall(r"href='#(chart-[^']+)'", summary))
    assert links and all(f'id="{link}"' in page for link in links)


def test_a_fraction_of_peak_above_one_is_flagged_not_shown(report):
    data, paths = report
    faults = data.tables["peak_fraction"][data.tables["peak_fraction"]["fault"] != ""]
    assert not faults.empty
    page = paths["html"].read_text()
    for record in faults.to_dict("records"):
        raw = record["best_gflops"] / record["gemm_peak_gflops"]
        assert raw > 1 and f"{raw:.1%}" not in page  # never printed as a fraction
        assert html.escape(record["fault"]) in page


# --- benchmarks ---------------------------------------------------------------------------------

def test_fit_exponent_recovers_a_power_law():
    lengths = np.array([128, 256, 512, 1024])
    assert tables.fit_exponent(lengths, 3e-6 * lengths ** 1.7) == pytest.approx(1.7)
    assert tables.fit_exponent(lengths, 5.0 * lengths) == pytest.approx(1.0)
    # an O(L) overhead at small L does not hide the quadratic growth at the largest lengths
    sweep = np.array([128.0, 256, 512, 1024, 2048, 4096])
    assert tables.fit_exponent(sweep, np.where(sweep < 1024, 1e-3 * sweep, 1e-9 * sweep ** 2)) == pytest.approx(2.0)
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
            largest = sorted({length for length, _ in points})[-3:]  # the fit's three largest lengths
            points = [p for p in points if p[0] in largest]
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
        if max(values) / peak > 1:  # no attention kernel beats the machine's GEMM: a fault, not a result
            assert math.isnan(record["best_fraction"]) and f"{max(values) / peak:.0%}" in record["fault"]
        else:
            assert record["best_fraction"] == pytest.approx(max(values) / peak) and not record["fault"]
    assert (rows["fault"] != "").any(), "the fixture holds a fraction above 1 (jax_dpa); it must be flagged"


def test_verdict_names_the_fastest_plausible_line(report):
    data, _ = report
    raw, names = raw_asv("SelfAttention.time_forward")
    fastest = data.summary()["fastest"]
    flagged = {s for c, m, d, s in tables.flagged_lines(data.tables["scaling"])
               if (c, m) == ("SelfAttention", "time_forward")}
    series = lambda p: tables.series_label({"adapter": p[names.index("adapter")], "mode": p[names.index("mode")]})
    at_largest = {p: v for p, v in raw.items() if p[names.index("seq_len")] == fastest["seq_len"]
                  and p[names.index("num_heads")] == fastest["num_heads"] and v is not None and v == v}
    plausible = {p: v for p, v in at_largest.items() if series(p) not in flagged}
    assert fastest["value"] == pytest.approx(min(plausible.values()))
    # the fixture's torch_sdpa falls with L (a busy machine): faster at 512 than the verdict's line, left out
    assert flagged and fastest["excluded"] == len(flagged) and min(at_largest.values()) < fastest["value"]
    assert any("fastest at L=" in line and "implausible line(s) left out" in line for line in reports.verdict(data))


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


def test_compare_does_not_flag_a_change_within_the_points_noise(pair):
    a, b = pair
    index = _first_finite_index("SelfAttention.time_forward")
    _plant(a, "SelfAttention.time_forward", index, 1.0, ci=0.25)
    name = _plant(b, "SelfAttention.time_forward", index, 1.30, ci=0.25)
    comparison = reports.compare(a, b)
    assert _change(comparison, name, index) == "within noise" and comparison.regressions.empty


def test_gflops_follows_its_time_and_is_never_flagged_on_its_own(pair):
    a, b = pair
    index = _first_finite_index("SelfAttention.track_gflops_forward")
    name = _plant(b, "SelfAttention.track_gflops_forward", index, 0.7, ci=None)
    comparison = reports.compare(a, b)
    assert _change(comparison, name, index) == "follows time (unchanged)"
    assert comparison.regressions.empty and comparison.improvements.empty


def test_a_whole_run_moving_together_is_not_flagged_but_one_line_moving_past_it_is():
    base = {"method": "time_forward", "version": "v", "repeat": 10}
    point = lambda v: {**base, "value": v, "ci_low": v * 0.99, "ci_high": v * 1.01}
    # every benchmark of B 25% slower, with a few percent of scatter: the machine was busier
    moved = drift(np.log(1.25 * (1 + 0.02 * np.sin(np.arange(40)))))
    assert math.expm1(moved.shift) == pytest.approx(0.25, abs=0.01) and moved.scatter < 0.03
    assert classify(point(1.0), point(1.26), 1.1, moved)[0] == "within noise"
    # one adapter 30% slower on top of it
    assert classify(point(1.0), point(1.25 * 1.3), 1.1, moved)[0] == "regression"
    # a shift that large without the scatter known (too few benchmarks) is flagged as it is
    assert drift([0.2] * 3) == Drift(0.0, 0.0, 3)
    assert classify(point(1.0), point(1.25), 1.1, drift([0.2] * 3))[0] == "regression"


def test_classify_mirrors_asv_compare():
    base = {"method": "time_forward", "version": "v", "repeat": 10}
    a = {**base, "value": 1.0, "ci_low": 0.99, "ci_high": 1.01}
    assert classify(a, {**base, "value": 1.3, "ci_low": 1.29, "ci_high": 1.31}, 1.1)[0] == "regression"
    assert classify(a, {**base, "value": 0.7, "ci_low": 0.69, "ci_high": 0.71}, 1.1)[0] == "improvement"
    assert classify(a, {**base, "value": 1.05, "ci_low": 1.04, "ci_high": 1.06}, 1.1)[0] == "unchanged"
    # past the threshold, but within what the two points' intervals allow
    wide = {**base, "value": 1.0, "ci_low": 0.8, "ci_high": 1.2}
    assert classify(wide, {**wide, "value": 1.2, "ci_low": 0.96, "ci_high": 1.44}, 1.1)[0] == "within noise"
    # memory judged the same way: a compiler's exact figure has no sampling noise, so the threshold decides
    exact = {"method": "track_peakmem_forward", "version": "v", "repeat": None, "ci_low": math.nan,
             "ci_high": math.nan}
    assert classify({**exact, "value": 100.0}, {**exact, "value": 112.0}, 1.1)[0] == "regression"
    assert classify({**exact, "value": 100.0}, {**exact, "value": 108.0}, 1.1)[0] == "unchanged"
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
        row["row_id"] = "-".join(row[k] for k in ("adapter", "case", "dtype", "quantity"))
    meta = {"cpu": HOSTILE, "versions": {HOSTILE: HOSTILE},
            "divergences": [{"id": HOSTILE, "observed": "<script>x()</script>", "upstream": "javascript:alert(1)"}]}
    (root / "conformance").mkdir(parents=True)
    (root / "conformance" / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}))
    return root


def test_hostile_strings_are_escaped(tmp_path):
    data, paths = reports.build_report(_hostile_results(tmp_path / "r"), tmp_path / "out")
    page = paths["html"].read_text()
    assert page.lower().count("<script") == 1 and f"<script>{reports.html.SCRIPT}</script>" in page  # ours only
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
    # outside code spans (where the rerun command quotes the row id, hostile as its adapter, literally)
    assert "<script" not in re.sub(r"`[^`\n]*`", "", summary).lower()
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


def test_throughput_is_the_recorded_flops_over_asvs_time():
    from mhabench.reports import load
    frame = pd.DataFrame([{"benchmark": "bench_attention.SelfAttention.time_forward", "method": "time_forward",
                           "kind": "time", "unit": "seconds", "value": 0.5, "ci_low": 0.4, "ci_high": 0.8,
                           "q25": 0.45, "q75": 0.6, "adapter": "a", "mode": "eager", "seq_len": 128, "num_heads": 8,
                           "device": "cpu"}])
    flops = {("bench_attention.SelfAttention", "a", "eager", 128, 8, "cpu"): {"forward": 2e9, "forward_backward": 7e9}}
    out = load.with_throughput(frame, flops)
    rate = out[out["method"] == "track_gflops_forward"].iloc[0]
    assert rate["value"] == pytest.approx(4.0) and rate["unit"] == "GFLOP/s"
    assert (rate["ci_low"], rate["ci_high"]) == (pytest.approx(2.5), pytest.approx(5.0))  # ends swap
    assert load.with_throughput(frame, {}).equals(frame)


# --- the kernel as an axis ------------------------------------------------------------------------------------

def _kernel_rows():
    """Rows of a default adapter and two kernel variants (one recorded its kernel, one written before kernels
    were recorded), over a classic case and a modern one (GQA and a window)."""
    rows = []
    for adapter, recorded in (("torch_sdpa", "default"), ("torch_sdpa+flash", "flash"), ("torch_sdpa+math", None)):
        for case, spec, window, status in (("self_T8", {"num_heads": 2, "key_dim": 4}, None, "pass"),
                                           ("modern-gqa-window", {"num_heads": 4, "key_dim": 2, "num_kv_heads": 2},
                                            [2, 0], "unsupported" if adapter == "torch_sdpa+flash" else "pass")):
            for quantity in ("output", "grad_query"):
                row = {"row_id": f"{adapter}-{case}-float32-{quantity}", "adapter": adapter, "machine": "m",
                       "device": "cpu", "case": case, "area": "modern", "dtype": "float32", "quantity": quantity,
                       "status": status, "max_abs_err": 1e-7 if status == "pass" else None, "tolerance": 1e-5,
                       "divergence": None, "spec": spec, "causal": False, "window": window, "bias": None,
                       "lengths": None, "error_ratio": None, "tolerance_source": None}
                if recorded is not None:
                    row["kernel"] = recorded
                rows.append(row)
    return rows


def test_rows_carry_their_kernel_and_the_report_groups_by_it():
    from mhabench.reports import load
    from mhabench.schema import Row
    # read as every row is (Row.from_dict: a row written before kernels were recorded gets its name's), the
    # machine column added as the loader adds it; one batch of records
    rows = load._tidy_conformance([[{**Row.from_dict(r).to_dict(), "machine": r["machine"]} for r in _kernel_rows()]])
    assert dict(zip(rows["adapter"], rows["kernel"])) == {"torch_sdpa": "default", "torch_sdpa+flash": "flash",
                                                           "torch_sdpa+math": "math"}
    kernels = tables.kernel_matrix(rows).set_index(["adapter", "feature"])
    assert kernels.loc[("torch_sdpa+flash", "gqa"), "unsupported"] == 2
    assert kernels.loc[("torch_sdpa+flash", "window"), "unsupported"] == 2
    assert kernels.loc[("torch_sdpa+flash", "classic"), "pass"] == 2
    assert kernels.loc[("torch_sdpa+math", "gqa"), "kernel"] == "math"
    assert ("torch_sdpa", "bias") not in kernels.index  # a feature no row used is not listed
    agreement = tables.agreement(rows).set_index(["adapter_a", "adapter_b"])
    assert tuple(agreement.loc[("torch_sdpa", "torch_sdpa+flash"), ["kernel_a", "kernel_b"]]) == ("default", "flash")
    assert set(tables.conformance_matrix(rows)["kernel"]) == {"default", "flash", "math"}


def test_benchmark_results_carry_the_kernel_recorded_with_their_flops():
    from mhabench.reports import load
    frame = pd.DataFrame({"adapter": ["torch_sdpa", "torch_sdpa+flash", "jax_dpa+xla", None]})
    flops = {("x", "torch_sdpa+flash"): {"params": {"adapter": "torch_sdpa+flash"}, "kernel": "flash"},
             ("x", "torch_sdpa"): {"params": {"adapter": "torch_sdpa"}, "kernel": "default"}}
    kernels = list(load.with_kernels(frame, flops)["kernel"])
    assert kernels[:3] == ["default", "flash", "xla"] and pd.isna(kernels[3])


def test_entries_link_their_standalone_scripts_which_travel_with_the_csvs(tmp_path):
    """A results directory's conformance/reproducers/ (``mhabench repro --all --out``) goes into the report
    next to the CSVs, and each divergence entry links its script; the page counts the entries with an
    upstream report."""
    results_dir = tmp_path / "r"
    shutil.copytree(FIXTURE / "conformance", results_dir / "conformance")
    entry = next(r["divergence"] for r in raw_rows() if r.get("divergence"))
    script = results.reproducer_name(entry)
    (results_dir / "conformance" / "reproducers").mkdir()
    (results_dir / "conformance" / "reproducers" / script).write_text("import sys\nsys.exit(1)\n")
    data, paths = reports.build_report(results_dir, tmp_path / "out")
    assert (tmp_path / "out" / "reproducers" / script).read_text() == "import sys\nsys.exit(1)\n"
    page = paths["html"].read_text()
    summary = page.split(f"id='div-{entry}'>", 1)[1].split("</summary>", 1)[0]
    assert f"<a href='reproducers/{script}'>standalone script</a>" in summary
    shown = data.tables["divergences"]
    shown = shown[shown["rows"] > 0]
    linked = int(shown["upstream"].fillna("").astype(bool).sum())
    assert f"<p>{linked} of these {len(shown)} entries link an upstream report" in page


# --- the divergences by kind: what a model porter meets first ----------------------------------------

def _divergence_row(entry, adapter, case, area, dtype, quantity, err, nonfinite=False):
    return Row(adapter=adapter, case=case, area=area, dtype=dtype, quantity=quantity, status="divergence",
               divergence=entry, canonical_err=err, canonical_nonfinite=nonfinite, message="m").to_dict()


KINDS_ROWS = [
    _divergence_row("small-precision", "a", "c1", "shapes", "float64", "output", 1e-8),
    _divergence_row("big-precision", "a", "c1", "shapes", "float64", "grad_query", 0.01),
    _divergence_row("big-precision", "a", "c2", "dtypes", "float64", "output", 0.002),
    _divergence_row("wrong-answer", "b", "c3", "masks", "float16", "scores", 0.857),
    _divergence_row("nan-out", "b", "c4", "special", "float32", "output_with_scores", 0.001, nonfinite=True),
    _divergence_row("nan-grads", "b", "c4", "special", "bfloat16", "grad_value", 0.5),
    _divergence_row("uniform-rows", "a", "c5", "masks", "float32", "output", 0.3),
    _divergence_row("old-file", "a", "c6", "masks", "float32", "output", None),
]
KINDS_CATALOGUE = [
    {"id": "small-precision", "kind": "precision", "adapters": ["a"], "when": [], "observed": "scale in float32"},
    {"id": "big-precision", "kind": "precision", "adapters": ["a"], "when": [], "observed": "softmax in float32"},
    {"id": "wrong-answer", "kind": "answer", "adapters": ["b"], "when": ["keras_tf_bias_add_shortcut"],
     "observed": "the bias goes along the wrong axis"},
    {"id": "nan-out", "kind": "nonfinite", "adapters": ["b"], "when": ["masked_nonfinite"], "observed": "NaN"},
    {"id": "nan-grads", "kind": "nonfinite", "adapters": ["b"], "when": ["masked_nonfinite"], "observed": "NaN"},
    {"id": "uniform-rows", "kind": "empty_rows", "adapters": ["a"], "when": ["empty_rows"], "observed": "uniform"},
    {"id": "old-file", "adapters": ["a"], "when": [], "observed": "from a catalogue.json without kinds"},
]


@pytest.fixture(scope="module")
def kinds_report(tmp_path_factory):
    results_dir = tmp_path_factory.mktemp("kinds")
    (results_dir / "conformance").mkdir()
    (results_dir / "conformance" / "results.json").write_text(json.dumps({"meta": {}, "rows": KINDS_ROWS}))
    (results_dir / "conformance" / "catalogue.json").write_text(json.dumps(KINDS_CATALOGUE))
    return reports.build_report(results_dir, results_dir / "report")


def test_divergences_group_by_kind_in_a_porters_order_and_by_largest_error_within(kinds_report):
    data, paths = kinds_report
    groups = tables.by_kind(data.tables["divergences"])
    assert [(kind, list(part["id"])) for kind, _, part in groups] == [
        ("answer", ["wrong-answer"]),
        ("precision", ["big-precision", "small-precision"]),          # 0.01 before 1e-8
        ("nonfinite", ["nan-out", "nan-grads"]),                      # NaN/Inf before any finite error
        ("empty_rows", ["uniform-rows"]),
        ("", ["old-file"])]                                           # no recorded kind: last
    page = paths["html"].read_text()
    section = page[page.index("id='divergences'"):page.index("id='not-run'")]
    order = [section.index(f"id='div-{i}'") for _, _, part in groups for i in part["id"]]
    assert order == sorted(order), "the page lists them in that order"
    titles = [section.index(html.escape(results.DivergenceKind(k).title)) for k, _, _ in groups if k]
    assert titles == sorted(titles)
    summary = paths["markdown"].read_text()
    assert summary.index("**wrong-answer**") < summary.index("**big-precision**") < summary.index(
        "**small-precision**") < summary.index("**nan-out**") < summary.index("**uniform-rows**")


def test_each_entry_says_its_largest_error_and_who_it_affects(kinds_report):
    data, paths = kinds_report
    table = data.tables["divergences"].set_index("id")
    assert table.at["big-precision", "largest_err"] == pytest.approx(0.01)
    assert table.at["big-precision", "affected"] == \
        "default call, gradients · float64 · any input (areas: dtypes, shapes)"
    assert table.at["wrong-answer", "affected"] == "with scores · float16 · keras tf bias add shortcut (areas: masks)"
    assert table.at["nan-out", "largest_nonfinite"] and not table.at["nan-grads", "largest_nonfinite"]
    assert tables.error_text(table.at["nan-out", "largest_err"], True) == "NaN/Inf; 0.001 elsewhere"
    assert tables.error_text(table.at["old-file", "largest_err"], False) == "not recorded"
    page = paths["html"].read_text()
    block = page.split("id='div-big-precision'>", 1)[1].split("</details>", 1)[0]
    assert "largest error <b class='err'>0.01</b>" in block
    assert "affects: default call, gradients · float64 · any input (areas: dtypes, shapes)" in block
    assert "softmax in float32" in block and block.count('<tr class="f"') == 2  # its rows stay under it


def test_an_entry_whose_travelling_script_exits_0_is_stale_on_the_page(tmp_path):
    """repro --all --out RESULTS/conformance/reproducers writes status.json beside the scripts: an entry it found
    stale is stale in the report, as an entry a passing row contradicts is (the page's stale list, --strict)."""
    results_dir = tmp_path / "r"
    shutil.copytree(FIXTURE / "conformance", results_dir / "conformance")
    entry = next(r["divergence"] for r in raw_rows() if r.get("divergence"))
    scripts = results_dir / "conformance" / "reproducers"
    scripts.mkdir()
    (scripts / results.reproducer_name(entry)).write_text("print('canonical')\n")
    (scripts / results.REPRODUCER_STATUS).write_text(json.dumps({entry: {
        "status": "stale", "script": results.reproducer_name(entry), "reason": "its script exits 0 here"}}))
    data, paths = reports.build_report(results_dir, tmp_path / "report")
    table = data.tables["divergences"].set_index("id")
    assert table.at[entry, "status"] == "stale" and "standalone script: its script exits 0 here" in \
        table.at[entry, "message"]
    page = paths["html"].read_text()
    stale_section = page[page.index("id='stale'"):page.index("id='divergences'")]
    assert html.escape(entry) in stale_section
    from mhabench.reports.collect import alarms
    assert any("stale catalogue entr" in line for line in alarms(data))
    assert (tmp_path / "report" / "reproducers" / results.reproducer_name(entry)).is_file()  # it travels on


def test_a_change_of_one_adapter_is_judged_against_how_the_other_adapters_moved(tmp_path):
    """One adapter 25% slower among six whose times scatter by about 6% between two runs: counted in the runs'
    scatter, its own twelve points would raise it enough to hide themselves; judged against the others, they
    are flagged, and the unchanged adapters are not."""
    from mhabench.reports.compare import compare_benchmarks
    from mhabench.reports.load import Benchmarks
    rng = np.random.default_rng(3)
    adapters = [f"a{i}" for i in range(6)]

    def run(slowed: float, seed_shift: int):
        rows = []
        for adapter in adapters:
            for length in (128, 256, 512, 1024, 2048, 4096):
                for cls in ("SelfAttention", "CausalSelfAttention"):
                    value = 1e-3 * length / 128 * float(np.exp(rng.normal(0, 0.045)))
                    if adapter == "a5":
                        value *= slowed
                    rows.append({"benchmark": f"bench_attention.{cls}.track_time_forward",
                                 "params_key": f"'{adapter}', 'eager', {length}, 8, 'cpu'", "adapter": adapter,
                                 "value": value, "ci_low": value * 0.995, "ci_high": value * 1.005, "repeat": None,
                                 "method": "time_forward", "unit": "seconds", "version": "v"})
        return Benchmarks(pd.DataFrame(rows), {}, pd.DataFrame(), pd.DataFrame(), tmp_path / f"r{seed_shift}" / "asv")
    table, *_ = compare_benchmarks(run(1.0, 0), run(1.25, 1))
    slowed = table[table["params"].str.startswith("'a5'")]
    others = table[~table["params"].str.startswith("'a5'")]
    assert (slowed["change"] == "regression").sum() >= 7
    assert not others["change"].isin(["regression", "improvement"]).any()
