"""The oracle's analytic backward against central finite differences, feature by feature (float64)."""
from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import pytest

from mhabench import impls
from mhabench.impls import oracle
from mhabench.impls.oracle_backward import backward
from mhabench.impls.spec import AttentionSpec, Weights

EPS = 1e-6
MAX_REL_ERR = 1e-6
# A gradient that is identically zero (bk always: softmax ignores a shift shared by a whole row)
# shows up in finite differences as rounding noise only.
FD_NOISE = 1e-8
ANALYTIC_ZERO = 1e-12


@dataclass(frozen=True)
class Case:
    spec: dict
    query_shape: tuple            # [B, *Q, Dq]
    kv_shape: tuple               # [B, *K] (no feature axis)
    value_width: int = 4
    key_width: int | None = None  # None: no key input (value is used for both)
    mask: object = None           # None, a shape (random mask) or a bool array
    causal: bool | str = False
    fully_masked: str = "zeros"
    seed: int = 0
    # window, query_lengths, key_value_lengths as given; bias as a shape (random normal) or an array
    extra: dict = field(default_factory=dict)


def _empty_row_mask():
    """[B, T, S] with query row 1 of batch 0 attending nothing."""
    m = np.ones((2, 3, 4), bool)
    m[0, 1] = False
    m[1, :, 0] = False
    return m


def _causal_empty_first_row():
    """With causal, masking key 0 leaves query 0 with nothing to attend."""
    m = np.ones((2, 1, 4), bool)
    m[0, 0, 0] = False
    return m


