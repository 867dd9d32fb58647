"""Helpers shared by the JAX adapters (jax is imported inside each function, never at import).

float64 needs JAX's x64 switch. It is turned on only around this package's own
work, through ``jax.enable_x64(True)`` used as a context manager: the setting
is thread-local and restored on exit, so other JAX code in the process keeps
its own default (float32 unless the user enabled x64 globally). Everything a
float64 layer does (building its parameters, converting inputs, tracing and
running its jitted functions) happens inside that scope; a jitted function is
cached per x64 setting, so the scope is entered on every call.
"""
from __future__ import annotations

import contextlib
from typing import NamedTuple

import numpy as np

from ..schema import Refusal
from . import cache, memory, validation
from .base import Adapter, Layer
from .spec import Weights
from .validation import Call, numpy_dtype


# XLA reads its CPU code generation flags (--xla_cpu_max_isa, --xla_cpu_enable_fast_math, ...) from XLA_FLAGS
KERNEL_ENV = ("XLA_FLAGS",)


def kernel_facts() -> dict:
    """XLA's CPU target as this process sets it: the --xla_cpu_* flags of XLA_FLAGS (none: the CPU's own ISA)."""
    import os
    import jax
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if f.startswith("--xla_cpu")]
    return {"xla_cpu_flags": " ".join(flags) or None, "jax_backend": jax.default_backend()}


def available_devices() -> tuple[str, ...]:
    import jax
    try:
        gpus = jax.devices("gpu")
    except RuntimeError:  # no GPU backend in this jaxlib
        gpus = []
    return ("cpu", "cuda") if gpus else ("cpu",)


def jax_device(device: str):
    """"cpu", "cuda" or "cuda:N" -> the jax Device."""
    import jax
    kind, _, index = device.partition(":")
    devices = jax.devices("gpu" if kind == "cuda" else "cpu")
    i = int(index or 0)
    if i >= len(devices):
        raise ValueError(f"device={device!r}: JAX sees {len(devices)} {kind} device(s)")
    return devices[i]


def precision_scope(dtype: str):
    """The x64 switch for float64 layers (thread-local, undone on exit); nothing for other dtypes."""
    if dtype != "float64":
        return contextlib.nullcontext()
    import jax
    if hasattr(jax, "enable_x64"):  # jax >= 0.8
        return jax.enable_x64(True)
    from jax.experimental import enable_x64  # older releases: the same thread-local switch
    return enable_x64(True)


def float16_jit_reason(dtype: str, device: str, mode: str) -> Refusal | None:
    """jax.nn.dot_product_attention cannot be compiled in float16 for the CPU (it can run eagerly)."""
    if dtype == "float16" and mode == "compiled" and device.split(":")[0] == "cpu":
        return Refusal.dtype(dtype, "jax.nn.dot_product_attention asks for the F16_F16_F32 dot algorithm, which "
                                    "XLA:CPU rejects; its fallback (a try/except around the einsum) only works "
                                    "outside jit. Use mode='eager' for float16 on CPU")
    return None


def jnp_dtype(dtype: str):
    import jax.numpy as jnp
    return jnp.dtype(numpy_dtype(dtype))  # bfloat16 is ml_dtypes' type in both


def array(x, dtype: str, device):
    """NumPy -> a jax array of ``dtype`` committed to ``device`` (call inside ``precision_scope``)."""
    import jax
    return jax.device_put(np.asarray(x).astype(numpy_dtype(dtype)), device)


def mask_array(allowed, device):
    import jax
    return None if allowed is None else jax.device_put(np.ascontiguousarray(allowed), device)


def to_numpy_dtype(x, dtype: str) -> np.ndarray:
    """A result in the layer's dtype, as ``Layer.__call__`` returns it."""
    return np.asarray(x).astype(numpy_dtype(dtype))


def to_numpy(x) -> np.ndarray:
    import jax
    return np.asarray(jax.device_get(x))


class Layout(NamedTuple):
    """What the jitted functions need to know about a call, hashable (a static argument): enough of a
    Call for ``validation.flatten``/``unflatten``."""

    batch_axes: tuple[int, ...]
    attention_axes: tuple[int, ...]
    rank: int


def layout(call: Call) -> Layout:
    return Layout(call.batch_axes, call.attention_axes, call.rank)


def flatten(x, layout: Layout):
    """``[B, *A, D]`` -> ``[prod(batch axes), prod(attended axes), D]``."""
    import jax.numpy as jnp
    return validation.flatten(layout, x, jnp)


def unflatten_query(o, query_shape: tuple[int, ...], layout: Layout):
    """``[N, T, F...]`` back to ``[B, *Q, F...]`` for the query's layout."""
    import jax.numpy as jnp
    return validation.unflatten(layout, o, jnp, like=query_shape)


