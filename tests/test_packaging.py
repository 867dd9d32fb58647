"""The distribution installs one package, ``mhabench``, and the commands work from the installed wheel
as they do from a source checkout."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the tracked sources (the build leaves nothing in the checkout)."""
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source")
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(source)], check=True, capture_output=True, text=True, timeout=300)
    [built] = out.glob("mhabench-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """The wheel unpacked where pip puts it (``--target``), without touching this environment."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    return target


def top_level_names(wheel: Path) -> set[str]:
    with zipfile.ZipFile(wheel) as zf:
        return {name.split("/")[0] for name in zf.namelist() if not name.split("/")[0].endswith(".dist-info")}


def test_the_wheel_installs_mhabench_alone(wheel):
    assert top_level_names(wheel) == {"mhabench"}
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    for module in ("impls/oracle.py", "impls/torch_sdpa.py", "conformance/session.py", "benchmarks/bench_attention.py",
                   "reports/html.py", "results.py", "conformance/divergences/pytorch.toml"):
        assert f"mhabench/{module}" in names, module
    assert not any("/test_" in n or "/fixtures/" in n for n in names if not n.startswith("mhabench/conformance/test_"))


def _run(installed: Path, cwd: Path, *argv, timeout=600):
    # The wheel first on the path, run from outside the checkout: nothing can come from the sources.
    env = {**os.environ, "PYTHONPATH": str(installed)}
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def test_imports_come_from_the_wheel(installed, tmp_path):
    done = _run(installed, tmp_path, "-c", "import json, mhabench, mhabench.impls as i, mhabench.reports as r; "
                "print(json.dumps([mhabench.__file__, i.__file__, r.__file__, list(mhabench.__path__)]))")
    assert done.returncode == 0, done.stderr
    files = json.loads(done.stdout)
    assert all(f.startswith(str(installed)) for f in files[:3]) and files[3] == [str(installed / "mhabench")]


def test_the_commands_work_from_the_wheel(installed, tmp_path):
    listing = _run(installed, tmp_path, "-m", "mhabench", "adapters", "--json")
    assert listing.returncode == 0, listing.stderr
    assert {"numpy_oracle", "torch_sdpa", "keras_mha"} <= {a["adapter"] for a in json.loads(listing.stdout)}
    conform = _run(installed, tmp_path, "-m", "mhabench", "conform", "--adapters", "numpy_oracle", "--areas", "shapes",
                   "--dtypes", "float32", "--quick", "--results", "results")
    assert conform.returncode == 0, conform.stdout + conform.stderr
    rows = json.loads((tmp_path / "results" / "conformance" / "results.json").read_text())["rows"]
    assert rows and {r["status"] for r in rows} == {"pass"}
    report = _run(installed, tmp_path, "-m", "mhabench", "report", "--results", "results", "--out", "out")
    assert report.returncode == 0, report.stderr
    assert (tmp_path / "out" / "index.html").is_file()
    bench = _run(installed, tmp_path, "-m", "mhabench", "bench", "--quick", "--dry-run", "--adapters", "numpy_oracle")
    assert bench.returncode == 0, bench.stderr
    assert str(installed / "mhabench" / "benchmarks") in (tmp_path / "results" / "bench" / "asv.conf.json").read_text()
