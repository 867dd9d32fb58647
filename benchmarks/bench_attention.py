"""Multi-head attention over sequence length, heads, adapter, mode and device.

Each class is one attention pattern (self, causal self, cross with S = T/2);
each method one measurement. Setup builds, compiles and calls the layer once.
Time is sampled by the suite (``benchmarks.sampling``: one native call per
sample, each ending with the framework's device sync, until the median is
known to 2% or the point's cap), and handed to asv as its samples, which asv
summarises with its own statistics. Peak memory is what one call allocates,
not the process: the compiler's figure where it states one (XLA), else the
adapter's probe after a warm-up (VmHWM on CPU, the framework's counter where it
pools memory or on GPU). GFLOP/s is not a measurement of its own: setup records
each case's FLOPs (``benchmarks.flops``) and the report divides them by the times.

The accuracy classes (``SelfAccuracy``, ``CausalAccuracy`` and their ``Peaky`` twins) track each adapter's
error against the float64 oracle over the same L grid, per dtype: the largest error relative to the output's
scale, the RMS error, the error of the output-weighted sum and, where the profile asks, the gradients' relative
RMS error (``benchmarks.accuracy``), so a kernel whose
error jumps between two nights is flagged by ``mhabench report --compare`` as a slowdown is.
"""
from mhabench.benchmarks import accuracy, common
from mhabench.benchmarks.profiles import MODES, get_profile

PROFILE = get_profile()
common.preimport_for_forkserver()

FORWARD_METHODS = ("track_time_forward", "track_peakmem_forward")
BACKWARD_METHODS = ("track_time_forward_backward", "track_peakmem_forward_backward")


def _warm_backward(*params):
    """Setup of the forward+backward methods only, so forward-only processes never build a backward. asv calls
    a method's own setup with the parameters alone, after the instance's ``setup``: the instance is the one that
    setup recorded as this process's (asv runs one benchmark case per process)."""
    bench = _AttentionBenchmark.running
    try:
        bench.prepared.warm_backward()
    except common.Skip as exc:
        common.record(bench.names(BACKWARD_METHODS), bench.prepared.case.params(), "skipped", str(exc))
        raise
    except Exception as exc:
        common.record(bench.names(BACKWARD_METHODS), bench.prepared.case.params(), "failed",
                      f"{type(exc).__name__}: {exc}")
        raise


class _AttentionBenchmark:
    """Shared by the three classes below; the leading underscore keeps asv from collecting it."""

    kind = "self"
    param_names = ["adapter", "mode", "seq_len", "num_heads", "device"]
    params = [list(PROFILE.adapters), list(MODES), list(PROFILE.seq_lens), list(PROFILE.num_heads),
              list(PROFILE.devices)]
    timeout = PROFILE.timeout
    running: "_AttentionBenchmark | None" = None  # the instance asv set up in this process, for _warm_backward

    def names(self, methods):
        return [f"bench_attention.{type(self).__name__}.{m}" for m in methods]

    def setup(self, adapter, mode, seq_len, num_heads, device):
        case = common.Case(self.kind, adapter, mode, int(seq_len), int(num_heads), device, PROFILE.batch,
                           PROFILE.model_dim, PROFILE.cross_kv_ratio)
        _AttentionBenchmark.running = self
        self.prepared = common.prepare(case, PROFILE, self.names(FORWARD_METHODS + BACKWARD_METHODS))
        common.record_flops(f"bench_attention.{type(self).__name__}", case)

    def _track(self, method, measure):
        try:
            return measure(self.names([method])[0])
        except Exception as exc:
            common.record(self.names([method]), self.prepared.case.params(), "failed",
                          f"{type(exc).__name__}: {exc}")
            raise

    def track_time_forward(self, *params):
        return self._track("track_time_forward", lambda name: self.prepared.timed(name, backward=False))

    def track_time_forward_backward(self, *params):
        return self._track("track_time_forward_backward", lambda name: self.prepared.timed(name, backward=True))

    def track_peakmem_forward(self, *params):
        return self._track("track_peakmem_forward", lambda name: self.prepared.peak_bytes(name, backward=False))

    def track_peakmem_forward_backward(self, *params):
        return self._track("track_peakmem_forward_backward",
                           lambda name: self.prepared.peak_bytes(name, backward=True))

    track_time_forward.unit = track_time_forward_backward.unit = "seconds"
    track_peakmem_forward.unit = track_peakmem_forward_backward.unit = "bytes"
    track_time_forward_backward.setup = _warm_backward
    track_peakmem_forward_backward.setup = _warm_backward


