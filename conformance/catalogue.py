"""The divergence catalogue: known, named differences from the canonical semantics, as data.

One TOML file per framework in ``conformance/divergences/``. Each entry::

    [[divergence]]
    id = "torch_mha-fully_masked_row-nan"    # unique, appears in the rows it explains
    adapters = ["torch_mha"]
    cases = ["*fully_masked_row*"]           # fnmatch patterns on case ids (default: every case)
    when = ["empty_rows"]                    # optional: properties every covered case has (CASE_PROPERTIES)
    dtypes = ["float32"]                     # optional: default every dtype
    quantities = ["output", "scores"]        # optional: default every quantity
    observed = "what the implementation does"
    oracle_policy = "nan"                    # the oracle's fully_masked policy that reproduces it, or
    behaviour = "..."                        # a named transformation of the golden in BEHAVIOURS, or
    check = "..."                            # a named predicate on (golden, actual) in CHECKS, or
    max_error_ratio = 6.0                    # a precision shortfall: fails only on magnitude, ratio <= this
    precision = "float32"                    # optional, alone or with a policy/behaviour: judged as computed
                                             # in this dtype (reference and floor of that dtype)
    backward_form = "flash"                  # optional, alone or with the above: gradients judged against a
                                             # reference whose softmax backward has that form (FlashAttention's)
    facts = { tf_onednn = true }             # optional: the kernel facts under which it applies (a row's
                                             # ``facts``; a list of values means any of them)
    upstream = "https://github.com/..."      # optional: only a real issue
    varies = "why it shows on some machines only"   # optional, only where the deciding fact is unknown:
                                             # then its absence is not stale

A row an entry covers that fails against the canonical golden but passes
against the entry's description becomes status ``divergence``. The check is
strict: an entry is *stale* when a row it covers fails in another way than
described, when a covered row passes canonically although the description
predicts a visibly different result there (the framework was fixed), or when
it shows in no row of a run that included its adapter and the whole default
matrix, so the catalogue stays true as frameworks change. An entry with
``facts`` covers only the rows computed under those facts: on a machine (or under
a switch) where they do not hold, its rows are judged canonically and it is not
expected to show.
"""
from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from mhabench.impls.validation import FULLY_MASKED_POLICIES as POLICIES

DIVERGENCE_DIR = Path(__file__).parent / "divergences"
_KEYS = {"id", "adapters", "cases", "when", "dtypes", "quantities", "observed", "oracle_policy", "behaviour", "check",
         "max_error_ratio", "precision", "backward_form", "upstream", "varies", "facts"}


# ---- properties of a case, for entries that follow a behaviour wherever it arises -----------------------
def _call(case):
    """The validated call of the case (flattened views, the may-attend mask)."""
    i = case.inputs()
    from mhabench.impls.validation import validate_call
    return validate_call(i.spec, case.dims, *i.args(), **i.features())


def _masked_empty_rows_only(case) -> bool:
    """Every row with no allowed key is emptied by the mask, causal, the window or key/value lengths: no query
    lengths, and no row whose otherwise allowed positions are all -inf in the bias (frameworks that fill masked
    logits with a finite value treat those two apart)."""
    call = _call(case)
    if call.query_lengths is not None:
        return False

    def empty(**parts):  # [N, 1|H, T]: the rows with no allowed key
        allowed = call.flat_allowed(**parts)
        return np.zeros((1, 1, 1), bool) if allowed is None else ~np.any(allowed, axis=-1)
    by_all, by_masking = empty(), empty(bias=False)
    shape = np.broadcast_shapes(by_all.shape, by_masking.shape)
    return bool(np.array_equal(np.broadcast_to(by_all, shape), np.broadcast_to(by_masking, shape)))


def _top_left_causal_kv_lengths(case) -> bool:
    call = _call(case)
    return call.causal and call.key_value_lengths is not None and call.diagonal_offset == 0


def _empty_rows(case) -> bool:
    allowed = _call(case).flat_allowed()
    return allowed is not None and not np.all(np.any(allowed, axis=-1))


def _bad_positions(call, name: str) -> np.ndarray:
    """``[N, L]``: flattened positions of input ``name`` holding a NaN or Inf."""
    from mhabench.impls.validation import flatten
    x = getattr(call, name)
    return ~np.all(np.isfinite(flatten(call, np.asarray(x, np.float64))), axis=-1)


def _nonfinite(case) -> bool:
    i = case.inputs()
    return any(a is not None and not np.all(np.isfinite(a)) for a in (i.query, i.key, i.value))


