"""The machine is part of the result: facts recorded with every run and row, kernel switches that reproduce
another machine's kernels, catalogue entries that hold under named facts, dtypes isolated from each other's
crashes, and the portability table."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mhabench import impls, results
from mhabench.conformance import catalogue, framework_models, portability, session
from mhabench.conformance.cases import find_case
from mhabench.conformance.evaluate import evaluate
from mhabench.conformance.runner import run_rows, switch_environment
from mhabench.impls import facts
from mhabench.schema import Row

PLANTED = Path(__file__).with_name("planted_adapters.py")
SPR_FLAGS = ("fpu sse4_2 avx avx2 fma f16c avx512f avx512dq avx512bw avx512vl avx512_vnni avx512_bf16 avx_vnni "
             "amx_tile amx_bf16 amx_int8 sha_ni")


def _installed(name):
    return impls.get_adapter(name).is_available()


# ---- the machine's facts ---------------------------------------------------------------------------

def test_machine_facts_normalise_the_isa_and_name_the_vector_width(monkeypatch):
    monkeypatch.setattr(facts, "_cpuinfo", lambda: {"model name": "Test Xeon", "flags": SPR_FLAGS})
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.setenv("TF_ENABLE_ONEDNN_OPTS", "0")
    found = facts.machine_facts(["TF_ENABLE_ONEDNN_OPTS"])
    assert found["cpu_model"] == "Test Xeon"
    assert found["isa"][:3] == ["sse4_2", "avx", "avx2"] and "amx_bf16" in found["isa"] and "sha_ni" not in found["isa"]
    assert found["vector_bits"] == 512
    assert found["environment"] == {"TF_ENABLE_ONEDNN_OPTS": "0", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    monkeypatch.setattr(facts, "_cpuinfo", lambda: {"flags": "sse4_2 avx avx2 fma"})
    assert facts.vector_bits(facts.isa_flags()) == 256


def test_a_run_records_the_machine_facts_and_every_row_its_kernel_facts(tmp_path):
    plan = session.make_plan("numpy_oracle", "float32", "masks", quick=True)
    outcome = session.run(plan, tmp_path)
    meta = results.read_results(tmp_path).meta
    assert meta["machine_facts"]["cpu_model"] and meta["machine_facts"]["isa"] == \
        sorted(facts.isa_flags(), key=facts.ISA_FLAGS.index)
    assert meta["switches"] == {}
    assert all(r.facts == {} for r in outcome.rows)  # the oracle's kernels are numpy's: a machine fact
    assert "facts" in results.FIELDS


def test_every_reported_kernel_fact_is_in_the_vocabulary():
    for name in ("torch_sdpa", "keras_mha", "tf_keras_mha", "jax_dpa", "ort_attention"):
        if not _installed(name):
            continue
        reported = impls.get_adapter(name).row_facts()
        assert "facts_error" not in reported, reported
        assert set(reported) <= set(facts.KERNEL_FACTS) | set(impls.get_adapter(name).kernel_environment()), name


def facts_switch(name):
    return {s.name: s for a in impls.list_adapters() for s in impls.get_adapter(a).switches()}[name]


def test_switch_settings_are_parsed_and_filtered_by_the_cpu():
    torch_cpu = facts_switch("torch_cpu")
    assert torch_cpu.runnable({"avx2", "fma"}) == ["default", "avx2"]
    assert torch_cpu.runnable(set(SPR_FLAGS.split())) == ["default", "avx2", "avx512"]
    assert facts.parse_setting("torch_cpu=avx2", [torch_cpu]) == (torch_cpu, "avx2")
    with pytest.raises(ValueError, match="unknown setting 'avx3'"):
        facts.parse_setting("torch_cpu=avx3", [torch_cpu])
    with pytest.raises(ValueError, match="NAME=SETTING with NAME one of torch_cpu"):
        facts.parse_setting("tf_onednn", [torch_cpu])
    with pytest.raises(session.SelectionError, match="one of"):
        session.make_plan("numpy_oracle", switches=["tf_onednn=off"])  # no selected adapter declares it


def test_a_switch_reaches_only_the_adapters_that_declare_it():
    assert switch_environment("torch_sdpa", {"torch_cpu": "avx2", "tf_onednn": "off"}) == {"ATEN_CPU_CAPABILITY": "avx2"}
    assert switch_environment("classic_keras", {"torch_cpu": "avx2", "tf_onednn": "off"}) == \
        {"TF_ENABLE_ONEDNN_OPTS": "0"}
    assert switch_environment("numpy_oracle", {"tf_onednn": "off"}) == {}


def test_onednn_isa_cap_is_warned_about():
    assert facts.isa_cap_warning({}) is None
    text = facts.isa_cap_warning({"ONEDNN_MAX_CPU_ISA": "AVX2"})
    assert "ONEDNN_MAX_CPU_ISA=AVX2" in text and "tf_onednn=off" in text and "crashes" in text


def test_conform_warns_when_onednn_isa_cap_is_set(tmp_path, monkeypatch, capsys):
    from mhabench.cli import main
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert main(["conform", "--adapters", "numpy_oracle", "--areas", "invalid", "--quick", "--results",
                 str(tmp_path)]) == 0
    assert "warning: ONEDNN_MAX_CPU_ISA=AVX2 is set" in capsys.readouterr().err


@pytest.mark.parametrize("argv, needle", [
    (["--switch", "tf_onednn=off"], "--switch 'tf_onednn=off': expected NAME=SETTING"),
    (["--switches"], "--switches: no selected adapter declares a kernel switch"),
    (["--switches", "--switch", "tf_onednn=off"], "--switches and --switch cannot be used together"),
])
def test_switch_options_are_checked_by_the_cli(tmp_path, capsys, argv, needle):
    from mhabench.cli import main
    assert main(["conform", "--adapters", "numpy_oracle", "--results", str(tmp_path), *argv]) == 2
    assert needle in capsys.readouterr().err


# ---- a crash in one dtype's kernel costs that dtype only ------------------------------------------

def test_a_crash_in_one_dtype_leaves_the_other_dtypes_of_the_case_alone():
    from mhabench.impls import plugins
    name = plugins.load_adhoc(f"{PLANTED}:Float16SegfaultingAdapter")
    rows = run_rows([name], [find_case("self_T8-heads2_kd4")], ["float32", "float16", "float64"],
                    adhoc=[f"{PLANTED}:Float16SegfaultingAdapter"], timeout=60)
    by_dtype = {d: {r.status.value for r in rows if r.dtype == d} for d in ("float32", "float16", "float64")}
    assert by_dtype == {"float32": {"pass"}, "float16": {"error"}, "float64": {"pass"}}, by_dtype
    crashed = next(r for r in rows if r.dtype == "float16")
    assert "worker died" in crashed.message and "signal 11" in crashed.message


# ---- catalogue entries that hold under named facts ---------------------------------------------------

ENTRY = '''
[[divergence]]
id = "planted-uniform-under-onednn"
adapters = ["numpy_oracle"]
cases = ["self_T8-mask_fully_masked_row"]
quantities = ["output"]
facts = { tf_onednn = true }
observed = "planted"
oracle_policy = "uniform"
'''


def _load(tmp_path, body):
    (tmp_path / "x.toml").write_text(body)
    return catalogue.load(tmp_path)


def test_an_entry_applies_only_under_the_facts_it_names(tmp_path):
    [entry] = _load(tmp_path, ENTRY)
    assert entry.applies({"tf_onednn": True}) and not entry.applies({"tf_onednn": False})
    assert not entry.applies(None) and not entry.applies({})
    assert entry.conditions == "tf_onednn = true" and "when tf_onednn = true" in entry.how
    [listed] = _load(tmp_path, ENTRY.replace("tf_onednn = true", "torch_vector_bits = [256, 512]"))
    assert listed.applies({"torch_vector_bits": 256}) and not listed.applies({"torch_vector_bits": 128})
    with pytest.raises(ValueError, match="unknown fact 'onednn'"):
        _load(tmp_path, ENTRY.replace("tf_onednn = true", "onednn = true"))
    with pytest.raises(ValueError, match="must be a table of kernel facts"):
        _load(tmp_path, ENTRY.replace("facts = { tf_onednn = true }", "facts = 1"))


def test_a_row_contradicts_an_entry_only_under_its_facts(tmp_path):
    entries = _load(tmp_path, ENTRY)
    case = find_case("self_T8-mask_fully_masked_row")
    rows = [r for r in evaluate("numpy_oracle", case, ["float32"], entries) if r.quantity == "output"]
    assert rows[0].status == "pass" and rows[0].contradicts is None  # the oracle's facts: {}
    [check] = catalogue.check(entries, rows, ["numpy_oracle"], full_matrix=True)
    assert check.status == "unchecked" and "applies when tf_onednn = true" in check.message
    under = [r.replace(facts={"tf_onednn": True}, contradicts="planted-uniform-under-onednn") for r in rows]
    [check] = catalogue.check(entries, under, ["numpy_oracle"], full_matrix=True)
    assert check.status == "stale"
    [check] = catalogue.check(entries, [r.replace(facts={"tf_onednn": True}) for r in rows], ["numpy_oracle"],
                              full_matrix=True)
    assert check.status == "stale" and "show it in no row" in check.message


def test_only_unknown_deciding_facts_keep_varies():
    for entry in catalogue.load():
        if entry.varies:
            assert "unknown" in entry.varies, f"{entry.id}: varies must say that the deciding fact is unknown"


# ---- the CPU flash kernel's row maximum, modelled with the vector width -----------------------------

PROBE = """
import json, sys, torch
torch.manual_seed(0)
out = {}
for dtype in ("float32", "float64"):
    rows = []
    for S in range(1, 21):
        dt = getattr(torch, dtype)
        q, k, v = torch.randn(1, 1, 2, 4, dtype=dt), torch.randn(1, 1, S, 4, dtype=dt), torch.randn(1, 1, S, 4, dtype=dt)
        q[0, 0, 1, 0] = float("nan")
        row = torch.nn.functional.scaled_dot_product_attention(q, k, v)[0, 0, 1]
        rows.append("zero" if bool((row == 0).all()) else "nan" if bool(row.isnan().all()) else "other")
    out[dtype] = rows
