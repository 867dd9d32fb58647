"""The conformance suite under pytest-xdist: the same verdicts as a serial run, and each adapter's worker process
started once per xdist worker, not once per test."""
import os
import re
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
    command = [sys.executable, "-m", "pytest", "-p", "worker_probe", "-p", "no:cacheprovider", "-v",
               f"--junitxml={report}", "conformance/test_masks.py", "conformance/test_catalogue.py",
               "--adapters", "numpy_oracle,torch_sdpa,classic_torch", *extra]
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode in (0, 1), out.stdout[-3000:] + out.stderr[-3000:]
    verdicts = {}
    for case in ElementTree.parse(report).iter("testcase"):
        outcome = next((child.tag for child in case if child.tag in ("failure", "error", "skipped")), "passed")
        verdicts[f"{case.get('classname')}::{case.get('name').split('@', 1)[0]}"] = outcome
    started = Counter(tuple(line.split("\t")) for line in log.read_text().splitlines()) if log.exists() else Counter()
    where = {}  # adapter -> the xdist workers that ran its conformance tests ("[gw0] PASSED node-id" with -v)
    for match in re.finditer(r"^\[(gw\d+)\].*?(?:PASSED|FAILED|SKIPPED|ERROR) \S+::test_conformance\[([^\]-]+)-",
                             out.stdout, re.M):
        where.setdefault(match.group(2), set()).add(match.group(1))
    return verdicts, started, where


@pytest.mark.slow
def test_xdist_gives_the_serial_verdicts_and_starts_each_adapter_once_per_xdist_worker(tmp_path):
    serial, serial_started, _ = _run(tmp_path, "serial")
    distributed, distributed_started, where = _run(tmp_path, "xdist", "-n", "2")  # -n alone groups by adapter
    assert serial and distributed == serial
    assert set(serial.values()) >= {"passed", "skipped"}
    # each adapter's tests ran in one xdist worker, which started its process once, not once per test (a
    # catalogue entry covering two adapters may start the second's process in its worker too, once)
    assert set(where) == {"numpy_oracle", "torch_sdpa", "classic_torch"} and all(len(w) == 1 for w in where.values())
    assert set(distributed_started.values()) == {1}
    adapters = {"numpy_oracle worker", "torch_sdpa worker", "classic_torch worker"}
    assert {name for _, name in distributed_started} == adapters == {name for _, name in serial_started}
    assert len({pid for pid, _ in distributed_started}) == 2  # both xdist workers had work


def test_the_scheduler_reads_each_tests_adapter_from_its_node_id():
    from types import SimpleNamespace
    from mhabench.conformance import catalogue, pytest_view, session
    config = SimpleNamespace(stash=pytest.Stash())
    config.stash[pytest_view.PLAN] = session.make_plan("numpy_oracle,keras_mha,keras_mha@jax", "float32")
    of = lambda nodeid: pytest_view.adapter_of(config, nodeid)
    assert of("conformance/test_masks.py::test_conformance[keras_mha@jax-self_T8-causal-float32]") == "keras_mha@jax"
    assert of("conformance/test_masks.py::test_conformance[keras_mha-self_T8-causal-float32]") == "keras_mha"
    assert of("conformance/test_random.py::test_random_cases[numpy_oracle]") == "numpy_oracle"
    assert of("tests/test_cli.py::test_help") is None
    entry = next(e for e in catalogue.load() if "keras_mha" in e.adapters)
    assert of(f"conformance/test_catalogue.py::test_entry_reproduces[{entry.id}]") == \
        next(a for a in entry.adapters if a in ("numpy_oracle", "keras_mha", "keras_mha@jax"))