def _hidden_nonfinite(case, names) -> bool:
    """A NaN/Inf at a key position of one of the inputs ``names`` that the mask hides from some query."""
    call = _call(case)
    allowed = call.flat_allowed()
    if allowed is None:
        return False
    hidden = ~np.all(allowed, axis=(1, 2))  # [N, S]: masked for some head and query
    return any(np.any(_bad_positions(call, n) & hidden) for n in names)


def _masked_nonfinite(case) -> bool:
    """A NaN/Inf in a key or value position that the mask hides from some query."""
    return _hidden_nonfinite(case, ("key", "value"))


def _masked_nonfinite_key(case) -> bool:
    """A NaN/Inf in a key position the mask hides from some query (the key: it reaches the logits)."""
    return _hidden_nonfinite(case, ("key",))


def _masked_nonfinite_value(case) -> bool:
    """The same, in the value (which ``weights @ values`` reads as ``0 * NaN``)."""
    return _hidden_nonfinite(case, ("value",))


def _nonfinite_query(case) -> bool:
    return bool(np.any(_bad_positions(_call(case), "query")))


def _keras_tf_bias_add_shortcut(case) -> bool:
    """Shapes on which Keras's TensorFlow ``ops.add`` takes its ``tf.nn.bias_add`` shortcut along the wrong axis
    inside MultiHeadAttention's projections (keras/src/backend/tensorflow/numpy.py ``add``; the report is
    conformance/divergences/reports/keras-tensorflow-ops-add-bias-add.md): a per-head bias ``[H, 1]`` (key_dim or
    value_dim 1, H > 1) meets an input whose first inner axis has length H, or a multi-axis output_shape
    ``(n, 1)`` meets a query whose first inner axis has length n."""
    spec = case.attention_spec
    if not spec.use_bias:
        return False
    heads, q1 = spec.num_heads, case.query_shape[1]
    k1, v1 = (case.key_shape or case.value_shape)[1], case.value_shape[1]
    projections = heads > 1 and ((spec.key_dim == 1 and heads in (q1, k1)) or (spec.value_head_dim == 1 and v1 == heads))
    out = spec.output_shape or ()
    wide = [d for d in out if d > 1]
    output = len(out) > 1 and out[-1] == 1 and len(wide) == 1 and wide[0] == q1
    return projections or output


CASE_PROPERTIES = {
    "keras_tf_bias_add_shortcut": _keras_tf_bias_add_shortcut,
    # a mask (named by the case or built by its inputs, as the special values' cases do), causal, a window,
    # lengths or a bias with -inf: anything masked at all
    "masked": lambda case: case.mask != "none" or case.inputs().mask is not None or case.causal
    or case.window is not None or case.lengths is not None or case.bias in ("neg_inf", "neg_inf_row"),
    "causal": lambda case: case.causal,
    # causal on the top-left diagonal (or bottom-right with T == S, the same triangle) with key/value lengths
    "top_left_causal_kv_lengths": _top_left_causal_kv_lengths,
    "empty_rows": _empty_rows,                  # a query row with no allowed key
    "masked_empty_rows_only": _masked_empty_rows_only,  # ... and each is emptied by masking, not query lengths or -inf
    "nonfinite": _nonfinite,                    # a NaN or Inf in an input
    "masked_nonfinite": _masked_nonfinite,      # a NaN or Inf in a key or value where the mask hides it
    "masked_nonfinite_key": _masked_nonfinite_key,  # the same, in the key (so in the logits)
    "masked_nonfinite_value": _masked_nonfinite_value,  # the same, in the value
    "nonfinite_query": _nonfinite_query,        # a NaN or Inf in the query
    "rank3": lambda case: len(case.q_shape) == 1,  # one sequence axis: [batch, length, features]
    # Keras's MultiHeadAttention calls ops.dot_product_attention (its fused path) only for rank-3 inputs
    # without dropout (keras/src/layers/attention/multi_head_attention.py, _compute_attention); a layer with
    # dropout > 0 takes the einsum-and-softmax path even when training=False
    "keras_fused": lambda case: len(case.q_shape) == 1 and not case.attention_spec.dropout,
    "dropout_free": lambda case: not case.attention_spec.dropout,
    # attention over more than one axis (flattened, the softmax runs over several key axes)
    "multi_axis": lambda case: len(case.attention_spec.resolve_axes(len(case.q_shape) + 2)) > 1,
    "single_axis": lambda case: len(case.attention_spec.resolve_axes(len(case.q_shape) + 2)) == 1,
    "value_dim": lambda case: case.attention_spec.value_dim not in (None, case.attention_spec.key_dim),
}
_property_cache: dict[tuple[str, str], bool] = {}


