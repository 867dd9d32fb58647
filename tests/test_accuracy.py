"""The accuracy axis: the figures, the same-precision reference, the asv methods that track them, the profiles
that select them, and the page and summary that show them."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from mhabench import impls, results
from mhabench.benchmarks import accuracy, bench_attention, common, sweep
from mhabench.benchmarks.profiles import ACCURACY_CLASSES, Profile, accuracy_methods, get_profile
from mhabench.benchmarks.sampling import Sampling
from mhabench.reports import charts, tables
from mhabench.reports.collect import collect
from mhabench.reports.compare import classify
from mhabench.reports.html import render_html
from mhabench.reports.markdown import render_markdown



def _planted():
    import importlib.util
    from pathlib import Path
    spec = importlib.util.spec_from_file_location("planted_adapters", Path(__file__).with_name("planted_adapters.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SequentialHalfAdapter = _planted().SequentialHalfAdapter

TINY = Profile("tiny", seq_lens=(16,), num_heads=(2,), model_dim=16, accuracy_heads=2,
               sampling=Sampling(max_samples=8, max_seconds=0.05, warmup_seconds=0.0, memory_samples=3))


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv(common.ENV_RESULTS, str(tmp_path / "results"))
    monkeypatch.setenv("MHABENCH_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv(common.ENV_SWEEP, raising=False)
    monkeypatch.setattr(bench_attention, "PROFILE", TINY)
    common._ACCURACY.clear()
    yield
    common._ACCURACY.clear()


def measured(adapter, problem, dtypes=accuracy.DTYPES):
    build = lambda d: adapter.build(problem.spec, problem.weights(), dtype=d, device="cpu", mode="eager")
    return {r["dtype"]: r for r in accuracy.measure(build, problem, dtypes)}


def test_the_three_figures():
    golden = np.array([[1.0, -2.0], [0.5, 4.0]])
    actual = golden + np.array([[0.0, 0.0], [0.0, 0.4]])
    weight = np.array([[1.0, 1.0], [1.0, -1.0]])
    got = accuracy.errors(actual, golden, weight)
    assert got["max_rel_error"] == pytest.approx(0.4 / 4.0)
    assert got["rms_error"] == pytest.approx(math.sqrt(0.4 ** 2 / 4))
    assert got["sum_error"] == pytest.approx(0.4 / 7.5)  # |Σw·y − Σw·g| / Σ|w·g|
    assert all(math.isnan(v) for v in accuracy.errors(actual * np.nan, golden, weight).values())
    with pytest.raises(ValueError, match="shape"):
        accuracy.errors(actual[:1], golden, weight)


@pytest.mark.parametrize("field, value, message", [
    ("kind", "cross", "kind must be one of self, causal"), ("inputs", "uniform", "inputs must be one of"),
    ("seq_len", 0, "seq_len must be a positive int"), ("num_heads", 2.0, "num_heads must be a positive int")])
def test_a_bad_problem_names_the_argument(field, value, message):
    with pytest.raises(ValueError, match=message):
        accuracy.Problem(**{"kind": "self", "inputs": "normal", "seq_len": 8, field: value})


def test_the_inputs_are_self_attentions_and_peaky_makes_the_softmax_peaky():
    """One input is query, key and value; peaky scales it so the logits' spread is PEAKY_LOGIT_SCALE times."""
    spreads = {}
    for inputs in accuracy.INPUTS:
        problem = accuracy.Problem("self", inputs, 64)
        query, value, _ = problem.draw()
        assert query is value
        w = problem.weights()
        q, k = np.einsum("bte,ehk->bhtk", query, w.Wq), np.einsum("bte,ehk->bhtk", value, w.Wk)
        spreads[inputs] = np.std(np.einsum("bhtk,bhsk->bhts", q, k) / math.sqrt(q.shape[-1]))
    assert spreads["normal"] == pytest.approx(1.0, rel=0.3)
    assert spreads["peaky"] / spreads["normal"] == pytest.approx(accuracy.PEAKY_LOGIT_SCALE, rel=1e-6)


