"""Deterministic shards: ``--shard K/N`` splits a run by estimated cost, the same on every machine, and any N
shards cover the unsharded run exactly once."""
import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from mhabench import shards
from mhabench.conformance import schedule, session
from mhabench.options import SelectionError


@pytest.mark.parametrize("text, expected", [("1/1", (1, 1)), ("2/3", (2, 3)), (" 3 / 3 ", (3, 3)), ("10/12", (10, 12))])
def test_parse_accepts_k_of_n(text, expected):
    assert shards.parse(text) == expected


@pytest.mark.parametrize("text", ["3/2", "0/3", "1/0", "x", "", "1/2/3", "-1/2", "1.5/2", "2"])
def test_parse_rejects_with_one_line_naming_the_option(text):
    with pytest.raises(SelectionError) as caught:
        shards.parse(text)
    message = str(caught.value)
    assert message.startswith("--shard: ") and "\n" not in message and repr(text) in message


def test_assign_places_every_item_once_and_balances_by_cost():
    costs = {f"item{i}": (i * 7919) % 1000 + 1 for i in range(200)}
    for count in (1, 2, 3, 7):
        placed = shards.assign(costs, count)
        assert set(placed) == set(costs) and set(placed.values()) <= set(range(1, count + 1))
        loads = Counter()
        for key, shard in placed.items():
            loads[shard] += costs[key]
        # the largest shard exceeds the mean by less than one item (LPT's bound)
        assert max(loads.values()) - sum(costs.values()) / count < max(costs.values())
        assert shards.assign(dict(reversed(list(costs.items()))), count) == placed  # order of input is irrelevant


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_conformance_shards_cover_the_unsharded_run_exactly_once(count):
    full = session.make_plan("numpy_oracle,torch_sdpa,jax_dpa", "float32,float16", examples=4)
    parts = [session.make_plan("numpy_oracle,torch_sdpa,jax_dpa", "float32,float16", examples=4,
                               shard=f"{k}/{count}") for k in range(1, count + 1)]
    every = Counter((a, c.id, d) for part in parts for a, c, d in part.tasks())
    assert set(every) == {(a, c.id, d) for a, c, d in full.tasks()} and set(every.values()) == {1}
    assert sum(p.rows for p in parts) == full.rows
    assert all(p.rows_all_shards == full.rows and p.to_dict()["shard"] == [k, count]
               for k, p in enumerate(parts, 1))
    costs = schedule.prior_costs(full.adapters, full.cases, full.dtypes)
    loads = [sum(costs[(a, c.id, d)] for a, c, d in p.tasks()) for p in parts]
    assert max(loads) - sum(loads) / count < max(costs.values())
    # the compile-bound adapter, most of the cost, is spread over every shard rather than left in one
    assert all(any(a == "jax_dpa" for a, _, _ in p.tasks()) for p in parts)


def test_the_split_is_the_same_in_every_process():
    """Shards start on different machines: the split may not depend on hash seeds or the order of sets."""
    code = ("import json; from mhabench.conformance import session; "
            "p = session.make_plan('numpy_oracle,keras_mha,flax_mha', None, 'masks,axes', shard='2/3'); "
            "print(json.dumps(sorted(map(list, p.include))))")
    outputs = set()
    for seed in ("0", "1", "12345"):
        env = dict(os.environ, PYTHONHASHSEED=seed, PYTHONPATH=os.pathsep.join(sys.path))
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        outputs.add(out.stdout)
    assert len(outputs) == 1 and json.loads(outputs.pop())


def test_shard_plan_json_records_the_shard(tmp_path):
    plan = session.make_plan("numpy_oracle", "float32", "masks", shard="2/2")
    data = plan.to_dict()
    assert data["shard"] == [2, 2] and data["rows"] == plan.rows < data["rows_all_shards"]
    assert "shard" not in session.make_plan("numpy_oracle", "float32", "masks").to_dict()


def test_meta_names_the_machine_the_host_unless_overridden():
    import platform
    from mhabench import results
    assert results.meta({})["machine"] == platform.node()
    assert results.meta({}, machine="gpu-a100")["machine"] == "gpu-a100"


@pytest.mark.parametrize("profile", ["quick", "default"])
def test_benchmark_shards_cover_the_selection_exactly_once(profile):
    from mhabench.benchmarks import sweep
    adapters = ["torch_sdpa", "jax_dpa", "keras_mha", "numpy_oracle"]
    selected = sweep.selection(profile, adapters, ["cpu", "cuda"], None)
    total = sum(sweep.estimated_ms(profile, *b) for b in selected)
    for count in (1, 2, 3, 4):
        parts = [sweep.chunk_plan(profile, adapters, ["cpu", "cuda"], None, (k, count)) for k in range(1, count + 1)]
        every = Counter(b for part in parts for chunk in part for b in chunk.benchmarks)
        assert set(every) == set(selected) and set(every.values()) == {1}
        loads = [sum(sweep.estimated_ms(profile, *b) for chunk in part for b in chunk.benchmarks) for part in parts]
        assert max(loads) - total / count < max(sweep.estimated_ms(profile, *b) for b in selected)


def test_a_benchmark_shard_selects_exactly_its_benchmarks_with_asv_regexes():
    """The --bench regexes a shard's chunks pass to asv match its benchmarks and no other shard's."""
    import re
    from mhabench.benchmarks import sweep
    adapters = ["torch_sdpa", "jax_dpa"]
    selected = sweep.selection("quick", adapters, ["cpu"], None)
    for k in (1, 2):
        plan = sweep.chunk_plan("quick", adapters, ["cpu"], None, (k, 2))
        mine = {b for chunk in plan for b in chunk.benchmarks}
        regexes = [r for chunk in plan for r in chunk.regexes]
        matched = {(name, combo) for name, combo in selected
                   if any(re.search(r, f"{name}({', '.join(combo)})") for r in regexes)}
        assert matched == mine and mine


def test_an_empty_benchmark_shard_runs_nothing_and_says_so(tmp_path):
    from mhabench.benchmarks import sweep
    options = sweep.make_options("quick", "torch_sdpa", "cpu", tmp_path, r"^bench_attention\.SelfAttention\."
                                 r"track_time_forward\('torch_sdpa', '\w+', 128, ", shard="2/2")
    said = []
    assert sweep.run(options, say=said.append) == 0
    assert "has none of the 1 selected benchmarks" in said[-1]
    plan = json.loads((tmp_path / "bench" / "plan.json").read_text())
    assert plan["shard"] == [2, 2] and plan["benchmarks"] == 0 and plan["benchmarks_all_shards"] == 1


@pytest.mark.parametrize("command", ["conform", "bench"])
@pytest.mark.parametrize("bad", ["", "  ", "a/b", "tab\there", "--shard=x"])
def test_bad_machine_or_shard_is_a_one_line_error_naming_the_option(command, bad, tmp_path):
    option, value = ("--shard", "x") if bad == "--shard=x" else ("--machine", bad)
    out = subprocess.run([sys.executable, "-m", "mhabench", command, option, value, "--results", str(tmp_path),
                          *(["--dry-run"] if command == "bench" else [])], capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mhabench {command}: error: {option}")