def case_has(case_id: str, name: str) -> bool:
    """Whether the case behind ``case_id`` has property ``name`` (False for a case that cannot be rebuilt)."""
    key = (case_id, name)
    if key not in _property_cache:
        from .cases import find_case
        case = find_case(case_id)
        with np.errstate(all="ignore"):
            _property_cache[key] = bool(case is not None and CASE_PROPERTIES[name](case))
    return _property_cache[key]
PRECISIONS = ("float32", "float16", "bfloat16")


def _bad_batches(inputs) -> np.ndarray:
    """Batch elements whose query, key or value hold a NaN or Inf anywhere."""
    arrays = [inputs.query, inputs.value] + ([inputs.key] if inputs.key is not None else [])
    return np.any([~np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1) for a in arrays], axis=0)


def _nonfinite_input_poisons_batch(expected: np.ndarray, inputs, quantity: str) -> np.ndarray:
    """Every element of a batch element with a NaN/Inf input anywhere (masked or not) becomes NaN."""
    out = expected.copy()
    out[_bad_batches(inputs)] = np.nan
    return out


def _nan_row_output_is_bias(expected: np.ndarray, inputs, quantity: str) -> np.ndarray:
    """An output row the golden makes NaN instead gets zero attention weights: the output bias (or 0)."""
    out = expected.copy()
    out_dims = inputs.weights.Wo.ndim - 2
    rows = np.isnan(out).reshape(out.shape[:out.ndim - out_dims] + (-1,)).any(axis=-1)
    bias = inputs.weights.bo if inputs.weights.bo is not None else np.zeros(out.shape[out.ndim - out_dims:])
    out[rows] = bias
    return out


# Named behaviours no oracle policy reproduces: (golden or reference, inputs, quantity) -> the array the
# implementation is expected to return instead. Applied to both golden and reference, then compared as usual.
def _with_scale(inputs, quantity: str, scale: float) -> np.ndarray:
    """The float64 result when the logits are scaled by ``scale`` instead of 1/sqrt(key_dim).

    Scaling the query by ``scale`` equals scaling Wq and bq by ``r = scale * sqrt(key_dim)`` under the exact
    scale, so the oracle computes it; the gradients of Wq and bq pick up the factor ``r`` once more (chain rule).
    """
    from mhabench.impls import Weights, oracle, oracle_backward
    r = scale * np.sqrt(inputs.spec.key_dim)
    arrays = dict(inputs.weights.as_dict())
    arrays["Wq"] = arrays["Wq"] * r
    if "bq" in arrays:
        arrays["bq"] = arrays["bq"] * r
    weights = Weights(**arrays)
    if not quantity.startswith("grad_"):
        out, scores = oracle.forward(inputs.spec, weights, *inputs.args(), **inputs.features())
        return scores if quantity == "scores" else out
    grads = oracle_backward.backward(inputs.spec, weights, *inputs.args(), cotangent=inputs.cotangent,
                                     **inputs.features())
    name = quantity[len("grad_"):]
    return grads[name] * (r if name in ("Wq", "bq") else 1.0)


def _scale_rounded_to_float32(expected: np.ndarray, inputs, quantity: str) -> np.ndarray:
    """The float64 result when the 1/sqrt(key_dim) scale is first rounded to float32 (float64 rows only)."""
    return _with_scale(inputs, quantity, float(np.float32(1.0 / np.sqrt(inputs.spec.key_dim))))


def _sqrt_scale_rounded_to_float32(expected: np.ndarray, inputs, quantity: str) -> np.ndarray:
    """The float64 result of the ONNX Attention operator's function body (onnx 1.23): it computes
    ``sqrt(1 / sqrt(key_dim))`` in float32 (from the head size cast to float32) and multiplies q and k by it,
    so the logits are scaled by that float32 number squared (float64 rows only)."""
    f32 = np.float32
    root = f32(np.sqrt(f32(f32(1) / f32(np.sqrt(f32(inputs.spec.key_dim))))))
    return _with_scale(inputs, quantity, float(root) ** 2)


