"""The textbook Keras multi-head attention layer, as an adapter (``classic_keras``).

The layer is written the way transformer tutorials teach it: ``d_model`` and
``num_heads`` (``d_model`` divisible by the heads), separate ``Dense`` layers
``wq``/``wk``/``wv`` and an output ``dense``, ``split_heads`` by reshape and
transpose, and scaled dot-product attention with an **additive** mask in which
1 means *masked*, multiplied by ``-1e9``.

What the adapter translates: our boolean mask (True = may attend) and causal
flag become the textbook's float mask ``1 - allowed``; the canonical kernels
``[D, H, depth]`` are the Dense kernels ``[D, d_model]`` with head ``h`` owning
columns ``h*depth:(h+1)*depth`` (what ``split_heads`` reads). Multi-axis
attention is flattened into one sequence here, in the adapter.

What it keeps, on purpose, because it is the layer's behaviour (catalogued as
divergences): a fully masked row gets uniform weights over every key (all its
logits are ``-1e9`` plus a rounding-level difference), and in float16 the
constant ``-1e9`` overflows to ``-inf``, so ``0 * -1e9`` at every *allowed*
position is NaN and any masked call returns NaN.
"""
from __future__ import annotations

import functools

import numpy as np

from .. import _keras
from . import MODERN_REASONS
from ..base import Capabilities, Layer, to_numpy
from ..spec import Weights
from ..validation import flatten, unflatten

NEG_INF_STANDIN = -1e9  # the textbook's "minus infinity" for masked logits


@functools.lru_cache(maxsize=None)
def textbook_layer_class():
    """The layer class (defined on first use: subclassing keras.layers.Layer imports Keras)."""
    import keras
    import tensorflow as tf

    def scaled_dot_product_attention(q, k, v, mask):
        """``mask``: 1.0 where the key is masked, broadcastable to ``[batch, heads, T, S]``."""
        logits = tf.matmul(q, k, transpose_b=True)
        depth = tf.cast(tf.shape(k)[-1], logits.dtype)
        logits = logits / tf.math.sqrt(depth)
        if mask is not None:
            logits += tf.cast(mask, logits.dtype) * NEG_INF_STANDIN
        attention_weights = tf.nn.softmax(logits, axis=-1)
        return tf.matmul(attention_weights, v), attention_weights

    class TextbookMultiHeadAttention(keras.layers.Layer):
        def __init__(self, d_model, num_heads, **kwargs):
            super().__init__(**kwargs)
            if d_model % num_heads:
                raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
            self.d_model, self.num_heads = d_model, num_heads
            self.depth = d_model // num_heads
            self.wq = keras.layers.Dense(d_model, dtype=self.dtype_policy, name="wq")
            self.wk = keras.layers.Dense(d_model, dtype=self.dtype_policy, name="wk")
            self.wv = keras.layers.Dense(d_model, dtype=self.dtype_policy, name="wv")
            self.dense = keras.layers.Dense(d_model, dtype=self.dtype_policy, name="dense")

        def split_heads(self, x, batch_size):
            """``[batch, seq, d_model]`` -> ``[batch, heads, seq, depth]``."""
            x = tf.reshape(x, (batch_size, -1, self.num_heads, self.depth))
            return tf.transpose(x, perm=[0, 2, 1, 3])

        # Named attention_mask, not mask: Keras 3 treats a call argument named `mask` as its own
        # padding-mask mechanism and warns that the layer "does not support masking".
        def call(self, v, k, q, attention_mask=None):
            batch_size = tf.shape(q)[0]
            q = self.split_heads(self.wq(q), batch_size)
            k = self.split_heads(self.wk(k), batch_size)
            v = self.split_heads(self.wv(v), batch_size)
            attended, attention_weights = scaled_dot_product_attention(q, k, v, attention_mask)
            attended = tf.transpose(attended, perm=[0, 2, 1, 3])
            concat = tf.reshape(attended, (batch_size, -1, self.d_model))
            return self.dense(concat), attention_weights

    return TextbookMultiHeadAttention


