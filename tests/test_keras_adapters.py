"""The Keras adapters against the float64 oracle, and the Keras behaviours that differ from the canonical semantics.

``keras_mha`` (TensorFlow) runs in this process; ``keras_mha@jax`` and
``keras_mha@torch`` run wherever their backend runs (a worker process when
this process's Keras runs another backend).
"""
import importlib.util
import os
import threading

import numpy as np
import pytest

pytest.importorskip("keras")

from mhabench import impls
from mhabench.impls import _keras, oracle
from mhabench.impls import worker as _worker
from mhabench.impls.base import UnsupportedError

KERAS = ["keras_mha", "keras_mha@jax", "keras_mha@torch"]
TOL = {"float64": 1e-12, "float32": 1e-5}  # relative to max|golden|


# The jax and torch backends run in worker processes here and take minutes on a small CPU machine:
# they run when MHABENCH_KERAS_BACKENDS=1.
OTHER_BACKENDS = os.environ.get("MHABENCH_KERAS_BACKENDS") == "1"


def available(name):
    if name != "keras_mha" and not OTHER_BACKENDS and not impls.get_adapter(name).in_process():
        pytest.skip("keras_mha@jax/@torch in a worker process: set MHABENCH_KERAS_BACKENDS=1 to run")
    if not impls.get_adapter(name).is_available():
        pytest.skip(impls.get_adapter(name).availability()[1])
    return impls.get_adapter(name)


@pytest.fixture(scope="module", autouse=True)
def start_workers():
    """Start the backends' worker processes together, so their start-up overlaps."""
    threads = []
    for name in KERAS[1:] if OTHER_BACKENDS else []:
        adapter = impls.get_adapter(name)
        if adapter.is_available() and not adapter.in_process():
            worker = _worker.shared_worker(adapter.worker_env())
            threads.append(threading.Thread(target=worker.request, args=(("ping",), 120)))
    for t in threads:
        t.start()
    for t in threads:
        t.join()


_layers = {}


def layer_for(name, spec, dims, dtype, mode="eager", **options):
    """Built layers are shared across tests (building is the slow part)."""
    key = (name, spec, dims, dtype, mode, tuple(sorted(options.items())))
    if key not in _layers:
        w = impls.Weights.random(spec, *dims, seed=1)
        _layers[key] = (available(name).build(spec, w, dtype=dtype, mode=mode, **options), w)
    return _layers[key]


def allowed_mask(shape, seed=0):
    """A random mask where key 0 is always allowed, so no row is fully masked (even under causal)."""
    m = np.random.default_rng(seed).random(shape) > 0.4
    m[..., 0] = True
    return m


# label: (spec, (Dq, Dv, Dk), query shape, value shape, key given, mask shape or None, causal)
S2 = impls.AttentionSpec(num_heads=2, key_dim=4)
CASES = {
    "self": (S2, (8, 8, 8), (2, 5, 8), (2, 5, 8), False, None, False),
    "cross_T5_S3_key": (S2, (6, 5, 7), (2, 5, 6), (2, 3, 5), True, None, False),
    "heads1": (impls.AttentionSpec(num_heads=1, key_dim=4), (4, 4, 4), (2, 4, 4), (2, 6, 4), False, None, False),
    "heads3_value_dim": (impls.AttentionSpec(num_heads=3, key_dim=4, value_dim=2), (6, 6, 6), (2, 4, 6), (2, 4, 6),
                         False, None, False),
    "output_shape": (impls.AttentionSpec(num_heads=2, key_dim=4, output_shape=(2, 3)), (4, 4, 4), (2, 3, 4),
                     (2, 4, 4), False, None, False),
    "no_bias": (impls.AttentionSpec(num_heads=2, key_dim=4, use_bias=False), (4, 4, 4), (2, 3, 4), (2, 4, 4),
                False, None, False),
    "axes23_5d": (impls.AttentionSpec(num_heads=2, key_dim=4, attention_axes=(2, 3)), (4, 4, 4), (2, 2, 3, 2, 4),
                  (2, 2, 2, 3, 4), False, (2, 2, 3, 2, 2, 3), False),
    "axes23_5d_causal": (impls.AttentionSpec(num_heads=2, key_dim=4, attention_axes=(2, 3)), (4, 4, 4),
                         (2, 2, 3, 2, 4), (2, 2, 3, 2, 4), False, None, True),
    "axes2_4d_causal": (impls.AttentionSpec(num_heads=2, key_dim=4, attention_axes=(2,)), (4, 4, 4), (2, 3, 4, 4),
                        (2, 3, 4, 4), False, None, True),
    "mask_BTS": (S2, (8, 8, 8), (2, 5, 8), (2, 3, 8), False, (2, 5, 3), False),
    "mask_TS": (S2, (8, 8, 8), (2, 5, 8), (2, 3, 8), False, (5, 3), False),
    "mask_B1S": (S2, (8, 8, 8), (2, 5, 8), (2, 3, 8), False, (2, 1, 3), False),
    "mask_BHTS": (S2, (8, 8, 8), (2, 5, 8), (2, 3, 8), False, (2, 2, 5, 3), False),
    "causal": (S2, (8, 8, 8), (2, 5, 8), (2, 5, 8), False, None, True),
    "causal_T5_S3": (S2, (8, 8, 8), (2, 5, 8), (2, 3, 8), False, None, True),
    "causal_T3_S5_mask": (S2, (8, 8, 8), (2, 3, 8), (2, 5, 8), False, (2, 3, 5), True),
}
# Run on every backend; the TensorFlow adapter runs the whole table.
SUBSET = ["cross_T5_S3_key", "heads3_value_dim"]

