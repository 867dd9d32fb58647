"""The analytic backward pass of the oracle: hand-derived chain rule, no autodiff.

``backward`` returns the gradients of ``sum(output * cotangent)`` with respect
to the inputs and every weight, in the canonical layout (float64). The
forward stages come from :mod:`impls.oracle` itself, so both passes share one
definition of the projections, the scaling, the may-attend positions and the
masked softmax. Everything runs on the flattened layout ``[N, H, L, k]`` (N =
batch and non-attended axes, L = flattened attended positions) with every
contraction a BLAS matmul; only the input gradients are put back into the
inputs' layout.

The call-level features: causal alignment, query positions, window and lengths only choose
positions (no gradient of their own); a ``bias`` gets its gradient under the
key ``"bias"``, in the shape it was given (the scores' gradient summed over the
axes it broadcasts along; zero at masked and ``-inf`` positions, which no
perturbation of the bias can unmask). The soft cap ``c * tanh(s / c)`` passes
the gradient times ``1 - tanh(s / c)^2`` to the scaled logits (the bias, added
after it, is not capped); the scale multiplies the gradient of ``q`` as it
multiplies ``q``. Grouped-query attention: a key/value head's gradient is the
sum over the query heads of its group.

Fully masked query rows follow the forward's ``fully_masked`` policy:
``zeros`` and ``uniform`` rows are constants, so no gradient reaches their
scores (a uniform row still passes gradient to the values it averages);
``nan`` rows carry NaN through the softmax backward, as a framework whose
softmax produced the NaN would; ``unmasked`` rows are an ordinary softmax over
every key, and their gradient flows like one. ``uniform_rounded`` rows are
uniform in the forward, yet the softmax's gradient at those uniform weights
reaches every logit of the row: what automatic differentiation gives for a
large negative *added* to the logits, which rounding makes the same for
every key (``x - 1e9`` is ``-1e9`` in float32) while its derivative in ``x``
stays 1. With S = 0 every row is fully
masked and the output is ``bo``: only ``bo`` has a non-zero gradient.

Masked positions are never read, in this pass too: a NaN/Inf key or value at a
position no row reads, or a NaN/Inf query in a row that reads nothing (a query
padded away by ``query_lengths``), reaches no gradient.

With ``dtype`` other than float64 every intermediate is rounded like
:class:`impls.oracle.Numerics`: the same-precision reference for gradients.
"""
from __future__ import annotations


import numpy as np

from .oracle import (Numerics, _attention_weights, _projections, effective_allowed, expand_heads, grouped_matmul,
                     prepare, read_positions, split_nonfinite, weighted_values)
from .spec import AttentionSpec, Weights
from .validation import Call, check_cotangent, check_policy, flatten, score_scale, unflatten

__all__ = ["backward", "softmax_backward"]


def _flash_weights(num: Numerics, q, k, allowed, bias, probs, o, g_o, fully_masked: str, softcap=None):
    """The weights and ``sum(d p * p)`` as FlashAttention's backward forms them (see :func:`backward`):
    ``exp(s - lse)`` and ``rowsum(d o * o)``. Rows with no allowed key keep the policy's weights, except
    under ``uniform_rounded``: there a large negative was *added* to every logit, so ``lse`` rounds to it
    (its spacing dwarfs ``log S``) and each recomputed weight is ``exp(0) = 1``, not ``1/S``."""
    from .oracle import logits
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        s = logits(num, q, k, bias, softcap=softcap)
        if allowed is not None:
            s = np.where(allowed, s, -np.inf)
        row_max = np.max(s, axis=-1, keepdims=True, initial=-np.inf)  # (S = 0: no key, every row is empty)
        live = np.isfinite(row_max)
        row_max = np.where(live, row_max, 0.0)
        total = num(np.sum(num(np.exp(num(s - row_max))), axis=-1, keepdims=True))
        lse = num(row_max + num(np.log(total)))
        recomputed = num(np.exp(num(s - lse)))
        inner = num(np.sum(g_o * o, axis=-1, keepdims=True))
    empty_rows = np.ones_like(probs) if fully_masked == "uniform_rounded" else probs
    return np.where(live, recomputed, empty_rows), inner


def softmax_backward(num: Numerics, probs: np.ndarray, g_probs: np.ndarray, allowed: np.ndarray | None,
                     fully_masked: str = "zeros", inner: np.ndarray | None = None) -> np.ndarray:
    """Gradient into the scores of a masked softmax, from the gradient of its weights.

    ``d scores = p * (d p - sum(d p * p))`` over the last axis; masked
    positions have ``p = 0`` and so receive nothing. ``inner``: ``sum(d p * p)`` formed elsewhere.
    """
    with np.errstate(invalid="ignore"):
        if inner is None:
            inner = num(np.sum(g_probs * probs, axis=-1, keepdims=True))
        g_scores = num(probs * num(g_probs - inner))
    if allowed is not None and fully_masked not in ("nan", "uniform_rounded"):
        empty = ~np.any(allowed, axis=-1, keepdims=True)
        if np.any(empty):
            g_scores = np.where(empty, 0.0, g_scores)  # constant rows: the uniform policy needs this explicitly
    return g_scores


