"""Bad input: the area ``invalid``, one :class:`InvalidCase` per way to get a call wrong.

An invalid case is to a case what PyTorch's ``ErrorInput`` is to its ``SampleInput``
(torch/testing/_internal/opinfo/core.py): a valid sample call (the default self-attention case), made
invalid by one named transformation of :data:`INVALID_INPUTS`. Every adapter must then raise exactly the
ValueError or TypeError the shared validation raises for it, word for word, before any framework sees
the input: one ``raises`` row, in float32.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from mhabench.impls import Weights
from mhabench.schema import Area, Quantity

from .case import Case, spec as default_spec


@dataclass(frozen=True)
class BadCall:
    """Everything one call through an adapter takes: the spec (``AttentionSpec`` keyword arguments), the
    weights (a function of the spec, so a bad spec fails where the adapter builds), the inputs, the
    call-level ``features`` of modern attention, the dtype and the device."""

    spec: dict
    weights: Callable
    query: object
    value: object
    key: object
    mask: object
    causal: object
    features: dict = field(default_factory=dict)
    dtype: object = "float32"
    device: object = "cpu"

    def with_spec(self, **changes) -> "BadCall":
        return replace(self, spec={**self.spec, **changes})

    def with_features(self, **features) -> "BadCall":
        return replace(self, features={**self.features, **features})


def _with(**changes):
    return lambda call: replace(call, **changes)


def _reshaped(name, shape_fn):
    return lambda call: replace(call, **{name: np.zeros(shape_fn(getattr(call, name).shape))})


def _spec(**changes):
    return lambda call: call.with_spec(**changes)


def _features(**features):
    return lambda call: call.with_features(**features)


def _nan_weights(call: BadCall) -> BadCall:
    def weights(spec):
        arrays = dict(call.weights(spec).as_dict())
        arrays["Wq"] = arrays["Wq"].copy()
        arrays["Wq"][0, 0, 0] = np.nan
        return Weights(**arrays)
    return replace(call, weights=weights)


# name -> the transformation that makes the sample call bad (the sample: batch 2, length 8, width 8, two heads)
INVALID_INPUTS: dict[str, Callable[[BadCall], BadCall]] = {
    "value_batch_differs": _reshaped("value", lambda s: (s[0] + 1,) + s[1:]),
    "key_batch_differs": lambda call: replace(call, key=np.zeros((call.value.shape[0] + 1,) + call.value.shape[1:])),
    "value_rank_differs": _reshaped("value", lambda s: s[:1] + (1,) + s[1:]),
    "query_rank2": _reshaped("query", lambda s: s[1:]),
    "query_feature_dim": _reshaped("query", lambda s: s[:-1] + (s[-1] + 1,)),
    "value_feature_dim": _reshaped("value", lambda s: s[:-1] + (s[-1] + 1,)),
    "key_value_lengths_differ": lambda call: replace(call, key=np.zeros(call.value.shape[:1] + (
        call.value.shape[1] + 1,) + call.value.shape[2:])),
    "axes_out_of_range": _spec(attention_axes=(3,)),
    "axes_repeated": _spec(attention_axes=(1, 1)),
    "axes_batch_axis": _spec(attention_axes=(0,)),
    "axes_feature_axis": _spec(attention_axes=(-1,)),
    "mask_not_broadcastable": _with(mask=np.ones((2, 8, 7), dtype=bool)),
    "mask_too_many_axes": _with(mask=np.ones((1, 1, 2, 2, 8, 8), dtype=bool)),
    "mask_float": _with(mask=np.ones((2, 8, 8), dtype=np.float32)),
    "mask_int": _with(mask=np.ones((2, 8, 8), dtype=np.int64)),
    "causal_not_bool": _with(causal="yes"),
    "query_not_numeric": lambda call: replace(call, query=np.full(call.query.shape, "a")),
    "query_none": _with(query=None),
    "num_heads_zero": _spec(num_heads=0),
    "key_dim_zero": _spec(key_dim=0),
    "num_heads_float": _spec(num_heads=2.0),
    "weights_nan": _nan_weights,
    "dtype_unknown": _with(dtype="float8"),
    "device_unknown": _with(device="tpu"),
    # modern attention: the call-level features and grouped-query attention
    "causal_unknown_alignment": _with(causal="bottom_left"),
    "window_bare_int": _features(window=2),
    "window_negative": _features(window=(-1, 0)),
    "bias_boolean": lambda call: call.with_features(bias=np.ones(call.query.shape[1:2] * 2, dtype=bool)),
    "bias_not_broadcastable": _features(bias=np.zeros((2, 8, 7))),
    "key_value_lengths_too_long": _features(key_value_lengths=np.array([9, 8])),
    "key_value_lengths_one_per_batch": _features(key_value_lengths=np.array([8])),
    "query_lengths_float": _features(query_lengths=np.array([8.0, 8.0])),
    "num_kv_heads_not_dividing": _spec(num_kv_heads=3),
}
QUICK = ("value_batch_differs", "mask_not_broadcastable")  # in the reduced matrix


@dataclass(frozen=True)
class InvalidCase:
    """One bad input: the sample call (a default self-attention case drawn from ``seed``) made invalid by the
    transformation ``INVALID_INPUTS[invalid]``."""

    id: str
    invalid: str
    spec: dict = field(default_factory=default_spec)
    quick: bool = False
    seed: int = 0

    area = Area.INVALID.value
    computes = False  # the one row judges the error raised, not what a call computes

    def __post_init__(self):
        if self.invalid not in INVALID_INPUTS:
            raise ValueError(f"case {self.id}: invalid must name one of INVALID_INPUTS, got {self.invalid!r}")

    @property
    def sample(self) -> Case:
        """The valid case whose call is made bad (its inputs and weights are drawn from this case's seed)."""
        return Case(id=self.id, area=Area.SHAPES.value, spec=self.spec, seed=self.seed)

    def call(self) -> BadCall:
        """The bad call (raises nothing itself: the weights are built lazily, from the spec)."""
        sample = self.sample
        i = sample.inputs()
        weights = lambda spec: Weights.random(spec, sample.query_dim, sample.value_dim, seed=self.seed)
        good = BadCall(dict(sample.spec), weights, i.query, i.value, i.key, i.mask, i.causal)
        return INVALID_INPUTS[self.invalid](good)

    def row_fields(self) -> dict:
        """What the row records about the case: its sample's spec, shapes and seed."""
        return self.sample.row_fields()

    def quantities(self) -> tuple[Quantity, ...]:
        return (Quantity.RAISES,)

    def run_dtypes(self, dtypes) -> list[str]:
        """float32 whatever the run's dtypes: the error must not depend on the dtype."""
        return ["float32"]

    def estimated_bytes(self) -> int:
        return 0  # the call is rejected before anything is computed

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "InvalidCase":
        return cls(**d)


def cases() -> list[InvalidCase]:
    return [InvalidCase(id=f"invalid_{name}", invalid=name, quick=name in QUICK) for name in INVALID_INPUTS]