def _causal_from_kv_lengths(expected: np.ndarray, inputs, quantity: str) -> np.ndarray:
    """The float64 forward when the causal diagonal of each sequence sits at its key/value length: query row i
    may attend key j iff ``j <= i + key_value_lengths[b] - T`` (instead of the call's diagonal, ``j <= i`` when
    T == S or top-left). The ONNX Attention operator's ``is_causal`` with ``nonpad_kv_seqlen`` (opset 24) reads
    the lengths as an external KV cache whose last T entries are the queries. Every other restriction stays."""
    from mhabench.impls import oracle
    from mhabench.impls.validation import band_mask
    call = oracle.prepare(inputs.spec, inputs.weights, *inputs.args(), **inputs.features())
    T, S, nb = call.q_len, call.k_len, call.n_batch
    lengths = call.flat_lengths()[1]
    band = np.stack([band_mask(0, T, S, offset=int(n) - T, causal=True) for n in lengths])  # [N, T, S]
    band = band.reshape(call.scores_shape[:nb] + (1,) + call.scores_shape[nb + 1:])
    mask = band if call.mask is None else np.logical_and(call.mask, band)
    out, scores = oracle.forward(inputs.spec, inputs.weights, inputs.query, inputs.value, inputs.key, mask, False,
                                 **inputs.features())
    return scores if quantity == "scores" else out


# Named behaviours no oracle policy reproduces: (golden or reference, inputs, quantity) -> the array the
# implementation is expected to return instead. Applied to both golden and reference, then compared as usual.
def _modelled(name: str, facts_used: tuple[str, ...] = ()):
    """A behaviour given value for value by a framework model (``framework_models.<name>``), built once per case,
    dtype and fact for every quantity: in float64 for the golden, rounded as the oracle is for the reference.
    A model of a machine-dependent kernel reads the row's ``facts_used`` (the vector width, say) and the dtype the
    row is judged in (``kernel_dtype``: its lanes), whatever precision the model's stages are rounded to."""
    def behaviour(expected: np.ndarray, inputs, quantity: str, dtype: str = "float64", facts=None,
                  kernel_dtype: str | None = None) -> np.ndarray:
        from . import framework_models
        used = {f: (facts or {})[f] for f in facts_used}  # KeyError: the row does not say, the model cannot apply
        machine = dict(facts=used, kernel_dtype=kernel_dtype) if facts_used else {}
        key = f"_model_{name}_{dtype}_{sorted(used.items())}_{kernel_dtype if facts_used else ''}"
        if key not in vars(inputs):
            vars(inputs)[key] = getattr(framework_models, name)(inputs, dtype, **machine)
        return vars(inputs)[key][quantity]
    behaviour.__doc__ = f"framework_models.{name}"
    return behaviour


MODELLED = {"jax_masked_logits_filled", "keras2_logsumexp_rounded", "torch_cpu_flash_row_max", "torch_flex_cpu_row_max"}
BEHAVIOURS: dict[str, Callable[[np.ndarray, object, str], np.ndarray]] = {
    "nonfinite_input_poisons_batch": _nonfinite_input_poisons_batch,
    "nan_row_output_is_bias": _nan_row_output_is_bias,
    "scale_rounded_to_float32": _scale_rounded_to_float32,
    "sqrt_scale_rounded_to_float32": _sqrt_scale_rounded_to_float32,
    # ONNX Attention's is_causal with nonpad_kv_seqlen: each sequence's diagonal at its key/value length
    "causal_from_kv_lengths": _causal_from_kv_lengths,
    # jax.nn.dot_product_attention's XLA path: masked logits replaced by a large finite negative, a -inf bias
    # kept, the rows past the query lengths zeroed
    "jax_masked_logits_filled": _modelled("jax_filled_attention"),
    # Keras 2 over several axes: exp(x - logsumexp(x)) with the -1e9 mask rounded in, weights 1 in empty rows
    "keras2_logsumexp_rounded": _modelled("keras2_logsumexp_rounded"),
    # torch's CPU flash kernel: an all-NaN query row shorter than the vector width loses its NaN in the scalar
    # tail of the row maximum and is zero-filled; the width is the row's torch_vector_bits
    "torch_cpu_flash_row_max": _modelled("torch_cpu_flash_row_max", ("torch_vector_bits",)),
    # compiled FlexAttention's CPU template: the same maximum drops a NaN at every length and width
    "torch_flex_cpu_row_max": _modelled("torch_flex_cpu_row_max"),
}


