"""What every attention benchmark shares: one case built once per process, the
skip rules (each with its reason, also written to ``<results>/bench/skips.jsonl``)
and the memory budget.

asv runs every parameter combination in its own process and re-runs ``setup``
before every timing sample, so a built case is cached per process: the layer
is built, compiled and called once.
"""
from __future__ import annotations

import json
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mhabench import results
from mhabench.impls import memory
from mhabench.impls.base import UnsupportedError
from mhabench.impls.worker import die_with_parent

from . import flops as flops_mod
from . import sampling
from .profiles import Profile

ENV_RESULTS = "MHABENCH_RESULTS"
ENV_BUDGET = "MHABENCH_MEMORY_BUDGET"
ENV_PREIMPORT = "MHABENCH_PREIMPORT"
ENV_VERIFY = "MHABENCH_VERIFY"  # "1": time each point plainly too, call by call beside the suite (bench --verify)
ENV_SWEEP = "MHABENCH_SWEEP_ID"  # one mhabench bench run: its processes share each accuracy case's measurement
BUDGET_FRACTION = 0.5          # default CPU budget: half the machine's RAM
GPU_BUDGET_FRACTION = 0.9
FLOAT_BYTES = 4                # the benchmarks run float32
KINDS = ("self", "causal", "cross")


class Skip(NotImplementedError):
    """Raised in setup: asv records the case as skipped (NotImplementedError); ``reason`` says why."""


# ---- where skips are written ------------------------------------------------------------------
def results_dir() -> Path:
    root = os.environ.get(ENV_RESULTS)
    if root:
        return Path(root)
    # asv runs benchmarks in a temporary directory and sets ASV_CONF_DIR only in the environments
    # it builds: fall back on the project root, where asv.conf.json keeps results/asv
    return Path(os.environ.get("ASV_CONF_DIR") or Path(__file__).resolve().parents[1]) / "results"


def skips_path() -> Path:
    return results.Layout(results_dir()).skips


def _append_once(path: Path, records: list[dict]) -> None:
    """Append each record as a JSON line unless that exact line is there already (asv re-runs setup per
    sample and per method, so the same record is seen many times)."""
    try:
        seen = set(path.read_text().splitlines()) if path.exists() else set()
        new = [line for line in (json.dumps(r, sort_keys=True) for r in records) if line not in seen]
        if new:
            with results.Appender(path) as out:  # whole lines or none, on a full disk too
                out.write_lines(new)
    except OSError as exc:  # a read-only results dir must not turn a skip into a crash
        print(f"mhabench: {exc}", file=sys.stderr)


def record(benchmarks, params: dict, status: str, reason: str, path: Path | None = None, **facts) -> None:
    """One line per benchmark name in skips.jsonl (``path``, else this process's results directory's): why it
    did not run, with any further ``facts`` (a budget's prediction)."""
    _append_once(path or skips_path(), [{"benchmark": b, "params": params, "status": status, "reason": reason,
                                         **facts} for b in benchmarks])


def record_flops(benchmark_class: str, case: "Case") -> None:
    """The FLOPs of a case's forward and forward+backward calls (bench/flops.jsonl): the report divides them
    by asv's own steady-state timings to give GFLOP/s, so throughput and time come from one measurement.
    With them, the facts of the adapter's kernel the report reads the line by: its framework family, and
    whether it holds the [B, H, T, S] scores (the plausibility rules expect such a kernel's time to grow at
    least linearly)."""
    from mhabench import impls
    adapter = impls.get_adapter(case.adapter)
    _append_once(results.Layout(results_dir()).flops,
                 [{"benchmark": benchmark_class, "params": case.params(), "forward": case.flops(False),
                   "forward_backward": case.flops(True), "kernel": adapter.kernel, "family": adapter.family,
                   "holds_scores": adapter.score_buffers > 0}])


def record_point(benchmark: str, params: dict, facts: dict) -> None:
    """One measured point in bench/points.jsonl (appended; the newest line of a point wins when read)."""
    path = results.Layout(results_dir()).points
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(json.dumps({"benchmark": benchmark, "params": params, **facts, "time": time.time()},
                                sort_keys=True) + "\n")
    except OSError as exc:
        print(f"mhabench: cannot write {path}: {exc}", file=sys.stderr)


