"""The conformance run survives its adapters: raising, hanging and crashing cases become error rows and
the run goes on; a killed run resumes without losing or redoing finished rows; a damaged journal is
reported with its path and line."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mhabench.conformance.cases import find_case
from mhabench.conformance.runner import run_rows

PLANTED = Path(__file__).with_name("planted_adapters.py")
FAULTY, GOOD = find_case("self_T1-len1"), find_case("self_T8-heads2_kd4")


def _run(class_name, timeout=30.0):
    from mhabench.impls import plugins
    name = plugins.load_adhoc(f"{PLANTED}:{class_name}")
    rows = run_rows([name], [FAULTY, GOOD], ["float32"], timeout=timeout, adhoc=[f"{PLANTED}:{class_name}"])
    by_case = {}
    for r in rows:
        by_case.setdefault(r["case"], []).append(r)
    return by_case


def test_a_raising_case_is_an_error_row_with_the_message():
    rows = _run("RaisingAdapter")
    assert {r["status"] for r in rows[FAULTY.id]} == {"error"}
    assert "RuntimeError: planted failure inside the framework" in rows[FAULTY.id][0]["message"]
    assert {r["status"] for r in rows[GOOD.id]} == {"pass"}


def test_a_hanging_case_times_out_and_the_run_goes_on():
    started = time.monotonic()
    rows = _run("HangingAdapter", timeout=3.0)
    assert time.monotonic() - started < 60
    assert {r["status"] for r in rows[FAULTY.id]} == {"error"}
    assert "timed out after 3 s" in rows[FAULTY.id][0]["message"]
    assert {r["status"] for r in rows[GOOD.id]} == {"pass"}, "the worker was restarted for the next case"


@pytest.mark.parametrize("class_name, evidence", [("ExitingAdapter", "exit status 3"),
                                                  ("SegfaultingAdapter", "Segmentation fault")])
def test_a_crashing_case_is_an_error_with_the_stderr_tail(class_name, evidence):
    rows = _run(class_name)
    message = rows[FAULTY.id][0]["message"]
    assert {r["status"] for r in rows[FAULTY.id]} == {"error"}
    assert "worker died" in message and evidence in message
    assert {r["status"] for r in rows[GOOD.id]} == {"pass"}


def test_a_case_over_the_memory_budget_is_skipped_with_the_estimate():
    rows = run_rows(["numpy_oracle"], [GOOD], ["float32"], isolate=False, memory_budget=1000)
    assert {r["status"] for r in rows} == {"skip"} and "memory budget" in rows[0]["message"]


def _conform(results, *extra):
    return [sys.executable, "-m", "mhabench", "conform", "--adapters", "numpy_oracle,planted_slow",
            "--adapter", f"{PLANTED}:SlowAdapter", "--areas", "masks", "--dtypes", "float32",
            "--results", str(results), *extra]


def _lines(path):
    return path.read_text().splitlines() if path.exists() else []


def test_kill_half_way_then_resume_recovers_every_finished_row(tmp_path):
    journal = tmp_path / "conformance" / "rows.jsonl"
    proc = subprocess.Popen(_conform(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while len(_lines(journal)) < 20 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.1)
    assert proc.poll() is None, "the run finished before it could be killed half-way"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    with open(journal, "ab") as f:  # as if the kill hit mid-write
        f.write(b'{"row_id": "planted_slow-self_T8')
    finished = [json.loads(line)["row_id"] for line in _lines(journal)[:-1]]
    assert len(finished) >= 20

    done = subprocess.run(_conform(tmp_path, "--resume"), capture_output=True, text=True, timeout=300)
    assert done.returncode in (0, 1), done.stderr
    assert f"{journal}:{len(finished) + 1}: truncated last line" in done.stderr
    rows = json.loads((tmp_path / "conformance" / "results.json").read_text())["rows"]
    ids = [r["row_id"] for r in rows]
    assert set(finished) <= set(ids), "every row finished before the kill is in the results"
    assert len(ids) == len(set(ids))
    lines = _lines(journal)
    rerun = [json.loads(x)["row_id"] for x in lines[len(finished) + 1:] if x.startswith("{") and x.endswith("}")]
    assert not set(rerun) & set(finished), "no finished row was run again"
    adapters = {r["adapter"] for r in rows}
    assert adapters == {"numpy_oracle", "planted_slow"}
    assert all(r["status"] in ("pass", "unsupported") for r in rows)


def test_rerun_runs_exactly_that_row(tmp_path):
    row_id = "numpy_oracle-cross_T8_S4-heads2-mask_padding-float16-output"
    done = subprocess.run([sys.executable, "-m", "mhabench", "conform", "--rerun", row_id, "--results",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [json.loads(x) for x in _lines(tmp_path / "conformance" / "rows.jsonl")]
    assert row_id in {r["row_id"] for r in rows} and {r["dtype"] for r in rows} == {"float16"}
    assert {r["case"] for r in rows} == {"cross_T8_S4-heads2-mask_padding"}


def test_user_errors_are_one_line_and_exit_2(tmp_path):
    for args in (["--adapters", "nope"], ["--dtypes", "float8"], ["--areas", "everything"],
                 ["--results", "/proc/no/such/dir"], ["--rerun", "not-a-row"]):
        done = subprocess.run([sys.executable, "-m", "mhabench", "conform", *args], capture_output=True,
                              text=True, timeout=60, cwd=tmp_path)
        assert done.returncode == 2, (args, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "Traceback" not in done.stderr, done.stderr


# ---- huge inputs are refused before any framework sees them ----------------------------------------
HUGE_ADAPTERS = ["numpy_oracle", "torch_sdpa", "torch_mha", "jax_dpa", "flax_mha"]


def test_a_call_that_cannot_fit_is_refused_with_the_same_message_everywhere():
    import numpy as np
    from mhabench import impls
    from mhabench.impls.memory import CallTooLarge
    spec = impls.AttentionSpec(num_heads=2, key_dim=4)
    weights = impls.Weights.random(spec, 8, 8, seed=0)
    x = np.zeros((1, 60_000, 8), dtype=np.float32)  # scores 2 x 60000^2 float32: about 27 GiB
    messages = {}
    for name in HUGE_ADAPTERS:
        adapter = impls.get_adapter(name)
        if not adapter.is_available():
            continue
        layer = adapter.build(spec, weights, dtype="float32")
        started = time.monotonic()
        with pytest.raises(CallTooLarge) as err:
            layer(x, x, return_scores=False)
        assert time.monotonic() - started < 5, f"{name} took long to refuse"
        messages[name] = str(err.value)
    import re
    live = lambda text: re.sub(r"but [0-9.]+ GiB of memory", "but N GiB of memory", text)  # memory free right now
    assert len({live(m) for m in messages.values()}) == 1, messages
    text = next(iter(messages.values()))
    assert "this call needs about" in text and "GiB of memory are available" in text and "MHABENCH_MEMORY_CHECK" in text
    assert isinstance(CallTooLarge("x"), ValueError)


def test_the_memory_check_can_be_switched_off(monkeypatch):
    import numpy as np
    from mhabench import impls
    from mhabench.impls import memory
    monkeypatch.setattr(memory, "available_bytes", lambda: 1000)  # a tiny machine
    spec = impls.AttentionSpec(num_heads=2, key_dim=4)
    layer = impls.get_adapter("numpy_oracle").build(spec, impls.Weights.random(spec, 8, 8, seed=0))
    x = np.zeros((1, 6, 8))
    with pytest.raises(memory.CallTooLarge):
        layer(x, x)
    layer.check_memory = False
    assert layer(x, x)[0].shape == (1, 6, 8)
    layer.check_memory = True
    monkeypatch.setenv(memory.ENV_CHECK, "off")
    assert layer(x, x)[0].shape == (1, 6, 8)


# ---- a full disk stops the run: one line, exit 2, nothing lost ------------------------------------------

def test_a_disk_full_spell_stops_conform_with_one_line_and_resume_loses_nothing(tmp_path, monkeypatch, capsys):
    from mhabench import cli, results
    real, batches = results.RowWriter.write, [0]

    def write(self, rows):  # the disk fills up after three batches of rows
        batches[0] += 1
        if batches[0] > 3:
            raise results.WriteFailed(self.path, OSError(28, "No space left on device"))
        return real(self, rows)
    monkeypatch.setattr(results.RowWriter, "write", write)
    args = ["conform", "--adapters", "numpy_oracle", "--areas", "masks", "--dtypes", "float32", "--jobs", "2",
            "--results", str(tmp_path)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    journal = tmp_path / "conformance" / "rows.jsonl"
    assert err.startswith(f"mhabench conform: error: cannot write {journal}: No space left on device") \
        and "--resume" in err
    written = results.read_rows(journal)
    assert written.rows and not written.problems
    assert not (tmp_path / "conformance" / "results.json").exists()
    assert not list(tmp_path.rglob("*.tmp"))
    monkeypatch.undo()  # space freed
    assert cli.main(args + ["--resume"]) == 0
    rows = json.loads((tmp_path / "conformance" / "results.json").read_text())["rows"]
    planned = json.loads((tmp_path / "conformance" / "plan.json").read_text())["rows"]
    assert len(rows) == len({r["row_id"] for r in rows}) == planned
    assert {r["row_id"] for r in written.rows} <= {r["row_id"] for r in rows}


# ---- a plugin that misbehaves at load time: its interface check runs in a worker -------------------------

@pytest.mark.parametrize("command", [["conform", "--adapters", "numpy_oracle", "--quick"], ["adapters"]])
@pytest.mark.parametrize("class_name, evidence", [
    ("AlwaysHanging", "its interface check did not finish in 3 s (it hangs?); the process running it was killed"),
    ("AlwaysSegfaulting", "its interface check ended the process running it (killed by SIGSEGV: Fatal Python "
                          "error: Segmentation fault)"),
    ("AlwaysExitingQuietly", "its interface check ended the process running it (exit status 0, without an answer)"),
])
def test_a_plugin_that_hangs_crashes_or_exits_at_load_time_is_one_line_and_exit_2(tmp_path, command, class_name,
                                                                                   evidence):
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "mhabench", *command, "--adapter", f"{PLANTED}:{class_name}",
                           "--timeout", "3"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == "" and done.stderr.count("\n") == 1 and evidence in done.stderr, done.stderr
    assert time.monotonic() - started < 60
    assert not (tmp_path / "results").exists(), "nothing ran"


def test_a_plugin_that_floods_its_output_at_load_time_puts_nothing_on_the_terminal(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mhabench", "conform", "--adapter", f"{PLANTED}:AlwaysPrintingGarbage",
                           "--adapters", "numpy_oracle", "--areas", "masks", "--dtypes", "float32", "--results",
                           str(tmp_path)], capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert b"\x1b" not in done.stdout + done.stderr and b"planted" not in done.stdout + done.stderr
    assert len(done.stdout + done.stderr) < 20_000


# ---- children die with their parent ---------------------------------------------------------------------

def _descendants(pid: int) -> list[int]:
    import psutil
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _all_gone(pids, seconds: float = 15.0) -> list[int]:
    """The pids still alive (not zombies) after ``seconds``."""
    import psutil

    def alive(pid):
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    deadline = time.monotonic() + seconds
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return [p for p in pids if alive(p)]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_conform_takes_its_worker_with_it_even_mid_hang(tmp_path):
    journal = tmp_path / "conformance" / "rows.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "mhabench", "conform", "--adapter", f"{PLANTED}:HangingAdapter",
                             "--adapters", "planted_hanging", "--areas", "shapes", "--dtypes", "float32", "--jobs", "1",
                             "--timeout", "600", "--results", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers, seen, still = time.monotonic() + 120, [], -1, 0
    while time.monotonic() < deadline and proc.poll() is None and still < 15:  # until the case hangs: 3 s, no row
        time.sleep(0.2)
        workers = _descendants(proc.pid)
        rows = len(_lines(journal))
        still, seen = (still + 1, seen) if rows == seen and rows > 0 else (0, rows)
    assert proc.poll() is None and workers and still >= 15, "the run never reached the hanging case"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    try:
        assert not _all_gone(workers), "a worker outlived the SIGKILLed conform"
    finally:
        for pid in _all_gone(workers, 0):
            os.kill(pid, signal.SIGKILL)
