"""What the divergence catalogue's entries are written in: the properties of a case an entry's ``when``
names, the behaviours that reproduce a framework's result from the golden, and the checks that recognise
one where nothing reproduces its values. ``catalogue`` loads the entries and checks rows against them.

Everything here is computed from a case's own data or the oracle's arrays, never from a row's text.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from mhabench.impls.validation import FULLY_MASKED_POLICIES as POLICIES, flatten

from .cases import InvalidCase, default_cases, find_case


# ---- properties of a case, for entries that follow a behaviour wherever it arises -----------------------
def _masked_empty_rows_only(case) -> bool:
    """Every row with no allowed key is emptied by the mask, causal, the window or key/value lengths: no query
    lengths, and no row whose otherwise allowed positions are all -inf in the bias (frameworks that fill masked
    logits with a finite value treat those two apart)."""
    call = case.call()
    if call.query_lengths is not None:
        return False

    def empty(**parts):  # [N, 1|H, T]: the rows with no allowed key
        allowed = call.flat_allowed(**parts)
        return np.zeros((1, 1, 1), bool) if allowed is None else ~np.any(allowed, axis=-1)
    by_all, by_masking = empty(), empty(bias=False)
    shape = np.broadcast_shapes(by_all.shape, by_masking.shape)
    return bool(np.array_equal(np.broadcast_to(by_all, shape), np.broadcast_to(by_masking, shape)))


def _empty_rows(case) -> bool:
    allowed = case.call().flat_allowed()
    return allowed is not None and not np.all(np.any(allowed, axis=-1))


def _bad_positions(call, name: str) -> np.ndarray:
    """``[N, L]``: flattened positions of input ``name`` holding a NaN or Inf."""
    x = getattr(call, name)
    return ~np.all(np.isfinite(flatten(call, np.asarray(x, np.float64))), axis=-1)


def _nonfinite(case) -> bool:
    i = case.inputs()
    return any(a is not None and not np.all(np.isfinite(a)) for a in (i.query, i.key, i.value))


def _hidden_nonfinite(case, names) -> bool:
    """A NaN/Inf at a key position of one of the inputs ``names`` that the mask hides from some query."""
    call = case.call()
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
    return bool(np.any(_bad_positions(case.call(), "query")))


def _unread_nonfinite_query(case) -> bool:
    """A NaN/Inf query in a row that reads nothing (no allowed key for any head: fully masked, or past its query
    length), whose output and gradients are canonically finite."""
    call = case.call()
    allowed = call.flat_allowed()
    if allowed is None:
        return False
    empty = ~np.any(allowed, axis=(1, 3))  # [N, T]: rows no head reads anything in
    return bool(np.any(_bad_positions(call, "query") & empty))


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
    "empty_rows": _empty_rows,                  # a query row with no allowed key
    "masked_empty_rows_only": _masked_empty_rows_only,  # ... and each is emptied by masking, not query lengths or -inf
    "nonfinite": _nonfinite,                    # a NaN or Inf in an input
    "masked_nonfinite": _masked_nonfinite,      # a NaN or Inf in a key or value where the mask hides it
    "masked_nonfinite_key": _masked_nonfinite_key,  # the same, in the key (so in the logits)
    "masked_nonfinite_value": _masked_nonfinite_value,  # the same, in the value
    "nonfinite_query": _nonfinite_query,        # a NaN or Inf in the query
    "finite_query": lambda case: not _nonfinite_query(case),  # none there
    "unread_nonfinite_query": _unread_nonfinite_query,  # a NaN or Inf query in a row that reads nothing
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


class CaseProperties:
    """Whether a case has a property of CASE_PROPERTIES, computed from the case's own data once per case and
    property, and kept here: the catalogue that consults it owns it (``catalogue.Catalogue``)."""

    def __init__(self):
        self._cases: dict | None = None  # the default matrix by id, indexed on first use
        self._given: dict = {}  # cases being judged, by id: a hypothesis-drawn case cannot be rebuilt from its id
        self._known: dict[tuple[str, str], bool] = {}

    def judging(self, case) -> None:
        """Consult ``case`` itself for its id from now on (the case a row is being judged for): its properties
        are its own, even where its id names no case of the matrix (hypothesis draws)."""
        if self._given.get(case.id) is not case:
            self._given[case.id] = case
            self._known = {key: value for key, value in self._known.items() if key[0] != case.id}

    def case(self, case_id: str):
        """The case behind ``case_id`` (one being judged, the default matrix, or a random case rebuilt from its
        id), or None."""
        if case_id in self._given:
            return self._given[case_id]
        if self._cases is None:
            self._cases = {case.id: case for case in default_cases()}
        if case_id not in self._cases:
            self._cases[case_id] = find_case(case_id)
        return self._cases[case_id]

    def __call__(self, case_id: str, name: str) -> bool:
        """Whether the case behind ``case_id`` has property ``name`` (False for a case that cannot be rebuilt;
        a bad input has the properties of the valid call it spoils)."""
        key = (case_id, name)
        if key not in self._known:
            case = self.case(case_id)
            if isinstance(case, InvalidCase):
                case = case.sample
            with np.errstate(all="ignore"):
                self._known[key] = bool(case is not None and CASE_PROPERTIES[name](case))
        return self._known[key]


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


def _call_scale(inputs) -> float:
    """The scale of the case's logits: its ``scale=``, else 1/sqrt(key_dim)."""
    return inputs.scale if inputs.scale is not None else 1.0 / np.sqrt(inputs.spec.key_dim)


