"""Keras: ``keras.layers.MultiHeadAttention``, the reference behaviour, on each Keras backend.

* Weights: the canonical layout is Keras's einsum layout; loaded with
  ``set_weights`` into a layer built with the requested dtype policy.
* Keras builds its einsum equations for one input rank, so one Keras layer is
  built per input rank met, all holding the same weights.
* ``attention_axes`` are passed resolved (positive, sorted) so the scores'
  layout is the canonical one.
* Mask: Keras's ``attention_mask`` has our polarity (True = attend), and the
  canonical reading of a mask is Keras's own: it is passed exactly as given.
* Causal: Keras's ``use_causal_mask`` builds a ``[T, S]`` triangle from axis 1
  of query and value. That is our causal mask when axis 1 is the single
  attended axis, and is used then; Keras offers nothing for causal over other
  axes, so there the adapter builds the causal triangle over the flattened
  attended positions into an explicit ``attention_mask`` (recorded on the row
  as emulated).
* Modern attention. Keras 3.15's layer has ``sliding_window=w`` (a
  constructor argument: ``|i - j| < w`` over axis 1, i.e. our window
  ``(w - 1, w - 1)``, or ``(w - 1, anything)`` with causal) and the padding
  masks ``value_mask``/``key_mask`` ``[B, S]``; where the call fits them they
  are used (one Keras layer per window met), and key/value lengths become
  ``value_mask`` (Keras has no lengths argument: emulated). Everything else
  Keras cannot say goes into ``attention_mask``, recorded as emulated:
  bottom-right causal, other windows, query lengths (``call(query_mask=...)``
  is silently ignored: ``call`` overwrites it with the query's Keras mask).
  Keras's layer takes no additive bias (``keras.ops.dot_product_attention``
  has one; the layer never passes it) and projects key and value with
  ``num_heads`` heads (grouped-query attention is the separate
  ``keras.layers.GroupQueryAttention``): both unsupported.
* The kernel: ``flash_attention=None`` (Keras decides; the default adapters),
  and the variants ``+flash`` (``flash_attention=True``) and ``+no_flash``
  (``False``) on the JAX and PyTorch backends. On a CPU Keras's flash path
  refuses on both (it needs cuDNN on a GPU, or a TPU, on JAX, and CUDA's flash
  check on PyTorch), and None means off; the TensorFlow backend has no flash
  attention at all.
* Keras picks its backend once per process: an adapter whose backend is not
  the one running here hosts its layer in a worker process (``impls.worker``).
"""
from __future__ import annotations

import numpy as np

from . import _keras, worker
from .base import Capabilities, Layer, UnsupportedError, kernel_refusals
from .validation import numpy_dtype
from .spec import Weights

WORKER_OPTIONS = ("build_timeout", "call_timeout")
UNSUPPORTED_MODERN = {
    "gqa": "keras.layers.MultiHeadAttention projects key and value with num_heads heads; grouped-query attention "
           "is the separate keras.layers.GroupQueryAttention",
    "bias": "keras.layers.MultiHeadAttention.call takes no additive bias (keras.ops.dot_product_attention has one, "
            "which the layer never passes)",
}
# torch.compile (what Keras's own jit_compile uses on torch) of the layer's stateless call spent over two
# minutes tracing Keras on CPU and then failed, so "compiled" is not offered on the torch backend.


def keras_axes(spec, rank: int) -> tuple[int, ...]:
    return spec.resolve_axes(rank)


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
    """Keras's own causal mask (a triangle over axis 1) is ours exactly when axis 1 is the only attended axis (or
    the layer sees the call ``flattened`` to one sequence axis) and the alignment is top-left (or T == S)."""
    return (flattened or call.attention_axes == (1,)) and call.diagonal_offset == 0


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


