"""The conformance view in the dtypes the README's test command leaves out.

``python -m pytest -q`` runs every adapter's conformance view in float32 (the view's default). The other three
dtypes of the reduced matrix take most of an hour on a small machine, so they are this one slow test, which CI
runs after the README's command (``.ci/run``): every adapter, every case of the reduced matrix, every
catalogue entry, in float64, float16 and bfloat16.
"""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OTHER_DTYPES = "float64,float16,bfloat16"


@pytest.mark.slow
def test_the_conformance_view_passes_in_the_other_three_dtypes():
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "conformance", "--dtypes", OTHER_DTYPES]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout[-6000:]}{done.stderr[-2000:]}"
    assert " passed" in done.stdout.strip().splitlines()[-1]
