"""The float64 NumPy oracle: the canonical multi-head attention semantics.

``forward`` is the golden. Run with ``dtype="float32"``, ``"float16"`` or
``"bfloat16"`` it is the same-precision *reference* of the conformance
method: every intermediate (projections, scores, softmax, weighted sum,
output projection) is rounded to that dtype, with float32 arithmetic under
the 16-bit types, as the frameworks' kernels do.

Masked positions are never read: a NaN or Inf in a masked key or value does
not reach the output (plain ``weights @ values`` would give ``0 * NaN``).

``block_size`` selects the blockwise mode: query rows are processed in blocks
so the ``[T, S]`` scores are never materialised (memory O(S * block)).
"""
from __future__ import annotations

import math

import numpy as np

from .spec import AttentionSpec, Weights
from .validation import Call, check_dtype, check_policy, flatten, numpy_dtype, unflatten, validate_call, weights_dims

__all__ = ["forward", "Numerics", "masked_softmax", "prepare"]


class Numerics:
    """Arithmetic in a given dtype: compute in ``compute`` precision, round each result to ``dtype``.

    ``rounding_noise`` (a seed) perturbs every intermediate result by up to one unit in the last place of
    ``dtype``, at random, after rounding it: an implementation that rounds each step differently (another
    order of operations, an exp or reciprocal accurate to one ulp rather than half). Inputs are not perturbed.
    """

    def __init__(self, dtype: str = "float64", rounding_noise: int | None = None):
        self.name = check_dtype(dtype)
        self.dtype = numpy_dtype(self.name)
        self.compute = np.float64 if self.name == "float64" else np.float32
        self.rounds = self.name in ("float16", "bfloat16")
        self._noise = None if rounding_noise is None else np.random.default_rng(rounding_noise)
        self._eps = 2.0 ** -7 if self.name == "bfloat16" else float(np.finfo(self.dtype).eps)

    def _round(self, x):
        x = np.asarray(x, dtype=self.compute)
        return x.astype(self.dtype).astype(self.compute) if self.rounds else x

    def __call__(self, x):
        """Round ``x`` to the storage dtype, returned in the compute dtype."""
        x = self._round(x)
        if self._noise is None or x.ndim == 0:
            return x
        with np.errstate(invalid="ignore", over="ignore"):
            return self._round(x * (1.0 + self._noise.uniform(-self._eps, self._eps, x.shape)))

    def cast(self, x):
        if x is None:
            return None
        return self._round(np.asarray(x).astype(np.float64))


def masked_softmax(scores: np.ndarray, allowed: np.ndarray | None, fully_masked: str = "zeros") -> np.ndarray:
    """Softmax over the last axis, restricted to allowed positions.

    Rows with no allowed position follow ``fully_masked``: ``zeros`` (all-zero
    weights), ``uniform`` (1/S everywhere, what a large negative *replacement*
    of masked logits gives), ``nan``, or ``unmasked`` (the softmax of the whole
    row, what a large negative *added* to every logit of the row gives). NaN and Inf in allowed scores propagate as arithmetic
    dictates; masked scores are never read.
    """
    check_policy(fully_masked)
    allowed = effective_allowed(allowed, fully_masked)
    if allowed is not None:
        scores = np.where(allowed, scores, -np.inf)
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        row_max = np.max(scores, axis=-1, keepdims=True)
        row_max = np.where(row_max == -np.inf, 0.0, row_max)
        e = np.exp(scores - row_max)
        probs = e / np.sum(e, axis=-1, keepdims=True)
    if allowed is not None:
        empty = ~np.any(np.broadcast_to(allowed, scores.shape), axis=-1, keepdims=True)
        if np.any(empty):
            fill = {"zeros": 0.0, "uniform": 1.0 / scores.shape[-1], "nan": np.nan}[fully_masked]
            probs = np.where(empty, np.asarray(fill, dtype=probs.dtype), probs)
    return probs


def effective_allowed(allowed: np.ndarray | None, fully_masked: str) -> np.ndarray | None:
    """The ``unmasked`` policy lets a row with no allowed key attend to every key, as if unmasked (what an
    additive mask gives when every position of the row gets the same finite fill); other policies keep it."""
    if allowed is None or fully_masked != "unmasked":
        return allowed
    return allowed | ~np.any(allowed, axis=-1, keepdims=True)


def prepare(spec: AttentionSpec, weights: Weights, query, value, key=None, mask=None, causal=False) -> Call:
    if not isinstance(spec, AttentionSpec):
        raise TypeError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
    if not isinstance(weights, Weights):
        raise TypeError(f"weights must be a Weights, got {type(weights).__name__}")
    weights.check_spec(spec)
    return validate_call(spec, weights_dims(weights), query, value, key, mask, causal)


