"""Standalone reproducers (``mhabench repro``): each script imports only its framework and NumPy, and exits 1
in a fresh interpreter, with mhabench not importable, wherever the catalogue says its entry shows here."""
from __future__ import annotations

import ast
import json
import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mhabench.conformance import repro
from mhabench.conformance.catalogue import load
from mhabench.conformance.repro.families import FAMILIES
from mhabench.conformance.repro.issue import issue_body

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def catalogue():
    return load()


def _installed(target) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in target.family.imports)


def _imported_modules(source: str) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            modules.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "__import__":
            modules.add("__import__")
    return modules


def test_readme_states_how_many_entries_link_an_upstream_report(catalogue):
    linked = sum(1 for e in catalogue if e.upstream)
    said = re.search(r"(\d+) of the (\d+) entries do", (ROOT / "README.md").read_text())
    assert said, "the README should say how many catalogue entries link an upstream issue"
    assert (int(said.group(1)), int(said.group(2))) == (linked, len(catalogue))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_every_template_script_imports_only_its_framework_and_numpy(family, catalogue):
    """Rendered (not run) for one entry of each call path: the imports are the family's, NumPy and the
    standard library's."""
    entry = next(e for e in catalogue if family in e.adapters and any(
        t.adapter == family for t in repro.targets(e, catalogue)))
    target = next(t for t in repro.targets(entry, catalogue) if t.adapter == family)
    source = repro.render(target)
    assert "mhabench" not in _imported_modules(source)
    assert _imported_modules(source) - set(sys.stdlib_module_names) <= {"numpy", *FAMILIES[family].imports}
    compile(source, "repro.py", "exec")


# one cheap entry per framework family that starts fast; the Keras and TensorFlow paths run in the slow set
FAST = ["torch-masked_nonfinite-poisons_batch", "torch_mha-with_scores-fully_masked_row-nan",
        "jax_dpa-fully_masked_row-uniform", "ort_attention-masked_nan_poisons_batch",
        "classic_torch-fully_masked_row-uniform"]
SLOW = ["jax-masked_nonfinite-gradients-nan", "flax_mha-float64-default-softmax-in-float32", "keras_mha@jax-float64-is-float32",
        "keras_mha-fused-fully_masked_row-uniform", "tf_keras_mha-multi_axis-fully_masked_row-weights_one",
        "keras_mha@torch-float64-fused-in-float32", "torch_mha@ort-fully_masked_row-nan",
        "keras_gqa-fused-fully_masked_row-uniform", "keras_gqa@torch-fused-fully_masked_row-lse",
        "classic_keras-masked_nonfinite-gradients-nan", "keras_mha@torch-masked_nonfinite-gradients-nan",
        "torch_flex-cpu_compiled_nan_query_row_zero_weights"]


def _run_unshrunk(entry_id, catalogue, tmp_path):
    entry = catalogue.get(entry_id)
    target = repro.targets(entry, catalogue)[0]
    if not _installed(target):
        pytest.skip(f"{target.family.imports} not installed")
    if not repro.shows_here(target):
        pytest.skip(f"{entry_id} applies when {entry.conditions}: not this machine's kernels")
    path = tmp_path / repro.script_name(entry_id)
    path.write_text(repro.render(target))
    return target, repro.run_script(path)


def _check_run(target, result):
    assert "mhabench" not in _imported_modules(Path(result.args[1]).read_text())
    assert result.returncode == 1, f"{target.row_id}: exit {result.returncode}\n{result.stdout}\n{result.stderr[-2000:]}"
    assert "DIFFERS" in result.stdout and repro.behaviour_sentence(target.entry) in result.stdout


