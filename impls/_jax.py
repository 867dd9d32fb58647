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

from . import cache, memory, validation
from .base import Adapter, Layer
from .spec import Weights
from .validation import Call, numpy_dtype


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


def float16_jit_reason(dtype: str, device: str, mode: str) -> str | None:
    """jax.nn.dot_product_attention cannot be compiled in float16 for the CPU (it can run eagerly)."""
    if dtype == "float16" and mode == "compiled" and device.split(":")[0] == "cpu":
        return ("jax.nn.dot_product_attention asks for the F16_F16_F32 dot algorithm, which XLA:CPU rejects; its "
                "fallback (a try/except around the einsum) only works outside jit. Use mode='eager' for float16 on CPU")
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

    def peak_memory(self, fn, device="cpu"):
        return gpu_peak_rise(fn) if device.startswith("cuda") else memory.cpu_peak_rise(fn)

    def unsupported_reason(self, spec, weights, *, dtype="float32", device="cpu", mode="eager", **kwargs):
        return (super().unsupported_reason(spec, weights, dtype=dtype, device=device, mode=mode, **kwargs)
                or float16_jit_reason(dtype, device, mode))


class JaxLayer(Layer):
    """What the JAX layers share: inputs, gradients, weight export and the device sync.

    A subclass sets ``self.params`` (a pytree) and implements ``_apply(params, query, value, key,
    allowed, layout, causal)``, a pure function of jax arrays (``key`` None means the value serves as
    key; ``allowed`` is ``[N, 1|H, T, S]`` or None; ``layout`` and ``causal`` are static), and
    ``_canonical(tree)``, which names a params-shaped tree (the weights or their gradients) canonically.
    """

    def __init__(self, adapter, spec, weights, dtype, device, mode="eager", **options):
        super().__init__(adapter, spec, weights, dtype, device, mode, **options)
        import jax
        cache.enable_jax()
        self.jax = jax
        self.jax_device = jax_device(device)
        self._apply_fn = self._compile(self._apply)
        self._vjp_fn = self._compile(self._vjp)
        self._all_fn = self.jax.jit(self._all, static_argnames=("layout", "causal", "scores", "gradients")) \
            if self.mode == "compiled" else self._all

    def _compile(self, fn):
        """``jax.jit`` in compiled mode; the plain function (op-by-op dispatch) in eager mode."""
        return self.jax.jit(fn, static_argnames=("layout", "causal")) if self.mode == "compiled" else fn

    def _apply(self, params, query, value, key, allowed, layout, causal):
        raise NotImplementedError

    def _canonical(self, tree) -> dict:
        raise NotImplementedError

    def _with_scores(self, params, query, value, key, allowed, scores_allowed, layout, causal):
        """(output, scores) of the call that returns the scores (a pure function of jax arrays)."""
        raise NotImplementedError

    def _all(self, params, query, value, key, allowed, scores_allowed, cotangent, layout, causal, scores, gradients):
        """The default output, the with-scores output and scores, and the VJP: one program per case."""
        result = {"output": self._apply(params, query, value, key, allowed, layout, causal)}
        if scores:
            result["output_with_scores"], result["scores"] = self._with_scores(
                params, query, value, key, allowed, scores_allowed, layout, causal)
        if gradients:
            result["vjp"] = self._vjp(params, query, value, key, allowed, cotangent, layout, causal)
        return result

    def evaluate(self, query, value, key=None, mask=None, causal=False, *, cotangent=None, scores=True, window=None,
                 bias=None, query_lengths=None, key_value_lengths=None):
        call = self._validated(query, value, key, mask, causal, dict(
            window=window, bias=bias, query_lengths=query_lengths, key_value_lengths=key_value_lengths),
            return_scores=scores, gradients=cotangent is not None)
        inputs = self._native(call)
        with precision_scope(self.dtype):
            ct = None if cotangent is None else array(cotangent, self.dtype, self.jax_device)
            scores_allowed = mask_array(call.flat_allowed(), self.jax_device) if scores else None
            found = self._all_fn(self.params, inputs["query"], inputs["value"], inputs["key"], inputs["allowed"],
                                 scores_allowed, ct, layout=inputs["layout"], causal=inputs["causal"], scores=scores,
                                 gradients=cotangent is not None)
            result = {"output": self._to_numpy(found["output"])}
            if scores:
                result["output_with_scores"] = self._to_numpy(found["output_with_scores"])
                result["scores"] = self._to_numpy(found["scores"]).reshape(call.scores_shape)
            if cotangent is not None:
                g_params, g_query, g_value, g_key = found["vjp"]
                grads = {"query": g_query, "value": g_value, **self._canonical(g_params)}
                if g_key is not None:
                    grads["key"] = g_key
                result["gradients"] = {k: self._to_numpy(v).astype(np.float64) for k, v in grads.items()}
        for name in ("output", "output_with_scores", "scores"):
            if name in result:
                result[name] = to_numpy_dtype(result[name], self.dtype)
        return result

    def _vjp(self, params, query, value, key, allowed, cotangent, layout, causal):
        f = lambda p, q, v, k: self._apply(p, q, v, k, allowed, layout, causal)
        _, pullback = self.jax.vjp(f, params, query, value, key)
        return pullback(cotangent)

    def _mask(self, call):
        """The mask as a JAX user passes it: ``[N or 1, H or 1, T or 1, S or 1]``, broadcast by the framework;
        causal goes through its own ``is_causal``, which it combines with the mask."""
        return mask_array(call.flat_mask(), self.jax_device)

    def _native(self, call, requires_grad=False):
        with precision_scope(self.dtype):
            a = lambda x: array(x, self.dtype, self.jax_device)
            return {"query": a(call.query), "value": a(call.value), "key": a(call.key) if call.key_given else None,
                    "allowed": self._mask(call), "layout": layout(call), "causal": call.causal,
                    "call": call}

    def _native_array(self, x):
        with precision_scope(self.dtype):
            return array(x, self.dtype, self.jax_device)

    def _output(self, inputs):
        with precision_scope(self.dtype):
            return self._apply_fn(self.params, inputs["query"], inputs["value"], inputs["key"], inputs["allowed"],
                                  layout=inputs["layout"], causal=inputs["causal"])

    def _backward(self, inputs, cotangent):
        with precision_scope(self.dtype):
            g_params, g_query, g_value, g_key = self._vjp_fn(
                self.params, inputs["query"], inputs["value"], inputs["key"], inputs["allowed"], cotangent,
                layout=inputs["layout"], causal=inputs["causal"])
            grads = {"query": g_query, "value": g_value, **self._canonical(g_params)}
            if g_key is not None:
                grads["key"] = g_key
            return grads

    def _to_numpy(self, x):
        return to_numpy(x)

    def _sync(self, x):
        return block(x)

    def export_weights(self) -> Weights:
        with precision_scope(self.dtype):
            return Weights(**{k: to_numpy(v).astype(np.float64) for k, v in self._canonical(self.params).items()})
