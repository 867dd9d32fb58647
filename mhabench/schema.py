"""The contract between the rooms: the types every part of mhabench hands the next.

Adapters refuse calls with a :class:`Refusal`; conformance compares arrays into a :class:`Comparison`,
builds a :class:`Row` per judged quantity and names it by its :class:`RowId`; the journal writes rows,
the catalogue checks them, the pytest view and the report read them back. Every kind of thing those
carry (a dtype, a quantity, a status, an area, a feature) is a :class:`Name` enum here, defined once.

This module is the ground floor: it imports no framework and nothing else of mhabench, so the report
tool, the CLI and a plugin can all use it without loading the adapters' code. Adding a row field is
one line in :class:`Row`; adding a kind of feature, area or quantity is one line in its enum.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, Iterable

__all__ = ["Name", "DType", "Status", "Area", "Quantity", "Feature", "RefusalKind", "Refusal", "FindingKind",
           "Finding", "Comparison", "RowId", "Row", "DTYPES", "STATUSES", "AREAS", "FIELDS", "REQUIRED",
           "NUMERIC", "DEFAULT_KERNEL", "FORWARD_QUANTITIES", "INPUT_GRADIENTS", "WEIGHT_GRADIENTS",
           "legacy_kernel", "DivergenceKind"]


class Name(str, enum.Enum):
    """An enum whose members are their own text: equal to it, hashed as it, printed and written (JSON,
    CSV) as it, so a member and the string it stands for are interchangeable everywhere."""

    __str__ = str.__str__
    __format__ = str.__format__

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(member.value for member in cls)

    @classmethod
    def parse(cls, value, what: str | None = None):
        """The member for ``value`` (a member or its text); ValueError naming the known values otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown {what or cls.__name__.lower()} {value!r}; expected one of "
                             f"{', '.join(cls.values())}") from None


class DType(Name):
    """The dtypes a layer computes in (bfloat16 through ml_dtypes)."""

    FLOAT16 = "float16"
    BFLOAT16 = "bfloat16"
    FLOAT32 = "float32"
    FLOAT64 = "float64"


class DivergenceKind(Name):
    """What a catalogued divergence means to someone porting a model, most urgent first (the declared order is
    the order the page lists them in)."""

    ANSWER = "answer"
    PRECISION = "precision"
    NONFINITE = "nonfinite"
    EMPTY_ROWS = "empty_rows"

    @property
    def title(self) -> str:
        return {"answer": "A different answer in the working dtype",
                "precision": "Reduced precision (a float64 computed in float32, a 16-bit accumulation)",
                "nonfinite": "Non-finite handling (NaN or Inf in, or behind, the mask)",
                "empty_rows": "A policy for rows with no allowed key"}[self.value]


class Status(Name):
    """A row's verdict (conformance/README.md says what each means)."""

    PASS = "pass"
    FAIL = "fail"
    DIVERGENCE = "divergence"
    UNSUPPORTED = "unsupported"
    ERROR = "error"
    SKIP = "skip"

    @property
    def failing(self) -> bool:
        """A verdict that fails a run: the implementation computed something else, or broke."""
        return self in (Status.FAIL, Status.ERROR)

    @property
    def not_run(self) -> bool:
        """Nothing was computed to judge (the adapter refused the call, or the harness skipped it)."""
        return self in (Status.UNSUPPORTED, Status.SKIP)


class Area(Name):
    """The groups the case matrix is organised in; ``plugin`` is for rows of cases a plugin defines."""

    SHAPES = "shapes"
    MASKS = "masks"
    AXES = "axes"
    DTYPES = "dtypes"
    SPECIAL = "special"
    INVALID = "invalid"
    GRADIENTS = "gradients"
    MODERN = "modern"
    DECODE = "decode"
    PAIRS = "pairs"
    RANDOM = "random"
    PLUGIN = "plugin"


