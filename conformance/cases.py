"""The conformance case matrix, as data.

A :class:`Case` says everything needed to rebuild a call bit for bit: the
spec, the input shapes, whether key is distinct from value, the mask kind,
causal, an input scale, special values and the seed that draws inputs and
weights. Case ids are readable (``cross_T8_S4-heads3-mask_padding``) so a row
id ``<adapter>-<case>-<dtype>-<quantity>`` can be selected with ``pytest -k``
and mapped back to its case with :func:`find_case`.
"""
from __future__ import annotations

import itertools
import math
import zlib
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import numpy as np

from mhabench.impls import AttentionSpec, Weights
from mhabench.impls.validation import check_causal, check_window, validate_call
from mhabench.results import AREAS, DTYPES  # noqa: F401  (DTYPES: the dtypes a case runs in)

MASK_KINDS = ("none", "full", "broadcast", "padding", "per_head", "fully_masked_row", "all_allowed")
# The additive float bias of modern attention (drawn like a mask, read by the mask rule): ``TS`` one [T, S] for
# every batch and head; ``B1S`` per batch and key (a padding-like penalty); ``BHTS`` the full scores rank with a
# head axis; ``neg_inf`` some -inf entries, never a whole row; ``neg_inf_row`` query row 1 of batch 0 all -inf
# (a fully masked row made by the bias alone).
BIAS_KINDS = ("TS", "B1S", "BHTS", "neg_inf", "neg_inf_row")
# Padding given as lengths: ``key_value`` (batch b keeps fewer keys as b grows), ``query`` (likewise for query rows,
# which then attend to nothing), ``both``, and ``empty`` (a key/value length 0 in batch 0 and a query length 0 in
# the last batch element: whole fully masked batches).
LENGTHS_KINDS = ("key_value", "query", "both", "empty")
SPECIALS = (None, "nan_query", "nan_key", "nan_value", "inf_query", "inf_key", "ninf_value", "nan_masked_key",
            "nan_masked_value", "inf_masked_value")
# The forward quantities of a case, one per path a user takes: ``output`` from the framework's default call
# (no scores asked for: the fused path users run and the benchmarks time), ``output_with_scores`` and
# ``scores`` from the call that also returns the attention scores (often another code path).
FORWARD_QUANTITIES = ("output", "output_with_scores", "scores")
GRADIENT_QUANTITIES = ("grad_query", "grad_key", "grad_value", "grad_Wq", "grad_bq", "grad_Wk", "grad_bk",
                       "grad_Wv", "grad_bv", "grad_Wo", "grad_bo", "grad_bias")  # grad_bias: the additive bias's


