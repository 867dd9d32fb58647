"""The asv suite's own logic: skips with reasons, the skips file, the CLI's checks and chunk plan,
and one smallest-size call of every benchmark method, in-process."""
import json
from pathlib import Path

import pytest

from mhabench import impls
from mhabench.benchmarks import bench_attention, bench_machine, common
from mhabench.benchmarks.profiles import Profile, get_profile
from mhabench.benchmarks.sampling import Sampling
from mhabench.cli import main as cli_main
from mhabench.benchmarks import sweep
from mhabench import results

TINY = Profile("tiny", seq_lens=(16,), num_heads=(2,), model_dim=16,
               sampling=Sampling(max_samples=8, max_seconds=0.05, warmup_seconds=0.0, memory_samples=3))
CLASSES = (bench_attention.SelfAttention, bench_attention.CausalSelfAttention, bench_attention.CrossAttention)
METHODS = ("track_time_forward", "track_time_forward_backward", "track_peakmem_forward",
           "track_peakmem_forward_backward")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv(common.ENV_RESULTS, str(tmp_path))
    monkeypatch.delenv(common.ENV_BUDGET, raising=False)
    monkeypatch.setattr(bench_attention, "PROFILE", TINY)
    common._CACHE.clear()
    yield
    common._CACHE.clear()


def skips(tmp_path):
    path = tmp_path / "bench" / "skips.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_method(bench, method, params):
    """What asv does for one method: setup(s), then the body."""
    bench.setup(*params)
    func = getattr(bench, method)
    if hasattr(func, "setup"):
        func.setup(*params)
    return func(*params)


@pytest.mark.parametrize("adapter", ["torch_sdpa", "numpy_oracle"])
@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
def test_every_method_runs_once(cls, adapter):
    if not impls.get_adapter(adapter).is_available():
        pytest.skip(impls.get_adapter(adapter).availability()[1])
    params = (adapter, "eager", 16, 2, "cpu")
    for method in METHODS:
        bench = cls()
        if adapter == "numpy_oracle" and method.endswith("forward_backward"):
            with pytest.raises(NotImplementedError, match="no native backward"):
                run_method(bench, method, params)
            continue
        value = run_method(bench, method, params)
        # asv's timing form: the samples (per call) its own statistics summarise, one call per sample
        assert value["number"] == 1 and len(value["samples"]) >= TINY.sampling.floor_samples
        assert all(isinstance(v, (int, float)) and v >= 0 for v in value["samples"])


def test_verify_times_the_call_plainly_after_each_sample_and_records_both(tmp_path, monkeypatch):
    monkeypatch.setenv(common.ENV_VERIFY, "1")
    bench = bench_attention.SelfAttention()
    bench.setup("numpy_oracle", "eager", 16, 2, "cpu")
    found = bench.track_time_forward()
    [point] = [json.loads(line) for line in results.Layout(tmp_path).points.read_text().splitlines()]
    assert point["quantity"] == "time" and point["samples"] == len(found["samples"])
    assert point["verify"]["samples"] == len(found["samples"]) and point["verify"]["median"] > 0
    assert point["verify"]["paired_ratio"] > 0 and point["q25"] <= point["median"] <= point["q75"]
    monkeypatch.setenv(common.ENV_VERIFY, "0")
    bench.track_time_forward()
    assert "verify" not in json.loads(results.Layout(tmp_path).points.read_text().splitlines()[-1])


def test_setup_records_the_flops_the_report_divides_by_time(tmp_path):
    bench_attention.CausalSelfAttention().setup("numpy_oracle", "eager", 16, 2, "cpu")
    [record] = [json.loads(line) for line in results.Layout(tmp_path).flops.read_text().splitlines()]
    case = common.Case("causal", "numpy_oracle", "eager", 16, 2, "cpu", 1, 16, 0.5)
    assert record["benchmark"] == "bench_attention.CausalSelfAttention" and record["params"] == case.params()
    assert record["forward"] == case.flops(False) > 0 and record["forward_backward"] == case.flops(True)
    bench_attention.CausalSelfAttention().setup("numpy_oracle", "eager", 16, 2, "cpu")  # asv re-runs setup
    assert len(results.Layout(tmp_path).flops.read_text().splitlines()) == 1


def test_units():
    assert bench_attention.SelfAttention.track_peakmem_forward.unit == "bytes"
    assert bench_machine.Machine.track_gemm_gflops.unit == "GFLOP/s"