def _nan_rows_only_at_nonfinite_logits(golden, reference, actual, quantity, dtype, compare) -> bool:
    golden, reference = np.asarray(golden, np.float64), np.asarray(reference, np.float64)
    nan_rows = np.isnan(golden).any(axis=-1)
    rows = actual[nan_rows]
    shaped = rows.size > 0 and np.isnan(rows).any(axis=-1).all() and np.all(np.where(np.isnan(rows), 0.0, rows) == 0)
    return bool(shaped) and compare(golden[~nan_rows], reference[~nan_rows], actual[~nan_rows], dtype, quantity).ok


def _nan_rows_keep_nan_only_at_nonfinite_logits(actual, goldens, quantity, dtype, compare) -> bool:
    """Scores: where the golden's row is NaN, the row has NaN somewhere and exactly 0 everywhere else (the
    softmax of a row holding NaN/Inf logits zeroes the finite ones); every other row matches the golden."""
    return _nan_rows_only_at_nonfinite_logits(goldens.get("zeros", "float64")[quantity],
                                              goldens.get("zeros", dtype)[quantity], actual, quantity, dtype, compare)


def _poisoned_batch_scores_nan_only_at_nonfinite_logits(actual, goldens, quantity, dtype, compare) -> bool:
    """As nan_rows_keep_nan_only_at_nonfinite_logits, after a NaN/Inf input anywhere (masked or not) has made
    every row of its batch element NaN (nonfinite_input_poisons_batch)."""
    poison = lambda a: _nonfinite_input_poisons_batch(np.asarray(a, np.float64), goldens.inputs, quantity)
    return _nan_rows_only_at_nonfinite_logits(poison(goldens.get("zeros", "float64")[quantity]),
                                              poison(goldens.get("zeros", dtype)[quantity]), actual, quantity,
                                              dtype, compare)


def _value_gradient_nan_at_nonfinite_keys_zero_elsewhere(actual, goldens, quantity, dtype, compare) -> bool:
    """The value gradient after a softmax that returns, for a row holding a NaN or Inf logit, NaN at those
    positions and exactly 0 at the others: in each batch element with a NaN/Inf key (masked or not), the gradient
    is NaN at every key position holding one and NaN or exactly 0 everywhere else (the rows' weights there are
    0); every other batch element matches the golden."""
    inputs = goldens.inputs
    key = inputs.key if inputs.key is not None else inputs.value
    bad_keys = ~np.isfinite(key).all(axis=-1)  # [B, *K]: the key positions holding a NaN or Inf
    batches = bad_keys.reshape(len(key), -1).any(axis=1)
    if quantity != "grad_value" or not batches.any():
        return False
    golden = np.asarray(goldens.get("zeros", "float64")[quantity], np.float64)
    reference = np.asarray(goldens.get("zeros", dtype)[quantity], np.float64)
    poisoned = actual[batches]
    shaped = bool(np.isnan(actual[bad_keys]).all() and np.all(np.isnan(poisoned) | (poisoned == 0)))
    return shaped and compare(golden[~batches], reference[~batches], actual[~batches], dtype, quantity).ok


def _introduces_nan(actual, goldens, quantity, dtype, compare) -> bool:
    """NaN where the golden is finite, and everywhere else within tolerance of the golden."""
    golden = np.asarray(goldens.get("zeros", "float64")[quantity], np.float64)
    reference = np.asarray(goldens.get("zeros", dtype)[quantity], np.float64)
    new_nan = np.isnan(actual) & np.isfinite(golden)
    rest = ~np.isnan(actual)
    return bool(new_nan.any()) and compare(golden[rest], reference[rest], actual[rest], dtype, quantity).ok


def _finite_and_off(actual, goldens, quantity, dtype, compare) -> bool:
    """NaN and Inf exactly where the golden has them, but the values outside tolerance."""
    golden = np.asarray(goldens.get("zeros", "float64")[quantity], np.float64)
    reference = np.asarray(goldens.get("zeros", dtype)[quantity], np.float64)
    result = compare(golden, reference, actual, dtype, quantity)
    return not result.ok and "NaN" not in result.message and "Inf" not in result.message


def _finite_but_matches_no_policy(actual, goldens, quantity, dtype, compare) -> bool:
    """Finite everywhere, yet unlike what any fully-masked-row policy of the oracle gives."""
    if not np.all(np.isfinite(actual)):
        return False
    return not any(compare(goldens.get(p, "float64")[quantity], goldens.get(p, dtype)[quantity], actual, dtype,
                           quantity).ok for p in POLICIES)