class Quantity(Name):
    """What one row judges: a forward path's result, one gradient, or (invalid input) the error raised.

    ``output`` comes from the framework's default call (no scores asked for: the path users run);
    ``output_with_scores`` and ``scores`` from the call that returns the scores; ``grad_<x>`` is the
    gradient of ``sum(output * cotangent)`` with respect to input or weight ``x``."""

    OUTPUT = "output"
    OUTPUT_WITH_SCORES = "output_with_scores"
    SCORES = "scores"
    GRAD_QUERY = "grad_query"
    GRAD_KEY = "grad_key"
    GRAD_VALUE = "grad_value"
    GRAD_WQ = "grad_Wq"
    GRAD_BQ = "grad_bq"
    GRAD_WK = "grad_Wk"
    GRAD_BK = "grad_bk"
    GRAD_WV = "grad_Wv"
    GRAD_BV = "grad_bv"
    GRAD_WO = "grad_Wo"
    GRAD_BO = "grad_bo"
    GRAD_BIAS = "grad_bias"  # the additive bias's (modern attention)
    RAISES = "raises"

    @property
    def is_gradient(self) -> bool:
        return self.value.startswith("grad_")

    @property
    def gradient_of(self) -> str | None:
        """The input or weight a gradient is taken with respect to (``"query"``, ``"Wq"``, ``"bias"``), or None."""
        return self.value[len("grad_"):] if self.is_gradient else None

    @classmethod
    def gradient(cls, name: str) -> "Quantity":
        """The quantity of the gradient with respect to ``name`` (a key of ``Layer.gradients``)."""
        return cls(f"grad_{name}")


# The forward quantities, one per path a user takes (see Quantity); the gradients of the inputs and, in the
# canonical weights' order, of the weights (the b* are the biases, absent with use_bias=False).
FORWARD_QUANTITIES = (Quantity.OUTPUT, Quantity.OUTPUT_WITH_SCORES, Quantity.SCORES)
INPUT_GRADIENTS = (Quantity.GRAD_QUERY, Quantity.GRAD_KEY, Quantity.GRAD_VALUE)
WEIGHT_GRADIENTS = (Quantity.GRAD_WQ, Quantity.GRAD_BQ, Quantity.GRAD_WK, Quantity.GRAD_BK, Quantity.GRAD_WV,
                    Quantity.GRAD_BV, Quantity.GRAD_WO, Quantity.GRAD_BO)


class Feature(Name):
    """Every feature a call can use; an adapter lists the ones it cannot express, each with its reason.

    ``opt_in`` features (modern attention; see ``impls.validation.validate_call`` for their exact
    semantics) run on an adapter only when its capabilities list them as supported, so an adapter
    written before one existed refuses it rather than silently running the call without it."""

    def __new__(cls, value: str, description: str, opt_in: bool = False):
        member = str.__new__(cls, value)
        member._value_ = value
        member.description, member.opt_in = description, opt_in
        return member

    CROSS_ATTENTION = ("cross_attention", "query and key/value of different lengths")
    SEPARATE_KEY = ("separate_key", "a key input distinct from value")
    KEY_VALUE_DIMS = ("key_value_dims", "key or value feature width different from the query's")
    VALUE_DIM = ("value_dim", "value_dim different from key_dim")
    OUTPUT_SHAPE = ("output_shape", "output_shape other than (query feature dim,)")
    MULTI_OUTPUT = ("multi_output", "output_shape with more than one axis")
    MULTI_AXIS = ("multi_axis", "attention over more than one axis")
    BATCH_AXES = ("batch_axes", "non-attended axes acting as extra batch axes")
    HEAD_WIDTH = ("head_width", "num_heads * key_dim different from the query feature width")
    NO_BIAS = ("no_bias", "use_bias=False")
    MASK = ("mask", "an attention mask")
    PER_HEAD_MASK = ("per_head_mask", "a mask with a per-head axis")
    CAUSAL = ("causal", "causal masking")
    SCORES = ("scores", "returning the attention scores")
    DROPOUT = ("dropout", "dropout while training")
    GRADIENTS = ("gradients", "gradients through the layer")
    GQA = ("gqa", "grouped-query attention (num_kv_heads < num_heads)", True)
    CAUSAL_BOTTOM_RIGHT = ("causal_bottom_right", "causal aligned bottom-right with T != S", True)
    WINDOW = ("window", "a sliding window (left, right)", True)
    BIAS = ("bias", "an additive float bias on the logits", True)
    LENGTHS = ("lengths", "padding given as query / key-value lengths", True)
    QUERY_OFFSET = ("query_offset", "per-sequence query positions (query_offset: query i of batch b at "
                                    "query_offset[b] + i)", True)
    SOFTCAP = ("softcap", "a soft cap on the logits (softcap * tanh(logits / softcap))", True)
    SCALE = ("scale", "an explicit logit scale (scale=, replacing 1/sqrt(key_dim))", True)


