"""The ONNX Runtime family: what every adapter that runs an ONNX graph in onnxruntime shares.

onnx and onnxruntime are imported lazily, on first use. ``OrtAdapter`` declares the family's facts
(distributions, install hint, the one mode, the execution provider); ``OrtLayer`` holds the sessions
a layer builds (one per graph structure it meets) and the NumPy plumbing: ORT takes and returns
NumPy arrays and runs synchronously, so conversion is a cast and the device sync is nothing.
"""
from __future__ import annotations

import hashlib
import os
import threading

import numpy as np

from . import cache, memory
from .base import Adapter, Capabilities, Layer, to_numpy

PROVIDER = "CPUExecutionProvider"
ELEMENT_TYPES = {"float16": "FLOAT16", "bfloat16": "BFLOAT16", "float32": "FLOAT", "float64": "DOUBLE"}


def element_type(dtype: str) -> int:
    """The ONNX TensorProto element type of a dtype name."""
    import onnx
    return getattr(onnx.TensorProto, ELEMENT_TYPES[dtype])


def _options():
    import onnxruntime as ort
    options = ort.SessionOptions()
    # errors only: onnx 1.23's shape inference gives Attention's qk_matmul_output a last dimension of 0 when the
    # key length is symbolic, and ORT would warn about it on every run (the values are right)
    options.log_severity_level = 3
    return options


def machine_key() -> str:
    """What an optimised model depends on besides itself: ORT's version and the CPU it was optimised for
    (ORT_ENABLE_ALL may lay tensors out for this CPU's vector width)."""
    import platform
    import onnxruntime as ort
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return f"onnxruntime {ort.__version__} {PROVIDER} {platform.machine()} {cpu}"


def session(model):
    """An inference session on the CPU provider for ``model`` (a ModelProto, or its serialized bytes).

    ORT optimises a graph when the session is created. The optimised model is kept in the cache's ``onnx/``
    folder (``SessionOptions.optimized_model_filepath``), keyed by the model and :func:`machine_key`; a later
    session of the same model, in any process, loads it with the optimisations already applied (ORT's
    offline mode) and runs the same graph."""
    import onnxruntime as ort
    data = model if isinstance(model, bytes) else model.SerializeToString()
    folder = cache.folder("onnx")
    if folder is None:
        return ort.InferenceSession(data, _options(), providers=[PROVIDER])
    digest = hashlib.sha256(machine_key().encode() + b"\0" + data).hexdigest()[:32]
    optimised = folder / f"ort-optimised-{digest}.onnx"
    if optimised.is_file():
        options = _options()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        try:
            return ort.InferenceSession(str(optimised), options, providers=[PROVIDER])
        except Exception:  # unreadable (a write cut short): optimise again below
            pass
    options = _options()
    partial = optimised.with_name(f".{optimised.name}.{os.getpid()}.{threading.get_ident()}")
    options.optimized_model_filepath = str(partial)
    created = ort.InferenceSession(data, options, providers=[PROVIDER])
    try:
        os.replace(partial, optimised)
    except OSError:  # an unwritable cache costs the next process the optimisation, never a result
        pass
    return created


_measuring = threading.local()


def run(session, feeds: dict) -> list:
    """``session.run`` on ``feeds``; while a peak is measured, each run hands its arena's free memory back."""
    options = None
    if getattr(_measuring, "on", False):
        import onnxruntime as ort
        options = ort.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return session.run(None, feeds, options)


def arena_peak_rise(fn) -> int:
    """ORT keeps freed memory in its CPU arena, so a repeated call raises no RSS. While measuring, every run
    shrinks the arena afterwards (run option ``memory.enable_memory_arena_shrinkage``): one call empties what
    earlier calls left, and the measured call's allocations then show as new pages."""
    _measuring.on = True
    try:
        fn()
        return memory.cpu_peak_rise(fn)
    finally:
        _measuring.on = False


class OrtAdapter(Adapter):
    """The facts every ONNX Runtime adapter shares. ``opset`` is the ONNX opset of the graphs it runs."""
    empty_keys_refused = ("onnxruntime's CPU kernels reject the zero-length axis ([ONNXRuntimeError] FAIL in the "
                          "Reshape or Attention node, ReshapeHelper)")

    family = "onnxruntime"
    requires = ("onnxruntime", "onnx")
    distributions = ("onnxruntime", "onnx")
    install_hint = 'pip install "mhabench[onnx]"'
    # An InferenceSession optimises the whole graph when it is created and then only runs it
    default_mode = "compiled"
    supported_extensions: frozenset = frozenset()  # the opt-in features of modern attention the graph expresses

    def version(self) -> str:
        return f"{super().version()}; ONNX opset {self.opset} on {PROVIDER}"

    def kernel_facts(self):
        """The provider running the graphs (their opset is the row's own ``opset``). ORT's CPU kernels (MLAS) pick
        their ISA from the CPU alone, with no switch to set, so the machine's ISA set in the run's facts is what
        decides them."""
        return {"ort_provider": PROVIDER}

    def capabilities(self) -> Capabilities:
        return Capabilities(unsupported_features=self.unsupported_features(), unsupported_dtypes=self.unsupported_dtypes(),
                            modes=("compiled",), supported_extensions=self.supported_extensions)

    def memory_source(self, device="cpu"):
        return "VmHWM rise, the ORT arena shrunk after each run"

    def peak_memory(self, fn, device="cpu"):
        return arena_peak_rise(fn)

    def unsupported_features(self) -> dict:
        return {"gradients": "onnxruntime runs inference graphs only (gradients need onnxruntime-training)"}

    def unsupported_dtypes(self) -> dict:
        return {}


class OrtLayer(Layer):
    """A layer whose calls run ONNX graphs in onnxruntime, one session per graph structure met."""

    def __init__(self, adapter, spec, weights, dtype, device, mode="compiled", **options):
        super().__init__(adapter, spec, weights, dtype, device, mode, **options)
        self.np_dtype = to_numpy(np.zeros(()), dtype).dtype
        self._sessions: dict = {}

    def _run_graph(self, key, make_model, feeds: dict) -> list:
        """Run the graph of structure ``key`` (its session built from ``make_model()`` on first use) on ``feeds``."""
        if key not in self._sessions:
            self._sessions[key] = session(make_model())
        return run(self._sessions[key], feeds)

    def _array(self, x):
        return np.ascontiguousarray(to_numpy(x, self.dtype))

    def _native_array(self, x):
        return self._array(x)

    def _to_numpy(self, x):
        return np.asarray(x)
