"""Each new adapter is optional: with any one of its packages missing, every command still works, leaves
the adapter out of default runs and says what to install.

A package is made missing by a ``sitecustomize`` on PYTHONPATH that hides it (``find_spec`` and
``import`` raise ModuleNotFoundError) in the command's process and in every worker process it starts
(they inherit PYTHONPATH).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HIDER = '''
import importlib.abc, os, sys
_hidden = set(filter(None, os.environ.get("MHABENCH_TEST_HIDE", "").split(",")))


class _Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in _hidden:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden by the test)", name=name)
        return None


sys.meta_path.insert(0, _Hide())
'''
# the module each new package provides -> the new adapters that need it
NEEDED_BY = {
    "onnxruntime": ["ort_attention", "torch_mha@ort"],
    "onnx": ["ort_attention", "torch_mha@ort"],
    "onnxscript": ["torch_mha@ort"],
    "tf_keras": ["tf_keras_mha"],
}
NEW = ["ort_attention", "torch_mha@ort", "torch_flex", "keras_gqa", "keras_gqa@jax", "keras_gqa@torch", "tf_keras_mha"]
HINTS = {"ort_attention": 'mhabench[onnx]', "torch_mha@ort": 'mhabench[torch,onnx]', "tf_keras_mha": 'mhabench[tf-keras]'}


def installed(package):
    """Skip unless ``package`` is installed here (it is hidden only for the command under test)."""
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed here")


@pytest.fixture(scope="module")
def hider(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hide")
    (folder / "sitecustomize.py").write_text(HIDER)
    return folder


def run(hider, hidden, *argv, cwd=None, timeout=300):
    paths = [str(hider), str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "MHABENCH_TEST_HIDE": hidden,
           "ASV_PYTHONPATH": os.pathsep.join(paths), "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, *argv], cwd=cwd or ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_hider_hides(hider):
    done = run(hider, "onnxruntime", "-c", "import importlib.util as u\ntry:\n    import onnxruntime\nexcept "
               "ModuleNotFoundError as e:\n    print('hidden', e)")
    assert done.returncode == 0 and "hidden" in done.stdout, done.stderr


@pytest.mark.parametrize("package", sorted(NEEDED_BY))
def test_adapters_lists_the_adapter_as_not_installed_with_what_to_install(hider, package):
    installed(package)
    done = run(hider, package, "-m", "mhabench", "adapters", "--json")
    assert done.returncode == 0, done.stderr
    rows = {r["adapter"]: r for r in json.loads(done.stdout)}
    for name in NEEDED_BY[package]:
        assert rows[name]["available"] is False
        assert "install with: pip install" in rows[name]["reason"] and HINTS[name] in rows[name]["reason"]
    for name in set(NEW) - set(NEEDED_BY[package]):
        assert name in rows  # every other adapter is still listed


@pytest.mark.parametrize("package", sorted(NEEDED_BY))
def test_conform_leaves_the_adapter_out_of_its_default_selection(hider, package):
    installed(package)
    done = run(hider, package, "-c", "from mhabench.conformance import session; "
               "print(' '.join(session.make_plan(None, 'float32', 'invalid', quick=True).adapters))")
    assert done.returncode == 0, done.stderr
    selected = done.stdout.split()
    assert not set(NEEDED_BY[package]) & set(selected)
    assert "numpy_oracle" in selected


@pytest.mark.parametrize("package", ["onnxscript", "tf_keras"])
def test_conform_on_the_adapter_gives_rows_that_say_what_to_install(hider, package, tmp_path):
    installed(package)
    name = NEEDED_BY[package][-1]
    done = run(hider, package, "-m", "mhabench", "conform", "--adapters", name, "--areas", "invalid", "--quick",
               "--results", str(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr
    rows = json.loads((tmp_path / "conformance" / "results.json").read_text())["rows"]
    assert rows and all(r["status"] == "unsupported" for r in rows)
    assert all("unavailable" in r["message"] and HINTS[name] in r["message"] for r in rows)


@pytest.mark.slow
def test_bench_skips_the_adapter_with_what_to_install(hider, tmp_path):
    installed("onnxruntime")
    installed("asv")
    done = run(hider, "onnxruntime", "-m", "mhabench", "bench", "--quick", "--adapters", "ort_attention",
               "--bench", "SelfAttention.track_time_forward", "--results", str(tmp_path), timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    skips = [json.loads(line) for line in (tmp_path / "bench" / "skips.jsonl").read_text().splitlines()]
    assert skips and all(s["status"] == "skipped" and HINTS["ort_attention"] in s["reason"] for s in skips)
