"""Input validation shared by every adapter (run before dispatch).

Whatever adapter is used, the same bad input gives the same ValueError or
TypeError, naming the argument and the shape that was expected.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .spec import AttentionSpec, Weights

DTYPES = ("float16", "bfloat16", "float32", "float64")
DEVICES = ("cpu", "cuda")
FULLY_MASKED_POLICIES = ("zeros", "uniform", "nan", "unmasked")


def check_dtype(dtype) -> str:
    name = getattr(dtype, "name", dtype)
    name = str(name) if name is not None else None
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return name


def check_device(device) -> str:
    if not isinstance(device, str) or device.split(":")[0] not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)} (optionally 'cuda:N'), got {device!r}")
    return device


def numpy_dtype(name: str):
    """The NumPy dtype for a dtype name; bfloat16 comes from ml_dtypes."""
    name = check_dtype(name)
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _as_array(name: str, x) -> np.ndarray:
    if x is None:
        raise TypeError(f"{name} must be an array, got None")
    if hasattr(x, "detach") or hasattr(x, "numpy") and not isinstance(x, np.ndarray):
        # A framework tensor: accept it through NumPy, so the checks below apply.
        try:
            x = np.asarray(x.detach().cpu().float() if hasattr(x, "detach") else x.numpy())
        except Exception as exc:  # pragma: no cover - exotic tensor types
            raise TypeError(f"{name} must be a NumPy array or array-like, got {type(x).__name__}") from exc
    arr = np.asarray(x)
    if arr.dtype.kind not in "fiu" and arr.dtype.name != "bfloat16":
        raise TypeError(f"{name} must be a real floating-point array, got dtype {arr.dtype}")
    return arr


@dataclass(frozen=True)
class Call:
    """A validated call: arrays, resolved axes and the shapes everything has.

    ``scores_shape`` is ``[B, *non_attended, H, *Q_attended, *K_attended]``.
    ``mask`` (if any) is the user's mask read by the canonical (Keras) rule and given every missing
    axis: its rank equals the scores' rank and it broadcasts to ``scores_shape``. ``given_mask`` is
    the mask exactly as the user passed it (what an adapter hands a framework that reads the mask
    the canonical way, such as Keras).
    """

    query: np.ndarray
    value: np.ndarray
    key: np.ndarray
    key_given: bool
    mask: np.ndarray | None
    causal: bool
    attention_axes: tuple[int, ...]
    batch_axes: tuple[int, ...]  # 0 and the non-attended axes
    scores_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    given_mask: np.ndarray | None = None

    @property
    def rank(self) -> int:
        return self.query.ndim

    @property
    def n_batch(self) -> int:
        """Number of leading batch-like axes in the scores (batch + non-attended)."""
        return len(self.batch_axes)

    @property
    def n_flat(self) -> int:
        """The flattened batch: the product of the batch and non-attended axes."""
        return math.prod(self.scores_shape[:self.n_batch])

    @property
    def q_len(self) -> int:
        return math.prod(self.query.shape[a] for a in self.attention_axes)

    @property
    def k_len(self) -> int:
        return math.prod(self.key.shape[a] for a in self.attention_axes)

    def allowed(self) -> np.ndarray | None:
        """The boolean may-attend mask (mask AND causal), broadcastable to ``scores_shape``; None if all allowed."""
        allowed = self.mask
        if self.causal:
            c = causal_mask(self.q_len, self.k_len).reshape(
                (1,) * (self.n_batch + 1) + self.scores_shape[self.n_batch + 1:])
            allowed = c if allowed is None else np.logical_and(allowed, c)
        return allowed

    def flat_allowed(self) -> np.ndarray | None:
        """``allowed()`` broadcast over batch axes and flattened to ``[prod(batch), 1 or H, T, S]``."""
        allowed = self.allowed()
        if allowed is None:
            return None
        nb = self.n_batch
        heads = allowed.shape[nb]
        target = self.scores_shape[:nb] + (heads,) + self.scores_shape[nb + 1:]
        allowed = np.broadcast_to(allowed, target)
        return allowed.reshape(math.prod(self.scores_shape[:nb]), heads, self.q_len, self.k_len)

    def flat_mask(self, with_causal: bool = False) -> np.ndarray | None:
        """The mask (``with_causal``: mask AND causal) flattened to ``[N, H, T, S]`` the way a user of a
        one-sequence framework writes it: each group of axes (batch-like, heads, attended query,
        attended key) stays of size 1 where the mask is constant along all of it, so the framework's
        own broadcasting does the rest. None when there is nothing to mask."""
        mask = self.allowed() if with_causal else self.mask
        if mask is None:
            return None
        nb, n = self.n_batch, len(self.attention_axes)
        groups = [(0, nb), (nb, nb + 1), (nb + 1, nb + 1 + n), (nb + 1 + n, nb + 1 + 2 * n)]
        shape = []
        for start, stop in groups:
            constant = all(mask.shape[a] == 1 for a in range(start, stop))
            shape.extend(1 if constant else self.scores_shape[a] for a in range(start, stop))
        mask = np.broadcast_to(mask, tuple(shape))
        flat = [math.prod(shape[start:stop]) for start, stop in groups]
        return np.ascontiguousarray(mask).reshape(flat)

    def is_key_padding(self) -> bool:
        """Whether the mask (causal aside) depends on the batch and the key positions only: a padding mask."""
        if self.mask is None:
            return False
        nb = self.n_batch
        return all(d == 1 for d in self.mask.shape[nb:nb + 1 + len(self.attention_axes)])


def causal_mask(t: int, s: int) -> np.ndarray:
    """Top-left aligned causal mask: query i may attend key j iff j <= i."""
    return np.tril(np.ones((t, s), dtype=bool))


def validate_call(spec: AttentionSpec, weights_dims: tuple[int, int, int], query, value, key=None,
                  mask=None, causal=False) -> Call:
    """Check one call against the spec and the weights' feature widths (Dq, Dk, Dv)."""
    q_dim, k_dim, v_dim = weights_dims
    query = _as_array("query", query)
    value = _as_array("value", value)
    key_given = key is not None
    key = _as_array("key", key) if key_given else value
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    if query.ndim < 3:
        raise ValueError(f"query must have shape [B, *Q, {q_dim}] (rank >= 3), got shape {list(query.shape)}")
    for name, arr in (("value", value), ("key", key)):
        if arr.ndim != query.ndim:
            raise ValueError(f"{name} must have the same rank as query ({query.ndim}: [B, *K, D]), "
                             f"got shape {list(arr.shape)} for query shape {list(query.shape)}")
        if arr.shape[0] != query.shape[0]:
            raise ValueError(f"{name} must have the same batch size as query ({query.shape[0]}), "
                             f"got shape {list(arr.shape)}")
    for name, arr, dim in (("query", query, q_dim), ("value", value, v_dim), ("key", key, k_dim)):
        if arr.shape[-1] != dim:
            raise ValueError(f"{name} must have feature dim {dim} to match the weights "
                             f"(expected shape [..., {dim}]), got shape {list(arr.shape)}")
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(f"key and value must have the same [B, *K] shape, got key {list(key.shape)} "
                         f"and value {list(value.shape)}")
    rank = query.ndim
    axes = spec.resolve_axes(rank)
    batch_axes = tuple(a for a in range(rank - 1) if a not in axes)
    for a in batch_axes[1:]:
        if query.shape[a] != key.shape[a]:
            raise ValueError(
                f"axis {a} is not attended (attention_axes={spec.attention_axes!r}) so it acts as a batch axis and "
                f"must match between query {list(query.shape)} and key/value {list(key.shape)}")
    H = spec.num_heads
    batch_shape = tuple(query.shape[a] for a in batch_axes)
    q_att = tuple(query.shape[a] for a in axes)
    k_att = tuple(key.shape[a] for a in axes)
    scores_shape = batch_shape + (H,) + q_att + k_att
    output_shape = tuple(query.shape[:-1]) + tuple(spec.out_shape(q_dim))

    given = None
    if mask is not None:
        given = np.asarray(mask)
        if given.dtype != np.bool_:
            raise TypeError(f"mask must be a boolean array (True = may attend), got dtype {given.dtype}")
        mask = read_mask(given, scores_shape, len(batch_shape), len(axes))
    return Call(query=query, value=value, key=key, key_given=key_given, mask=mask, causal=bool(causal),
                attention_axes=axes, batch_axes=batch_axes, scores_shape=scores_shape,
                output_shape=output_shape, given_mask=given)