def dense_kernels(w: Weights) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Canonical weights -> (kernel, bias) of the Dense layers wq, wk, wv, dense."""
    flat = lambda W: W.reshape(W.shape[0], -1)  # [D, H, depth] -> [D, d_model], head-major columns
    return {
        "wq": (flat(w.Wq), w.bq.reshape(-1)),
        "wk": (flat(w.Wk), w.bk.reshape(-1)),
        "wv": (flat(w.Wv), w.bv.reshape(-1)),
        "dense": (w.Wo.reshape(-1, w.Wo.shape[-1]), w.bo),
    }


def canonical_from_dense(arrays: dict[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
    """``{"wq.kernel": ..., "wq.bias": ..., ...}`` (values or gradients) -> canonical names and layout."""
    H = num_heads
    heads = lambda K: K.reshape(K.shape[0], H, -1)
    out = {"Wq": heads(arrays["wq.kernel"]), "Wk": heads(arrays["wk.kernel"]), "Wv": heads(arrays["wv.kernel"])}
    Wo = arrays["dense.kernel"]
    out["Wo"] = Wo.reshape(H, -1, Wo.shape[-1])
    out.update({"bq": arrays["wq.bias"].reshape(H, -1), "bk": arrays["wk.bias"].reshape(H, -1),
                "bv": arrays["wv.bias"].reshape(H, -1), "bo": arrays["dense.bias"]})
    return out


class ClassicKerasLayer(Layer):
    def __init__(self, adapter, spec, weights, dtype, device, mode="eager", **options):
        super().__init__(adapter, spec, weights, dtype, device, mode, **options)
        import tensorflow as tf
        self.tf = tf
        d_model = spec.num_heads * spec.key_dim
        self.layer = textbook_layer_class()(d_model, spec.num_heads, dtype=dtype)
        input_widths = {"wq": weights.query_dim, "wk": weights.key_input_dim, "wv": weights.value_input_dim,
                        "dense": d_model}
        for name, (kernel, bias) in dense_kernels(weights).items():
            dense = getattr(self.layer, name)
            dense.build((None, None, input_widths[name]))
            dense.kernel.assign(to_numpy(kernel, dtype))
            dense.bias.assign(to_numpy(bias, dtype))
        self.layer.built = True

    def _variables(self) -> dict:
        return {f"{n}.{part}": getattr(getattr(self.layer, n), part)
                for n in ("wq", "wk", "wv", "dense") for part in ("kernel", "bias")}

    def _tensors(self, call):
        """Flattened inputs and the textbook mask (1.0 = masked) as TF tensors."""
        tf = self.tf
        t = lambda x: tf.convert_to_tensor(to_numpy(flatten(call, x), self.dtype))
        query, value = t(call.query), t(call.value)
        key = t(call.key) if call.key_given else value
        allowed = call.flat_mask(with_causal=True)  # [N, H, T, S], size 1 where it does not vary: tf broadcasts
        mask = None if allowed is None else tf.convert_to_tensor(to_numpy(~allowed, self.dtype))
        return query, value, key, mask

    def _native(self, call, requires_grad=False):
        query, value, key, mask = self._tensors(call)
        return {"query": query, "value": value, "key": key, "mask": mask, "call": call}

    def _run(self, inputs, return_scores, training, seed):
        out, weights = self.layer(inputs["value"], inputs["key"], inputs["query"], attention_mask=inputs["mask"])
        call = inputs["call"]
        return unflatten(call, out, self.tf), (self.tf.reshape(weights, call.scores_shape) if return_scores else None)

    def _output(self, inputs):
        return self._run(inputs, False, False, None)[0]

    def _to_numpy(self, x):
        return to_numpy(x.numpy(), self.dtype)

    def _sync(self, x):
        x.numpy()  # TensorFlow has no public per-tensor wait: reading the value is the sync
        return x

    def _gradients(self, call, cotangent):
        tf = self.tf
        query, value, key, mask = self._tensors(call)
        ct = tf.convert_to_tensor(to_numpy(flatten(call, cotangent), self.dtype))
        variables = self._variables()
        inputs = {"query": query, "value": value}
        if call.key_given:
            inputs["key"] = key
        with tf.GradientTape() as tape:
            tape.watch(list(inputs.values()))
            # Without a key, value feeds both uses: its gradient is the total through both.
            out, _ = self.layer(value, key if call.key_given else value, query, attention_mask=mask)
        names = list(inputs) + list(variables)
        grads = tape.gradient(out, list(inputs.values()) + list(variables.values()), output_gradients=ct)
        grads = {n: to_numpy(g.numpy(), self.dtype).astype(np.float64) for n, g in zip(names, grads)}
        result = {n: unflatten(call, grads[n], like=getattr(call, n).shape) for n in inputs}
        result.update(canonical_from_dense({n: grads[n] for n in variables}, self.spec.num_heads))
        return result

    def export_weights(self) -> Weights:
        arrays = {n: np.asarray(v.numpy()).astype(np.float64) for n, v in self._variables().items()}
        return Weights(**canonical_from_dense(arrays, self.spec.num_heads))


class ClassicKerasAdapter(_keras.KerasAdapter):
    name = "classic_keras"
    backend = "tensorflow"
    framework = "TensorFlow/Keras"
    description = "the tutorial Keras layer: Dense wq/wk/wv, split_heads, additive mask * -1e9"
    layer_class = ClassicKerasLayer

    def availability(self):
        ok, why = super().availability()
        if ok and self._available[0]:
            import keras
            if keras.backend.backend() != "tensorflow":  # the layer body is TensorFlow ops
                self._available = (False, f"the textbook layer is written in TensorFlow ops but Keras runs on "
                                          f"{keras.backend.backend()!r} in this process; set KERAS_BACKEND=tensorflow")
        return self._available

    def capabilities(self):
        return Capabilities(
            unsupported_features={
                "value_dim": "the layer has one depth = d_model // num_heads, shared by queries, keys and values",
                "multi_output": "the output Dense maps back to d_model, one axis",
                "no_bias": "the Dense layers keep their default use_bias=True; zero biases would compute the "
                           "same output but could not round-trip through export_weights",
                "dropout": "the textbook layer has no dropout (it sits in the encoder block around it)",
                **MODERN_REASONS,
            },
            devices=("cpu",), modes=("eager",))

    def extra_constraints(self, spec, dims, call):
        d_model = spec.num_heads * spec.key_dim
        out = spec.out_shape(dims[0])
        if out != (d_model,):
            return (f"output width {list(out)}: the output Dense maps back to d_model = num_heads * key_dim = "
                    f"{d_model} (with the default output_shape this means the query width must equal it)")
        return None
