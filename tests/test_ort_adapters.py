"""The ONNX Runtime adapters: ort_attention (the Attention operator in a whole-layer graph) and
torch_mha@ort (nn.MultiheadAttention exported by torch.onnx.export), against the oracle and the eager
module, with the causes of their catalogued divergences.

ort_attention builds its graphs in milliseconds. Each torch_mha@ort structure costs an export
(seconds), so its tests share layers of one structure and are marked slow where they export more.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from mhabench import impls
from mhabench.conformance import catalogue
from mhabench.conformance.cases import Inputs
from mhabench.impls import _onnx, oracle
from mhabench.impls.validation import unflatten
from tests.feature_cases import (CASES, FULLY_MASKED, MODERN_CASES, modern_forward_errors, modern_support,
                                 nan_in_masked_key)

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

F32 = 2e-6  # relative to max|golden|
BY_ID = {c.id: c for c in CASES}


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-30))


def as_inputs(spec, w, q, v, k, mask, causal):
    """What a catalogue behaviour takes: the case's inputs."""
    return Inputs(spec, w, q, v, k, mask, causal, cotangent=None)


# ---- ort_attention ------------------------------------------------------------------------------------
ORT = impls.get_adapter("ort_attention")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_ort_attention_matches_the_oracle_in_float32(case):
    w, q, v, k, mask = case.build(seed=3)
    layer = ORT.build(case.spec, w, dtype="float32")
    golden, golden_scores = oracle.forward(case.spec, w, q, v, k, mask, case.causal)
    out, scores = layer(q, v, k, mask, case.causal, return_scores=True)
    default, _ = layer(q, v, k, mask, case.causal, return_scores=False)
    assert out.dtype == np.float32 and out.shape == golden.shape
    assert rel_err(default, golden) < F32 and rel_err(out, golden) < F32 and rel_err(scores, golden_scores) < F32


@pytest.mark.parametrize("case_id", ["kv_widths", "value_dim", "output_tuple", "axes_23_5d_mask_causal", "everything"])
def test_ort_attention_float64_is_the_onnx_function_body_scale(case_id):
    """float64 has no ORT kernel: the operator's function body scales q and k by sqrt(scale) computed in
    float32, which the catalogue behaviour models to float64 precision (the cause of its entry)."""
    case = BY_ID[case_id]
    w, q, v, k, mask = case.build(seed=4)
    out, scores = ORT.build(case.spec, w, dtype="float64")(q, v, k, mask, case.causal, return_scores=True)
    golden, _ = oracle.forward(case.spec, w, q, v, k, mask, case.causal)
    inputs = as_inputs(case.spec, w, q, v, k, mask, case.causal)
    behave = catalogue.BEHAVIOURS["sqrt_scale_rounded_to_float32"]
    assert rel_err(out, behave(golden, inputs, "output")) < 1e-13
    assert rel_err(scores, behave(golden, inputs, "scores")) < 1e-13
    if case.spec.key_dim not in (1, 16):  # where sqrt(1/sqrt(key_dim)) is not exact in float32
        assert rel_err(out, golden) > 1e-10


def test_ort_attention_weights_round_trip_exactly_in_float64():
    case = BY_ID["everything"]
    w, *_ = case.build(seed=5)
    assert ORT.build(case.spec, w, dtype="float64").export_weights().equals(w)


def test_ort_attention_graph_runs_the_kernel_in_float32_and_the_function_body_in_float64(tmp_path):
    """What the description says: ORT's optimised float32 graph keeps the Attention node (its CPU kernel);
    in float64 ORT inlines the operator's function body (no Attention node is left)."""
    case = BY_ID["mask_BTS"]
    w, q, v, k, mask = case.build(seed=1)
    import onnx
    for dtype, kernel in (("float32", True), ("float64", False)):
        layer = ORT.build(case.spec, w, dtype=dtype)
        model = layer._model(False, "bool", True, False, False)
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(tmp_path / f"{dtype}.onnx")
        ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        ops = {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}
        assert ("Attention" in ops) == kernel, (dtype, sorted(ops))