def read_mask(mask: np.ndarray, scores_shape: tuple[int, ...], n_batch: int, n_attended: int) -> np.ndarray:
    """The canonical (Keras) reading of a mask, as a view of the scores' rank.

    Its last ``2 * n_attended`` axes are the attended query axes, then the attended key axes; its
    leading axes line up from the left with ``[batch, *non_attended, heads]``; the axes it lacks are
    inserted just before the attended axes (where the head axis goes) and broadcast. So ``[B, T, S]``
    on scores ``[B, F, H, T, S]`` means batch, not the free axis F; ``[T, S]`` broadcasts everywhere.
    """
    lead_axes = scores_shape[:n_batch + 1]
    attended = scores_shape[n_batch + 1:]
    rule = (f"its last {2 * n_attended} axes are the attended query then key axes {list(attended)}, its leading "
            f"axes line up from the left with [batch, *non_attended, heads] = {list(lead_axes)}")
    lead = mask.ndim - 2 * n_attended
    if lead < 0 or lead > n_batch + 1:
        raise ValueError(f"mask of shape {list(mask.shape)} has {mask.ndim} axes; expected {2 * n_attended} to "
                         f"{len(scores_shape)} for scores of shape {list(scores_shape)}: {rule}")
    full = mask.reshape(mask.shape[:lead] + (1,) * (n_batch + 1 - lead) + mask.shape[lead:])
    try:
        ok = np.broadcast_shapes(full.shape, scores_shape) == tuple(scores_shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"mask of shape {list(mask.shape)} does not broadcast to the scores {list(scores_shape)}: "
                         f"{rule}")
    return full