def block(tree):
    """Wait for every array in ``tree`` (the device sync that ends a timed call)."""
    import jax
    return jax.block_until_ready(tree)


def program_bytes(jitted, *args, **kwargs) -> int | None:
    """XLA's figure for one call of ``jitted`` on these arguments: its temporaries plus its output
    (``jax.stages.Compiled.memory_analysis()``, the compiler's buffer assignment; the arguments and the
    outputs aliased to them are not counted). None where the backend reports no analysis."""
    try:
        stats = jitted.lower(*args, **kwargs).compile().memory_analysis()
    except NotImplementedError:
        return None
    if stats is None:
        return None
    return int(stats.temp_size_in_bytes + stats.output_size_in_bytes)


def gpu_peak_rise(fn) -> int:
    """JAX's peak counter never resets: a call below an earlier peak reports 0, so run this first."""
    import jax
    device = jax.devices("gpu")[0]
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" not in stats:
        raise memory.MemoryProbeUnavailable("jax memory_stats() has no peak_bytes_in_use "
                                            "(XLA_PYTHON_CLIENT_ALLOCATOR=platform?)")
    base = stats["bytes_in_use"]
    result = fn()
    peak = device.memory_stats()["peak_bytes_in_use"]
    del result
    return max(peak - base, 0)


class JaxAdapter(Adapter):
    """The facts every JAX adapter shares."""

    family = "jax"
    requires = ("jax",)
    distributions = ("jax", "jaxlib")
    install_hint = 'pip install "mhabench[jax]"'
    default_mode = "compiled"  # jax.jit is how JAX code runs; eager dispatch compiles every op on its own

    def available_devices(self):
        return available_devices()

    def kernel_environment(self):
        return KERNEL_ENV

    def kernel_facts(self):
        return kernel_facts()

    def peak_memory(self, fn, device="cpu"):
        return gpu_peak_rise(fn) if device.startswith("cuda") else memory.cpu_peak_rise(fn)

    def unsupported_reason(self, spec, weights, *, dtype="float32", device="cpu", mode="eager", **kwargs):
        return (super().unsupported_reason(spec, weights, dtype=dtype, device=device, mode=mode, **kwargs)
                or float16_jit_reason(dtype, device, mode))


class Flags(NamedTuple):
    """The static part of a call the jitted functions specialise on: causal through the framework's own
    ``is_causal`` (top-left), the window as the framework's ``local_window_size`` (or None), and the logit scale
    (None: the framework's default 1/sqrt(head_dim))."""

    causal: bool
    window: tuple[int, int] | None = None
    scale: float | None = None