# Keras behaviours that differ from the canonical semantics (see each test id's reason).
F64_FUSED = ("Keras's jax/torch dot_product_attention computes float64 in float32: "
             "keras.src.backend.result_type(<framework float64 dtype>, ...) returns float32")
JAX_VALUE_DIM = ("Keras's JAX backend dot_product_attention fails when value_dim != key_dim "
                 "(TypeError: cannot reshape the output to the query's shape)")


def known_divergence(name, label, dtype, return_scores):
    fused = not return_scores and len(CASES[label][2]) == 3  # Keras's fused dot_product_attention path
    if name == "keras_mha@torch" and fused and dtype == "float64":
        return F64_FUSED
    if name == "keras_mha@jax" and fused and CASES[label][0].value_dim not in (None, CASES[label][0].key_dim):
        return JAX_VALUE_DIM
    return None


def run_case(name, label, dtype, return_scores, mode="eager"):
    spec, dims, qs, vs, key_given, mask_shape, causal = CASES[label]
    layer, w = layer_for(name, spec, dims, dtype, mode)
    rng = np.random.default_rng(len(label))
    q, v = rng.normal(size=qs), rng.normal(size=vs)
    k = rng.normal(size=vs[:-1] + (dims[2],)) if key_given else None
    mask = allowed_mask(mask_shape) if mask_shape else None
    golden, golden_scores = oracle.forward(spec, w, q, v, k, mask, causal)
    out, scores = layer(q, v, k, mask, causal, return_scores=return_scores)
    assert out.dtype.name == dtype
    # Keras on JAX runs as its users run it, jax_enable_x64 off: float64 is computed in float32 on every path
    tol = TOL["float32"] if (name, dtype) == ("keras_mha@jax", "float64") else TOL[dtype]
    scale = np.abs(golden).max()
    assert np.abs(out.astype(np.float64) - golden).max() <= tol * scale
    if return_scores:
        assert np.abs(scores.astype(np.float64) - golden_scores).max() <= tol


def params(names, labels):
    out = []
    for name in names:
        for label in labels:
            for dtype, paths in (("float32", (False,)), ("float64", (True, False))):
                for rs in paths:
                    why = known_divergence(name, label, dtype, rs)
                    marks = [pytest.mark.xfail(reason=why, strict=True)] if why else []
                    out.append(pytest.param(name, label, dtype, rs, marks=marks,
                                            id=f"{name}-{label}-{dtype}-{'scores' if rs else 'output'}"))
    return out


@pytest.mark.parametrize("name, label, dtype, return_scores", params(["keras_mha"], CASES))
def test_tensorflow_matches_oracle(name, label, dtype, return_scores):
    run_case(name, label, dtype, return_scores)