def test_ort_attention_passes_the_mask_with_broadcast_batch_and_head_axes_kept():
    spec = impls.AttentionSpec(2, 4)
    w = impls.Weights.random(spec, 8, 8)
    layer = ORT.build(spec, w)
    x = np.zeros((3, 5, 8))
    shape = lambda m: layer._native(layer.validate(x, x, mask=m))["feeds"]["mask"].shape
    assert shape(np.ones((5, 5), bool)) == (5, 5)               # [T, S]
    assert shape(np.ones((3, 1, 5), bool)) == (3, 1, 5, 5)      # padding: batch kept, T expanded
    assert shape(np.ones((1, 2, 5, 5), bool)) == (2, 5, 5)      # per head, shared by the batch
    assert shape(np.ones((3, 2, 5, 5), bool)) == (3, 2, 5, 5)


def test_ort_kernel_refuses_a_mask_broadcast_along_the_query_axis():
    """Why the adapter expands the query axis of a padding mask: ORT's kernel requires it whole."""
    spec = impls.AttentionSpec(2, 4)
    layer = ORT.build(spec, impls.Weights.random(spec, 8, 8))
    feeds = {"query": np.zeros((3, 5, 8), np.float32), "value": np.zeros((3, 6, 8), np.float32),
             "mask": np.ones((3, 1, 1, 6), bool)}
    session = ort.InferenceSession(layer._model(False, "bool", False, False, False).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="inconsistent q_sequence_length"):
        session.run(None, feeds)


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_ort_attention_fully_masked_row_gets_zero_weights(dtype):
    """ORT 1.32 applies the Attention erratum (a fully masked row produces a zero row, not NaN): the
    canonical answer, in the kernel (float32, float16) and in the function body (float64)."""
    w, q, v, k, mask = FULLY_MASKED.build(seed=2)
    out, scores = ORT.build(FULLY_MASKED.spec, w, dtype=dtype)(q, v, k, mask, return_scores=True)
    np.testing.assert_allclose(out[0, 1], w.bo, atol=2e-3 if dtype == "float16" else 1e-6)
    assert np.all(scores[0, :, 1] == 0)
    assert not np.isnan(out).any()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ort_attention_nan_in_a_masked_key_poisons_its_batch_element(dtype):
    """The cause of ort_attention-masked_nan_poisons_batch: the boolean mask becomes an additive -inf bias,
    and NaN + -inf = NaN, so the masked key's NaN reaches every query of its batch element."""
    spec, w, q, v, k, mask = nan_in_masked_key()
    out, scores = ORT.build(spec, w, dtype=dtype)(q, v, k, mask, return_scores=True)
    assert np.isnan(out[0]).all() and np.isnan(scores[0]).all()
    assert not np.isnan(out[1]).any()
    golden, _ = oracle.forward(spec, w, q, v, k, mask)
    assert not np.isnan(golden).any()


