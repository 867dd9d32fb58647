"""The results directory module: the journal's one reading policy, atomic files, the shared summary, the lock."""
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mhabench import results


def _row(i, status="pass", **kw):
    return {"row_id": f"a-c{i}-float32-output", "adapter": "a", "case": f"c{i}", "area": "shapes", "dtype": "float32",
            "status": status, "quantity": "output", "error_ratio": None, "spec": {"num_heads": 1},
            "query_shape": [1, 2, 3], **kw}


def test_results_written_atomically_as_json_and_csv(tmp_path):
    rows = [_row(0), _row(1, "fail", error_ratio=3.0, reference_err=1e-3, tolerance=4e-3, tolerance_source="reference")]
    meta = results.meta({"numpy": "2.0"}, ["mhabench", "conform"])
    assert {"created", "mhabench_version", "python", "platform", "cpu", "gpu", "commit", "argv",
            "versions"} <= set(meta)
    j, c = results.write_results(tmp_path, rows, meta)
    assert j == results.Layout(tmp_path).results_json and c == results.Layout(tmp_path).results_csv
    data = json.loads(j.read_text())
    assert data["rows"] == [results.Row.from_dict(r).to_dict() for r in rows]
    assert list(data["rows"][0]) == list(results.FIELDS) and data["meta"]["argv"] == ["mhabench", "conform"]
    with open(c) as f:
        flat = list(csv.DictReader(f))
    assert flat[0]["row_id"] == rows[0]["row_id"] and json.loads(flat[0]["spec"]) == {"num_heads": 1}
    assert list(flat[0]) == list(results.FIELDS)  # the columns pandas reads, named by the Row's fields
    assert not list(tmp_path.rglob(".*.tmp"))
    summary = results.summarise(rows)[("a", "shapes")]
    assert summary["pass"] == 1 and summary["fail"] == 1 and summary["worst_ratio"] == 3.0


def test_summary_ignores_ratios_the_floor_decided():
    # tolerance set by the floor (1e-5 > 4 * 1e-9): the ratio divides by almost nothing and says nothing
    rows = [_row(0, "pass", error_ratio=500.0, reference_err=1e-9, tolerance=1e-5, tolerance_source="floor"),
            _row(1, "pass", error_ratio=2.0, reference_err=1e-3, tolerance=4e-3, tolerance_source="reference")]
    assert results.summarise(rows)[("a", "shapes")]["worst_ratio"] == 2.0


def test_journal_appends_and_latest_row_wins(tmp_path):
    path = tmp_path / "rows.jsonl"
    w = results.RowWriter(path)
    w.write([_row(0), _row(1)])
    w.write([_row(0, "fail", max_abs_err=float("nan"))])  # a NaN figure is written as null, never as NaN
    w.close()
    journal = results.read_rows(path)
    assert len(journal.rows) == 3 and not journal.problems
    assert [r["status"] for r in journal.latest()] == ["pass", "fail"]
    assert journal.latest()[1]["max_abs_err"] is None


def test_truncated_last_line_is_reported_with_path_and_line_and_the_rest_kept(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(_row(0)) + "\n" + json.dumps(_row(1))[:30])
    journal = results.read_rows(path)
    assert [r["row_id"] for r in journal.rows] == [_row(0)["row_id"]]
    assert len(journal.problems) == 1 and f"{path}:2: truncated last line" in journal.problems[0]
    w = results.RowWriter(path)  # appending later keeps the damaged line, on its own line
    w.write([_row(2)])
    w.close()
    journal = results.read_rows(path)
    assert [r["row_id"] for r in journal.rows] == [_row(0)["row_id"], _row(2)["row_id"]]
    assert f"{path}:2: corrupt line" in journal.problems[0]
    assert json.dumps(_row(1))[:30] in path.read_text()  # never overwritten


def test_a_valid_json_line_that_is_not_a_row_is_reported_not_dropped(tmp_path):
    path = tmp_path / "rows.jsonl"
    mangled = {("stat" if k == "status" else k): v for k, v in _row(1).items()}
    path.write_text("\n".join(json.dumps(r) for r in (_row(0), mangled, _row(2, status="maybe"), [1, 2])) + "\n")
    journal = results.read_rows(path)
    assert [r["row_id"] for r in journal.rows] == [_row(0)["row_id"]]
    assert [p.split(": ", 2)[1] for p in journal.problems] == [
        "not a valid record (missing field status)", "not a valid record (unknown status 'maybe')",
        "not a valid record (not a JSON object)"]
    assert all(p.startswith(f"{path}:") for p in journal.problems)