class KerasMHALayer(Layer):
    backend = "tensorflow"
    flattens = False  # whether the Keras layer sees every call flattened to [N, L, D] (GroupQueryAttention)

    def __init__(self, adapter, spec, weights, dtype, device, mode="eager", flash_attention=None,
                 build_timeout=None, call_timeout=None, **options):
        super().__init__(adapter, spec, weights, dtype, device, mode, **options)
        if flash_attention not in (None, True, False):
            raise TypeError(f"flash_attention must be None, True or False, got {flash_attention!r}")
        self.flash_attention = flash_attention
        self.ops = _keras.Ops(adapter.backend, device)
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
        keras, spec = self.keras, self.spec
        q_dim, k_dim, v_dim = self.dims
        layer = keras.layers.MultiHeadAttention(
            num_heads=spec.num_heads, key_dim=spec.key_dim, value_dim=spec.value_dim,
            dropout=spec.dropout, use_bias=spec.use_bias, output_shape=spec.output_shape,
            attention_axes=keras_axes(spec, rank), sliding_window=window, flash_attention=self.flash_attention,
            dtype=self.dtype, **_keras.NOT_DRAWN)
        free = (None,) * (rank - 1)
        layer.build(free + (q_dim,), free + (v_dim,), free + (k_dim,))
        return layer

    def _layer(self, rank: int, window: int | None = None):
        if (rank, window) not in self._layers:
            with _keras.placement(self.keras, self.device):
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
    def _named_variables(layer) -> dict:
        named = {}
        for prefix, dense in (("q", layer.query_dense), ("k", layer.key_dense), ("v", layer.value_dense),
                              ("o", layer.output_dense)):
            named["W" + prefix] = dense.kernel
            if dense.bias is not None:
                named["b" + prefix] = dense.bias
        return named

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
        causal = call.causal and not native_causal_ok(call, self.flattens)
        bottom_right = causal and call.causal_alignment == "bottom_right" and call.q_len != call.k_len
        used = (("causal", causal and not bottom_right), ("causal_bottom_right", bottom_right),
                ("window", call.window is not None and sliding_window(call, self.flattens) is None),
                ("lengths", call.query_lengths is not None or call.key_value_lengths is not None))
        return tuple(name for name, on in used if on)

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


class KerasMHAAdapter(_keras.KerasAdapter):
    name = "keras_mha"
    backend = "tensorflow"
    framework = "Keras (TensorFlow)"
    description = "keras.layers.MultiHeadAttention on the TensorFlow backend"
    layer_class = KerasMHALayer
    # the usual mode that runs fastest on CPU: a tf.function graph without XLA (what many Keras users on
    # TensorFlow run), faster here than XLA's compiled graph and than eager execution
    quick_mode = "graph"

    def capabilities(self):
        modes = ("eager", "graph", "compiled") if self.backend == "tensorflow" else ("eager", "compiled")
        return Capabilities(devices=("cpu", "cuda"), modes=modes, unsupported_features=UNSUPPORTED_MODERN,
                            supported_extensions=frozenset({"causal_bottom_right", "window", "lengths"}))

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


class KerasMHAJaxAdapter(KerasMHAAdapter):
    name = "keras_mha@jax"
    backend = "jax"
    # Keras on JAX compiles what users run (Model.fit, predict and evaluate jit_compile by default), and its
    # eager mode compiles every primitive on first use: conformance and the quick profile run it compiled,
    # one program per case (evaluate)
    default_mode = "compiled"
    quick_mode = "compiled"
    framework = "Keras (JAX)"
    description = "keras.layers.MultiHeadAttention on the JAX backend"

    def unsupported_reason(self, spec, weights, *, call=None, return_scores=False, gradients=False, **kwargs):
        reason = super().unsupported_reason(spec, weights, call=call, return_scores=return_scores,
                                            gradients=gradients, **kwargs)
        # Keras takes its fused path for 3-D inputs when no scores are asked for (gradients included)
        fused = gradients or (call is not None and not return_scores)
        if reason is None and fused and (call is None or call.rank == 3) \
                and spec.value_dim is not None and spec.value_dim != spec.key_dim:
            return ("value_dim different from key_dim on Keras's fused path: Keras 3.15's jax backend "
                    "dot_product_attention reshapes the values with key_dim and raises TypeError "
                    "(cannot reshape array ...); the call with return_attention_scores=True works")
        if reason is None:  # the fused path is jax.nn.dot_product_attention, which XLA:CPU cannot jit in float16
            from ._jax import float16_jit_reason
            reason = float16_jit_reason(kwargs.get("dtype", "float32"), kwargs.get("device", "cpu"),
                                        kwargs.get("mode", "eager"))
        return reason



