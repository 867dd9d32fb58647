"""The case type: everything needed to rebuild a call bit for bit, and the inputs it draws.

A :class:`Case` says the spec, the input shapes, whether key is distinct from value, the mask kind,
causal, an input scale, special values, the modern call features and the seed that draws inputs and
weights. Its id is readable (``cross_T8_S4-heads3-mask_padding``), so a row id
``<adapter>-<case>-<dtype>-<quantity>`` selects it with ``pytest -k`` and maps back to it.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass, field

import numpy as np

from mhabench.impls import AttentionSpec, Weights
from mhabench.impls.base import EXTENSION_FEATURES, features_used
from mhabench.impls.validation import Call, check_causal, check_scale, check_softcap, check_window, validate_call
from mhabench.schema import FORWARD_QUANTITIES, INPUT_GRADIENTS, WEIGHT_GRADIENTS, Area, Quantity

MASK_KINDS = ("none", "full", "broadcast", "padding", "per_head", "fully_masked_row", "all_allowed")
# The additive float bias of modern attention (drawn like a mask, read by the mask rule): ``TS`` one [T, S] for
# every batch and head; ``B1S`` per batch and key (a padding-like penalty); ``BHTS`` the full scores rank with a
# head axis; ``neg_inf`` some -inf entries, never a whole row; ``neg_inf_row`` query row 1 of batch 0 all -inf
# (a fully masked row made by the bias alone); ``huge_where_masked`` standard normal where the call's other
# restrictions (mask, causal, window, lengths) allow, and +inf or 1e30 wherever they mask (a masked position stays
# masked whatever its bias).
BIAS_KINDS = ("TS", "B1S", "BHTS", "neg_inf", "neg_inf_row", "huge_where_masked")
# Padding given as lengths: ``key_value`` (batch b keeps fewer keys as b grows), ``query`` (likewise for query rows,
# which then attend to nothing), ``both``, ``empty`` (a key/value length 0 in batch 0 and a query length 0 in
# the last batch element: whole fully masked batches), and ``cache`` (an external key/value cache: sequence b holds
# query_offset[b] + T valid keys, its past and its T new tokens, and the rest of the buffer is padding).
LENGTHS_KINDS = ("key_value", "query", "both", "empty", "cache")
# ``nan_query_padded``: a NaN in the last query row of the last batch element (a row past its query length, with
# query lengths): a row that reads nothing, whose gradients are canonically finite.
SPECIALS = (None, "nan_query", "nan_key", "nan_value", "inf_query", "inf_key", "ninf_value", "nan_masked_key",
            "nan_masked_value", "inf_masked_value", "nan_query_padded")
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
    # how many leading mask axes, from [batch, *non_attended, heads] (None: the kind's usual form)
    mask_lead: int | None = None
    gradients: bool = True  # gradient rows as well as the forward ones
    dtypes: tuple[str, ...] | None = None  # only these dtypes (None: every dtype of the run)
    # modern attention, call-level (grouped-query attention is the spec's num_kv_heads); ``causal`` above may
    # also be "bottom_right"
    window: tuple | None = None        # (left, right), either None = unbounded
    bias: str | None = None            # one of BIAS_KINDS
    lengths: str | None = None         # one of LENGTHS_KINDS
    # inference attention: each sequence's query position (an int for all, or one per batch element; causal True
    # or a window reads it), the logits' soft cap and scale
    query_offset: int | tuple[int, ...] | None = None
    softcap: float | None = None
    logit_scale: float | None = None   # the call's scale= (``scale`` above scales the inputs)

    computes = True  # the rows judge what the call computes (an InvalidCase's, the error it raises)

    def __post_init__(self):
        area = Area.parse(self.area, f"area of case {self.id}")
        if area is Area.INVALID:
            raise ValueError(f"case {self.id}: a bad input is an InvalidCase (cases.invalid), not a Case")
        object.__setattr__(self, "area", area.value)
        if self.mask not in MASK_KINDS:
            raise ValueError(f"case {self.id}: mask must be one of {MASK_KINDS}, got {self.mask!r}")
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
        if isinstance(self.query_offset, (list, tuple)):
            object.__setattr__(self, "query_offset", tuple(int(p) for p in self.query_offset))
        if self.lengths == "cache" and self.query_offset is None:
            raise ValueError(f"case {self.id}: lengths='cache' (query_offset + T valid keys) needs a query_offset")
        check_softcap(self.softcap)
        check_scale(self.logit_scale)
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

    def gradient_quantities(self) -> tuple[Quantity, ...]:
        """The gradients judged: of every input given, of every weight (the biases only with use_bias), and of
        the additive bias where the case has one."""
        if not self.gradients:
            return ()
        inputs = [q for q in INPUT_GRADIENTS if q is not Quantity.GRAD_KEY or self.key_distinct]
        use_bias = self.attention_spec.use_bias
        weights = [q for q in WEIGHT_GRADIENTS if use_bias or not q.gradient_of.startswith("b")]
        return tuple(inputs + weights) + ((Quantity.GRAD_BIAS,) if self.bias is not None else ())

    def quantities(self) -> tuple[Quantity, ...]:
        return FORWARD_QUANTITIES + self.gradient_quantities()

    def run_dtypes(self, dtypes) -> list[str]:
        """The dtypes of a run this case takes part in."""
        return [d for d in dtypes if self.dtypes is None or d in self.dtypes]

    def shape_call(self):
        """A validated call on zero inputs: the scores' shape, the axes (no data drawn)."""
        k = np.zeros(self.key_shape) if self.key_distinct else None
        return validate_call(self.attention_spec, self.dims, np.zeros(self.query_shape),
                             np.zeros(self.value_shape), k)

    def call(self) -> Call:
        """The validated call of the case's inputs (flattened views, the may-attend positions)."""
        i = self.inputs()
        return validate_call(i.spec, self.dims, *i.args(), **i.features())

    def features(self) -> set[str]:
        """The features the case's call uses (``impls.base.features_used``, as an adapter reads them)."""
        return features_used(self.attention_spec, self.dims, self.call())

    @property
    def modern(self) -> tuple[str, ...]:
        """The modern-attention features the case uses, in ``impls.base.EXTENSION_FEATURES`` order."""
        used = self.features()
        return tuple(f for f in EXTENSION_FEATURES if f in used)

    def estimated_bytes(self) -> int:
        """Bytes one float64 evaluation needs, roughly: inputs, projections, a few copies of the scores."""
        call = self.shape_call()
        scores = math.prod(call.scores_shape)
        io = sum(math.prod(s) for s in (self.query_shape, self.value_shape, self.key_shape or (0,)))
        out = math.prod(call.output_shape)
        return 8 * (6 * scores + 4 * io + 2 * out)

    def row_fields(self) -> dict:
        """What each row of the case records about it (``mhabench.schema.Row``'s case fields)."""
        return {"seed": self.seed, "spec": self.spec, "query_shape": list(self.query_shape),
                "key_shape": list(self.key_shape) if self.key_shape else None, "value_shape": list(self.value_shape),
                "mask": self.mask, "causal": self.causal, "bias": self.bias, "lengths": self.lengths,
                "window": list(self.window) if self.window is not None else None,
                "query_offset": None if self.query_offset is None else list(np.broadcast_to(
                    np.array(self.query_offset, dtype=np.int64), (self.batch,)).tolist()),
                "softcap": self.softcap, "logit_scale": self.logit_scale}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["q_shape"], d["k_shape"] = list(self.q_shape), list(self.k_shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Case":
        """The case ``to_dict`` gave (a reproducer printed before bad inputs had their own type carries
        ``invalid: None``, which is dropped)."""
        return cls(**{k: v for k, v in d.items() if not (k == "invalid" and v is None)})

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
        query_offset = None if self.query_offset is None else np.array(self.query_offset, dtype=np.int64)
        query_lengths, key_value_lengths = make_lengths(self.lengths, call, query_offset)
        if self.bias == "huge_where_masked":
            restricted = validate_call(spec, self.dims, query, value, key, mask, self.causal, window=self.window,
                                       query_lengths=query_lengths, key_value_lengths=key_value_lengths,
                                       query_offset=query_offset)
            allowed = restricted.allowed()
            if allowed is not None:
                huge = np.where(np.arange(bias.size).reshape(bias.shape) % 2, np.inf, 1e30)
                bias = np.where(np.broadcast_to(allowed, restricted.scores_shape), bias, huge)
        return Inputs(spec, weights, query, value, key, mask, self.causal, cotangent, self.window, bias,
                      query_lengths, key_value_lengths, query_offset, self.softcap, self.logit_scale)


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
    query_offset: np.ndarray | None = None
    softcap: float | None = None
    scale: float | None = None

    def args(self):
        """The positional arguments of the call: query, value, key, mask, causal."""
        return self.query, self.value, self.key, self.mask, self.causal

    def features(self) -> dict:
        """The call-level keyword arguments of modern attention that the case gives (none for a classic case)."""
        given = {"window": self.window, "bias": self.bias, "query_lengths": self.query_lengths,
                 "key_value_lengths": self.key_value_lengths, "query_offset": self.query_offset,
                 "softcap": self.softcap, "scale": self.scale}
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
    if kind in ("BHTS", "huge_where_masked"):  # (the huge entries go in where the call masks: Case.inputs)
        return rng.standard_normal(batch_shape + (num_heads,) + q_att + k_att)
    b = rng.standard_normal(batch_shape + q_att + k_att)
    flat = b.reshape(batch_shape + (math.prod(q_att), math.prod(k_att)))  # a view: writes reach b
    if kind == "neg_inf":  # some -inf positions, the first key of every row kept finite
        flat[rng.random(flat.shape) < 0.3] = -np.inf
        flat[..., 0] = 0.5
    else:  # "neg_inf_row": query row 1 (or 0) of the first batch element is -inf everywhere
        flat[(0,) * nb + (min(1, flat.shape[-2] - 1),)] = -np.inf
    return b


def make_lengths(kind: str | None, call, query_offset=None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(query_lengths, key_value_lengths) of the given kind (LENGTHS_KINDS), int64 [B]: deterministic, like the
    padding mask, from the call's shapes (and, for ``cache``, the query offsets)."""
    if kind is None:
        return None, None
    if kind == "cache":  # the external cache's valid length: the past, then the T new tokens
        T = _attended(call)[0]
        return None, np.broadcast_to(np.asarray(query_offset, dtype=np.int64) + T, (call.scores_shape[0],)).copy()
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
    batch, (target, index) = 0, {"masked_key": ("key", -1), "masked_value": ("value", -1)}.get(where, (where, 1))
    if where == "query_padded":  # the last row of the last batch element
        batch, target, index = -1, "query", -1
    if target == "key" and key is None:
        target = "value"
    arrays = {"query": query, "value": value, "key": key}
    arr = arrays[target].copy()
    arr[(batch,) + (index,) * (arr.ndim - 2) + (0,)] = {"nan": np.nan, "inf": np.inf, "ninf": -np.inf}[kind]
    arrays[target] = arr
    return arrays["query"], arrays["value"], arrays["key"]


def case_seed(case_id: str) -> int:
    """A case's seed comes from its id, so adding or reordering cases changes no other case's inputs."""
    return zlib.crc32(case_id.encode()) % (2 ** 31 - 2)


def spec(heads=2, key_dim=4, **kw) -> dict:
    """A spec as cases give it (``AttentionSpec`` keyword arguments): two heads of key_dim 4 by default."""
    return {"num_heads": heads, "key_dim": key_dim, **kw}