def _with_scale(inputs, quantity: str, scale: float) -> np.ndarray:
    """The float64 result when the logits are scaled by ``scale`` instead of the call's scale (:func:`_call_scale`).

    Scaling the query by ``scale`` equals scaling Wq and bq by ``r = scale / call's scale`` under the exact
    scale, so the oracle computes it; the gradients of Wq and bq pick up the factor ``r`` once more (chain rule).
    """
    from mhabench.impls import Weights, oracle, oracle_backward
    r = scale / _call_scale(inputs)
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
    """The float64 result when the call's scale (1/sqrt(key_dim) by default) is first rounded to float32 (float64
    rows only)."""
    return _with_scale(inputs, quantity, float(np.float32(_call_scale(inputs))))


def _sqrt_scale_rounded_to_float32(expected: np.ndarray, inputs, quantity: str) -> np.ndarray:
    """The float64 result of the ONNX Attention operator's function body (onnx 1.23): it computes the square root of
    the scale in float32 (the ``scale`` attribute, a float32 as every ONNX float attribute; by default
    ``1 / sqrt(key_dim)`` from the head size cast to float32) and multiplies q and k by it, so the logits are
    scaled by that float32 number squared (float64 rows only)."""
    f32 = np.float32
    scale = f32(inputs.scale) if inputs.scale is not None else f32(f32(1) / f32(np.sqrt(f32(inputs.spec.key_dim))))
    return _with_scale(inputs, quantity, float(f32(np.sqrt(scale))) ** 2)


@dataclass(frozen=True)
class Modelled:
    """A behaviour given value for value by a framework model, ``framework_models.<model>(inputs, dtype)``: in
    float64 for the golden, rounded as the oracle is for the reference (so a modelled row is judged at its
    dtype's tolerance). The goldens of a case build each model once per dtype (``Goldens.modelled``).

    A model of a machine-dependent kernel names the row ``facts`` it reads (the vector width, say): it is
    then called with those facts and the dtype the row is judged in (``kernel_dtype``: its lanes), and cannot
    apply to a row that does not record them."""

    model: str
    facts: tuple[str, ...] = ()

    def machine(self, facts, kernel_dtype: str) -> dict:
        """The keywords the model takes from a row: {} for a model of no machine; KeyError for a row lacking
        one of the facts it reads."""
        if not self.facts:
            return {}
        return {"facts": {name: (facts or {})[name] for name in self.facts}, "kernel_dtype": kernel_dtype}


# Named behaviours no oracle policy reproduces: (golden or reference, inputs, quantity) -> the array the
# implementation is expected to return instead, applied to both golden and reference, then compared as usual;
# or a framework model that gives both (Modelled).
BEHAVIOURS: dict[str, Callable[[np.ndarray, object, str], np.ndarray] | Modelled] = {
    "nonfinite_input_poisons_batch": _nonfinite_input_poisons_batch,
    "nan_row_output_is_bias": _nan_row_output_is_bias,
    "scale_rounded_to_float32": _scale_rounded_to_float32,
    "sqrt_scale_rounded_to_float32": _sqrt_scale_rounded_to_float32,
    # jax.nn.dot_product_attention's XLA path: masked logits replaced by a large finite negative, a -inf bias
    # kept, the rows past the query lengths zeroed
    "jax_masked_logits_filled": Modelled("jax_filled_attention"),
    # Keras 2 over several axes: exp(x - logsumexp(x)) with the -1e9 mask rounded in, weights 1 in empty rows
    "keras2_logsumexp_rounded": Modelled("keras2_logsumexp_rounded"),
    # torch's CPU flash kernel: an all-NaN query row shorter than the vector width loses its NaN in the scalar
    # tail of the row maximum and is zero-filled; the width is the row's torch_vector_bits
    "torch_cpu_flash_row_max": Modelled("torch_cpu_flash_row_max", ("torch_vector_bits",)),
    # compiled FlexAttention's CPU template: the same maximum drops a NaN at every length and width
    "torch_flex_cpu_row_max": Modelled("torch_flex_cpu_row_max"),
}


