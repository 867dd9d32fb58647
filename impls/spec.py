"""The canonical description of one multi-head attention layer: its spec and weights.

Weights use Keras's einsum layout (see DESIGN.md):
``Wq [Dq, H, key_dim]``, ``Wk [Dk, Hkv, key_dim]``, ``Wv [Dv, Hkv, value_dim]``,
``Wo [H, value_dim, *out]`` and biases without the input feature axis
(``bq [H, key_dim]``, ``bk [Hkv, key_dim]``, ``bv [Hkv, value_dim]``, ``bo [*out]``).
``Hkv`` is ``num_kv_heads``: equal to ``H`` for classic multi-head attention,
a divisor of ``H`` for grouped-query attention (1: multi-query attention).
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Mapping

import numpy as np

WEIGHT_NAMES = ("Wq", "bq", "Wk", "bk", "Wv", "bv", "Wo", "bo")
BIAS_NAMES = ("bq", "bk", "bv", "bo")


def _positive_int(name: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _output_shape(value) -> tuple[int, ...] | None:
    """``output_shape`` as a tuple of positive ints.

    A value of the wrong *type* (a float, a string, a tuple holding one) raises TypeError; the right type
    with a wrong *value* (an empty tuple, a size < 1) raises ValueError. Keras raises ValueError for
    both; we follow Python's own convention instead, as NumPy (``np.zeros((2.5,))``) and PyTorch
    (``torch.empty(2.5)``) do, and as every other field of this spec does (``num_heads=2.5`` is a
    TypeError here, a ValueError in Keras). The validation runs before any adapter, so the type is the
    same whichever framework is behind it.
    """
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value,)
    if not isinstance(value, (tuple, list)):
        raise TypeError(f"output_shape must be an int or a non-empty tuple of ints, got {value!r}")
    if len(value) == 0:
        raise ValueError(f"output_shape must be an int or a non-empty tuple of ints, got {value!r}")
    return tuple(_positive_int("output_shape", d) for d in value)


@dataclass(frozen=True)
class AttentionSpec:
    """What a layer computes; the same fields as ``keras.layers.MultiHeadAttention``.

    ``attention_axes`` index the axes of the full input (0 is the batch axis,
    the last axis is the feature axis); negative indices are allowed. ``None``
    means every axis between batch and features. Axes are resolved against a
    concrete input rank with :meth:`resolve_axes`.

    ``num_kv_heads`` (grouped-query attention): the number of key/value heads, ``None`` for
    ``num_heads`` (classic multi-head attention). It must divide ``num_heads``; query head ``h`` reads
    key/value head ``h // (num_heads // num_kv_heads)``, so consecutive query heads share one key/value
    head (the layout of PyTorch's ``enable_gqa`` and of JAX's ``dot_product_attention``). ``1`` is
    multi-query attention. It is the last field so positional construction keeps its meaning.
    """

    num_heads: int
    key_dim: int
    value_dim: int | None = None
    output_shape: int | tuple[int, ...] | None = None
    attention_axes: int | tuple[int, ...] | None = None
    use_bias: bool = True
    dropout: float = 0.0
    num_kv_heads: int | None = None

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "num_heads", _positive_int("num_heads", self.num_heads))
        set_(self, "key_dim", _positive_int("key_dim", self.key_dim))
        set_(self, "value_dim", _positive_int("value_dim", self.value_dim, allow_none=True))
        set_(self, "output_shape", _output_shape(self.output_shape))
        axes = self.attention_axes
        if axes is not None:
            if isinstance(axes, numbers.Integral) and not isinstance(axes, bool):
                axes = (axes,)
            if not isinstance(axes, (tuple, list)) or len(axes) == 0:
                raise TypeError(f"attention_axes must be None, an int or a non-empty tuple of ints, got {self.attention_axes!r}")
            for a in axes:
                if isinstance(a, bool) or not isinstance(a, numbers.Integral):
                    raise TypeError(f"attention_axes must contain ints, got {self.attention_axes!r}")
            axes = tuple(int(a) for a in axes)
        set_(self, "attention_axes", axes)
        if not isinstance(self.use_bias, (bool, np.bool_)):
            raise TypeError(f"use_bias must be a bool, got {self.use_bias!r}")
        set_(self, "use_bias", bool(self.use_bias))
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, numbers.Real) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be a float in [0, 1), got {self.dropout!r}")
        set_(self, "dropout", float(self.dropout))
        kv = _positive_int("num_kv_heads", self.num_kv_heads, allow_none=True)
        if kv is not None and self.num_heads % kv:
            raise ValueError(f"num_kv_heads must divide num_heads={self.num_heads} (query head h reads key/value "
                             f"head h // (num_heads // num_kv_heads)), got num_kv_heads={kv}")
        set_(self, "num_kv_heads", kv)

    @property
    def kv_heads(self) -> int:
        """The number of key/value heads (``num_kv_heads`` or ``num_heads``)."""
        return self.num_kv_heads if self.num_kv_heads is not None else self.num_heads

    @property
    def group_size(self) -> int:
        """Query heads per key/value head: query head ``h`` reads key/value head ``h // group_size``."""
        return self.num_heads // self.kv_heads

    @property
    def value_head_dim(self) -> int:
        """The per-head width of the value projection (``value_dim`` or ``key_dim``)."""
        return self.value_dim if self.value_dim is not None else self.key_dim

    def out_shape(self, query_dim: int) -> tuple[int, ...]:
        return self.output_shape if self.output_shape is not None else (int(query_dim),)

    def resolve_axes(self, rank: int) -> tuple[int, ...]:
        """Attention axes as sorted positive indices into an input of ``rank`` dims.

        Raises ValueError for an axis out of range, repeated, or naming the
        batch (0) or feature (rank - 1) axis.
        """
        if rank < 3:
            raise ValueError(f"query must have rank >= 3 ([B, *Q, D]), got rank {rank}")
        if self.attention_axes is None:
            return tuple(range(1, rank - 1))
        resolved = []
        for a in self.attention_axes:
            p = a + rank if a < 0 else a
            if not 0 <= p < rank:
                raise ValueError(
                    f"attention_axes={self.attention_axes!r}: axis {a} is out of range for inputs of rank {rank} "
                    f"(expected axes in 1..{rank - 2} or {-(rank - 1)}..-2)")
            if p == 0 or p == rank - 1:
                raise ValueError(
                    f"attention_axes={self.attention_axes!r}: axis {a} is the {'batch' if p == 0 else 'feature'} axis "
                    f"of inputs of rank {rank}; expected axes in 1..{rank - 2}")
            if p in resolved:
                raise ValueError(f"attention_axes={self.attention_axes!r}: axis {a} is repeated")
            resolved.append(p)
        return tuple(sorted(resolved))

    def to_dict(self) -> dict:
        return {
            "num_heads": self.num_heads, "key_dim": self.key_dim, "value_dim": self.value_dim,
            "output_shape": list(self.output_shape) if self.output_shape else None,
            "attention_axes": list(self.attention_axes) if self.attention_axes else None,
            "use_bias": self.use_bias, "dropout": self.dropout, "num_kv_heads": self.num_kv_heads,
        }

    @classmethod
    def from_dict(cls, d: Mapping) -> "AttentionSpec":
        d = dict(d)
        for k in ("output_shape", "attention_axes"):
            if d.get(k) is not None:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass(frozen=True, eq=False)
