"""Legacy Keras 2: ``tf_keras.layers.MultiHeadAttention`` on TensorFlow, as TensorFlow codebases that pin
Keras 2 run it.

How it is imported: ``import tf_keras``, never ``TF_USE_LEGACY_KERAS=1``. That variable only redirects
``tf.keras`` (``import keras`` stays Keras 3), and only if it is set before anything in the process first
touches ``tf.keras``: set later, ``tf.keras`` stays Keras 3 silently. ``import tf_keras`` names the
package itself, so it works whatever ran before, even next to Keras 3 on another backend in one
process: this adapter needs no worker process of its own.

The layer is Keras 2's own: one explicit softmax path (no fused or flash path), so the default call
and the call with scores compute alike. Conventions as ``keras_mha``: the canonical weight layout is
the layer's einsum layout; one layer per input rank met (its einsum equations are built for one
rank); ``attention_mask`` as given (True = attend, Keras inserts the head axis itself);
``use_causal_mask`` where the only attended axis is axis 1, else the causal triangle is folded into
the mask. Modes: "eager" calls the layer; "compiled" wraps the call in ``tf.function`` without XLA,
what Keras 2's ``Model.predict`` and ``fit`` run by default.
"""
from __future__ import annotations

import numpy as np

from . import _keras
from .base import Adapter, Capabilities, Layer
from .spec import Weights

DENSE = {"q": "_query_dense", "k": "_key_dense", "v": "_value_dense", "o": "_output_dense"}


class TfKerasMHALayer(Layer):
    def __init__(self, adapter, spec, weights, dtype, device, mode="eager", **options):
        super().__init__(adapter, spec, weights, dtype, device, mode, **options)
        import tensorflow as tf
        import tf_keras
        self.tf, self.tf_keras, self.weights = tf, tf_keras, weights
        self.tf_device = "/GPU:0" if device.startswith("cuda") else "/CPU:0"
        # rank -> (layer, canonical name -> variable, call, gradient function), built at the first call of each
        # rank, after the shared validation: building runs the layer once, and with TensorFlow's oneDNN kernels
        # on, its Softmax refuses the scores of more than 5 dimensions that a spec's widest rank can have
        # (AbortedError 'Input dims must be <= 5'), which must not pre-empt the validation's message
        self._layers: dict = {}

    def _layer(self, rank: int):
        if rank not in self._layers:
            spec, tf = self.spec, self.tf
            q_dim, k_dim, v_dim = self.dims
            with tf.device(self.tf_device):
                layer = self.tf_keras.layers.MultiHeadAttention(
                    num_heads=spec.num_heads, key_dim=spec.key_dim, value_dim=spec.value_dim, dropout=spec.dropout,
                    use_bias=spec.use_bias, output_shape=spec.output_shape, attention_axes=spec.resolve_axes(rank),
                    dtype=self.dtype)
                zeros = lambda d: tf.zeros((1,) * (rank - 1) + (d,), self.dtype)
                layer(zeros(q_dim), zeros(v_dim), zeros(k_dim))  # builds the sublayers from this signature
            named = _keras.dense_variables(layer, DENSE)
            arrays = self.weights.as_dict()
            if set(named) != set(arrays) or len(layer.weights) != len(arrays):
                raise RuntimeError(f"{self.adapter.name}: the tf_keras layer has weights "
                                   f"{[v.name for v in layer.weights]}; expected {sorted(arrays)}")
            for name, var in named.items():
                var.assign(tf.cast(arrays[name], var.dtype))
            call = lambda *args, **kwargs: self._call(layer, *args, **kwargs)
            grads = lambda *args: self._value_and_grads(layer, named, *args)
            if self.mode == "compiled":
                call, grads = tf.function(call), tf.function(grads)
            self._layers[rank] = (layer, named, call, grads)
        return self._layers[rank]

    @staticmethod
    def _call(layer, query, value, key, mask, causal, return_scores=False, training=False):
        result = layer(query, value, key=key, attention_mask=mask, use_causal_mask=causal,
                       return_attention_scores=return_scores, training=training)
        return result if return_scores else (result, None)

    def _value_and_grads(self, layer, named, query, value, key, mask, causal, cotangent):
        tf = self.tf
        inputs = [query, value] + ([key] if key is not None else [])
        variables = list(named.values())
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            out, _ = self._call(layer, query, value, key, mask, causal)
            loss = tf.reduce_sum(out * tf.cast(cotangent, out.dtype))
        grads = tape.gradient(loss, inputs + variables)
        return dict(zip(["query", "value", "key"][:len(inputs)] + list(named), grads))

    def _tensor(self, x):
        with self.tf.device(self.tf_device):
            arr = np.asarray(x, dtype=np.float32 if self.dtype == "bfloat16" else self.dtype)
            return self.tf.cast(self.tf.convert_to_tensor(arr), self.dtype)

    def _native(self, call, requires_grad=False):
        native_causal = call.causal and _keras.native_causal_ok(call)
        mask = call.mask if native_causal or not call.causal else call.allowed()
        if mask is not None and mask.shape[call.n_batch] == 1:
            mask = np.squeeze(mask, axis=call.n_batch)  # Keras inserts the head axis itself
        with self.tf.device(self.tf_device):
            mask = None if mask is None else self.tf.convert_to_tensor(np.ascontiguousarray(mask))
        self._layer(call.rank)
        return dict(query=self._tensor(call.query), value=self._tensor(call.value),
                    key=self._tensor(call.key) if call.key_given else None, mask=mask, causal=native_causal,
                    call=call)

    def _run(self, inputs, return_scores, training, seed):
        _, _, call, _ = self._layer(inputs["call"].rank)
        if seed is not None:
            self.tf_keras.utils.set_random_seed(int(seed))
        with self.tf.device(self.tf_device):
            return call(inputs["query"], inputs["value"], inputs["key"], inputs["mask"], inputs["causal"],
                        bool(return_scores), bool(training))

    def _output(self, inputs):
        return self._run(inputs, False, False, None)[0]

    def _native_array(self, x):
        return self._tensor(x)

    def _backward(self, inputs, cotangent):
        _, _, _, grads = self._layer(inputs["call"].rank)
        with self.tf.device(self.tf_device):
            return grads(inputs["query"], inputs["value"], inputs["key"], inputs["mask"], inputs["causal"], cotangent)

    def _to_numpy(self, x):
        return self.tf.cast(x, "float32").numpy() if x.dtype in (self.tf.float16, self.tf.bfloat16) else x.numpy()

    def _sync(self, x):
        for t in (x.values() if isinstance(x, dict) else [x]):
            t.numpy()  # TensorFlow has no public per-tensor wait: reading the value is the sync
        return x

    def export_weights(self) -> Weights:
        if not self._layers:  # no rank fits the axes: the weights were never loaded
            return self.weights
        _, named, _, _ = next(iter(self._layers.values()))
        return Weights(**{n: self._to_numpy(v.value()).astype(np.float64) for n, v in named.items()})


