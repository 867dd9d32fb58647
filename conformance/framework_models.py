"""Models of framework behaviours the canonical oracle's policies cannot express, built from the oracle's stages.

Each is a float64 NumPy reimplementation of what one framework computes, written from its source and checked
against the framework in the tests, so a catalogue entry can describe the behaviour value for value
(``behaviours.BEHAVIOURS``) instead of with a weaker check.
"""
from __future__ import annotations

import ml_dtypes
import numpy as np

from mhabench.impls import oracle
from mhabench.impls.oracle import group_sum
from mhabench.impls.oracle_backward import projection_gradients, softcap_backward
from mhabench.impls.validation import flatten, numpy_dtype, score_scale


def jax_filled_attention(inputs, dtype: str = "float64") -> dict[str, np.ndarray]:
    """What ``jax.nn.dot_product_attention``'s XLA path computes (jax/_src/nn/functions.py,
    ``_dot_product_attention_core`` and ``_apply_masks``), for the case ``inputs``: ``output``, ``scores`` and every
    ``grad_*``.

    The additive bias is added to the scaled logits; then every position masked by the mask, causal, the window
    or the lengths is *replaced* by a large finite negative (``-0.7 * finfo.max``), while a ``-inf`` from the bias
    stays ``-inf``. The softmax runs over all S positions, so a row with no allowed key gets uniform weights 1/S;
    a row whose allowed positions are all ``-inf`` attends uniformly to its *masked* positions (or is NaN when it
    has none); the other rows are canonical. The output rows past ``query_seq_lengths`` are multiplied by zero
    (their weights stay as above). Gradients are those of that computation: the filled positions carry none.
    """
    fill = -0.7 * float(ml_dtypes.finfo(numpy_dtype(dtype)).max)  # the dtype's, as JAX takes it

    def weights(logits, allowed):
        filled = np.where(allowed, logits, fill)
        shifted = filled - filled.max(axis=-1, keepdims=True, initial=-np.inf)  # (S = 0: no keys)
        e = np.exp(shifted)
        probs = e / e.sum(axis=-1, keepdims=True)
        return probs, probs
    return _attention_model(inputs, weights, dtype=dtype)


def keras2_logsumexp_rounded(inputs, dtype: str = "float64") -> dict[str, np.ndarray]:
    """What legacy Keras 2 (``tf_keras.layers.MultiHeadAttention``) computes when it attends over more than one
    axis, in a 16- or 32-bit dtype: its ``Softmax`` layer adds ``(1 - mask) * -1e9`` (float16: its lowest value)
    to the logits and, for a tuple of axes, returns ``exp(x - reduce_logsumexp(x, axes))``. In a query row with
    no allowed key every ``x`` rounds to that constant and so does the logsumexp (log S is far below its ulp),
    so every weight is ``exp(0) = 1``, not 1/S: the output row is the projected *sum* of the values. The other
    rows are canonical. Backward, TensorFlow's logsumexp gradient is the softmax of the rounded ``x`` (uniform,
    1/S, in those rows), so their logits' gradient is ``g - mean(g)`` over the row.
    """
    def weights(logits, allowed):
        empty = ~allowed.any(axis=-1, keepdims=True)
        e = np.exp(np.where(allowed, logits - logits.max(axis=-1, keepdims=True, where=allowed, initial=-np.inf),
                            -np.inf))
        with np.errstate(all="ignore"):
            probs = np.where(empty, 1.0, e / e.sum(axis=-1, keepdims=True))
        softmax = np.where(empty, 1.0 / max(logits.shape[-1], 1), probs)
        return probs, softmax
    return _attention_model(inputs, weights, grad_where_masked=True, dtype=dtype)


def _attention_model(inputs, weights_of, grad_where_masked: bool = False, dtype: str = "float64"
                     ) -> dict[str, np.ndarray]:
    """The oracle's stages around a framework's own weights: ``weights_of(logits, allowed)`` gives the weights
    and the softmax its backward uses (``g_logits = w * g_w - softmax * sum(g_w * w)``); the gradient at a masked
    position is kept where ``grad_where_masked`` (the mask was added, not substituted), else zero. Every stage is
    rounded to ``dtype`` (the same-precision reference of the model, as the oracle's own)."""
    i = inputs
    call = oracle.prepare(i.spec, i.weights, *i.args(), **i.features())
    spec, num = i.spec, oracle.Numerics(dtype)
    w, x, q, k, v = oracle._projections(spec, i.weights, call, num)  # q already scaled (the call's scale)
    H, Hkv = spec.num_heads, spec.kv_heads
    K, V = oracle.expand_heads(k, H), oracle.expand_heads(v, H)
    N, _, T, _ = q.shape
    with np.errstate(all="ignore"):
        bias = call.flat_bias()
        logits = oracle.logits(num, q, k, bias, softcap=call.softcap)  # scaled, soft-capped, biased
        masked = call.allowed_block(bias=False)
        allowed = np.ones((1, 1, 1, 1), bool) if masked is None else masked
        allowed = np.broadcast_to(allowed, logits.shape)
        probs, softmax = (num(a) for a in weights_of(logits, allowed))
        query_lengths = call.flat_lengths()[0]
        live = np.ones((N, 1, T, 1)) if query_lengths is None else \
            (np.arange(T)[None, None, :, None] < query_lengths[:, None, None, None]).astype(np.float64)
        o = num((probs @ V) * live)
        out = oracle.output_projection(spec, w, call, num, o)
        result = {"output": out, "output_with_scores": out, "scores": probs.reshape(call.scores_shape)}

        # the backward of the same computation
        vd = spec.value_head_dim
        Wo = w["Wo"].reshape(H * vd, -1)
        g_out = flatten(call, i.cotangent.reshape(call.query.shape[:-1] + (Wo.shape[-1],)))  # [N, T, O]
        g_out = num.cast(g_out)
        grads = {"Wo": num((np.transpose(o, (0, 2, 1, 3)).reshape(N * T, H * vd).T
                            @ g_out.reshape(N * T, -1)).reshape(w["Wo"].shape))}
        if "bo" in w:
            grads["bo"] = num(g_out.sum(axis=(0, 1)).reshape(w["bo"].shape))
        g_o = num((g_out.reshape(N * T, -1) @ Wo.T).reshape(N, T, H, vd).transpose(0, 2, 1, 3) * live)
        g_v = num(group_sum(np.swapaxes(probs, -1, -2) @ g_o, Hkv))
        g_probs = num(g_o @ np.swapaxes(V, -1, -2))
        g_logits = num(probs * g_probs - softmax * num(np.sum(g_probs * probs, axis=-1, keepdims=True)))
        if not grad_where_masked:
            g_logits = np.where(allowed, g_logits, 0.0)  # a filled position is a constant
        if bias is not None:
            grads["bias"] = call.bias_gradient(g_logits)
        if call.softcap is not None:
            g_logits = softcap_backward(num, q, k, call.softcap, g_logits)
        g_q = num(num(g_logits @ K) * num(score_scale(spec, call)))
        g_k = num(group_sum(np.swapaxes(g_logits, -1, -2) @ q, Hkv))
        gradients = projection_gradients(call, num, w, x, g_q, g_k, g_v, grads)
    result.update({f"grad_{name}": g for name, g in gradients.items()})
    return {name: np.asarray(a, np.float64) for name, a in result.items()}
