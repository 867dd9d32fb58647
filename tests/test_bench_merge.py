"""Shards of one machine write asv result files of the same name; merged, every measurement is kept."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mhabench.benchmarks import merge

MIXED = Path(__file__).with_name("fixtures") / "mixed"


def _result_file(root: Path) -> Path:
    return next(p for p in (root / "asv").glob("*/*.json") if p.name != "machine.json")


def _split(tmp_path: Path, parts: int) -> list[Path]:
    """The fixture's results as ``parts`` shards: each keeps every parts-th measured slot, the others empty."""
    original = json.loads(_result_file(MIXED).read_text())
    columns = original["result_columns"]
    dirs = []
    for k in range(parts):
        data = json.loads(json.dumps(original))
        counter = 0
        for name, entry in data["results"].items():
            values = dict(zip(columns, entry))
            if not isinstance(values["result"], list):
                continue
            for j, value in enumerate(values["result"]):
                if value is None or (isinstance(value, float) and math.isnan(value)):
                    continue
                if counter % parts != k:
                    for column in merge.PER_PARAMETER:
                        if isinstance(values.get(column), list):
                            values[column][j] = None
                counter += 1
            data["results"][name] = [values.get(c) for c in columns]
        root = tmp_path / f"shard{k + 1}"
        shutil.copytree(MIXED / "asv", root / "asv")
        _result_file(root).write_text(json.dumps(data))
        dirs.append(root)
    return dirs


def _slots(path: Path) -> dict:
    data = json.loads(path.read_text())
    columns = data["result_columns"]
    out = {}
    for name, entry in data["results"].items():
        values = dict(zip(columns, entry))
        results = values["result"] if isinstance(values["result"], list) else [values["result"]]
        for j, value in enumerate(results):
            if value is not None and not (isinstance(value, float) and math.isnan(value)):
                out[(name, j)] = (value, (values.get("stats_q_25") or [None] * (j + 1))[j])
    return out


def test_shards_of_one_machine_merge_back_into_every_measurement(tmp_path):
    shards = _split(tmp_path, 3)
    assert all(len(_slots(_result_file(s))) < len(_slots(_result_file(MIXED))) for s in shards)
    merge.merge(shards, tmp_path / "merged")
    assert _slots(_result_file(tmp_path / "merged")) == _slots(_result_file(MIXED))
    assert (tmp_path / "merged" / "asv" / "benchmarks.json").exists()


def test_another_machine_is_copied_beside_and_a_second_merge_changes_nothing(tmp_path):
    other = tmp_path / "other"
    shutil.copytree(MIXED / "asv", other / "asv")
    (other / "asv" / "vm").rename(other / "asv" / "gpu-box")
    merge.merge([MIXED, other], tmp_path / "merged")
    machines = sorted(p.parent.name for p in (tmp_path / "merged" / "asv").glob("*/machine.json"))
    assert machines == ["gpu-box", "vm"]
    before = _slots(_result_file(tmp_path / "merged"))
    merge.merge([MIXED], tmp_path / "merged")
    assert _slots(_result_file(tmp_path / "merged")) == before


def test_a_directory_without_benchmarks_is_an_error_naming_it(tmp_path):
    with pytest.raises(merge.MergeError, match="no benchmark results in .*empty"):
        merge.merge([tmp_path / "empty"], tmp_path / "merged")


def test_bench_merge_command_writes_a_config_asv_publish_reads(tmp_path):
    shards = _split(tmp_path, 2)
    out = subprocess.run([sys.executable, "-m", "mhabench", "bench", "--merge", *map(str, shards), "--results",
                          "merged"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert out.returncode == 0, out.stderr
    config = tmp_path / "merged" / "bench" / "asv.conf.json"
    assert f"asv publish --config {config}" in out.stdout  # absolute: asv reads it from the config's folder
    assert json.loads(config.read_text())["results_dir"] == str((tmp_path / "merged" / "asv").resolve())
    bad = subprocess.run([sys.executable, "-m", "mhabench", "bench", "--merge", str(tmp_path / "nothing"),
                          "--results", str(tmp_path / "x")], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--merge" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
