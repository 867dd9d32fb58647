"""`report --compare` counts as regressions only what B set out to run: a benchmark outside B's selection is
"not run in B", not "failed in B"."""
import itertools
import json
import shutil
from pathlib import Path

import pytest

from mhabench import reports, results

SAMPLE = Path(__file__).resolve().parent / "fixtures" / "sample"


def _drop_adapter(root: Path, adapter: str) -> int:
    """Blank every asv result of ``adapter`` in a copied asv tree, as a run that did not select it leaves them."""
    meta = json.loads((root / "asv" / "benchmarks.json").read_text())
    dropped = 0
    for path in (root / "asv").glob("*/*.json"):
        if path.name == "machine.json":
            continue
        data = json.loads(path.read_text())
        columns = data["result_columns"]
        for name, entry in data["results"].items():
            values = dict(zip(columns, entry))
            if "adapter" not in meta.get(name, {}).get("param_names", []):
                continue
            position = meta[name]["param_names"].index("adapter")
            for i, combo in enumerate(itertools.product(*values["params"])):
                if combo[position] == repr(adapter) and values["result"][i] is not None:
                    values["result"][i] = None
                    dropped += 1
            entry[columns.index("result")] = values["result"]
        path.write_text(json.dumps(data))
    return dropped


@pytest.fixture()
def pair(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for side in (a, b):
        shutil.copytree(SAMPLE / "asv", side / "asv")
    assert _drop_adapter(b, "jax_dpa") > 0
    return a, b


def test_an_adapter_b_did_not_measure_is_not_run_in_b(pair):
    comparison = reports.compare(*pair)
    changes = comparison.table.set_index("benchmark")["change"]
    assert "failed in B" not in set(changes)
    assert len(comparison.not_run_in_b) > 0 and len(comparison.regressions) == 0
    assert "not run in B" in " ".join(reports.verdict(reports.collect(None, comparison)))


def test_an_adapter_b_planned_and_did_not_measure_failed_in_b(pair):
    a, b = pair
    results.write_json(results.Layout(b).bench_plan, {"adapters": ["numpy_oracle", "torch_sdpa", "jax_dpa"]})
    comparison = reports.compare(a, b)
    assert len(comparison.not_run_in_b) == 0
    failed = comparison.table[comparison.table["change"] == "failed in B"]
    assert len(failed) > 0 and len(comparison.regressions) >= len(failed)


def test_b_s_plan_decides_what_it_selected(pair):
    a, b = pair
    results.write_json(results.Layout(b).bench_plan, {"adapters": ["numpy_oracle", "torch_sdpa"]})
    comparison = reports.compare(a, b)
    assert "failed in B" not in set(comparison.table["change"]) and len(comparison.not_run_in_b) > 0
