"""Input validation shared by every adapter (run before dispatch).

Whatever adapter is used, the same bad input gives the same ValueError or
TypeError, naming the argument and the shape that was expected.
"""
from __future__ import annotations

import functools
import math
import numbers
from dataclasses import dataclass

import numpy as np

from ..schema import DTYPES  # noqa: F401  (defined by the contract; re-exported for adapters)
from .spec import AttentionSpec, Weights

DEVICES = ("cpu", "cuda")
FULLY_MASKED_POLICIES = ("zeros", "uniform", "uniform_rounded", "nan", "unmasked")


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


def _as_array(name: str, x, floating_only: str | None = None) -> np.ndarray:
    """``x`` as a NumPy array of real numbers. ``floating_only``: refuse integer and boolean arrays too, with
    this text saying what the argument is for (checked before a framework tensor is converted)."""
    if x is None:
        raise TypeError(f"{name} must be an array, got None")
    if floating_only is not None:
        dtype = getattr(x, "dtype", None)
        dtype = str(np.asarray(x).dtype if dtype is None else dtype).replace("torch.", "")
        if not (dtype.startswith("float") or dtype.startswith("bfloat")):
            raise TypeError(f"{name} must be a floating-point array ({floating_only}), got dtype {dtype}")
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


CAUSAL_ALIGNMENTS = ("top_left", "bottom_right")