# Named predicates, for behaviours whose exact values no model here reproduces:
# (actual, goldens, quantity, dtype, compare) -> whether the actual array shows the behaviour.
CHECKS: dict[str, Callable] = {
    "nan_rows_keep_nan_only_at_nonfinite_logits": _nan_rows_keep_nan_only_at_nonfinite_logits,
    "finite_but_matches_no_policy": _finite_but_matches_no_policy,
    "poisoned_batch_scores_nan_only_at_nonfinite_logits": _poisoned_batch_scores_nan_only_at_nonfinite_logits,
    "introduces_nan": _introduces_nan,
    "value_gradient_nan_at_nonfinite_keys_zero_elsewhere": _value_gradient_nan_at_nonfinite_keys_zero_elsewhere,
    "finite_and_off": _finite_and_off,
}


@dataclass(frozen=True)
class Entry:
    id: str
    adapters: tuple[str, ...]
    cases: tuple[str, ...]
    observed: str
    when: tuple[str, ...] = ()
    dtypes: tuple[str, ...] | None = None
    quantities: tuple[str, ...] | None = None
    oracle_policy: str | None = None
    behaviour: str | None = None
    check: str | None = None
    max_error_ratio: float | None = None
    precision: str | None = None
    backward_form: str | None = None
    upstream: str | None = None
    varies: str | None = None
    facts: tuple[tuple[str, tuple], ...] = ()  # (fact, the values under which the entry applies), sorted
    source: str = field(default="", compare=False)

    @property
    def how(self) -> str:
        """How the entry is reproduced, in words (for reports)."""
        parts = [f"oracle policy {self.oracle_policy}" if self.oracle_policy else None,
                 f"behaviour {self.behaviour}" if self.behaviour else None,
                 f"check {self.check}" if self.check else None,
                 f"error ratio <= {self.max_error_ratio:g}" if self.max_error_ratio is not None else None,
                 f"computed in {self.precision}" if self.precision else None,
                 f"{self.backward_form}-form backward" if self.backward_form else None,
                 f"when {self.conditions}" if self.facts else None]
        return ", ".join(p for p in parts if p)

    def covers(self, adapter: str, case_id: str, dtype: str, quantity: str) -> bool:
        return (adapter in self.adapters
                and any(fnmatch.fnmatchcase(case_id, p) for p in self.cases)
                and all(case_has(case_id, name) for name in self.when)
                and (self.dtypes is None or dtype in self.dtypes)
                and (self.quantities is None or quantity in self.quantities))

    def applies(self, facts) -> bool:
        """Whether a row computed under ``facts`` (a row's ``facts``; None: unknown) is under this entry's facts."""
        if not self.facts:
            return True
        facts = facts or {}
        return all(name in facts and facts[name] in values for name, values in self.facts)

    @property
    def conditions(self) -> str:
        """The facts it applies under, in words ("" for none)."""
        return ", ".join(f"{name} = {' or '.join(_fact_text(v) for v in values)}" for name, values in self.facts)

    def covers_row(self, row: dict) -> bool:
        return self.covers(row["adapter"], row["case"], row["dtype"], row["quantity"]) and self.applies(row.get("facts"))


def _fact_text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _facts(raw, where: str) -> tuple[tuple[str, tuple], ...]:
    """An entry's ``facts`` table as sorted (name, values) pairs; ValueError for an unknown fact or a value that is
    not a scalar (or a list of them)."""
    from mhabench.impls.facts import KERNEL_FACTS
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{where}: 'facts' must be a table of kernel facts, e.g. facts = {{ tf_onednn = true }}")
    out = []
    for name, value in sorted(raw.items()):
        if name not in KERNEL_FACTS:
            raise ValueError(f"{where}: 'facts' names unknown fact {name!r}; known: {sorted(KERNEL_FACTS)}")
        values = tuple(value) if isinstance(value, list) else (value,)
        if not values or not all(isinstance(v, (bool, int, float, str)) for v in values):
            raise ValueError(f"{where}: facts.{name} must be a value or a list of values, got {value!r}")
        out.append((name, values))
    return tuple(out)