class KerasMHATorchAdapter(KerasMHAAdapter):
    name = "keras_mha@torch"
    backend = "torch"
    quick_mode = None  # eager, its only mode
    framework = "Keras (PyTorch)"
    description = "keras.layers.MultiHeadAttention on the PyTorch backend"

    def capabilities(self):
        return Capabilities(devices=("cpu", "cuda"), modes=("eager",), unsupported_features=UNSUPPORTED_MODERN,
                            supported_extensions=frozenset({"causal_bottom_right", "window", "lengths"}))


# ---- the kernel: Keras's flash_attention forced on or off, where the backend has one -------------------------
FLASH_KERNELS = {"flash": True, "no_flash": False}
FLASH_OFF_CUDA = {
    "jax": "Keras's flash_attention=True on the JAX backend needs cuDNN flash attention on an NVIDIA GPU of compute "
           "capability 8.0 or newer, or a TPU (keras/src/backend/jax/nn.py, _can_use_flash_attention), and raises "
           "elsewhere",
    "torch": "Keras's flash_attention=True on the PyTorch backend asks torch.backends.cuda.can_use_flash_attention, "
             "which is False off CUDA, and raises 'Flash attention is not supported with the provided inputs' (though "
             "PyTorch's CPU build has a flash kernel: torch_sdpa+flash runs it)",
}


class KerasFlashKernel:
    """A Keras adapter with ``flash_attention`` forced on ("flash") or off ("no_flash"); mixed in before the
    backend's adapter class."""

    def _build(self, spec, weights, dtype, device, mode, **options):
        options.setdefault("flash_attention", FLASH_KERNELS[self.kernel])
        return super()._build(spec, weights, dtype, device, mode, **options)

    def capabilities(self):
        caps = super().capabilities()
        if self.kernel != "flash":
            return caps
        return Capabilities(unsupported_features=caps.unsupported_features, devices=("cuda",), modes=caps.modes,
                            supported_extensions=caps.supported_extensions, devices_reason=FLASH_OFF_CUDA[self.backend])

    def unsupported_reason(self, spec, weights, **kwargs):
        if self.kernel == "flash" and spec.dropout > 0:
            return "Keras's MultiHeadAttention raises 'Dropout is not supported when flash attention is enabled'"
        return super().unsupported_reason(spec, weights, **kwargs)


class KerasMHAJaxFlashAdapter(KerasFlashKernel, KerasMHAJaxAdapter):
    name = "keras_mha@jax+flash"
    kernel = "flash"
    description = "keras.layers.MultiHeadAttention(flash_attention=True) on the JAX backend"


class KerasMHAJaxNoFlashAdapter(KerasFlashKernel, KerasMHAJaxAdapter):
    name = "keras_mha@jax+no_flash"
    kernel = "no_flash"
    description = "keras.layers.MultiHeadAttention(flash_attention=False) on the JAX backend (jax.nn.dot_product_attention, XLA)"


class KerasMHATorchFlashAdapter(KerasFlashKernel, KerasMHATorchAdapter):
    name = "keras_mha@torch+flash"
    kernel = "flash"
    description = "keras.layers.MultiHeadAttention(flash_attention=True) on the PyTorch backend"


class KerasMHATorchNoFlashAdapter(KerasFlashKernel, KerasMHATorchAdapter):
    name = "keras_mha@torch+no_flash"
    kernel = "no_flash"
    description = "keras.layers.MultiHeadAttention(flash_attention=False) on the PyTorch backend (SDPA's own choice)"