print(json.dumps({"capability": torch.backends.cpu.get_cpu_capability().lower(), "rows": out}))
"""


@pytest.mark.skipif(not _installed("torch_sdpa"), reason="torch not installed")
@pytest.mark.parametrize("capability", facts_switch("torch_cpu").runnable() if _installed("torch_sdpa") else [])
def test_the_flash_row_max_model_matches_torch_at_each_width_this_cpu_runs(capability):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    measured = json.loads(out.stdout)
    assert measured["capability"] == capability
    from mhabench.impls import _torch
    bits = _torch.VECTOR_BITS[capability]
    case = find_case("cross_T5_S3-nan_query")
    for dtype, rows in measured["rows"].items():
        lanes = bits // (64 if dtype == "float64" else 32)
        assert rows == ["zero"] * (lanes - 1) + ["nan"] * (20 - lanes + 1), (dtype, rows)
        model = framework_models.torch_cpu_flash_row_max(case.inputs(), "float64", {"torch_vector_bits": bits},
                                                         kernel_dtype=dtype)["output"]
        nan_row = np.isnan(case.inputs().query).any(axis=-1)
        assert np.all(np.isfinite(model[nan_row])) == (3 < lanes)  # S = 3: a zero-weight row, the output bias


# ---- the portability table -------------------------------------------------------------------------

def _row(case, status, divergence=None, **facts_):
    return Row(adapter="a", case=case, area="special", dtype="float32", quantity="output", status=status,
               divergence=divergence, facts=facts_)


def test_the_portability_table_lists_changed_verdicts_with_the_facts_that_differ():
    setting = portability.Setting(facts_switch("tf_onednn"), "off", ["a"])
    own = [_row("c1", "divergence", "d", tf_onednn=True), _row("c2", "pass", tf_onednn=True)]
    switched = [_row("c1", "pass", tf_onednn=False), _row("c2", "pass", tf_onednn=False)]
    [change] = portability.changes(own, switched, setting)
    assert change["row_id"] == "a-c1-float32-output" and change["own_choice"] == "divergence (d)"
    assert change["switched"] == "pass"
    assert change["facts"] == "tf_onednn: True -> False"


# ---- the report ------------------------------------------------------------------------------------

FIXTURES = Path(__file__).resolve().parent / "fixtures"


def _results_dir(root, rows, machine_facts=None, portability_table=None):
    results.write_results(root, rows, {**results.meta({}, machine="m"), "machine_facts": machine_facts or {}})
    if portability_table is not None:
        results.write_json(results.Layout(root).portability, portability_table)
    return root


def _full_row(case, status, facts_, divergence=None, message=""):
    return Row(adapter="classic_keras", case=case, area="special", dtype="float32", quantity="grad_value",
               status=status, divergence=divergence, message=message, facts=facts_)


def reports_collect(path, **kwargs):
    from mhabench import reports
    return reports.collect(path, **kwargs)


def test_the_verdict_box_leads_with_the_red_lines_naming_the_first():
    pytest.importorskip("matplotlib")
    from mhabench.reports.html import esc, render_html
    from mhabench.reports.markdown import render_markdown
    data = reports_collect(FIXTURES / "mixed")
    page = render_html(data)
    box = page.split("<div class='verdict red'>", 1)[1].split("</div>", 1)[0]
    first_error = data.tables["failures"].iloc[0]
    assert first_error["status"] == "error"
    assert box.index("class='alarm'") < box.index("<li>")  # the red lines come first
    assert "error row" in box and esc(first_error["row_id"]) in box
    assert "**RED: " in render_markdown(data)


def test_a_green_run_says_so_in_green(tmp_path):
    pytest.importorskip("matplotlib")
    from mhabench.reports.html import render_html
    root = _results_dir(tmp_path, [_full_row("r1", "pass", {"tf_onednn": True})])
    page = render_html(reports_collect(root))
    assert "<div class='verdict'>" in page and "no fail or error rows, no stale catalogue entries" in page


def test_two_machines_that_disagree_are_told_apart_by_the_fact_that_differs(tmp_path):
    pytest.importorskip("matplotlib")
    isa = ["avx", "avx2", "fma"]
    spr = _results_dir(tmp_path / "spr", [_full_row("r1", "divergence", {"tf_onednn": True}, "d")],
                       {"cpu_model": "Xeon", "isa": isa + ["avx512f", "amx_bf16"], "vector_bits": 512})
    old = _results_dir(tmp_path / "old", [_full_row("r1", "pass", {"tf_onednn": False})],
                       {"cpu_model": "Core", "isa": isa, "vector_bits": 256})
    data = reports_collect([spr, old], machines=["spr", "old"])
    [line] = data.tables["cross_machine"].to_dict("records")
    assert line["differs"].startswith("tf_onednn: spr / cpu true, old / cpu false")
    assert "isa: old / cpu lacks amx_bf16 avx512f" in line["differs"] and "vector_bits: spr / cpu 512" in line["differs"]
    facts_table = data.tables["machine_facts"]
    assert set(facts_table["machine"]) == {"spr", "old"} and "amx_bf16" in " ".join(facts_table["isa"])
    assert set(data.tables["kernel_facts"]["facts"]) == {"tf_onednn=true", "tf_onednn=false"}


def test_the_portability_table_reaches_the_page_and_a_red_setting_the_verdict(tmp_path):
    pytest.importorskip("matplotlib")
    from mhabench.reports.html import render_html
    table = {"own_choice": {"rows": 1, "fail": 0, "stale": [], "facts": {}},
             "settings": [{"switch": "tf_onednn", "setting": "off", "variable": "TF_ENABLE_ONEDNN_OPTS", "value": "0",
                           "adapters": ["classic_keras"], "rows": 1, "changed": 1, "fail": 1, "error": 0,
                           "stale": ["some-entry"], "results": "switches/tf_onednn-off", "warnings": []}],
             "changes": [{"switch": "tf_onednn", "setting": "off", "adapter": "classic_keras", "row_id": "r1",
                          "area": "special", "dtype": "float32", "quantity": "grad_value",
                          "own_choice": "divergence (d)", "switched": "fail", "facts": "tf_onednn: True -> False"}]}
    root = _results_dir(tmp_path, [_full_row("r1", "divergence", {"tf_onednn": True}, "d")],
                        portability_table=table)
    data = reports_collect(root)
    page = render_html(data)
    assert "id='portability'" in page and "tf_onednn: True -&gt; False" in page
    assert "under tf_onednn=off: 1 fail, 0 error rows, 1 stale entries, first some-entry" in page


@pytest.mark.skipif(not _installed("torch_sdpa"), reason="torch not installed")
def test_a_rerun_in_a_switched_results_directory_runs_under_the_same_switch(tmp_path):
    plan = session.make_plan("torch_sdpa", "float32", "dtypes", quick=True, switches=["torch_cpu=default"])
    first = session.run(plan, tmp_path)
    assert {r.facts["torch_cpu_capability"] for r in first.rows} == {"default"}
    row_id = first.rows[0].row_id
    again = session.run(session.make_plan("torch_sdpa", "float32", "dtypes", quick=True), tmp_path, rerun=row_id)
    assert next(r for r in again.rows if r.row_id == row_id).facts["ATEN_CPU_CAPABILITY"] == "default"
    with pytest.raises(session.SelectionError, match="would mix two machines' kernels"):
        session.run(session.make_plan("torch_sdpa", "float32", "dtypes", quick=True, switches=["torch_cpu=avx2"]),
                    tmp_path, resume=True)


def test_the_tests_of_one_switch_setting_share_one_xdist_worker():
    from mhabench.conformance.pytest_view import switch_setting_of
    node = "conformance/test_switches.py::test_conformance_under_another_machines_kernels[tf_onednn=off-keras_mha@torch]"
    assert switch_setting_of(node) == "tf_onednn=off"
    assert switch_setting_of("conformance/test_special.py::test_conformance[keras_mha-self_T8-nan_query-float32]") is None
