"""The analytic backward pass of the oracle: hand-derived chain rule, no autodiff.

``backward`` returns the gradients of ``sum(output * cotangent)`` with respect
to the inputs and every weight, in the canonical layout (float64). The
forward stages come from :mod:`impls.oracle` itself, so both passes share one
definition of the projections, the scaling and the masked softmax. Everything
runs on the flattened layout ``[N, H, L, k]`` (N = batch and non-attended axes,
L = flattened attended positions); only the input gradients are put back
into the inputs' layout.

Fully masked query rows follow the forward's ``fully_masked`` policy:
``zeros`` and ``uniform`` rows are constants, so no gradient reaches their
scores (a uniform row still passes gradient to the values it averages);
``nan`` rows carry NaN through the softmax backward, as a framework whose
softmax produced the NaN would; ``unmasked`` rows are an ordinary softmax over
every key, and their gradient flows like one.

With ``dtype`` other than float64 every intermediate is rounded like
:class:`impls.oracle.Numerics`: the same-precision reference for gradients.
"""
from __future__ import annotations

import math

import numpy as np

from .oracle import Numerics, _attention_weights, _projections, effective_allowed, prepare
from .spec import AttentionSpec, Weights
from .validation import check_cotangent, check_policy, flatten, unflatten

__all__ = ["backward", "softmax_backward"]


def softmax_backward(num: Numerics, probs: np.ndarray, g_probs: np.ndarray, allowed: np.ndarray | None,
                     fully_masked: str = "zeros") -> np.ndarray:
    """Gradient into the scores of a masked softmax, from the gradient of its weights.

    ``d scores = p * (d p - sum(d p * p))`` over the last axis; masked
    positions have ``p = 0`` and so receive nothing.
    """
    with np.errstate(invalid="ignore"):
        inner = num(np.sum(g_probs * probs, axis=-1, keepdims=True))
        g_scores = num(probs * num(g_probs - inner))
    if allowed is not None and fully_masked != "nan":
        empty = ~np.any(allowed, axis=-1, keepdims=True)
        g_scores = np.where(empty, 0.0, g_scores)  # constant rows: the uniform policy needs this explicitly
    return g_scores


def backward(spec: AttentionSpec, weights: Weights, query, value, key=None, mask=None, causal=False,
             cotangent=None, *, fully_masked: str = "zeros", dtype: str = "float64",
             rounding_noise: int | None = None) -> dict[str, np.ndarray]:
    """Gradients of ``sum(output * cotangent)``: ``query``, ``value``, ``key`` (only when a key
    was given; otherwise ``value`` holds the total through both uses) and every weight. ``rounding_noise``:
    see ``oracle.Numerics``."""
    call = prepare(spec, weights, query, value, key, mask, causal)
    check_policy(fully_masked)
    if cotangent is None:
        raise TypeError(f"cotangent must be an array of the output's shape {list(call.output_shape)}, got None")
    cotangent = check_cotangent(call, cotangent)
    num = Numerics(dtype, rounding_noise)
    H, vd = spec.num_heads, spec.value_head_dim

    # Forward, keeping what the backward needs.
    w, x, q, k, v = _projections(spec, weights, call, num)
    allowed = effective_allowed(call.flat_allowed(), fully_masked)
    probs = _attention_weights(num, q, k, allowed, fully_masked)
    with np.errstate(invalid="ignore"):
        o = num(np.einsum("nhts,nhsv->nhtv", probs, v))

    # Output projection: out[n, t, :] = sum_hv o[n, h, t, v] Wo[h, v, :] + bo.
    Wo = w["Wo"].reshape(H, vd, -1)
    g_out = flatten(call, num.cast(cotangent).reshape(call.query.shape[:-1] + (Wo.shape[-1],)))
    grads = {}
    with np.errstate(invalid="ignore"):
        grads["Wo"] = num(np.einsum("nhtv,nto->hvo", o, g_out)).reshape(w["Wo"].shape)
    if "bo" in w:
        grads["bo"] = num(g_out.sum(axis=(0, 1))).reshape(w["bo"].shape)
    g_o = num(np.einsum("nto,hvo->nhtv", g_out, Wo))

    # Weighted sum and softmax.
    g_probs = num(np.einsum("nhtv,nhsv->nhts", g_o, v))
    with np.errstate(invalid="ignore"):
        g_v = num(np.einsum("nhts,nhtv->nhsv", probs, g_o))
    g_scores = softmax_backward(num, probs, g_probs, allowed, fully_masked)

    # Scores = (q * scale) . k; ``q`` from _projections is already scaled.
    with np.errstate(invalid="ignore"):
        g_q = num(num(np.einsum("nhts,nhsk->nhtk", g_scores, k)) * num(1.0 / math.sqrt(spec.key_dim)))
        g_k = num(np.einsum("nhts,nhtk->nhsk", g_scores, q))

    # Input projections: y = x . W + b.
    g_inputs = {}
    with np.errstate(invalid="ignore"):
        for name, g, W, b in (("query", g_q, "Wq", "bq"), ("key", g_k, "Wk", "bk"), ("value", g_v, "Wv", "bv")):
            grads[W] = num(np.einsum("nld,nhlk->dhk", x[name], g))
            if b in w:
                grads[b] = num(g.sum(axis=(0, 2)))
            g_inputs[name] = num(np.einsum("nhlk,dhk->nld", g, w[W]))

    if not call.key_given:  # value fed both projections
        g_inputs["value"] = num(g_inputs["value"] + g_inputs.pop("key"))
    result = {name: unflatten(call, g, like=getattr(call, name).shape) for name, g in g_inputs.items()}
    result.update({name: grads[name] for name in w})  # canonical weight order
    return {name: np.asarray(g, dtype=np.float64) for name, g in result.items()}