CASES = {
    "self": Case(dict(num_heads=2, key_dim=3), (2, 3, 4), (2, 3)),
    "cross_T3_S5": Case(dict(num_heads=2, key_dim=3), (2, 3, 4), (2, 5)),
    "separate_key": Case(dict(num_heads=2, key_dim=3), (2, 3, 4), (2, 5), key_width=4),
    "key_value_dims": Case(dict(num_heads=2, key_dim=3), (2, 3, 4), (2, 5), value_width=5, key_width=3),
    "value_dim": Case(dict(num_heads=2, key_dim=3, value_dim=2), (2, 3, 4), (2, 4), key_width=4),
    "head_width": Case(dict(num_heads=3, key_dim=2), (1, 3, 4), (1, 4)),
    "output_shape_int": Case(dict(num_heads=2, key_dim=2, output_shape=6), (2, 3, 4), (2, 4)),
    "output_shape_tuple": Case(dict(num_heads=2, key_dim=2, output_shape=(2, 3)), (2, 3, 4), (2, 4)),
    "no_bias": Case(dict(num_heads=2, key_dim=3, use_bias=False), (2, 3, 4), (2, 5), key_width=4),
    "mask_1_S": Case(dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 5), mask=(1, 5)),
    "mask_T_S": Case(dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 5), mask=(3, 5)),
    "mask_B_1_S": Case(dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 5), mask=(2, 1, 5)),
    "mask_B_T_S": Case(dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 5), mask=(2, 3, 5)),
    "mask_head_1_H_T_S": Case(dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 5), mask=(1, 2, 3, 5)),
    "mask_head_B_H_1_S": Case(dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 5), mask=(2, 2, 1, 5)),
    "causal_T4_S4": Case(dict(num_heads=2, key_dim=2), (2, 4, 4), (2, 4), causal=True),
    "causal_T3_S5": Case(dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 5), key_width=4, causal=True),
    "causal_T5_S3": Case(dict(num_heads=2, key_dim=2), (1, 5, 4), (1, 3), causal=True),
    "causal_and_mask": Case(dict(num_heads=2, key_dim=2), (2, 4, 4), (2, 4), mask=(2, 4, 4), causal=True),
    "axes_1_rank4": Case(dict(num_heads=2, key_dim=2, attention_axes=1), (2, 3, 2, 4), (2, 4, 2)),
    "axes_neg2_rank4": Case(dict(num_heads=2, key_dim=2, attention_axes=-2), (2, 2, 3, 4), (2, 2, 4),
                            mask=(2, 3, 4)),
    "axes_multi_default": Case(dict(num_heads=2, key_dim=2), (1, 2, 3, 4), (1, 3, 2), key_width=3),
    "axes_1_3_rank5": Case(dict(num_heads=2, key_dim=2, attention_axes=(1, 3)), (1, 2, 2, 3, 4), (1, 3, 2, 2),
                           mask=(1, 2, 2, 3, 3, 2)),
    "axes_multi_causal": Case(dict(num_heads=2, key_dim=2, attention_axes=(-3, -2)), (1, 2, 2, 4), (1, 3, 2),
                              causal=True),
    "fully_masked_zeros": Case(dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 4), mask=_empty_row_mask()),
    "fully_masked_uniform": Case(dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 4), mask=_empty_row_mask(),
                                 fully_masked="uniform"),
    "fully_masked_unmasked": Case(dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 4), mask=_empty_row_mask(),
                                  fully_masked="unmasked"),
    "fully_masked_causal_zeros": Case(dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 4),
                                      mask=_causal_empty_first_row(), causal=True),
    "fully_masked_causal_uniform": Case(dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 4),
                                        mask=_causal_empty_first_row(), causal=True, fully_masked="uniform"),
    # ---- modern attention
    "gqa_2of4_mask": Case(dict(num_heads=4, key_dim=2, num_kv_heads=2), (2, 3, 4), (2, 5), key_width=3,
                          mask=(2, 3, 5)),
    "mqa_causal_value_dim": Case(dict(num_heads=3, key_dim=2, value_dim=3, num_kv_heads=1), (1, 4, 4), (1, 4),
                                 causal=True),
    "bottom_right_T3_S5": Case(dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 5), causal="bottom_right"),
    "bottom_right_T5_S3": Case(dict(num_heads=2, key_dim=2), (1, 5, 4), (1, 3), causal="bottom_right"),
    "bottom_right_T5_S3_uniform": Case(dict(num_heads=2, key_dim=2), (1, 5, 4), (1, 3), causal="bottom_right",
                                       fully_masked="uniform"),
    "window_1_1_cross": Case(dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 5), extra=dict(window=(1, 1))),
    "window_bottom_right": Case(dict(num_heads=2, key_dim=2), (2, 2, 4), (2, 5), causal="bottom_right",
                                extra=dict(window=(1, 0))),
    "bias_T_S": Case(dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 5), extra=dict(bias=(3, 5))),
    "bias_per_head_with_mask": Case(dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 5), mask=(2, 3, 5),
                                    extra=dict(bias=(2, 2, 3, 5))),
    "bias_neg_inf": Case(dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 4),
                         extra=dict(bias=np.array([[0.3, -np.inf, 0.1, -0.2], [-np.inf] * 4, [0.5, 0.0, -np.inf, 1.0]]))),
    "bias_neg_inf_unmasked": Case(dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 4), mask=_empty_row_mask(),
                                  fully_masked="unmasked",
                                  extra=dict(bias=np.array([[0.3, -np.inf, 0.1, -0.2], [0.2, 0.4, -0.5, -np.inf],
                                                            [0.5, 0.0, -np.inf, 1.0]]))),
    "bias_axes_2_rank4": Case(dict(num_heads=2, key_dim=2, attention_axes=2), (2, 2, 3, 4), (2, 2, 4),
                              extra=dict(bias=(2, 1, 3, 4))),
    "lengths": Case(dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 5),
                    extra=dict(query_lengths=np.array([3, 1]), key_value_lengths=np.array([2, 5]))),
    "lengths_axes_1_3_rank5": Case(dict(num_heads=2, key_dim=2, attention_axes=(1, 3)), (2, 2, 2, 2, 4), (2, 3, 2, 2),
                                   extra=dict(query_lengths=np.array([3, 4]), key_value_lengths=np.array([5, 2]))),
    # NaN/Inf where nothing reads: key/value positions masked for every row, a query row padded away
    "non_finite_never_read": Case(dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 5), key_width=4,
                                  mask=np.array([[True, True, True, False, True]]),
                                  extra=dict(query_lengths=np.array([3, 2]),
                                             poison={"value": [(0, 3, 1), (1, 3, 0)], "key": [(1, 3, 2)],
                                                     "query": [(1, 2, 0)]})),
    # inference attention: per-sequence positions, the soft cap, the scale
    "offset_decode_cache": Case(dict(num_heads=4, key_dim=2, num_kv_heads=2), (3, 1, 4), (3, 5), causal=True,
                                extra=dict(query_offset=np.array([0, 2, 4]), key_value_lengths=np.array([1, 3, 5]))),
    "offset_speculative_window": Case(dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 6), key_width=3, causal=True,
                                      extra=dict(query_offset=np.array([3, -1]), window=(1, 0))),
    "softcap_bias": Case(dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 5), mask=(2, 3, 5),
                         extra=dict(softcap=0.8, scale=2.5, bias=(3, 5))),
    "scale_negative": Case(dict(num_heads=2, key_dim=3), (2, 3, 4), (2, 4), extra=dict(scale=-0.7)),
    "inference_everything": Case(dict(num_heads=4, key_dim=2, value_dim=3, num_kv_heads=2), (2, 2, 4), (2, 6),
                                 value_width=3, key_width=5, mask=(2, 2, 6), causal=True,
                                 extra=dict(query_offset=np.array([4, 1]), key_value_lengths=np.array([6, 3]),
                                            window=(3, None), softcap=1.2, scale=0.9, bias=(2, 6))),
    # a masked position stays masked whatever its bias; a row that reads nothing passes no gradient, whatever
    # its query holds
    "large_and_inf_bias_where_masked": Case(dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 4), mask=_empty_row_mask(),
                                            extra=dict(bias=np.where(_empty_row_mask(), 0.3,
                                                                     np.array([1e30, np.inf] * 12).reshape(2, 3, 4)))),
    "nonfinite_query_in_fully_masked_row": Case(dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 4), key_width=3,
                                                mask=_empty_row_mask(), causal=True,
                                                extra=dict(poison={"query": [(0, 1, 0), (0, 1, 3)]})),
    "key_value_length_0": Case(dict(num_heads=2, key_dim=2), (2, 3, 4), (2, 0), key_width=3, causal=True),
    "modern_everything": Case(dict(num_heads=4, key_dim=2, value_dim=3, output_shape=(3, 2), num_kv_heads=2,
                                   attention_axes=(1, 3)), (2, 2, 2, 2, 4), (2, 3, 2, 2), value_width=3, key_width=5,
                              mask=(2, 1, 2, 2, 3, 2), causal="bottom_right",
                              extra=dict(window=(None, 1), bias=(2, 2, 2, 3, 2), query_lengths=np.array([4, 3]),
                                         key_value_lengths=np.array([6, 5]))),
    "everything": Case(dict(num_heads=2, key_dim=2, value_dim=3, output_shape=(3, 2), attention_axes=(1, 3),
                            use_bias=False), (1, 2, 2, 2, 4), (1, 3, 2, 2), value_width=3, key_width=5,
                       mask=(1, 1, 2, 2, 1, 3, 2), causal=True, fully_masked="uniform"),
}


