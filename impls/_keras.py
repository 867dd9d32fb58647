"""Keras backend plumbing for the Keras adapters: which backend runs here, tensors, sync, compile, grads.

Keras chooses its backend once per process, at import. Nothing here imports
Keras or a framework at module import; ``active_backend`` never imports Keras.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys

import numpy as np

from . import cache, memory
from .base import Adapter, to_numpy

BACKENDS = ("tensorflow", "jax", "torch")
# The adapters load the canonical weights into a layer right after building it, so what its initializers draw is
# thrown away; zeros cost nothing to draw, where glorot_uniform on JAX compiles a random program for every kernel
# shape (2-4 s each on a small CPU, more than the case's own program)
NOT_DRAWN = {"kernel_initializer": "zeros", "bias_initializer": "zeros"}
FRAMEWORK_MODULE = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


def active_backend() -> str:
    """The backend Keras runs (or will run, once imported) in this process."""
    keras = sys.modules.get("keras")
    if keras is not None and hasattr(keras, "backend"):
        return keras.backend.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    try:
        with open(os.path.join(home, "keras.json")) as f:
            return json.load(f).get("backend", "tensorflow")
    except (OSError, ValueError):
        return "tensorflow"


def device_name(device: str) -> str:
    """Our device string -> the name ``keras.device`` takes."""
    kind, _, index = device.partition(":")
    return f"gpu:{index or 0}" if kind == "cuda" else "cpu:0"


def placement(keras, device: str):
    """The device scope a Keras user would write: none on the CPU (Keras's default placement), a
    ``keras.device`` scope for a GPU. Not ``keras.device("cpu:0")``: on the torch backend, Keras 3.15 moves
    each new variable's Parameter with ``.to("cpu:0")``, which torch 2.13 answers with a copy that is no
    longer a Parameter, so a layer holding an integer variable (Dropout's seed state) fails to build."""
    import contextlib
    return contextlib.nullcontext() if device == "cpu" else keras.device(device_name(device))


def available_devices(backend: str) -> tuple[str, ...]:
    if backend == "tensorflow":
        import tensorflow as tf
        gpu = bool(tf.config.list_physical_devices("GPU"))
    elif backend == "jax":
        import jax
        try:
            gpu = bool(jax.devices("gpu"))
        except RuntimeError:
            gpu = False
    else:
        import torch
        gpu = torch.cuda.is_available()
    return ("cpu", "cuda") if gpu else ("cpu",)


class Ops:
    """What differs between backends: conversion, sync, compilation and gradients.

    ``fn(trainable, non_trainable, query, value, key, mask, static)`` is a
    stateless forward returning ``((output, scores), non_trainable)``.
    """

    def __init__(self, backend: str, device: str):
        import keras
        if keras.backend.backend() != backend:
            raise RuntimeError(f"Keras runs the {keras.backend.backend()} backend here, not {backend}")
        if backend == "jax":
            cache.enable_jax()
        self.keras, self.backend, self.device = keras, backend, device

    def tensor(self, x, dtype: str, requires_grad: bool = False):
        arr = to_numpy(x, dtype)
        if arr.dtype.name == "bfloat16":  # exact through float32; not every backend reads ml_dtypes
            arr = arr.astype(np.float32)
        with placement(self.keras, self.device):
            t = self.keras.ops.convert_to_tensor(np.ascontiguousarray(arr), dtype=dtype)
        if requires_grad and self.backend == "torch":
            t = t.detach().clone().requires_grad_(True)
        return t

    def mask(self, m):
        if m is None:
            return None
        with placement(self.keras, self.device):
            return self.keras.ops.convert_to_tensor(np.ascontiguousarray(m), dtype="bool")

    def numpy(self, t) -> np.ndarray:
        ops = self.keras.ops
        if t.dtype in ("bfloat16", "float16") or str(t.dtype).endswith(("bfloat16", "float16")):
            return ops.convert_to_numpy(ops.cast(t, "float32"))
        return ops.convert_to_numpy(t)

    def sync(self, t):
        """Wait until ``t`` (a tensor, or a dict or sequence of them) is computed on the device."""
        if self.backend == "jax":
            import jax
            jax.block_until_ready(t)
        elif self.backend == "torch":
            if self.device.startswith("cuda"):
                import torch
                torch.cuda.synchronize()
        else:  # TensorFlow has no public per-tensor wait: reading the value is the sync
            for x in (t.values() if isinstance(t, dict) else t if isinstance(t, (list, tuple)) else [t]):
                if x is not None:
                    x.numpy()
        return t

    def compile(self, fn, mode: str = "compiled"):
        """``fn`` traced ("graph": TensorFlow without XLA) or compiled (XLA, jax.jit, torch.compile)."""
        if self.backend == "tensorflow":
            import tensorflow as tf
            return tf.function(fn, jit_compile=mode == "compiled")
        if self.backend == "jax":
            import jax
            return jax.jit(fn, static_argnums=(6,))
        import torch
        return torch.compile(fn, dynamic=False)

    def value_and_grads(self, fn, trainable, non_trainable, query, value, key, mask, static, cotangent):
        """``(output, grads)``: grads of ``sum(output * cotangent)`` w.r.t. query, value, key (or None), trainable."""
        if self.backend == "tensorflow":
            import tensorflow as tf
            watched = [query, value] + ([key] if key is not None else []) + list(trainable)
            with tf.GradientTape() as tape:
                tape.watch(watched)
                (out, _), _ = fn(trainable, non_trainable, query, value, key, mask, static)
                loss = tf.reduce_sum(out * tf.cast(cotangent, out.dtype))
            grads = tape.gradient(loss, watched)
        elif self.backend == "jax":
            import jax
            import jax.numpy as jnp

            def loss(trainable, query, value, key):
                (out, _), _ = fn(trainable, non_trainable, query, value, key, mask, static)
                return jnp.sum(out * cotangent.astype(out.dtype)), out
            (_, out), g = jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True)(
                list(trainable), query, value, key)
            grads = [g[1], g[2]] + ([g[3]] if key is not None else []) + list(g[0])
        else:
            import torch
            trainable = [t.detach().clone().requires_grad_(True) for t in trainable]
            inputs = [query, value] + ([key] if key is not None else [])
            (out, _), _ = fn(trainable, non_trainable, query, value, key, mask, static)
            grads = torch.autograd.grad((out * cotangent.to(out.dtype)).sum(), inputs + trainable)
        n = 3 if key is not None else 2
        return out, grads[:n], grads[n:]


def dense_variables(layer, attributes: dict) -> dict:
    """Canonical name -> variable of a Keras attention layer whose projections are EinsumDense sublayers:
    ``attributes`` maps "q", "k", "v", "o" to the sublayer attribute; biases only where the layer has them."""
    named = {}
    for p, attr in attributes.items():
        dense = getattr(layer, attr)
        named["W" + p] = dense.kernel
        if dense.bias is not None:
            named["b" + p] = dense.bias
    return named


# TensorFlow keeps allocator statistics for the CPU (what tensorflow_peak_rise reads) only with its BFC allocator;
# without it reset_memory_stats("CPU:0") raises "Cannot reset memory stats for device 'CPU:0'"
TENSORFLOW_ENV = {"TF_CPU_ALLOCATOR_USE_BFC": "true"}


def tensorflow_peak_rise(fn, device: str = "cpu") -> int:
    """TensorFlow keeps freed tensor memory in its own allocator pool on CPU too, so a repeated
    call raises no RSS: its allocator's own peak counter is the measure, on CPU and GPU."""
    import tensorflow as tf
    name = "CPU:0" if device == "cpu" else "GPU:0"
    tf.config.experimental.reset_memory_stats(name)
    base = tf.config.experimental.get_memory_info(name)["current"]
    result = fn()
    peak = tf.config.experimental.get_memory_info(name)["peak"]
    del result
    return max(peak - base, 0)


# What a Keras adapter reports and how it is installed, per backend
DISTRIBUTIONS = {"tensorflow": ("keras", ("tensorflow", "tensorflow-cpu")), "jax": ("keras", "jax", "jaxlib"),
                 "torch": ("keras", "torch")}
INSTALL_HINTS = {"tensorflow": 'pip install "mhabench[tensorflow]"', "jax": 'pip install "mhabench[jax]" keras',
                 "torch": 'pip install torch==2.13.0 "mhabench[torch]" keras'}


class KerasAdapter(Adapter):
    """The facts every Keras adapter shares, from the backend its subclass sets."""

    backend = "tensorflow"

    @property
    def family(self):
        return self.backend

    @property
    def requires(self):
        return ("keras", FRAMEWORK_MODULE[self.backend])

    @property
    def distributions(self):
        return DISTRIBUTIONS[self.backend]

    @property
    def install_hint(self):
        return INSTALL_HINTS[self.backend]

    def availability(self):
        # keras is located, never imported: importing it would fix this process's backend.
        if self._available is None:
            if importlib.util.find_spec("keras") is None:
                self._available = (False, f"cannot import keras; install with: {self.install_hint}")
            else:
                module = FRAMEWORK_MODULE[self.backend]
                try:
                    importlib.import_module(module)
                    self._available = (True, "")
                except Exception as exc:
                    self._available = (False, f"cannot import {module} ({type(exc).__name__}: {exc}); "
                                              f"install with: {self.install_hint}")
        return self._available

    def in_process(self) -> bool:
        """Whether this process's Keras runs (or will run) this adapter's backend."""
        return active_backend() == self.backend

    def available_devices(self):
        return available_devices(self.backend)

    def worker_env(self) -> dict:
        env = {"KERAS_BACKEND": self.backend}
        if self.backend == "tensorflow":
            env.update(TENSORFLOW_ENV)
        return env

    def peak_memory(self, fn, device="cpu"):
        if self.backend == "tensorflow":
            return tensorflow_peak_rise(fn, device)
        if device.startswith("cuda"):
            from . import _jax, _torch
            return (_jax.gpu_peak_rise if self.backend == "jax" else _torch.cuda_peak_rise)(fn)
        return memory.cpu_peak_rise(fn)
