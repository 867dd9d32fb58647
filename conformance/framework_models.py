"""Models of framework behaviours the canonical oracle's policies cannot express, built from the oracle's stages.

Each is a float64 NumPy reimplementation of what one framework computes, written from its source and checked
against the framework in the tests, so a catalogue entry can describe the behaviour value for value
(``catalogue.BEHAVIOURS``) instead of with a weaker check.
"""
from __future__ import annotations

import math

import numpy as np

from mhabench.impls import oracle
from mhabench.impls.oracle import group_sum
from mhabench.impls.oracle_backward import projection_gradients
from mhabench.impls.validation import flatten


def jax_filled_attention(inputs) -> dict[str, np.ndarray]:
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
    i = inputs
    call = oracle.prepare(i.spec, i.weights, *i.args(), **i.features())
    spec, num = i.spec, oracle.Numerics("float64")
    w, x, q, k, v = oracle._projections(spec, i.weights, call, num)  # q already scaled by 1/sqrt(key_dim)
    H, Hkv = spec.num_heads, spec.kv_heads
    K, V = oracle.expand_heads(k, H), oracle.expand_heads(v, H)
    N, _, T, _ = q.shape
    S = K.shape[2]
    with np.errstate(all="ignore"):
        logits = q @ np.swapaxes(K, -1, -2)
        bias = call.flat_bias()
        if bias is not None:
            logits = logits + bias
        masked = call.allowed_block(bias=False)
        allowed = np.ones((1, 1, 1, 1), bool) if masked is None else masked
        filled = np.where(allowed, logits, -0.7 * np.finfo(np.float64).max)
        shifted = filled - filled.max(axis=-1, keepdims=True, initial=-np.inf)  # (S = 0: no keys)
        e = np.exp(shifted)
        probs = e / e.sum(axis=-1, keepdims=True)
        query_lengths = call.flat_lengths()[0]
        live = np.ones((N, 1, T, 1)) if query_lengths is None else \
            (np.arange(T)[None, None, :, None] < query_lengths[:, None, None, None]).astype(np.float64)
        o = (probs @ V) * live
        out = oracle.output_projection(spec, w, call, num, o)
        result = {"output": out, "output_with_scores": out, "scores": probs.reshape(call.scores_shape)}

        # the backward of the same computation
        vd = spec.value_head_dim
        Wo = w["Wo"].reshape(H * vd, -1)
        g_out = flatten(call, i.cotangent.reshape(call.query.shape[:-1] + (Wo.shape[-1],)))  # [N, T, O]
        grads = {"Wo": (np.transpose(o, (0, 2, 1, 3)).reshape(N * T, H * vd).T
                        @ g_out.reshape(N * T, -1)).reshape(w["Wo"].shape)}
        if "bo" in w:
            grads["bo"] = g_out.sum(axis=(0, 1)).reshape(w["bo"].shape)
        g_o = (g_out.reshape(N * T, -1) @ Wo.T).reshape(N, T, H, vd).transpose(0, 2, 1, 3) * live
        g_v = group_sum(np.swapaxes(probs, -1, -2) @ g_o, Hkv)
        g_probs = g_o @ np.swapaxes(V, -1, -2)
        g_logits = probs * (g_probs - np.sum(g_probs * probs, axis=-1, keepdims=True))
        g_logits = np.where(allowed, g_logits, 0.0)  # a filled position is a constant
        if bias is not None:
            grads["bias"] = call.bias_gradient(g_logits)
        g_q = g_logits @ K / math.sqrt(spec.key_dim)
        g_k = group_sum(np.swapaxes(g_logits, -1, -2) @ q, Hkv)
        gradients = projection_gradients(call, num, w, x, g_q, g_k, g_v, grads)
    result.update({f"grad_{name}": g for name, g in gradients.items()})
    return result