def _entry(raw: dict, source: str) -> Entry:
    where = f"{source}: divergence {raw.get('id', '?')!r}"
    unknown = set(raw) - _KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected some of {sorted(_KEYS)}")
    for key in ("id", "adapters", "observed"):
        if not raw.get(key):
            raise ValueError(f"{where}: '{key}' is required")
    unknown_when = set(raw.get("when") or ()) - set(CASE_PROPERTIES)
    if unknown_when:
        raise ValueError(f"{where}: 'when' names unknown properties {sorted(unknown_when)}; known: "
                         f"{sorted(CASE_PROPERTIES)}")
    policy, behaviour = raw.get("oracle_policy"), raw.get("behaviour")
    check_name, ratio, precision = raw.get("check"), raw.get("max_error_ratio"), raw.get("precision")
    form = raw.get("backward_form")
    if form is not None and form != "flash":
        raise ValueError(f"{where}: backward_form must be 'flash', got {form!r}")
    if policy is not None and policy not in POLICIES:
        raise ValueError(f"{where}: oracle_policy must be one of {POLICIES}, got {policy!r}")
    if behaviour is not None and behaviour not in BEHAVIOURS:
        raise ValueError(f"{where}: behaviour must be one of {sorted(BEHAVIOURS)}, got {behaviour!r}")
    if check_name is not None and check_name not in CHECKS:
        raise ValueError(f"{where}: check must be one of {sorted(CHECKS)}, got {check_name!r}")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"{where}: precision must be one of {PRECISIONS}, got {precision!r}")
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio <= 1):
        raise ValueError(f"{where}: max_error_ratio must be a number > 1, got {ratio!r}")
    kinds = [k for k, v in (("oracle_policy", policy), ("behaviour", behaviour), ("check", check_name),
                            ("max_error_ratio", ratio)) if v is not None]
    if len(kinds) > 1 or (not kinds and precision is None and form is None):
        raise ValueError(f"{where}: give exactly one of oracle_policy, behaviour, check and max_error_ratio "
                         f"(or precision or backward_form alone), so the entry can be checked; got "
                         f"{kinds or 'none'}")
    upstream = raw.get("upstream")
    if upstream is not None and not str(upstream).startswith("https://"):
        raise ValueError(f"{where}: upstream must be an https:// link, got {upstream!r}")
    tup = lambda k: tuple(raw[k]) if raw.get(k) is not None else None
    return Entry(id=raw["id"], adapters=tuple(raw["adapters"]), cases=tuple(raw.get("cases") or ("*",)),
                 when=tuple(raw.get("when") or ()), observed=raw["observed"],
                 dtypes=tup("dtypes"), quantities=tup("quantities"), oracle_policy=policy, behaviour=behaviour,
                 check=check_name, max_error_ratio=float(ratio) if ratio is not None else None, precision=precision,
                 backward_form=form, upstream=upstream, varies=raw.get("varies"),
                 facts=_facts(raw.get("facts"), where), source=source)


def load(directory=DIVERGENCE_DIR) -> list[Entry]:
    """Every entry of every ``*.toml`` in ``directory``; a malformed file raises ValueError naming it."""
    entries: list[Entry] = []
    for path in sorted(Path(directory).glob("*.toml")):
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML: {exc}") from exc
        for raw in data.get("divergence", []):
            entries.append(_entry(raw, path.name))
    ids = [e.id for e in entries]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"divergence catalogue: duplicate ids {dup}")
    return entries


def covering(entries, adapter: str, case_id: str, dtype: str, quantity: str, facts=None) -> list[Entry]:
    """The entries covering a row computed under ``facts``."""
    return [e for e in entries if e.covers(adapter, case_id, dtype, quantity) and e.applies(facts)]


@dataclass
class EntryCheck:
    id: str
    status: str  # ok | stale | unchecked
    message: str
    rows: int