def test_the_oracle_is_its_own_reference_in_every_dtype():
    got = measured(impls.get_adapter("numpy_oracle"), accuracy.Problem("causal", "peaky", 32, num_heads=2,
                                                                       model_dim=16))
    for dtype, record in got.items():
        assert record["status"] == "ok"
        assert record["ratio"] == {m: 1.0 for m in accuracy.METRICS}, dtype
    assert got["float32"]["rms_error"] < got["float16"]["rms_error"] < got["bfloat16"]["rms_error"]


def test_a_float16_accumulation_worse_than_the_reference_shows_a_ratio_above_one_growing_with_L():
    """The planted adapter sums the weighted values key by key in float16: its error over the reference's must be
    above 1 and grow with L; its float32 is the oracle's, so its ratio there stays 1."""
    adapter = SequentialHalfAdapter()
    lengths = (128, 384, 1024)
    ratios, float32 = [], []
    for length in lengths:
        got = measured(adapter, accuracy.Problem("self", "normal", length, num_heads=2, model_dim=32),
                       ("float32", "float16"))
        ratios.append(got["float16"]["ratio"]["rms_error"])
        float32.append(got["float32"]["ratio"]["rms_error"])
    assert all(r > 1 for r in ratios), ratios
    assert ratios[0] < ratios[1] < ratios[2], ratios
    assert tables.plausibility.power_fit(lengths, ratios).exponent > 0.2
    assert float32 == [1.0] * len(lengths)


def test_the_golden_and_the_references_are_read_from_the_cache_by_the_next_process(monkeypatch):
    problem = accuracy.Problem("self", "normal", 16, num_heads=2, model_dim=16)
    first = accuracy.golden(problem)
    monkeypatch.setattr(accuracy.Problem, "oracle", lambda *a, **k: pytest.fail("computed again"))
    again = accuracy.golden(problem)
    np.testing.assert_array_equal(first.output, again.output)
    assert again.reference == json.loads(json.dumps(first.reference))


def test_a_dtype_the_adapter_refuses_or_fails_is_recorded_and_the_others_go_on():
    problem = accuracy.Problem("self", "normal", 16, num_heads=2, model_dim=16)
    oracle = impls.get_adapter("numpy_oracle")

    def build(dtype):
        if dtype == "bfloat16":
            return "no bfloat16 here"
        if dtype == "float16":
            raise RuntimeError("kernel crashed")
        return oracle.build(problem.spec, problem.weights(), dtype=dtype, device="cpu", mode="eager")
    got = {r["dtype"]: r for r in accuracy.measure(build, problem)}
    assert got["float32"]["status"] == "ok"
    assert got["float16"] == {**got["float16"], "status": "failed", "reason": "RuntimeError: kernel crashed"}
    assert got["bfloat16"]["status"] == "skipped" and got["bfloat16"]["reason"] == "no bfloat16 here"


def run_method(bench, method, params):
    bench.setup(*params)
    func = getattr(bench, method)
    func.setup(*params)
    return func(*params)