class JaxLayer(Layer):
    """What the JAX layers share: inputs, gradients, weight export and the device sync.

    A subclass sets ``self.params`` (a pytree) and implements ``_apply(params, query, value, key, extras,
    layout, flags)``, a pure function of jax arrays (``key`` None means the value serves as key; ``extras``
    is a dict of arrays or None: ``mask`` ``[N|1, 1|H, T|1, S|1]``, ``bias`` as ``Call.flat_bias`` gives it,
    ``query_lengths``/``key_value_lengths`` ``[N]``; ``layout`` and ``flags`` (:class:`Flags`) are static),
    and ``_canonical(tree)``, which names a params-shaped tree (the weights or their gradients)
    canonically. What the framework takes natively is the subclass's choice: ``_extras`` and ``_flags``.
    """

    def __init__(self, adapter, spec, weights, dtype, device, mode="eager", **options):
        super().__init__(adapter, spec, weights, dtype, device, mode, **options)
        import jax
        cache.enable_jax()
        self.jax = jax
        self.jax_device = jax_device(device)
        self._apply_fn = self._compile(self._apply)
        self._vjp_fn = self._compile(self._vjp)
        self._all_fn = self.jax.jit(self._all, static_argnames=("layout", "flags", "scores", "gradients")) \
            if self.mode == "compiled" else self._all

    def _compile(self, fn):
        """``jax.jit`` in compiled mode; the plain function (op-by-op dispatch) in eager mode."""
        return self.jax.jit(fn, static_argnames=("layout", "flags")) if self.mode == "compiled" else fn

    def _apply(self, params, query, value, key, extras, layout, flags):
        raise NotImplementedError

    def _canonical(self, tree) -> dict:
        raise NotImplementedError

    def _with_scores(self, params, query, value, key, extras, scores_allowed, layout, flags):
        """(output, scores) of the call that returns the scores (a pure function of jax arrays)."""
        raise NotImplementedError

    def _all(self, params, query, value, key, extras, scores_allowed, cotangent, layout, flags, scores, gradients):
        """The default output, the with-scores output and scores, and the VJP: one program per case."""
        result = {"output": self._apply(params, query, value, key, extras, layout, flags)}
        if scores:
            result["output_with_scores"], result["scores"] = self._with_scores(
                params, query, value, key, extras, scores_allowed, layout, flags)
        if gradients:
            result["vjp"] = self._vjp(params, query, value, key, extras, cotangent, layout, flags)
        return result

    def _scores_allowed(self, call):
        """The may-attend mask the with-scores call forms its weights with (everything, by default)."""
        return mask_array(call.flat_allowed(), self.jax_device)

    def evaluate(self, query, value, key=None, mask=None, causal=False, *, cotangent=None, scores=True, **features):
        call = self._validated(query, value, key, mask, causal, features, return_scores=scores,
                               gradients=cotangent is not None)
        inputs = self._native(call)
        with precision_scope(self.dtype):
            ct = None if cotangent is None else array(cotangent, self.dtype, self.jax_device)
            scores_allowed = self._scores_allowed(call) if scores else None
            found = self._all_fn(self.params, inputs["query"], inputs["value"], inputs["key"], inputs["extras"],
                                 scores_allowed, ct, layout=inputs["layout"], flags=inputs["flags"], scores=scores,
                                 gradients=cotangent is not None)
            result = {"output": self._to_numpy(found["output"])}
            if scores:
                result["output_with_scores"] = self._to_numpy(found["output_with_scores"])
                result["scores"] = self._to_numpy(found["scores"]).reshape(call.scores_shape)
            if cotangent is not None:
                grads = {k: self._to_numpy(v) for k, v in self._named_gradients(found["vjp"]).items()}
                result["gradients"] = {k: np.asarray(v).astype(np.float64)
                                       for k, v in self._finish_gradients(call, grads).items()}
        for name in ("output", "output_with_scores", "scores"):
            if name in result:
                result[name] = to_numpy_dtype(result[name], self.dtype)
        return result

    def _vjp(self, params, query, value, key, extras, cotangent, layout, flags):
        """The pullback of the output at ``cotangent``: gradients of the params, query, value, key (None when the
        value serves as key) and the bias (None without one)."""
        def f(p, q, v, k, b):
            return self._apply(p, q, v, k, {**extras, "bias": b}, layout, flags)
        _, pullback = self.jax.vjp(f, params, query, value, key, extras.get("bias"))
        return pullback(cotangent)

    def _named_gradients(self, vjp) -> dict:
        g_params, g_query, g_value, g_key, g_bias = vjp
        grads = {"query": g_query, "value": g_value, **self._canonical(g_params)}
        for name, g in (("key", g_key), ("bias", g_bias)):
            if g is not None:
                grads[name] = g
        return grads

    def _mask(self, call):
        """The mask as a JAX user passes it: ``[N or 1, H or 1, T or 1, S or 1]``, broadcast by the framework;
        causal goes through its own ``is_causal``, which it combines with the mask."""
        return mask_array(call.flat_mask(), self.jax_device)

    def _flags(self, call) -> Flags:
        return Flags(causal=call.causal)

    def _extras(self, call) -> dict:
        """The arrays beside query, key and value that the framework takes (call inside ``precision_scope``)."""
        return {"mask": self._mask(call)}

    def _native(self, call, requires_grad=False):
        with precision_scope(self.dtype):
            a = lambda x: array(x, self.dtype, self.jax_device)
            return {"query": a(call.query), "value": a(call.value), "key": a(call.key) if call.key_given else None,
                    "extras": self._extras(call), "layout": layout(call), "flags": self._flags(call), "call": call}

    def _native_array(self, x):
        with precision_scope(self.dtype):
            return array(x, self.dtype, self.jax_device)

    def _output(self, inputs):
        with precision_scope(self.dtype):
            return self._apply_fn(self.params, inputs["query"], inputs["value"], inputs["key"], inputs["extras"],
                                  layout=inputs["layout"], flags=inputs["flags"])

    def _backward(self, inputs, cotangent):
        with precision_scope(self.dtype):
            return self._named_gradients(self._vjp_fn(self.params, inputs["query"], inputs["value"], inputs["key"],
                                                      inputs["extras"], cotangent, layout=inputs["layout"],
                                                      flags=inputs["flags"]))

    def _to_numpy(self, x):
        return to_numpy(x)

    def _sync(self, x):
        return block(x)

    def native_program_bytes(self, inputs, backward=False):
        if self.mode != "compiled":
            return None
        x = inputs["inputs"]
        with precision_scope(self.dtype):
            if backward:
                return program_bytes(self._vjp_fn, self.params, x["query"], x["value"], x["key"], x["extras"],
                                     inputs["cotangent"], layout=x["layout"], flags=x["flags"])
            return program_bytes(self._apply_fn, self.params, x["query"], x["value"], x["key"], x["extras"],
                                 layout=x["layout"], flags=x["flags"])

    def export_weights(self) -> Weights:
        with precision_scope(self.dtype):
            return Weights(**{k: to_numpy(v).astype(np.float64) for k, v in self._canonical(self.params).items()})
