"""The float64 NumPy oracle: the canonical multi-head attention semantics.

``forward`` is the golden. Run with ``dtype="float32"``, ``"float16"`` or
``"bfloat16"`` it is the same-precision *reference* of the conformance
method: every intermediate (projections, scores, bias added, softmax, weighted
sum, output projection) is rounded to that dtype, with float32 arithmetic
under the 16-bit types, as the frameworks' kernels do. The rounding points
are part of the tolerance scheme: change how a stage is computed, never where
it is rounded.

Masked positions are never read: a NaN or Inf in a masked key or value does
not reach the output (plain ``weights @ values`` would give ``0 * NaN``).

The call-level features (causal alignment, window, bias, lengths; see
:func:`impls.validation.validate_call`) all reach the core through one
definition of the may-attend positions, :meth:`Call.allowed_block`, and the
bias through :meth:`Call.flat_bias`. Grouped-query attention shares each
key/value head among ``spec.group_size`` consecutive query heads.

Speed: every contraction is a BLAS matmul on ``[N, Hkv, rows, k]`` stacks, and
the elementwise softmax runs in place, split over the cores in row chunks
(NumPy releases the GIL in its loops; each row is computed exactly as it
would be alone, so the chunking changes no value). ``block_size`` selects the
blockwise mode: query rows are processed in blocks so the ``[T, S]`` scores are
never materialised (memory O(S * block)).
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .spec import AttentionSpec, Weights
from .validation import Call, check_dtype, check_policy, flatten, numpy_dtype, unflatten, validate_call, weights_dims

__all__ = ["forward", "Numerics", "masked_softmax", "prepare"]

# Below this many score elements a chunk is not worth a thread hand-off.
_PARALLEL_MIN_ELEMENTS = 1 << 18
_pool: ThreadPoolExecutor | None = None


def _workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _row_chunks(fn, arrays_rows: int, size: int) -> None:
    """Run ``fn(start, stop)`` over row chunks of ``0..arrays_rows``, in parallel when the work is large."""
    global _pool
    workers = _workers()
    if workers == 1 or size < _PARALLEL_MIN_ELEMENTS or arrays_rows < 2:
        fn(0, arrays_rows)
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="mhabench-oracle")
    step = -(-arrays_rows // workers)
    futures = [_pool.submit(fn, start, min(start + step, arrays_rows)) for start in range(0, arrays_rows, step)]
    for f in futures:
        f.result()


class Numerics:
    """Arithmetic in a given dtype: compute in ``compute`` precision, round each result to ``dtype``."""

    def __init__(self, dtype: str = "float64"):
        self.name = check_dtype(dtype)
        self.dtype = numpy_dtype(self.name)
        self.compute = np.float64 if self.name == "float64" else np.float32
        self.rounds = self.name in ("float16", "bfloat16")

    def __call__(self, x):
        """Round ``x`` to the storage dtype, returned in the compute dtype."""
        x = np.asarray(x, dtype=self.compute)
        return x.astype(self.dtype).astype(self.compute) if self.rounds else x

    def cast(self, x):
        if x is None:
            return None
        return self(np.asarray(x).astype(np.float64))


def masked_softmax(scores: np.ndarray, allowed: np.ndarray | None, fully_masked: str = "zeros") -> np.ndarray:
    """Softmax over the last axis, restricted to allowed positions.

    Rows with no allowed position follow ``fully_masked``: ``zeros`` (all-zero
    weights), ``uniform`` (1/S everywhere, what a large negative *replacement*
    of masked logits gives), ``nan``, or ``unmasked`` (the softmax of the whole
    row, what a large negative *added* to every logit of the row gives). NaN and Inf in allowed scores
    propagate as arithmetic dictates; masked scores are never read. With no key at all (S = 0) the
    weights are empty under every policy. ``scores`` is not modified.
    """
    check_policy(fully_masked)
    shape = scores.shape if allowed is None else np.broadcast_shapes(scores.shape, allowed.shape)
    out = np.array(np.broadcast_to(scores, shape), dtype=np.result_type(scores.dtype, np.float32))
    return _softmax_inplace(out, effective_allowed(allowed, fully_masked), fully_masked)


def _softmax_inplace(scores: np.ndarray, allowed: np.ndarray | None, fully_masked: str) -> np.ndarray:
    """:func:`masked_softmax` computed in ``scores`` itself (an array the caller owns); ``allowed`` already
    passed through :func:`effective_allowed`, and broadcastable to ``scores``."""
    if scores.shape[-1] == 0:
        return scores
    rows = scores.shape[-2] if scores.ndim >= 2 else 1

    def chunk(start, stop):
        s = scores[..., start:stop, :] if scores.ndim >= 2 else scores
        a = None
        if allowed is not None:
            a = allowed[..., start:stop, :] if allowed.ndim >= 2 and allowed.shape[-2] != 1 else allowed
            np.copyto(s, -np.inf, where=np.logical_not(a))
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            row_max = np.max(s, axis=-1, keepdims=True)
            row_max[row_max == -np.inf] = 0.0
            np.subtract(s, row_max, out=s)
            np.exp(s, out=s)
            np.divide(s, np.sum(s, axis=-1, keepdims=True), out=s)
        if a is not None:
            empty = np.logical_not(np.any(a, axis=-1, keepdims=True))
            if np.any(empty):
                fill = {"zeros": 0.0, "uniform": 1.0 / s.shape[-1], "nan": np.nan}[fully_masked]
                np.copyto(s, np.asarray(fill, dtype=s.dtype), where=empty)

    _row_chunks(chunk, rows, scores.size)
    return scores


def effective_allowed(allowed: np.ndarray | None, fully_masked: str) -> np.ndarray | None:
    """The ``unmasked`` policy lets a row with no allowed key attend to every key, as if unmasked (what an
    additive mask gives when every position of the row gets the same finite fill); other policies keep it.
    A ``-inf`` bias is part of the logits, so in such a row it still weighs as ``exp(-inf) = 0``, and a row
    that is ``-inf`` everywhere comes out NaN, as the arithmetic of an additive mask gives."""
    if allowed is None or fully_masked != "unmasked":
        return allowed
    return allowed | ~np.any(allowed, axis=-1, keepdims=True)


def prepare(spec: AttentionSpec, weights: Weights, query, value, key=None, mask=None, causal=False, *,
            window=None, bias=None, query_lengths=None, key_value_lengths=None) -> Call:
    if not isinstance(spec, AttentionSpec):
        raise TypeError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
    if not isinstance(weights, Weights):
        raise TypeError(f"weights must be a Weights, got {type(weights).__name__}")
    weights.check_spec(spec)
    return validate_call(spec, weights_dims(weights), query, value, key, mask, causal, window=window, bias=bias,
                         query_lengths=query_lengths, key_value_lengths=key_value_lengths)


def _project(num: Numerics, x: np.ndarray, W: np.ndarray, b: np.ndarray | None) -> np.ndarray:
    """``[N, L, D] x [D, h, k] (+ b [h, k]) -> [N, h, L, k]`` (C-contiguous), one BLAS matmul."""
    N, L, D = x.shape
    h, k = W.shape[1:]
    y = num(np.matmul(x.reshape(N * L, D), W.reshape(D, h * k)))
    if b is not None:
        y = num(y + b.reshape(h * k))
    return np.ascontiguousarray(y.reshape(N, L, h, k).transpose(0, 2, 1, 3))


def _projections(spec: AttentionSpec, weights: Weights, call: Call, num: Numerics):
    """The stages before the scores, shared with the backward pass.

    Returns ``(w, x, q, k, v)``: the weights in ``num``'s precision, the flattened
    inputs ``x["query"|"key"|"value"]`` ``[N, L, D]`` and their projections:
    ``q`` ``[N, H, T, key_dim]`` already scaled by 1/sqrt(key_dim), ``k`` and ``v``
    ``[N, Hkv, S, *]`` (``Hkv = spec.kv_heads``; query head h reads kv head h // group_size).
    """
    w = {k: num.cast(v) for k, v in weights.as_dict().items()}
    x = {name: flatten(call, num.cast(getattr(call, name))) for name in ("query", "key", "value")}
    q = _project(num, x["query"], w["Wq"], w.get("bq"))
    k = _project(num, x["key"], w["Wk"], w.get("bk"))
    v = _project(num, x["value"], w["Wv"], w.get("bv"))
    q = num(q * num(1.0 / math.sqrt(spec.key_dim)))
    return w, x, q, k, v


def grouped_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a [N, H, r, m] @ b [N, Hkv, m, c] -> [N, H, r, c]`` where query head h uses b's head h // (H // Hkv).

    The ``H // Hkv`` query heads of a group are stacked into one ``[G * r, m]`` matrix, so each group is a
    single BLAS call whatever the grouping (G = 1: classic attention)."""
    N, H, r, m = a.shape
    Hkv = b.shape[1]
    G = H // Hkv
    out = np.matmul(a.reshape(N, Hkv, G * r, m), b)
    return out.reshape(N, H, r, b.shape[-1])


def expand_heads(x: np.ndarray, num_heads: int) -> np.ndarray:
    """``[N, Hkv, ...] -> [N, H, ...]``: each key/value head repeated for the query heads of its group."""
    return x if x.shape[1] == num_heads else np.repeat(x, num_heads // x.shape[1], axis=1)


def group_sum(x: np.ndarray, kv_heads: int) -> np.ndarray:
    """``[N, H, ...] -> [N, Hkv, ...]``: the adjoint of :func:`expand_heads` (a sum over each group)."""
    N, H = x.shape[:2]
    return x if H == kv_heads else x.reshape((N, kv_heads, H // kv_heads) + x.shape[2:]).sum(axis=2)


def output_projection(spec: AttentionSpec, w: dict, call: Call, num: Numerics, o: np.ndarray) -> np.ndarray:
    """Heads ``[N, H, T, vd]`` back to the query's layout and through the output projection (float64 out).
    ``w``: the weights in ``num``'s precision, as ``_projections`` returns them."""
    H, vd = spec.num_heads, spec.value_head_dim
    o = unflatten(call, np.transpose(o, (0, 2, 1, 3)))  # [N, H, T, vd] -> [B, *Q, H, vd]
    lead = o.shape[:-2]
    out = num(np.matmul(o.reshape(-1, H * vd), w["Wo"].reshape(H * vd, -1)))
    if "bo" in w:
        out = num(out + w["bo"].reshape(-1))
    return out.reshape(lead + w["Wo"].shape[2:]).astype(np.float64)


def logits(num: Numerics, q: np.ndarray, k: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """Scaled scores ``q . k`` (``q`` pre-scaled), plus the bias where given: ``[N, H, r, S]``, rounded after
    the product and again after the sum, as a framework adding a bias to its scores does."""
    scores = num(grouped_matmul(q, np.swapaxes(k, -1, -2)))
    if bias is not None:
        with np.errstate(invalid="ignore"):
            scores = num(np.add(scores, num.cast(bias), out=scores if not num.rounds else None))
    return scores


def _attention_weights(num: Numerics, q, k, allowed, fully_masked: str, bias=None):
    """Scores ``q . k`` (+ bias) and their masked softmax, ``[N, H, T, S]``. ``allowed`` has passed through
    :func:`effective_allowed`."""
    scores = logits(num, q, k, bias)
    return num(_softmax_inplace(scores, allowed, fully_masked))


def read_positions(allowed: np.ndarray | None, shape: tuple, fully_masked: str, columns) -> np.ndarray:
    """Which ``[N, H, r, S]`` positions a row reads, at key ``columns``: its allowed ones (``allowed`` after
    :func:`effective_allowed`), and every position of an empty row under the policies that give it weights."""
    if allowed is None:
        return np.ones(shape[:-1] + (len(columns),), dtype=bool)
    full = np.broadcast_to(allowed, shape)
    read = full[..., columns]
    if fully_masked != "zeros":  # an empty row reads every position, as its weights say
        read = read | ~np.any(full, axis=-1, keepdims=True)
    return read


def split_nonfinite(v: np.ndarray):
    """``(clean, columns, v_bad)``: ``v [N, Hkv, S, c]`` with non-finite entries zeroed, the key positions
    holding any non-finite entry, and ``v`` at those positions with only the non-finite entries kept."""
    finite = np.isfinite(v)
    columns = np.nonzero(~np.all(finite, axis=(0, 1, 3)))[0]
    bad = np.where(finite, 0.0, v)[:, :, columns, :]
    return np.where(finite, v, 0.0), columns, bad


def weighted_values(num: Numerics, probs: np.ndarray, v: np.ndarray, allowed: np.ndarray | None,
                    fully_masked: str, values_finite: bool) -> np.ndarray:
    """``probs @ v`` (grouped), reading no masked position: a NaN/Inf value at a position a row does not
    read must not leak in as ``0 * NaN``. Finite values take one matmul; the few key positions holding a
    non-finite value are added back, only where read, so the arithmetic matches a sum over read positions."""
    with np.errstate(invalid="ignore"):
        if allowed is None or values_finite:
            return num(grouped_matmul(probs, v))
        clean, columns, bad = split_nonfinite(v)
        o = grouped_matmul(probs, clean)
        read = read_positions(allowed, probs.shape, fully_masked, columns)
        terms = probs[..., columns, None] * expand_heads(bad, probs.shape[1])[:, :, None, :, :]  # [N, H, r, nb, c]
        o += np.where(read[..., None], terms, 0.0).sum(axis=-2)
        return num(o)


def forward(spec: AttentionSpec, weights: Weights, query, value, key=None, mask=None, causal=False,
            return_scores=True, *, fully_masked: str = "zeros", dtype: str = "float64",
            block_size: int | None = None, window=None, bias=None, query_lengths=None, key_value_lengths=None):
    """Canonical MHA. Returns ``(output, scores)``; ``scores`` is None unless requested.

    ``output``: ``[B, *Q, *out]``; ``scores``: ``[B, *non_attended, H, *Q_att, *K_att]``,
    both float64 (values rounded to ``dtype`` when a lower precision is chosen).
    ``causal``, ``window``, ``bias``, ``query_lengths`` and ``key_value_lengths`` mean what
    :func:`impls.validation.validate_call` says. A query row with no allowed key (including every row
    when S = 0, and query rows past ``query_lengths``) follows ``fully_masked``; the canonical ``zeros``
    gives it output ``bo``.
    """
    call = prepare(spec, weights, query, value, key, mask, causal, window=window, bias=bias,
                   query_lengths=query_lengths, key_value_lengths=key_value_lengths)
    check_policy(fully_masked)
    if block_size is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
        if return_scores:
            raise ValueError("return_scores=True needs the full scores, which the blockwise mode "
                             "(block_size set) never materialises; pass return_scores=False")
    num = Numerics(dtype)
    vd = spec.value_head_dim
    w, _, q, k, v = _projections(spec, weights, call, num)
    values_finite = bool(np.all(np.isfinite(v)))

    def attend(start: int, stop: int):
        allowed = effective_allowed(call.allowed_block(start, stop), fully_masked)
        probs = _attention_weights(num, q[:, :, start:stop], k, allowed, fully_masked, call.flat_bias(start, stop))
        return probs, weighted_values(num, probs, v, allowed, fully_masked, values_finite)

    T = q.shape[2]
    if block_size is None:
        probs, o = attend(0, T)
    else:
        probs = None
        o = np.empty(q.shape[:3] + (vd,), dtype=num.compute)
        for start in range(0, T, block_size):
            o[:, :, start:start + block_size] = attend(start, start + block_size)[1]

    out = output_projection(spec, w, call, num, o)
    scores_out = probs.reshape(call.scores_shape).astype(np.float64) if return_scores else None
    return out, scores_out