@dataclass(frozen=True)
class Call:
    """A validated call: arrays, resolved axes and the shapes everything has.

    ``scores_shape`` is ``[B, *non_attended, H, *Q_attended, *K_attended]``.
    ``mask`` (if any) is the user's mask read by the canonical (Keras) rule and given every missing
    axis: its rank equals the scores' rank and it broadcasts to ``scores_shape``. ``given_mask`` is
    the mask exactly as the user passed it (what an adapter hands a framework that reads the mask
    the canonical way, such as Keras).

    The call-level features of modern attention (see :func:`validate_call` for their exact meaning):

    - ``causal`` is True for either alignment (so code written for top-left causal still sees a causal
      call); ``causal_alignment`` says which: None, ``"top_left"`` or ``"bottom_right"``.
    - ``window``: ``(left, right)`` (either side None = unbounded) or None.
    - ``bias``: the additive float bias read by the mask rule (scores' rank, broadcasts to
      ``scores_shape``); ``given_bias`` as the user passed it.
    - ``query_lengths`` / ``key_value_lengths``: int64 ``[B]`` or None.
    - ``query_offset``: int64 ``[B]`` (an int given is repeated over the batch) or None: where each sequence's
      query block sits along the key positions (:attr:`diagonal_offsets` resolves it with the alignment).
    - ``softcap`` and ``scale``: floats or None.

    Every position restriction (mask, causal, window, lengths, a ``-inf`` bias) is combined by AND in
    :meth:`allowed` and its flattened forms, which take keyword flags to leave out the parts an adapter
    hands its framework natively.
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
    causal_alignment: str | None = None
    window: tuple[int | None, int | None] | None = None
    bias: np.ndarray | None = None
    given_bias: np.ndarray | None = None
    query_lengths: np.ndarray | None = None
    key_value_lengths: np.ndarray | None = None
    query_offset: np.ndarray | None = None
    softcap: float | None = None
    scale: float | None = None

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

    @functools.cached_property
    def diagonal_offsets(self) -> np.ndarray:
        """int64 ``[B]``: query row i of batch element b sits at key position ``i + diagonal_offsets[b]``, its
        diagonal. ``query_offset`` where given; else ``S - T`` for ``"bottom_right"`` causal, 0 otherwise
        (top-left). Causal and the window are both measured from it."""
        if self.query_offset is not None:
            return self.query_offset
        offset = self.k_len - self.q_len if self.causal_alignment == "bottom_right" else 0
        return np.full(self.query.shape[0], offset, dtype=np.int64)

    @property
    def offsets_vary(self) -> bool:
        """Whether the diagonal differs between the sequences of the batch (per-sequence query positions)."""
        offsets = self.diagonal_offsets
        return offsets.size > 1 and bool(np.any(offsets != offsets[0]))

    @property
    def diagonal_offset(self) -> int:
        """The diagonal's offset shared by every sequence (:attr:`diagonal_offsets`): 0 top-left, ``S - T``
        bottom-right. A ValueError where it differs between sequences (:attr:`offsets_vary`): a caller that
        reads one offset cannot express that call."""
        if self.offsets_vary:
            raise ValueError(f"query_offset differs between sequences ({self.diagonal_offsets.tolist()}): there is "
                             f"no single diagonal offset")
        return int(self.diagonal_offsets[0]) if self.diagonal_offsets.size else 0

    @property
    def positions_matter(self) -> bool:
        """Whether the query positions restrict anything: causal or a window is measured from the diagonal."""
        return self.causal or self.window is not None

    @property
    def uses_query_offset(self) -> bool:
        """Whether the call's ``query_offset`` changes what it computes: an offset other than 0, read by causal or a
        window (the feature ``query_offset``)."""
        return self.query_offset is not None and self.positions_matter and bool(np.any(self.query_offset))

    @property
    def causal_feature(self) -> str:
        """The feature that names this call's causal triangle: ``query_offset`` (per-sequence positions),
        ``causal_bottom_right`` (bottom-right with T != S) or ``causal``."""
        if self.uses_query_offset:
            return "query_offset"
        if self.causal_alignment == "bottom_right" and self.q_len != self.k_len:
            return "causal_bottom_right"
        return "causal"

    @property
    def top_left_causal(self) -> bool:
        """Causal on the top-left diagonal: top-left alignment, or bottom-right with T == S (the same triangle),
        or query offsets that are all 0. The triangle most frameworks' own causal flag builds (``is_causal``,
        ``use_causal_mask``)."""
        return self.causal and not np.any(self.diagonal_offsets)

    @property
    def causal_argument(self):
        """The ``causal`` argument that re-issues this call: False, True (top-left) or ``"bottom_right"``."""
        return "bottom_right" if self.causal_alignment == "bottom_right" else self.causal

    def feature_kwargs(self) -> dict:
        """The keyword arguments (``window``, ``bias`` as given, ``query_lengths``, ``key_value_lengths``,
        ``query_offset``, ``softcap``, ``scale``) that re-issue this call's call-level features; only those
        given, so a callee that knows none of them still works for a call that uses none."""
        given = {"window": self.window, "bias": self.given_bias, "query_lengths": self.query_lengths,
                 "key_value_lengths": self.key_value_lengths, "query_offset": self.query_offset,
                 "softcap": self.softcap, "scale": self.scale}
        return {k: v for k, v in given.items() if v is not None}

    # ---- the may-attend positions -------------------------------------------------------------------
    def _groups(self) -> list[tuple[int, int]]:
        nb, n = self.n_batch, len(self.attention_axes)
        return [(0, nb), (nb, nb + 1), (nb + 1, nb + 1 + n), (nb + 1 + n, nb + 1 + 2 * n)]

    def _grouped(self, array: np.ndarray) -> np.ndarray:
        """A scores-rank array (mask or bias) as ``[N|1, H|1, T|1, S|1]``: each group of axes (batch-like,
        heads, attended query, attended key) stays of size 1 where the array is constant along all of it."""
        shape = []
        for start, stop in self._groups():
            constant = all(array.shape[a] == 1 for a in range(start, stop))
            shape.extend(1 if constant else self.scores_shape[a] for a in range(start, stop))
        array = np.broadcast_to(array, tuple(shape))
        flat = [math.prod(shape[start:stop]) for start, stop in self._groups()]
        return np.ascontiguousarray(array).reshape(flat)

    @functools.cached_property
    def _grouped_mask(self):
        return None if self.mask is None else self._grouped(self.mask)

    @functools.cached_property
    def _grouped_bias(self):
        return None if self.bias is None else self._grouped(self.bias)

    def _flat_lengths(self, lengths: np.ndarray) -> np.ndarray:
        """``[B]`` lengths repeated over the non-attended axes: ``[N]`` (the batch axis is the slowest)."""
        B = self.scores_shape[0]
        return np.repeat(lengths, self.n_flat // B if B else 0)

    def flat_lengths(self) -> tuple[np.ndarray | None, np.ndarray | None]:
        """``(query_lengths, key_value_lengths)`` per sequence of the flattened batch, ``[N]`` each (or None):
        for a framework that takes lengths per sequence of its one-sequence layout."""
        return tuple(None if n is None else self._flat_lengths(n) for n in (self.query_lengths, self.key_value_lengths))

    def flat_offsets(self) -> np.ndarray:
        """:attr:`diagonal_offsets` per sequence of the flattened batch, int64 ``[N]``."""
        return self._flat_lengths(self.diagonal_offsets)

    def allowed_block(self, start: int = 0, stop: int | None = None, *, mask: bool = True, causal: bool = True,
                      window: bool = True, lengths: bool | str = True, bias: bool = True) -> np.ndarray | None:
        """May-attend for query rows ``start:stop`` of the flattened layout, compact: a boolean
        ``[N|1, H|1, rows|1, S|1]`` (size 1 where constant, so it broadcasts), None if nothing restricts.

        The parts, combined by AND (each flag leaves its part out): the mask; causal (key j <= i + d);
        the window (i + d - left <= j <= i + d + right); the lengths (j < key_value_lengths[b] and
        i < query_lengths[b]; ``lengths="key_value"`` or ``"query"`` takes one side only, for a framework
        that has an argument for the other); the bias (a ``-inf`` bias position is masked). ``d`` is the
        sequence's :attr:`diagonal_offsets` (the band has a batch axis where they differ). This is the one
        definition the oracle and every flattened form use.
        """
        T, S = self.q_len, self.k_len
        stop = T if stop is None else min(stop, T)
        parts = []
        if mask and self._grouped_mask is not None:
            m = self._grouped_mask
            parts.append(m if m.shape[2] == 1 else m[:, :, start:stop])
        if bias and self._grouped_bias is not None:
            b = self._grouped_bias
            b = b if b.shape[2] == 1 else b[:, :, start:stop]
            if np.any(b == -np.inf):  # (== works for bfloat16 too)
                parts.append(b != -np.inf)
        restrict_causal = causal and self.causal
        restrict_window = window and self.window is not None
        if restrict_causal or restrict_window:
            offsets = self.flat_offsets() if self.offsets_vary else self.diagonal_offset
            band = band_mask(start, stop, S, offset=offsets, causal=restrict_causal,
                             window=self.window if restrict_window else None)
            parts.append(band[:, None] if self.offsets_vary else band[None, None])
        if lengths not in (True, False, "key_value", "query"):
            raise ValueError(f"lengths must be True, False, 'key_value' or 'query', got {lengths!r}")
        if lengths in (True, "key_value") and self.key_value_lengths is not None:
            n = self._flat_lengths(self.key_value_lengths)
            parts.append(np.arange(S)[None, None, None, :] < n[:, None, None, None])
        if lengths in (True, "query") and self.query_lengths is not None:
            n = self._flat_lengths(self.query_lengths)
            parts.append(np.arange(start, stop)[None, None, :, None] < n[:, None, None, None])
        if not parts:
            return None
        allowed = parts[0]
        for part in parts[1:]:
            allowed = np.logical_and(allowed, part)
        return allowed

    def allowed(self, *, mask: bool = True, causal: bool = True, window: bool = True, lengths: bool | str = True,
                bias: bool = True) -> np.ndarray | None:
        """The boolean may-attend mask (mask AND causal AND window AND lengths AND bias > -inf; the flags
        leave parts out), of the scores' rank and broadcastable to ``scores_shape``; None if all allowed."""
        only_mask = self.mask is not None and mask and self.allowed_block(
            mask=False, causal=causal, window=window, lengths=lengths, bias=bias) is None
        if only_mask:
            return self.mask  # as read: keeps the user's broadcast axes
        flat = self.allowed_block(mask=mask, causal=causal, window=window, lengths=lengths, bias=bias)
        if flat is None:
            return None
        shape = []
        for g, (start, stop) in enumerate(self._groups()):
            shape.extend(1 if flat.shape[g] == 1 else self.scores_shape[a] for a in range(start, stop))
        return flat.reshape(shape)

    def flat_allowed(self, **parts) -> np.ndarray | None:
        """``allowed()`` broadcast over batch axes and flattened to ``[prod(batch), 1 or H, T, S]``
        (keyword flags as :meth:`allowed`)."""
        flat = self.allowed_block(**parts)
        if flat is None:
            return None
        return np.ascontiguousarray(np.broadcast_to(flat, (self.n_flat, flat.shape[1], self.q_len, self.k_len)))

    def flat_mask(self, with_causal: bool = False, *, window: bool = False, lengths: bool | str = False,
                  bias: bool = False) -> np.ndarray | None:
        """The mask (``with_causal``: mask AND causal; the other flags AND those parts in too) flattened to
        ``[N, H, T, S]`` the way a user of a one-sequence framework writes it: each group of axes
        (batch-like, heads, attended query, attended key) stays of size 1 where the mask is constant
        along all of it, so the framework's own broadcasting does the rest. None when there is nothing
        to mask."""
        return self.allowed_block(causal=with_causal, window=window, lengths=lengths, bias=bias)

    def flat_bias(self, start: int = 0, stop: int | None = None) -> np.ndarray | None:
        """The bias flattened like :meth:`flat_mask` (``[N|1, H|1, T|1, S|1]``, in the dtype it was given),
        for query rows ``start:stop``; None without a bias. ``-inf`` entries are kept: they mean masked."""
        b = self._grouped_bias
        if b is None or b.shape[2] == 1:
            return b
        return b[:, :, start:stop]

    def bias_gradient(self, g) -> np.ndarray:
        """A gradient with respect to the flattened bias (the compact ``[N|1, H|1, T|1, S|1]`` of
        :meth:`flat_bias`, or the full ``[N, H, T, S]`` scores' gradient) as the gradient of the bias as given:
        summed over the axes the given bias broadcasts along, in its given shape."""
        g = np.asarray(g)
        shape = []
        for group, (start, stop) in enumerate(self._groups()):
            shape.extend(1 if g.shape[group] == 1 else self.scores_shape[a] for a in range(start, stop))
        g = g.reshape(shape)
        axes = tuple(a for a, size in enumerate(self.bias.shape) if size == 1 and shape[a] != 1)
        return g.sum(axis=axes, keepdims=True).reshape(self.given_bias.shape)

    def is_key_padding(self) -> bool:
        """Whether the mask (causal aside) depends on the batch and the key positions only: a padding mask."""
        if self.mask is None:
            return False
        nb = self.n_batch
        return all(d == 1 for d in self.mask.shape[nb:nb + 1 + len(self.attention_axes)])