@functools.cache
def setup(case_id: str):
    """Inputs, weights, cotangent and the analytic gradients for one case."""
    case = CASES[case_id]
    spec = AttentionSpec(**case.spec)
    rng = np.random.default_rng(case.seed)
    q_dim = case.query_shape[-1]
    weights = Weights.random(spec, q_dim, case.value_width, case.key_width or case.value_width, seed=case.seed)
    inputs = {"query": rng.normal(size=case.query_shape), "value": rng.normal(size=case.kv_shape + (case.value_width,))}
    if case.key_width is not None:
        inputs["key"] = rng.normal(size=case.kv_shape + (case.key_width,))
    mask = case.mask
    if isinstance(mask, tuple):
        mask = rng.random(mask) < 0.7
    features = dict(case.extra)
    for name, positions in features.pop("poison", {}).items():
        for index, poison in zip(positions, (np.nan, np.inf, -np.inf) * 3):
            inputs[name][index] = poison
    if isinstance(features.get("bias"), tuple):
        features["bias"] = rng.normal(size=features["bias"])
    if "bias" in features:  # differentiated like an input
        inputs["bias"] = features.pop("bias")
    out, _ = oracle.forward(spec, weights, mask=mask, causal=case.causal, return_scores=False,
                            fully_masked=case.fully_masked, **inputs, **features)
    cotangent = rng.normal(size=out.shape)
    grads = backward(spec, weights, mask=mask, causal=case.causal, cotangent=cotangent,
                     fully_masked=case.fully_masked, **inputs, **features)
    return spec, weights, inputs, mask, cotangent, grads


