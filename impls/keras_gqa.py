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
* Paths: without scores Keras calls ``ops.dot_product_attention`` (the backend's fused attention);
  with ``return_attention_scores=True`` or dropout, its own einsum and masked softmax.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from . import _keras, keras_mha
from .validation import flatten, unflatten

UNSUPPORTED = {
    "value_dim": "GroupQueryAttention has one head_dim for queries, keys and values",
    "output_shape": "GroupQueryAttention's output projection maps back to the query's feature width",
    "multi_output": "GroupQueryAttention's output is [batch, length, query features]",
    "bias": "GroupQueryAttention.call takes no additive bias",
    # GroupQueryAttention has sliding_window and value_mask too; this adapter passes the mask, causal and
    # num_key_value_heads only, so these are refused rather than run through the wrong argument
    "causal_bottom_right": "keras_gqa passes use_causal_mask (top-left) only; bottom-right causal is not wired",
    "window": "keras_gqa does not pass GroupQueryAttention's sliding_window yet",
    "lengths": "keras_gqa does not pass query / key-value lengths as masks yet",
}
DENSE = {"q": "_query_dense", "k": "_key_dense", "v": "_value_dense", "o": "_output_dense"}


class KerasGQALayer(keras_mha.KerasMHALayer):
    def _new_layer(self, rank, window=None):
        spec, (q_dim, k_dim, v_dim) = self.spec, self.dims
        layer = self.keras.layers.GroupQueryAttention(
            head_dim=spec.key_dim, num_query_heads=spec.num_heads, num_key_value_heads=spec.kv_heads,
            dropout=spec.dropout, use_bias=spec.use_bias, flash_attention=self.flash_attention, dtype=self.dtype)
        layer.build((None, None, q_dim), (None, None, v_dim), (None, None, k_dim))
        return layer

    @staticmethod
    def _named_variables(layer) -> dict:
        return _keras.dense_variables(layer, DENSE)

    def _layer(self, rank, window=None):
        return super()._layer(3)  # every call is [N, L, D] once flattened

    def _native(self, call, requires_grad=False):
        t = lambda x: self.ops.tensor(flatten(call, x), self.dtype, requires_grad)
        mask = call.mask
        if mask is not None and call.rank > 3:
            mask = dataclasses.replace(call, causal=False).flat_allowed()  # [N, 1|H, T, S]
        if mask is not None and mask.shape[-3] == 1:
            mask = np.squeeze(mask, axis=-3)  # Keras inserts the head axis itself
        self._layer(3)
        return dict(query=t(call.query), value=t(call.value), key=t(call.key) if call.key_given else None,
                    mask=(self.ops.mask(mask), None), causal=call.causal, window=None, call=call)

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


class KerasGQAAdapter(keras_mha.KerasMHAAdapter):
    name = "keras_gqa"
    backend = "tensorflow"
    framework = "Keras (TensorFlow)"
    description = "keras.layers.GroupQueryAttention on the TensorFlow backend (num_key_value_heads = num_kv_heads)"
    layer_class = KerasGQALayer

    def capabilities(self):
        caps = super().capabilities()
        inherited = {k: v for k, v in caps.unsupported_features.items() if k != "gqa"}  # MHA's reason: use GQA
        return dataclasses.replace(caps, unsupported_features={**inherited, **UNSUPPORTED},
                                   supported_extensions=frozenset({"gqa"}))


class KerasGQAJaxAdapter(KerasGQAAdapter, keras_mha.KerasMHAJaxAdapter):
    name = "keras_gqa@jax"
    backend = "jax"
    framework = "Keras (JAX)"
    description = "keras.layers.GroupQueryAttention on the JAX backend (num_key_value_heads = num_kv_heads)"


class KerasGQATorchAdapter(KerasGQAAdapter, keras_mha.KerasMHATorchAdapter):
    name = "keras_gqa@torch"
    backend = "torch"
    framework = "Keras (PyTorch)"
    description = "keras.layers.GroupQueryAttention on the PyTorch backend (num_key_value_heads = num_kv_heads)"
