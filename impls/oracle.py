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

The call-level features (causal alignment, query positions, window, bias, lengths, softcap, scale; see
:func:`impls.validation.validate_call`) all reach the core through one
definition of the may-attend positions, :meth:`Call.allowed_block`, the
bias through :meth:`Call.flat_bias`, and the logits through :func:`logits`
(scaled, soft-capped, biased, in that order). Grouped-query attention shares each
key/value head among ``spec.group_size`` consecutive query heads.

Speed: every contraction is a BLAS matmul on ``[N, Hkv, rows, k]`` stacks, and
the elementwise softmax runs in place, split over the cores in row chunks
(NumPy releases the GIL in its loops; each row is computed exactly as it
would be alone, so the chunking changes no value). ``block_size`` selects the
blockwise mode: query rows are processed in blocks so the ``[T, S]`` scores are
never materialised (memory O(S * block)).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .spec import AttentionSpec, Weights
from .validation import (Call, check_dtype, check_policy, flatten, numpy_dtype, score_scale, unflatten,
                         validate_call, weights_dims)

__all__ = ["forward", "Numerics", "masked_softmax", "prepare"]

# Below this many score elements the softmax runs as one set of whole-array NumPy calls; above, in
# cache-sized pieces (each about _PIECE_ELEMENTS, so its five passes stay in L2) spread over the cores.
_PARALLEL_MIN_ELEMENTS = 1 << 18
_PIECE_ELEMENTS = 1 << 16
_pool: tuple[int, ThreadPoolExecutor] | None = None  # (the pid that made it: a forked child makes its own)