def features_of(case_id: str) -> dict:
    """The case's window and lengths (the bias travels with the inputs)."""
    return {k: v for k, v in CASES[case_id].extra.items() if k not in ("bias", "poison")}


def loss(case_id: str, name: str, array: np.ndarray) -> float:
    """sum(output * cotangent) with the input or weight ``name`` replaced by ``array``."""
    case = CASES[case_id]
    spec, weights, inputs, mask, cotangent, _ = setup(case_id)
    inputs = dict(inputs)
    if name in inputs:
        inputs[name] = array
    else:
        weights = Weights(**{**weights.as_dict(), name: array})
    out, _ = oracle.forward(spec, weights, mask=mask, causal=case.causal, return_scores=False,
                            fully_masked=case.fully_masked, **inputs, **features_of(case_id))
    return float(np.sum(out * cotangent))


def finite_difference(case_id: str, name: str, at: np.ndarray) -> np.ndarray:
    grad = np.zeros_like(at)
    for index in np.ndindex(at.shape):
        plus, minus = at.copy(), at.copy()
        plus[index] += EPS
        minus[index] -= EPS
        grad[index] = (loss(case_id, name, plus) - loss(case_id, name, minus)) / (2 * EPS)
    return grad


def relative_error(analytic: np.ndarray, numeric: np.ndarray) -> float:
    return float(np.max(np.abs(analytic - numeric)) / np.max(np.abs(numeric)))


def gradient_params():
    for case_id in CASES:
        _, weights, inputs, *_ = setup(case_id)
        for name in list(inputs) + list(weights.as_dict()):
            yield pytest.param(case_id, name, id=f"{case_id}-grad_{name}")


def check_against_fd(case_id: str, name: str) -> float:
    """Assert the analytic gradient matches finite differences; return the relative error (0 for a true zero)."""
    spec, weights, inputs, mask, cotangent, grads = setup(case_id)
    at = inputs[name] if name in inputs else getattr(weights, name)
    analytic = grads[name]
    assert analytic.shape == at.shape and analytic.dtype == np.float64
    if at.size == 0:  # S = 0: the key and value inputs are empty, and so are their gradients
        return 0.0
    unread = ~np.isfinite(at)  # poisoned where nothing reads: exactly zero gradient, and finite everywhere
    if np.any(unread) and name != "bias":
        assert np.all(analytic[unread] == 0.0) and np.all(np.isfinite(analytic)), name
        at = np.where(unread, 0.0, at)
    if name == "bias":  # a -inf bias is a mask: no perturbation unmasks it, so its gradient is 0
        assert np.all(analytic[np.isneginf(at)] == 0.0)
    numeric = finite_difference(case_id, name, at)
    if np.max(np.abs(numeric)) < FD_NOISE:
        assert np.max(np.abs(analytic)) < ANALYTIC_ZERO, f"{name}: finite differences say zero"
        return 0.0
    err = relative_error(analytic, numeric)
    assert err < MAX_REL_ERR, f"{name}: relative error {err:.2e} against finite differences"
    return err