@pytest.mark.parametrize("name, label, dtype, return_scores", params(KERAS[1:], SUBSET))
def test_other_backends_match_oracle(name, label, dtype, return_scores):
    run_case(name, label, dtype, return_scores)


@pytest.mark.parametrize("name", ["keras_mha", "keras_mha@jax"])
def test_compiled_mode_matches_oracle(name):
    run_case(name, "mask_BTS", "float32", False, mode="compiled")


@pytest.mark.parametrize("name", ["keras_mha", "keras_mha@torch"])
def test_float64_weights_round_trip_exactly(name):
    layer, w = layer_for(name, *CASES["cross_T5_S3_key"][:2], "float64")
    assert layer.export_weights().equals(w)


@pytest.mark.parametrize("dtype, bound", [("float16", 5e-3), ("bfloat16", 3e-2)])
def test_half_precision_dtype_policy(dtype, bound):
    spec, dims = CASES["causal_T5_S3"][:2]
    layer, w = layer_for("keras_mha", spec, dims, dtype)
    kl = layer._layer(3)[0]
    assert {v.dtype for v in kl.weights} == {dtype} and kl.compute_dtype == dtype
    q, v = np.random.default_rng(0).normal(size=(2, 5, 8)), np.random.default_rng(1).normal(size=(2, 3, 8))
    out, _ = layer(q, v, causal=True, return_scores=False)
    golden, _ = oracle.forward(spec, w, q, v, causal=True)
    assert out.dtype.name == dtype
    assert np.abs(out.astype(np.float64) - golden).max() <= bound * np.abs(golden).max()


# ---- behaviours of Keras that differ from the canonical semantics ----------------
def test_fully_masked_rows_depend_on_return_attention_scores():
    """Keras's explicit softmax path zeroes fully masked rows (canonical); its fused
    dot_product_attention path, taken when scores are not requested, gives them uniform weights."""
    spec, dims = CASES["mask_BTS"][:2]
    layer, w = layer_for("keras_mha", spec, dims, "float64")
    rng = np.random.default_rng(3)
    q, v = rng.normal(size=(2, 5, 8)), rng.normal(size=(2, 3, 8))
    mask = allowed_mask((2, 5, 3))
    mask[0, 1] = False
    zeros, _ = oracle.forward(spec, w, q, v, mask=mask, fully_masked="zeros")
    uniform, _ = oracle.forward(spec, w, q, v, mask=mask, fully_masked="uniform")
    with_scores, scores = layer(q, v, mask=mask, return_scores=True)
    without_scores, _ = layer(q, v, mask=mask, return_scores=False)
    assert np.abs(with_scores - zeros).max() < 1e-12 and np.all(scores[0, :, 1] == 0)
    assert np.abs(without_scores - uniform).max() < 1e-12
    assert np.abs(without_scores - zeros).max() > 1e-3


def test_float64_scale_is_rounded_to_float32():
    """Keras casts the Python float 1/sqrt(key_dim) through float32: float64 scores match that scale, not the exact one."""
    spec = impls.AttentionSpec(num_heads=2, key_dim=3)
    layer, w = layer_for("keras_mha", spec, (4, 4, 4), "float64")
    rng = np.random.default_rng(4)
    q, v = rng.normal(size=(2, 5, 4)), rng.normal(size=(2, 3, 4))
    _, scores = layer(q, v, return_scores=True)
    _, golden = oracle.forward(spec, w, q, v)
    logits = np.einsum("bthk,bshk->bhts", np.einsum("btd,dhk->bthk", q, w.Wq) + w.bq,
                       np.einsum("bsd,dhk->bshk", v, w.Wk) + w.bk)

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    assert np.abs(scores - softmax(logits * float(np.float32(1 / np.sqrt(3))))).max() < 1e-14
    assert np.abs(scores - golden).max() > 1e-10


def test_keras_causal_mask_is_sized_by_axis_1():
    """Keras's own use_causal_mask cannot express causal attention over other axes (the adapter passes a mask)."""
    import keras
    if keras.backend.backend() != "tensorflow":
        pytest.skip("checked on the TensorFlow backend")
    kl = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4, attention_axes=(2, 3))
    q = np.random.default_rng(0).normal(size=(2, 2, 3, 2, 4)).astype("float32")
    with pytest.raises(ValueError, match="out of bounds"):
        kl(q, q, use_causal_mask=True)