@dataclass(frozen=True)
class Case:
    """One conformance case. Shapes exclude batch and features: ``query [batch, *q_shape, query_dim]``."""

    id: str
    area: str
    spec: dict
    batch: int = 2
    q_shape: tuple[int, ...] = (8,)
    k_shape: tuple[int, ...] = (8,)
    query_dim: int = 8
    key_dim: int = 8      # feature width of the key input
    value_dim: int = 8    # feature width of the value input
    key_distinct: bool = False
    mask: str = "none"
    causal: bool = False
    scale: float = 1.0
    special: str | None = None
    seed: int = 0
    shared_input: bool = False  # query, key and value are one array (x attends to itself)
    quick: bool = False   # in the reduced matrix the pytest view runs by default
    invalid: str | None = None  # area "invalid": the name of the bad input in INVALID_INPUTS
    # how many leading mask axes, from [batch, *non_attended, heads] (None: the kind's usual form)
    mask_lead: int | None = None
    gradients: bool = True  # gradient rows as well as the forward ones
    dtypes: tuple[str, ...] | None = None  # only these dtypes (None: every dtype of the run)
    # modern attention, call-level (grouped-query attention is the spec's num_kv_heads); ``causal`` above may
    # also be "bottom_right"
    window: tuple | None = None        # (left, right), either None = unbounded
    bias: str | None = None            # one of BIAS_KINDS
    lengths: str | None = None         # one of LENGTHS_KINDS

    def __post_init__(self):
        if self.area not in AREAS:
            raise ValueError(f"case {self.id}: area must be one of {AREAS}, got {self.area!r}")
        if self.mask not in MASK_KINDS:
            raise ValueError(f"case {self.id}: mask must be one of {MASK_KINDS}, got {self.mask!r}")
        if self.area == "invalid" and self.invalid not in INVALID_INPUTS:
            raise ValueError(f"case {self.id}: invalid must name one of INVALID_INPUTS, got {self.invalid!r}")
        if self.shared_input and (self.key_distinct or self.q_shape != self.k_shape
                                  or self.value_dim != self.query_dim):
            raise ValueError(f"case {self.id}: shared_input needs key_shape == query_shape, value_dim == query_dim "
                             f"and no distinct key")
        if self.special not in SPECIALS:
            raise ValueError(f"case {self.id}: special must be one of {SPECIALS}, got {self.special!r}")
        if self.bias not in (None,) + BIAS_KINDS:
            raise ValueError(f"case {self.id}: bias must be None or one of {BIAS_KINDS}, got {self.bias!r}")
        if self.lengths not in (None,) + LENGTHS_KINDS:
            raise ValueError(f"case {self.id}: lengths must be None or one of {LENGTHS_KINDS}, got {self.lengths!r}")
        alignment = check_causal(self.causal)
        # True is top-left (the classic value, kept so classic cases read as before); "top_left" is the same case
        object.__setattr__(self, "causal", "bottom_right" if alignment == "bottom_right" else alignment is not None)
        window = check_window(self.window)
        object.__setattr__(self, "window", None if window is None else tuple(window))
        object.__setattr__(self, "spec", AttentionSpec(**self.spec).to_dict())  # normalised, JSON-ready
        object.__setattr__(self, "q_shape", tuple(self.q_shape))
        object.__setattr__(self, "k_shape", tuple(self.k_shape))
        if self.dtypes is not None:
            object.__setattr__(self, "dtypes", tuple(self.dtypes))

    # ---- derived ------------------------------------------------------------
    @property
    def attention_spec(self) -> AttentionSpec:
        return AttentionSpec.from_dict(self.spec)

    @property
    def query_shape(self) -> tuple[int, ...]:
        return (self.batch, *self.q_shape, self.query_dim)

    @property
    def value_shape(self) -> tuple[int, ...]:
        return (self.batch, *self.k_shape, self.value_dim)

    @property
    def key_shape(self) -> tuple[int, ...] | None:
        return (self.batch, *self.k_shape, self.key_dim) if self.key_distinct else None

    @property
    def dims(self) -> tuple[int, int, int]:
        return self.query_dim, (self.key_dim if self.key_distinct else self.value_dim), self.value_dim

    def gradient_quantities(self) -> tuple[str, ...]:
        if self.area == "invalid" or not self.gradients:
            return ()
        names = ["grad_query"] + (["grad_key"] if self.key_distinct else []) + ["grad_value", "grad_Wq"]
        use_bias = self.attention_spec.use_bias
        names += [q for q in GRADIENT_QUANTITIES[3:-1] if q != "grad_Wq" and (use_bias or not q.startswith("grad_b"))]
        return tuple(names) + (("grad_bias",) if self.bias is not None else ())

    def quantities(self) -> tuple[str, ...]:
        if self.area == "invalid":
            return ("raises",)
        return FORWARD_QUANTITIES + self.gradient_quantities()

    def run_dtypes(self, dtypes) -> list[str]:
        """The dtypes of a run this case takes part in."""
        if self.area == "invalid":
            return ["float32"]
        return [d for d in dtypes if self.dtypes is None or d in self.dtypes]

    def shape_call(self):
        """A validated call on zero inputs: the scores' shape, the axes (no data drawn)."""
        k = np.zeros(self.key_shape) if self.key_distinct else None
        return validate_call(self.attention_spec, self.dims, np.zeros(self.query_shape),
                             np.zeros(self.value_shape), k)

    @property
    def modern(self) -> tuple[str, ...]:
        """The modern-attention features the case uses (names of ``impls.base.FEATURES``)."""
        call = self.shape_call()
        used = []
        if self.attention_spec.kv_heads != self.attention_spec.num_heads:
            used.append("gqa")
        if self.causal == "bottom_right" and call.q_len != call.k_len:
            used.append("causal_bottom_right")
        used += [name for name, on in (("window", self.window), ("bias", self.bias), ("lengths", self.lengths)) if on]
        return tuple(used)

    def estimated_bytes(self) -> int:
        """Bytes one float64 evaluation needs, roughly: inputs, projections, a few copies of the scores."""
        call = self.shape_call()
        scores = math.prod(call.scores_shape)
        io = sum(math.prod(s) for s in (self.query_shape, self.value_shape, self.key_shape or (0,)))
        out = math.prod(call.output_shape)
        return 8 * (6 * scores + 4 * io + 2 * out)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["q_shape"], d["k_shape"] = list(self.q_shape), list(self.k_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        return cls(**d)

    # ---- inputs -------------------------------------------------------------
    def inputs(self) -> "Inputs":
        """Inputs, weights, mask and cotangent drawn from ``seed`` (float64)."""
        spec = self.attention_spec
        q_dim, k_dim, v_dim = self.dims
        weights = Weights.random(spec, q_dim, v_dim, k_dim, seed=self.seed)
        rng = np.random.default_rng(self.seed + 1)
        query = rng.standard_normal(self.query_shape) * self.scale
        value = query if self.shared_input else rng.standard_normal(self.value_shape) * self.scale
        key = rng.standard_normal(self.key_shape) * self.scale if self.key_distinct else None
        call = self.shape_call()
        mask = make_mask(self.mask, call, spec.num_heads, rng, self.mask_lead)
        if self.special in ("nan_masked_key", "nan_masked_value", "inf_masked_value"):
            # padding masks the last key position of batch 0; a NaN there must stay invisible
            mask = make_mask("padding", call, spec.num_heads, rng)
        query, value, key = _plant_special(self.special, query, value, key)
        cotangent = rng.standard_normal(call.output_shape)
        # the modern features draw from their own stream, so every classic case keeps its inputs
        bias = make_bias(self.bias, call, spec.num_heads, np.random.default_rng([self.seed, 2]))
        query_lengths, key_value_lengths = make_lengths(self.lengths, call)
        return Inputs(spec, weights, query, value, key, mask, self.causal, cotangent, self.window, bias,
                      query_lengths, key_value_lengths)


@dataclass
class Inputs:
    spec: AttentionSpec
    weights: Weights
    query: np.ndarray
    value: np.ndarray
    key: np.ndarray | None
    mask: np.ndarray | None
    causal: bool | str
    cotangent: np.ndarray = field(repr=False)
    window: tuple | None = None
    bias: np.ndarray | None = field(default=None, repr=False)
    query_lengths: np.ndarray | None = None
    key_value_lengths: np.ndarray | None = None

    def args(self):
        """The positional arguments of the call: query, value, key, mask, causal."""
        return self.query, self.value, self.key, self.mask, self.causal

    def features(self) -> dict:
        """The call-level keyword arguments of modern attention that the case gives (none for a classic case)."""
        given = {"window": self.window, "bias": self.bias, "query_lengths": self.query_lengths,
                 "key_value_lengths": self.key_value_lengths}
        return {k: v for k, v in given.items() if v is not None}


USUAL_LEAD = {"broadcast": 0, "per_head": None}  # None: every leading axis, heads included; else batch axes


def make_mask(kind: str, call, num_heads: int, rng, lead: int | None = None) -> np.ndarray | None:
    """A boolean may-attend mask of the given kind for the call's scores shape.

    ``lead`` is how many leading axes it has, taken from ``[batch, *non_attended, heads]`` (the
    canonical reading lines them up from the left); by default ``broadcast`` has none ([T, S]),
    ``per_head`` has them all, the others have the batch-like ones.
    """
    nb = call.n_batch
    batch_shape = call.scores_shape[:nb]
    q_att = call.scores_shape[nb + 1:nb + 1 + len(call.attention_axes)]
    k_att = call.scores_shape[nb + 1 + len(call.attention_axes):]
    T, S = math.prod(q_att), math.prod(k_att)
    if kind == "none":
        return None
    if lead is None:
        lead = USUAL_LEAD.get(kind, nb)
        lead = nb + 1 if lead is None else lead
    lead_shape = (batch_shape + (num_heads,))[:lead]
    if kind == "all_allowed":
        return np.ones(lead_shape + q_att + k_att, dtype=bool)
    if kind == "padding":  # [B, 1.., S..]: batch b sees its first lengths[b] keys
        lengths = np.maximum(1, S - 1 - np.arange(batch_shape[0]) % max(S - 1, 1))
        flat = np.arange(S)[None, :] < lengths[:, None]
        shape = (batch_shape[0],) + (1,) * (max(lead, 1) - 1 + len(q_att)) + k_att
        return flat.reshape(shape)

    def random_rows(lead):  # every row keeps the first key (so causal leaves one too) and one random key
        m = rng.random(lead + (T, S)) < 0.6
        pick = rng.integers(0, S, size=lead + (T,))
        np.put_along_axis(m, pick[..., None], True, axis=-1)
        m[..., 0] = True
        return m

    m = random_rows(lead_shape)
    if kind == "fully_masked_row":
        m[(0,) * len(lead_shape) + (min(1, T - 1),)] = False
    return m.reshape(lead_shape + q_att + k_att)


def _attended(call):
    """(T, S, the attended query axes' sizes, the attended key axes' sizes) of a call."""
    nb, n = call.n_batch, len(call.attention_axes)
    q_att, k_att = call.scores_shape[nb + 1:nb + 1 + n], call.scores_shape[nb + 1 + n:]
    return math.prod(q_att), math.prod(k_att), q_att, k_att


def make_bias(kind: str | None, call, num_heads: int, rng) -> np.ndarray | None:
    """An additive float bias of the given kind (BIAS_KINDS) for the call's scores, read by the mask rule."""
    if kind is None:
        return None
    nb = call.n_batch
    _, _, q_att, k_att = _attended(call)
    batch_shape = call.scores_shape[:nb]
    if kind == "TS":
        return rng.standard_normal(q_att + k_att)
    if kind == "B1S":
        return rng.standard_normal(batch_shape[:1] + (1,) * (nb - 1 + len(q_att)) + k_att)
    if kind == "BHTS":
        return rng.standard_normal(batch_shape + (num_heads,) + q_att + k_att)
    b = rng.standard_normal(batch_shape + q_att + k_att)
    flat = b.reshape(batch_shape + (math.prod(q_att), math.prod(k_att)))  # a view: writes reach b
    if kind == "neg_inf":  # some -inf positions, the first key of every row kept finite
        flat[rng.random(flat.shape) < 0.3] = -np.inf
        flat[..., 0] = 0.5
    else:  # "neg_inf_row": query row 1 (or 0) of the first batch element is -inf everywhere
        flat[(0,) * nb + (min(1, flat.shape[-2] - 1),)] = -np.inf
    return b


def make_lengths(kind: str | None, call) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(query_lengths, key_value_lengths) of the given kind (LENGTHS_KINDS), int64 [B]: deterministic, like the
    padding mask, from the call's shapes."""
    if kind is None:
        return None, None
    T, S, _, _ = _attended(call)
    B = call.scores_shape[0]
    shrink = lambda n: np.maximum(min(n, 1), n - np.arange(B) * max(n // 2, 1)).astype(np.int64)  # n, n - n//2, .., 1
    query, key_value = None, None
    if kind in ("query", "both"):
        query = shrink(T)
    if kind in ("key_value", "both"):
        key_value = shrink(S)
    if kind == "empty":
        query, key_value = np.full(B, T, np.int64), np.full(B, S, np.int64)
        key_value[0] = 0
        query[-1] = 0
    return query, key_value


def _plant_special(special, query, value, key):
    """One NaN/Inf element at one position of batch 0 (the rest of the batch must stay clean)."""
    if special is None:
        return query, value, key
    kind, _, where = special.partition("_")
    target, index = {"masked_key": ("key", -1), "masked_value": ("value", -1)}.get(where, (where, 1))
    if target == "key" and key is None:
        target = "value"
    arrays = {"query": query, "value": value, "key": key}
    arr = arrays[target].copy()
    arr[(0,) + (index,) * (arr.ndim - 2) + (0,)] = {"nan": np.nan, "inf": np.inf, "ninf": -np.inf}[kind]
    arrays[target] = arr
    return arrays["query"], arrays["value"], arrays["key"]


# ---- the default matrix ------------------------------------------------------------------------------

def _spec(heads=2, key_dim=4, **kw) -> dict:
    return {"num_heads": heads, "key_dim": key_dim, **kw}


def _shapes() -> list[Case]:
    c = lambda id, **kw: Case(id=id, area="shapes", spec=kw.pop("spec", _spec()), **kw)
    cases = [
        c("self_T8-heads2_kd4"),
        c("cross_T8_S4-heads2", k_shape=(4,)),
        c("cross_T4_S8-heads2", q_shape=(4,), k_shape=(8,)),
        c("cross_T8_S4-key_distinct", k_shape=(4,), key_distinct=True, quick=True),
        c("cross_T6_S5-dims_q8_k6_v5", q_shape=(6,), k_shape=(5,), key_dim=6, value_dim=5, key_distinct=True),
        c("self_T8-value_dim6", spec=_spec(value_dim=6)),
        c("self_T8-output_shape5", spec=_spec(output_shape=5)),
        c("self_T8-output_shape2x3", spec=_spec(output_shape=(2, 3)), quick=True),
        c("self_T8-heads3_kd5", spec=_spec(3, 5)),
        c("self_T8-no_bias", spec=_spec(use_bias=False)),
        c("self_T8-batch1", batch=1),
        c("self_T1-len1", q_shape=(1,), k_shape=(1,)),
        c("cross_T1_S8-query_len1", q_shape=(1,)),
        c("cross_T8_S1-key_len1", k_shape=(1,)),
    ]
    for heads in (1, 2, 3, 8, 16):  # num_heads * key_dim == query width, as nn.MultiheadAttention needs
        cases.append(c(f"self_T8-heads{heads}", spec=_spec(heads, 2), query_dim=2 * heads,
                       value_dim=2 * heads, key_dim=2 * heads, quick=heads == 3))
    cases.append(c("cross_T8_S4-heads3", spec=_spec(3, 2), k_shape=(4,), query_dim=6, value_dim=6, key_dim=6))
    return cases


def _masks() -> list[Case]:
    c = lambda id, **kw: Case(id=id, area="masks", spec=_spec(), **kw)
    return [
        c("self_T8-mask_full", mask="full"),
        c("self_T8-mask_broadcast", mask="broadcast"),
        c("cross_T8_S4-heads2-mask_padding", k_shape=(4,), mask="padding", quick=True),
        c("self_T8-mask_per_head", mask="per_head"),
        c("self_T8-causal", causal=True),
        c("cross_T8_S4-causal", k_shape=(4,), causal=True),
        c("cross_T4_S8-causal", q_shape=(4,), causal=True),
        c("self_T8-causal-mask_padding", causal=True, mask="padding", quick=True),
        c("self_T8-mask_fully_masked_row", mask="fully_masked_row", quick=True),
        c("cross_T8_S4-key_distinct-mask_fully_masked_row", k_shape=(4,), key_distinct=True,
          mask="fully_masked_row"),
        c("self_T8-mask_all_allowed", mask="all_allowed"),
        c("self_T8-causal-mask_full", causal=True, mask="full"),
    ]


def _axes() -> list[Case]:
    c = lambda id, axes, q, k, **kw: Case(id=id, area="axes", spec=_spec(attention_axes=axes), q_shape=q,
                                          k_shape=k, **kw)
    return [
        c("rank4-axes_default", None, (3, 4), (2, 5)),
        c("rank4-axes_1", (1,), (3, 4), (2, 4)),
        c("rank4-axes_2", (2,), (3, 4), (3, 5)),
        c("rank4-axes_neg2", (-2,), (3, 4), (3, 5)),
        c("rank4-axes_1_2", (1, 2), (3, 4), (2, 5)),
        # a length-1 attended axis: a layer that flattens the attended axes gives [N, T, F], which broadcasts
        # against the call's [N, 1, T, F], so a missed reshape shows as wrong values rather than an error
        c("rank4-axes_1_2-length1_axis", (1, 2), (1, 4), (1, 5), quick=True),
        c("rank5-axes_2_3", (2, 3), (2, 3, 2), (2, 2, 3), quick=True),
        c("rank5-axes_neg3_neg2", (-3, -2), (2, 3, 2), (2, 2, 3)),
        c("rank4-axes_default-mask_full", None, (3, 4), (2, 5), mask="full"),
        c("rank4-axes_2-causal", (2,), (3, 4), (3, 5), causal=True),
        c("rank4-axes_default-causal", None, (2, 3), (2, 3), causal=True),
    ]


def _dtypes() -> list[Case]:
    c = lambda id, **kw: Case(id=id, area="dtypes", spec=_spec(), **kw)
    return [
        # inputs scaled so logits reach ~1e4: a softmax without max-subtraction overflows
        c("self_T8-large_logits", scale=60.0, quick=True),
        c("self_T8-large_logits-mask_padding", scale=60.0, mask="padding"),
        c("self_T8-small_inputs", scale=1e-3),
        c("cross_T16_S128-long_keys", q_shape=(16,), k_shape=(128,)),
    ]


def _special() -> list[Case]:
    c = lambda id, special, **kw: Case(id=id, area="special", spec=_spec(), special=special, **kw)
    return [
        c("self_T8-nan_query", "nan_query", quick=True),
        c("cross_T8_S4-nan_key", "nan_key", k_shape=(4,), key_distinct=True),
        c("self_T8-nan_value", "nan_value"),
        c("self_T8-inf_query", "inf_query"),
        c("cross_T8_S4-inf_key", "inf_key", k_shape=(4,), key_distinct=True),
        c("self_T8-ninf_value", "ninf_value"),
        c("cross_T8_S4-nan_masked_key", "nan_masked_key", k_shape=(4,), key_distinct=True, quick=True),
    ]


def _gradients() -> list[Case]:
    c = lambda id, **kw: Case(id=id, area="gradients", spec=kw.pop("spec", _spec()), **kw)
    return [
        c("grad-self_T8-heads2"),
        c("grad-cross_T8_S4-key_distinct", k_shape=(4,), key_distinct=True, quick=True),
        c("grad-cross_T6_S5-dims_q8_k6_v5", q_shape=(6,), k_shape=(5,), key_dim=6, value_dim=5,
          key_distinct=True),
        c("grad-self_T8-value_dim6-output_shape5", spec=_spec(value_dim=6, output_shape=5)),
        c("grad-self_T8-no_bias", spec=_spec(use_bias=False)),
        c("grad-self_T8-mask_padding", mask="padding"),
        c("grad-self_T8-causal", causal=True),
        c("grad-self_T8-mask_fully_masked_row", mask="fully_masked_row", quick=True),
        c("grad-rank4-axes_default", spec=_spec(), q_shape=(3, 4), k_shape=(2, 5)),
        c("grad-self_T8-heads8", spec=_spec(8, 2), query_dim=16, value_dim=16, key_dim=16),
        c("grad-self_T8-large_logits", scale=60.0),
    ]


# ---- invalid input: each entry turns a valid call into a bad one ------------------------------------
# The call is a dict: spec (AttentionSpec kwargs), weights (a function of the spec), query, value, key, mask,
# causal, features (the call-level keyword arguments of modern attention), dtype, device. Every adapter must raise
# the same ValueError/TypeError as the shared validation.

def _with(**changes):
    return lambda call: {**call, **changes}


def _reshaped(name, shape_fn):
    return lambda call: {**call, name: np.zeros(shape_fn(call[name].shape))}


def _nan_weights(call):
    def weights(spec):
        arrays = dict(call["weights"](spec).as_dict())
        arrays["Wq"] = arrays["Wq"].copy()
        arrays["Wq"][0, 0, 0] = np.nan
        return Weights(**arrays)
    return {**call, "weights": weights}


INVALID_INPUTS = {
    "value_batch_differs": _reshaped("value", lambda s: (s[0] + 1,) + s[1:]),
    "key_batch_differs": lambda call: {**call, "key": np.zeros((call["value"].shape[0] + 1,) + call["value"].shape[1:])},
    "value_rank_differs": _reshaped("value", lambda s: s[:1] + (1,) + s[1:]),
    "query_rank2": _reshaped("query", lambda s: s[1:]),
    "query_feature_dim": _reshaped("query", lambda s: s[:-1] + (s[-1] + 1,)),
    "value_feature_dim": _reshaped("value", lambda s: s[:-1] + (s[-1] + 1,)),
    "key_value_lengths_differ": lambda call: {**call, "key": np.zeros(call["value"].shape[:1] + (
        call["value"].shape[1] + 1,) + call["value"].shape[2:])},
    "axes_out_of_range": lambda call: {**call, "spec": {**call["spec"], "attention_axes": (3,)}},
    "axes_repeated": lambda call: {**call, "spec": {**call["spec"], "attention_axes": (1, 1)}},
    "axes_batch_axis": lambda call: {**call, "spec": {**call["spec"], "attention_axes": (0,)}},
    "axes_feature_axis": lambda call: {**call, "spec": {**call["spec"], "attention_axes": (-1,)}},
    "mask_not_broadcastable": lambda call: {**call, "mask": np.ones((2, 8, 7), dtype=bool)},
    "mask_too_many_axes": lambda call: {**call, "mask": np.ones((1, 1, 2, 2, 8, 8), dtype=bool)},
    "mask_float": lambda call: {**call, "mask": np.ones((2, 8, 8), dtype=np.float32)},
    "mask_int": lambda call: {**call, "mask": np.ones((2, 8, 8), dtype=np.int64)},
    "causal_not_bool": _with(causal="yes"),
    "query_not_numeric": lambda call: {**call, "query": np.full(call["query"].shape, "a")},
    "query_none": _with(query=None),
    "num_heads_zero": lambda call: {**call, "spec": {**call["spec"], "num_heads": 0}},
    "key_dim_zero": lambda call: {**call, "spec": {**call["spec"], "key_dim": 0}},
    "num_heads_float": lambda call: {**call, "spec": {**call["spec"], "num_heads": 2.0}},
    "weights_nan": _nan_weights,
    "dtype_unknown": _with(dtype="float8"),
    "device_unknown": _with(device="tpu"),
    # modern attention: the call-level features and grouped-query attention
    "causal_unknown_alignment": _with(causal="bottom_left"),
    "window_bare_int": lambda call: _feature(call, window=2),
    "window_negative": lambda call: _feature(call, window=(-1, 0)),
    "bias_boolean": lambda call: _feature(call, bias=np.ones(call["query"].shape[1:2] * 2, dtype=bool)),
    "bias_not_broadcastable": lambda call: _feature(call, bias=np.zeros((2, 8, 7))),
    "key_value_lengths_too_long": lambda call: _feature(call, key_value_lengths=np.array([9, 8])),
    "key_value_lengths_one_per_batch": lambda call: _feature(call, key_value_lengths=np.array([8])),
    "query_lengths_float": lambda call: _feature(call, query_lengths=np.array([8.0, 8.0])),
    "num_kv_heads_not_dividing": lambda call: {**call, "spec": {**call["spec"], "num_kv_heads": 3}},
}


def _feature(call, **features):
    return {**call, "features": {**call.get("features", {}), **features}}


def invalid_call(case: "Case") -> dict:
    """The bad call a case of area ``invalid`` makes (raises nothing itself: building it is lazy)."""
    i = case.inputs()
    weights_of = lambda spec: Weights.random(spec, case.query_dim, case.value_dim, seed=case.seed)
    call = {"spec": dict(case.spec), "weights": weights_of, "query": i.query, "value": i.value, "key": i.key,
            "mask": i.mask, "causal": i.causal, "features": {}, "dtype": "float32", "device": "cpu"}
    return INVALID_INPUTS[case.invalid](call)


def _invalid() -> list[Case]:
    return [Case(id=f"invalid_{name}", area="invalid", spec=_spec(), invalid=name,
                 quick=name in ("value_batch_differs", "mask_not_broadcastable"))
            for name in INVALID_INPUTS]


def _later() -> list[Case]:
    """Cases added after the first matrix, kept last so every earlier case keeps its seed."""
    shared = lambda id, area, **kw: Case(id=id, area=area, spec=kw.pop("spec", _spec()), shared_input=True, **kw)
    return [
        # x attends to itself through one array: what a fused qkv projection (the textbook layer) can express
        shared("shared_input_T8-heads2", "shapes", quick=True),
        shared("shared_input_T8-causal", "masks", causal=True),
        shared("shared_input_T8-mask_padding", "masks", mask="padding"),
        shared("shared_input_T8-mask_fully_masked_row", "masks", mask="fully_masked_row"),
        shared("grad-shared_input_T8-causal", "gradients", causal=True),
        # float16 accumulation error grows with the number of keys summed; from ~256 keys a float16 running
        # sum no longer passes (the mutation check's float16 mutant escapes at 128)
        Case(id="cross_T4_S512-long_keys", area="dtypes", spec=_spec(), q_shape=(4,), k_shape=(512,)),
        # found by the random cases: Keras's scores differ for two heads of key_dim 1 on one-wide inputs
        Case(id="cross_T1_S2-heads2_kd1-width1", area="shapes", spec=_spec(2, 1), batch=1, q_shape=(1,),
             k_shape=(2,), query_dim=1, key_dim=1, value_dim=1),
    ]


def _more() -> list[Case]:
    """Mask forms of every rank, decode, one head and key_dim 1, dropout while not training, NaN/Inf in a
    masked value, special values at key lengths either side of a SIMD width, lengths across kernel tiles."""
    out = []
    masks = lambda id, spec, q, k, lead, **kw: Case(id=id, area="masks", spec=spec, q_shape=q, k_shape=k, mask="full",
                                                    mask_lead=lead, **kw)
    # [T, S] up to the full scores rank with a head axis; with a free axis whose size equals the batch's
    # (batch 3, free 3), so a mask read NumPy-style (from the right) lines up without an error but wrongly
    out += [masks("mask_rank2_TS-cross_T4_S6", _spec(), (4,), (6,), 0),
            masks("mask_rank3_BTS-cross_T4_S6", _spec(), (4,), (6,), 1),
            masks("mask_rank4_BHTS-cross_T4_S6", _spec(), (4,), (6,), 2)]
    free = _spec(attention_axes=(2,))
    out += [masks(f"mask_rank{2 + lead}_{name}-free3_batch3-cross_T4_S5", free, (3, 4), (3, 5), lead, batch=3,
                  quick=lead == 1) for lead, name in ((0, "TS"), (1, "BTS"), (2, "BFTS"), (3, "BFHTS"))]
    two = _spec(attention_axes=(2, 3))
    out += [masks(f"mask_rank{4 + lead}_{name}-axes_2_3", two, (2, 3, 2), (2, 2, 3), lead)
            for lead, name in ((0, "TTSS"), (1, "BTTSS"), (2, "BFTTSS"), (3, "BFHTTSS"))]
    out.append(Case(id="mask_padding_rank3_B1S-free3_batch3", area="masks", spec=free, batch=3, q_shape=(3, 4),
                    k_shape=(3, 5), mask="padding", mask_lead=1))
    # decode: one query position against a cache of keys, with padding and causal (top-left: key 0 only)
    decode = lambda id, **kw: Case(id=id, area="masks", spec=_spec(), q_shape=(1,), k_shape=(8,), **kw)
    out += [decode("decode_T1_S8-causal", causal=True, quick=True), decode("decode_T1_S8-mask_padding", mask="padding"),
            decode("decode_T1_S8-mask_padding-causal", mask="padding", causal=True)]
    shapes = lambda id, spec, **kw: Case(id=id, area="shapes", spec=spec, **kw)
    out += [shapes("self_T8-heads1_kd1", _spec(1, 1), query_dim=1, key_dim=1, value_dim=1),
            shapes("self_T8-heads1_kd4", _spec(1, 4), query_dim=4, key_dim=4, value_dim=4),
            shapes("cross_T6_S5-heads3_kd1", _spec(3, 1), q_shape=(6,), k_shape=(5,), query_dim=3, key_dim=3,
                   value_dim=3),
            # a per-head bias [H, 1] on inputs whose first inner axis has length H: Keras's TensorFlow ops.add
            # takes its bias_add shortcut along the wrong axis there (the catalogue's keras_tf_bias_add_shortcut)
            shapes("cross_T4_S3-heads3_kd1", _spec(3, 1), q_shape=(4,), k_shape=(3,)),
            shapes("cross_T4_S2-heads2_kd1", _spec(2, 1), q_shape=(4,), k_shape=(2,)),
            # no key at all (S = 0): every query row is fully masked, the canonical output is the output bias
            shapes("cross_T4_S0", _spec(), q_shape=(4,), k_shape=(0,)),
            shapes("self_T8-dropout0.3-not_training", _spec(dropout=0.3)),
            shapes("cross_T6_S4-dropout0.5-causal", _spec(dropout=0.5), q_shape=(6,), k_shape=(4,), causal=True),
            shapes("cross_T6_S4-output_shape3x2-mask_padding", _spec(output_shape=(3, 2)), q_shape=(6,), k_shape=(4,),
                   mask="padding"),
            Case(id="rank5-axes_2_3-causal", area="axes", spec=_spec(attention_axes=(2, 3)), q_shape=(2, 3, 2),
                 k_shape=(2, 2, 3), causal=True)]
    special = lambda id, s, **kw: Case(id=id, area="special", spec=_spec(), special=s, key_distinct=True, **kw)
    out += [special("cross_T8_S4-nan_masked_value", "nan_masked_value", k_shape=(4,)),
            special("cross_T8_S4-inf_masked_value", "inf_masked_value", k_shape=(4,))]
    # a NaN query at key lengths below, between and above the CPU SIMD widths (8 and 16 float32 lanes, 4 and 8
    # float64 ones): fused kernels treat a leftover tail of a row apart from its vectorised part. S = 3 is below
    # every width, so such a kernel shows on every machine and in every dtype
    out += [special(f"cross_T5_S{n}-nan_query", "nan_query", q_shape=(5,), k_shape=(n,)) for n in (3, 4, 12, 40)]
    # lengths either side of the tile sizes fused kernels use (64, 128, 256, 1024, 2048), T != S,
    # padding and causal, forward and gradients, in float32 and float16
    tiles = [(63, 65, "none", False), (65, 63, "padding", True), (127, 129, "padding", False), (129, 127, "none", True),
             (255, 257, "none", False), (257, 255, "padding", True), (1023, 1025, "padding", True),
             (1025, 1023, "none", True), (2049, 1025, "padding", False)]
    for t, s_len, mask, causal in tiles:
        name = f"tiles-cross_T{t}_S{s_len}" + ("-mask_padding" if mask == "padding" else "") + ("-causal" if causal else "")
        out.append(Case(id=name, area="dtypes", spec=_spec(), batch=1 if t > 500 else 2, q_shape=(t,),
                        k_shape=(s_len,), mask=mask, causal=causal, dtypes=("float32", "float16")))
    return out


def _modern() -> list[Case]:
    """Modern attention, each feature alone and with the classic ones: grouped-query attention with masks and
    causal; bottom-right causal with T < S and T > S (where the first T - S rows see nothing); windows, also at
    lengths either side of the tiles fused kernels use; the additive bias, with fully masked rows; lengths
    (fully masked query rows and whole batches). Gradients, the bias's included, for all of them."""
    c = lambda id, **kw: Case(id=f"modern-{id}", area="modern", spec=kw.pop("spec", _spec()), **kw)
    gqa, mqa = _spec(4, 2, num_kv_heads=2), _spec(3, 2, num_kv_heads=1)
    return [
        # grouped-query attention (query head h reads kv head h // group)
        c("gqa_h4_kv2-self_T8", spec=gqa, quick=True),
        c("gqa_h4_kv2-cross_T6_S9-mask_padding-causal", spec=gqa, q_shape=(6,), k_shape=(9,), mask="padding",
          causal=True),
        c("mqa_h3_kv1-mask_per_head", spec=mqa),
        c("gqa_h4_kv2-value_dim3-key_distinct-mask_fully_masked_row", spec=_spec(4, 2, value_dim=3, num_kv_heads=2),
          k_shape=(6,), key_distinct=True, mask="fully_masked_row"),
        c("gqa_h4_kv2-rank4-axes_default-causal", spec=gqa, q_shape=(2, 3), k_shape=(2, 3), causal=True),
        # causal aligned bottom-right (the key/value-cache case)
        c("bottom_right-cross_T4_S8", q_shape=(4,), causal="bottom_right", quick=True),
        c("bottom_right-cross_T8_S4", k_shape=(4,), causal="bottom_right"),
        c("bottom_right-decode_T1_S8-mask_padding", q_shape=(1,), causal="bottom_right", mask="padding"),
        c("bottom_right-cross_T5_S8-mask_full", q_shape=(5,), causal="bottom_right", mask="full"),
        c("bottom_right-rank4-axes_default-cross", q_shape=(2, 2), k_shape=(2, 3), causal="bottom_right"),
        c("bottom_right-gqa_h4_kv2-cross_T3_S7", spec=gqa, q_shape=(3,), k_shape=(7,), causal="bottom_right"),
        # sliding windows, measured from the causal diagonal
        c("window_2_2-self_T8", window=(2, 2)),
        c("window_3_0-self_T8", window=(3, 0), quick=True),
        c("window_3_none-causal-self_T8", window=(3, None), causal=True),
        c("window_none_1-cross_T6_S9-mask_full", q_shape=(6,), k_shape=(9,), window=(None, 1), mask="full"),
        c("window_1_1-cross_T8_S4", k_shape=(4,), window=(1, 1)),  # rows past S + 1 see nothing
        c("window_2_0-bottom_right-cross_T4_S8", q_shape=(4,), window=(2, 0), causal="bottom_right"),
        c("window_1_2-rank5-axes_2_3", spec=_spec(attention_axes=(2, 3)), q_shape=(2, 3, 2), k_shape=(2, 2, 3),
          window=(1, 2)),
        # windows across the tiles of fused kernels (64, 128): a band that a tile boundary cuts
        c("window_16_0-tiles-self_T129-causal", batch=1, q_shape=(129,), k_shape=(129,), window=(16, 0), causal=True,
          dtypes=("float32", "float64")),
        c("window_32_32-tiles-cross_T65_S129", batch=1, q_shape=(65,), k_shape=(129,), window=(32, 32),
          dtypes=("float32", "float64")),
        c("window_40_0-tiles-cross_T65_S129-bottom_right", batch=1, q_shape=(65,), k_shape=(129,), window=(40, 0),
          causal="bottom_right", dtypes=("float32", "float64")),
        # the additive bias, alone, with masks and causal, and with fully masked rows
        c("bias_TS-self_T8", bias="TS", quick=True),
        c("bias_B1S-cross_T8_S4-causal", k_shape=(4,), bias="B1S", causal=True),
        c("bias_BHTS-cross_T6_S5-mask_full", q_shape=(6,), k_shape=(5,), bias="BHTS", mask="full"),
        c("bias_neg_inf-self_T8-mask_padding", bias="neg_inf", mask="padding"),
        c("bias_neg_inf_row-self_T8", bias="neg_inf_row"),
        c("bias_TS-self_T8-mask_fully_masked_row", bias="TS", mask="fully_masked_row"),
        c("bias_BHTS-gqa_h4_kv2-rank4-axes_2", spec=_spec(4, 2, num_kv_heads=2, attention_axes=(2,)), q_shape=(3, 4),
          k_shape=(3, 5), bias="BHTS"),
        c("bias_TS-large_logits", bias="TS", scale=60.0),
        # padding given as lengths
        c("lengths_key_value-cross_T6_S8", q_shape=(6,), lengths="key_value", quick=True),
        c("lengths_query-self_T8", lengths="query"),
        c("lengths_both-self_T8-causal-mask_full", lengths="both", causal=True, mask="full"),
        c("lengths_empty-cross_T4_S6", q_shape=(4,), k_shape=(6,), lengths="empty"),
        c("lengths_both-rank4-axes_2-free3", spec=_spec(attention_axes=(2,)), batch=3, q_shape=(3, 4),
          k_shape=(3, 5), lengths="both"),
        # everything at once
        c("everything-gqa_h4_kv2-bottom_right-window_3_none-bias_TS-lengths_both-mask_full", spec=gqa, q_shape=(5,),
          k_shape=(7,), causal="bottom_right", window=(3, None), bias="TS", lengths="both", mask="full"),
    ]


# ---- the pairwise covering design ---------------------------------------------------------------------
# Every pair of levels of any two factors appears together in at least one case, for the forward and the
# gradient quantities alike (every case has both): a bug that needs two features at once is met. The table
# is data, made once by a greedy pairwise search and checked by tests/test_cases.py (pair_coverage).
PAIR_FACTORS = {
    "lengths": ("T=S", "T<S", "T>S", "T=1"),
    "mask": ("none", "padding", "broadcast", "full", "per_head", "fully_masked_row"),
    "causal": (False, True, "bottom_right"),
    "heads": (1, 2, 3),
    "key_dim": (1, 4),
    "value_dim": ("same", "other"),
    "output": ("default", "width5", "2x3"),
    "axes": ("rank3", "rank4_axis2", "rank4_axes12", "rank5_axes23"),
    "key": ("value", "distinct"),
    "bias": (True, False),
    "widths": ("equal", "mixed"),
    # modern attention: grouped-query ("fewer": one key/value head), the window ((1, 2), or (2, 0)), the additive
    # bias (BIAS_KINDS) and lengths (LENGTHS_KINDS); the classic rows (the first 29) use none of them
    "kv_heads": ("all", "fewer"),
    "window": ("none", "band", "left"),
    "logit_bias": ("none", "TS", "BHTS", "neg_inf_row"),
    "padding_lengths": ("none", "key_value", "query", "both"),
}
# Pairs no case can have: one head has no fewer key/value heads.
PAIR_EXCLUDED = {("heads", 1, "kv_heads", "fewer")}
PAIR_DESIGN = (
    ('T<S', 'per_head', False, 2, 4, 'other', 'default', 'rank4_axis2', 'distinct', True, 'equal', 'all', 'none',
     'none', 'none'),
    ('T=1', 'none', True, 1, 1, 'same', '2x3', 'rank4_axes12', 'value', False, 'mixed', 'all', 'none', 'none', 'none'),
    ('T>S', 'full', False, 3, 1, 'other', 'width5', 'rank3', 'distinct', False, 'mixed', 'all', 'none', 'none', 'none'),
    ('T=S', 'fully_masked_row', True, 3, 4, 'other', '2x3', 'rank5_axes23', 'value', True, 'equal', 'all', 'none',
     'none', 'none'),
    ('T=1', 'padding', True, 2, 4, 'same', 'width5', 'rank3', 'distinct', True, 'equal', 'all', 'none', 'none', 'none'),
    ('T>S', 'broadcast', True, 1, 1, 'same', 'default', 'rank4_axis2', 'value', False, 'mixed', 'all', 'none',
     'none', 'none'),
    ('T=S', 'broadcast', False, 1, 4, 'other', '2x3', 'rank4_axes12', 'distinct', True, 'mixed', 'all', 'none',
     'none', 'none'),
    ('T<S', 'padding', False, 2, 1, 'same', 'width5', 'rank5_axes23', 'distinct', False, 'mixed', 'all', 'none',
     'none', 'none'),
    ('T>S', 'full', False, 2, 1, 'same', '2x3', 'rank4_axes12', 'value', True, 'equal', 'all', 'none', 'none', 'none'),
    ('T=S', 'per_head', False, 1, 1, 'same', 'width5', 'rank3', 'value', False, 'mixed', 'all', 'none', 'none', 'none'),
    ('T=1', 'none', False, 3, 4, 'same', 'default', 'rank4_axes12', 'distinct', False, 'equal', 'all', 'none',
     'none', 'none'),
    ('T<S', 'fully_masked_row', True, 1, 1, 'other', 'width5', 'rank4_axes12', 'value', False, 'mixed', 'all',
     'none', 'none', 'none'),
    ('T<S', 'full', True, 1, 4, 'other', 'default', 'rank5_axes23', 'value', False, 'equal', 'all', 'none', 'none',
     'none'),
    ('T=1', 'none', True, 3, 4, 'other', 'width5', 'rank4_axis2', 'distinct', True, 'mixed', 'all', 'none', 'none',
     'none'),
    ('T<S', 'fully_masked_row', False, 2, 1, 'same', 'default', 'rank3', 'distinct', False, 'mixed', 'all', 'none',
     'none', 'none'),
    ('T>S', 'padding', True, 3, 4, 'other', 'default', 'rank4_axis2', 'value', False, 'equal', 'all', 'none', 'none',
     'none'),
    ('T<S', 'broadcast', False, 3, 4, 'same', '2x3', 'rank3', 'value', False, 'equal', 'all', 'none', 'none', 'none'),
    ('T=1', 'per_head', True, 3, 1, 'same', '2x3', 'rank5_axes23', 'distinct', False, 'mixed', 'all', 'none', 'none',
     'none'),
    ('T=S', 'none', True, 2, 4, 'same', 'default', 'rank3', 'value', True, 'equal', 'all', 'none', 'none', 'none'),
    ('T=S', 'padding', False, 2, 4, 'other', '2x3', 'rank4_axis2', 'distinct', True, 'equal', 'all', 'none', 'none',
     'none'),
    ('T=1', 'broadcast', False, 2, 4, 'other', 'width5', 'rank5_axes23', 'value', False, 'mixed', 'all', 'none',
     'none', 'none'),
    ('T>S', 'none', True, 3, 1, 'same', '2x3', 'rank5_axes23', 'value', False, 'equal', 'all', 'none', 'none', 'none'),
    ('T=1', 'full', False, 3, 1, 'other', 'default', 'rank4_axis2', 'value', True, 'equal', 'all', 'none', 'none',
     'none'),
    ('T=S', 'padding', False, 1, 4, 'same', 'width5', 'rank4_axes12', 'value', False, 'mixed', 'all', 'none', 'none',
     'none'),
    ('T>S', 'fully_masked_row', True, 3, 4, 'same', 'default', 'rank4_axis2', 'value', True, 'equal', 'all', 'none',
     'none', 'none'),
    ('T>S', 'per_head', True, 2, 4, 'other', 'default', 'rank4_axes12', 'distinct', True, 'mixed', 'all', 'none',
     'none', 'none'),
    ('T=1', 'fully_masked_row', False, 3, 4, 'other', '2x3', 'rank3', 'distinct', False, 'mixed', 'all', 'none',
     'none', 'none'),
    ('T=S', 'full', True, 1, 1, 'same', '2x3', 'rank3', 'value', False, 'mixed', 'all', 'none', 'none', 'none'),
    ('T<S', 'none', False, 2, 4, 'other', '2x3', 'rank4_axis2', 'distinct', True, 'equal', 'all', 'none', 'none',
     'none'),
    ('T=S', 'none', 'bottom_right', 3, 1, 'other', 'default', 'rank4_axes12', 'distinct', False, 'equal', 'fewer',
     'band', 'neg_inf_row', 'query'),
    ('T=1', 'broadcast', 'bottom_right', 2, 4, 'same', '2x3', 'rank3', 'value', True, 'mixed', 'fewer', 'left',
     'BHTS', 'key_value'),
    ('T>S', 'fully_masked_row', 'bottom_right', 2, 4, 'same', 'width5', 'rank5_axes23', 'value', True, 'mixed',
     'fewer', 'band', 'TS', 'both'),
    ('T<S', 'per_head', 'bottom_right', 1, 1, 'other', 'default', 'rank4_axis2', 'distinct', False, 'equal', 'all',
     'left', 'BHTS', 'both'),
    ('T<S', 'padding', True, 1, 1, 'other', '2x3', 'rank4_axis2', 'distinct', False, 'equal', 'all', 'band', 'TS',
     'key_value'),
    ('T>S', 'full', False, 2, 4, 'same', 'width5', 'rank5_axes23', 'value', True, 'mixed', 'fewer', 'left',
     'neg_inf_row', 'query'),
    ('T=S', 'padding', True, 3, 1, 'same', '2x3', 'rank4_axes12', 'distinct', True, 'equal', 'fewer', 'left', 'BHTS',
     'both'),
    ('T=1', 'per_head', True, 1, 4, 'other', '2x3', 'rank3', 'distinct', True, 'equal', 'all', 'band', 'neg_inf_row',
     'query'),
    ('T=S', 'per_head', False, 3, 1, 'other', 'default', 'rank4_axes12', 'distinct', False, 'equal', 'fewer', 'none',
     'TS', 'key_value'),
    ('T>S', 'full', False, 1, 1, 'other', 'width5', 'rank5_axes23', 'distinct', False, 'mixed', 'all', 'band',
     'BHTS', 'key_value'),
    ('T<S', 'padding', 'bottom_right', 3, 4, 'same', '2x3', 'rank4_axis2', 'distinct', True, 'mixed', 'fewer',
     'none', 'neg_inf_row', 'query'),
    ('T=1', 'none', False, 1, 1, 'same', 'width5', 'rank3', 'value', True, 'equal', 'all', 'left', 'TS', 'both'),
    ('T=S', 'fully_masked_row', 'bottom_right', 2, 1, 'other', 'width5', 'rank4_axes12', 'value', False, 'equal',
     'fewer', 'left', 'none', 'none'),
    ('T=S', 'broadcast', False, 1, 1, 'other', 'default', 'rank3', 'value', True, 'mixed', 'all', 'band', 'none',
     'query'),
    ('T<S', 'broadcast', 'bottom_right', 2, 4, 'other', '2x3', 'rank5_axes23', 'value', True, 'mixed', 'all', 'none',
     'neg_inf_row', 'both'),
    ('T>S', 'fully_masked_row', False, 1, 4, 'same', 'width5', 'rank5_axes23', 'value', True, 'mixed', 'all', 'none',
     'BHTS', 'query'),
    ('T=S', 'full', 'bottom_right', 2, 4, 'other', 'width5', 'rank4_axis2', 'value', True, 'mixed', 'fewer', 'band',
     'TS', 'none'),
    ('T=1', 'fully_masked_row', True, 3, 1, 'other', 'default', 'rank4_axis2', 'distinct', True, 'equal', 'fewer',
     'band', 'neg_inf_row', 'key_value'),
    ('T=1', 'none', 'bottom_right', 1, 1, 'same', 'width5', 'rank3', 'value', True, 'mixed', 'all', 'none', 'BHTS',
     'key_value'),
    ('T>S', 'broadcast', True, 2, 4, 'other', 'default', 'rank4_axes12', 'value', True, 'equal', 'fewer', 'left',
     'TS', 'query'),
    ('T<S', 'full', True, 3, 4, 'other', '2x3', 'rank4_axis2', 'value', True, 'mixed', 'all', 'band', 'none', 'both'),
    ('T>S', 'broadcast', False, 3, 1, 'other', 'default', 'rank4_axes12', 'distinct', False, 'equal', 'all', 'band',
     'neg_inf_row', 'none'),
    ('T>S', 'broadcast', False, 3, 4, 'same', 'width5', 'rank4_axis2', 'value', False, 'equal', 'all', 'left',
     'none', 'key_value'),
    ('T>S', 'none', True, 2, 1, 'same', 'width5', 'rank4_axes12', 'value', False, 'mixed', 'fewer', 'none', 'BHTS',
     'none'),
)

_LENGTHS = {"T=S": (6, 6), "T<S": (4, 7), "T>S": (7, 4), "T=1": (1, 6)}
_SHAPES = {  # axes level -> (attention_axes, batch, lengths level -> (q_shape, k_shape))
    "rank3": (None, 2, lambda t, s: ((t,), (s,))),
    "rank4_axis2": ((2,), 3, lambda t, s: ((3, t), (3, s))),
    "rank4_axes12": (None, 2, lambda t, s: ({6: (2, 3), 4: (2, 2), 7: (1, 7), 1: (1, 1)}[t],
                                            {6: (2, 3), 7: (1, 7), 4: (2, 2)}[s])),
    "rank5_axes23": ((2, 3), 2, lambda t, s: ((2,) + {6: (2, 3), 4: (2, 2), 7: (7, 1), 1: (1, 1)}[t],
                                              (2,) + {6: (3, 2), 7: (1, 7), 4: (1, 4)}[s])),
}


def pair_case(index: int, row: tuple) -> Case:
    level = dict(zip(PAIR_FACTORS, row))
    axes, batch, shape = _SHAPES[level["axes"]]
    q_shape, k_shape = shape(*_LENGTHS[level["lengths"]])
    heads, key_dim = level["heads"], level["key_dim"]
    spec = _spec(heads, key_dim, attention_axes=axes, use_bias=level["bias"],
                 value_dim=key_dim + 2 if level["value_dim"] == "other" else None,
                 output_shape={"default": None, "width5": 5, "2x3": (2, 3)}[level["output"]],
                 num_kv_heads=1 if level["kv_heads"] == "fewer" else None)
    window = _PAIR_WINDOWS[level["window"]]
    bias, lengths = (None if level[f] == "none" else level[f] for f in ("logit_bias", "padding_lengths"))
    distinct = level["key"] == "distinct"
    width = heads * key_dim
    widths = dict(query_dim=width, value_dim=width, key_dim=width) if level["widths"] == "equal" else \
        dict(query_dim=8, value_dim=5, key_dim=6 if distinct else 5)
    name = (f"pairs{index:02d}-{level['axes']}-{level['lengths'].replace('=', 'eq').replace('<', 'lt').replace('>', 'gt')}"
            f"-mask_{level['mask']}{_PAIR_CAUSAL[level['causal']]}-heads{heads}_kd{key_dim}"
            f"{'-value_dim' if level['value_dim'] == 'other' else ''}-out_{level['output']}"
            f"{'-key_distinct' if distinct else ''}{'' if level['bias'] else '-no_bias'}-widths_{level['widths']}"
            f"{'-mqa' if level['kv_heads'] == 'fewer' else ''}"
            f"{'' if window is None else '-window_' + '_'.join(str(w).lower() for w in window)}"
            f"{'' if bias is None else '-bias_' + bias}{'' if lengths is None else '-lengths_' + lengths}")
    return Case(id=name, area="pairs", spec=spec, batch=batch, q_shape=q_shape, k_shape=k_shape, key_distinct=distinct,
                mask=level["mask"], causal=level["causal"], quick=index < 3, window=window, bias=bias, lengths=lengths,
                **widths)


_PAIR_WINDOWS = {"none": None, "band": (1, 2), "left": (2, 0)}
_PAIR_CAUSAL = {False: "", True: "-causal", "bottom_right": "-causal_bottom_right"}


def case_factors(case: Case) -> dict:
    """The levels of PAIR_FACTORS a case exercises, read from its fields (not from the design table)."""
    spec = case.attention_spec
    call = case.shape_call()
    t, s = call.q_len, call.k_len
    n_att = len(call.attention_axes)
    axes = "rank3" if case.query_shape.__len__() == 3 else (
        "rank4_axis2" if n_att == 1 else "rank4_axes12") if len(case.query_shape) == 4 else "rank5_axes23"
    lead = case.mask_lead if case.mask_lead is not None else None
    mask = {"all_allowed": "full"}.get(case.mask, case.mask)
    if case.mask in ("full", "all_allowed") and lead == 0:
        mask = "broadcast"
    elif case.mask == "full" and lead == call.n_batch + 1:
        mask = "per_head"
    q_dim, k_dim, v_dim = case.dims
    return {
        "lengths": "T=1" if t == 1 else "T=S" if t == s else "T<S" if t < s else "T>S",
        "mask": mask, "causal": case.causal, "heads": spec.num_heads if spec.num_heads <= 3 else 3,
        "key_dim": 1 if spec.key_dim == 1 else 4,
        "value_dim": "same" if spec.value_dim in (None, spec.key_dim) else "other",
        "output": "default" if spec.output_shape is None else "width5" if len(spec.output_shape) == 1 else "2x3",
        "axes": axes, "key": "distinct" if case.key_distinct else "value", "bias": spec.use_bias,
        "widths": "equal" if q_dim == k_dim == v_dim == spec.num_heads * spec.key_dim else "mixed",
        "kv_heads": "all" if spec.kv_heads == spec.num_heads else "fewer",
        "window": "none" if case.window is None else "left" if case.window[1] == 0 else "band",
        "logit_bias": case.bias or "none", "padding_lengths": case.lengths or "none",
    }


def pair_coverage(cases) -> tuple[int, int, list]:
    """(pairs met, pairs possible, the pairs missing) over the cases, by PAIR_FACTORS."""
    names = list(PAIR_FACTORS)
    met = set()
    for case in cases:
        levels = case_factors(case)
        for a, b in itertools.combinations(names, 2):
            met.add((a, levels[a], b, levels[b]))
    possible = {(a, x, b, y) for a, b in itertools.combinations(names, 2)
                for x in PAIR_FACTORS[a] for y in PAIR_FACTORS[b]} - PAIR_EXCLUDED
    missing = sorted(possible - met, key=str)
    return len(possible & met), len(possible), missing


def _pairs() -> list[Case]:
    return [pair_case(i, row) for i, row in enumerate(PAIR_DESIGN)]


def case_seed(case_id: str) -> int:
    """A case's seed comes from its id, so adding or reordering cases changes no other case's inputs."""
    return zlib.crc32(case_id.encode()) % (2 ** 31 - 2)


def default_cases() -> list[Case]:
    """The default matrix (every area but ``random`` and ``plugin``); each case's seed comes from its id."""
    cases = (_shapes() + _masks() + _axes() + _dtypes() + _special() + _gradients() + _invalid() + _later()
             + _more() + _modern() + _pairs())
    out = [replace(case, seed=case_seed(case.id)) for case in cases]
    ids = [c.id for c in out]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:  # row ids must map back to exactly one case
        raise AssertionError(f"duplicate case ids: {sorted(duplicates)}")
    return out


def select(cases, areas=None, quick=False) -> list[Case]:
    return [c for c in cases if (areas is None or c.area in areas) and (c.quick or not quick)]


def find_case(case_id: str, extra=()) -> Case | None:
    """The case with this id, from the default matrix, ``extra`` cases, or a random case's seed."""
    for case in list(extra) + default_cases():
        if case.id == case_id:
            return case
    if case_id.startswith("random"):
        return random_case_from_id(case_id)
    return None


def row_id(adapter: str, case_id: str, dtype: str, quantity: str) -> str:
    return f"{adapter}-{case_id}-{dtype}-{quantity}"


# ---- random cases: one description of the space, drawn two ways ---------------------------------------
# ``random_case(seed)`` draws with NumPy, so a case is rebuilt from its id (``random<seed>-...``) for
# ``mhabench conform --rerun``; ``strategies.cases()`` is the hypothesis strategy over the same space, so
# failing examples shrink. Each case carries its own input seed.

HEADS = (1, 2, 3, 4)
KEY_DIMS = (1, 2, 3, 5)
LENGTHS = (1, 2, 3, 5, 7)
FEATURES = (1, 3, 4, 6)
MASKS = ("none", "full", "broadcast", "padding", "per_head", "all_allowed")
AXES = {3: (None,), 4: (None, (1,), (2,), (-2,), (1, 2))}


def describe_random(choose: Callable[[str, tuple], object], seed: int, prefix: str) -> Case:
    """Build a case from ``choose(name, options)``, whichever source of randomness backs it."""
    rank = choose("rank", (3, 4))
    axes = choose("attention_axes", AXES[rank])
    q_shape = tuple(choose(f"q{i}", LENGTHS) for i in range(rank - 2))
    k_shape = tuple(choose(f"k{i}", LENGTHS) for i in range(rank - 2))
    attended = {1, 2} if axes is None else {a if a > 0 else a + rank for a in axes}
    # a non-attended axis is an extra batch axis: it must match between query and key
    k_shape = tuple(q if (i + 1) not in attended else k for i, (q, k) in enumerate(zip(q_shape, k_shape))) \
        if rank == 4 else k_shape
    spec = {"num_heads": choose("num_heads", HEADS), "key_dim": choose("key_dim", KEY_DIMS),
            "value_dim": choose("value_dim", (None,) + KEY_DIMS), "output_shape": choose("output_shape", (None, 2, 5)),
            "attention_axes": axes, "use_bias": choose("use_bias", (True, False))}
    key_distinct = choose("key_distinct", (False, True))
    query_dim, value_dim = choose("query_dim", FEATURES), choose("value_dim_in", FEATURES)
    key_dim = choose("key_dim_in", FEATURES) if key_distinct else value_dim
    mask, causal = choose("mask", MASKS), choose("causal", (False, True))
    batch = choose("batch", (1, 2, 3))
    shape = "x".join(map(str, q_shape)) + "_" + "x".join(map(str, k_shape))
    case_id = (f"{prefix}{seed}-{shape}-heads{spec['num_heads']}_kd{spec['key_dim']}-mask_{mask}"
               f"{'-causal' if causal else ''}")
    return Case(id=case_id, area="random", spec=spec, batch=batch, q_shape=q_shape, k_shape=k_shape,
                query_dim=query_dim, key_dim=key_dim, value_dim=value_dim, key_distinct=key_distinct, mask=mask,
                causal=causal, seed=seed)


def random_case(seed: int) -> Case:
    import numpy as np
    rng = np.random.default_rng(seed)
    return describe_random(lambda name, options: options[int(rng.integers(len(options)))], seed, "random")


def random_cases(count: int, first_seed: int = 0) -> list[Case]:
    return [random_case(first_seed + i) for i in range(count)]


def random_case_from_id(case_id: str) -> Case | None:
    """The case behind a ``random<seed>-...`` id, or None when it does not rebuild to exactly that id."""
    digits = case_id[len("random"):].split("-", 1)[0]
    if not digits.isdigit():
        return None
    case = random_case(int(digits))
    return case if case.id == case_id else None


def reproducer(case: Case) -> str:
    """What a failing random case prints: enough to rebuild it exactly."""
    return (f"Case.from_dict({case.to_dict()!r})  # spec={case.spec} query={list(case.query_shape)} "
            f"value={list(case.value_shape)} key={case.key_shape} mask={case.mask} causal={case.causal} "
            f"seed={case.seed}")
