"""tf_keras_mha (legacy Keras 2) against the oracle, how it is imported, and the Keras 2 behaviours its
catalogue entries describe, side by side with Keras 3 where they differ."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest

from mhabench import impls
from mhabench.impls import oracle, oracle_backward
from tests.feature_cases import CASES, FULLY_MASKED, nan_in_masked_key

pytest.importorskip("tf_keras")

ADAPTER = impls.get_adapter("tf_keras_mha")
BY_ID = {c.id: c for c in CASES}
TOL = {"float64": 1e-12, "float32": 2e-6}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-30))


_layers = {}


def layer_for(case, dtype, mode="eager", seed=1):
    key = (case.id, dtype, mode, seed)
    if key not in _layers:
        w, q, v, k, mask = case.build(seed=seed)
        _layers[key] = (ADAPTER.build(case.spec, w, dtype=dtype, mode=mode), w, q, v, k, mask)
    return _layers[key]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case_id", ["self", "kv_widths", "value_dim", "output_tuple", "no_bias", "axes_23_5d",
                                     "mask_TS", "mask_padding", "mask_per_head", "causal_cross_T4_S7",
                                     "axes_23_5d_mask_causal", "everything"])
def test_tf_keras_matches_the_oracle(case_id, dtype):
    case = BY_ID[case_id]
    layer, w, q, v, k, mask = layer_for(case, dtype)
    golden, golden_scores = oracle.forward(case.spec, w, q, v, k, mask, case.causal)
    out, scores = layer(q, v, k, mask, case.causal, return_scores=True)
    default, _ = layer(q, v, k, mask, case.causal, return_scores=False)
    assert rel_err(out, golden) < TOL[dtype] and rel_err(default, golden) < TOL[dtype]
    assert rel_err(scores, golden_scores) < TOL[dtype]


def test_tf_keras_compiled_mode_and_gradients():
    case = BY_ID["axes_23_5d_mask_causal"]
    layer, w, q, v, k, mask = layer_for(case, "float64", mode="compiled")
    golden, _ = oracle.forward(case.spec, w, q, v, k, mask, case.causal)
    assert rel_err(layer(q, v, k, mask, case.causal, return_scores=False)[0], golden) < 1e-12
    cotangent = np.random.default_rng(0).normal(size=golden.shape)
    grads = layer.gradients(q, v, k, mask, case.causal, cotangent=cotangent)
    expected = oracle_backward.backward(case.spec, w, q, v, k, mask, case.causal, cotangent)
    assert set(grads) == set(expected)
    for name in expected:
        scale = max(1.0, float(np.max(np.abs(expected[name]))))  # grad_bk is 0 up to rounding
        assert np.max(np.abs(grads[name] - expected[name])) < 1e-10 * scale, name


def test_tf_keras_weights_round_trip_exactly_in_float64():
    layer, w, *_ = layer_for(BY_ID["everything"], "float64")
    assert layer.export_weights().equals(w)


def _python(code, **env):
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", **env}
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_import_tf_keras_works_next_to_keras_3_on_another_backend():
    """Why the adapter imports tf_keras: it works whatever Keras 3 runs in the process."""
    if importlib.util.find_spec("jax") is None:
        pytest.skip("needs jax for Keras 3's JAX backend")
    done = _python("import keras, tf_keras, numpy as np\n"
                   "x = np.ones((1, 2, 4), 'float32')\n"
                   "print(keras.backend.backend(), tf_keras.__version__, type(tf_keras.layers.MultiHeadAttention(2, 2)"
                   "(x, x)).__name__)", KERAS_BACKEND="jax")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[0] == "jax" and done.stdout.split()[1].startswith("2.")


@pytest.mark.slow
def test_tf_use_legacy_keras_is_fragile():
    """Why not TF_USE_LEGACY_KERAS=1: it leaves `import keras` on Keras 3, and set after tf.keras was first
    touched it changes nothing."""
    done = _python("import keras, tensorflow as tf; print(keras.__version__, tf.keras.__name__)",
                   TF_USE_LEGACY_KERAS="1")
    assert done.returncode == 0 and done.stdout.split()[0].startswith("3.") and done.stdout.split()[1].startswith("tf_keras")
    done = _python("import os, tensorflow as tf; tf.keras.layers\nos.environ['TF_USE_LEGACY_KERAS'] = '1'\n"
                   "print(tf.keras.__name__)")
    assert done.returncode == 0 and done.stdout.strip() == "keras._tf_keras.keras", done.stdout  # Keras 3


@pytest.mark.parametrize("dtype, policy", [("float32", "uniform"), ("float16", "uniform"), ("float64", "unmasked")])
def test_keras_2_fully_masked_row_is_not_zero(dtype, policy):
    """The cause of tf_keras_mha-fully_masked_row-*: Keras 2's Softmax adds -1e9 (float16: -65500) to masked
    logits and never zeroes a row with no allowed key. In float32/16 the row is uniform; in float64 -1e9 is
    the same shift for every logit of the row, which leaves the unmasked softmax. Keras 3 (with scores)
    gives the canonical zeros."""
    layer, w, q, v, k, mask = layer_for(FULLY_MASKED, dtype)
    out, scores = layer(q, v, k, mask, return_scores=True)
    golden, golden_scores = oracle.forward(FULLY_MASKED.spec, w, q, v, k, mask, fully_masked=policy)
    tol = 5e-3 if dtype == "float16" else 1e-6
    np.testing.assert_allclose(scores[0, :, 1].astype(np.float64), golden_scores[0, :, 1], atol=tol)
    np.testing.assert_allclose(out[0, 1].astype(np.float64), golden[0, 1], atol=tol * 10)
    assert np.abs(out[0, 1] - w.bo).max() > 0.01  # not the canonical output bias


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_keras_2_over_two_axes_gives_an_empty_row_weights_of_one(dtype):
    """The cause of tf_keras_mha-multi_axis-fully_masked_row-weights_one: over a tuple of axes Keras 2's Softmax
    returns exp(x - logsumexp(x)), and in a row whose logits all carry the -1e9 mask both round to the same
    constant, so every weight is 1 (not 1/S). The framework model reproduces output, scores and gradients."""
    from mhabench.conformance.cases import find_case
    from mhabench.conformance.framework_models import keras2_logsumexp_rounded
    case = find_case("pairs11-rank4_axes12-TltS-mask_fully_masked_row-causal-heads1_kd1-value_dim-out_width5-no_bias-"
                     "widths_mixed")
    i = case.inputs()
    layer = ADAPTER.build(i.spec, i.weights, dtype=dtype)
    out, scores = layer(*i.args(), return_scores=True)
    model = keras2_logsumexp_rounded(i)
    empty = ~oracle.prepare(i.spec, i.weights, *i.args()).allowed().reshape(scores.shape).any(axis=-1)
    assert empty.any() and np.all(scores[empty] == 1)  # exactly one, every key of the row
    tol = 2e-6 if dtype == "float32" else 5e-3
    assert rel_err(scores, model["scores"]) < tol and rel_err(out, model["output"]) < tol
    grads = layer.gradients(i.query, i.value, i.key, i.mask, i.causal, cotangent=i.cotangent)
    for name in ("query", "value", "Wq", "Wk", "Wv", "Wo"):
        assert rel_err(grads[name], model[f"grad_{name}"]) < tol * 10, name


def test_keras_3_gives_the_fully_masked_row_zero_weights_with_scores():
    """The other side of the migration: Keras 3's MultiHeadAttention (scores asked) zeroes the row."""
    keras_mha = impls.get_adapter("keras_mha")
    if not keras_mha.is_available() or not keras_mha.in_process():
        pytest.skip("keras_mha does not run in this process")
    w, q, v, k, mask = FULLY_MASKED.build(seed=1)
    out, scores = keras_mha.build(FULLY_MASKED.spec, w, dtype="float32")(q, v, k, mask, return_scores=True)
    assert np.all(scores[0, :, 1] == 0)
    np.testing.assert_allclose(out[0, 1], w.bo, atol=1e-6)