def band_mask(start: int, stop: int, s: int, *, offset=0, causal: bool = False,
              window: tuple[int | None, int | None] | None = None) -> np.ndarray:
    """``[stop - start, s]`` booleans for query rows ``start:stop`` (``[N, stop - start, s]`` when ``offset`` is
    an ``[N]`` array, one per sequence): key j is allowed iff ``j <= i + offset`` (causal) and
    ``i + offset - left <= j <= i + offset + right`` (window)."""
    offset = np.asarray(offset, dtype=np.int64)
    offset = offset[:, None, None] if offset.ndim else offset
    rel = np.arange(s)[None, :] - np.arange(start, stop)[:, None] - offset  # j - diagonal(i)
    ok = np.ones(rel.shape, dtype=bool)
    if causal:
        ok &= rel <= 0
    if window is not None:
        left, right = window
        if left is not None:
            ok &= rel >= -left
        if right is not None:
            ok &= rel <= right
    return ok


def causal_mask(t: int, s: int, alignment: str = "top_left") -> np.ndarray:
    """Causal mask: query i may attend key j iff j <= i (top-left) or j <= i + s - t (bottom-right)."""
    alignment = check_causal(alignment)
    return band_mask(0, t, s, offset=s - t if alignment == "bottom_right" else 0, causal=True)