def test_case_shapes():
    cross = common.Case("cross", "torch_sdpa", "eager", 64, 8, "cpu", 1, 512, 0.5)
    assert (cross.q_len, cross.kv_len, cross.key_dim, cross.causal) == (64, 32, 64, False)
    assert common.Case("causal", "x", "eager", 64, 16, "cpu", 1, 512, 0.5).causal


def test_backward_skip_is_recorded_once_per_method(tmp_path):
    if not impls.get_adapter("numpy_oracle").is_available():
        pytest.skip("numpy_oracle unavailable")
    params = ("numpy_oracle", "eager", 16, 2, "cpu")
    for _ in range(3):  # asv re-runs setup for every sample: the file must not grow
        with pytest.raises(NotImplementedError):
            run_method(bench_attention.SelfAttention(), "track_time_forward_backward", params)
    rows = skips(tmp_path)
    assert {r["benchmark"] for r in rows} == {f"bench_attention.SelfAttention.{m}"
                                              for m in bench_attention.BACKWARD_METHODS}
    assert all(r["status"] == "skipped" and "backward" in r["reason"] for r in rows)
    assert rows[0]["params"] == dict(zip(bench_attention.SelfAttention.param_names, params))


def test_unsupported_case_is_skipped_with_the_adapters_reason(tmp_path):
    # the oracle declares no compiled mode
    with pytest.raises(NotImplementedError, match="mode compiled"):
        bench_attention.SelfAttention().setup("numpy_oracle", "compiled", 16, 2, "cpu")
    row = skips(tmp_path)[0]
    assert row["status"] == "skipped" and "mode compiled" in row["reason"]
    assert len(skips(tmp_path)) == len(METHODS)


def test_missing_cuda_is_skipped(tmp_path):
    if not impls.get_adapter("torch_sdpa").is_available():
        pytest.skip("torch unavailable")
    if "cuda" in impls.get_adapter("torch_sdpa").available_devices():
        pytest.skip("this machine has a GPU")
    with pytest.raises(NotImplementedError, match="device cuda absent"):
        bench_attention.CausalSelfAttention().setup("torch_sdpa", "eager", 16, 2, "cuda")
    assert "device cuda absent" in skips(tmp_path)[0]["reason"]
    with pytest.raises(NotImplementedError, match="cuda"):
        bench_machine.Machine().setup("cuda")


def test_over_budget_is_skipped(tmp_path, monkeypatch):
    monkeypatch.setenv(common.ENV_BUDGET, "10KB")  # the tiny case needs ~33 kB
    with pytest.raises(NotImplementedError, match="exceeds the memory budget"):
        bench_attention.SelfAttention().setup("numpy_oracle", "eager", 16, 2, "cpu")
    assert "MHABENCH_MEMORY_BUDGET" in skips(tmp_path)[0]["reason"]


def test_estimate_grows_quadratically_unless_fused():
    buffers = lambda adapter: impls.get_adapter(adapter).score_buffers
    est = lambda adapter, L: common.estimate_bytes(buffers(adapter), 1, L, L, 8, 512)
    assert est("jax_dpa", 16384) > 8 * 2 ** 30          # three 8 GiB score arrays
    assert est("torch_sdpa", 16384) < 2 ** 30            # fused: activations only
    assert common.estimate_bytes(buffers("jax_dpa"), 1, 1024, 1024, 8, 512, backward=True) > est("jax_dpa", 1024)


class MissingFramework(impls.Adapter):
    name = "bench_test_missing"
    framework = "Nothing"
    requires = ("no_such_framework_module_xyz",)
    install_hint = "pip install nothing"


def test_missing_framework_is_skipped(tmp_path):
    impls.register_adapter("bench_test_missing", MissingFramework)
    with pytest.raises(NotImplementedError, match="unavailable here.*no_such_framework_module_xyz"):
        bench_attention.SelfAttention().setup("bench_test_missing", "eager", 16, 2, "cpu")
    assert skips(tmp_path)[0]["params"]["adapter"] == "bench_test_missing"


class Exploding(impls.Adapter):
    name = "bench_test_exploding"
    framework = "NumPy"
    requires = ("numpy",)

    def _build(self, *args, **kwargs):
        raise RuntimeError("kernel exploded")


def test_failure_is_recorded_as_failed_and_raised_again(tmp_path):
    impls.register_adapter("bench_test_exploding", Exploding)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="kernel exploded"):
            bench_attention.CrossAttention().setup("bench_test_exploding", "eager", 16, 2, "cpu")
    rows = skips(tmp_path)
    assert len(rows) == len(METHODS) and all(r["status"] == "failed" for r in rows)
    assert "RuntimeError: kernel exploded" in rows[0]["reason"]


