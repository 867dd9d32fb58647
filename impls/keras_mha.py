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
  bottom-right causal, per-sequence query positions (``query_offset``: Keras's
  causal mask is one top-left triangle), other windows, query lengths
  (``call(query_mask=...)`` is silently ignored: ``call`` overwrites it with
  the query's Keras mask). The layer has no argument for a logit scale or a
  soft cap (it multiplies the query by 1/sqrt(key_dim) itself; the soft cap
  of ``keras.ops.dot_product_attention``, ``attn_logits_soft_cap``, is never
  passed): both unsupported, as no mask can say them.
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

from ..schema import Refusal
from . import _keras
from .base import Capabilities

UNSUPPORTED_MODERN = {
    "gqa": "keras.layers.MultiHeadAttention projects key and value with num_heads heads; grouped-query attention "
           "is the separate keras.layers.GroupQueryAttention",
    "bias": "keras.layers.MultiHeadAttention.call takes no additive bias (keras.ops.dot_product_attention has one, "
            "which the layer never passes)",
    "softcap": "keras.layers.MultiHeadAttention has no logit soft cap (keras.ops.dot_product_attention's "
               "attn_logits_soft_cap is never passed by the layer)",
    "scale": "keras.layers.MultiHeadAttention scales the query by 1/sqrt(key_dim) itself and takes no scale",
}


def keras_axes(spec, rank: int) -> tuple[int, ...]:
    return spec.resolve_axes(rank)


class KerasMHALayer(_keras.KerasAttentionLayer):
    def _new_layer(self, rank: int, window: int | None = None):
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

    @staticmethod
    def _named_variables(layer) -> dict:
        named = {}
        for prefix, dense in (("q", layer.query_dense), ("k", layer.key_dense), ("v", layer.value_dense),
                              ("o", layer.output_dense)):
            named["W" + prefix] = dense.kernel
            if dense.bias is not None:
                named["b" + prefix] = dense.bias
        return named


class KerasMHAAdapter(_keras.KerasAttentionAdapter):
    name = "keras_mha"
    backend = "tensorflow"
    framework = "Keras (TensorFlow)"
    description = "keras.layers.MultiHeadAttention on the TensorFlow backend"
    layer_class = KerasMHALayer

    def capabilities(self):
        return Capabilities(devices=("cpu", "cuda"), modes=self.modes, unsupported_features=UNSUPPORTED_MODERN,
                            supported_extensions=frozenset({"causal_bottom_right", "window", "lengths",
                                                            "query_offset"}))


class KerasMHAJaxAdapter(KerasMHAAdapter):
    name = "keras_mha@jax"
    backend = "jax"
    framework = "Keras (JAX)"
    description = "keras.layers.MultiHeadAttention on the JAX backend"


class KerasMHATorchAdapter(KerasMHAAdapter):
    name = "keras_mha@torch"
    backend = "torch"
    framework = "Keras (PyTorch)"
    description = "keras.layers.MultiHeadAttention on the PyTorch backend"


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
            return Refusal.constraint("Keras's MultiHeadAttention raises 'Dropout is not supported when flash attention "
                                      "is enabled'")
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