def test_ort_refuses_bfloat16_attention():
    """Keeps the declared bfloat16 reason true: ORT fails to create the session."""
    import onnx
    from onnx import helper
    opsets = [helper.make_opsetid("", ORT.opset)]
    graph = helper.make_graph([helper.make_node("Attention", ["q", "k", "v"], ["y"], q_num_heads=2, kv_num_heads=2)],
                              "bf16", [helper.make_tensor_value_info(n, onnx.TensorProto.BFLOAT16, None) for n in "qkv"],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.BFLOAT16, None)])
    model = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
    with pytest.raises(Exception, match="NOT_IMPLEMENTED"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    assert "bfloat16" in ORT.capabilities().unsupported_dtypes


def test_ort_attention_declares_gradients_and_dropout_unsupported():
    spec = impls.AttentionSpec(2, 4, dropout=0.1)
    w = impls.Weights.random(spec, 8, 8)
    assert "onnxruntime-training" in ORT.unsupported_reason(spec, w, mode="compiled", gradients=True)
    assert "no dropout" in ORT.unsupported_reason(spec, w, mode="compiled", training=True)


# ---- ort_attention: modern attention through the operator's inputs ------------------------------------------
MODERN_TOL = {"float32": F32, "float16": 3e-3, "float64": 1e-7}  # float64: the function body's float32 scale
MODERN_BY_ID = {c.id: c for c in MODERN_CASES}


@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
@pytest.mark.parametrize("case", MODERN_CASES, ids=lambda c: c.id)
def test_ort_attention_modern_features_match_the_oracle(case, dtype):
    """GQA (kv_num_heads), the bias (a float attn_mask), key/value lengths (nonpad_kv_seqlen), query positions (a
    cache: past_key or nonpad_kv_seqlen), the window (opset 25), softcap and scale (attributes), and what the
    operator has no input for (query lengths: built into attn_mask), default call and weights alike."""
    reason = modern_support("ort_attention", case, dtype)
    if reason:
        assert "zero-length axis" in reason or "sqrt(scale)" in reason, reason  # S = 0, a negative scale
        pytest.skip(reason)
    errors = modern_forward_errors("ort_attention", case, dtype)
    assert set(errors) == {"output", "output_with_scores", "scores"}
    assert max(errors.values()) < MODERN_TOL[dtype], errors


def _attention_node(layer, call, scores=False):
    """The Attention node of the graph the call runs, its inputs and attributes, and the feeds."""
    inputs = layer._native(call)
    feeds, positions = inputs["feeds"], inputs["positions"]
    mask = feeds.get("mask")
    key = (call.key_given, None if mask is None else "bool" if mask.dtype == bool else "float",
           call.causal and not positions.in_mask, "nonpad_kv_seqlen" in feeds, scores, bool(positions.past),
           call.window if layer._native_window(call) else None, call.softcap, call.scale, layer.call_opset(call))
    model = layer._model(*key)
    node = next(n for n in model.graph.node if n.op_type == "Attention")
    return model, list(node.input), {a.name: onnx_helper.get_attribute_value(a) for a in node.attribute}, feeds


onnx_helper = pytest.importorskip("onnx.helper")


def test_ort_attention_hands_the_operator_its_own_inputs():
    """modern_everything (GQA, mask, bottom-right causal with a window, bias, both lengths): every sequence's
    queries sit at S - T = 2, so the first two keys are an internal cache (past_key, past_value), is_causal and the
    window are the operator's own (opset 25), and only the lengths (which nonpad_kv_seqlen cannot say beside a
    cache) go into attn_mask with the bias."""
    case = MODERN_BY_ID["modern_everything"]
    w, q, v, k, mask = case.build(seed=2)
    layer = ORT.build(case.spec, w)
    call = layer.validate(q, v, k, mask, case.causal, **case.feature_kwargs(2))
    model, operands, attributes, feeds = _attention_node(layer, call)
    assert feeds["mask"].dtype == np.float32  # the bias, -inf where the boolean restrictions mask
    assert feeds["cached_key"].shape[1] == 2 and feeds["key"].shape[1] == call.k_len - 2
    assert set(layer.emulations(call)) == {"lengths"} and layer.call_opset(call) == 25
    assert operands == ["q", "k", "v", "mask", "past_key", "past_value"]
    assert attributes["q_num_heads"] == 4 and attributes["kv_num_heads"] == 2 and attributes["is_causal"] == 1
    assert (attributes["left_window_size"], attributes["right_window_size"]) == (3, -1)
    assert model.opset_import[0].version == 25


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_ort_attention_places_each_sequence_at_nonpad_kv_seqlen_minus_t(dtype):
    """With nonpad_kv_seqlen, is_causal puts sequence b's diagonal at key i + nonpad_kv_seqlen[b] - T (an external KV
    cache whose last T valid entries are the queries), in ORT and in the ONNX reference implementation alike: the
    operator's definition, which is the canonical call with query_offset = nonpad_kv_seqlen - T. So a decode step
    whose sequences sit at different positions goes to that input, natively; a top-left causal call with padding
    lengths does not (there the input would move the diagonal), and its lengths go into attn_mask."""
    from onnx.reference import ReferenceEvaluator
    case = MODERN_BY_ID["offset_speculative_T3_S8_cache"]  # offsets (5, 0, 2), lengths offset + T
    w, q, v, k, mask = case.build(seed=3)
    features = case.feature_kwargs(3)
    layer = ORT.build(case.spec, w, dtype=dtype)
    out, scores = layer(q, v, k, mask, case.causal, return_scores=True, **features)
    golden, golden_scores = oracle.forward(case.spec, w, q, v, k, mask, case.causal, **features)
    tol = MODERN_TOL[dtype]
    assert rel_err(out, golden) < tol and rel_err(scores, golden_scores) < tol
    call = layer.validate(q, v, k, mask, case.causal, **features)
    model, operands, attributes, feeds = _attention_node(layer, call)
    np.testing.assert_array_equal(feeds["nonpad_kv_seqlen"], [8, 3, 5])
    assert operands[-1] == "nonpad_kv_seqlen" and attributes["is_causal"] == 1 and layer.emulations(call) == ()
    reference = ReferenceEvaluator(model).run(None, feeds)[0]
    np.testing.assert_allclose(unflatten(call, reference).reshape(call.output_shape), out, rtol=1e-5, atol=1e-5)
    # top-left causal with padding lengths: nonpad_kv_seqlen would move the diagonal, so the lengths are masked
    padded = MODERN_BY_ID["lengths_both_causal_mask"]
    w, q, v, k, mask = padded.build(seed=3)
    call = layer.validate(q, v, k, mask, padded.causal, **padded.feature_kwargs(3))
    _, operands, attributes, feeds = _attention_node(ORT.build(padded.spec, w, dtype=dtype), call)
    assert "nonpad_kv_seqlen" not in feeds and attributes["is_causal"] == 1 and "nonpad_kv_seqlen" not in operands


def test_ort_kernel_refuses_a_mask_shorter_than_the_keys_which_the_spec_pads():
    """ONNX (opset 24 on) lets attn_mask's last axis be shorter than the total key length, padded with -inf (False);
    ORT 1.32's CPU kernel refuses it ("inconsistent total_sequence_length"; microsoft/onnxruntime#27542 left a TODO
    saying it enforces an exact match), while the opset-25 function body pads as the spec says. The adapter never
    sends a short mask (its attn_mask always spans the keys), so no canonical call meets this; the test pins both
    behaviours so a change in ORT shows here."""
    from onnx import TensorProto, helper
    from onnx.reference.ops.op_attention import _compute_attention
    rng = np.random.default_rng(0)
    Q, K, V = (rng.random(shape).astype(np.float32) for shape in ((1, 2, 3, 4), (1, 2, 6, 4), (1, 2, 6, 4)))
    short = rng.random((3, 4)) < 0.7
    short[:, 0] = True

    def run(opset):
        names = ["Q", "K", "V", "attn_mask"]
        info = [helper.make_tensor_value_info(n, TensorProto.BOOL if n == "attn_mask" else TensorProto.FLOAT, None)
                for n in names]
        graph = helper.make_graph([helper.make_node("Attention", names, ["Y"])], "short_mask", info,
                                  [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)])
        opsets = [helper.make_opsetid("", opset)]
        model = helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))
        return _onnx.session(model).run(None, {"Q": Q, "K": K, "V": V, "attn_mask": short})[0]
    with pytest.raises(Exception, match="inconsistent total_sequence_length"):
        run(24)
    expected = _compute_attention(Q, K, V, attn_mask=short)[0]
    np.testing.assert_allclose(run(25), expected, rtol=1e-5, atol=1e-6)