def check_causal(causal) -> str | None:
    """The causal alignment a ``causal`` argument asks for: None, ``"top_left"`` or ``"bottom_right"``.

    True means ``"top_left"`` (Keras's and today's default). A bool or one of the two names is accepted;
    another string is a ValueError, any other type a TypeError.
    """
    if isinstance(causal, (bool, np.bool_)):
        return "top_left" if causal else None
    if isinstance(causal, str):
        if causal in CAUSAL_ALIGNMENTS:
            return causal
        raise ValueError(f"causal must be False, True, 'top_left' or 'bottom_right', got {causal!r}")
    raise TypeError(f"causal must be a bool or one of 'top_left', 'bottom_right', got {causal!r}")


def check_window(window) -> tuple[int | None, int | None] | None:
    """``window`` as ``(left, right)``: each an int >= 0, or None for unbounded on that side.

    A bare int is refused: JAX reads ``w`` as ``(w, w)`` and Keras's ``sliding_window=w`` as ``|i - j| < w``,
    i.e. ``(w - 1, w - 1)``, so there is no reading both would agree with. ``(None, None)`` restricts
    nothing and is the same as None.
    """
    if window is None:
        return None
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"window must be None or a pair (left, right) of ints >= 0 or None, got {window!r}")
    out = []
    for side, value in zip(("left", "right"), window):
        if value is None:
            out.append(None)
            continue
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise TypeError(f"window {side} must be an int >= 0 or None, got {value!r} in window={window!r}")
        if value < 0:
            raise ValueError(f"window {side} must be an int >= 0 or None, got {value!r} in window={window!r}")
        out.append(int(value))
    return None if out == [None, None] else (out[0], out[1])


