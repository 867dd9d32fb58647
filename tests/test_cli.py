"""The command line as a new user meets it: one syntax for lists, ranges and conflicts checked, absent
devices refused, no framework imported or heard from where none is needed, readable at 80 columns."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from mhabench.cli import main


def _one_line_error(capsys, argv, *needles):
    assert main(argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize("argv, needles", [
    (["conform", "--jobs", "0"], ["--jobs must be an integer >= 1"]),
    (["conform", "--memory-budget", "-5"], ["--memory-budget must be a positive number"]),
    (["conform", "--timeout", "0"], ["--timeout must be a positive number"]),
    (["conform", "--examples", "-1"], ["--examples must be an integer >= 0"]),
    (["conform", "--self-check", "--rerun", "x"], ["--self-check and --rerun cannot be used together"]),
    (["conform", "--resume", "--rerun", "x"], ["--resume and --rerun cannot be used together"]),
    (["conform", "--adapters", "numpy_oracle torch_sdpa"], ["--adapters", "comma-separated"]),
    (["conform", "--dtypes", "float32;float64"], ["--dtypes", "comma-separated"]),
    (["bench", "--adapters", "numpy_oracle torch_sdpa"], ["--adapters", "comma-separated"]),
    (["bench", "--devices", "tpu"], ["--devices", "unknown device"]),
])
def test_bad_options_are_one_line_errors(capsys, tmp_path, argv, needles):
    _one_line_error(capsys, [*argv, "--results", str(tmp_path)], *needles)


@pytest.mark.parametrize("argv, needle", [
    (["conform", "--jobs", "x"], "argument --jobs: invalid int value: 'x'"),
    (["report", "--compare", "only-one"], "argument --compare: expected 2 arguments"),
    (["bench", "--no-such-option"], "unrecognized arguments: --no-such-option"),
])
def test_argparse_errors_are_one_line_too(capsys, argv, needle):
    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert done.value.code == 2 and "\n" not in err and needle in err and "--help" in err, err


@pytest.mark.parametrize("argv", [["conform", "--cache-dir", ""], ["run", "--results", ""], ["bench", "--results", ""]])
def test_an_empty_path_is_refused_not_taken_for_the_default(capsys, argv):
    _one_line_error(capsys, argv, "must name a directory")


def test_a_device_named_explicitly_must_be_there(capsys, tmp_path):
    if os.path.exists("/proc/driver/nvidia/version"):
        pytest.skip("this machine has an NVIDIA GPU")
    _one_line_error(capsys, ["bench", "--devices", "cuda", "--results", str(tmp_path)], "--devices cuda",
                    "no NVIDIA GPU")


FRAMEWORKS = ("torch", "tensorflow", "jax", "flax", "keras", "onnxruntime", "tf_keras")


def test_listing_adapters_imports_no_framework(tmp_path):
    code = ("import sys, json; from mhabench.cli import main; main(['adapters', '--json']); "
            f"print(json.dumps(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules)), file=sys.stderr)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stderr.strip().splitlines()[-1]) == []
    assert {a["adapter"] for a in json.loads(done.stdout)} >= {"numpy_oracle", "torch_sdpa", "flax_mha"}


def test_no_framework_log_noise_on_stderr(tmp_path):
    """TensorFlow's C++ and absl INFO/WARNING lines stay out of what a user reads."""
    done = subprocess.run([sys.executable, "-m", "mhabench", "conform", "--adapters", "keras_mha,classic_keras",
                           "--areas", "invalid", "--quick", "--results", str(tmp_path)], capture_output=True, text=True,
                          timeout=600, env={k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"})
    assert done.returncode == 0, done.stdout + done.stderr
    noise = [line for line in done.stderr.splitlines() if not line.startswith("mhabench conform")]
    assert noise == [], noise


def test_the_summary_reads_at_80_columns():
    from rich.console import Console
    from mhabench import results
    from mhabench.commands.conform import print_summary
    from mhabench.conformance.session import Outcome, Plan
    names = ["keras_mha@jax", "keras_mha@torch", "numpy_oracle", "torch_sdpa"]
    rows = [results.Row(adapter=a, case=f"c{i}", area=area, dtype="float32", quantity="output", status="pass")
            for a in names for i, area in enumerate(results.AREAS[:9])]
    outcome = Outcome(rows, [], 1.0, [], results.Layout("r"), Plan(names, [], ["float32"]))
    out = io.StringIO()
    assert print_summary(outcome, None, Console(file=out, width=80, force_terminal=False)) == 0
    text = out.getvalue()
    assert all(len(line) <= 80 for line in text.splitlines())
    for name in names:  # whole, on one line: keras_mha@jax and keras_mha@torch never look alike
        assert any(name in line for line in text.splitlines()), name
