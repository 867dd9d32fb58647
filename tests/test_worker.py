"""The worker process: layers hosted in a child, and every way a child can fail becomes an error, not a hang."""
import os
import sys
import time

import numpy as np
import pytest

from mhabench import impls
from mhabench.impls import registry, worker as _worker, oracle
from mhabench.impls.numpy_oracle import NumpyOracleAdapter, NumpyOracleLayer

TRAP_LENGTH = 7  # a query of this length springs the layer's trap


class PlantedLayer(NumpyOracleLayer):
    """The oracle, except that a query of length TRAP_LENGTH sleeps, exits, segfaults or raises."""

    def __init__(self, adapter, spec, weights, dtype, device, mode="eager", trap="sleep", **options):
        super().__init__(adapter, spec, weights, dtype, device, mode, **options)
        self.trap = trap

    def _forward(self, call, return_scores, training, seed):
        if call.query.shape[1] == TRAP_LENGTH:
            print(f"planted layer springs its {self.trap} trap", file=sys.stderr, flush=True)
            if self.trap == "sleep":
                time.sleep(600)
            elif self.trap == "exit":
                os._exit(3)
            elif self.trap == "segfault":
                import ctypes
                ctypes.string_at(0)
            raise ValueError("planted failure: query length 7")
        return super()._forward(call, return_scores, training, seed)


class PlantedAdapter(NumpyOracleAdapter):
    name = "planted"
    layer_class = PlantedLayer


TARGET = f"{PlantedAdapter.__module__}:{PlantedAdapter.__qualname__}"
SPEC = impls.AttentionSpec(num_heads=2, key_dim=3)
WEIGHTS = impls.Weights.random(SPEC, query_dim=4, value_dim=4, seed=0)
RNG = np.random.default_rng(0)
Q, V = RNG.normal(size=(2, 5, 4)), RNG.normal(size=(2, 3, 4))
TRAP_Q = RNG.normal(size=(2, TRAP_LENGTH, 4))


@pytest.fixture(scope="module")
def worker():
    w = _worker.Worker(name="test-worker")
    yield w
    w.close()


def hosted(worker, trap, dtype="float64", call_timeout=30.0):
    return _worker.host(TARGET, SPEC, WEIGHTS, dtype, worker=worker, call_timeout=call_timeout, trap=trap)


def check_works(layer):
    out, scores = layer(Q, V, return_scores=True)
    ref, ref_scores = oracle.forward(SPEC, WEIGHTS, Q, V)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-12)


def test_hosted_layer_matches_in_process(worker):
    layer = hosted(worker, "raise")
    check_works(layer)
    assert layer.export_weights().equals(WEIGHTS)


def test_hosted_layer_receives_the_call_features(worker):
    """Bottom-right causal, the window, the bias and the lengths reach the hosted layer (forward and gradients):
    each changes the result, so a proxy that dropped one would differ from the oracle here."""
    layer = hosted(worker, "raise")
    bias = RNG.normal(size=(5, 3))
    bias[1, 0] = -np.inf
    features = dict(window=(1, 0), bias=bias, query_lengths=np.array([5, 4]), key_value_lengths=np.array([3, 2]))
    out, scores = layer(Q, V, None, None, "bottom_right", return_scores=True, **features)
    ref, ref_scores = oracle.forward(SPEC, WEIGHTS, Q, V, causal="bottom_right", **features)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-12)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-12)
    assert not np.allclose(ref, oracle.forward(SPEC, WEIGHTS, Q, V, causal=True, **features)[0])
    ct = RNG.normal(size=out.shape)
    grads = layer.gradients(Q, V, None, None, "bottom_right", ct, **features)
    from mhabench.impls.oracle_backward import backward
    want = backward(SPEC, WEIGHTS, Q, V, None, None, "bottom_right", ct, **features)
    assert set(grads) == set(want) and "bias" in grads
    for name in want:
        np.testing.assert_allclose(grads[name], want[name], rtol=0, atol=1e-12, err_msg=name)


def test_bfloat16_arrays_cross_the_pipe(worker):
    import ml_dtypes
    out, _ = hosted(worker, "raise", dtype="bfloat16")(Q, V, return_scores=False)
    local, _ = PlantedAdapter().build(SPEC, WEIGHTS, "bfloat16")(Q, V, return_scores=False)
    assert out.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(out, local)


def test_child_exception_comes_back_as_itself(worker):
    layer = hosted(worker, "raise")
    with pytest.raises(ValueError, match="planted failure: query length 7"):
        layer(TRAP_Q, V)
    check_works(layer)  # the worker survived


def test_bad_input_is_rejected_in_the_caller_with_the_shared_message(worker):
    layer = hosted(worker, "raise")
    local = PlantedAdapter().build(SPEC, WEIGHTS, "float64")
    bad = RNG.normal(size=(2, 5, 3))
    with pytest.raises(ValueError) as remote_err:
        layer(bad, V)
    with pytest.raises(ValueError) as local_err:
        local(bad, V)
    assert str(remote_err.value) == str(local_err.value)


def test_hanging_call_times_out_with_stderr_and_next_call_works(worker):
    layer = hosted(worker, "sleep", call_timeout=3.0)
    start = time.monotonic()
    with pytest.raises(_worker.WorkerTimeout) as err:
        layer(TRAP_Q, V)
    assert time.monotonic() - start < 30
    assert "timed out after 3 s" in str(err.value) and "springs its sleep trap" in err.value.stderr_tail
    assert not worker.alive
    check_works(layer)  # a fresh worker, the layer rebuilt from its recipe


@pytest.mark.parametrize("trap, how", [("exit", "exit status 3"), ("segfault", "signal 11")])
def test_dying_worker_gives_an_error_and_next_call_works(worker, trap, how):
    layer = hosted(worker, trap)
    generation = worker.generation
    with pytest.raises(_worker.WorkerCrashed) as err:
        layer(TRAP_Q, V)
    assert isinstance(err.value, RuntimeError) and how in str(err.value)
    assert f"springs its {trap} trap" in err.value.stderr_tail
    if trap == "segfault":
        assert "Segmentation fault" in err.value.stderr_tail  # faulthandler's report
    check_works(layer)
    assert worker.generation == generation + 1


def test_unknown_target_is_a_clear_error():
    with pytest.raises(ValueError, match="registered name or 'module:Class'"):
        registry.resolve("no_such_adapter")


# ---- a worker dies with the process that started it --------------------------------------------------------

ORPHAN_MAKER = """
import threading, time
from mhabench.impls import worker
w = worker.Worker(name="orphan test")
started = []
thread = threading.Thread(target=lambda: started.append(w.request(("ping",), 60)))
thread.start()
thread.join()  # the thread that started the worker has ended: the worker lives on
assert w.request(("ping",), 60) == started[0]
threading.Thread(target=w.run, args=("time:sleep", 600), kwargs={"timeout": 900}, daemon=True).start()
time.sleep(1)  # the worker is busy: it will not notice its pipe close
print(started[0], flush=True)
time.sleep(600)
"""


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # a zombie has died
    except FileNotFoundError:
        return True


def _wait_gone(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not _gone(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _gone(pid)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_worker_outlives_the_thread_that_started_it_but_not_its_process():
    import signal
    import subprocess
    parent = subprocess.Popen([sys.executable, "-c", ORPHAN_MAKER], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    child = int(parent.stdout.readline())
    assert not _gone(child)
    os.kill(parent.pid, signal.SIGKILL)
    parent.wait()
    assert _wait_gone(child), "the worker outlived its SIGKILLed parent"
