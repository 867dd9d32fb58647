"""`mhabench report --strict`: the exit status a nightly job fails on, without parsing the report's text."""
import json
import shutil
from pathlib import Path

import pytest

from mhabench import cli, reports

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _copy(name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(FIXTURES / name, target)
    return target


def _green(tmp_path: Path) -> Path:
    """The sample results with its one stale catalogue entry judged as holding: a green, complete run."""
    root = _copy("sample", tmp_path)
    catalogue = root / "conformance" / "catalogue.json"
    entries = json.loads(catalogue.read_text())
    for entry in entries:
        if entry.get("status") == "stale":
            entry["status"], entry["message"] = "ok", ""
    catalogue.write_text(json.dumps(entries))
    return root


def _edit_plan(root: Path, **changes) -> None:
    plan = root / "conformance" / "plan.json"
    plan.write_text(json.dumps({**json.loads(plan.read_text()), **changes}))


def test_a_green_complete_run_has_nothing_to_fail_on(tmp_path):
    assert reports.strict_failures(reports.collect(_green(tmp_path))) == []


def test_a_stale_entry_fails(tmp_path):
    failures = reports.strict_failures(reports.collect(_copy("sample", tmp_path)))
    assert len(failures) == 1 and "stale catalogue entry" in failures[0]


def test_fail_and_error_rows_fail(tmp_path):
    failures = " | ".join(reports.strict_failures(reports.collect(_copy("mixed", tmp_path))))
    assert " fail row" in failures and " error row" in failures


@pytest.mark.parametrize("changes", [{"shard": [1, 2]}, {"rows": 10_000}], ids=["missing shard", "missing rows"])
def test_an_incomplete_run_fails(tmp_path, changes):
    root = _green(tmp_path)
    _edit_plan(root, **changes)
    failures = reports.strict_failures(reports.collect(root))
    assert failures and all(line.startswith("INCOMPLETE") for line in failures), failures


def test_unreadable_lines_fail(tmp_path):
    root = _green(tmp_path)
    results = json.loads((root / "conformance" / "results.json").read_text())
    lines = [json.dumps(row) for row in results["rows"]]
    (root / "conformance" / "results.json").unlink()  # an interrupted run: the journal alone, one line cut short
    (root / "conformance" / "rows.jsonl").write_text("\n".join(lines[:-1] + [lines[-1][:40]]) + "\n")
    data = reports.collect(root)
    assert data.problems
    assert any("unreadable" in line for line in reports.strict_failures(data))


@pytest.mark.slow
def test_the_command_exits_1_strict_and_0_without_and_writes_the_report_either_way(tmp_path, capsys):
    root = _copy("mixed", tmp_path)
    assert cli.main(["report", "--results", str(root), "--out", str(tmp_path / "a")]) == 0
    assert cli.main(["report", "--strict", "--results", str(root), "--out", str(tmp_path / "b")]) == 1
    assert "strict: " in capsys.readouterr().err
    assert (tmp_path / "b" / "index.html").is_file()
    assert cli.main(["report", "--strict", "--results", str(_green(tmp_path / "g")), "--out", str(tmp_path / "c")]) == 0


@pytest.mark.parametrize("fixture, strict, expected", [("mixed", True, 1), ("mixed", False, 0), ("green", True, 0)])
def test_the_command_s_exit_status(tmp_path, monkeypatch, capsys, fixture, strict, expected):
    """The command's exit path, with the page's build left out (the slow test below builds it)."""
    from mhabench.commands import report
    root = _green(tmp_path) if fixture == "green" else _copy(fixture, tmp_path)
    paths = {"html": tmp_path / "index.html", "markdown": tmp_path / "summary.md"}
    monkeypatch.setattr(report, "build", lambda results, *args: (reports.collect([Path(r) for r in results]), paths))
    argv = ["report", *(["--strict"] if strict else []), "--results", str(root), "--out", str(tmp_path / "out")]
    assert cli.main(argv) == expected
    assert ("strict: " in capsys.readouterr().err) == bool(expected)


def test_a_journal_with_no_readable_line_is_reported_not_a_traceback(tmp_path):
    root = _green(tmp_path)
    (root / "conformance" / "results.json").unlink()
    (root / "conformance" / "rows.jsonl").write_text("{not json\n")
    failures = " | ".join(reports.strict_failures(reports.collect(root)))
    assert "INCOMPLETE" in failures and "unreadable" in failures