def _workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _run_parallel(jobs: list) -> None:
    """Run the zero-argument ``jobs``, split in contiguous runs over the cores (NumPy releases the GIL in
    its loops, so the runs overlap); exceptions propagate."""
    global _pool
    workers = min(_workers(), len(jobs))
    if workers <= 1:
        for job in jobs:
            job()
        return
    if _pool is None or _pool[0] != os.getpid():
        _pool = (os.getpid(), ThreadPoolExecutor(max_workers=_workers(), thread_name_prefix="mhabench-oracle"))
    step = -(-len(jobs) // workers)

    def run(part):
        for job in part:
            job()
    for future in [_pool[1].submit(run, jobs[i:i + step]) for i in range(0, len(jobs), step)]:
        future.result()


class Numerics:
    """Arithmetic in a given dtype: compute in ``compute`` precision, round each result to ``dtype``.

    ``rounding_noise`` (a seed) perturbs every intermediate result by up to two units in the last place of
    ``dtype``, at random, after rounding it: an implementation that rounds each step differently (another
    order of operations; vectorised exp, log and division accurate to one or two ulp rather than the half
    ulp of correct rounding). Inputs are not perturbed.
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
            return self._round(x * (1.0 + self._noise.uniform(-2 * self._eps, 2 * self._eps, x.shape)))

    def cast(self, x):
        if x is None:
            return None
        return self._round(np.asarray(x).astype(np.float64))


def masked_softmax(scores: np.ndarray, allowed: np.ndarray | None, fully_masked: str = "zeros") -> np.ndarray:
    """Softmax over the last axis, restricted to allowed positions.

    Rows with no allowed position follow ``fully_masked``: ``zeros`` (all-zero
    weights), ``uniform`` (1/S everywhere, what a large negative *replacement*
    of masked logits gives), ``uniform_rounded`` (the same weights, where a large negative *added* to the
    logits rounds them all to one value; it differs from ``uniform`` in the backward only), ``nan``, or
    ``unmasked`` (the softmax of the whole row, what a large negative *added* to every logit of the row
    gives when no rounding erases the logits). NaN and Inf in allowed scores
    propagate as arithmetic dictates; masked scores are never read. With no key at all (S = 0) the
    weights are empty under every policy. ``scores`` is not modified.
    """
    check_policy(fully_masked)
    shape = scores.shape if allowed is None else np.broadcast_shapes(scores.shape, allowed.shape)
    out = np.array(np.broadcast_to(scores, shape), dtype=np.result_type(scores.dtype, np.float32))
    return _softmax_inplace(out, effective_allowed(allowed, fully_masked), fully_masked)


def _softmax_inplace(scores: np.ndarray, allowed: np.ndarray | None, fully_masked: str) -> np.ndarray:
    """:func:`masked_softmax` computed in ``scores`` itself (an array the caller owns); ``allowed`` already
    passed through :func:`effective_allowed`, and broadcastable to ``scores``.

    Large ``[N, H, rows, S]`` scores are processed in pieces of a few rows of one head, on every core:
    each row's arithmetic is exactly what it would be alone, so the pieces change no value."""
    if scores.shape[-1] == 0:
        return scores
    if scores.ndim != 4 or scores.size < _PARALLEL_MIN_ELEMENTS:
        _softmax_rows(scores, allowed, fully_masked)
        return scores
    N, H, R, S = scores.shape
    if allowed is not None:
        allowed = allowed.reshape((1,) * (4 - allowed.ndim) + allowed.shape)
    rows = max(1, _PIECE_ELEMENTS // S)

    def piece(n, h, a, b):
        if allowed is None:
            return lambda: _softmax_rows(scores[n, h, a:b], None, fully_masked)
        part = allowed[n % allowed.shape[0], h % allowed.shape[1]]
        part = part if part.shape[0] == 1 else part[a:b]
        return lambda: _softmax_rows(scores[n, h, a:b], part, fully_masked)
    _run_parallel([piece(n, h, a, min(a + rows, R)) for n in range(N) for h in range(H) for a in range(0, R, rows)])
    return scores


def _softmax_rows(s: np.ndarray, allowed: np.ndarray | None, fully_masked: str) -> None:
    """The masked softmax of ``s`` over its last axis, in place (``allowed`` broadcastable to ``s``)."""
    if allowed is not None:
        np.copyto(s, -np.inf, where=np.logical_not(allowed))
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        row_max = np.max(s, axis=-1, keepdims=True)
        row_max[row_max == -np.inf] = 0.0
        np.subtract(s, row_max, out=s)
        np.exp(s, out=s)
        np.divide(s, np.sum(s, axis=-1, keepdims=True), out=s)
    if allowed is not None:
        empty = np.logical_not(np.any(allowed, axis=-1, keepdims=True))
        if np.any(empty):
            fill = {"zeros": 0.0, "uniform": 1.0 / s.shape[-1], "uniform_rounded": 1.0 / s.shape[-1],
                    "nan": np.nan}[fully_masked]
            np.copyto(s, np.asarray(fill, dtype=s.dtype), where=empty)


def effective_allowed(allowed: np.ndarray | None, fully_masked: str) -> np.ndarray | None:
    """The ``unmasked`` policy lets a row with no allowed key attend to every key, as if unmasked (what an
    additive mask gives when every position of the row gets the same finite fill); other policies keep it.
    A ``-inf`` bias is part of the logits, so in such a row it still weighs as ``exp(-inf) = 0``, and a row
    that is ``-inf`` everywhere comes out NaN, as the arithmetic of an additive mask gives."""
    if allowed is None or fully_masked != "unmasked":
        return allowed
    return allowed | ~np.any(allowed, axis=-1, keepdims=True)


def prepare(spec: AttentionSpec, weights: Weights, query, value, key=None, mask=None, causal=False,
            **features) -> Call:
    """The validated call (``features``: the call-level keyword arguments of :func:`validate_call`)."""
    if not isinstance(spec, AttentionSpec):
        raise TypeError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
    if not isinstance(weights, Weights):
        raise TypeError(f"weights must be a Weights, got {type(weights).__name__}")
    weights.check_spec(spec)
    return validate_call(spec, weights_dims(weights), query, value, key, mask, causal, **features)



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
    ``q`` ``[N, H, T, key_dim]`` already scaled (:func:`score_scale`), ``k`` and ``v``
    ``[N, Hkv, S, *]`` (``Hkv = spec.kv_heads``; query head h reads kv head h // group_size).
    """
    w = {k: num.cast(v) for k, v in weights.as_dict().items()}
    x = {name: flatten(call, num.cast(getattr(call, name))) for name in ("query", "key", "value")}
    q = _project(num, x["query"], w["Wq"], w.get("bq"))
    k = _project(num, x["key"], w["Wk"], w.get("bk"))
    v = _project(num, x["value"], w["Wv"], w.get("bv"))
    q = num(q * num(score_scale(spec, call)))
    return w, x, q, k, v


def grouped_matmul(a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """``a [N, H, r, m] @ b [N, Hkv, m, c] -> [N, H, r, c]`` where query head h uses b's head h // (H // Hkv).

    The ``H // Hkv`` query heads of a group are stacked into one ``[G * r, m]`` matrix, so each group is a
    single BLAS call whatever the grouping (G = 1: classic attention). ``out``: a C-contiguous
    ``[N, H, r, c]`` array to write into."""
    N, H, r, m = a.shape
    Hkv, c = b.shape[1], b.shape[-1]
    G = H // Hkv
    stacked = None if out is None else out.reshape(N, Hkv, G * r, c)
    result = np.matmul(a.reshape(N, Hkv, G * r, m), b, out=stacked)
    return result.reshape(N, H, r, c)


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


def logits(num: Numerics, q: np.ndarray, k: np.ndarray, bias: np.ndarray | None,
           out: np.ndarray | None = None, softcap: float | None = None) -> np.ndarray:
    """Scaled scores ``q . k`` (``q`` pre-scaled), soft-capped where ``softcap`` is given, plus the bias where
    given: ``[N, H, r, S]``, rounded after the product, after each step of the cap (divide, tanh, multiply:
    the operations a framework without a fused cap runs) and after the sum, as a framework adding a bias to its
    scores does. ``out``: a buffer of the compute dtype to reuse (see :func:`forward`)."""
    scores = num(grouped_matmul(q, np.swapaxes(k, -1, -2), out=out))
    if softcap is not None:
        scores = num(num(np.tanh(num(scores / softcap))) * softcap)
    if bias is not None:
        with np.errstate(invalid="ignore"):
            scores = num(np.add(scores, num.cast(bias), out=scores if not num.rounds else None))
    return scores


def _attention_weights(num: Numerics, q, k, allowed, fully_masked: str, bias=None, out=None, softcap=None):
    """Scores ``q . k`` (soft-capped, + bias) and their masked softmax, ``[N, H, T, S]``. ``allowed`` has passed
    through :func:`effective_allowed`; ``out`` and ``softcap`` as :func:`logits`."""
    scores = logits(num, q, k, bias, out=out, softcap=softcap)
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
            block_size: int | None = None, window=None, bias=None, query_lengths=None, key_value_lengths=None,
            query_offset=None, softcap=None, scale=None, rounding_noise: int | None = None):
    """Canonical MHA. Returns ``(output, scores)``; ``scores`` is None unless requested.

    ``output``: ``[B, *Q, *out]``; ``scores``: ``[B, *non_attended, H, *Q_att, *K_att]``,
    both float64 (values rounded to ``dtype`` when a lower precision is chosen).
    ``causal``, ``window``, ``bias``, ``query_lengths``, ``key_value_lengths``, ``query_offset``, ``softcap``
    and ``scale`` mean what :func:`impls.validation.validate_call` says. A query row with no allowed key
    (including every row when S = 0, and query rows past ``query_lengths``) follows ``fully_masked``; the
    canonical ``zeros`` gives it output ``bo``. ``rounding_noise``: see ``Numerics``.

    A decode step (T = 1, or a few speculative queries, against a long key/value cache) is the blockwise
    mode's natural call: ``forward(..., causal=True, query_offset=past_lengths, return_scores=False,
    block_size=...)`` never holds more than ``block_size`` rows of scores.
    """
    call = prepare(spec, weights, query, value, key, mask, causal, window=window, bias=bias,
                   query_lengths=query_lengths, key_value_lengths=key_value_lengths, query_offset=query_offset,
                   softcap=softcap, scale=scale)
    check_policy(fully_masked)
    if block_size is not None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive int or None, got {block_size!r}")
        if return_scores:
            raise ValueError("return_scores=True needs the full scores, which the blockwise mode "
                             "(block_size set) never materialises; pass return_scores=False")
    num = Numerics(dtype, rounding_noise)
    vd = spec.value_head_dim
    w, _, q, k, v = _projections(spec, weights, call, num)
    values_finite = bool(np.all(np.isfinite(v)))
    N, H, T, _ = q.shape
    S = k.shape[2]
    # The blockwise mode reuses one score buffer for every block: fresh memory costs its page faults on
    # every block otherwise, which at long lengths takes longer than the arithmetic. (The 16-bit
    # references round into new arrays at every stage, so they take no buffer.)
    buffer = None
    if block_size is not None and not num.rounds:
        buffer = np.empty(N * H * min(block_size, T) * S, dtype=num.compute)

    def attend(start: int, stop: int):
        allowed = effective_allowed(call.allowed_block(start, stop), fully_masked)
        out = None if buffer is None else buffer[:N * H * (stop - start) * S].reshape(N, H, stop - start, S)
        probs = _attention_weights(num, q[:, :, start:stop], k, allowed, fully_masked, call.flat_bias(start, stop),
                                   out=out, softcap=call.softcap)
        return probs, weighted_values(num, probs, v, allowed, fully_masked, values_finite)

    if block_size is None:
        probs, o = attend(0, T)
    else:
        probs = None
        o = np.empty(q.shape[:3] + (vd,), dtype=num.compute)
        for start in range(0, T, block_size):
            stop = min(start + block_size, T)
            o[:, :, start:stop] = attend(start, stop)[1]

    out = output_projection(spec, w, call, num, o)
    scores_out = probs.reshape(call.scores_shape).astype(np.float64) if return_scores else None
    return out, scores_out