@pytest.mark.parametrize("entry_id", FAST)
def test_reproducer_exits_1_in_a_fresh_interpreter_without_mhabench(entry_id, catalogue, tmp_path):
    _check_run(*_run_unshrunk(entry_id, catalogue, tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("entry_id", SLOW)
def test_reproducer_exits_1_slow_frameworks(entry_id, catalogue, tmp_path):
    _check_run(*_run_unshrunk(entry_id, catalogue, tmp_path))


def test_script_fails_to_run_if_it_imported_mhabench(tmp_path):
    """The guard the checks rely on: under run_script an import of mhabench raises."""
    path = tmp_path / "bad.py"
    path.write_text("import mhabench\n")
    result = repro.run_script(path, timeout=60)
    assert result.returncode != 0 and "must not import mhabench" in result.stderr


def test_script_exits_0_once_the_framework_agrees(catalogue, tmp_path):
    """The exit status follows the comparison: with the framework call replaced by the canonical NumPy one (a
    fixed framework), the same script exits 0."""
    entry = catalogue.get("torch-masked_nonfinite-poisons_batch")
    source = repro.render(repro.targets(entry, catalogue)[0])
    fixed = source.replace("def main():", "framework = canonical\n\n\ndef main():")
    path = tmp_path / "fixed.py"
    path.write_text(fixed.replace("import torch\n", "").replace("import torch.nn.functional as F\n", ""))
    result = repro.run_script(path, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "behaviour is gone" in result.stdout


def test_a_row_id_names_its_entry_and_that_call_first(catalogue):
    entry, targets = repro.resolve("torch_sdpa-cross_T8_S4-nan_masked_value-float32-output", catalogue)
    assert entry.id == "torch-masked_nonfinite-poisons_batch"
    assert targets[0].row_id == "torch_sdpa-cross_T8_S4-nan_masked_value-float32-output"
    with pytest.raises(repro.ReproError, match="neither a catalogue entry id nor a row id"):
        repro.resolve("no-such-thing", catalogue)


def test_moves_only_shrink_and_keep_the_entry_properties(catalogue):
    entry = catalogue.get("torch-masked_nonfinite-poisons_batch")
    case = repro.targets(entry, catalogue)[0].case
    smaller = repro.moves(case)
    assert smaller and all(repro.input_elements(c) <= repro.input_elements(case) for c in smaller)
    assert {c.batch for c in smaller} >= {1}


def test_a_self_attention_case_shrinks_its_one_input_as_one(catalogue):
    """The textbook PyTorch module takes one input: its case shrinks query and key positions, and query and
    value widths, together (a move that parts them would not be a self-attention case)."""
    target = repro.targets(catalogue.get("classic_torch-fully_masked_row-uniform"), catalogue)[0]
    assert target.case.shared_input
    smaller = repro.moves(target.case)
    assert smaller and all(c.shared_input and c.q_shape == c.k_shape and c.query_dim == c.value_dim for c in smaller)
    assert any(c.q_shape != target.case.q_shape for c in smaller)
    assert "value = query" in repro.render(target)


def test_a_precision_that_qualifies_another_behaviour_sets_the_tolerance(catalogue):
    """A float64 entry judged at float32 precision (its behaviour NaN poisoning) gets float32's tolerance, so a
    float32-rounded scale alone cannot make its script exit 1; an entry whose behaviour is the lost precision
    keeps float64's."""
    poisons = catalogue.get("ort_attention-masked_nan_poisons_batch-float64")
    assert repro.judged_precision(poisons, "float64") == "float32"
    assert 'PRECISION = "float64", "output", "float32"' in repro.render(repro.targets(poisons, catalogue)[0])
    assert repro.judged_precision(catalogue.get("keras_mha@jax-float64-is-float32"), "float64") == "float64"


def test_the_first_candidates_vary_key_dim_and_key_count(catalogue):
    """A float32-rounded scale is exact for key_dim 1 and a single key's weight is 1 whatever its logit: the few
    candidates tried must not all be such cases."""
    first = repro.targets(catalogue.get("ort_attention-float64-function-body-scale"), catalogue)[:repro.CANDIDATES]
    assert any(t.case.attention_spec.key_dim not in (1, 16) and math.prod(t.case.k_shape) > 1 for t in first)


def test_shrinking_reduces_the_case_and_the_script_still_shows_it(catalogue, tmp_path):
    entry = catalogue.get("torch-masked_nonfinite-poisons_batch")
    made = repro.build(entry, repro.targets(entry, catalogue))
    assert made.source, made.reason
    assert repro.input_elements(made.target.case) < repro.input_elements(made.original)
    assert made.verified.returncode == 1
    directory = repro.write_directory([made, repro.Reproducer(catalogue.get("classic_torch-fully_masked_row-uniform"),
                                                              reason="no template")], tmp_path / "out")
    readme = (directory / "README.md").read_text()
    assert f"]({repro.script_name(entry.id)})" in readme and "classic_torch-fully_masked_row-uniform`: no template" \
        in readme
    body = issue_body(made)
    assert "### 🐛 Describe the bug" in body and "### Versions" in body and "```python" in body
    assert re.search(r"^- torch \d", body, re.M) and "CPU: " in body


def test_cli_refuses_an_unknown_id_in_one_line():
    result = subprocess.run([sys.executable, "-m", "mhabench", "repro", "no-such-entry"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "neither a catalogue entry id nor a row id" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("entry_id", [e.id for e in load()])
def test_every_scriptable_entry_has_a_reproducer_that_exits_1_here(entry_id, catalogue):
    """Every entry a template can express gets a script (unshrunk: the cases as the matrix has them) that exits
    1 in a fresh interpreter, wherever the catalogue says the entry shows on this machine. A script that stops
    exiting 1 is an entry whose behaviour moved: the catalogue's check will call it stale too."""
    entry = catalogue.get(entry_id)
    candidates = repro.targets(entry, catalogue)
    if not candidates:
        pytest.skip(f"no script: {repro.build(entry, candidates).reason}")
    if not _installed(candidates[0]):
        pytest.skip(f"{candidates[0].family.imports} not installed")
    if not repro.shows_here(candidates[0]):
        pytest.skip(f"{entry_id} applies when {entry.conditions}: not this machine's kernels")
    made = repro.build(entry, candidates, shrinking=False)
    assert made.reproduces, f"{made.status}: {made.reason}"
    assert made.verified.returncode == 1


def test_a_candidate_that_crashes_or_hangs_counts_as_not_showing_and_the_worker_goes_on():
    worker = repro.Worker({}, timeout=5)
    try:
        assert worker.status("import os\nos._exit(3)\n").startswith("error: the interpreter")
        assert worker.status("import time\ntime.sleep(60)\n") == "error: no answer in 5 s"
        assert worker.status("def main():\n    return 1\n") == 1
    finally:
        worker.close()


def test_every_subpackage_is_in_the_distribution():
    """setuptools installs only the packages pyproject lists: a new subpackage (repro/) must be among them."""
    import tomllib
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    for package, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            if "tests" not in parts and not any(p.startswith(".") for p in parts):
                assert ".".join((package, *parts)) in listed, f"{init.parent} is not in pyproject's packages"


def _fixed(source: str) -> str:
    """A reproducer as it reads once its framework is fixed: the framework call replaced by the canonical one."""
    return source.replace("def main():", "framework = canonical\n\n\ndef main():")


@pytest.fixture
def fixed_framework(monkeypatch):
    """Every script ``repro`` renders, as it runs once the framework agrees with the canonical result."""
    render = repro.render
    monkeypatch.setattr(repro, "render", lambda target: _fixed(render(target)))


def test_an_entry_whose_script_exits_0_here_is_stale(catalogue, tmp_path, fixed_framework):
    """Where the catalogue says the entry shows on this machine, a script that exits 0 makes the entry stale:
    in the README (its own section, the script linked), status.json, and the exit status of repro --out."""
    pytest.importorskip("torch")
    entry = catalogue.get("torch-masked_nonfinite-poisons_batch")
    made = repro.build(entry, repro.targets(entry, catalogue)[:1])
    assert made.stale and made.status == "stale" and not made.reproduces
    assert "exits 0" in made.reason and "update the entry" in made.reason
    directory = repro.write_directory([made], tmp_path / "out")
    readme = (directory / "README.md").read_text()
    assert "## Stale entries (1)" in readme and f"[{entry.id}]({repro.script_name(entry.id)})" in readme
    assert (directory / repro.script_name(entry.id)).is_file()  # the evidence: the script that exits 0
    status = json.loads((directory / "status.json").read_text())
    assert status[entry.id]["status"] == "stale"
    assert repro.summarise([made])["scripts"] == 0 and repro.summarise([made])["stale"] == 1


def test_repro_out_exits_1_on_a_stale_entry(catalogue, tmp_path, fixed_framework, capsys):
    pytest.importorskip("torch")
    from mhabench import cli
    assert cli.main(["repro", "torch-masked_nonfinite-poisons_batch", "--no-shrink", "--out",
                     str(tmp_path / "out")]) == 1
    assert "1 stale entry" in capsys.readouterr().err


def test_an_entry_that_does_not_show_here_is_not_stale_for_a_script_that_exits_0(catalogue, monkeypatch,
                                                                                fixed_framework):
    """Another machine's kernels (facts that do not hold here), or an entry that declares it varies: exit 0 is
    what the catalogue expects there, not evidence that the behaviour is gone."""
    pytest.importorskip("torch")
    entry = catalogue.get("torch-masked_nonfinite-poisons_batch")
    monkeypatch.setattr(repro, "shows_here", lambda target: False)
    made = repro.build(entry, repro.targets(entry, catalogue)[:1], shrinking=False)
    assert not made.stale and made.status == "no script"