def test_ort_peak_memory_sees_the_arena_allocations():
    """ORT keeps freed memory in its arena: without the shrinking runs a repeated call reads ~0."""
    spec = impls.AttentionSpec(4, 32)
    w = impls.Weights.random(spec, 128, 128)
    layer = ORT.build(spec, w)
    x = np.random.default_rng(0).normal(size=(1, 1024, 128)).astype(np.float32)
    inputs = layer.native_inputs(x, x)
    layer.native_forward(inputs)
    scores_bytes = 4 * 4 * 1024 * 1024
    assert ORT.peak_memory(lambda: layer.native_forward(inputs)) > scores_bytes / 2


# ---- torch_mha@ort ------------------------------------------------------------------------------------
needs_export = pytest.mark.skipif(importlib.util.find_spec("onnxscript") is None or
                                  importlib.util.find_spec("torch") is None,
                                  reason="torch.onnx.export (dynamo) needs torch and onnxscript")
EXPORTED = impls.get_adapter("torch_mha@ort")
SPEC = impls.AttentionSpec(2, 4)


@pytest.fixture(scope="module")
def exported_layers():
    """One structure per dtype (mask [B, T, S], cross attention), built once for the module."""
    out = {}
    for dtype in ("float32", "float64"):
        w = impls.Weights.random(SPEC, 8, 8, seed=7)
        out[dtype] = (EXPORTED.build(SPEC, w, dtype=dtype), impls.get_adapter("torch_mha").build(SPEC, w, dtype=dtype), w)
    return out


