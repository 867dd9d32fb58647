"""Keras: ``keras.layers.GroupQueryAttention`` on each Keras backend, hosted as ``keras_mha`` hosts
MultiHeadAttention (same backend rules, worker processes, modes and dropout seeding).

* Heads: ``num_query_heads = num_heads``, ``num_key_value_heads = num_kv_heads`` (Keras repeats each
  key/value head over consecutive query heads, the canonical grouping). The weights are laid out for GQA: ``query`` kernel
  ``[Dq, H, head_dim]``, ``key``/``value`` kernels ``[D, H_kv, head_dim]`` (biases ``[H_kv, head_dim]``),
  ``attention_output`` kernel ``[H, head_dim, Dq]``: the canonical names map one to one.
* One ``head_dim`` serves queries, keys and values, and the output projection maps back to the
  query's width: no ``value_dim``, no ``output_shape``.
* The layer takes ``[batch, length, features]`` only (its einsum equations are fixed), so attended
  axes are flattened into the length and free axes into the batch (the shared helper), as for
  ``torch_mha``. After flattening, ``use_causal_mask`` (top-left, over axis 1) is always our causal.
* Mask: ``attention_mask`` (True = attend); a rank-3 call's mask goes as given (Keras inserts the head
  axis), a flattened call's as ``[N, T, S]`` or ``[N, H, T, S]``.
* Modern attention, as ``keras_mha`` maps it but over the flattened sequence: the window as the
  constructor's ``sliding_window=w`` (``|i - j| < w``: our ``(w - 1, w - 1)``, or ``(w - 1, any)`` with
  causal; one Keras layer per window met), key/value lengths as ``value_mask [N, S]`` (Keras has no
  lengths argument: recorded as emulated); bottom-right causal, per-sequence query positions, other
  windows and query lengths go into ``attention_mask`` (emulated). The layer takes no additive bias, no
  logit scale and no soft cap.
* Paths: without scores Keras calls ``ops.dot_product_attention`` (the backend's fused attention);
  with ``return_attention_scores=True`` or dropout, its own einsum and masked softmax.
"""
from __future__ import annotations

from . import _keras
from .base import Capabilities
from .validation import flatten, unflatten

UNSUPPORTED = {
    "value_dim": "GroupQueryAttention has one head_dim for queries, keys and values",
    "output_shape": "GroupQueryAttention's output projection maps back to the query's feature width",
    "multi_output": "GroupQueryAttention's output is [batch, length, query features]",
    "bias": "GroupQueryAttention.call takes no additive bias",
    "softcap": "GroupQueryAttention has no logit soft cap (keras.ops.dot_product_attention's attn_logits_soft_cap is "
               "never passed by the layer)",
    "scale": "GroupQueryAttention scales the query by 1/sqrt(head_dim) itself and takes no scale",
}
DENSE = {"q": "_query_dense", "k": "_key_dense", "v": "_value_dense", "o": "_output_dense"}


class KerasGQALayer(_keras.KerasAttentionLayer):
    flattens = True

    def _new_layer(self, rank, window=None):
        spec, (q_dim, k_dim, v_dim) = self.spec, self.dims
        layer = self.keras.layers.GroupQueryAttention(
            head_dim=spec.key_dim, num_query_heads=spec.num_heads, num_key_value_heads=spec.kv_heads,
            dropout=spec.dropout, use_bias=spec.use_bias, sliding_window=window, flash_attention=self.flash_attention,
            dtype=self.dtype, **_keras.NOT_DRAWN)
        layer.build((None, None, q_dim), (None, None, v_dim), (None, None, k_dim))
        return layer

    @staticmethod
    def _named_variables(layer) -> dict:
        return _keras.dense_variables(layer, DENSE)

    def _layer(self, rank, window=None):
        return super()._layer(3, window)  # every call is [N, L, D] once flattened

    def _native(self, call, requires_grad=False):
        t = lambda x: self.ops.tensor(flatten(call, x), self.dtype, requires_grad)
        mask, value_mask, native_causal, window = self._keras_mask(call)
        self._layer(3, window)
        return dict(query=t(call.query), value=t(call.value), key=t(call.key) if call.key_given else None,
                    mask=(self.ops.mask(mask), self.ops.mask(value_mask)), causal=native_causal, window=window,
                    call=call)

    def _as_layer_sees(self, call, x):
        return flatten(call, x)

    def _as_call_gives(self, call, x, like=None):
        if like is None:
            return unflatten(call, x).reshape(call.output_shape)
        return unflatten(call, x, like=getattr(call, like).shape)

    def _run(self, inputs, return_scores, training, seed=None):
        call, ops = inputs["call"], self.keras.ops
        out, scores = super()._run(inputs, return_scores, training, seed)
        return unflatten(call, out, ops), (None if scores is None else ops.reshape(scores, call.scores_shape))

    def _backward(self, inputs, cotangent):
        call, ops = inputs["call"], self.keras.ops
        grads = super()._backward(inputs, flatten(call, cotangent, ops))
        for name in ("query", "value", "key"):
            if grads.get(name) is not None:
                grads[name] = unflatten(call, grads[name], ops, like=getattr(call, name).shape)
        return grads


class KerasGQAAdapter(_keras.KerasAttentionAdapter):
    name = "keras_gqa"
    backend = "tensorflow"
    framework = "Keras (TensorFlow)"
    description = "keras.layers.GroupQueryAttention on the TensorFlow backend (num_key_value_heads = num_kv_heads)"
    layer_class = KerasGQALayer

    def capabilities(self):
        return Capabilities(devices=("cpu", "cuda"), modes=self.modes, unsupported_features=UNSUPPORTED,
                            supported_extensions=frozenset({"gqa", "causal_bottom_right", "window", "lengths",
                                                            "query_offset"}))


class KerasGQAJaxAdapter(KerasGQAAdapter):
    name = "keras_gqa@jax"
    backend = "jax"
    framework = "Keras (JAX)"
    description = "keras.layers.GroupQueryAttention on the JAX backend (num_key_value_heads = num_kv_heads)"


class KerasGQATorchAdapter(KerasGQAAdapter):
    name = "keras_gqa@torch"
    backend = "torch"
    framework = "Keras (PyTorch)"
    description = "keras.layers.GroupQueryAttention on the PyTorch backend (num_key_value_heads = num_kv_heads)"