@pytest.mark.parametrize("case_id, name", list(gradient_params()))
def test_matches_finite_differences(case_id, name):
    check_against_fd(case_id, name)


def test_gradient_keys_follow_the_call():
    _, _, _, _, _, with_key = setup("separate_key")
    _, _, _, _, _, no_key = setup("self")
    _, _, _, _, _, no_bias = setup("no_bias")
    weights = ["Wq", "bq", "Wk", "bk", "Wv", "bv", "Wo", "bo"]
    assert set(with_key) == {"query", "key", "value", *weights}
    assert set(no_key) == {"query", "value", *weights}
    assert set(no_bias) == {"query", "key", "value", "Wq", "Wk", "Wv", "Wo"}


def test_value_gradient_without_key_is_the_sum_of_both_uses():
    spec, weights, inputs, mask, cotangent, grads = setup("self")
    separate = backward(spec, weights, inputs["query"], inputs["value"], inputs["value"], mask, False, cotangent)
    np.testing.assert_allclose(grads["value"], separate["value"] + separate["key"], rtol=1e-13, atol=1e-15)


def test_everything_masked_leaves_only_the_output_bias():
    spec = AttentionSpec(num_heads=2, key_dim=2)
    weights = Weights.random(spec, 4, 4, seed=3)
    rng = np.random.default_rng(3)
    query, value = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 5, 4))
    cotangent = rng.normal(size=(2, 3, 4))
    grads = backward(spec, weights, query, value, None, np.zeros((1, 5), bool), False, cotangent)
    for name, g in grads.items():
        if name == "bo":
            np.testing.assert_allclose(g, cotangent.sum(axis=(0, 1)), rtol=1e-14)
        else:
            assert np.all(g == 0.0), name


def test_fully_masked_row_policies():
    """zeros and uniform rows pass nothing to their scores (so nothing to that query row);
    a uniform row still passes gradient to the values it averages."""
    spec, weights, inputs, mask, cotangent, zeros = setup("fully_masked_zeros")
    uniform = backward(spec, weights, inputs["query"], inputs["value"], None, mask, False, cotangent,
                       fully_masked="uniform")
    assert np.all(zeros["query"][0, 1] == 0.0) and np.all(uniform["query"][0, 1] == 0.0)
    assert np.all(zeros["query"][0, 0] != 0.0)
    assert not np.allclose(zeros["value"], uniform["value"])
    for name in ("query", "value", "Wq", "Wv", "Wo"):
        assert np.all(np.isfinite(zeros[name])) and np.all(np.isfinite(uniform[name]))


def test_nan_policy_propagates_nan_from_the_empty_row():
    spec, weights, inputs, mask, cotangent, zeros = setup("fully_masked_zeros")
    nan = backward(spec, weights, inputs["query"], inputs["value"], None, mask, False, cotangent,
                   fully_masked="nan")
    # Batch 0 holds the empty row: its score gradient is NaN, so every key/value of batch 0 and every
    # weight that sums over it is NaN; only that query row is NaN; batch 1 and bo are untouched.
    assert np.all(np.isnan(nan["query"][0, 1]))
    np.testing.assert_array_equal(nan["query"][0, [0, 2]], zeros["query"][0, [0, 2]])
    assert np.all(np.isnan(nan["value"][0]))
    np.testing.assert_array_equal(nan["query"][1], zeros["query"][1])
    np.testing.assert_array_equal(nan["value"][1], zeros["value"][1])
    np.testing.assert_array_equal(nan["bo"], zeros["bo"])
    for name in ("Wq", "bq", "Wk", "bk", "Wv", "bv", "Wo"):
        assert np.all(np.isnan(nan[name])), name


