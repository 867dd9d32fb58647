"""keras_gqa (keras.layers.GroupQueryAttention) against the oracle, its limits, and the Keras behaviours its
catalogue entries describe. The TensorFlow backend runs here; the JAX and PyTorch backends run in worker
processes when MHABENCH_KERAS_BACKENDS=1 (as for keras_mha)."""
from __future__ import annotations

import os

import numpy as np
import pytest

from mhabench import impls
from mhabench.conformance import catalogue
from mhabench.conformance.cases import Inputs
from mhabench.impls import oracle, oracle_backward
from tests.feature_cases import CASES, FULLY_MASKED

pytest.importorskip("keras")

BY_ID = {c.id: c for c in CASES}
OTHER_BACKENDS = os.environ.get("MHABENCH_KERAS_BACKENDS") == "1"
NAMES = ["keras_gqa", "keras_gqa@jax", "keras_gqa@torch"]
# expressible: one head_dim for q, k, v and an output as wide as the query
EXPRESSIBLE = ["self", "cross_T4_S7", "kv_widths", "heads8", "no_bias", "axes_2_4d", "axes_23_5d", "mask_TS",
               "mask_padding", "mask_per_head", "causal_cross_T6_S3", "axes_23_5d_mask_causal"]


def adapter(name):
    a = impls.get_adapter(name)
    if not a.is_available():
        pytest.skip(a.availability()[1])
    if name != "keras_gqa" and not OTHER_BACKENDS and not a.in_process():
        pytest.skip("keras_gqa@jax/@torch in a worker process: set MHABENCH_KERAS_BACKENDS=1 to run")
    if not a.in_process() and name == "keras_gqa":
        pytest.skip("this process's Keras runs another backend")
    return a


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("case_id", EXPRESSIBLE)
def test_keras_gqa_matches_the_oracle_in_float32(name, case_id):
    case = BY_ID[case_id]
    w, q, v, k, mask = case.build(seed=2)
    layer = adapter(name).build(case.spec, w, dtype="float32")
    golden, golden_scores = oracle.forward(case.spec, w, q, v, k, mask, case.causal)
    out, scores = layer(q, v, k, mask, case.causal, return_scores=True)
    default, _ = layer(q, v, k, mask, case.causal, return_scores=False)
    assert rel_err(out, golden) < 5e-6 and rel_err(default, golden) < 5e-6 and rel_err(scores, golden_scores) < 5e-6


def test_keras_gqa_gradients_and_weights_in_float64():
    case = BY_ID["axes_23_5d_mask_causal"]  # flattened axes, mask and causal: the gradients are unflattened
    w, q, v, k, mask = case.build(seed=3)
    layer = adapter("keras_gqa").build(case.spec, w, dtype="float64")
    cotangent = np.random.default_rng(0).normal(size=q.shape[:-1] + (8,))
    grads = layer.gradients(q, v, k, mask, case.causal, cotangent=cotangent)
    expected = oracle_backward.backward(case.spec, w, q, v, k, mask, case.causal, cotangent)
    assert set(grads) == set(expected)
    for name in expected:  # key_dim 4: the float32-rounded scale is exact
        scale = max(1.0, float(np.max(np.abs(expected[name]))))  # grad_bk is 0 up to rounding
        assert np.max(np.abs(grads[name] - expected[name])) < 1e-10 * scale, name
    assert layer.export_weights().equals(w)


def test_keras_gqa_float64_scale_is_rounded_to_float32():
    """The cause of keras_gqa-float64-scale-rounded-to-float32: 1/sqrt(head_dim) is a float32 number in
    Keras, so float64 results match the oracle with that scale, and miss the exact one by ~1e-8."""
    spec = impls.AttentionSpec(3, 5)
    w = impls.Weights.random(spec, 8, 8, seed=4)
    rng = np.random.default_rng(4)
    q, v = rng.normal(size=(2, 4, 8)), rng.normal(size=(2, 6, 8))
    out, _ = adapter("keras_gqa").build(spec, w, dtype="float64")(q, v, return_scores=True)
    golden, _ = oracle.forward(spec, w, q, v)
    inputs = Inputs(spec, w, q, v, None, None, False, cotangent=None)
    behave = catalogue.BEHAVIOURS["scale_rounded_to_float32"]
    assert rel_err(out, behave(golden, inputs, "output")) < 1e-13
    assert rel_err(out, golden) > 1e-10


