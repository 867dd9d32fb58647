"""An installable mhabench plugin: attention written as explicit loops over batch and heads.

After ``pip install ./examples/mhabench_plugin_example``, ``mhabench adapters`` lists
``example_loop`` and ``mhabench conform --adapters example_loop`` tests it.
"""
import numpy as np

from mhabench import impls


def _softmax_allowed(logits, allowed):
    """Softmax over keys restricted to allowed ones; a row with none allowed gets zero weights."""
    logits = np.where(allowed, logits, -np.inf)
    top = logits.max(axis=-1, keepdims=True, initial=-np.inf)  # initial: a row with no key at all (S = 0)
    e = np.exp(logits - np.where(np.isfinite(top), top, 0.0))
    total = e.sum(axis=-1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total != 0)  # a NaN row stays NaN


def _weighted(weights, v, allowed):
    """``weights @ v`` reading no masked position: a NaN or Inf value there must not arrive as 0 * NaN."""
    if np.all(np.isfinite(v)):
        return weights @ v
    return np.where(allowed[:, :, None], weights[:, :, None] * v[None], 0.0).sum(axis=1)


class LoopLayer(impls.Layer):
    def __init__(self, adapter, spec, weights, dtype, device, mode="eager", **options):
        super().__init__(adapter, spec, weights, dtype, device, mode, **options)
        self.weights = weights

    def _forward(self, call, return_scores, training, seed):
        w, H = self.weights, self.spec.num_heads
        group = H // self.spec.kv_heads  # grouped-query attention: query head h reads K/V head h // group
        B, T, S = call.query.shape[0], call.query.shape[1], call.key.shape[1]
        allowed = call.allowed()  # the mask, causal (either alignment), the window and the lengths
        allowed = np.ones((B, H, T, S), bool) if allowed is None else np.broadcast_to(allowed, (B, H, T, S))
        added = np.zeros((B, H, T, S)) if call.bias is None else np.broadcast_to(call.bias, (B, H, T, S))
        bias = (lambda b, h: 0.0) if w.bq is None else (lambda b, h: b[h])
        out = np.zeros(call.output_shape)
        scores = np.zeros(call.scores_shape)
        for b in range(B):
            for h in range(H):
                q = call.query[b] @ w.Wq[:, h] + bias(w.bq, h)
                k = call.key[b] @ w.Wk[:, h // group] + bias(w.bk, h // group)
                v = call.value[b] @ w.Wv[:, h // group] + bias(w.bv, h // group)
                logits = q @ k.T / np.sqrt(self.spec.key_dim) + added[b, h]
                scores[b, h] = _softmax_allowed(logits, allowed[b, h])
                out[b] += np.tensordot(_weighted(scores[b, h], v, allowed[b, h]), w.Wo[h], axes=1)
            if w.bo is not None:
                out[b] += w.bo
        return out, scores

    def export_weights(self):
        return self.weights


class LoopAdapter(impls.Adapter):
    framework = "NumPy"
    requires = ("numpy",)
    distributions = ("numpy", "mhabench-plugin-example")
    description = "explicit loops over batch and heads (an example plugin)"
    layer_class = LoopLayer

    def capabilities(self):
        one_axis = "inputs are [batch, length, features]: one attended axis"
        return impls.Capabilities(
            unsupported_features={"multi_axis": one_axis, "batch_axes": one_axis, "dropout": "no dropout",
                                  "gradients": "no backward pass"},
            supported_extensions={"gqa", "causal_bottom_right", "window", "bias", "lengths"})

    def extra_constraints(self, spec, dims, call):
        return "inputs must be [batch, length, features]" if call is not None and call.rank != 3 else None


def make_adapter():
    """The entry point: a callable returning the adapter (mhabench names it after the entry point)."""
    return LoopAdapter()
