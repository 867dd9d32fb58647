"""The conformance suite under pytest-xdist: the same verdicts as a serial run, and each adapter's worker process
started once per xdist worker, not once per test."""
import os
import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from xml.etree import ElementTree

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = textwrap.dedent('''
    """Records every isolation worker process started: the pytest process that started it, and its name."""
    import os
    from mhabench.impls import worker

    _start = worker.Worker._start

    def _recording_start(self):
        with open(os.environ["WORKER_LOG"], "a") as log:
            log.write(f"{os.getpid()}\\t{self.name}\\n")
        return _start(self)

    worker.Worker._start = _recording_start
''')


def _run(tmp_path, name, *extra):
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir(exist_ok=True)
    (probe_dir / "worker_probe.py").write_text(PROBE)
    log = tmp_path / f"{name}.workers"
    env = dict(os.environ, WORKER_LOG=str(log),
               PYTHONPATH=os.pathsep.join([str(probe_dir), str(ROOT), os.environ.get("PYTHONPATH", "")]))
    report = tmp_path / f"{name}.xml"
    command = [sys.executable, "-m", "pytest", "-p", "worker_probe", "-p", "no:cacheprovider", "-q",
               f"--junitxml={report}", "conformance/test_masks.py", "conformance/test_catalogue.py",
               "--adapters", "numpy_oracle,torch_sdpa,classic_torch", *extra]
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode in (0, 1), out.stdout[-3000:] + out.stderr[-3000:]
    verdicts = {}
    for case in ElementTree.parse(report).iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        verdicts[f"{case.get('classname')}::{case.get('name').split('@', 1)[0]}"] = outcome
    started = Counter(tuple(line.split("\t")) for line in log.read_text().splitlines()) if log.exists() else Counter()
    return verdicts, started


@pytest.mark.slow
def test_xdist_gives_the_serial_verdicts_and_starts_each_adapter_once_per_xdist_worker(tmp_path):
    serial, serial_started = _run(tmp_path, "serial")
    distributed, distributed_started = _run(tmp_path, "xdist", "-n", "2")  # -n alone: the suite groups by adapter
    assert serial and distributed == serial
    assert set(serial.values()) >= {"passed", "skipped"}
    # every adapter's process started once, in the one xdist worker that ran its tests: not once per test,
    # nor once in each xdist worker (which would compute its rows twice)
    assert set(distributed_started.values()) == {1}
    assert set(Counter(name for _, name in distributed_started).values()) == {1}
    adapters = {"numpy_oracle worker", "torch_sdpa worker", "classic_torch worker"}
    assert {name for _, name in distributed_started} == adapters == {name for _, name in serial_started}
    assert len({pid for pid, _ in distributed_started}) == 2  # both xdist workers had work