def _inputs(seed=0, T=4, S=6, fully_masked=False):
    rng = np.random.default_rng(seed)
    q, v = rng.normal(size=(2, T, 8)), rng.normal(size=(2, S, 8))
    mask = rng.random((2, T, S)) > 0.3
    mask[..., 0] = True
    if fully_masked:
        mask[0, 1] = False
    return q, v, mask


@needs_export
@pytest.mark.slow
def test_exported_mha_matches_eager_and_oracle_in_float32(exported_layers):
    layer, eager, w = exported_layers["float32"]
    for T, S in ((4, 6), (1, 5), (7, 1)):  # one export serves every length (dynamic axes)
        q, v, mask = _inputs(T=T, S=S)
        golden, golden_scores = oracle.forward(SPEC, w, q, v, None, mask)
        out, scores = layer(q, v, None, mask, return_scores=True)
        default, _ = layer(q, v, None, mask, return_scores=False)
        eager_default, _ = eager(q, v, None, mask, return_scores=False)
        assert rel_err(default, golden) < F32 and rel_err(out, golden) < F32 and rel_err(scores, golden_scores) < F32
        assert np.max(np.abs(default - eager_default)) < 1e-5
    layer64, _, w64 = exported_layers["float64"]
    assert layer64.export_weights().equals(w64)


@needs_export
@pytest.mark.slow
def test_exported_mha_float64_default_call_has_the_function_body_scale(exported_layers):
    """The default call (need_weights=False) exports SDPA as the Attention operator (opset 25: ORT runs its
    function body): float64 picks up the float32 sqrt(scale); the with-weights call (MatMul + Softmax) is exact."""
    layer, _, w = exported_layers["float64"]
    q, v, mask = _inputs(seed=1)
    golden, golden_scores = oracle.forward(SPEC, w, q, v, None, mask)
    default, _ = layer(q, v, None, mask, return_scores=False)
    with_scores, scores = layer(q, v, None, mask, return_scores=True)
    inputs = as_inputs(SPEC, w, q, v, None, mask, False)
    assert rel_err(default, catalogue.BEHAVIOURS["sqrt_scale_rounded_to_float32"](golden, inputs, "output")) < 1e-13
    assert rel_err(with_scores, golden) < 1e-13 and rel_err(scores, golden_scores) < 1e-13