def test_keras_gqa_fully_masked_row_default_call_uniform_with_scores_zero():
    """Without scores GroupQueryAttention calls ops.dot_product_attention (a large finite fill: the fully
    masked row gets uniform weights); with scores its own masked softmax zeroes the row."""
    w, q, v, k, mask = FULLY_MASKED.build(seed=5)
    layer = adapter("keras_gqa").build(FULLY_MASKED.spec, w, dtype="float32")
    default, _ = layer(q, v, k, mask, return_scores=False)
    with_scores, scores = layer(q, v, k, mask, return_scores=True)
    uniform, _ = oracle.forward(FULLY_MASKED.spec, w, q, v, k, mask, fully_masked="uniform")
    np.testing.assert_allclose(default[0, 1], uniform[0, 1], atol=1e-5)
    np.testing.assert_allclose(with_scores[0, 1], w.bo, atol=1e-6)
    assert np.all(scores[0, :, 1] == 0)


def test_keras_gqa_tensorflow_two_heads_of_width_one_is_off():
    """The cause of keras_gqa-two-heads-key_dim1-off: Keras 3's TensorFlow backend adds the [H, 1] query bias
    with tf.nn.bias_add along the sequence axis when that axis is as long as H, so [1, 1, 1] queries with
    two heads of head_dim 1 come out wrong (the same shortcut as keras_mha's)."""
    spec = impls.AttentionSpec(2, 1)
    w = impls.Weights.random(spec, 1, 1, seed=3)
    rng = np.random.default_rng(3)
    q, v = rng.normal(size=(1, 1, 1)), rng.normal(size=(1, 2, 1))
    out, _ = adapter("keras_gqa").build(spec, w, dtype="float64")(q, v, return_scores=True)
    golden, _ = oracle.forward(spec, w, q, v)
    assert np.isfinite(out).all() and rel_err(out, golden) > 1e-3


def test_keras_gqa_declares_what_it_cannot_express():
    a = impls.get_adapter("keras_gqa")
    for spec, word in ((impls.AttentionSpec(2, 4, value_dim=3), "head_dim"),
                       (impls.AttentionSpec(2, 4, output_shape=5), "query's feature width")):
        assert word in a.unsupported_reason(spec, impls.Weights.random(spec, 8, 8))


def test_keras_gqa_passes_sliding_window_and_value_mask_over_the_flattened_sequence():
    """The window reaches GroupQueryAttention as sliding_window=w (|i - j| < w, one Keras layer per w), key/value
    lengths as value_mask [N, S] repeated over the free axes; a window Keras cannot say goes into the mask."""
    spec = impls.AttentionSpec(4, 2, num_kv_heads=2, attention_axes=(2,))
    w = impls.Weights.random(spec, 8, 8, seed=1)
    layer = adapter("keras_gqa").build(spec, w, dtype="float64")
    x = np.random.default_rng(5).normal(size=(2, 3, 6, 8))
    kv = np.array([6, 5])  # no query row left without a key (the fused path's empty rows are catalogued)
    for window, native in (((2, 2), 3), ((1, 0), None)):
        call = layer.validate(x, x, causal=False, window=window, key_value_lengths=kv)
        inputs = layer._native(call)
        assert inputs["window"] == native and (native is None or (3, native) in layer._layers)
        assert inputs["mask"][1].shape == (6, 6)  # [N = 2 * 3, S]
        assert layer.emulations(call) == (("lengths",) if native else ("window", "lengths"))
        out, _ = layer(x, x, window=window, key_value_lengths=kv, return_scores=False)
        want = oracle.forward(spec, w, x, x, window=window, key_value_lengths=kv)[0]
        assert rel_err(out, want) < 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_keras_gqa_one_program_evaluate_gives_the_call_its_own_shapes(name):
    """The one-program evaluate (Keras on JAX, compiled) runs the layer on the flattened call: its output and its
    input gradients come back unflattened, and the cotangent goes in flattened. With a size-1 attended axis the
    flattened shapes broadcast against the call's, so a missed reshape gave wrong values, not an error."""
    spec = impls.AttentionSpec(4, 3, num_kv_heads=2, attention_axes=(1, 2))
    w = impls.Weights.random(spec, 4, 4, seed=3)
    rng = np.random.default_rng(3)
    q, v, ct = rng.normal(size=(3, 1, 2, 4)), rng.normal(size=(3, 1, 7, 4)), rng.normal(size=(3, 1, 2, 4))
    found = adapter(name).build(spec, w, dtype="float32").evaluate(q, v, cotangent=ct, scores=True)
    want, want_scores = oracle.forward(spec, w, q, v)
    grads = oracle_backward.backward(spec, w, q, v, None, None, False, ct)
    assert found["output"].shape == want.shape and rel_err(found["output"], want) < 5e-6
    assert rel_err(found["output_with_scores"], want) < 5e-6 and rel_err(found["scores"], want_scores) < 5e-6
    for n in ("query", "value"):
        assert found["gradients"][n].shape == grads[n].shape and rel_err(found["gradients"][n], grads[n]) < 5e-5
