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
    import jax
    return jax.enable_x64(True) if dtype == "float64" else contextlib.nullcontext()


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