def test_keras_2_nan_in_a_masked_key_poisons_its_batch_element():
    """The cause of tf_keras_mha-masked_nonfinite-poisons_batch: the mask is an additive -1e9, so NaN * 1 - 1e9 is
    still NaN at the masked key. TensorFlow's softmax then depends on its kernels: Eigen's (oneDNN off) spreads
    the NaN over the row, oneDNN's keeps it at the NaN's position and gives the other keys 0
    (tf_keras_mha-nonfinite-logits-scores); either way the output row is NaN (NaN * value). The other setting
    runs in conformance/test_switches.py."""
    spec, w, q, v, k, mask = nan_in_masked_key()
    out, scores = ADAPTER.build(spec, w, dtype="float32")(q, v, k, mask, return_scores=True)
    assert np.isnan(out[0]).all() and not np.isnan(out[1]).any() and not np.isnan(scores[1]).any()
    if ADAPTER.row_facts()["tf_onednn"]:
        assert np.isnan(scores[0, ..., 3]).all() and np.all(scores[0, ..., :3] == 0)
    else:
        assert np.isnan(scores[0]).all()


def test_keras_2_has_no_bias_add_shortcut_for_two_heads_of_width_one():
    """Keras 3's TensorFlow backend is off on this shape (its ops.add takes a bias_add shortcut); Keras 2's
    EinsumDense adds the bias by broadcasting, so it agrees with the oracle."""
    spec = impls.AttentionSpec(2, 1)
    w = impls.Weights.random(spec, 1, 1, seed=3)
    rng = np.random.default_rng(3)
    q, v = rng.normal(size=(1, 1, 1)), rng.normal(size=(1, 2, 1))
    out, scores = ADAPTER.build(spec, w, dtype="float64")(q, v, return_scores=True)
    golden, golden_scores = oracle.forward(spec, w, q, v)
    assert rel_err(out, golden) < 1e-12 and rel_err(scores, golden_scores) < 1e-12