def _projections(spec: AttentionSpec, weights: Weights, call: Call, num: Numerics):
    """The stages before the scores, shared with the backward pass.

    Returns ``(w, x, q, k, v)``: the weights in ``num``'s precision, the flattened
    inputs ``x["query"|"key"|"value"]`` ``[N, L, D]`` and their projections
    ``[N, H, L, k]``, the query's already scaled by 1/sqrt(key_dim).
    """
    w = {k: num.cast(v) for k, v in weights.as_dict().items()}

    def project(x, W, b):  # [N, L, D] x [D, H, k] -> [N, H, L, k]
        y = num(np.einsum("nld,dhk->nhlk", x, W))
        return y if b is None else num(y + b[None, :, None, :])

    x = {name: flatten(call, num.cast(getattr(call, name))) for name in ("query", "key", "value")}
    q = project(x["query"], w["Wq"], w.get("bq"))
    k = project(x["key"], w["Wk"], w.get("bk"))
    v = project(x["value"], w["Wv"], w.get("bv"))
    q = num(q * num(1.0 / math.sqrt(spec.key_dim)))
    return w, x, q, k, v


def output_projection(spec: AttentionSpec, w: dict, call: Call, num: Numerics, o: np.ndarray) -> np.ndarray:
    """Heads ``[N, H, T, vd]`` back to the query's layout and through the output projection (float64 out).
    ``w``: the weights in ``num``'s precision, as ``_projections`` returns them."""
    H, vd = spec.num_heads, spec.value_head_dim
    o = unflatten(call, np.transpose(o, (0, 2, 1, 3)))  # [N, H, T, vd] -> [B, *Q, H, vd]
    out = num(np.einsum("...hv,hvo->...o", o, w["Wo"].reshape(H, vd, -1)))
    if "bo" in w:
        out = num(out + w["bo"].reshape(-1))
    return out.reshape(o.shape[:-2] + w["Wo"].shape[2:]).astype(np.float64)


def _attention_weights(num: Numerics, q, k, allowed, fully_masked: str):
    """Scores ``q . k`` and their masked softmax, ``[N, H, T, S]``."""
    scores = num(np.einsum("nhtk,nhsk->nhts", q, k))
    return num(masked_softmax(scores, allowed, fully_masked))


def forward(spec: AttentionSpec, weights: Weights, query, value, key=None, mask=None, causal=False,
            return_scores=True, *, fully_masked: str = "zeros", dtype: str = "float64",
            block_size: int | None = None, rounding_noise: int | None = None):
    """Canonical MHA. Returns ``(output, scores)``; ``scores`` is None unless requested.

    ``output``: ``[B, *Q, *out]``; ``scores``: ``[B, *non_attended, H, *Q_att, *K_att]``,
    both float64 (values rounded to ``dtype`` when a lower precision is chosen). ``rounding_noise``: see
    ``Numerics``.
    """
    call = prepare(spec, weights, query, value, key, mask, causal)
    check_policy(fully_masked)
    if block_size is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
        if return_scores:
            raise ValueError("return_scores=True needs the full scores, which the blockwise mode "
                             "(block_size set) never materialises; pass return_scores=False")
    num = Numerics(dtype, rounding_noise)
    H, vd = spec.num_heads, spec.value_head_dim
    w, _, q, k, v = _projections(spec, weights, call, num)
    allowed = effective_allowed(call.flat_allowed(), fully_masked)
    values_finite = bool(np.all(np.isfinite(v)))

    def attend(rows: slice):
        a = None if allowed is None else allowed[:, :, rows]
        probs = _attention_weights(num, q[:, :, rows], k, a, fully_masked)
        if a is None or values_finite:
            return probs, num(np.einsum("nhts,nhsv->nhtv", probs, v))
        # A masked position is never read, so a NaN/Inf value there must not leak in as 0 * NaN.
        read = np.broadcast_to(a, probs.shape)
        if fully_masked != "zeros":  # an empty row reads every position, as its weights say
            read = read | ~np.any(read, axis=-1, keepdims=True)
        read = read[..., None]
        terms = np.where(read, probs[..., None] * v[:, :, None, :, :], 0.0)
        return probs, num(terms.sum(axis=-2))

    T = q.shape[2]
    if block_size is None:
        probs, o = attend(slice(None))
    else:
        probs = None
        o = np.empty(q.shape[:3] + (vd,), dtype=num.compute)
        for start in range(0, T, block_size):
            o[:, :, start:start + block_size] = attend(slice(start, start + block_size))[1]

    out = output_projection(spec, w, call, num, o)
    scores_out = probs.reshape(call.scores_shape).astype(np.float64) if return_scores else None
    return out, scores_out