class RefusalKind(Name):
    """What an adapter refuses: a device, a dtype or a mode as a whole (nothing runs there), one feature of
    the call, or a constraint of its own (``Adapter.extra_constraints``; also the text an adapter written
    before refusals were typed returns)."""

    DEVICE = "device"
    DTYPE = "dtype"
    MODE = "mode"
    FEATURE = "feature"
    CONSTRAINT = "constraint"


class Refusal(str):
    """Why an adapter cannot run a call: its ``kind``, the ``subject`` refused (the device, dtype, mode or
    feature name; for a constraint, what it is about in words, or None) and the ``reason``, in the
    adapter's words.

    A Refusal is also its text (``"dtype float16: <reason>"``, ``"<feature description>: <reason>"``,
    ``"<subject>: <reason>"`` or the bare reason for a constraint), so code written when
    ``unsupported_reason`` returned a string keeps working: it compares with None, tests its truth,
    searches and formats it. Readers that need the kind read ``kind``, never the text."""

    def __new__(cls, kind, subject: str | None, reason: str, text: str | None = None):
        kind = RefusalKind.parse(kind, "refusal kind")
        reason = str(reason)
        if text is None:
            prefix = {RefusalKind.DEVICE: f"device {subject}", RefusalKind.DTYPE: f"dtype {subject}",
                      RefusalKind.MODE: f"mode {subject}",
                      RefusalKind.FEATURE: Feature(subject).description if subject in Feature.values() else subject,
                      RefusalKind.CONSTRAINT: subject}[kind]
            text = reason if prefix is None else f"{prefix}: {reason}"
        self = super().__new__(cls, text)
        self.__dict__.update(kind=kind, subject=subject, reason=reason)
        return self

    # str subclasses keep a __dict__ (non-empty __slots__ are not allowed for them); it is written once
    def __setattr__(self, name, value):
        raise AttributeError(f"a Refusal is immutable (tried to set {name})")

    def __reduce__(self):  # pickled across the worker protocol with its kind
        return (Refusal, (self.kind.value, self.subject, self.reason, str(self)))

    def __repr__(self):
        return f"Refusal({self.kind.value!r}, {self.subject!r}, {self.reason!r})"

    @classmethod
    def device(cls, device: str, reason: str) -> "Refusal":
        return cls(RefusalKind.DEVICE, device, reason)

    @classmethod
    def dtype(cls, dtype: str, reason: str) -> "Refusal":
        return cls(RefusalKind.DTYPE, dtype, reason)

    @classmethod
    def mode(cls, mode: str, reason: str) -> "Refusal":
        return cls(RefusalKind.MODE, mode, reason)

    @classmethod
    def feature(cls, feature: str, reason: str) -> "Refusal":
        return cls(RefusalKind.FEATURE, Feature.parse(feature, "feature").value, reason)

    @classmethod
    def constraint(cls, reason: str, subject: str | None = None) -> "Refusal":
        return cls(RefusalKind.CONSTRAINT, subject, reason)

    @classmethod
    def of(cls, value) -> "Refusal | None":
        """``value`` as a Refusal: None stays None (nothing refused), a Refusal stays itself, a non-empty
        string (from an adapter written when refusals were strings) becomes a constraint with that text."""
        if value is None or isinstance(value, Refusal):
            return value
        if isinstance(value, str):
            return cls.constraint(value) if value else None
        raise TypeError(f"a refusal must be a Refusal, a string or None, got {type(value).__name__}")


# ---- comparisons -----------------------------------------------------------------------------------------

