"""ONNX's own Attention-operator tests, re-expressed through the oracle.

onnx ships a generator for its backend tests (``onnx/backend/test/case/node/attention.py``): each ``export_*``
function draws inputs, computes the expected outputs with ONNX's reference implementation and hands both to
``expect``. Here every one of them runs with ``expect`` replaced by a recorder, and each recorded node is
translated into a call of the canonical semantics: Q, K and V become the projections of an identity-weight
layer (so the oracle's core sees them unchanged), ``past_key``/``past_value`` are prepended to K and V with
the query block at position ``past_sequence_length``, ``nonpad_kv_seqlen`` becomes ``key_value_lengths`` with
the query block at ``nonpad_kv_seqlen - T`` (ONNX's external cache), ``is_causal`` and the window attributes
are measured from that diagonal, a boolean ``attn_mask`` is the mask and a float one the additive bias (both
broadcast the ONNX way, right-aligned, and padded to the total key length as the spec says), ``softcap`` and
``scale`` are themselves. ``Y`` is compared everywhere; the probabilities of ``qk_matmul_output_mode=3`` too.
The pre-softmax logits of modes 0 to 2 are not canonical quantities (a layer returns weights, not logits), so
those outputs alone are left out; the test's ``Y`` is still judged.

These are tests nobody on this project wrote: where the oracle and ONNX's reference disagree, one of the two
reads the operator differently, and the test says where.
"""
from __future__ import annotations

import numpy as np
import pytest

from mhabench import impls
from mhabench.impls import oracle

attention_tests = pytest.importorskip("onnx.backend.test.case.node.attention")
helper = pytest.importorskip("onnx.helper")

# float32 results of ONNX's reference against the float64 golden: agreement to a few float32 ulps of the largest
# output; float16 and bfloat16 inputs are computed by the reference in that dtype.
RELATIVE_TOLERANCE = {"float32": 1e-5, "float64": 1e-12, "float16": 4e-3, "bfloat16": 3e-2}
# The qk_matmul_output modes whose output is the softmax's probabilities; 0 to 2 expose pre-softmax logits.
PROBABILITIES_MODE = 3


def recorded_tests() -> list[dict]:
    """Every ``export_*`` of ONNX's Attention test generator, run with a recorder in place of ``expect``."""
    recorded = []

    def record(node, inputs, outputs, name, **kwargs):
        recorded.append(dict(node=node, inputs=inputs, outputs=outputs, name=name))

    exports = sorted(name for name in vars(attention_tests.Attention) if name.startswith("export"))
    original = attention_tests.expect
    attention_tests.expect = record
    try:
        for export in exports:
            np.random.seed(0)
            getattr(attention_tests.Attention, export)()
    finally:
        attention_tests.expect = original
    return recorded


RECORDED = recorded_tests()