# ---- options, errors, gradients ---------------------------------------------------
def test_flash_attention_switch():
    spec, dims = CASES["self"][:2]
    w = impls.Weights.random(spec, *dims)
    with pytest.raises(UnsupportedError, match="Flash attention is not supported"):
        available("keras_mha").build(spec, w, flash_attention=True)
    layer = available("keras_mha").build(spec, w, flash_attention=False)
    assert layer._layer(3)[0]._flash_attention in (False, None)
    with pytest.raises(TypeError, match="flash_attention"):
        available("keras_mha").build(spec, w, flash_attention="yes")


BAD_INPUTS = {
    "query_width": lambda q, v: dict(query=q[..., :3], value=v),
    "rank2_query": lambda q, v: dict(query=q[0], value=v),
    "batch": lambda q, v: dict(query=q, value=v[:1]),
    "mask_shape": lambda q, v: dict(query=q, value=v, mask=np.ones((4, 4), bool)),
    "mask_dtype": lambda q, v: dict(query=q, value=v, mask=np.ones((5, 3))),
    "causal_type": lambda q, v: dict(query=q, value=v, causal="yes"),
}


@pytest.mark.parametrize("bad", BAD_INPUTS)
def test_bad_input_same_message_as_torch_sdpa(bad):
    pytest.importorskip("torch")
    spec, dims = CASES["mask_BTS"][:2]
    layer, w = layer_for("keras_mha", spec, dims, "float32")
    reference = impls.get_adapter("torch_sdpa").build(spec, w)
    rng = np.random.default_rng(0)
    kwargs = BAD_INPUTS[bad](rng.normal(size=(2, 5, 8)), rng.normal(size=(2, 3, 8)))
    with pytest.raises((ValueError, TypeError)) as ours:
        layer(**kwargs)
    with pytest.raises((ValueError, TypeError)) as theirs:
        reference(**kwargs)
    assert type(ours.value) is type(theirs.value) and str(ours.value) == str(theirs.value)


def test_dropout_only_when_training_and_seeded():
    spec = impls.AttentionSpec(num_heads=2, key_dim=4, dropout=0.5)
    layer, w = layer_for("keras_mha", spec, (8, 8, 8), "float32")
    q = np.random.default_rng(0).normal(size=(2, 6, 8))
    golden, _ = oracle.forward(spec, w, q, q)
    inference, _ = layer(q, q, return_scores=False)
    a, _ = layer(q, q, return_scores=False, training=True, seed=7)
    b, _ = layer(q, q, return_scores=False, training=True, seed=7)
    assert np.abs(inference - golden).max() < 1e-5 * np.abs(golden).max()
    assert np.abs(a - golden).max() > 1e-3 and np.array_equal(a, b)


GRAD_CASE = "cross_T5_S3_key"


def gradient_inputs():
    spec, dims, qs, vs = CASES[GRAD_CASE][:4]
    rng = np.random.default_rng(5)
    q, v, k = rng.normal(size=qs), rng.normal(size=vs), rng.normal(size=vs[:-1] + (dims[2],))
    mask = allowed_mask((2, 5, 3))
    ct = rng.normal(size=qs[:-1] + (dims[0],))
    return spec, dims, dict(query=q, value=v, key=k, mask=mask, causal=True, cotangent=ct)


def test_tensorflow_gradients_match_torch_sdpa():
    pytest.importorskip("torch")
    spec, dims, inputs = gradient_inputs()
    layer, w = layer_for("keras_mha", spec, dims, "float64")
    ours = layer.gradients(**inputs)
    theirs = impls.get_adapter("torch_sdpa").build(spec, w, dtype="float64").gradients(**inputs)
    assert sorted(ours) == sorted(theirs) == sorted(["query", "value", "key", *w.as_dict()])
    for name in theirs:
        assert np.abs(ours[name] - theirs[name]).max() <= 1e-12 * max(1.0, np.abs(theirs[name]).max()), name