class FindingKind(Name):
    """What a comparison against the golden found wrong."""

    SHAPE = "shape"                # the array's shape differs from the golden's
    EXTRA_NAN = "extra_nan"        # NaN where the golden is not NaN
    MISSING_NAN = "missing_nan"    # no NaN where the golden is NaN
    INF_MISMATCH = "inf_mismatch"  # an Inf that differs from the golden's (or one where it has none)
    TOLERANCE = "tolerance"        # finite values further from the golden than the tolerance

    @property
    def nonfinite(self) -> bool:
        return self in (FindingKind.EXTRA_NAN, FindingKind.MISSING_NAN, FindingKind.INF_MISMATCH)


_NONFINITE_WHAT = {FindingKind.EXTRA_NAN: "NaN where the golden is not NaN",
                   FindingKind.MISSING_NAN: "no NaN where the golden is NaN",
                   FindingKind.INF_MISMATCH: "Inf differing from the golden"}


@dataclass(frozen=True)
class Finding:
    """One thing a comparison found: its kind, how many elements of how many, the first one's index,
    and for the kinds that have them the shapes compared or the error against the tolerance."""

    kind: FindingKind
    count: int = 0
    size: int = 0
    first: tuple[int, ...] = ()
    shapes: tuple[tuple[int, ...], tuple[int, ...]] | None = None  # (actual, golden), for SHAPE
    error: float | None = None       # max |golden - actual|, for TOLERANCE
    tolerance: float | None = None   # for TOLERANCE
    quantity: str = ""               # for TOLERANCE's text

    @property
    def text(self) -> str:
        if self.kind is FindingKind.SHAPE:
            actual, golden = self.shapes
            return f"shape {list(actual)} differs from the golden's {list(golden)}"
        if self.kind is FindingKind.TOLERANCE:
            return (f"max |golden - {self.quantity}| = {self.error:.3g} > tolerance {self.tolerance:.3g} "
                    f"({self.count}/{self.size} elements, first at {list(self.first)})")
        return f"{self.count}/{self.size} elements with {_NONFINITE_WHAT[self.kind]} (first at {list(self.first)})"


FIGURES = ("max_abs_err", "max_rel_err", "tolerance", "reference_err", "error_ratio", "tolerance_source")


