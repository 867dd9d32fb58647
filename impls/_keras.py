"""What the Keras adapters share: the backend plumbing (which backend runs here, tensors, sync, compile, grads)
and the mapping of Keras's own attention layers (``KerasAttentionLayer``, ``KerasAttentionAdapter``), which
``keras_mha`` (MultiHeadAttention) and ``keras_gqa`` (GroupQueryAttention) each complete with their layer.

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

from ..schema import Refusal
from . import cache, memory, worker
from .base import Adapter, Layer, UnsupportedError, emulated, kernel_refusals, to_numpy
from .facts import ONEDNN_ISA_CAP, Switch
from .spec import Weights
from .validation import numpy_dtype

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


# TensorFlow's oneDNN kernels: on by default under Linux only on CPUs with AVX512_VNNI, AVX512_BF16, AVX_VNNI or
# AMX (DefaultOneDnnPolicy, tensorflow/core/util/port.cc); TF_ENABLE_ONEDNN_OPTS overrides that either way, read
# once per process when TensorFlow first asks (IsMklEnabled).
ONEDNN = Switch(
    name="tf_onednn", variable="TF_ENABLE_ONEDNN_OPTS", settings={"on": "1", "off": "0"},
    fact="tf_onednn", expect={"on": True, "off": False},
    description="TensorFlow's oneDNN kernels on or off (its default follows the CPU)")
TENSORFLOW_KERNEL_ENV = ("TF_ENABLE_ONEDNN_OPTS", "TF_DISABLE_MKL", *ONEDNN_ISA_CAP)


def tensorflow_facts() -> dict:
    """TensorFlow's kernel choice in this process, as TensorFlow reports it (``IsMklEnabled``: whether its
    oneDNN kernels are on, after TF_ENABLE_ONEDNN_OPTS and the CPU)."""
    import tensorflow  # noqa: F401  (loads the library the query lives in)
    from tensorflow.python.util import _pywrap_util_port
    return {"tf_onednn": bool(_pywrap_util_port.IsMklEnabled())}


TENSORFLOW_SOURCE = "TensorFlow allocator peak"


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

    def switches(self):
        from . import _torch
        return {"tensorflow": (ONEDNN,), "torch": (_torch.CPU_CAPABILITY,)}.get(self.backend, ())

    def kernel_environment(self):
        from . import _jax
        extra = {"tensorflow": TENSORFLOW_KERNEL_ENV, "jax": _jax.KERNEL_ENV}.get(self.backend, ())
        return tuple(dict.fromkeys((*super().kernel_environment(), *extra)))

    def kernel_facts(self):
        """The backend's facts, from the process that runs this adapter's layers (a worker where this process's
        Keras runs another backend)."""
        if not self.in_process():
            return worker.shared_worker(self.worker_env()).run("mhabench.impls.facts:adapter_facts", self.name)
        from . import _jax, _torch
        facts = {"tensorflow": tensorflow_facts, "jax": _jax.kernel_facts, "torch": _torch.kernel_facts}[self.backend]()
        return {"keras_backend": self.backend, **facts}

    def available_devices(self):
        return available_devices(self.backend)

    def worker_env(self) -> dict:
        env = {"KERAS_BACKEND": self.backend}
        if self.backend == "tensorflow":
            env.update(TENSORFLOW_ENV)
        return env

    def memory_source(self, device="cpu"):
        return TENSORFLOW_SOURCE if self.backend == "tensorflow" else super().memory_source(device)

    def peak_memory(self, fn, device="cpu"):
        if self.backend == "tensorflow":
            return tensorflow_peak_rise(fn, device)
        if device.startswith("cuda"):
            from . import _jax, _torch
            return (_jax.gpu_peak_rise if self.backend == "jax" else _torch.cuda_peak_rise)(fn)
        return memory.cpu_peak_rise(fn)


def default_rank(spec) -> int | None:
    """The smallest input rank the spec's attention_axes fit (used to build the layer up front).

    None when they fit none (repeated axes, say): the shared validation then
    rejects every call with the same message as any other adapter's.
    """
    for rank in range(3, 12):
        try:
            spec.resolve_axes(rank)
            return rank
        except ValueError:
            continue
    return None


def native_causal_ok(call, flattened: bool = False) -> bool:
    """Keras's own causal mask (a triangle over axis 1) and sliding window (around its diagonal) are ours exactly
    when axis 1 is the only attended axis (or the layer sees the call ``flattened`` to one sequence axis) and the
    diagonal is top-left for every sequence (bottom-right with T == S, or query offsets of 0)."""
    return (flattened or call.attention_axes == (1,)) and not np.any(call.diagonal_offsets)


def sliding_window(call, flattened: bool = False) -> int | None:
    """Keras's ``sliding_window=w`` (``|i - j| < w`` over axis 1) that is the call's window, or None when it is not
    one (the window is then built into the attention mask)."""
    if call.window is None or not native_causal_ok(call, flattened):
        return None
    left, right = call.window
    if left is None:
        return None
    if call.causal or left == right:  # causal cuts the right side at the diagonal
        return left + 1
    return None


def native_value_mask(call, flattened: bool = False) -> bool:
    """Key/value lengths as Keras's ``value_mask [B, S]``: one attended axis, axis 1, and no other (or the call
    flattened to ``[N, L, D]``, the lengths repeated over the free axes)."""
    return call.key_value_lengths is not None and (flattened or call.rank == 3)


class KerasAttentionLayer(Layer):
    """A Keras attention layer (MultiHeadAttention, GroupQueryAttention) as its users call it, on any backend:
    the canonical weights loaded into one Keras layer per input rank and sliding window met, the call
    translated (mask, causal, window, lengths), the default call and the one with scores, gradients through
    the backend, one jitted program per case on JAX. A subclass says which Keras layer (``_new_layer``) and
    where its weights live (``_named_variables``)."""

    flattens = False  # whether the Keras layer sees every call flattened to [N, L, D] (GroupQueryAttention)

    def __init__(self, adapter, spec, weights, dtype, device, mode="eager", flash_attention=None,
                 build_timeout=None, call_timeout=None, **options):
        super().__init__(adapter, spec, weights, dtype, device, mode, **options)
        if flash_attention not in (None, True, False):
            raise TypeError(f"flash_attention must be None, True or False, got {flash_attention!r}")
        self.flash_attention = flash_attention
        self.ops = Ops(adapter.backend, device)
        self.keras = self.ops.keras
        self.weights = weights
        # (rank, sliding_window) -> (keras layer, named variables, forward fn), and the one-program evaluate
        self._layers: dict[tuple[int, int | None], tuple] = {}
        self._programs: dict[tuple[int, int | None], object] = {}  # (JAX, compiled mode)
        if default_rank(spec) is not None:
            self._layer(default_rank(spec))

    # ---- one Keras layer per input rank and sliding window -------------------
    def _new_layer(self, rank: int, window: int | None = None):
        """The Keras layer for inputs of ``rank`` and ``sliding_window=window``, built (its weights not yet
        loaded)."""
        raise NotImplementedError

    @staticmethod
    def _named_variables(layer) -> dict:
        """Canonical weight name -> the Keras layer's variable."""
        raise NotImplementedError

    def _layer(self, rank: int, window: int | None = None):
        if (rank, window) not in self._layers:
            with placement(self.keras, self.device):
                layer = self._new_layer(rank, window)
            named = self._named_variables(layer)
            by_id = {id(v): n for n, v in named.items()}
            arrays = self.weights.as_dict()
            if set(by_id.values()) != set(arrays) or len(layer.weights) != len(arrays):
                raise RuntimeError(f"{self.adapter.name}: Keras layer has weights {[v.path for v in layer.weights]}; "
                                   f"expected {sorted(arrays)}")
            layer.set_weights([arrays[by_id[id(v)]].astype(np.float64) for v in layer.weights])
            self._layers[(rank, window)] = (layer, named, self._forward_fn(layer))
        return self._layers[(rank, window)]

    @staticmethod
    def _stateless(layer):
        def forward(trainable, non_trainable, query, value, key, masks, static):
            causal, return_scores, training = static
            attention_mask, value_mask = masks
            result, non_trainable = layer.stateless_call(
                trainable, non_trainable, query, value, key=key, attention_mask=attention_mask, value_mask=value_mask,
                use_causal_mask=causal, return_attention_scores=return_scores, training=training)
            return (result if return_scores else (result, None)), non_trainable
        return forward

    def _forward_fn(self, layer):
        forward = self._stateless(layer)
        return forward if self.mode == "eager" else self.ops.compile(forward, self.mode)

    def evaluate(self, query, value, key=None, mask=None, causal=False, *, cotangent=None, scores=True,
                 **features):
        """On JAX in compiled mode, one jitted program per case computes the default output, the with-scores
        output and scores, and the gradients (as the JAX layers do); elsewhere one call per path."""
        if self.ops.backend != "jax" or self.mode != "compiled":
            return super().evaluate(query, value, key, mask, causal, cotangent=cotangent, scores=scores, **features)
        from .validation import check_cotangent
        call = self._validated(query, value, key, mask, causal, features, return_scores=scores,
                               gradients=cotangent is not None)
        inputs = self._native(call)
        program_key = (call.rank, inputs["window"])  # a Keras layer per sliding window: a program per layer
        layer, named, _ = self._layer(*program_key)
        trainable, non_trainable = self._state(layer)
        ct = None if cotangent is None else self.ops.tensor(self._as_layer_sees(call, check_cotangent(call, cotangent)),
                                                            self.dtype)
        if program_key not in self._programs:
            self._programs[program_key] = self._one_program(layer)
        found = self._programs[program_key](trainable, non_trainable, inputs["query"], inputs["value"], inputs["key"],
                                            inputs["mask"], ct, causal=inputs["causal"], scores=scores)
        as_array = lambda x: np.asarray(self.ops.numpy(x)).astype(numpy_dtype(self.dtype))
        result = {"output": self._as_call_gives(call, as_array(found["output"]))}
        if scores:
            result["output_with_scores"] = self._as_call_gives(call, as_array(found["output_with_scores"]))
            result["scores"] = as_array(found["scores"]).reshape(call.scores_shape)
        if ct is not None:
            g_trainable, g_query, g_value, g_key = found["grads"]
            names = {id(v): n for n, v in named.items()}
            grads = {"query": g_query, "value": g_value, **({"key": g_key} if call.key_given else {})}
            grads.update({names[id(v)]: g for v, g in zip(layer.trainable_variables, g_trainable)})
            result["gradients"] = {k: np.asarray(self.ops.numpy(v)).astype(np.float64) for k, v in grads.items()}
            for name in ("query", "value", "key"):
                if name in result["gradients"]:
                    result["gradients"][name] = self._as_call_gives(call, result["gradients"][name], name)
        return result

    def _as_layer_sees(self, call, x):
        """An array shaped like the output (the cotangent) as the Keras layer's output is shaped."""
        return x

    def _as_call_gives(self, call, x, like: str | None = None):
        """A program result shaped as the layer's output (or the gradient of input ``like``) as the call's."""
        return x

    def _one_program(self, layer):
        import jax
        import jax.numpy as jnp
        forward = self._stateless(layer)

        def program(trainable, non_trainable, query, value, key, mask, cotangent, causal, scores):
            result = {"output": forward(trainable, non_trainable, query, value, key, mask, (causal, False, False))[0][0]}
            if scores:
                (out, weights), _ = forward(trainable, non_trainable, query, value, key, mask, (causal, True, False))
                result.update(output_with_scores=out, scores=weights)
            if cotangent is not None:
                def loss(trainable, query, value, key):
                    out = forward(trainable, non_trainable, query, value, key, mask, (causal, False, False))[0][0]
                    return jnp.sum(out * cotangent.astype(out.dtype))
                result["grads"] = jax.grad(loss, argnums=(0, 1, 2, 3))(list(trainable), query, value, key)
            return result
        return jax.jit(program, static_argnames=("causal", "scores"))

    # ---- translating a call ---------------------------------------------------
    def validate(self, query, value, key=None, mask=None, causal=False, *, return_scores=False, training=False,
                 gradients=False, **features):
        call = super().validate(query, value, key, mask, causal, return_scores=return_scores, training=training,
                                gradients=gradients, **features)
        if self.flash_attention:
            if return_scores:
                raise UnsupportedError(self.adapter.name, "this call",
                                       "Keras refuses return_attention_scores with flash_attention=True")
            if len(call.attention_axes) > 1:
                raise UnsupportedError(self.adapter.name, "this call",
                                       "Keras's flash path takes one attended axis only (4-D projected inputs)")
        return call

    def _keras_mask(self, call):
        """(attention_mask or None, value_mask or None, use_causal_mask, sliding_window): what Keras takes of the
        call, the rest built into the attention mask."""
        causal = call.causal and native_causal_ok(call, self.flattens)
        window = sliding_window(call, self.flattens)
        value_mask = None
        if native_value_mask(call, self.flattens):  # [N, S]: sequence n's first key_value_lengths keys
            value_mask = np.arange(call.k_len)[None, :] < call.flat_lengths()[1][:, None]
        built = dict(causal=call.causal and not causal, window=call.window is not None and window is None,
                     lengths="query" if value_mask is not None else True)
        if not self.flattens and call.allowed_block(mask=False, bias=False, **built) is None:
            return call.given_mask, value_mask, causal, window  # nothing to build: the mask as given
        if self.flattens and call.rank > 3:  # [N, T, S] or [N, H, T, S] over the flattened call
            block = call.allowed_block(bias=False, **built)  # [N|1, H|1, T|1, S|1]
            if block is None:
                return None, value_mask, causal, window
            allowed = np.broadcast_to(block, (call.n_flat, block.shape[1], call.q_len, call.k_len))
            return (allowed[:, 0] if allowed.shape[1] == 1 else allowed), value_mask, causal, window
        allowed = call.allowed(bias=False, **built)  # over the flattened attended positions, scores' rank
        if allowed is None:
            return None, value_mask, causal, window
        if allowed.shape[call.n_batch] == 1:
            allowed = np.squeeze(allowed, axis=call.n_batch)  # Keras inserts the head axis itself
        return allowed, value_mask, causal, window

    def emulations(self, call):
        return emulated(call, causal=not native_causal_ok(call, self.flattens),
                        window=sliding_window(call, self.flattens) is None, lengths=True)

    def _native(self, call, requires_grad=False):
        t = lambda x: self.ops.tensor(x, self.dtype, requires_grad)
        mask, value_mask, native_causal, window = self._keras_mask(call)
        self._layer(call.rank, window)
        return dict(query=t(call.query), value=t(call.value), key=t(call.key) if call.key_given else None,
                    mask=(self.ops.mask(mask), self.ops.mask(value_mask)), causal=native_causal, window=window,
                    call=call)

    def _state(self, layer, seed=None):
        if seed is not None and self.spec.dropout > 0:
            layer._dropout_layer.seed_generator.state.assign(np.array([int(seed), 0]))
        return ([v.value for v in layer.trainable_variables], [v.value for v in layer.non_trainable_variables])

    def _run(self, inputs, return_scores, training, seed=None):
        layer, _, fn = self._layer(inputs["call"].rank, inputs["window"])
        trainable, non_trainable = self._state(layer, seed)
        (out, scores), new_state = fn(trainable, non_trainable, inputs["query"], inputs["value"], inputs["key"],
                                      inputs["mask"], (inputs["causal"], return_scores, training))
        if training:  # advance the dropout RNG as a stateful call would
            for var, val in zip(layer.non_trainable_variables, new_state):
                var.assign(val)
        return out, scores

    def _output(self, inputs):
        return self._run(inputs, False, False)[0]

    def native_program_bytes(self, inputs, backward=False):
        """XLA's figure for the jitted forward on JAX in compiled mode (the backward's gradients are taken
        outside one program, so it has none)."""
        if self.ops.backend != "jax" or self.mode != "compiled" or backward:
            return None
        from ._jax import program_bytes
        x = inputs["inputs"]
        layer, _, fn = self._layer(x["call"].rank, x["window"])
        trainable, non_trainable = self._state(layer)
        return program_bytes(fn, trainable, non_trainable, x["query"], x["value"], x["key"], x["mask"],
                             (x["causal"], False, False))

    def _forward(self, call, return_scores, training, seed):
        with kernel_refusals(self.adapter.name, self.flash_attention is True, "Keras's flash_attention=True"):
            return super()._forward(call, return_scores, training, seed)

    def _gradients(self, call, cotangent):
        with kernel_refusals(self.adapter.name, self.flash_attention is True, "Keras's flash_attention=True"):
            return super()._gradients(call, cotangent)

    def _native_array(self, x):
        return self.ops.tensor(x, self.dtype)

    def _backward(self, inputs, cotangent):
        layer, named, fn = self._layer(inputs["call"].rank, inputs["window"])
        trainable, non_trainable = self._state(layer)
        _, input_grads, weight_grads = self.ops.value_and_grads(
            fn, trainable, non_trainable, inputs["query"], inputs["value"], inputs["key"], inputs["mask"],
            (inputs["causal"], False, False), cotangent)
        names = {id(v): n for n, v in named.items()}
        grads = dict(zip(("query", "value", "key"), input_grads))
        grads.update({names[id(v)]: g for v, g in zip(layer.trainable_variables, weight_grads)})
        return grads

    def _to_numpy(self, x):
        return self.ops.numpy(x)

    def _sync(self, x):
        return self.ops.sync(x)

    def export_weights(self) -> Weights:
        if not self._layers:  # no rank fits the axes: the weights were never loaded, so they are unchanged
            return self.weights
        _, named, _ = next(iter(self._layers.values()))
        return Weights(**{n: self.ops.numpy(v.value).astype(np.float64) for n, v in named.items()})