@pytest.mark.parametrize("adapter", ["numpy_oracle", "torch_sdpa"])
def test_every_accuracy_method_tracks_its_figure_from_one_measurement(adapter, tmp_path, monkeypatch):
    if not impls.get_adapter(adapter).is_available():
        pytest.skip(impls.get_adapter(adapter).availability()[1])
    monkeypatch.setenv(common.ENV_SWEEP, "sweep-1")
    params = (adapter, "eager", 16, 2, "cpu")
    methods = [m for m in dir(bench_attention.CausalAccuracy) if m.startswith("track_")]
    assert sorted(methods) == sorted(accuracy_methods())
    values = {}
    for number, method in enumerate(methods):
        if number == 1:  # the next processes read what the first one recorded
            monkeypatch.setattr(accuracy, "measure", lambda *a, **k: pytest.fail("measured twice"))
        common._ACCURACY.clear()  # asv runs each method in a process of its own
        values[method] = run_method(bench_attention.CausalAccuracy(), method, params)
    assert all(math.isfinite(v) and v > 0 for v in values.values()), values
    records = [json.loads(line) for line in (tmp_path / "results" / "bench" / "accuracy.jsonl").read_text().splitlines()]
    assert len(records) == len(accuracy.DTYPES)
    for record in records:
        assert record["benchmark"] == "bench_attention.CausalAccuracy" and record["sweep"] == "sweep-1"
        assert record["kind"] == "causal" and record["inputs"] == "normal"
        assert values[f"track_rms_error_{record['dtype']}"] == pytest.approx(record["rms_error"])
    if adapter == "numpy_oracle":
        assert all(r["ratio"]["rms_error"] == 1.0 for r in records)


def test_an_accuracy_method_of_a_dtype_the_adapter_refuses_is_skipped_with_its_reason(tmp_path, monkeypatch):
    oracle = type(impls.get_adapter("numpy_oracle"))
    refuse = lambda self, spec, dims, dtype="float32", **kw: "no bfloat16 kernel" if dtype == "bfloat16" else None
    monkeypatch.setattr(oracle, "unsupported_reason", refuse)
    params = ("numpy_oracle", "eager", 16, 2, "cpu")
    assert run_method(bench_attention.SelfAccuracy(), "track_rms_error_float16", params) > 0
    with pytest.raises(NotImplementedError, match="no bfloat16 kernel"):
        run_method(bench_attention.SelfAccuracy(), "track_rms_error_bfloat16", params)
    logged = [json.loads(line) for line in (tmp_path / "results" / "bench" / "skips.jsonl").read_text().splitlines()]
    assert {r["benchmark"] for r in logged} == {f"bench_attention.SelfAccuracy.track_{m}_bfloat16"
                                                for m in accuracy.METRICS}
    assert {r["reason"] for r in logged} == {"no bfloat16 kernel"}


def test_accuracy_runs_at_the_profiles_accuracy_head_count_only(tmp_path):
    with pytest.raises(NotImplementedError, match="at 2 heads and L in"):
        bench_attention.SelfAccuracy().setup("numpy_oracle", "eager", 16, 4, "cpu")
    chosen = sweep.selection("default", ["numpy_oracle"], ["cpu"], None)
    accuracy_rows = [c for n, c in chosen if results.is_accuracy(n.split(".")[1])]
    assert {n.split(".")[1] for n, _ in chosen if results.is_accuracy(n.split(".")[1])} == set(ACCURACY_CLASSES)
    assert {c[3] for c in accuracy_rows} == {str(get_profile("default").accuracy_heads)}
    assert len(accuracy_rows) == len(ACCURACY_CLASSES) * len(accuracy_methods()) * len(get_profile("default").seq_lens)
    # the main job's: self and causal self-attention on normal inputs, one method per dtype, the 4 shortest L
    quick = [(n, c) for n, c in sweep.selection("quick", ["numpy_oracle"], ["cpu"], None) if "Accuracy" in n]
    assert {n for n, _ in quick} == {f"bench_attention.{c}.track_rms_error_{d}" for c in ("SelfAccuracy",
                                                                                         "CausalAccuracy")
                                     for d in accuracy.DTYPES}
    assert sorted({int(c[2]) for _, c in quick}) == [128, 256, 512, 1024]
    # the budget's static prior: the case's one measurement shared among its methods, more for a compiled mode
    one = sweep.estimated_ms("quick", "bench_attention.SelfAccuracy.track_rms_error_float16",
                             ("'jax_dpa'", "'eager'", "1024", "8", "'cpu'"))
    compiled = sweep.estimated_ms("quick", "bench_attention.SelfAccuracy.track_rms_error_float16",
                                  ("'jax_dpa'", "'compiled'", "1024", "8", "'cpu'"))
    assert 0 < one < compiled < 10_000