@dataclass(frozen=True)
class Comparison:
    """An implementation's array against the golden: the figures a row records and what was found wrong.

    ``ok`` when nothing was found. ``message`` is the findings in words, for people; a program reads
    ``findings`` (``nonfinite``: whether NaN/Inf placement differs)."""

    max_abs_err: float | None
    max_rel_err: float | None
    tolerance: float | None
    reference_err: float | None
    error_ratio: float | None
    tolerance_source: str | None = None  # "reference", "floor" or "rounding": what set the tolerance
    findings: tuple[Finding, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def message(self) -> str:
        return "; ".join(f.text for f in self.findings)

    @property
    def nonfinite(self) -> bool:
        """NaN or Inf where the golden has none, or none where it has."""
        return any(f.kind.nonfinite for f in self.findings)

    def found(self, kind: FindingKind) -> bool:
        return any(f.kind is kind for f in self.findings)

    def figures(self) -> dict:
        """The row fields this comparison fills."""
        return {name: getattr(self, name) for name in FIGURES}


# ---- rows --------------------------------------------------------------------------------------------------

DEFAULT_KERNEL = "default"  # no kernel forced: the framework chooses, as its users run it


@dataclass(frozen=True)
class RowId:
    """What a row id names: ``<adapter>-<case>-<dtype>-<quantity>``, the id ``pytest -k`` selects on and
    ``mhabench conform --rerun`` takes. Without a quantity it names a task (adapter x case x dtype), as
    the pytest view's test ids do. Adapter names and case ids may contain '-': only
    :meth:`parse`, given the adapter names, splits one."""

    adapter: str
    case: str
    dtype: str
    quantity: str | None = None

    def format(self) -> str:
        return "-".join(str(p) for p in (self.adapter, self.case, self.dtype, self.quantity) if p is not None)

    __str__ = format

    @classmethod
    def parse(cls, text: str, adapters: Iterable[str], *, quantity: bool = True) -> "RowId | None":
        """The parts of ``text`` (with a quantity unless ``quantity`` is False), matching the adapter against
        ``adapters`` (the longest that fits: ``keras_mha@jax`` before ``keras_mha``); None when it is no
        such id."""
        text = str(text)
        for name in sorted(set(adapters), key=len, reverse=True):
            if not text.startswith(name + "-"):
                continue
            parts = text[len(name) + 1:].rsplit("-", 2 if quantity else 1)
            if len(parts) != (3 if quantity else 2) or not parts[0] or parts[1] not in DTYPES:
                continue
            if quantity and parts[2] not in Quantity.values():
                continue
            return cls(name, *parts)
        return None


def legacy_kernel(adapter: str) -> str:
    """The kernel of a row or benchmark written before kernels were recorded: the variant its adapter's name
    gives (``"<adapter>+<kernel>"``), else the default. Only readers of such old files use this; everything
    written since records the adapter's own ``kernel`` attribute."""
    base, plus, kernel = str(adapter).rpartition("+")
    return kernel if plus and base and kernel else DEFAULT_KERNEL


@dataclass(frozen=True, kw_only=True)
class Row:
    """One judged computation: adapter x case x dtype x quantity, its verdict and figures, and what the case
    and the adapter were. Written to rows.jsonl, results.json and results.csv under these field names, in
    this order (``FIELDS``); :meth:`from_dict` is the one reader of a row from a file.

    Readers written when rows were dicts may index a row (``row["status"]``, ``row.get(...)``); mhabench's
    own code reads its attributes."""

    row_id: str | None = None  # filled from adapter, case, dtype and quantity when not given
    adapter: str
    framework: str | None = None
    framework_version: str | None = None
    case: str
    area: Area
    dtype: DType
    device: str = "cpu"
    quantity: Quantity
    status: Status
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    tolerance: float | None = None
    reference_err: float | None = None
    error_ratio: float | None = None  # max|golden - impl| / max|golden - reference|
    tolerance_source: str | None = None
    divergence: str | None = None    # the catalogue entry whose behaviour the row shows
    contradicts: str | None = None   # a catalogue entry the row passes against although it predicts otherwise
    # a divergence row's figures measure it against its entry's description; these say how far it is from the
    # canonical golden: max|golden - impl| over the elements finite in both, divided by max(1, max|golden|) (so
    # comparable across quantities and input scales), and whether NaN/Inf sit elsewhere
    canonical_err: float | None = None
    canonical_nonfinite: bool | None = None
    message: str = ""
    mode: str | None = None          # eager, graph or compiled
    kernel: str = DEFAULT_KERNEL     # the attention kernel the adapter forces ("default": the framework chooses)
    emulated: str | None = None      # features the adapter built into a mask because its framework has no argument
    seed: int | None = None
    spec: dict | None = None
    query_shape: list | None = None
    key_shape: list | None = None
    value_shape: list | None = None
    mask: str | None = None
    causal: bool | str | None = None
    window: list | None = None       # the case's modern call features: the window, the bias kind, the lengths kind
    bias: str | None = None
    lengths: str | None = None
    query_offset: list | None = None  # inference attention: each sequence's query position, the soft cap, the scale
    softcap: float | None = None
    logit_scale: float | None = None
    duration_s: float | None = None
    opset: int | None = None         # the ONNX opset of the graphs an ONNX Runtime adapter runs
    # what chose the kernels in the process that computed the row, as its framework reports it (Adapter.kernel_facts:
    # {"tf_onednn": true}, {"torch_cpu_capability": "avx2", "torch_vector_bits": 256, ...}); None: not recorded
    facts: dict | None = None

    def __post_init__(self):
        set_ = lambda name, value: object.__setattr__(self, name, value)
        for name, kind in _NAMED_FIELDS:
            set_(name, kind.parse(getattr(self, name), name))
        set_("row_id", _checked_row_id(self.row_id, self.id.format()))

    @property
    def id(self) -> RowId:
        return RowId(self.adapter, self.case, self.dtype.value, self.quantity.value)

    @property
    def task(self) -> tuple[str, str, str]:
        """(adapter, case id, dtype): the task that computed the row."""
        return self.adapter, self.case, self.dtype.value

    def replace(self, **changes) -> "Row":
        """This row with ``changes`` (a verdict, figures): rows are immutable."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The row as written to a file: plain JSON types, in ``FIELDS`` order."""
        return {name: (value.value if isinstance(value, Name) else value)
                for name, value in ((f, getattr(self, f)) for f in FIELDS)}

    @classmethod
    def from_dict(cls, record) -> "Row":
        """The row a file holds, as earlier and later versions wrote it (:func:`_known_fields`); ValueError
        saying what is wrong with a record that is not one."""
        try:
            return cls(**_known_fields(record))
        except TypeError as exc:  # a field of the wrong type for the enums' parsing
            raise ValueError(str(exc)) from None

    @staticmethod
    def record(record) -> dict[str, Any]:
        """``Row.from_dict(record).to_dict()``, checked the same way (the same ValueError), without making
        the Row: what a reader of a million rows (the report) takes each one through."""
        known = _known_fields(record)
        try:
            for name, kind in _NAMED_FIELDS:
                value = known[name]
                if type(value) is not str or value not in _NAMED_VALUES[name]:  # a known text is its own value
                    known[name] = kind.parse(value, name).value
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        known["row_id"] = _checked_row_id(known["row_id"], RowId(known["adapter"], known["case"], known["dtype"],
                                                                 known["quantity"]).format())
        return {**_BLANK_RECORD, **known}  # every field, in FIELDS order

    # ---- the dict view, for readers written when rows were dicts -------------------------------------
    def __getitem__(self, name: str):
        if name not in _FIELD_SET:
            raise KeyError(name)
        value = getattr(self, name)
        return value.value if isinstance(value, Name) else value

    def get(self, name: str, default=None):
        return self[name] if name in _FIELD_SET else default

    def keys(self) -> tuple[str, ...]:
        return FIELDS

    def items(self):
        return self.to_dict().items()

    def __contains__(self, name) -> bool:
        return name in _FIELD_SET


FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(Row))
_FIELD_SET = frozenset(FIELDS)
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Row) if f.default is not dataclasses.MISSING}
_BLANK_RECORD = {name: _DEFAULTS.get(name) for name in FIELDS}
_NAMED_FIELDS = (("area", Area), ("dtype", DType), ("quantity", Quantity), ("status", Status))
_NAMED_VALUES = {name: frozenset(kind.values()) for name, kind in _NAMED_FIELDS}
REQUIRED = ("row_id", "adapter", "case", "area", "dtype", "quantity", "status")  # a record lacking one is no row
_REQUIRED_SET = frozenset(REQUIRED)


