"""An installable mhabench plugin: attention written as explicit loops over batch and heads.

After ``pip install ./examples/mhabench_plugin_example``, ``mhabench adapters`` lists
``example_loop`` and ``mhabench conform --adapters example_loop`` tests it.
"""
import numpy as np

from mhabench import impls


def _softmax_allowed(logits, allowed):
    """Softmax over keys restricted to allowed ones; a row with none allowed gets zero weights."""
    logits = np.where(allowed, logits, -np.inf)
    top = logits.max(axis=-1, keepdims=True)
    e = np.exp(logits - np.where(np.isfinite(top), top, 0.0))
    total = e.sum(axis=-1, keepdims=True)
    return np.divide(e, total, out=np.zeros_like(e), where=total > 0)


class LoopLayer(impls.Layer):
    def __init__(self, adapter, spec, weights, dtype, device, mode="eager", **options):
        super().__init__(adapter, spec, weights, dtype, device, mode, **options)
        self.weights = weights

    def _forward(self, call, return_scores, training, seed):
        w, H = self.weights, self.spec.num_heads
        B, T, S = call.query.shape[0], call.query.shape[1], call.key.shape[1]
        allowed = call.allowed()
        allowed = np.ones((B, H, T, S), bool) if allowed is None else np.broadcast_to(allowed, (B, H, T, S))
        bias = (lambda b, h: 0.0) if w.bq is None else (lambda b, h: b[h])
        out = np.zeros(call.output_shape)
        scores = np.zeros(call.scores_shape)
        for b in range(B):
            for h in range(H):
                q = call.query[b] @ w.Wq[:, h] + bias(w.bq, h)
                k = call.key[b] @ w.Wk[:, h] + bias(w.bk, h)
                v = call.value[b] @ w.Wv[:, h] + bias(w.bv, h)
                scores[b, h] = _softmax_allowed(q @ k.T / np.sqrt(self.spec.key_dim), allowed[b, h])
                out[b] += np.tensordot(scores[b, h] @ v, w.Wo[h], axes=1)
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
        return impls.Capabilities(unsupported_features={
            "multi_axis": one_axis, "batch_axes": one_axis, "dropout": "no dropout",
            "gradients": "no backward pass"})

    def extra_constraints(self, spec, dims, call):
        return "inputs must be [batch, length, features]" if call is not None and call.rank != 3 else None


def make_adapter():
    """The entry point: a callable returning the adapter (mhabench names it after the entry point)."""
    return LoopAdapter()