def _to_4d(x: np.ndarray, heads: int) -> np.ndarray:
    """ONNX's 3-D ``[B, L, heads * d]`` as ``[B, heads, L, d]`` (its reshape, then transpose)."""
    B, L, width = x.shape
    return x.reshape(B, L, heads, width // heads).transpose(0, 2, 1, 3)


def _identity(inputs: int, heads: int, head_dim: int) -> np.ndarray:
    """A projection ``[heads * head_dim, heads, head_dim]`` that only splits the heads."""
    return np.eye(inputs).reshape(inputs, heads, head_dim)


def canonical_call(test: dict) -> dict:
    """The recorded ONNX node as a canonical call: spec, identity weights, the layer's inputs and the call-level
    arguments; plus what to compare (``expected_y`` as ``[B, H, T, dv]``, the probabilities where mode 3)."""
    node = test["node"]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    # the recorded inputs and outputs are those named, in order (an empty name is an input left out)
    arrays = {name: np.asarray(x) for name, x in zip([n for n in node.input if n], test["inputs"])}
    roles = ("Q", "K", "V", "attn_mask", "past_key", "past_value", "nonpad_kv_seqlen")
    names = dict(zip(roles, list(node.input) + [""] * len(roles)))
    get = lambda role: arrays[names[role]].astype(np.float64) if names[role] else None
    dtype = str(arrays[names["Q"]].dtype)
    Q, K, V = get("Q"), get("K"), get("V")
    three_d = Q.ndim == 3
    if three_d:
        Q, K, V = _to_4d(Q, attrs["q_num_heads"]), _to_4d(K, attrs["kv_num_heads"]), _to_4d(V, attrs["kv_num_heads"])
    past = 0
    if names["past_key"]:
        past = get("past_key").shape[2]
        K = np.concatenate([get("past_key"), K], axis=2)
        V = np.concatenate([get("past_value"), V], axis=2)
    B, H, T, d = Q.shape
    Hkv, S, dv = K.shape[1], K.shape[2], V.shape[3]

    features = {}
    offset = past
    if names["nonpad_kv_seqlen"]:
        nonpad = arrays[names["nonpad_kv_seqlen"]].astype(np.int64)
        features["key_value_lengths"] = nonpad
        offset = nonpad - T  # the external cache: the query block ends at each sequence's last valid key
    left, right = attrs.get("left_window_size", -1), attrs.get("right_window_size", -1)
    if left >= 0 or right >= 0:
        features["window"] = (left if left >= 0 else None, right if right >= 0 else None)
    causal = bool(attrs.get("is_causal", 0))
    if np.any(offset):
        features["query_offset"] = offset
    if attrs.get("softcap", 0.0) > 0:
        features["softcap"] = attrs["softcap"]
    if "scale" in attrs:
        features["scale"] = attrs["scale"]

    mask = None
    if names["attn_mask"]:
        m = arrays[names["attn_mask"]]
        boolean = m.dtype == np.bool_
        m = m.astype(bool if boolean else np.float64)
        short = S - m.shape[-1]  # the spec: a shorter last axis is padded with -inf (False)
        if short > 0:
            m = np.concatenate([m, np.full(m.shape[:-1] + (short,), False if boolean else -np.inf)], axis=-1)
        m = m.reshape((1,) * (4 - m.ndim) + m.shape)  # ONNX broadcasts right-aligned: [B|1, H|1, T, S]
        if boolean:
            mask = m
        else:
            features["bias"] = m

    spec = impls.AttentionSpec(num_heads=H, key_dim=d, value_dim=dv, num_kv_heads=Hkv, use_bias=False,
                               output_shape=H * dv)
    weights = impls.Weights(Wq=_identity(H * d, H, d), Wk=_identity(Hkv * d, Hkv, d), Wv=_identity(Hkv * dv, Hkv, dv),
                            Wo=np.eye(H * dv).reshape(H, dv, H * dv))
    flat = lambda x: x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)  # [B, h, L, e] -> [B, L, h * e]
    outputs = dict(zip([n for n in node.output if n], test["outputs"]))
    expected = {"Y": np.asarray(outputs[node.output[0]], np.float64)}
    if three_d:
        expected["Y"] = _to_4d(expected["Y"], H)
    mode = attrs.get("qk_matmul_output_mode", 0)
    if len(node.output) > 3 and node.output[3] and mode == PROBABILITIES_MODE:
        expected["probabilities"] = np.asarray(outputs[node.output[3]], np.float64)
    for position, full in ((1, K), (2, V)):
        name = node.output[position] if len(node.output) > position else ""
        if name:
            expected[name] = (np.asarray(outputs[name], np.float64), full)
    return dict(spec=spec, weights=weights, query=flat(Q), key=flat(K), value=flat(V), mask=mask, causal=causal,
                features=features, expected=expected, dtype=dtype, heads=(B, H, T, dv))


def run(call: dict, **changes):
    """The oracle on the canonical call (``changes`` replace call-level arguments): ``(Y [B, H, T, dv], weights)``."""
    features = {**call["features"], **changes}
    features = {k: v for k, v in features.items() if v is not None}
    out, probabilities = oracle.forward(call["spec"], call["weights"], call["query"], call["value"], call["key"],
                                        call["mask"], call["causal"], **features)
    B, H, T, dv = call["heads"]
    return out.reshape(B, T, H, dv).transpose(0, 2, 1, 3), probabilities


@pytest.mark.parametrize("test", RECORDED, ids=lambda t: t["name"])
def test_oracle_agrees_with_onnx_reference(test):
    call = canonical_call(test)
    y, probabilities = run(call)
    expected = call["expected"]
    rtol = RELATIVE_TOLERANCE[call["dtype"]]
    scale = max(np.max(np.abs(expected["Y"])), 1.0)
    np.testing.assert_allclose(y, expected["Y"], rtol=0, atol=rtol * scale, err_msg=test["name"])
    if "probabilities" in expected:
        np.testing.assert_allclose(probabilities, expected["probabilities"], rtol=0, atol=rtol, err_msg=test["name"])
    for name in ("present_key", "present_value"):  # the cache as the call reads it: past, then the new keys
        if name in expected:
            theirs, ours = expected[name]
            np.testing.assert_array_equal(ours, theirs)


def test_every_onnx_attention_test_is_expressed():
    """The corpus as a count: all 93 tests of onnx 1.23's generator are re-expressed above (a release that adds
    tests adds them here too). In 15 of them the query positions bind: without query_offset (the past length,
    or nonpad_kv_seqlen - T) the oracle computes something else, so before per-sequence positions existed these
    could not be said."""
    names = [t["name"] for t in RECORDED]
    assert len(names) == len(set(names)) >= 93
    binding = []
    for test in RECORDED:
        call = canonical_call(test)
        if "query_offset" in call["features"]:
            y, _ = run(call, query_offset=None)
            if not np.allclose(y, call["expected"]["Y"], atol=1e-3):
                binding.append(test["name"])
    assert len(binding) >= 15, binding