def test_tensorflow_gradients_match_oracle_backward():
    if importlib.util.find_spec("mhabench.impls.oracle_backward") is None:
        pytest.skip("mhabench.impls.oracle_backward is not present")
    from mhabench.impls import oracle_backward
    spec, dims, inputs = gradient_inputs()
    layer, w = layer_for("keras_mha", spec, dims, "float64")
    ours = layer.gradients(**inputs)
    ref = oracle_backward.backward(spec, w, inputs["query"], inputs["value"], inputs["key"], inputs["mask"],
                                   inputs["causal"], inputs["cotangent"])
    for name in ref:
        assert np.abs(ours[name] - ref[name]).max() <= 1e-12 * max(1.0, np.abs(ref[name]).max()), name


@pytest.mark.parametrize("name", ["keras_mha@jax", "keras_mha@torch"])
def test_other_backend_gradients_in_float32(name):
    spec, dims, inputs = gradient_inputs()
    layer, w = layer_for(name, spec, dims, "float32")
    reference, _ = layer_for("keras_mha", spec, dims, "float64")
    ours, theirs = layer.gradients(**inputs), reference.gradients(**inputs)
    for key in theirs:
        assert np.abs(ours[key] - theirs[key]).max() <= 1e-4 * max(1.0, np.abs(theirs[key]).max()), key


def test_native_path_in_process():
    spec, dims = CASES["causal"][:2]
    layer, w = layer_for("keras_mha", spec, dims, "float32", mode="compiled")
    q = np.random.default_rng(0).normal(size=(2, 5, 8))
    inputs = layer.native_inputs(q, q, causal=True, requires_grad=True)
    out = layer.ops.numpy(layer.native_forward(inputs))
    golden, _ = oracle.forward(spec, w, q, q, causal=True)
    assert np.abs(out - golden).max() <= 1e-5 * np.abs(golden).max()
    grads = layer.native_forward_backward(inputs)
    assert tuple(grads["query"].shape) == q.shape and tuple(grads["Wq"].shape) == w.Wq.shape


def test_backend_choice():
    import keras
    here = keras.backend.backend()
    assert _keras.active_backend() == here
    for name in KERAS:
        assert impls.get_adapter(name).in_process() == (impls.get_adapter(name).backend == here)


# ---- modern attention on Keras's own arguments (sliding_window, value_mask), the rest emulated ------------------
from tests.feature_cases import MODERN_CASES, modern_support, rel_err  # noqa: E402