def _host_array(x) -> np.ndarray:
    """An integer argument given as a framework tensor (torch's, TensorFlow's, JAX's) or anything NumPy reads."""
    if hasattr(x, "detach") or hasattr(x, "numpy") and not isinstance(x, np.ndarray):
        x = x.detach().cpu().numpy() if hasattr(x, "detach") else x.numpy()
    return np.asarray(x)


def check_lengths(name: str, lengths, batch: int, limit: int, what: str) -> np.ndarray | None:
    """Lengths as an int64 ``[batch]`` array of values in ``0..limit`` (the flattened attended length)."""
    if lengths is None:
        return None
    arr = _host_array(lengths)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"{name} must be an integer array of shape [B] = [{batch}], got dtype {arr.dtype}")
    if arr.shape != (batch,):
        raise ValueError(f"{name} must have shape [B] = [{batch}] (one length per batch element), "
                         f"got shape {list(arr.shape)}")
    bad = np.nonzero((arr < 0) | (arr > limit))[0]
    if bad.size:
        raise ValueError(f"{name} must be in 0..{limit} (the number of {what} positions, attended axes "
                         f"flattened), got {arr[bad[0]]} at index {bad[0]}")
    return arr.astype(np.int64)


def check_query_offset(query_offset, batch: int, q_len: int, k_len: int) -> np.ndarray | None:
    """``query_offset`` as an int64 ``[batch]`` array (an int is every sequence's), each in ``-T..S``: from a
    block whose every query precedes the keys (row i sees key j <= i - T < 0: nothing) to one that follows
    them all (an offset beyond either end restricts nothing more)."""
    if query_offset is None:
        return None
    arr = _host_array(query_offset)
    if arr.dtype.kind not in "iu":
        got = repr(query_offset) if arr.ndim == 0 else f"dtype {arr.dtype}"
        raise TypeError(f"query_offset must be an int or an integer array of shape [B] = [{batch}] (the position of "
                        f"each sequence's first query among the keys), got {got}")
    if arr.ndim == 0:
        arr = np.full(batch, int(arr), dtype=np.int64)
    if arr.shape != (batch,):
        raise ValueError(f"query_offset must be an int or have shape [B] = [{batch}] (one offset per batch element), "
                         f"got shape {list(arr.shape)}")
    bad = np.nonzero((arr < -q_len) | (arr > k_len))[0]
    if bad.size:
        raise ValueError(f"query_offset must be in -{q_len}..{k_len} (-T..S, attended axes flattened: from a query "
                         f"block before every key to one after them all), got {arr[bad[0]]} at index {bad[0]}")
    return arr.astype(np.int64)