def softcap_backward(num: Numerics, q: np.ndarray, k: np.ndarray, softcap: float, g_capped: np.ndarray) -> np.ndarray:
    """The gradient into the scaled logits ``s = q . k`` (``q`` pre-scaled) from that of the capped ones,
    ``c * tanh(s / c)``: times ``1 - tanh(s / c)^2``. Where no gradient arrives (a masked position, whose
    logit may be NaN) nothing leaves."""
    with np.errstate(invalid="ignore", over="ignore"):
        t = num(np.tanh(num(num(grouped_matmul(q, np.swapaxes(k, -1, -2))) / softcap)))
        g = num(g_capped * num(1.0 - num(t * t)))
    return np.where(g_capped == 0, 0.0, g)


def _stacked(x: np.ndarray, kv_heads: int) -> np.ndarray:
    """``[N, H, r, c] -> [N, Hkv, G * r, c]``: a group's query heads stacked, so a contraction over the rows
    sums over the group too (the gradient of a key/value head shared by G query heads)."""
    N, H, r, c = x.shape
    return x.reshape(N, kv_heads, (H // kv_heads) * r, c)


def _safe_matmul(a: np.ndarray, b: np.ndarray, guard: str) -> np.ndarray:
    """``a @ b`` in which a term is absent when the ``guard`` operand's factor (``"a"`` or ``"b"``, the
    forward's input) is NaN/Inf and the other factor is exactly zero.

    In this pass the coefficient of an input at a position the forward never reads is exactly zero (the
    masked softmax's backward gives nothing there), so this is how an unread NaN/Inf stays out of every
    gradient. Non-finite values in the other operand are arithmetic (a NaN policy's gradient) and
    propagate as usual. A finite guarded operand takes the plain matmul; otherwise only the contraction
    positions where it is not finite are expanded term by term."""
    guarded = a if guard == "a" else b
    finite = np.isfinite(guarded)
    if finite.all():
        return a @ b
    if guard == "a":
        bad = ~finite.all(axis=tuple(range(a.ndim - 1)))
    else:
        bad = ~finite.all(axis=tuple(range(b.ndim - 2)) + (b.ndim - 1,))
    columns = np.nonzero(bad)[0]
    out = a[..., ~bad] @ b[..., ~bad, :]
    a_bad, b_bad = a[..., columns][..., :, :, None], b[..., columns, :][..., None, :, :]  # [.., I, nb, 1], [.., 1, nb, J]
    other = b_bad if guard == "a" else a_bad
    terms = np.where(other == 0, 0.0, a_bad * b_bad)
    return out + terms.sum(axis=-2)


def backward(spec: AttentionSpec, weights: Weights, query, value, key=None, mask=None, causal=False,
             cotangent=None, *, fully_masked: str = "zeros", dtype: str = "float64", window=None, bias=None,
             query_lengths=None, key_value_lengths=None, query_offset=None, softcap=None, scale=None,
             rounding_noise: int | None = None, form: str = "probs") -> dict[str, np.ndarray]:
    """Gradients of ``sum(output * cotangent)``: ``query``, ``value``, ``key`` (only when a key
    was given; otherwise ``value`` holds the total through both uses), ``bias`` (only when a bias was
    given) and every weight. The call-level arguments mean what :func:`impls.oracle.forward` says;
    ``rounding_noise``: see ``oracle.Numerics``.

    ``form`` picks how the softmax's backward is formed, which only changes the rounding: ``"probs"``
    (``d scores = p * (d p - sum(d p * p))`` from the forward's weights) or ``"flash"``, FlashAttention's
    backward (arXiv:2205.14135, algorithm 4): the weights recomputed as ``exp(s - lse)`` from the row's
    log-sum-exp and ``sum(d p * p)`` taken as ``rowsum(d o * o)``; both in the working precision, so the
    rounding of ``lse`` (at the logits' magnitude) scales whole rows."""
    if form not in ("probs", "flash"):
        raise ValueError(f"form must be 'probs' or 'flash', got {form!r}")
    call = prepare(spec, weights, query, value, key, mask, causal, window=window, bias=bias,
                   query_lengths=query_lengths, key_value_lengths=key_value_lengths, query_offset=query_offset,
                   softcap=softcap, scale=scale)
    check_policy(fully_masked)
    if cotangent is None:
        raise TypeError(f"cotangent must be an array of the output's shape {list(call.output_shape)}, got None")
    cotangent = check_cotangent(call, cotangent)
    num = Numerics(dtype, rounding_noise)
    H, Hkv, vd = spec.num_heads, spec.kv_heads, spec.value_head_dim

    # Forward, keeping what the backward needs.
    w, x, q, k, v = _projections(spec, weights, call, num)
    N, _, T, _ = q.shape
    allowed = effective_allowed(call.allowed_block(), fully_masked)
    probs = _attention_weights(num, q, k, allowed, fully_masked, call.flat_bias(), softcap=call.softcap)
    values_finite = bool(np.all(np.isfinite(v)))
    o = weighted_values(num, probs, v, allowed, fully_masked, values_finite)

    # Output projection: out[n, t, :] = sum_hv o[n, h, t, v] Wo[h, v, :] + bo.
    Wo = w["Wo"].reshape(H * vd, -1)
    g_out = flatten(call, num.cast(cotangent).reshape(call.query.shape[:-1] + (Wo.shape[-1],)))  # [N, T, O]
    g_out_rows = g_out.reshape(N * T, -1)
    grads = {}
    with np.errstate(invalid="ignore"):
        o_rows = np.transpose(o, (0, 2, 1, 3)).reshape(N * T, H * vd)
        grads["Wo"] = num(o_rows.T @ g_out_rows).reshape(w["Wo"].shape)
    if "bo" in w:
        grads["bo"] = num(g_out.sum(axis=(0, 1))).reshape(w["bo"].shape)
    g_o = np.ascontiguousarray(num(g_out_rows @ Wo.T).reshape(N, T, H, vd).transpose(0, 2, 1, 3))

    # Weighted sum: o = probs @ v, reading allowed positions only.
    with np.errstate(invalid="ignore"):
        if values_finite or allowed is None:
            g_probs = np.matmul(_stacked(g_o, Hkv), np.swapaxes(v, -1, -2)).reshape(probs.shape)
        else:
            clean, columns, _ = split_nonfinite(v)
            g_probs = np.matmul(_stacked(g_o, Hkv), np.swapaxes(clean, -1, -2)).reshape(probs.shape)
            read = read_positions(allowed, probs.shape, fully_masked, columns)
            full = np.einsum("nhtc,nhsc->nhts", g_o, expand_heads(v[:, :, columns, :], H))
            g_probs[..., columns] = np.where(read, full, g_probs[..., columns])
        g_probs = num(g_probs)
    inner = None
    if form == "flash":
        probs, inner = _flash_weights(num, q, k, allowed, call.flat_bias(), probs, o, g_o, fully_masked,
                                      call.softcap)
    with np.errstate(invalid="ignore"):
        g_v = num(np.matmul(np.swapaxes(_stacked(probs, Hkv), -1, -2), _stacked(g_o, Hkv)))
    g_scores = softmax_backward(num, probs, g_probs, allowed, fully_masked, inner)
    if call.bias is not None:
        grads["bias"] = num(call.bias_gradient(g_scores))  # the scores' gradient, summed to the bias's shape
    if call.softcap is not None:  # the bias is added after the cap: only the logits pass through it
        g_scores = softcap_backward(num, q, k, call.softcap, g_scores)

    # Scores = (q * scale) . k; ``q`` from _projections is already scaled.
    with np.errstate(invalid="ignore"):
        g_q = _safe_matmul(_stacked(g_scores, Hkv), k, guard="b").reshape(q.shape)
        g_q = num(num(g_q) * num(score_scale(spec, call)))
        g_k = num(_safe_matmul(np.swapaxes(_stacked(g_scores, Hkv), -1, -2), _stacked(q, Hkv), guard="b"))

    return projection_gradients(call, num, w, x, g_q, g_k, g_v, grads)


def projection_gradients(call: Call, num: Numerics, w: dict, x: dict, g_q, g_k, g_v, grads: dict) -> dict:
    """The gradients of the inputs and the input projections from those of the projected ``g_q``
    ``[N, H, T, key_dim]`` (with respect to the unscaled query projection), ``g_k`` and ``g_v``
    ``[N, Hkv, S, *]``; ``grads`` holds the rest found so far (Wo, bo, bias). ``w`` and ``x`` are
    ``oracle._projections``'. All of it, in ``backward``'s result form."""
    # Input projections: y = x . W + b, contracted over the flattened (N, L) rows.
    grads, g_inputs = dict(grads), {}
    with np.errstate(invalid="ignore"):
        for name, g, W, b in (("query", g_q, "Wq", "bq"), ("key", g_k, "Wk", "bk"), ("value", g_v, "Wv", "bv")):
            n, h, L, c = g.shape
            D = x[name].shape[-1]
            g_rows = np.transpose(g, (0, 2, 1, 3)).reshape(n * L, h * c)
            grads[W] = num(_safe_matmul(x[name].reshape(n * L, D).T, g_rows, guard="a")).reshape(w[W].shape)
            if b in w:
                grads[b] = num(g.sum(axis=(0, 2)))
            g_inputs[name] = num(g_rows @ w[W].reshape(D, h * c).T).reshape(n, L, D)

    if not call.key_given:  # value fed both projections
        g_inputs["value"] = num(g_inputs["value"] + g_inputs.pop("key"))
    result = {name: unflatten(call, g, like=getattr(call, name).shape) for name, g in g_inputs.items()}
    result.update({name: grads[name] for name in w})  # canonical weight order
    if "bias" in grads:
        result["bias"] = grads["bias"]
    return {name: np.asarray(g, dtype=np.float64) for name, g in result.items()}