# ---- Keras's own attention layers (MultiHeadAttention, GroupQueryAttention) -------------------------------
WORKER_OPTIONS = ("build_timeout", "call_timeout")
# Per backend, the modes a Keras attention layer runs in, the one a user runs by default and the one the quick
# benchmark profile runs. TensorFlow: a tf.function graph without XLA is what many Keras users on TensorFlow run
# and the fastest here. JAX: Keras compiles what users run (Model.fit, predict and evaluate jit_compile by
# default), and its eager mode compiles every primitive on first use, so conformance runs it compiled, one
# program per case (``KerasAttentionLayer.evaluate``). PyTorch: torch.compile of the layer's stateless call
# (what Keras's own jit_compile uses on torch) spent over two minutes tracing Keras on CPU and then failed, so
# "compiled" is not offered.
LAYER_MODES = {
    "tensorflow": {"modes": ("eager", "graph", "compiled"), "default": "eager", "quick": "graph"},
    "jax": {"modes": ("eager", "compiled"), "default": "compiled", "quick": "compiled"},
    "torch": {"modes": ("eager",), "default": "eager", "quick": None},
}


class KerasAttentionAdapter(KerasAdapter):
    """An adapter of one of Keras's attention layers on the backend its subclass sets: the layer hosted in a
    worker process where this process's Keras runs another backend, the modes of that backend, and what the
    backend's fused path refuses."""

    @property
    def default_mode(self):
        return LAYER_MODES[self.backend]["default"]

    @property
    def quick_mode(self):
        return LAYER_MODES[self.backend]["quick"]

    @property
    def modes(self) -> tuple[str, ...]:
        return LAYER_MODES[self.backend]["modes"]

    def unsupported_reason(self, spec, weights, *, call=None, return_scores=False, gradients=False, **kwargs):
        reason = super().unsupported_reason(spec, weights, call=call, return_scores=return_scores,
                                            gradients=gradients, **kwargs)
        if reason is not None or self.backend != "jax":
            return reason
        # Keras takes its fused path for 3-D inputs when no scores are asked for (gradients included)
        fused = gradients or (call is not None and not return_scores)
        if fused and (call is None or call.rank == 3) and spec.value_dim is not None and spec.value_dim != spec.key_dim:
            return Refusal.feature("value_dim", "on Keras's fused path, Keras 3.15's jax backend dot_product_attention "
                                                "reshapes the values with key_dim and raises TypeError (cannot reshape "
                                                "array ...); the call with return_attention_scores=True works")
        # the fused path is jax.nn.dot_product_attention, which XLA:CPU cannot jit in float16
        from ._jax import float16_jit_reason
        return float16_jit_reason(kwargs.get("dtype", "float32"), kwargs.get("device", "cpu"),
                                  kwargs.get("mode", "eager"))

    def _build(self, spec, weights, dtype, device, mode, **options):
        flash = options.get("flash_attention")
        if flash not in (None, True, False):
            raise TypeError(f"flash_attention must be None, True or False, got {flash!r}")
        if flash is True and self.backend == "tensorflow":
            raise UnsupportedError(self.name, "flash_attention=True",
                                   "Keras's TensorFlow backend raises 'Flash attention is not supported'")
        if self.in_process():
            return self.layer_class(self, spec, weights, dtype, device, mode, **options)
        timeouts = {k: options.pop(k) for k in WORKER_OPTIONS if options.get(k) is not None}
        return worker.host(self.name, spec, weights, dtype, device, mode, adapter=self,
                           env=self.worker_env(), **timeouts, **options)