def test_process_groups_come_from_the_adapters():
    # TensorFlow keeps CPU allocator stats (the peak-memory probe) only with its BFC allocator
    assert sweep.group_of("keras_mha").env == (("KERAS_BACKEND", "tensorflow"), ("TF_CPU_ALLOCATOR_USE_BFC", "true"))
    assert sweep.group_of("tf_keras_mha").env == (("TF_CPU_ALLOCATOR_USE_BFC", "true"),)
    assert ("KERAS_BACKEND", "jax") in sweep.group_of("keras_mha@jax").env
    assert sweep.group_of("torch_sdpa") == sweep.group_of("torch_mha") != sweep.group_of("keras_mha@torch")
    assert sweep.group_of("jax_dpa").modules == ("jax",) and not sweep.group_of("jax_dpa").env


def test_profiles():
    assert get_profile("quick").seq_lens == (128, 256, 512, 1024, 2048, 4096)
    assert get_profile("default").seq_lens == (128, 256, 512, 1024, 2048, 4096, 8192)
    assert 16384 in get_profile("full").seq_lens
    with pytest.raises(ValueError, match="MHABENCH_PROFILE"):
        get_profile("huge")


# ---- the CLI -------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, message", [
    (["--profile", "huge"], "unknown profile"),
    (["--adapters", "nope"], "unknown adapter"),
    (["--adapters", "torch_sdpa jax_dpa"], "comma-separated"),
    (["--devices", "tpu"], "unknown device"),
    (["--bench", "("], "not a regular expression"),
    (["--memory-budget", "lots"], "memory-budget"),
    (["--quick", "--profile", "full"], "contradicts"),
])
def test_bad_options_are_one_line_errors(argv, message, capsys, tmp_path):
    assert cli_main(["bench", "--results", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_unwritable_results(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli_main(["bench", "--results", str(blocker / "sub")]) == 2
    assert "not writable" in capsys.readouterr().err


def picked_names(profile, regexes):
    import re
    names = [f"{n}({', '.join(c)})" for n, combos in sweep.grid(profile) for c in combos]
    return [n for n in names if any(re.search(r, n) for r in regexes)]


def test_quick_plan_groups_adapters_by_framework_and_keeps_each_in_one_mode():
    plan = sweep.chunk_plan("quick", ["torch_sdpa", "torch_mha", "jax_dpa"], ["cpu"], None)
    assert [c.key for c in plan] == ["torch", "jax"]
    torch_names = picked_names("quick", plan[0].regexes)
    assert all("'cuda'" not in n for n in torch_names)
    # self and causal self-attention, time and per-call memory forward, L = 128 ... 4096 at 8 heads (under a
    # budget the kernels that hold the scores reach 4096 only where it allows)
    # and the accuracy of self and causal self-attention, one method per dtype, at L = 128 ... 1024
    per_adapter = 2 * 2 * 6 + 2 * 3 * 4
    assert len(torch_names) == 2 * per_adapter + 1  # + Machine on cpu
    assert all("'eager'" in n for n in torch_names if "bench_attention" in n)
    assert {n.split(".")[1] for n in torch_names if "bench_attention" in n} == {
        "SelfAttention", "CausalSelfAttention", "SelfAccuracy", "CausalAccuracy"}
    jax_names = picked_names("quick", plan[1].regexes)
    assert len(jax_names) == per_adapter and all("('jax_dpa', 'compiled'," in n for n in jax_names)


def test_chunk_plan_by_class_with_a_regex():
    plan = sweep.chunk_plan("default", ["jax_dpa"], ["cpu", "cuda"], r"track_time_forward\(.*, 4096, ")
    assert [c.key for c in plan] == ["jax_dpa:SelfAttention", "jax_dpa:CausalSelfAttention",
                                     "jax_dpa:CrossAttention"]
    picked = picked_names("default", plan[0].regexes)
    assert len(picked) == 2 * 4 * 2  # modes x heads x devices
    assert all(n.startswith("bench_attention.SelfAttention.track_time_forward('jax_dpa'") and ", 4096, " in n
               for n in picked)


def test_grid_matches_the_classes():
    from mhabench.benchmarks.profiles import ACCURACY_CLASSES, accuracy_methods
    names = {n for n, _ in sweep.grid("quick")}
    expected = {f"bench_attention.{c.__name__}.{m}" for c in CLASSES for m in METHODS}
    accuracy = {f"bench_attention.{c}.{m}" for c in ACCURACY_CLASSES for m in accuracy_methods()}
    assert names == expected | accuracy | {"bench_machine.Machine.track_gemm_gflops"}


def test_resume_skips_finished_chunks(tmp_path):
    key = {"commit": "abc", "profile": "quick"}
    layout = results.Layout(tmp_path)
    sweep.mark_finished(layout, key, "torch_sdpa", 1.0)
    sweep.mark_finished(layout, {"commit": "other", "profile": "quick"}, "jax_dpa", 1.0)
    assert sweep.finished_chunks(layout, key) == {"torch_sdpa"}


def test_asvs_processes_load_the_plugins_without_running_them(monkeypatch):
    """asv's processes load the --adapter plugins unchecked: mhabench bench checked them, and running a
    framework in asv's forkserver would hang every benchmark forked from it."""
    from mhabench.benchmarks import profiles
    from mhabench.impls import plugins
    monkeypatch.setenv(profiles.ENV_ADAPTERS, profiles.plugins_env(["my_attention.py:MyAttention", "pkg.mod:Other"]))
    loaded = []
    monkeypatch.setattr(plugins, "load_adhoc", lambda target, **how: loaded.append((target, how))
                        or target.rpartition(":")[2])
    assert profiles.load_plugins() == ["MyAttention", "Other"]
    assert loaded[0][0].endswith("/my_attention.py:MyAttention") and loaded[0][0].startswith("/")
    assert loaded[1] == ("pkg.mod:Other", {"isolate": False, "check": False})


def test_compare_check_counts_false_positives_and_detection(tmp_path):
    """The rates compare_check reports, from a comparison table: the unchanged adapters' flags, the slowed one's
    regressions, GFLOP/s and one-sided points left out; asv's rule beside them."""
    import csv
    from mhabench.benchmarks import compare_check
    rows = [("time_forward", "'torch_sdpa', 'eager', 512, 8, 'cpu'", "1.5", "within noise", "[0.9, 1.1]", "[1.4, 1.6]"),
            ("time_forward", "'torch_sdpa', 'eager', 1024, 8, 'cpu'", "1.02", "unchanged", "", ""),
            ("track_peakmem_forward", "'jax_dpa', 'compiled', 512, 8, 'cpu'", "1.2", "regression", "", ""),
            ("track_gflops_forward", "'jax_dpa', 'compiled', 512, 8, 'cpu'", "0.5", "follows time (regression)", "",
             ""),
            ("time_forward", "'jax_dpa', 'compiled', 2048, 8, 'cpu'", "nan", "fixed in B", "", ""),
            ("time_forward", "'slowed_sdpa', 'eager', 512, 8, 'cpu'", "1.3", "regression", "", ""),
            ("time_forward", "'slowed_sdpa', 'eager', 1024, 8, 'cpu'", "1.3", "within noise", "[0.9, 1.1]",
             "[1.2, 1.4]")]
    path = tmp_path / "comparison.csv"
    with open(path, "w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["benchmark", "params", "method", "ratio", "change", "a_ci", "b_ci", "better"])
        for method, params, ratio, change, a_ci, b_ci in rows:
            out.writerow([f"bench_attention.SelfAttention.{method}", params, method, ratio, change, a_ci, b_ci,
                          "higher" if "gflops" in method else "lower"])
    found = compare_check.rates(path)
    assert (found["other_benchmarks"], found["false_positives"], found["false_positives_time"]) == (3, 1, 0)
    assert (found["slowed_time_benchmarks"], found["detected"]) == (2, 1)
    # asv's rule flags the 1.5 whose intervals are apart and the 1.2 memory without intervals; both slowed points
    assert (found["asv_rule_false_positives"], found["asv_rule_detected"]) == (2, 2)


def test_asv_is_told_the_checkouts_own_branch(tmp_path):
    """asv stops with "Unknown branch main" in a clone without a main branch (``git clone -b other``): the config
    names the checkout's branch, "HEAD" when it is detached, and "main" only where git cannot tell."""
    import subprocess
    git = lambda *args: subprocess.run(["git", "-C", str(tmp_path), *args], check=True, capture_output=True)
    assert sweep.checkout_branch(tmp_path) == "main"  # not a repository
    git("init", "-q", "-b", "other")
    git("-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q", "--allow-empty", "-m", "x")
    assert sweep.checkout_branch(tmp_path) == "other"
    git("checkout", "-q", "--detach")
    assert sweep.checkout_branch(tmp_path) == "HEAD"
    layout = results.Layout(tmp_path / "results")
    layout.bench.mkdir(parents=True)
    conf = json.loads(sweep.asv_config(layout).read_text())
    assert conf["branches"] == [sweep.checkout_branch(Path(conf["repo"]))]