KERAS_REFUSES = {"keras_mha": ("grouped-query attention", "an additive float bias", "a soft cap", "an explicit logit"),
                 "keras_gqa": ("an additive float bias", "value_dim", "output_shape", "a soft cap", "an explicit logit")}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("case", MODERN_CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("name", ["keras_mha", "keras_gqa"])
def test_keras_modern_features_match_the_oracle(name, case, dtype):
    """The default call (Keras's fused path for 3-D inputs gives a row with no allowed key uniform weights,
    catalogued; GroupQueryAttention sees every call flattened to 3-D), the call with scores (canonical zeros) and
    the gradients (the fused path's), against the oracle."""
    from mhabench.impls.oracle_backward import backward
    reason = modern_support(name, case, dtype, return_scores=True, gradients=True)
    if reason:
        assert reason.startswith(KERAS_REFUSES[name]), reason
        pytest.skip(reason)
    seed = 11
    w, q, v, k, mask = case.build(seed)
    kwargs = case.feature_kwargs(seed)
    call = oracle.prepare(case.spec, w, q, v, k, mask, case.causal, **kwargs)
    allowed = call.flat_allowed()
    empty = allowed is not None and not np.all(np.any(allowed, axis=-1))
    # Keras's dot_product_attention path, taken for 3-D inputs without scores
    fused = len(q.shape) == 3 or name == "keras_gqa"
    policy = "uniform" if empty and fused else "zeros"
    layer = available(name).build(case.spec, w, dtype=dtype)
    # float64: Keras rounds 1/sqrt(key_dim) to float32 (catalogued) unless key_dim is a power of 4
    tol = TOL[dtype] if dtype == "float32" or case.spec.key_dim in (1, 4, 16) else 1e-7
    out, _ = layer(q, v, k, mask, case.causal, return_scores=False, **kwargs)
    assert rel_err(out, oracle.forward(case.spec, w, q, v, k, mask, case.causal, fully_masked=policy,
                                       **kwargs)[0]) < tol
    with_scores, scores = layer(q, v, k, mask, case.causal, return_scores=True, **kwargs)
    want, want_scores = oracle.forward(case.spec, w, q, v, k, mask, case.causal, **kwargs)
    assert rel_err(with_scores, want) < tol and rel_err(scores, want_scores) < tol
    ct = np.random.default_rng([seed, 5]).normal(size=out.shape)
    got = layer.gradients(q, v, k, mask, case.causal, ct, **kwargs)
    expected = backward(case.spec, w, q, v, k, mask, case.causal, ct, fully_masked=policy, **kwargs)
    assert set(got) == set(expected)
    for name, g in expected.items():
        scale = np.max(np.abs(g)) if g.size else 0.0
        err = rel_err(got[name], g) if scale > 1e-12 else float(np.max(np.abs(got[name]), initial=0.0))
        assert err < (100 * tol if dtype == "float32" else 1e-6), (name, err)


@pytest.mark.parametrize("window, causal, native", [((2, 2), False, 3), ((3, None), True, 4), ((3, 1), True, 4),
                                                    ((1, 0), False, None), ((None, 2), False, None)])
def test_keras_sliding_window_is_used_where_it_is_the_window(window, causal, native):
    """sliding_window=w is |i - j| < w: the window (w-1, w-1), or (w-1, any) under causal; other windows go into
    the attention mask, recorded as emulated."""
    spec, dims = impls.AttentionSpec(num_heads=2, key_dim=4), (8, 8, 8)
    layer, w = layer_for("keras_mha", spec, dims, "float64")
    x = np.random.default_rng(3).normal(size=(2, 7, 8))
    out, _ = layer(x, x, causal=causal, window=window, return_scores=False)
    np.testing.assert_allclose(out, oracle.forward(spec, w, x, x, causal=causal, window=window)[0], atol=1e-12)
    call = oracle.prepare(spec, w, x, x, causal=causal, window=window)
    assert layer._native(call)["window"] == native and (not native or (3, native) in layer._layers)
    assert layer.emulations(call) == (() if native else ("window",))


def test_keras_key_lengths_are_its_value_mask_and_query_lengths_its_attention_mask():
    """Key/value lengths reach Keras as value_mask (its padding form), query lengths as attention mask rows:
    Keras's call(query_mask=...) is ignored (call() overwrites it with the query's Keras mask)."""
    spec, dims = impls.AttentionSpec(num_heads=2, key_dim=4), (8, 8, 8)
    layer, w = layer_for("keras_mha", spec, dims, "float64")
    x = np.random.default_rng(4).normal(size=(2, 6, 8))
    kv, ql = np.array([6, 3]), np.array([6, 2])
    native = layer._native(oracle.prepare(spec, w, x, x, key_value_lengths=kv))
    assert native["mask"][0] is None and native["mask"][1] is not None
    native = layer._native(oracle.prepare(spec, w, x, x, query_lengths=ql))
    assert native["mask"][0] is not None and native["mask"][1] is None
    out, scores = layer(x, x, query_lengths=ql, key_value_lengths=kv, return_scores=True)
    want, want_scores = oracle.forward(spec, w, x, x, query_lengths=ql, key_value_lengths=kv)
    np.testing.assert_allclose(scores, want_scores, atol=1e-12)
    np.testing.assert_allclose(out, want, atol=1e-12)
    keras = layer.keras
    k_layer = keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)
    x32 = x.astype("float32")
    assert np.allclose(np.asarray(k_layer(x32, x32)), np.asarray(k_layer(x32, x32, query_mask=np.zeros((2, 6), bool))))


def test_keras_flash_kernels_are_declared_and_refused_on_the_cpu():
    spec = impls.AttentionSpec(num_heads=2, key_dim=4)
    w = impls.Weights.random(spec, 8, 8)
    for backend, needs in (("jax", "cuDNN"), ("torch", "can_use_flash_attention")):
        adapter = impls.get_adapter(f"keras_mha@{backend}+flash")
        assert adapter.kernel == "flash" and needs in adapter.unsupported_reason(spec, w, device="cpu")
        assert impls.get_adapter(f"keras_mha@{backend}+no_flash").unsupported_reason(spec, w, device="cpu") is None