class TfKerasMHAAdapter(Adapter):
    name = "tf_keras_mha"
    framework = "Keras 2 (tf_keras)"
    family = "tensorflow"
    requires = ("tf_keras", "tensorflow")
    distributions = ("tf_keras", ("tensorflow", "tensorflow-cpu"))
    install_hint = 'pip install "mhabench[tf-keras]"'
    description = "tf_keras.layers.MultiHeadAttention (legacy Keras 2) on TensorFlow, imported as tf_keras"
    layer_class = TfKerasMHALayer

    def capabilities(self):
        return Capabilities(devices=("cpu", "cuda"), modes=("eager", "compiled"), unsupported_features={
            "gqa": "tf_keras.layers.MultiHeadAttention projects key and value with num_heads heads",
            "bias": "tf_keras.layers.MultiHeadAttention.call takes no additive bias",
            # Keras 2 has no argument for these; tf_keras_mha does not emulate them through attention_mask
            "window": "tf_keras.layers.MultiHeadAttention has no sliding window (not emulated in attention_mask)",
            "lengths": "tf_keras.layers.MultiHeadAttention takes padding as attention_mask only (lengths are not "
                       "emulated)",
            "causal_bottom_right": "tf_keras's use_causal_mask is top-left only (bottom-right is not emulated)",
            "query_offset": "tf_keras's use_causal_mask is top-left only (query positions are not emulated)",
            "softcap": "tf_keras.layers.MultiHeadAttention has no logit soft cap",
            "scale": "tf_keras.layers.MultiHeadAttention always scales the query by 1/sqrt(key_dim) and takes no "
                     "scale"})

    def available_devices(self):
        return _keras.available_devices("tensorflow")

    def worker_env(self):
        return dict(_keras.TENSORFLOW_ENV)

    def switches(self):
        return (_keras.ONEDNN,)

    def kernel_environment(self):
        return _keras.TENSORFLOW_KERNEL_ENV

    def kernel_facts(self):
        return _keras.tensorflow_facts()

    def memory_source(self, device="cpu"):
        return _keras.TENSORFLOW_SOURCE

    def peak_memory(self, fn, device="cpu"):
        return _keras.tensorflow_peak_rise(fn, device)
