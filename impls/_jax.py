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
import math

import numpy as np

from .base import Layer
from .spec import Weights
from .validation import Call, flatten_perm, inverse_perm, numpy_dtype


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


def to_numpy(x) -> np.ndarray:
    import jax
    return np.asarray(jax.device_get(x))


def layout(call: Call) -> tuple[tuple[int, ...], int]:
    """What the jitted functions need to know about a call, hashable: (flatten permutation, batch axes)."""
    return flatten_perm(call), call.n_batch


def flatten(x, perm: tuple[int, ...], n_batch: int):
    """``[B, *A, D]`` -> ``[prod(batch axes), prod(attended axes), D]``."""
    x = x.transpose(perm)
    return x.reshape(math.prod(x.shape[:n_batch]), math.prod(x.shape[n_batch:-1]), x.shape[-1])


def unflatten_query(o, query_shape: tuple[int, ...], perm: tuple[int, ...]):
    """``[N, T, F...]`` back to ``[B, *Q, F...]`` for the query's layout."""
    axes = perm[:-1]
    extra = o.ndim - 2
    o = o.reshape(tuple(query_shape[a] for a in axes) + tuple(o.shape[2:]))
    inv = inverse_perm(axes)
    return o.transpose(inv + tuple(range(len(inv), len(inv) + extra)))


def block(tree):
    """Wait for every array in ``tree`` (the device sync that ends a timed call)."""
    import jax
    return jax.block_until_ready(tree)


class JaxLayer(Layer):
    """What the JAX layers share: inputs, gradients, weight export and the native benchmark path.

    A subclass sets ``self.params`` (a pytree) and implements ``_output(params, query, value, key,
    allowed, layout, causal)``, a pure function of jax arrays (``key`` None means the value serves as
    key; ``allowed`` is ``[N, 1|H, T, S]`` or None; ``layout`` and ``causal`` are static), and
    ``_canonical(tree)``, which names a params-shaped tree (the weights or their gradients) canonically.
    """

    def __init__(self, adapter, spec, weights, dtype, device, mode="eager", **options):
        super().__init__(adapter, spec, weights, dtype, device, mode, **options)
        import jax
        self.jax = jax
        self.jax_device = jax_device(device)
        self._output_fn = self._compile(self._output)
        self._vjp_fn = self._compile(self._vjp)
        self._loss_grad_fns = {}

    def _compile(self, fn):
        """``jax.jit`` in compiled mode; the plain function (op-by-op dispatch) in eager mode."""
        return self.jax.jit(fn, static_argnames=("layout", "causal")) if self.mode == "compiled" else fn

    def _output(self, params, query, value, key, allowed, layout, causal):
        raise NotImplementedError

    def _canonical(self, tree) -> dict:
        raise NotImplementedError

    def _vjp(self, params, query, value, key, allowed, cotangent, layout, causal):
        f = lambda p, q, v, k: self._output(p, q, v, k, allowed, layout, causal)
        _, pullback = self.jax.vjp(f, params, query, value, key)
        return pullback(cotangent)

    def _inputs(self, call):
        a = lambda x: array(x, self.dtype, self.jax_device)
        return a(call.query), a(call.value), (a(call.key) if call.key_given else None)

    def _mask(self, call):
        """The mask for the call, causal folded in; None when there is none (causal alone goes through
        the framework's own ``is_causal``, see ``_causal``)."""
        return mask_array(call.flat_allowed() if call.mask is not None else None, self.jax_device)

    @staticmethod
    def _causal(call) -> bool:
        return call.causal and call.mask is None

    def _gradients(self, call, cotangent):
        with precision_scope(self.dtype):
            query, value, key = self._inputs(call)
            ct = array(cotangent, self.dtype, self.jax_device)
            g_params, g_query, g_value, g_key = self._vjp_fn(self.params, query, value, key, self._mask(call), ct,
                                                             layout=layout(call), causal=self._causal(call))
            grads = {"query": g_query, "value": g_value, **self._canonical(g_params)}
            if call.key_given:
                grads["key"] = g_key
            return {k: to_numpy(v) for k, v in grads.items()}

    def export_weights(self) -> Weights:
        with precision_scope(self.dtype):
            return Weights(**{k: to_numpy(v).astype(np.float64) for k, v in self._canonical(self.params).items()})

    # ---- native path (conversion done once, in native_inputs) -----------------
    def native_inputs(self, query, value, key=None, mask=None, causal=False, *, requires_grad=False):
        call = self.validate(query, value, key, mask, causal)
        with precision_scope(self.dtype):
            query, value, key = self._inputs(call)
            return dict(query=query, value=value, key=key, allowed=self._mask(call), layout=layout(call),
                        causal=self._causal(call), requires_grad=bool(requires_grad))

    def native_forward(self, inputs):
        with precision_scope(self.dtype):
            return block(self._output_fn(self.params, inputs["query"], inputs["value"], inputs["key"],
                                         inputs["allowed"], layout=inputs["layout"], causal=inputs["causal"]))

    def _loss_grad(self, requires_grad: bool):
        """value_and_grad of sum(output): w.r.t. the weights, and the inputs when ``requires_grad``."""
        if requires_grad not in self._loss_grad_fns:
            loss = lambda params, query, value, key, allowed, layout, causal: self._output(
                params, query, value, key, allowed, layout, causal).sum()
            argnums = (0, 1, 2, 3) if requires_grad else 0
            self._loss_grad_fns[requires_grad] = self._compile(self.jax.value_and_grad(loss, argnums=argnums))
        return self._loss_grad_fns[requires_grad]

    def native_forward_backward(self, inputs):
        fn = self._loss_grad(inputs["requires_grad"])
        with precision_scope(self.dtype):
            return block(fn(self.params, inputs["query"], inputs["value"], inputs["key"], inputs["allowed"],
                            layout=inputs["layout"], causal=inputs["causal"]))