def _nan_rows_only_at_nonfinite_logits(golden, reference, actual, quantity, dtype, compare) -> bool:
    golden, reference = np.asarray(golden, np.float64), np.asarray(reference, np.float64)
    nan_rows = np.isnan(golden).any(axis=-1)
    rows = actual[nan_rows]
    shaped = rows.size > 0 and np.isnan(rows).any(axis=-1).all() and np.all(np.where(np.isnan(rows), 0.0, rows) == 0)
    return bool(shaped) and compare(golden[~nan_rows], reference[~nan_rows], actual[~nan_rows], dtype, quantity).ok


def _nan_rows_keep_nan_only_at_nonfinite_logits(actual, goldens, quantity, dtype, compare, policy="zeros",
        form="probs") -> bool:
    """Scores: where the golden's row is NaN, the row has NaN somewhere and exactly 0 everywhere else (the
    softmax of a row holding NaN/Inf logits zeroes the finite ones); every other row matches the golden."""
    return _nan_rows_only_at_nonfinite_logits(goldens.get(policy, "float64", form)[quantity],
                                              goldens.get(policy, dtype, form)[quantity], actual, quantity, dtype,
                                              compare)


def _poisoned_batch_scores_nan_only_at_nonfinite_logits(actual, goldens, quantity, dtype, compare, policy="zeros",
        form="probs") -> bool:
    """As nan_rows_keep_nan_only_at_nonfinite_logits, after a NaN/Inf input anywhere (masked or not) has made
    every row of its batch element NaN (nonfinite_input_poisons_batch)."""
    poison = lambda a: _nonfinite_input_poisons_batch(np.asarray(a, np.float64), goldens.inputs, quantity)
    return _nan_rows_only_at_nonfinite_logits(poison(goldens.get(policy, "float64", form)[quantity]),
                                              poison(goldens.get(policy, dtype, form)[quantity]), actual, quantity,
                                              dtype, compare)


def _value_gradient_nan_at_nonfinite_keys_zero_elsewhere(actual, goldens, quantity, dtype, compare, policy="zeros",
        form="probs") -> bool:
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
    golden = np.asarray(goldens.get(policy, "float64", form)[quantity], np.float64)
    reference = np.asarray(goldens.get(policy, dtype, form)[quantity], np.float64)
    poisoned = actual[batches]
    shaped = bool(np.isnan(actual[bad_keys]).all() and np.all(np.isnan(poisoned) | (poisoned == 0)))
    return shaped and compare(golden[~batches], reference[~batches], actual[~batches], dtype, quantity).ok


def _introduces_nan(actual, goldens, quantity, dtype, compare, policy="zeros",
        form="probs") -> bool:
    """NaN where the golden is finite, and everywhere else within tolerance of the golden."""
    golden = np.asarray(goldens.get(policy, "float64", form)[quantity], np.float64)
    reference = np.asarray(goldens.get(policy, dtype, form)[quantity], np.float64)
    new_nan = np.isnan(actual) & np.isfinite(golden)
    rest = ~np.isnan(actual)
    return bool(new_nan.any()) and compare(golden[rest], reference[rest], actual[rest], dtype, quantity).ok


def _finite_and_off(actual, goldens, quantity, dtype, compare, policy="zeros",
        form="probs") -> bool:
    """NaN and Inf exactly where the golden has them, but the values outside tolerance."""
    golden = np.asarray(goldens.get(policy, "float64", form)[quantity], np.float64)
    reference = np.asarray(goldens.get(policy, dtype, form)[quantity], np.float64)
    result = compare(golden, reference, actual, dtype, quantity)
    return not result.ok and not result.nonfinite


def _finite_but_matches_no_policy(actual, goldens, quantity, dtype, compare, policy="zeros",
        form="probs") -> bool:
    """Finite everywhere, yet unlike what any fully-masked-row policy of the oracle gives."""
    if not np.all(np.isfinite(actual)):
        return False
    return not any(compare(goldens.get(p, "float64")[quantity], goldens.get(p, dtype)[quantity], actual, dtype,
                           quantity).ok for p in POLICIES)


# Named predicates, for behaviours whose exact values no model here reproduces:
# (actual, goldens, quantity, dtype, compare, policy, form) -> whether the actual array shows the behaviour,
# judged against the golden of the entry's fully-masked-row ``policy`` and backward ``form`` (canonical unless
# the entry names them: a framework whose empty rows follow another policy shows a NaN on top of that one).
CHECKS: dict[str, Callable] = {
    "nan_rows_keep_nan_only_at_nonfinite_logits": _nan_rows_keep_nan_only_at_nonfinite_logits,
    "finite_but_matches_no_policy": _finite_but_matches_no_policy,
    "poisoned_batch_scores_nan_only_at_nonfinite_logits": _poisoned_batch_scores_nan_only_at_nonfinite_logits,
    "introduces_nan": _introduces_nan,
    "value_gradient_nan_at_nonfinite_keys_zero_elsewhere": _value_gradient_nan_at_nonfinite_keys_zero_elsewhere,
    "finite_and_off": _finite_and_off,
}