@needs_export
@pytest.mark.slow
def test_exported_mha_float64_weights_call_holds_a_float32_rounded_scale():
    """The cause of torch_mha@ort-float64-scale-constant-float32: the exported float64 need_weights=True graph
    scales q by a constant holding float32(sqrt(1/head_dim)); eager float64 uses the exact Python float."""
    from onnx import numpy_helper
    from mhabench.impls import torch_mha_ort
    spec = impls.AttentionSpec(3, 2)
    w = impls.Weights.random(spec, 6, 6, seed=1)
    layer = EXPORTED.build(spec, w, dtype="float64")
    x = np.random.default_rng(1).normal(size=(2, 5, 6))
    out, _ = layer(x, x, return_scores=True)
    [model] = [m for key, m in torch_mha_ort._templates.items() if key[0] == layer._fn.structure and "True" in str(key)]
    scalars = [numpy_helper.to_array(i) for i in model.graph.initializer if numpy_helper.to_array(i).dtype == np.float64
               and numpy_helper.to_array(i).size == 1]
    assert float(np.float32(np.sqrt(0.5))) in [float(a) for a in scalars]
    inputs = as_inputs(spec, w, x, x, None, None, False)
    golden, _ = oracle.forward(spec, w, x, x)
    assert rel_err(out, catalogue.BEHAVIOURS["scale_rounded_to_float32"](golden, inputs, "output")) < 1e-13
    eager, _ = impls.get_adapter("torch_mha").build(spec, w, dtype="float64")(x, x, return_scores=True)
    assert rel_err(eager, golden) < 1e-13


@needs_export
@pytest.mark.slow
def test_exported_mha_fully_masked_row_default_bias_with_weights_nan(exported_layers):
    """As eager: need_weights=False gives the output bias (ORT's Attention zero row; eager's SDPA zero row),
    need_weights=True NaN (an explicit softmax of an all -inf row, in both)."""
    layer, eager, w = exported_layers["float32"]
    q, v, mask = _inputs(seed=2, fully_masked=True)
    default, _ = layer(q, v, None, mask, return_scores=False)
    np.testing.assert_allclose(default[0, 1], w.bo, atol=1e-6)
    with_scores, scores = layer(q, v, None, mask, return_scores=True)
    eager_with, eager_scores = eager(q, v, None, mask, return_scores=True)
    assert np.isnan(with_scores[0, 1]).all() and np.isnan(scores[0, :, 1]).all()
    assert np.isnan(eager_with[0, 1]).all()


@needs_export
@pytest.mark.slow
def test_exported_mha_reuses_one_export_per_structure(exported_layers):
    """A second layer of the same structure loads its own weights into the first export's graph, and computes
    what a fresh export of its own module computes."""
    from mhabench.impls import torch_mha_ort
    layer, _, _ = exported_layers["float32"]
    q, v, mask = _inputs(seed=3)
    layer(q, v, None, mask, return_scores=False)
    before = len(torch_mha_ort._templates)
    w2 = impls.Weights.random(SPEC, 8, 8, seed=99)
    second = EXPORTED.build(SPEC, w2, dtype="float32")
    out, _ = second(q, v, None, mask, return_scores=False)
    assert len(torch_mha_ort._templates) == before
    golden, _ = oracle.forward(SPEC, w2, q, v, None, mask)
    assert rel_err(out, golden) < F32


@needs_export
@pytest.mark.slow
def test_exported_mha_batch_first():
    w = impls.Weights.random(SPEC, 8, 8, seed=8)
    q, v, mask = _inputs(seed=4)
    out, _ = EXPORTED.build(SPEC, w, batch_first=True)(q, v, None, mask, return_scores=False)
    assert rel_err(out, oracle.forward(SPEC, w, q, v, None, mask)[0]) < F32