def check_cotangent(call: Call, cotangent) -> np.ndarray:
    ct = _as_array("cotangent", cotangent)
    if ct.shape != call.output_shape:
        raise ValueError(f"cotangent must have the output's shape {list(call.output_shape)}, got {list(ct.shape)}")
    return ct


def check_policy(fully_masked: str) -> str:
    if fully_masked not in FULLY_MASKED_POLICIES:
        raise ValueError(f"fully_masked must be one of {FULLY_MASKED_POLICIES}, got {fully_masked!r}")
    return fully_masked


def weights_dims(weights: Weights) -> tuple[int, int, int]:
    return weights.query_dim, weights.key_input_dim, weights.value_input_dim


def flatten_perm(call: Call) -> tuple[int, ...]:
    """Permutation taking an input to ``[*batch_axes, *attention_axes, D]``."""
    return call.batch_axes + call.attention_axes + (call.rank - 1,)


def inverse_perm(perm) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


# ---- one sequence: the attended axes flattened, the non-attended ones folded into the batch ----------
# Written once for every array library: ``xp`` needs ``transpose(x, perm)`` and ``reshape(x, shape)``
# (NumPy, jax.numpy and TensorFlow have both; torch's shim is ``_torch.XP``).

def flatten(call: Call, x, xp=np):
    """``[B, *A, D]`` -> ``[prod(batch axes), prod(attended axes), D]``."""
    perm = flatten_perm(call)
    shape = tuple(x.shape)
    n_batch = math.prod(shape[a] for a in call.batch_axes)
    length = math.prod(shape[a] for a in call.attention_axes)
    return xp.reshape(xp.transpose(x, perm), (n_batch, length, shape[-1]))


def unflatten(call: Call, o, xp=np, like=None):
    """``[N, L, F...]`` back to ``[B, *A, F...]`` in the layout of the input shaped ``like`` (default: the
    query's shape): the inverse of :func:`flatten`."""
    axes = flatten_perm(call)[:-1]
    like = tuple(call.query.shape if like is None else like)
    extra = tuple(o.shape[2:])
    o = xp.reshape(o, tuple(like[a] for a in axes) + extra)
    inv = inverse_perm(axes)
    return xp.transpose(o, inv + tuple(range(len(inv), len(inv) + len(extra))))