def _known_fields(record) -> dict[str, Any]:
    """The fields of a row a file holds, with what earlier versions did not write filled in; ValueError
    for a record that is no row. Files written by earlier versions lack later fields: they take their
    defaults, and a row with no ``kernel`` gets the one its adapter's name gives (:func:`legacy_kernel`).
    Fields this version does not know (written by a newer one) are left out."""
    if not isinstance(record, dict):
        raise ValueError("not a JSON object")
    if not record.keys() >= _REQUIRED_SET:
        missing = [k for k in REQUIRED if k not in record]
        raise ValueError(f"missing field{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    if record["status"] not in STATUSES:
        raise ValueError(f"unknown status {record['status']!r}")
    known = dict(record) if record.keys() <= _FIELD_SET else {k: v for k, v in record.items() if k in _FIELD_SET}
    if known.get("kernel") in (None, ""):
        known["kernel"] = legacy_kernel(record["adapter"])
    if known.get("message") is None:
        known["message"] = ""
    return known


def _checked_row_id(row_id: str | None, expected: str) -> str:
    if row_id is not None and row_id != expected:
        raise ValueError(f"row_id {row_id!r} does not name its row ({expected!r})")
    return expected
NUMERIC = ("max_abs_err", "max_rel_err", "tolerance", "reference_err", "error_ratio", "canonical_err", "duration_s")

DTYPES: tuple[str, ...] = DType.values()
STATUSES: tuple[str, ...] = Status.values()
AREAS: tuple[str, ...] = Area.values()
