"""Plugin adapters: entry points, ad-hoc module:Class, and broken plugins reported and skipped."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import numpy as np
import pytest

from mhabench import impls
from mhabench.impls import plugins, registry
from mhabench.impls.registry import BrokenAdapter

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PACKAGE = EXAMPLES / "mhabench_plugin_example"


def _fake_install(site: Path, dist: str, entry_points: dict[str, str]) -> None:
    """What `pip install` leaves for importlib.metadata: a .dist-info with METADATA and entry_points.txt."""
    info = site / f"{dist.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1.0\n")
    lines = [f"{name} = {value}" for name, value in entry_points.items()]
    (info / "entry_points.txt").write_text("[mhabench.adapters]\n" + "\n".join(lines) + "\n")


BROKEN_MODULE = textwrap.dedent('''
    import numpy as np
    from mhabench import impls
    from mhabench.impls.numpy_oracle import NumpyOracleAdapter, NumpyOracleLayer

    class NotAnAdapter:
        name = "not_an_adapter"

    class Nameless(NumpyOracleAdapter):
        name = ""

    class BuildRaisesLayer(NumpyOracleLayer):
        def __init__(self, *args, **kwargs):
            raise RuntimeError("cannot build today")

    class BuildRaises(NumpyOracleAdapter):
        name = "build_raises"
        layer_class = BuildRaisesLayer

    class WrongShapeLayer(NumpyOracleLayer):
        def _forward(self, call, return_scores, training, seed):
            out, scores = super()._forward(call, return_scores, training, seed)
            return out[..., :1], scores

    class WrongShape(NumpyOracleAdapter):
        name = "wrong_shape"
        layer_class = WrongShapeLayer

    def not_a_factory():
        return 42
''')


@pytest.fixture
def plugin_env(tmp_path, monkeypatch):
    """The example package 'installed' plus a broken plugin distribution, on sys.path; registry restored after."""
    site = tmp_path / "site"
    site.mkdir()
    declared = tomllib.loads((PACKAGE / "pyproject.toml").read_text())["project"]["entry-points"]["mhabench.adapters"]
    _fake_install(site, "mhabench-plugin-example", declared)
    _fake_install(site, "broken-plugins", {"missing_module": "no_such_module_xyz:Adapter",
                                           "returns_int": "broken_plugins_mod:not_a_factory",
                                           "nameless_ep": "broken_plugins_mod:Nameless"})
    (site / "broken_plugins_mod.py").write_text(BROKEN_MODULE)
    for path in (str(site), str(PACKAGE / "src"), str(EXAMPLES)):
        monkeypatch.syspath_prepend(path)
    saved = (dict(registry._registered), dict(registry._instances), registry._discovered)
    registry._discovered = False
    yield site
    registry._registered.clear(), registry._registered.update(saved[0])
    registry._instances.clear(), registry._instances.update(saved[1])
    registry._discovered = saved[2]


def _quick_cases():
    from mhabench.conformance.cases import default_cases
    wanted = {"self_T8-heads2_kd4", "cross_T8_S4-key_distinct", "self_T8-mask_fully_masked_row", "rank5-axes_2_3"}
    return [c for c in default_cases() if c.id in wanted]


def _forward_rows(rows):
    """The forward rows; a plugin with no backward pass has its gradient rows unsupported with that reason."""
    grads = [r for r in rows if r["quantity"].startswith("grad_")]
    assert grads and all(r["status"] == "unsupported" and "no backward pass" in r["message"] for r in grads)
    return [r for r in rows if not r["quantity"].startswith("grad_")]


def test_entry_point_plugin_is_listed_lazily_and_runs(plugin_env):
    names = impls.list_adapters()
    assert "example_loop" in names
    assert "mhabench_plugin_example" not in sys.modules  # listed without importing the plugin
    adapter = impls.get_adapter("example_loop")
    assert adapter.name == "example_loop" and adapter.is_available()
    from mhabench.conformance.runner import run_rows
    rows = run_rows(["example_loop"], _quick_cases(), ["float64", "float32"], isolate=False, entries=[])
    by_case = {}
    for r in _forward_rows([r for r in rows if r["case"] != "rank5-axes_2_3"]):
        by_case.setdefault(r["case"], set()).add(r["status"])
    assert by_case["self_T8-heads2_kd4"] == {"pass"}
    assert by_case["cross_T8_S4-key_distinct"] == {"pass"}
    assert by_case["self_T8-mask_fully_masked_row"] == {"pass"}
    assert {r["status"] for r in rows if r["case"] == "rank5-axes_2_3"} == {"unsupported"}  # one attended axis


def test_broken_entry_points_are_reported_not_fatal(plugin_env):
    names = impls.list_adapters()
    for name, needle in (("missing_module", "ModuleNotFoundError"), ("returns_int", "42"),
                         ("nameless_ep", None)):
        assert name in names
        adapter = impls.get_adapter(name)
        if needle is None:  # an empty name is filled from the entry point, and then it works
            assert adapter.name == "nameless_ep" and adapter.is_available()
            continue
        assert isinstance(adapter, BrokenAdapter)
        ok, why = adapter.availability()
        assert not ok and needle in why and name in why
    assert impls.get_adapter("torch_sdpa").name == "torch_sdpa"  # the rest of the registry is untouched


def test_adhoc_module_and_file_path(plugin_env, monkeypatch):
    assert plugins.load_adhoc("my_attention:MyAttention") == "my_attention"
    assert plugins.load_adhoc("my_attention:MyAttention") == "my_attention"  # idempotent
    assert "my_attention" in impls.list_adapters()
    spec = impls.AttentionSpec(num_heads=2, key_dim=3, output_shape=(2, 5))
    w = impls.Weights.random(spec, 6, 4, 5, seed=3)
    rng = np.random.default_rng(0)
    q, v, k = rng.standard_normal((2, 4, 6)), rng.standard_normal((2, 3, 4)), rng.standard_normal((2, 3, 5))
    mask = rng.random((2, 4, 3)) > 0.5
    out, scores = impls.get_adapter("my_attention").build(spec, w, dtype="float64")(q, v, k, mask, causal=True,
                                                                                    return_scores=True)
    golden, golden_scores = impls.oracle.forward(spec, w, q, v, k, mask, causal=True)
    np.testing.assert_allclose(out, golden, atol=1e-12)
    np.testing.assert_allclose(scores, golden_scores, atol=1e-12)
    # by path, from anywhere: registers under the class's name
    monkeypatch.chdir(plugin_env)
    registry._registered.pop("my_attention"), registry._instances.pop("my_attention", None)
    assert plugins.load_adhoc(str(EXAMPLES / "my_attention.py") + ":MyAttention") == "my_attention"


OLD_API_MODULE = textwrap.dedent('''
    from mhabench.impls.numpy_oracle import NumpyOracleAdapter

    class OldStyle(NumpyOracleAdapter):
        """Written when unsupported_reason returned a string: it overrides it, compares super()'s answer with
        None, formats it into its own text and returns plain strings; extra_constraints returns one too."""
        name = "old_style"

        def unsupported_reason(self, spec, weights, **kwargs):
            reason = super().unsupported_reason(spec, weights, **kwargs)
            if reason is None and spec.num_heads == 3:
                return "three heads are not supported here"
            return None if reason is None else f"old_style refuses: {reason}"

        def extra_constraints(self, spec, dims, call):
            return "no causal here" if call is not None and call.causal else None
''')


def test_an_adapter_written_when_refusals_were_strings_still_runs(plugin_env):
    (plugin_env / "old_api_mod.py").write_text(OLD_API_MODULE)
    assert plugins.load_adhoc("old_api_mod:OldStyle") == "old_style"
    from mhabench.conformance.cases import find_case
    from mhabench.conformance.runner import run_rows
    wanted = ["self_T8-heads2_kd4", "self_T8-heads3_kd5", "self_T8-causal", "invalid_value_batch_differs"]
    rows = run_rows(["old_style"], [find_case(c) for c in wanted], ["float32"], isolate=False, entries=[])
    status = {(r.case, r.quantity): (r.status, r.message) for r in rows}
    assert {s for (case, _), (s, _) in status.items() if case == "self_T8-heads2_kd4"} == {"pass"}
    assert status[("self_T8-heads3_kd5", "output")] == ("unsupported", "three heads are not supported here")
    assert status[("self_T8-causal", "output")] == ("unsupported", "old_style refuses: no causal here")
    assert status[("invalid_value_batch_differs", "raises")][0] == "pass"  # a constraint: the bad input is judged
    adapter = impls.get_adapter("old_style")
    spec = impls.AttentionSpec(num_heads=2, key_dim=4, dropout=0.1)
    refused = adapter.unsupported_reason(spec, (8, 8, 8), training=True)
    assert refused.startswith("old_style refuses: dropout while training: ")


@pytest.mark.parametrize("target, needle", [
    ("broken_plugins_mod:NotAnAdapter", "expected an mhabench.impls.Adapter"),
    ("broken_plugins_mod:Nameless", "has no name"),
    ("broken_plugins_mod:BuildRaises", "build raised RuntimeError: cannot build today"),
    ("broken_plugins_mod:WrongShape", "returned shape"),
    ("no_such_module_abc:Thing", "ModuleNotFoundError"),
    ("broken_plugins_mod:Missing", "AttributeError"),
    ("does/not/exist.py:Thing", "no such file"),
])
def test_an_adhoc_plugin_that_cannot_load_raises_its_reason_and_registers_nothing(plugin_env, target, needle):
    before = impls.list_adapters()
    with pytest.raises(plugins.PluginLoadError, match="could not load") as err:
        plugins.load_adhoc(target)
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert impls.list_adapters() == before


@pytest.mark.parametrize("target", ["no_colon", ":Class", "module:", 42])
def test_malformed_adhoc_target_is_a_user_error(target):
    with pytest.raises((ValueError, TypeError), match="module:Class"):
        plugins.load_adhoc(target)


def test_broken_plugins_are_skipped_and_the_run_goes_on(plugin_env):
    from broken_plugins_mod import BuildRaises
    from mhabench.conformance.runner import run_rows
    impls.register_adapter("build_raises", BuildRaises)  # registered directly, past the interface check
    names = ["missing_module", "build_raises", "example_loop"]
    rows = run_rows(names, _quick_cases()[:1], ["float64"], isolate=False, entries=[])
    status = {r["adapter"]: r["status"] for r in rows if not r["quantity"].startswith("grad_")}
    assert status == {"missing_module": "unsupported", "build_raises": "error", "example_loop": "pass"}
    messages = {r["adapter"]: r["message"] for r in rows}
    assert "ModuleNotFoundError" in messages["missing_module"] and "cannot build today" in messages["build_raises"]


def test_cli_adapters_lists_entry_point_and_adhoc_plugins(plugin_env, monkeypatch, capsys):
    from mhabench.cli import build_parser
    from mhabench.commands import adapters
    monkeypatch.chdir(EXAMPLES)
    shown = ("example_loop", "my_attention", "missing_module")
    real = impls.list_adapters
    monkeypatch.setattr(impls, "list_adapters", lambda: [n for n in real() if n in shown])
    args = build_parser().parse_args(["adapters", "--json", "--adapter", "my_attention:MyAttention"])
    assert adapters.main(args) == 0
    described = {d["adapter"]: d for d in json.loads(capsys.readouterr().out)}
    assert set(described) == set(shown)
    assert described["example_loop"]["available"] and described["my_attention"]["available"]
    assert not described["missing_module"]["available"] and "ModuleNotFoundError" in described["missing_module"]["reason"]


def test_cli_refuses_a_named_plugin_that_cannot_load(plugin_env, monkeypatch, capsys):
    from mhabench.cli import main
    monkeypatch.chdir(EXAMPLES)
    for command in (["adapters"], ["conform", "--adapters", "numpy_oracle"], ["bench", "--dry-run"]):
        assert main([*command, "--adapter", "broken_plugins_mod:NotAnAdapter"]) == 2
        err = capsys.readouterr().err.strip()
        assert "expected an mhabench.impls.Adapter" in err and "\n" not in err


def test_conform_rows_include_plugins_in_worker_processes(plugin_env, monkeypatch):
    """The isolated path `mhabench conform` takes: each child rediscovers entry points and replays --adapter."""
    from mhabench.conformance.runner import run_rows
    monkeypatch.chdir(EXAMPLES)
    assert plugins.load_adhoc("my_attention:MyAttention") == "my_attention"  # the parent loads it too, as the CLI
    rows = run_rows(["example_loop", "my_attention"], _quick_cases()[:2], ["float32"], isolate=True,
                    adhoc=["my_attention:MyAttention"], timeout=60)
    forward = _forward_rows(rows)
    assert {(r["adapter"], r["status"]) for r in forward} == {("example_loop", "pass"), ("my_attention", "pass")}
    assert len(forward) == 2 * 2 * 3  # adapters x cases x (output, output with scores, scores)