class SelfAttention(_AttentionBenchmark):
    """query = key = value, length seq_len."""
    kind = "self"


class CausalSelfAttention(_AttentionBenchmark):
    """Self-attention with a top-left causal mask (is_causal where the framework has it)."""
    kind = "causal"


class CrossAttention(_AttentionBenchmark):
    """Query of length seq_len attending to a memory of length seq_len * cross_kv_ratio (key = value)."""
    kind = "cross"


# ---- accuracy: error against the float64 oracle as L grows (benchmarks.accuracy) ------------------------
def _accuracy_method(metric: str, dtype: str):
    """``track_<metric>_<dtype>``: one figure of the case's accuracy record. Its own setup skips the method
    where the adapter cannot run ``dtype`` (with the adapter's reason), as asv skips a case."""
    def track(self, *params):
        value = self.records[dtype].get(metric)
        return float("nan") if value is None else float(value)

    def setup(*params):
        bench = _AccuracyBenchmark.running
        rec = bench.records.get(dtype) or {"status": "skipped", "reason": f"{dtype} was not measured"}
        figures = accuracy.METRICS
        status, reason = rec.get("status"), rec.get("reason")
        if status == "ok" and metric == accuracy.GRADIENT:
            figures, status, reason = (accuracy.GRADIENT,), rec.get("gradient_status"), rec.get("gradient_reason")
        if status != "ok":
            names = bench.names([f"track_{m}_{dtype}" for m in figures])
            common.record(names, bench.case.params(), "skipped" if status == "skipped" else "failed", str(reason))
            raise common.Skip(str(reason))

    track.__name__ = track.__qualname__ = f"track_{metric}_{dtype}"
    track.unit = accuracy.UNITS[metric]
    track.setup = setup
    return track


class _AccuracyBenchmark:
    """Shared by the accuracy classes: the same parameters as the attention classes (so a sweep, its budget and
    its shards treat them alike), at the profile's accuracy head count only. One method per figure and dtype;
    the figures of a case are measured once (``common.accuracy_records``)."""

    kind = "self"
    inputs = "normal"
    param_names = _AttentionBenchmark.param_names
    params = _AttentionBenchmark.params
    timeout = PROFILE.timeout
    running: "_AccuracyBenchmark | None" = None

    def names(self, methods):
        return [f"bench_attention.{type(self).__name__}.{m}" for m in methods]

    def setup(self, adapter, mode, seq_len, num_heads, device):
        self.case = common.Case(self.kind, adapter, mode, int(seq_len), int(num_heads), device, PROFILE.batch,
                                PROFILE.model_dim, PROFILE.cross_kv_ratio)
        _AccuracyBenchmark.running = self
        methods = [m for m in dir(type(self)) if m.startswith("track_")]
        if not PROFILE.keeps_accuracy_point(num_heads, seq_len):
            why = (f"the {PROFILE.name} profile measures accuracy at {PROFILE.accuracy_heads} heads and L in "
                   f"{PROFILE.accuracy_lens or PROFILE.seq_lens} only")
            common.record(self.names(methods), self.case.params(), "skipped", why)
            raise common.Skip(why)
        self.records = common.accuracy_records(f"bench_attention.{type(self).__name__}", self.case, self.inputs,
                                               PROFILE, self.names(methods))


for _metric in accuracy.ACCURACY_FIGURES:
    for _dtype in accuracy.DTYPES:
        setattr(_AccuracyBenchmark, f"track_{_metric}_{_dtype}", _accuracy_method(_metric, _dtype))


class SelfAccuracy(_AccuracyBenchmark):
    """Self-attention's error against the float64 oracle, seeded standard normal inputs."""
    kind, inputs = "self", "normal"


class CausalAccuracy(_AccuracyBenchmark):
    """Causal self-attention's error against the float64 oracle, seeded standard normal inputs."""
    kind, inputs = "causal", "normal"


class PeakySelfAccuracy(_AccuracyBenchmark):
    """Self-attention's error with peaky softmax rows: the input scaled so the logits' spread is about 8."""
    kind, inputs = "self", "peaky"


class PeakyCausalAccuracy(_AccuracyBenchmark):
    """Causal self-attention's error with peaky softmax rows."""
    kind, inputs = "causal", "peaky"