# ---- memory budget ------------------------------------------------------------------------------
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


def parse_bytes(text: str) -> int:
    """'24GiB', '500MB', '1e9' -> bytes."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"{ENV_BUDGET}={text!r}: expected bytes such as 12GiB, 500MB or 1e9")
    try:
        value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    except ValueError:
        raise ValueError(f"{ENV_BUDGET}={text!r}: expected bytes such as 12GiB, 500MB or 1e9") from None
    if value <= 0:
        raise ValueError(f"{ENV_BUDGET}={text!r}: must be positive")
    return int(value)


def total_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget(device: str = "cpu") -> int:
    if os.environ.get(ENV_BUDGET):
        return parse_bytes(os.environ[ENV_BUDGET])
    if device == "cuda":
        try:
            import torch
            return int(torch.cuda.get_device_properties(0).total_memory * GPU_BUDGET_FRACTION)
        except Exception:
            return int(1 << 62)
    return int(total_ram() * BUDGET_FRACTION)


def estimate_bytes(score_buffers: int, batch: int, q_len: int, kv_len: int, num_heads: int, model_dim: int,
                   backward: bool = False) -> int:
    """Peak bytes of one float32 call, roughly: activations plus the adapter's declared ``score_buffers``
    [B, H, T, S] arrays. Conservative on purpose: the estimate gates a skip."""
    activations = 8 * batch * (q_len + 2 * kv_len) * model_dim * FLOAT_BYTES
    scores = batch * num_heads * q_len * kv_len * FLOAT_BYTES
    forward = activations + score_buffers * scores
    return int(forward * (2.5 if backward else 1))


def gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB"


# ---- the case ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    kind: str           # self | causal | cross
    adapter: str
    mode: str
    seq_len: int
    num_heads: int
    device: str
    batch: int
    model_dim: int
    cross_kv_ratio: float

    @property
    def q_len(self) -> int:
        return self.seq_len

    @property
    def kv_len(self) -> int:
        return max(1, int(self.seq_len * self.cross_kv_ratio)) if self.kind == "cross" else self.seq_len

    @property
    def key_dim(self) -> int:
        return max(1, self.model_dim // self.num_heads)

    @property
    def causal(self) -> bool:
        return self.kind == "causal"

    def params(self) -> dict:
        return {"adapter": self.adapter, "mode": self.mode, "seq_len": self.seq_len,
                "num_heads": self.num_heads, "device": self.device}

    def flops(self, backward: bool) -> float:
        from mhabench import impls
        skips = impls.get_adapter(self.adapter).causal_skips_masked_blocks
        return flops_mod.attention_flops(self.batch, self.q_len, self.kv_len, self.model_dim, self.num_heads,
                                         self.key_dim, causal=self.causal, skips_masked_blocks=skips,
                                         backward=backward)

    def estimate(self, score_buffers: int, backward: bool = False) -> int:
        return estimate_bytes(score_buffers, self.batch, self.q_len, self.kv_len, self.num_heads, self.model_dim,
                              backward)


def checked_adapter(case: Case, profile: Profile):
    """The case's adapter, after every rule that skips a case (Skip with the reason): not registered, needs
    another process configuration, unavailable, refuses the call in float32, another mode than the profile
    runs, the device absent, over the memory budget."""
    from mhabench import impls
    if case.adapter not in impls.list_adapters():
        raise Skip(f"adapter {case.adapter!r} is not registered")
    adapter = impls.get_adapter(case.adapter)
    for key, value in adapter.worker_env().items():  # e.g. KERAS_BACKEND, read at the framework's import
        os.environ.setdefault(key, value)
    if not adapter.in_process():
        raise Skip(f"{case.adapter} needs {adapter.worker_env()} in its process, which already runs "
                   f"another configuration (Keras picks its backend once per process)")
    ok, why = adapter.availability()
    if not ok:
        raise Skip(f"unavailable here: {why}")
    spec = impls.AttentionSpec(num_heads=case.num_heads, key_dim=case.key_dim)
    dims = (case.model_dim,) * 3
    reason = adapter.unsupported_reason(spec, dims, dtype="float32", device=case.device, mode=case.mode)
    if reason:
        raise Skip(reason)
    if not profile.keeps_mode(case.adapter, case.mode):
        raise Skip(f"the {profile.name} profile runs {case.adapter} in "
                   f"{adapter.quick_mode or adapter.default_mode} mode only")
    if case.device not in adapter.available_devices():
        raise Skip(f"device {case.device} absent: {adapter.framework} sees "
                   f"{', '.join(adapter.available_devices())} only")
    budget = memory_budget(case.device)
    need = case.estimate(adapter.score_buffers)
    if need > budget:
        raise Skip(f"estimated forward peak {gib(need)} exceeds the memory budget {gib(budget)} "
                   f"({ENV_BUDGET})")
    return adapter


class PreparedCase:
    """A built layer with converted inputs; ``forward``/``forward_backward`` are the native calls."""

    def __init__(self, case: Case, profile: Profile):
        self.case, self.profile = case, profile
        self._backward_state: BaseException | bool | None = None  # None: not tried; True: warm
        started = time.perf_counter()
        self._check_and_build()
        self.setup_seconds = time.perf_counter() - started  # build, compile and first call

    def _check_and_build(self):
        case = self.case
        from mhabench import impls
        adapter = self.adapter = checked_adapter(case, self.profile)
        spec = impls.AttentionSpec(num_heads=case.num_heads, key_dim=case.key_dim)
        rng = np.random.default_rng(0)
        self.query = rng.standard_normal((case.batch, case.q_len, case.model_dim)).astype(np.float32)
        self.value = (self.query if case.kind != "cross" else
                      rng.standard_normal((case.batch, case.kv_len, case.model_dim)).astype(np.float32))
        weights = impls.Weights.random(spec, query_dim=case.model_dim, value_dim=case.model_dim, seed=0)
        self.layer = adapter.build(spec, weights, dtype="float32", device=case.device, mode=case.mode)
        self.inputs = self.layer.native_inputs(self.query, self.value, causal=case.causal)
        self.native_forward = self.layer.native_forward
        self.native_forward(self.inputs)  # compile and warm up outside the timed region

    def warm_backward(self):
        """Prepare the backward call once; afterwards raise the same error every time."""
        if self._backward_state is True:
            return
        if isinstance(self._backward_state, BaseException):
            raise self._backward_state
        case = self.case
        try:
            budget = memory_budget(case.device)
            need = case.estimate(self.adapter.score_buffers, backward=True)
            if need > budget:
                raise Skip(f"estimated forward+backward peak {gib(need)} exceeds the memory budget "
                           f"{gib(budget)} ({ENV_BUDGET})")
            self.inputs_grad = self.layer.native_inputs(self.query, self.value, causal=case.causal,
                                                        requires_grad=True)
            self.native_forward_backward = self.layer.native_forward_backward
            self.native_forward_backward(self.inputs_grad)
        except (NotImplementedError, UnsupportedError) as exc:  # no backward path, or gradients declared unsupported
            self._backward_state = exc if isinstance(exc, Skip) else Skip(str(exc) or "no backward path")
            raise self._backward_state from None
        except BaseException as exc:
            self._backward_state = exc
            raise
        self._backward_state = True

    # ---- measurements used by the track_ benchmarks ----
    def _native(self, backward: bool):
        fn, inputs = ((self.native_forward_backward, self.inputs_grad) if backward
                      else (self.native_forward, self.inputs))
        return (lambda: fn(inputs)), inputs

    def timed(self, benchmark: str, backward: bool) -> dict:
        """The per-call times of the adaptive sampling (``benchmarks.sampling``), in the form asv takes a
        timing in (``{"samples", "number"}``), so asv's own statistics (median, 99% interval, quartiles,
        count) summarise them. With ``MHABENCH_VERIFY=1`` the same call is also timed plainly
        (``sampling.plain_call``) after each of the suite's samples, in this process, and the point's line in
        bench/points.jsonl carries that plain median."""
        call, _ = self._native(backward)
        rules = self.profile.sampling.from_environment()
        hand: list[float] = []
        verify = os.environ.get(ENV_VERIFY) == "1"
        found = sampling.sample(call, rules, between=(lambda: hand.append(sampling.plain_call(call))) if verify
                                else None)
        low, high = found.interval(rules.confidence)
        q25, _, q75 = sampling.quartiles(found.seconds)
        facts = {"quantity": "time", "median": found.median, "ci95": [low, high], "q25": q25, "q75": q75,
                 "samples": len(found.seconds), "stopped": found.stopped, "warmup_calls": found.warmup_calls,
                 "sampling_seconds": found.wall_seconds, "setup_seconds": self.setup_seconds,
                 "scale": float(os.environ.get(sampling.ENV_SCALE) or 1)}
        if verify:  # each plain call ran right after its suite sample: their ratio sees one load
            paired = statistics.median(s / h for s, h in zip(found.seconds, hand) if h > 0)
            facts["verify"] = {"median": statistics.median(hand), "samples": len(hand), "paired_ratio": paired}
        record_point(benchmark, self.case.params(), facts)
        return {"samples": found.seconds, "number": 1}

    def peak_bytes(self, benchmark: str, backward: bool) -> dict | int:
        """The per-call peak memory, measured after the same warm-up as the time.

        Where the adapter's compiler states what a call allocates (XLA's buffer assignment for compiled JAX
        programs) that figure is the result, exact; elsewhere the per-call peaks of the probe the adapter
        declares, as asv's samples (one moves in allocator-sized steps, so their median is the figure). Both
        go to bench/points.jsonl, so the report can show the probe's figure beside the compiler's."""
        call, inputs = self._native(backward)
        rules = self.profile.sampling.from_environment()
        started = time.perf_counter()
        warm = sampling.warm_up(call, rules)
        peaks = [self.adapter.peak_memory(call, self.case.device) for _ in range(max(1, rules.memory_samples))]
        program = self.layer.native_program_bytes(inputs, backward=backward)
        q25, median, q75 = sampling.quartiles(peaks)
        facts = {"quantity": "memory", "charted": "program" if program is not None else "probe",
                 "program_bytes": program, "program_source": "XLA buffer assignment (temp + output)"
                 if program is not None else None, "probe": self.adapter.memory_source(self.case.device),
                 "probe_median": median, "probe_q25": q25, "probe_q75": q75,
                 "samples": len(peaks), "warmup_calls": warm, "sampling_seconds": time.perf_counter() - started,
                 "setup_seconds": self.setup_seconds, "scale": float(os.environ.get(sampling.ENV_SCALE) or 1)}
        record_point(benchmark, self.case.params(), facts)
        return program if program is not None else {"samples": peaks, "number": 1}


_CACHE: dict[Case, PreparedCase | BaseException] = {}


def prepare(case: Case, profile: Profile, benchmark_names) -> PreparedCase:
    """The case built once per process; a skip or failure is recorded once and raised every time."""
    cached = _CACHE.get(case)
    if cached is None:
        die_with_parent()  # a benchmark process (forked by asv's forkserver) ends with the forkserver
        try:
            cached = PreparedCase(case, profile)
        except Skip as exc:
            record(benchmark_names, case.params(), "skipped", str(exc))
            cached = exc
        except NotImplementedError as exc:  # e.g. no native path
            cached = Skip(str(exc))
            record(benchmark_names, case.params(), "skipped", str(cached))
        except Exception as exc:
            record(benchmark_names, case.params(), "failed", f"{type(exc).__name__}: {exc}")
            cached = exc
        _CACHE.clear()  # one case per process; never keep two layers alive
        _CACHE[case] = cached
    if isinstance(cached, BaseException):
        raise cached
    return cached


# ---- the accuracy of a case: measured once, read by every method ----------------------------------
_ACCURACY: dict[tuple, dict | BaseException] = {}


def accuracy_records(benchmark: str, case: Case, inputs: str, profile: Profile, benchmark_names) -> dict[str, dict]:
    """dtype -> the case's accuracy record (``benchmarks.accuracy.measure``), measured once: every dtype and
    figure of a case comes from one measurement, which bench/accuracy.jsonl keeps. asv runs each method in a
    process of its own, so the processes of one ``mhabench bench`` run (``MHABENCH_SWEEP_ID``) read the records
    the first one wrote. A skip is recorded once and raised every time, as ``prepare`` does."""
    key = (benchmark, case, inputs)
    cached = _ACCURACY.get(key)
    if cached is None:
        die_with_parent()
        try:
            cached = _recorded_accuracy(benchmark, case) or _measure_accuracy(benchmark, case, inputs, profile)
        except Skip as exc:
            record(benchmark_names, case.params(), "skipped", str(exc))
            cached = exc
        except NotImplementedError as exc:
            cached = Skip(str(exc))
            record(benchmark_names, case.params(), "skipped", str(cached))
        except Exception as exc:
            record(benchmark_names, case.params(), "failed", f"{type(exc).__name__}: {exc}")
            cached = exc
        _ACCURACY.clear()
        _ACCURACY[key] = cached
    if isinstance(cached, BaseException):
        raise cached
    return cached


def _recorded_accuracy(benchmark: str, case: Case) -> dict[str, dict] | None:
    sweep = os.environ.get(ENV_SWEEP)
    path = results.Layout(results_dir()).accuracy
    if not sweep or not path.is_file():
        return None
    records, _ = results.read_jsonl(path, results.accuracy_problem)
    found = {rec["dtype"]: rec for rec in records if rec.get("sweep") == sweep and rec["benchmark"] == benchmark
             and rec["params"] == case.params()}
    from .accuracy import DTYPES
    return found if all(d in found for d in DTYPES) else None


def _measure_accuracy(benchmark: str, case: Case, inputs: str, profile: Profile) -> dict[str, dict]:
    from mhabench import impls
    from . import accuracy
    adapter = checked_adapter(case, profile)
    problem = accuracy.Problem(case.kind, inputs, case.seq_len, case.num_heads, case.batch, case.model_dim)
    weights = problem.weights()
    dims = (case.model_dim,) * 3

    def build(dtype):
        reason = adapter.unsupported_reason(problem.spec, dims, dtype=dtype, device=case.device, mode=case.mode)
        return str(reason) if reason else adapter.build(problem.spec, weights, dtype=dtype, device=case.device,
                                                         mode=case.mode)
    started = time.perf_counter()
    measured = accuracy.measure(build, problem, gradients=profile.accuracy_gradients)
    facts = {"benchmark": benchmark, "params": case.params(), "sweep": os.environ.get(ENV_SWEEP),
             "kernel": adapter.kernel, "family": adapter.family, "seconds": round(time.perf_counter() - started, 3),
             "time": time.time()}
    records = [{**facts, **r} for r in measured]
    try:
        results.append_jsonl(results.Layout(results_dir()).accuracy, records)
    except OSError as exc:  # a full or read-only results dir must not lose the figures asv records
        print(f"mhabench: {exc}", file=sys.stderr)
    return {r["dtype"]: r for r in records}


def preimport_for_forkserver() -> None:
    """With asv's forkserver, modules imported here are inherited by every forked benchmark
    process, which then skips the framework import. Only the server does it (not discovery),
    and only for the modules ``mhabench bench`` names for the adapter being run."""
    if "run_server" not in sys.argv:
        return
    die_with_parent()  # asv's forkserver ends with asv (which ends with mhabench bench)
    names = os.environ.get(ENV_PREIMPORT, "")
    if not names:
        return
    import importlib
    for name in names.split(","):
        try:
            importlib.import_module(name.strip())
        except Exception as exc:  # the benchmark itself will report the missing framework
            print(f"mhabench: preimport of {name} failed: {exc}", file=sys.stderr)