# ---- the page -------------------------------------------------------------------------------------------
def planted_results(root):
    """Records as a sweep writes them: an adapter as good as the reference, and one whose float16 error grows as
    L (the reference's stays flat)."""
    lines = []
    for L in (128, 256, 512, 1024):
        for adapter, growth in (("good", 0.0), ("planted", 1.0)):
            for dtype, base in (("float32", 1e-6), ("float16", 1e-3)):
                error = base * (L / 128) ** (growth if dtype == "float16" else 0.0)
                lines.append({"benchmark": "bench_attention.SelfAccuracy",
                              "params": {"adapter": adapter, "mode": "eager", "seq_len": L, "num_heads": 8,
                                         "device": "cpu"}, "sweep": "s", "kernel": "math", "family": "numpy",
                              "dtype": dtype, "inputs": "normal", "kind": "self", "seq_len": L, "status": "ok",
                              "max_rel_error": 2 * error, "rms_error": error, "sum_error": error / 10,
                              "reference": {"max_rel_error": 2 * base, "rms_error": base, "sum_error": base / 10},
                              "ratio": {"max_rel_error": error / base, "rms_error": error / base, "sum_error": error / base},
                              "time": 1.0})
    lines.append({**lines[0], "params": {**lines[0]["params"], "adapter": "refuser"}, "dtype": "bfloat16",
                  "status": "skipped", "reason": "no bfloat16 kernel"})
    import shutil
    shutil.copytree(Path(__file__).resolve().parent / "fixtures" / "sample" / "asv", root / "asv")
    path = results.Layout(root).accuracy
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(line) + "\n" for line in lines) + "not json\n")
    return root


def test_the_page_ranks_kernels_by_error_and_names_the_one_growing_faster_than_the_reference(tmp_path):
    data = collect(planted_results(tmp_path / "run"))
    lines = data.tables["accuracy_lines"].set_index(["adapter", "dtype"])
    assert lines.loc[("planted", "float16"), "exponent"] == pytest.approx(1.0)
    assert lines.loc[("planted", "float16"), "reference_exponent"] == pytest.approx(0.0, abs=1e-9)
    assert lines.loc[("planted", "float16"), "ratio_rms_error"] == pytest.approx(8.0)
    assert lines.loc[("planted", "float16"), "grows_faster"] == "yes"
    assert lines.loc[("good", "float16"), "grows_faster"] == ""
    assert lines.loc[("good", "float16"), "rank"] == 1 and lines.loc[("planted", "float16"), "rank"] == 2
    unread = [p.split("accuracy.jsonl:")[1] for p in data.problems if "accuracy.jsonl:" in p]
    assert len(unread) == 1 and unread[0].startswith("18: corrupt line")  # named, and the rest is read
    skips = data.tables["accuracy_skips"]
    assert skips[["adapter", "dtype", "reason"]].values.tolist() == [["refuser", "bfloat16", "no bfloat16 kernel"]]
    page = render_html(data)
    assert "id='accuracy'" in page and "<a href=#accuracy>" in page
    assert page.count("data:image/png;base64,") >= 2  # the error and its ratio to the reference
    summary = render_markdown(data)
    part = summary[summary.index("## Accuracy"):]
    assert part.index("| planted float16 |") < part.index("| good float16 |")  # the worst ratio first


def test_the_chart_draws_the_reference_under_the_lines(tmp_path):
    data = collect(planted_results(tmp_path / "run"))
    assert charts.accuracy_chart(data.accuracy, "SelfAccuracy", "cpu").startswith("data:image/png;base64,")
    assert charts.accuracy_chart(data.accuracy, "CausalAccuracy", "cpu") is None