def check(entries, rows, adapters_run=(), full_matrix: bool = False) -> list[EntryCheck]:
    """The strict check: every row an entry covers must show the divergence it describes.

    ``adapters_run``: adapters this run included; ``full_matrix``: whether it ran every default case and
    dtype (only then is an entry covering no row stale rather than unchecked).
    """
    out = []
    for e in entries:
        covered = [r for r in rows if e.covers_row(r) and r["status"] not in ("unsupported", "skip", "error")]
        # a covered row contradicts the entry when it fails some other way, or passes although the entry
        # predicts a visibly different result there; a pass the entry cannot tell apart is neutral
        missing = [r["row_id"] for r in covered if r.get("divergence") != e.id
                   and (r["status"] == "fail" or r.get("contradicts") == e.id)]
        shown = [r for r in covered if r.get("divergence") == e.id]
        # on the full matrix every adapter the entry names must show it somewhere: an entry never over-claims.
        # An adapter none of whose rows ran under the entry's facts cannot show it (another machine's kernels).
        under = {r["adapter"] for r in rows if e.applies(r.get("facts"))} if e.facts else set(adapters_run)
        silent = sorted(a for a in set(e.adapters) & set(adapters_run) & under
                        if not any(r["adapter"] == a for r in shown)) if full_matrix else []
        elsewhere = sorted(set(e.adapters) & set(adapters_run) - under)
        if missing:
            out.append(EntryCheck(e.id, "stale", f"{len(missing)}/{len(covered)} covered rows no longer show "
                                  f"'{e.observed}': {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}",
                                  len(covered)))
        elif silent and e.varies:
            out.append(EntryCheck(e.id, "ok" if shown else "unchecked",
                                  f"reproduced in {len(shown)} rows; not on this machine for {', '.join(silent)} "
                                  f"({e.varies})", len(shown)))
        elif silent:
            out.append(EntryCheck(e.id, "stale", f"{', '.join(silent)} show it in no row of the full matrix (the "
                                  f"behaviour is gone there, or the entry names an adapter it never applied to)",
                                  len(shown)))
        elif shown:
            out.append(EntryCheck(e.id, "ok", f"reproduced in {len(shown)} rows", len(shown)))
        elif elsewhere and not covered:
            out.append(EntryCheck(e.id, "unchecked", f"applies when {e.conditions}: no row of "
                                  f"{', '.join(elsewhere)} ran under those facts here", 0))
        else:
            out.append(EntryCheck(e.id, "unchecked", "none of its rows ran", 0))
    return out


def export(entries, checks) -> list[dict]:
    """The entries a run checked, each with its verdict: what ``catalogue.json`` in the results holds."""
    verdicts = {c.id: c for c in checks}
    out = []
    for e in entries:
        c = verdicts.get(e.id)
        out.append({"id": e.id, "framework": Path(e.source).stem, "adapters": list(e.adapters),
                    "cases": list(e.cases), "when": list(e.when), "dtypes": list(e.dtypes) if e.dtypes else None,
                    "quantities": list(e.quantities) if e.quantities else None, "observed": e.observed,
                    "facts": {name: list(values) for name, values in e.facts} or None, "how": e.how, "upstream": e.upstream, "status": c.status if c else "unchecked",
                    "message": c.message if c else "", "rows": c.rows if c else 0})
    return out


def reproduce(entry: Entry, quantity: str, dtype: str, actual, goldens, canonical, compare, facts=None):
    """Compare ``actual`` with what ``entry`` describes; a Comparison (``ok``: it shows), or None if the entry
    cannot be applied to this quantity. ``goldens.get(policy, dtype)`` gives the oracle's arrays; ``facts`` are
    the row's (a model of a machine-dependent kernel reads them)."""
    policy = entry.oracle_policy or "zeros"
    judged_as = entry.precision or dtype
    form = entry.backward_form or "probs"
    golden = goldens.get(policy, "float64")[quantity]
    reference = goldens.get(policy, judged_as, form)[quantity]
    if entry.max_error_ratio is not None:
        shows = (not canonical.ok and canonical.error_ratio is not None
                 and canonical.error_ratio <= entry.max_error_ratio and "NaN" not in canonical.message
                 and "Inf" not in canonical.message)
        return _Shown(shows, canonical)
    if entry.check is not None:
        shows = CHECKS[entry.check](np.asarray(actual, np.float64), goldens, quantity, judged_as, compare)
        return _Shown(bool(shows), canonical)
    if entry.behaviour is not None:
        behaviour = BEHAVIOURS[entry.behaviour]
        modelled = entry.behaviour in MODELLED  # the model gives its own same-precision reference
        expect = lambda arr, dt: behaviour(np.asarray(arr, np.float64), goldens.inputs, quantity, dt, facts, judged_as) \
            if modelled else behaviour(np.asarray(arr, np.float64), goldens.inputs, quantity)
        try:
            golden, reference = expect(golden, "float64"), expect(reference, judged_as)
        except (ValueError, IndexError, KeyError):
            return None
        return compare(golden, reference, actual, judged_as, quantity)
    return compare(golden, reference, actual, judged_as, quantity,
                   lambda: goldens.sensitivity(judged_as, quantity, policy, form))


class _Shown:
    """A verdict carrying the canonical comparison's figures."""

    def __init__(self, ok: bool, canonical):
        self.ok, self._canonical = ok, canonical

    def figures(self) -> dict:
        return self._canonical.figures()
