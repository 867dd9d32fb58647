"""A from-scratch multi-head attention in NumPy, checked against mhabench without packaging it.

    mhabench adapters --adapter my_attention:MyAttention
    mhabench conform --adapter my_attention:MyAttention --adapters my_attention --quick

(run from this directory, or give the file: ``--adapter examples/my_attention.py:MyAttention``).
"""
import numpy as np

from mhabench import impls


class MyLayer(impls.Layer):
    def __init__(self, adapter, spec, weights, dtype, device, mode="eager", **options):
        super().__init__(adapter, spec, weights, dtype, device, mode, **options)
        self.weights = weights  # canonical layout: Wq [D, H, key_dim], Wo [H, value_dim, *out], ...

    def _forward(self, call, return_scores, training, seed):
        w = self.weights

        def project(x, W, b):  # [B, L, D] -> [B, H, L, k]
            y = np.einsum("bld,dhk->bhlk", x, W, optimize=True)
            return y if b is None else y + b[None, :, None, :]

        group = self.spec.num_heads // self.spec.kv_heads  # grouped-query attention: query heads per K/V head
        q = project(call.query, w.Wq, w.bq)
        k = np.repeat(project(call.key, w.Wk, w.bk), group, axis=1)
        v = np.repeat(project(call.value, w.Wv, w.bv), group, axis=1)
        logits = np.einsum("bhtk,bhsk->bhts", q, k, optimize=True) / np.sqrt(self.spec.key_dim)
        if call.bias is not None:  # the additive bias, already read to the scores' rank
            logits = logits + call.bias
        allowed = call.allowed()  # True = may attend: mask AND causal AND window AND lengths, or None
        if allowed is not None:
            logits = np.where(allowed, logits, -np.inf)
        row_max = np.max(logits, axis=-1, keepdims=True, initial=-np.inf)  # initial: no keys at all (S = 0)
        e = np.exp(logits - np.where(np.isfinite(row_max), row_max, 0.0))
        total = e.sum(axis=-1, keepdims=True)
        # a row with no allowed key gets all-zero weights; a NaN row stays NaN (total != 0 holds for NaN)
        weights = np.divide(e, total, out=np.zeros_like(e), where=total != 0)
        if allowed is not None and not np.all(np.isfinite(v)):
            # a masked position is never read: its NaN or Inf must not reach the output as 0 * NaN
            read = np.broadcast_to(allowed, weights.shape)[..., None]
            heads = np.where(read, weights[..., None] * v[:, :, None], 0.0).sum(axis=3).transpose(0, 2, 1, 3)
        else:
            heads = np.einsum("bhts,bhsv->bthv", weights, v, optimize=True)
        out = np.tensordot(heads, w.Wo, axes=([2, 3], [0, 1]))
        if w.bo is not None:
            out = out + w.bo
        return out, weights

    def export_weights(self):
        return self.weights  # held in the canonical layout, so exact


class MyAttention(impls.Adapter):
    name = "my_attention"
    framework = "NumPy"
    requires = ("numpy",)
    distributions = ("numpy",)
    description = "a from-scratch NumPy multi-head attention"
    layer_class = MyLayer

    def capabilities(self):
        one_axis = "this layer attends over one sequence axis: inputs are [batch, length, features]"
        return impls.Capabilities(
            unsupported_features={"multi_axis": one_axis, "batch_axes": one_axis, "dropout": "no dropout",
                                  "gradients": "no backward pass"},
            # the features of modern attention are opt-in: an adapter lists those its layer handles
            supported_extensions={"gqa", "causal_bottom_right", "window", "bias", "lengths"})

    def extra_constraints(self, spec, dims, call):
        if call is not None and call.rank != 3:
            return "this layer takes [batch, length, features] inputs"
        return None