def test_a_jump_in_error_between_two_nights_is_flagged_as_a_regression():
    night = {"method": "track_rms_error_float16", "value": 1.0e-3}
    assert classify(night, {**night, "value": 1.02e-3}, 1.1)[0] == "unchanged"
    assert classify(night, {**night, "value": 3.0e-3}, 1.1)[0] == "regression"
    assert classify(night, {**night, "value": 0.3e-3}, 1.1)[0] == "improvement"


def test_the_gradients_figure_is_measured_where_there_is_a_backward_and_said_why_where_not(monkeypatch):
    problem = accuracy.Problem("causal", "normal", 16, num_heads=2, model_dim=16)
    oracle = impls.get_adapter("numpy_oracle")
    build = lambda d: oracle.build(problem.spec, problem.weights(), dtype=d, device="cpu", mode="eager")
    got = {r["dtype"]: r for r in accuracy.measure(build, problem, gradients=True)}
    for record in got.values():  # the oracle's backward is its own reference
        assert record["gradient_status"] == "ok" and record["ratio"][accuracy.GRADIENT] == 1.0
    assert 0 < got["float32"][accuracy.GRADIENT] < got["float16"][accuracy.GRADIENT]

    class NoBackward:
        def __init__(self, layer):
            self.layer = layer

        def __call__(self, *args, **kwargs):
            return self.layer(*args, **kwargs)

        def gradients(self, *args, **kwargs):
            raise NotImplementedError("no backward path")
    got = {r["dtype"]: r for r in accuracy.measure(lambda d: NoBackward(build(d)), problem, gradients=True)}
    assert got["float16"]["status"] == "ok" and got["float16"]["ratio"]["rms_error"] == 1.0
    assert got["float16"]["gradient_status"] == "skipped" and "no backward path" in got["float16"]["gradient_reason"]
    assert accuracy.GRADIENT not in got["float16"] and accuracy.GRADIENT not in got["float16"]["ratio"]
    monkeypatch.setattr(accuracy, "GRADIENT_MAX_LEN", 8)
    got = accuracy.measure(build, problem, ("float32",), gradients=True)[0]
    assert got["gradient_status"] == "skipped" and "up to L = 8" in got["gradient_reason"]


def test_the_main_jobs_profile_measures_its_accuracy_points(monkeypatch):
    """The quick profile keeps one method per dtype: a case's setup must not judge its point by a method the
    profile leaves out (it once did, and every accuracy point of the main job was skipped without a word)."""
    monkeypatch.setattr(bench_attention, "PROFILE", get_profile("quick"))
    monkeypatch.setattr(accuracy, "measure", lambda build, problem, dtypes=accuracy.DTYPES, gradients=False: [
        {"dtype": d, "status": "ok", "rms_error": 1e-3, "reference": {}, "ratio": {}} for d in dtypes])
    params = ("numpy_oracle", "eager", 128, 8, "cpu")
    assert run_method(bench_attention.CausalAccuracy(), "track_rms_error_float16", params) == 1e-3
    with pytest.raises(NotImplementedError, match="measures accuracy at 8 heads and L in"):
        bench_attention.CausalAccuracy().setup("numpy_oracle", "eager", 2048, 8, "cpu")


def test_a_gradient_that_is_zero_canonically_does_not_make_the_gradients_figure_unbounded():
    """The key bias's gradient is 0 exactly (it adds the same to every logit of a row); any rounding there would be
    an unbounded relative error, so it is left out, and the figure is the worst of the others."""
    golden = {"query": np.ones((2, 3)), "Wq": np.full((2, 2), 2.0), "bk": np.full(3, 1e-17)}
    actual = {"query": np.ones((2, 3)) * 1.01, "Wq": np.full((2, 2), 2.0), "bk": np.full(3, 1e-9)}
    assert accuracy.gradient_error(actual, golden) == pytest.approx(0.01)
    assert math.isnan(accuracy.gradient_error({**actual, "Wq": np.full((2, 2), np.nan)}, golden))
