"""``mhabench bench`` when things go wrong: an asv file a full disk or a kill left damaged, a disk that fills up
during a chunk, a killed sweep's asv processes, and plugins passed to asv's processes whatever their paths hold."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mhabench import cli, results
from mhabench.benchmarks import profiles, sweep

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "my_attention.py"
RESULT_FILE = "abcdef12-existing-py_venv_bin_python.json"
PYTHONPATH = os.pathsep.join(p for p in sys.path if p)


def _tree(root: Path, result_bytes: bytes) -> results.Layout:
    """A results directory as bench leaves it: asv's files, and two finished chunks (one of another commit)."""
    layout = results.Layout(root)
    (layout.asv / "vm").mkdir(parents=True)
    (layout.asv / "benchmarks.json").write_text(json.dumps({"version": 2}))
    (layout.asv / "vm" / "machine.json").write_text(json.dumps({"machine": "vm", "version": 1}))
    (layout.asv / "vm" / RESULT_FILE).write_bytes(result_bytes)
    sweep.mark_finished(layout, {"commit": "abcdef1234", "profile": "quick"}, "numpy", 3.0)
    sweep.mark_finished(layout, {"commit": "0123456789", "profile": "quick"}, "numpy", 3.0)
    return layout


def test_a_damaged_asv_file_stops_bench_in_one_line_naming_it(tmp_path, capsys):
    _tree(tmp_path, b"")  # what asv leaves when the disk fills while it writes
    code = cli.main(["bench", "--quick", "--adapters", "numpy_oracle", "--results", str(tmp_path), "--resume"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"{tmp_path / 'asv' / 'vm' / RESULT_FILE} is damaged (0 bytes" in err and "--repair" in err


def test_repair_moves_the_damaged_file_aside_and_forgets_the_chunks_it_held(tmp_path):
    layout = _tree(tmp_path, b'{"results": {"x": [1')  # cut short
    said = []
    sweep.repair(layout, said.append)
    damaged = layout.asv / "vm" / (RESULT_FILE + ".damaged")
    assert not (layout.asv / "vm" / RESULT_FILE).exists() and damaged.read_bytes() == b'{"results": {"x": [1'
    assert len(said) == 1 and "not valid JSON" in said[0] and str(damaged) in said[0]
    assert sweep.finished_chunks(layout, {"commit": "abcdef1234", "profile": "quick"}) == set(), "measured again"
    assert sweep.finished_chunks(layout, {"commit": "0123456789", "profile": "quick"}) == {"numpy"}
    sweep.refuse_damaged(layout)  # nothing damaged is left
    assert (layout.asv / "benchmarks.json").is_file() and (layout.asv / "vm" / "machine.json").is_file()


def test_a_chunk_that_damages_asvs_results_puts_them_back(tmp_path):
    layout = _tree(tmp_path, json.dumps({"results": {"earlier chunk": [1.0]}}).encode())
    before = (layout.asv / "vm" / RESULT_FILE).read_bytes()
    guard = sweep.GuardedChunk(layout, "abcdef1234")
    (layout.asv / "vm" / RESULT_FILE).write_bytes(b"")  # asv truncated it, then the disk was full
    with pytest.raises(sweep.SweepError, match="asv could not write .* it was put back as it was before this chunk"):
        guard.check()
    assert (layout.asv / "vm" / RESULT_FILE).read_bytes() == before, "the earlier chunks' results are kept"
    guard = sweep.GuardedChunk(layout, "9999999999")
    new = layout.asv / "vm" / "99999999-existing-py_venv_bin_python.json"
    new.write_bytes(b"")  # a commit's first chunk, cut short
    with pytest.raises(sweep.SweepError, match="was removed"):
        guard.check()
    assert not new.exists()
    sweep.GuardedChunk(layout, "abcdef1234").check()  # an intact tree passes


def test_the_report_lists_a_damaged_asv_file_and_reports_the_rest(tmp_path, capsys):
    mixed = ROOT / "tests" / "fixtures" / "mixed"
    shutil.copytree(mixed / "conformance", tmp_path / "r" / "conformance")
    shutil.copytree(mixed / "asv", tmp_path / "r" / "asv")
    damaged = tmp_path / "r" / "asv" / "vm" / RESULT_FILE
    damaged.write_bytes(b"")
    assert cli.main(["report", "--results", str(tmp_path / "r"), "--out", str(tmp_path / "out")]) == 0
    out, err = capsys.readouterr()
    assert "conformance run complete" in out and "fastest at L=" in out  # the rest of the asv tree too
    assert f"unreadable: {damaged} is not valid JSON" in err and "--repair" in err
    shutil.rmtree(tmp_path / "r" / "conformance")
    for other in (tmp_path / "r" / "asv" / "vm").glob("*.json"):
        if other.name not in ("machine.json", RESULT_FILE):
            other.unlink()
    assert cli.main(["report", "--results", str(tmp_path / "r"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(damaged) in err and "--repair" in err


# ---- plugins passed to asv's processes --------------------------------------------------------------------

def test_plugin_targets_reach_asvs_processes_whatever_their_paths_hold(tmp_path):
    """The targets travel as JSON: a ':' in a directory name (as in a Windows drive letter) cannot split them,
    and a module target is found from the directory bench was run in."""
    odd = tmp_path / "with:colon and space"
    odd.mkdir()
    shutil.copy(EXAMPLE, odd / "my_attention.py")
    shutil.copy(EXAMPLE, tmp_path / "attention_module.py")
    targets = [f"{odd / 'my_attention.py'}:MyAttention", "attention_module:MyAttention"]
    passed = json.loads(profiles.plugins_env(targets, str(tmp_path)))
    assert passed == {"adapters": targets, "path": [str(tmp_path)]}
    assert json.loads(profiles.plugins_env(["C:\\plugins\\mine.py:Mine"]))["adapters"][0].endswith("mine.py:Mine")
    # an asv process: another directory, the variable as bench sets it
    code = ("from mhabench.benchmarks import profiles; from mhabench.impls import registry; "
            "names = profiles.load_plugins(); print(names, registry.get_adapter('my_attention').is_available())")
    for target in targets:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": PYTHONPATH,
                                   profiles.ENV_ADAPTERS: profiles.plugins_env([target], str(tmp_path))})
        assert done.returncode == 0 and done.stdout.strip() == "['my_attention'] True", done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("where, target", [(ROOT, "examples/my_attention.py:MyAttention"),
                                           (ROOT / "examples", "my_attention:MyAttention")])
def test_bench_runs_a_plugin_named_by_file_or_by_module(tmp_path, where, target):
    """The README's command, narrowed to one benchmark: the plugin reaches asv's processes and is measured."""
    done = subprocess.run([sys.executable, "-m", "mhabench", "bench", "--adapter", target, "--adapters", "my_attention",
                           "--quick", "--bench", r"SelfAttention\.track_time_forward\('my_attention', 'eager', 128,",
                           "--results", str(tmp_path)], capture_output=True, text=True, timeout=600, cwd=where)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    [result_file] = [p for p in (tmp_path / "asv").glob("*/*.json") if p.name != "machine.json"]
    measured = json.loads(result_file.read_text())["results"]["bench_attention.SelfAttention.track_time_forward"]
    assert any(isinstance(v, float) and v > 0 for v in measured[0]), measured[0]


# ---- a killed sweep takes asv with it ---------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_killed_bench_takes_asv_and_its_benchmark_processes_with_it(tmp_path):
    import psutil
    proc = subprocess.Popen([sys.executable, "-m", "mhabench", "bench", "--quick", "--adapters", "numpy_oracle",
                             "--results", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, tree = time.monotonic() + 300, []
    while time.monotonic() < deadline and proc.poll() is None:  # asv, its forkserver and a benchmark process
        tree = psutil.Process(proc.pid).children(recursive=True)
        try:
            if len(tree) >= 3 and any("run_server" in " ".join(p.cmdline()) for p in tree):
                break
        except psutil.Error:  # a process of the tree ended while it was read
            pass
        time.sleep(0.5)
    assert proc.poll() is None and len(tree) >= 3, "asv never got to measure"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 20
    def alive():
        left = []
        for p in tree:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    left.append(p)
            except psutil.NoSuchProcess:
                pass
        return left
    while alive() and time.monotonic() < deadline:
        time.sleep(0.2)
    left = alive()
    for p in left:
        p.kill()
    assert not left, f"outlived the SIGKILLed bench: {[' '.join(p.cmdline())[:120] for p in left]}"