def _check_real(name: str, value, what: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {what}, or None, got {value!r}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be {what}, or None, got {value!r}")
    return float(value)


def check_softcap(softcap) -> float | None:
    """``softcap`` as a float > 0, or None (no cap). 0 is refused rather than read as "off" (ONNX's
    attribute default): a cap of 0 has no meaning, and None says "off" unambiguously."""
    value = _check_real("softcap", softcap, "a positive finite number (logits become softcap * tanh(logits / "
                                            "softcap))")
    if value is not None and value <= 0:
        raise ValueError(f"softcap must be a positive finite number (logits become softcap * tanh(logits / "
                         f"softcap)), or None, got {softcap!r}")
    return value


def check_scale(scale) -> float | None:
    """``scale`` as a finite float (it multiplies q . k in place of 1/sqrt(key_dim)), or None."""
    return _check_real("scale", scale, "a finite number (it multiplies q . k in place of 1/sqrt(key_dim))")


def validate_call(spec: AttentionSpec, weights_dims: tuple[int, int, int], query, value, key=None,
                  mask=None, causal=False, *, window=None, bias=None, query_lengths=None,
                  key_value_lengths=None, query_offset=None, softcap=None, scale=None) -> Call:
    """Check one call against the spec and the weights' feature widths (Dq, Dk, Dv).

    Positions are those of the flattened attended axes: query row i in ``0..T-1``, key j in ``0..S-1``.

    - ``causal``: False; True or ``"top_left"`` (key j <= i); ``"bottom_right"`` (j <= i + S - T: the
      last query row sees every key, as in decoding with a key/value cache; PyTorch's
      ``causal_lower_right``, FlashAttention's causal). With T > S bottom-right, rows i < T - S have no
      allowed key: they are fully masked rows (canonically all-zero weights, output ``bo``). The
      alignment is by the call's shapes T and S, not by any lengths.
    - ``window=(left, right)``: key j allowed iff ``i + d - left <= j <= i + d + right`` where ``d`` is the
      causal diagonal's offset (0, or ``S - T`` for ``causal="bottom_right"``). Without bottom-right
      causal it is JAX's ``local_window_size``; Keras's ``sliding_window=w`` is ``(w - 1, w - 1)``; with it,
      FlashAttention's ``window_size``. ``None`` on a side: unbounded.
    - ``bias``: a float array read by the mask rule (:func:`read_mask`), added to the scaled logits. A
      position masked by anything else stays masked whatever its bias; a ``-inf`` bias masks its position
      (a row whose every position is masked or ``-inf`` is fully masked); NaN and ``+inf`` at an allowed
      position propagate as arithmetic dictates (the row is NaN).
    - ``query_lengths`` / ``key_value_lengths``: int arrays ``[B]``, broadcast over non-attended axes. Key j
      of batch b is allowed iff ``j < key_value_lengths[b]``; query rows ``i >= query_lengths[b]`` attend
      to nothing, so they are fully masked (output ``bo``), as JAX's ``query_seq_lengths`` gives.
    - ``query_offset``: an int or an int array ``[B]`` in ``-T..S``: query row i of batch element b sits at key
      position ``query_offset[b] + i`` (keys at 0..S-1), and causal and the window are measured from that
      diagonal. 0 is top-left; ``S - T`` is bottom-right; a decoder with a key/value cache holding ``P[b]``
      earlier tokens and T new ones passes ``P`` (ONNX's ``past_key`` length, or ``nonpad_kv_seqlen - T``;
      FlashAttention's ``cache_seqlens``). It needs ``causal`` True (not ``"bottom_right"``, which fixes the
      offset at ``S - T``) or a window to restrict anything; alone it changes nothing.
    - ``softcap``: a float > 0: each scaled logit s becomes ``softcap * tanh(s / softcap)``, before the bias
      is added and before masking (so a masked position stays masked), as ONNX's ``softcap`` attribute.
    - ``scale``: a finite float multiplying ``q . k`` in place of ``1 / sqrt(key_dim)``.

    All restrictions combine with the mask by AND.
    """
    q_dim, k_dim, v_dim = weights_dims
    query = _as_array("query", query)
    value = _as_array("value", value)
    key_given = key is not None
    key = _as_array("key", key) if key_given else value
    alignment = check_causal(causal)
    window = check_window(window)
    softcap, scale = check_softcap(softcap), check_scale(scale)
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
    given_bias = None
    if bias is not None:
        given_bias = _as_array("bias", bias, floating_only="added to the scaled logits; a boolean may-attend "
                                                         "mask goes in mask=")
        bias = read_mask(given_bias, scores_shape, len(batch_shape), len(axes), name="bias")
    B = query.shape[0]
    q_len, k_len = math.prod(q_att), math.prod(k_att)
    query_lengths = check_lengths("query_lengths", query_lengths, B, q_len, "query")
    key_value_lengths = check_lengths("key_value_lengths", key_value_lengths, B, k_len, "key/value")
    query_offset = check_query_offset(query_offset, B, q_len, k_len)
    if query_offset is not None and alignment == "bottom_right":
        raise ValueError("query_offset cannot be combined with causal='bottom_right', which fixes every sequence's "
                         "offset at S - T; pass causal=True with query_offset")
    return Call(query=query, value=value, key=key, key_given=key_given, mask=mask, causal=alignment is not None,
                attention_axes=axes, batch_axes=batch_axes, scores_shape=scores_shape,
                output_shape=output_shape, given_mask=given, causal_alignment=alignment, window=window,
                bias=bias, given_bias=given_bias, query_lengths=query_lengths,
                key_value_lengths=key_value_lengths, query_offset=query_offset, softcap=softcap, scale=scale)


def read_mask(mask: np.ndarray, scores_shape: tuple[int, ...], n_batch: int, n_attended: int,
              name: str = "mask") -> np.ndarray:
    """The canonical (Keras) reading of a mask (or of a bias: ``name``), as a view of the scores' rank.

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
        raise ValueError(f"{name} of shape {list(mask.shape)} has {mask.ndim} axes; expected {2 * n_attended} to "
                         f"{len(scores_shape)} for scores of shape {list(scores_shape)}: {rule}")
    full = mask.reshape(mask.shape[:lead] + (1,) * (n_batch + 1 - lead) + mask.shape[lead:])
    try:
        ok = np.broadcast_shapes(full.shape, scores_shape) == tuple(scores_shape)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{name} of shape {list(mask.shape)} does not broadcast to the scores "
                         f"{list(scores_shape)}: {rule}")
    return full


def score_scale(spec: AttentionSpec, call: Call) -> float:
    """What ``q . k`` is multiplied by: the call's ``scale``, else 1/sqrt(key_dim)."""
    return call.scale if call.scale is not None else 1.0 / math.sqrt(spec.key_dim)


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