def test_exported_mha_declares_what_it_cannot_express():
    spec = impls.AttentionSpec(2, 4, value_dim=3, dropout=0.1)
    w = impls.Weights.random(spec, 8, 8)
    caps = EXPORTED.capabilities()
    assert "bfloat16" in caps.unsupported_dtypes and "Gemm" in caps.unsupported_dtypes["bfloat16"]
    assert "head_dim" in EXPORTED.unsupported_reason(spec, w, mode="compiled")
    spec = impls.AttentionSpec(2, 4, dropout=0.1)
    w = impls.Weights.random(spec, 8, 8)
    assert "eval mode" in EXPORTED.unsupported_reason(spec, w, mode="compiled", training=True)
    assert "onnxruntime-training" in EXPORTED.unsupported_reason(spec, w, mode="compiled", gradients=True)


@pytest.mark.slow
@pytest.mark.parametrize("case_id", ["bottom_right_T4_S7", "window_2_1_cross", "bias_BHTS_mask", "bias_neg_inf_row",
                                     "kv_lengths", "lengths_both_causal_mask"])
def test_exported_module_keeps_torch_mha_modern_mapping(case_id):
    """What torch_mha passes for modern attention (a float attn_mask for the bias, key_padding_mask for key
    lengths, the rest in attn_mask) survives the export: the default call is canonical, and the call with
    weights gives an empty row NaN as the eager module does (torch_mha@ort-fully_masked_row-nan)."""
    case = MODERN_BY_ID[case_id]
    errors = modern_forward_errors("torch_mha@ort", case, "float32", scores_policy="nan")
    assert max(errors.values()) < F32, errors


# ---- what the cache folder keeps between processes ----------------------------------------------------------

def test_an_optimised_model_is_kept_and_a_new_session_runs_it_unchanged(tmp_path, monkeypatch):
    """ORT's optimised graph goes to the cache's onnx/ folder; a later session of the same model loads it
    (optimisations already applied) and gives the same bits."""
    monkeypatch.setenv("MHABENCH_CACHE_DIR", str(tmp_path))
    case = BY_ID["everything"]
    w, q, v, k, mask = case.build(seed=5)
    first, _ = ORT.build(case.spec, w, dtype="float32")(q, v, k, mask, case.causal, return_scores=False)
    kept = sorted((tmp_path / "onnx").glob("ort-optimised-*.onnx"))
    assert kept and not list((tmp_path / "onnx").glob(".*"))  # written whole, no partial file left
    stamps = [p.stat().st_mtime_ns for p in kept]
    again, _ = ORT.build(case.spec, w, dtype="float32")(q, v, k, mask, case.causal, return_scores=False)
    np.testing.assert_array_equal(again, first)
    assert [p.stat().st_mtime_ns for p in kept] == stamps  # loaded, not optimised and written again
    kept[0].write_bytes(b"cut short")  # an unreadable file is optimised again, not an error
    third, _ = ORT.build(case.spec, w, dtype="float32")(q, v, k, mask, case.causal, return_scores=False)
    np.testing.assert_array_equal(third, first)


@needs_export
@pytest.mark.slow
def test_a_new_process_loads_the_exported_graph_instead_of_exporting(tmp_path, monkeypatch):
    """The graph exported for a structure is kept in the cache; with this process's templates forgotten (as in
    a new process) the next layer of that structure loads it and exports nothing, computing the same bits."""
    from mhabench.impls import torch_mha_ort
    monkeypatch.setenv("MHABENCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(torch_mha_ort, "_templates", {})
    spec = impls.AttentionSpec(4, 2)  # a structure no other test exports
    w = impls.Weights.random(spec, 8, 8, seed=11)
    q, v, mask = _inputs(seed=6)
    first, _ = EXPORTED.build(spec, w, dtype="float32")(q, v, None, mask, return_scores=False)
    assert len(list((tmp_path / "onnx").glob("torch_mha-*.onnx"))) == 1
    monkeypatch.setattr(torch_mha_ort, "_templates", {})

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")
    monkeypatch.setattr(torch_mha_ort.ExportedCall, "_export", no_export)
    again, _ = EXPORTED.build(spec, w, dtype="float32")(q, v, None, mask, return_scores=False)
    np.testing.assert_array_equal(again, first)
    assert rel_err(first, oracle.forward(spec, w, q, v, None, mask)[0]) < F32
