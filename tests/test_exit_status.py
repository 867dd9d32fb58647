"""The exit status of `mhabench conform`, as the README's table says: 1 when the run finds fail or error rows;
with --rerun, 1 only when the row it reran fails, whatever else the results directory holds."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MUTANT = ["--adapter", "tests/fixtures/adapters.py:CausalOffByOne"]


def _conform(*args):
    return subprocess.run([sys.executable, "-m", "mhabench", "conform", *MUTANT, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def failing_run(tmp_path_factory):
    results = tmp_path_factory.mktemp("rerun")
    done = _conform("--adapters", "mutant_causal_off_by_one", "--areas", "masks", "--dtypes", "float32", "--quick",
                    "--results", str(results))
    rows = json.loads((results / "conformance" / "results.json").read_text())["rows"]
    return done, results, rows


def test_a_run_with_fail_rows_exits_1(failing_run):
    done, _, rows = failing_run
    assert any(r["status"] == "fail" for r in rows) and done.returncode == 1, done.stderr[-2000:]


def test_rerun_judges_only_the_row_it_reran(failing_run):
    _, results, rows = failing_run
    passing = next(r["row_id"] for r in rows if r["status"] == "pass")
    failing = next(r["row_id"] for r in rows if r["status"] == "fail")
    assert _conform("--rerun", passing, "--results", str(results)).returncode == 0
    assert _conform("--rerun", failing, "--results", str(results)).returncode == 1
