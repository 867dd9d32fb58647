"""Every documented command works as written, and every name a document gives exists (tests/doccheck.py)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests import doccheck
from tests.doccheck import ROOT, Block

DOCS = doccheck.markdown_files()
# Drafts of bug reports to other projects: the files, functions and flags they name are those projects'.
OTHER_PROJECTS = ROOT / "conformance" / "divergences" / "reports"
# a Python block that imports one of these starts its framework: tens of seconds, so it runs with -m slow
SLOW_IMPORTS = re.compile(r"^\s*(import|from)\s+(tensorflow|keras|tf_keras|jax|flax)\b", re.M)
SHELLS = ("bash", "sh", "shell")


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _block_params():
    params = []
    for path in DOCS:
        for block in doccheck.blocks(path):
            slow = (block.directive == "run" and block.argument == "slow") or \
                (block.language == "python" and block.directive is None and SLOW_IMPORTS.search(block.source))
            params.append(pytest.param(block, id=block.where, marks=[pytest.mark.slow] if slow else []))
    return params


def test_every_markdown_file_is_found():
    found = {_rel(p) for p in DOCS}
    assert {"README.md", "ARCHITECTURE.md", "conformance/README.md", "benchmarks/README.md",
            "examples/README.md"} <= found


@pytest.mark.parametrize("block", _block_params())
def test_block(block: Block, tmp_path):
    assert block.language, f"{block.where}: name the block's language (bash, python, toml, text)"
    if block.directive == "skip":
        assert len(block.argument.split()) >= 3, f"{block.where}: say in a few words why it is not checked"
        pytest.skip(block.argument)
    assert block.directive in (None, "run", "file"), f"{block.where}: unknown directive {block.directive!r}"
    if block.directive == "file":
        _check_same_as_file(block)
    if block.language in SHELLS:
        doccheck.check_block_commands(block)
        if block.directive == "run":
            _run_shell(block, tmp_path)
    elif block.language == "python":
        _run_python(block, tmp_path)
    elif block.language == "toml":
        _check_toml(block)
    elif block.language == "text":
        _check_text(block)
    else:
        raise AssertionError(f"{block.where}: no check for {block.language!r} blocks")


def _check_same_as_file(block: Block) -> None:
    path = ROOT / block.argument
    assert path.is_file(), f"{block.where}: {block.argument} does not exist"
    source = path.read_text()
    docstring = re.match(r'\s*(""".*?"""|\'\'\'.*?\'\'\')\s*\n', source, re.S)
    body = source[docstring.end():] if docstring else source
    assert block.source.strip() == body.strip(), \
        f"{block.where}: the block is not {block.argument} (without its docstring); copy the file into it"


def _scratch(block: Block, tmp_path: Path) -> Path:
    """A scratch directory holding the doc's Python files, as a user running "from the directory holding the
    file" has them."""
    for source in block.path.parent.glob("*.py"):
        shutil.copy(source, tmp_path / source.name)
    return tmp_path