class Weights:
    """Canonical float64 weights. Biases are ``None`` when the layer has none."""

    Wq: np.ndarray
    Wk: np.ndarray
    Wv: np.ndarray
    Wo: np.ndarray
    bq: np.ndarray | None = None
    bk: np.ndarray | None = None
    bv: np.ndarray | None = None
    bo: np.ndarray | None = None

    def __post_init__(self):
        for name in WEIGHT_NAMES:
            value = getattr(self, name)
            if value is None:
                if name in BIAS_NAMES:
                    continue
                raise TypeError(f"Weights: {name} is required, got None")
            arr = np.asarray(value)
            if arr.dtype.kind not in "fiu":
                raise TypeError(f"Weights: {name} must be a real numeric array, got dtype {arr.dtype}")
            arr = np.array(arr, dtype=np.float64)  # a private copy
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"Weights: {name} contains NaN or Inf; weights must be finite")
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        biases = [getattr(self, n) is not None for n in BIAS_NAMES]
        if any(biases) and not all(biases):
            missing = [n for n, b in zip(BIAS_NAMES, biases) if not b]
            raise ValueError(f"Weights: biases must be all present or all absent; missing {missing}")
        self._check_internal_shapes()

    # ---- shapes -------------------------------------------------------------
    def _check_internal_shapes(self):
        def need(name, ndim_min, ndim_max=None):
            a = getattr(self, name)
            hi = ndim_max if ndim_max is not None else ndim_min
            if not ndim_min <= a.ndim <= hi:
                want = f"{ndim_min}" if ndim_min == hi else f"{ndim_min}..{hi}" if hi < 99 else f">= {ndim_min}"
                raise ValueError(f"Weights: {name} must have rank {want}, got shape {a.shape}")
        need("Wq", 3); need("Wk", 3); need("Wv", 3); need("Wo", 3, 99)
        H, kd = self.Wq.shape[1:]
        Hkv = self.Wk.shape[1]
        if self.Wk.shape[2] != kd or Hkv < 1 or H % Hkv:
            raise ValueError(f"Weights: Wk must have shape [Dk, Hkv, {kd}] with Hkv dividing the {H} heads of "
                             f"Wq {self.Wq.shape} (Hkv = {H} unless grouped-query), got {self.Wk.shape}")
        vd = self.Wv.shape[2]
        if self.Wv.shape[1] != Hkv:
            raise ValueError(f"Weights: Wv must have shape [Dv, {Hkv}, value_dim] (as many heads as Wk "
                             f"{self.Wk.shape}), got {self.Wv.shape}")
        if self.Wo.shape[:2] != (H, vd):
            raise ValueError(f"Weights: Wo must have shape [{H}, {vd}, *out], got {self.Wo.shape}")
        if self.has_bias:
            expected = {"bq": (H, kd), "bk": (Hkv, kd), "bv": (Hkv, vd), "bo": self.Wo.shape[2:]}
            for n, shp in expected.items():
                if getattr(self, n).shape != shp:
                    raise ValueError(f"Weights: {n} must have shape {list(shp)}, got {list(getattr(self, n).shape)}")

    @property
    def has_bias(self) -> bool:
        return self.bq is not None

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads (``Wk.shape[1]``): the query heads' count unless grouped-query."""
        return self.Wk.shape[1]

    @property
    def query_dim(self) -> int:
        return self.Wq.shape[0]

    @property
    def key_input_dim(self) -> int:
        return self.Wk.shape[0]

    @property
    def value_input_dim(self) -> int:
        return self.Wv.shape[0]

    def check_spec(self, spec: AttentionSpec) -> None:
        """Raise ValueError unless these weights are the right shapes for ``spec``."""
        H, Hkv, kd, vd = spec.num_heads, spec.kv_heads, spec.key_dim, spec.value_head_dim
        out = spec.out_shape(self.query_dim)
        expected = {
            "Wq": (self.query_dim, H, kd), "Wk": (self.key_input_dim, Hkv, kd),
            "Wv": (self.value_input_dim, Hkv, vd), "Wo": (H, vd, *out),
        }
        if spec.use_bias:
            expected.update({"bq": (H, kd), "bk": (Hkv, kd), "bv": (Hkv, vd), "bo": tuple(out)})
        for name, shp in expected.items():
            got = getattr(self, name)
            if got is None:
                raise ValueError(f"weights: {name} is missing but spec.use_bias=True expects shape {list(shp)}")
            if got.shape != shp:
                raise ValueError(f"weights: {name} has shape {list(got.shape)}, expected {list(shp)} for {spec}")
        if not spec.use_bias and self.has_bias:
            raise ValueError("weights: biases are present but spec.use_bias=False")

    # ---- construction -------------------------------------------------------
    @classmethod
    def random(cls, spec: AttentionSpec, query_dim: int, value_dim: int, key_dim: int | None = None,
               seed: int = 0, scale: float = 1.0) -> "Weights":
        """Reproducible weights for ``spec``: Glorot-like uniform kernels, small biases.

        ``query_dim``, ``value_dim`` and ``key_dim`` are the feature widths of
        the query, value and key *inputs* (``key_dim`` defaults to ``value_dim``).
        """
        query_dim = _positive_int("query_dim", query_dim)
        value_dim = _positive_int("value_dim", value_dim)
        key_dim = _positive_int("key_dim", key_dim if key_dim is not None else value_dim)
        rng = np.random.default_rng(seed)
        H, Hkv, kd, vd = spec.num_heads, spec.kv_heads, spec.key_dim, spec.value_head_dim
        out = spec.out_shape(query_dim)

        def kernel(fan_in, shape):
            fan_out = math.prod(shape) // fan_in
            limit = scale * math.sqrt(6.0 / (fan_in + fan_out))
            return rng.uniform(-limit, limit, size=shape)

        arrays = {
            "Wq": kernel(query_dim, (query_dim, H, kd)),
            "Wk": kernel(key_dim, (key_dim, Hkv, kd)),
            "Wv": kernel(value_dim, (value_dim, Hkv, vd)),
            "Wo": kernel(H * vd, (H, vd, *out)),
        }
        if spec.use_bias:
            arrays.update({
                "bq": rng.uniform(-0.1, 0.1, (H, kd)), "bk": rng.uniform(-0.1, 0.1, (Hkv, kd)),
                "bv": rng.uniform(-0.1, 0.1, (Hkv, vd)), "bo": rng.uniform(-0.1, 0.1, out),
            })
        return cls(**arrays)

    def as_dict(self) -> dict[str, np.ndarray]:
        return {n: getattr(self, n) for n in WEIGHT_NAMES if getattr(self, n) is not None}

    def save(self, path) -> None:
        np.savez(path, **self.as_dict())

    @classmethod
    def load(cls, path) -> "Weights":
        with np.load(path, allow_pickle=False) as data:
            unknown = set(data.files) - set(WEIGHT_NAMES)
            if unknown:
                raise ValueError(f"Weights.load({path!s}): unknown arrays {sorted(unknown)}; expected {WEIGHT_NAMES}")
            return cls(**{k: data[k] for k in data.files})

    def equals(self, other: "Weights") -> bool:
        a, b = self.as_dict(), other.as_dict()
        return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    def __eq__(self, other):
        return isinstance(other, Weights) and self.equals(other)

    __hash__ = None