@pytest.mark.parametrize("dtype, rtol", [("float32", 2e-6), ("float16", 1e-2), ("bfloat16", 5e-2)])
def test_lower_precision_is_rounded_and_close(dtype, rtol):
    spec, weights, inputs, mask, cotangent, golden = setup("everything")
    reference = backward(spec, weights, inputs["query"], inputs["value"], inputs["key"], mask, True, cotangent,
                         fully_masked="uniform", dtype=dtype)
    storage = impls.validation.numpy_dtype(dtype)
    assert set(reference) == set(golden)
    for name, g in reference.items():
        assert g.dtype == np.float64
        np.testing.assert_array_equal(g, g.astype(storage).astype(np.float64), err_msg=f"{name} not rounded")
        scale = np.max(np.abs(golden[name]))
        assert np.max(np.abs(g - golden[name])) <= rtol * scale, name
    assert not all(np.array_equal(reference[n], golden[n]) for n in golden)


def test_cotangent_of_the_wrong_shape_is_a_value_error():
    spec, weights, inputs, mask, cotangent, _ = setup("output_shape_tuple")
    with pytest.raises(ValueError, match=r"cotangent must have the output's shape \[2, 3, 2, 3\]"):
        backward(spec, weights, inputs["query"], inputs["value"], None, mask, False, cotangent[..., 0])
    with pytest.raises(TypeError, match="cotangent"):
        backward(spec, weights, inputs["query"], inputs["value"], None, mask, False, None)


def test_bad_policy_and_dtype_are_value_errors():
    spec, weights, inputs, mask, cotangent, _ = setup("self")
    with pytest.raises(ValueError, match="fully_masked"):
        backward(spec, weights, inputs["query"], inputs["value"], cotangent=cotangent, fully_masked="ones")
    with pytest.raises(ValueError, match="dtype"):
        backward(spec, weights, inputs["query"], inputs["value"], cotangent=cotangent, dtype="int8")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_numpy_oracle_adapter_gradients(dtype):
    spec, weights, inputs, mask, cotangent, _ = setup("fully_masked_uniform")
    layer = impls.get_adapter("numpy_oracle").build(spec, weights, dtype=dtype, fully_masked="uniform")
    got = layer.gradients(inputs["query"], inputs["value"], None, mask, False, cotangent)
    want = backward(spec, weights, inputs["query"], inputs["value"], None, mask, False, cotangent,
                    fully_masked="uniform", dtype=dtype)
    assert set(got) == set(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


@pytest.mark.parametrize("case_id", ["separate_key", "mask_B_T_S", "causal_T3_S5", "gqa_2of4_mask",
                                     "bias_per_head_with_mask", "fully_masked_uniform", "key_value_length_0"])
def test_flash_form_is_the_same_gradient_in_float64(case_id):
    spec, weights, inputs, mask, cotangent, grads = setup(case_id)
    case = CASES[case_id]
    flash = backward(spec, weights, mask=mask, causal=case.causal, cotangent=cotangent, form="flash",
                     fully_masked=case.fully_masked, **inputs, **features_of(case_id))
    assert set(flash) == set(grads)
    for name in grads:
        np.testing.assert_allclose(flash[name], grads[name], rtol=1e-9, atol=1e-12, err_msg=name)


def test_flash_form_rounds_differently_where_the_softmax_saturates():
    """With inputs scaled 60x every softmax row is one-hot: the probs form's query gradient is exactly the
    golden's (p * (dp - dp) = 0), while rowsum(do * o) carries the rounding of o at the inputs' magnitude."""
    spec, weights, inputs, mask, cotangent, grads = setup("separate_key")
    inputs = {k: v * 60.0 for k, v in inputs.items()}
    exact = backward(spec, weights, cotangent=cotangent, **inputs)
    err = lambda form: np.max(np.abs(backward(spec, weights, cotangent=cotangent, dtype="float32", form=form,
                                              **inputs)["query"] - exact["query"]))
    assert err("probs") < 1e-20 < 1e-5 < err("flash")
    with pytest.raises(ValueError, match="form"):
        backward(spec, weights, cotangent=cotangent, form="fast", **inputs)