def _run_shell(block: Block, tmp_path: Path) -> None:
    cwd = _scratch(block, tmp_path)
    # the documented commands as a user with this environment activated runs them: its scripts first on PATH
    env = dict(os.environ, MHABENCH_CACHE_DIR=str(tmp_path / "cache"),
               PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    for line in doccheck.command_lines(block.source):
        done = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (f"{block.where}: {line.strip()} exited {done.returncode}\n"
                                      f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    results = cwd / "results" / "conformance" / "results.json"
    if results.exists():  # a documented conformance run: none of its rows fail or error
        rows = json.loads(results.read_text())["rows"]
        bad = [r["row_id"] for r in rows if r["status"] in ("fail", "error")]
        assert rows and not bad, f"{block.where}: {len(bad)} fail or error rows, e.g. {bad[:3]}"


def _run_python(block: Block, tmp_path: Path) -> None:
    cwd = _scratch(block, tmp_path)
    script = cwd / "block.py"
    script.write_text(block.source)
    done = subprocess.run([sys.executable, str(script)], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{block.where}: exited {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"


def _check_toml(block: Block) -> None:
    data = tomllib.loads(block.source)
    if "divergence" in data:
        fields = doccheck.index().modules["mhabench.conformance.catalogue"].names["Entry"]
        commented = re.findall(r"^#\s*(\w+)\s*=", block.source, re.M)  # the alternatives shown as comments
        for entry in data["divergence"]:
            unknown = (set(entry) | set(commented)) - set(fields)
            assert not unknown, f"{block.where}: catalogue entries have no key {sorted(unknown)}"
    elif "project" in data:
        from mhabench.impls.registry import ENTRY_POINT_GROUP
        groups = data["project"]["entry-points"]
        assert list(groups) == [ENTRY_POINT_GROUP], f"{block.where}: the group is {ENTRY_POINT_GROUP}"
        example = tomllib.loads((ROOT / "examples/mhabench_plugin_example/pyproject.toml").read_text())
        assert groups == example["project"]["entry-points"], f"{block.where}: not the example plugin's entry point"
    else:
        raise AssertionError(f"{block.where}: a TOML block this test does not know")


def _check_text(block: Block) -> None:
    """A diagram or a layout: the folders and files it names exist."""
    problems = []
    for word in re.findall(r"(?<![\w.])([\w./-]+(?:/|\.py))(?![\w])", block.source):
        why = doccheck.check_path(word, block.path)
        if why:
            problems.append(why)
    assert not problems, f"{block.where}: " + "; ".join(problems)


@pytest.mark.parametrize("path", [p for p in DOCS if OTHER_PROJECTS not in p.parents], ids=_rel)
def test_names_in_the_prose_exist(path):
    problems = [f"{_rel(path)}:{line}: {why}" for line, span in doccheck.prose(path)
                if (why := doccheck.check_span(span, path))]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", DOCS, ids=_rel)
def test_links_stay_in_the_repository(path):
    problems = []
    for line, target in ((path.read_text().count("\n", 0, m.start()) + 1, m.group(1))
                         for m in re.finditer(r"\]\(([^)\s]+)\)", path.read_text())):
        if re.match(r"[a-z]+://|#|mailto:", target):
            continue
        resolved = (path.parent / target.split("#")[0]).resolve()
        if ROOT not in resolved.parents and resolved != ROOT or not resolved.exists():
            problems.append(f"{_rel(path)}:{line}: {target} is not a file of the repository")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", doccheck.example_modules(), ids=_rel)
def test_example_docstring_commands(path):
    commands = doccheck.docstring_commands(path)
    for line, command in commands:
        try:
            doccheck.check_command(command.split(), path.parent)
        except AssertionError as exc:
            raise AssertionError(f"{_rel(path)}:{line}: {command}\n  {exc}") from None
        if "--adapter " in command and command.split()[1] in ("conform", "bench"):
            assert "--adapters " in command, f"{_rel(path)}:{line}: select the plugin (--adapters), or every " \
                                             f"installed adapter runs too"


def test_the_readme_adapter_table_is_the_registry():
    """Every registered adapter, kernel variants included, is in the README's table, and nothing else."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## What is compared"):]
    section = section[:section.index("\n\n", section.index("| adapter |"))]
    named = set()
    for row in [r for r in section.splitlines() if r.startswith("|")][2:]:
        cell = row.split("|")[1]
        tokens = re.findall(r"`([^`]+)`", cell)
        full = [t for t in tokens if not t.startswith(("+", "@"))]
        bases = list(full)
        for token in tokens:
            if token.startswith("+"):
                stem = bases[0].rpartition("+")[0] or bases[0]
                bases.append(stem + token)
        for token in tokens:
            if token.startswith("@"):  # "(and `@torch`)": every name so far on the other backend too
                bases += [re.sub(r"@\w+", token, b) for b in bases if "@" in b]
        named.update(bases)
    registered = set(doccheck.builtin_adapter_names())
    assert named - registered == set(), f"the README's table names adapters that do not exist: {named - registered}"
    assert registered - named == set(), f"the README's table leaves out {sorted(registered - named)}"


def test_a_broken_doc_fails(tmp_path):
    """The checks catch what the docs used to get wrong."""
    doc = tmp_path / "README.md"
    doc.write_text("x\n")
    assert doccheck.check_span("flops.CAUSAL_SKIPS", doc)
    assert doccheck.check_span("track_gflops_*", doc)
    assert doccheck.check_span("memory.py", ROOT / "benchmarks" / "README.md")
    assert not doccheck.check_span("memory.py", ROOT / "README.md")
    assert doccheck.check_span("--no-such-option", doc)
    assert doccheck.check_span("../shared/DESIGN.md", ROOT / "conformance" / "README.md")
    assert doccheck.check_span("benchmarks/memory.py", doc)
    assert doccheck.check_span("impls.validation.no_such_function", doc)
    assert doccheck.check_span("torch_sdpa+nothing", doc)
    assert not doccheck.check_span("impls.validation.validate_call", doc)
    assert not doccheck.check_span("Machine.track_gemm_gflops", doc)
    block = Block(ROOT / "README.md", 1, "bash", "mhabench bench --adapters torch_sdpa jax_dpa\n")
    with pytest.raises(AssertionError, match="unrecognized arguments: jax_dpa"):
        doccheck.check_block_commands(block)
    for bad in ("mhabench conform --adapters torch_sdpa --areas nothing",
                "mhabench conform --rerun torch_mha-no_such_case-float32-output",
                "mhabench bench --bench 'track_gflops_forward'",
                "mhabench bench --quick --adapter my_attention.py:NoSuchClass --adapters my_attention",
                "python -m mhabench.benchmarks.compare_check --no-such-option",
                "asv run --no-such-option",
                "pytest conformance --no-such-option",
                "pip install -e '.[nothing]'",
                "rsync -a a b"):
        with pytest.raises(AssertionError):
            doccheck.check_block_commands(Block(ROOT / "examples" / "README.md", 1, "bash", bad + "\n"))


def test_the_profiles_table_is_the_profiles():
    """benchmarks/README.md's profile table and sampling sentence quote benchmarks/profiles.py."""
    from mhabench.benchmarks.profiles import PROFILES
    text = (ROOT / "benchmarks" / "README.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)` \|(.*)$", text, re.M) if m.group(1) in PROFILES}
    assert set(rows) == set(PROFILES), f"the profile table lists {sorted(rows)}, the profiles are {sorted(PROFILES)}"
    for name, row in rows.items():
        profile = PROFILES[name]
        cells = [c.strip() for c in row.split("|")]
        lengths = [int(n) for n in re.findall(r"\d+", cells[1].split("(")[0])]
        assert (lengths[0], lengths[-1]) == (min(profile.seq_lens), max(profile.seq_lens)), \
            f"{name}: the table says L = {lengths[0]} ... {lengths[-1]}, the profile {profile.seq_lens}"
        assert [int(n) for n in re.findall(r"\d+", cells[2])] == list(profile.num_heads), f"{name}: heads"
        for cls in re.findall(r"`(\w+Attention)`", cells[0]):
            assert not profile.classes or cls in profile.classes, f"{name}: {cls}"
        sampling = profile.sampling
        quoted = f"{sampling.max_samples} samples or {sampling.max_seconds:g} s"
        assert quoted in text, f"{name}: its sampling stops at {quoted}; the README does not say so"
    accuracy = {m.group(1): m.group(2) for m in re.finditer(r"^\| `(\w+)`, accuracy \|(.*)$", text, re.M)}
    assert set(accuracy) == {n for n, p in PROFILES.items() if p.accuracy_lens}, "the accuracy rows"
    for name, row in accuracy.items():
        profile = PROFILES[name]
        cells = [c.strip() for c in row.split("|")]
        lengths = [int(n) for n in re.findall(r"\d+", cells[1].split("(")[0])]
        assert (lengths[0], lengths[-1]) == (min(profile.accuracy_lens), max(profile.accuracy_lens)), name
        assert [int(n) for n in re.findall(r"\d+", cells[2])] == [profile.accuracy_heads], f"{name}: heads"
        assert set(re.findall(r"`(\w+Accuracy)`", cells[0])) == {c for c in profile.classes if "Accuracy" in c}


def test_references_to_readme_sections_exist():
    """A file that sends the reader to a README section ('see README, "Nightly runs"') names one that exists."""
    headings = {h.strip().lower() for h in re.findall(r"^#+ (.*)$", (ROOT / "README.md").read_text(), re.M)}
    problems = []
    for path in [*ROOT.glob(".github/**/*.yml"), *ROOT.glob(".ci/*"), *doccheck.index().modules_paths()]:
        for section in re.findall(r'README(?:\.md)?, "([^"]+)"', path.read_text()):
            if section.strip().lower() not in headings:
                problems.append(f"{_rel(path)}: README has no section {section!r}")
    assert not problems, "\n".join(problems)


def test_the_exit_status_table_lists_every_command():
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Exit status"):]
    section = section[:section.index("\n## ")]
    listed = set(re.findall(r"^\| `mhabench (\w+)`", section, re.M))
    assert listed == set(doccheck.subparsers()), f"the exit status table lists {sorted(listed)}"


def test_the_example_readme_says_how_to_opt_into_every_modern_feature():
    from mhabench.impls.base import EXTENSION_FEATURES
    text = (ROOT / "examples" / "README.md").read_text()
    assert "supported_extensions" in text
    assert [f for f in EXTENSION_FEATURES if f"`{f}`" not in text] == []


@pytest.mark.slow
def test_the_example_passes_the_whole_matrix(tmp_path):
    """examples/my_attention.py over the whole default matrix (its README runs the reduced one): no fail or error
    row, S = 0 and NaN in masked values included."""
    shutil.copy(ROOT / "examples" / "my_attention.py", tmp_path / "my_attention.py")
    done = subprocess.run([sys.executable, "-m", "mhabench", "conform", "--adapter", "my_attention:MyAttention",
                           "--adapters", "my_attention", "--results", str(tmp_path / "results")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=900)
    rows = json.loads((tmp_path / "results" / "conformance" / "results.json").read_text())["rows"]
    bad = [r["row_id"] for r in rows if r["status"] in ("fail", "error")]
    assert done.returncode == 0 and len(rows) > 5000 and not bad, (bad[:5], done.stderr[-2000:])


def test_the_columns_a_row_is_said_to_record_are_its_fields():
    """conformance/README.md names the figures of a row: each is a column of rows.jsonl / results.csv."""
    from mhabench.schema import FIELDS
    text = (ROOT / "conformance" / "README.md").read_text()
    paragraph = text[text.index("Each row records"):].split("\n\n")[0]
    named = [n for n in re.findall(r"`(\w+)`", paragraph) if n not in ("reference", "floor", "rounding")]
    assert len(named) >= 6 and [n for n in named if n not in FIELDS] == []


def test_the_plugin_example_passes_the_reduced_matrix(tmp_path):
    """examples/mhabench_plugin_example's adapter, as its entry point names it, through conform --quick: no
    fail or error row (installed, its entry point gives the name; here a subclass does)."""
    (tmp_path / "wrapper.py").write_text("from mhabench_plugin_example import LoopAdapter\n\n\n"
                                         "class ExampleLoop(LoopAdapter):\n    name = 'example_loop'\n")
    source = ROOT / "examples" / "mhabench_plugin_example" / "src"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(source), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-m", "mhabench", "conform", "--adapter", "wrapper.py:ExampleLoop",
                           "--adapters", "example_loop", "--quick", "--results", str(tmp_path / "results")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    rows = json.loads((tmp_path / "results" / "conformance" / "results.json").read_text())["rows"]
    bad = [r["row_id"] for r in rows if r["status"] in ("fail", "error")]
    assert done.returncode == 0 and rows and not bad, (bad[:5], done.stderr[-2000:])
    assert any(r["status"] == "pass" and r["area"] == "modern" for r in rows)