def test_read_results_of_an_interrupted_run_counts_the_rows_missing(tmp_path):
    layout = results.Layout(tmp_path)
    results.write_json(layout.plan, {"rows": 5})
    w = results.RowWriter(layout.rows)
    w.write([_row(0), _row(1)])
    w.close()
    with open(layout.rows, "a") as f:
        f.write('{"row_id": "a-c2-flo')
    found = results.read_results(tmp_path)
    assert not found.complete and len(found.rows) == 2 and found.missing == 3
    assert len(found.problems) == 1 and "truncated last line" in found.problems[0]


LOCK_HOLDER = """
import sys, time
from mhabench import results
with results.locked(sys.argv[1], "holder test"):
    print("locked", flush=True)
    time.sleep(60)
"""


def _hold(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_run_into_a_locked_directory_stops_naming_the_holder(tmp_path):
    holder = _hold(tmp_path)
    try:
        with pytest.raises(results.ResultsLocked, match=rf"in use by pid {holder.pid} \(holder test\)"):
            with results.locked(tmp_path, "second"):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = _hold(tmp_path)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    started = time.monotonic()
    with results.locked(tmp_path, "after the kill") as layout:
        assert "after the kill" in layout.lock.read_text()
    assert time.monotonic() - started < 1.0


def test_an_adapter_declaring_reduced_matrix_runs_the_quick_cases_unless_every_case(monkeypatch):
    from mhabench.conformance import session
    from mhabench.impls import registry
    adapter = type(registry.get_adapter("numpy_oracle"))
    monkeypatch.setattr(adapter, "reduced_matrix", "each shape compiles for seconds")
    plan = session.make_plan("numpy_oracle", "float32", "shapes,masks")
    quick = {c.id for c in plan.cases if c.quick}
    assert plan.reduced == {"numpy_oracle": "each shape compiles for seconds"}
    assert {c.id for _, c, _ in plan.tasks()} == quick and len(quick) < len(plan.cases)
    assert plan.to_dict()["reduced"] == plan.reduced
    assert plan.rows_all_shards == plan.rows
    every = session.make_plan("numpy_oracle", "float32", "shapes,masks", every_case=True)
    assert not every.reduced and len(every.tasks()) == len(every.cases)


# ---- full disks: nothing half-written, the file named -------------------------------------------------

def _disk_fills_after(monkeypatch, room: int):
    """os.write takes ``room`` more bytes, then fails as a full disk does (ENOSPC)."""
    import errno
    real, left = os.write, [room]

    def write(fd, data):
        if left[0] <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        written = real(fd, bytes(data[:left[0]]))
        left[0] -= written
        return written
    monkeypatch.setattr(os, "write", write)
    return left


def test_a_journal_batch_the_disk_cannot_take_is_taken_back_whole(tmp_path, monkeypatch):
    path = tmp_path / "rows.jsonl"
    writer = results.RowWriter(path)
    writer.write([_row(0)])
    before = path.read_bytes()
    left = _disk_fills_after(monkeypatch, 100)  # part of the next batch fits, then the disk is full
    with pytest.raises(results.WriteFailed, match=f"cannot write {path}: No space left on device"):
        writer.write([_row(1), _row(2)])
    assert path.read_bytes() == before, "no half line left behind"
    left[0] = 10 ** 9  # space freed: the journal goes on with whole lines
    writer.write([_row(3)])
    writer.close()
    journal = results.read_rows(path)
    assert [r["case"] for r in journal.rows] == ["c0", "c3"] and not journal.problems


def test_files_written_together_are_all_replaced_or_none(tmp_path, monkeypatch):
    first, second = tmp_path / "a.json", tmp_path / "b.csv"
    first.write_text("old a")
    second.write_text("old b")
    _disk_fills_after(monkeypatch, 8)  # the first new file fits, the second does not
    with pytest.raises(results.WriteFailed, match=f"cannot write {second}: No space left on device") as err:
        results.atomic_write_many({first: "new a", second: "new b, longer"})
    assert "\n" not in str(err.value)
    assert (first.read_text(), second.read_text()) == ("old a", "old b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.csv"], "no temporary file left"
    monkeypatch.undo()
    (tmp_path / "c.html").mkdir()
    with pytest.raises(results.WriteFailed, match="c.html: a directory is in the way"):
        results.atomic_write_many({first: "new a", tmp_path / "c.html": "<p>"})
    assert first.read_text() == "old a"


def test_a_run_killed_after_a_finished_one_is_judged_by_its_journal_not_the_old_summary(tmp_path):
    layout = results.Layout(tmp_path)
    results.write_json(layout.plan, {"rows": 3, "run": "first"})
    results.write_results(tmp_path, [_row(0), _row(1), _row(2)], {"run": "first", "machine": "m"})
    journal = results.RowWriter(layout.rows)
    journal.write([_row(0), _row(1), _row(2)])
    journal.close()
    found = results.read_results(tmp_path)
    assert found.complete and found.stale is None and found.missing == 0 and found.meta["machine"] == "m"
    # a second run starts (a new plan, the old journal kept aside) and is killed after one row
    layout.rows.replace(layout.rows.with_suffix(".jsonl.prev"))
    results.write_json(layout.plan, {"rows": 3, "run": "second", "meta": {"machine": "m2"}})
    journal = results.RowWriter(layout.rows)
    journal.write([_row(0, "fail")])
    journal.close()
    found = results.read_results(tmp_path)
    assert not found.complete and found.stale == layout.results_json and found.missing == 2
    assert [r["status"] for r in found.rows] == ["fail"] and found.meta == {"machine": "m2"}
    # killed before its first row: nothing of it is counted, and the old summary is still not taken for it
    layout.rows.unlink()
    found = results.read_results(tmp_path)
    assert not found.complete and found.rows == [] and found.missing == 3


def test_rows_of_older_runs_read_with_their_kernel_and_newer_fields_are_left_out(tmp_path):
    """A results.json written before kernels were recorded (the report fixtures' rows) reads through Row with
    the kernel its adapter's name gives; a field this version does not know is dropped, not an error."""
    old = _row(0, adapter="torch_sdpa+flash", row_id="torch_sdpa+flash-c0-float32-output")
    newer = {**_row(1), "facts_of_a_newer_version": {"x": 1}}
    results.write_json(results.Layout(tmp_path).results_json, {"meta": {}, "rows": [old, newer]})
    found = results.read_results(tmp_path)
    assert not found.problems and [r.kernel for r in found.rows] == ["flash", "default"]
    assert "facts_of_a_newer_version" not in found.rows[1].to_dict()
    fixture = results.read_results(Path(__file__).parent / "fixtures" / "sample")
    assert fixture.rows and not fixture.problems and {r.kernel for r in fixture.rows} == {"default"}


def test_a_row_whose_id_does_not_name_it_is_not_a_row(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({**_row(0), "row_id": "a-other-float32-output"}) + "\n")
    journal = results.read_rows(path)
    assert not journal.rows and "does not name its row" in journal.problems[0]


def test_an_adapter_fact_travels_from_the_adapter_to_the_report(tmp_path):
    """The ONNX opset an adapter declares is on each of its rows, in results.json and .csv, and in the
    report's per-adapter table: one Row field, one name in evaluate.ADAPTER_FACTS."""
    from mhabench import impls
    from mhabench.conformance.cases import find_case
    from mhabench.conformance.evaluate import case_row
    from mhabench.reports import load, tables
    case = find_case("self_T8-heads2_kd4")
    rows = [case_row(impls.get_adapter(name), case, "float32", "output", status="pass")
            for name in ("ort_attention", "torch_mha@ort", "torch_sdpa")]
    assert [r.opset for r in rows] == [24, 25, None]
    results.write_results(tmp_path, rows, {})
    with open(results.Layout(tmp_path).results_csv) as f:
        assert [r["opset"] for r in csv.DictReader(f)] == ["24", "25", ""]
    summary = tables.adapter_summary(load.load_conformance(tmp_path).rows).set_index("adapter")["opset"]
    assert list(summary[["ort_attention", "torch_mha@ort"]]) == ["24", "25"] and summary.isna()["torch_sdpa"]
