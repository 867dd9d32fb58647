"""Bad input: the same clear ValueError/TypeError whichever adapter runs, before any framework sees it."""
import numpy as np
import pytest

from mhabench import impls
from mhabench.impls import oracle

SPEC = impls.AttentionSpec(num_heads=2, key_dim=4)
W = impls.Weights.random(SPEC, 8, 8, seed=0)
rng = np.random.default_rng(0)
Q, V = rng.normal(size=(2, 3, 8)), rng.normal(size=(2, 5, 8))

# (id, call kwargs, exception, message pattern)
BAD_CALLS = [
    ("batch_mismatch", dict(query=Q, value=V[:1]), ValueError, r"value must have the same batch size as query \(2\)"),
    ("rank_mismatch", dict(query=Q, value=V[:, :, None]), ValueError, "value must have the same rank as query"),
    ("query_rank_2", dict(query=Q[0], value=V[0]), ValueError, r"query must have shape \[B, \*Q, 8\]"),
    ("query_width", dict(query=Q[..., :7], value=V), ValueError, r"query must have feature dim 8.*\[\.\.\., 8\]"),
    ("value_width", dict(query=Q, value=V[..., :6]), ValueError, "value must have feature dim 8"),
    ("key_width", dict(query=Q, value=V, key=V[..., :5]), ValueError, "key must have feature dim 8"),
    ("key_value_lengths", dict(query=Q, value=V, key=V[:, :4]), ValueError,
     r"key and value must have the same \[B, \*K\] shape"),
    ("mask_not_broadcast", dict(query=Q, value=V, mask=np.ones((2, 3, 4), bool)), ValueError,
     r"mask of shape \[2, 3, 4\] does not broadcast to the scores \[2, 2, 3, 5\]: its last 2 axes are the "
     r"attended query then key axes \[3, 5\], its leading axes line up from the left with "
     r"\[batch, \*non_attended, heads\] = \[2, 2\]"),
    ("mask_too_many_axes", dict(query=Q, value=V, mask=np.ones((1, 2, 2, 3, 5), bool)), ValueError,
     r"mask of shape \[1, 2, 2, 3, 5\] has 5 axes; expected 2 to 4 for scores of shape \[2, 2, 3, 5\]"),
    ("mask_too_few_axes", dict(query=Q, value=V, mask=np.ones((5,), bool)), ValueError,
     r"mask of shape \[5\] has 1 axes; expected 2 to 4"),
    ("mask_not_bool", dict(query=Q, value=V, mask=np.ones((2, 3, 5))), TypeError, "mask must be a boolean array"),
    ("mask_wrong_heads", dict(query=Q, value=V, mask=np.ones((2, 3, 3, 5), bool)), ValueError,
     r"does not broadcast to .*\[2, 2, 3, 5\]"),
    ("query_not_float", dict(query=Q.astype(str), value=V), TypeError, "query must be a real floating-point array"),
    ("causal_unknown_alignment", dict(query=Q, value=V, causal="yes"), ValueError,
     "causal must be False, True, 'top_left' or 'bottom_right', got 'yes'"),
    ("causal_not_bool", dict(query=Q, value=V, causal=1), TypeError,
     "causal must be a bool or one of 'top_left', 'bottom_right', got 1"),
]

AXES_CASES = [
    ("axis_out_of_range", (3,), "axis 3 is out of range for inputs of rank 3"),
    ("axis_batch", (0,), "axis 0 is the batch axis"),
    ("axis_feature", (-1,), "axis -1 is the feature axis"),
    ("axis_repeated", (1, -2), "repeated"),
]


def _adapters():
    return [n for n in impls.available_adapters()]


@pytest.mark.parametrize("bad", BAD_CALLS, ids=lambda b: b[0])
def test_oracle_rejects(bad):
    _, kwargs, exc, pattern = bad
    with pytest.raises(exc, match=pattern):
        oracle.forward(SPEC, W, **kwargs)


@pytest.mark.parametrize("bad", BAD_CALLS, ids=lambda b: b[0])
@pytest.mark.parametrize("name", ["numpy_oracle", "torch_sdpa", "torch_mha"])
def test_every_adapter_rejects_with_the_same_message(name, bad):
    adapter = impls.get_adapter(name)
    if not adapter.is_available():
        pytest.skip(adapter.availability()[1])
    _, kwargs, exc, pattern = bad
    with pytest.raises(exc) as from_oracle:
        oracle.forward(SPEC, W, **kwargs)
    layer = adapter.build(SPEC, W, dtype="float32")
    with pytest.raises(exc, match=pattern) as from_adapter:
        layer(**kwargs)
    assert str(from_adapter.value) == str(from_oracle.value)


@pytest.mark.parametrize("case", AXES_CASES, ids=lambda c: c[0])
def test_bad_attention_axes(case):
    _, axes, pattern = case
    spec = impls.AttentionSpec(num_heads=2, key_dim=4, attention_axes=axes)
    w = impls.Weights.random(spec, 8, 8)
    with pytest.raises(ValueError, match=pattern):
        oracle.forward(spec, w, Q, V)
    with pytest.raises(ValueError, match=pattern):
        impls.get_adapter("torch_sdpa").build(spec, w)(Q, V)


def test_non_attended_axes_must_match():
    spec = impls.AttentionSpec(num_heads=1, key_dim=2, attention_axes=(2,))
    w = impls.Weights.random(spec, 4, 4)
    with pytest.raises(ValueError, match="axis 1 is not attended"):
        oracle.forward(spec, w, np.ones((1, 2, 3, 4)), np.ones((1, 3, 3, 4)))


@pytest.mark.parametrize("kwargs,exc,pattern", [
    (dict(num_heads=0, key_dim=2), ValueError, r"num_heads must be an int >= 1, got 0"),
    (dict(num_heads=2, key_dim=0), ValueError, r"key_dim must be an int >= 1, got 0"),
    (dict(num_heads=2.5, key_dim=2), TypeError, "num_heads must be an int"),
    (dict(num_heads=2, key_dim=2, value_dim=-1), ValueError, "value_dim must be an int >= 1"),
    # output_shape: a wrong type is a TypeError, a wrong value of the right type a ValueError (see spec.py).
    (dict(num_heads=2, key_dim=2, output_shape=()), ValueError, r"output_shape must be .*non-empty.*got \(\)"),
    (dict(num_heads=2, key_dim=2, output_shape=2.5), TypeError, "output_shape must be an int or a non-empty tuple"),
    (dict(num_heads=2, key_dim=2, output_shape="8"), TypeError, "output_shape must be an int or a non-empty tuple"),
    (dict(num_heads=2, key_dim=2, output_shape=(2, 2.5)), TypeError, r"output_shape must be an int >= 1, got 2.5"),
    (dict(num_heads=2, key_dim=2, output_shape=(2, 0)), ValueError, r"output_shape must be an int >= 1, got 0"),
    (dict(num_heads=2, key_dim=2, output_shape=-3), ValueError, r"output_shape must be an int >= 1, got -3"),
    (dict(num_heads=4, key_dim=2, num_kv_heads=3), ValueError, r"num_kv_heads must divide num_heads=4"),
    (dict(num_heads=4, key_dim=2, num_kv_heads=0), ValueError, r"num_kv_heads must be an int >= 1, got 0"),
    (dict(num_heads=4, key_dim=2, num_kv_heads=2.0), TypeError, r"num_kv_heads must be an int"),
    (dict(num_heads=2, key_dim=2, attention_axes="1"), TypeError, "attention_axes must be"),
    (dict(num_heads=2, key_dim=2, dropout=1.5), ValueError, r"dropout must be a float in \[0, 1\)"),
    (dict(num_heads=2, key_dim=2, use_bias=1), TypeError, "use_bias must be a bool"),
])
def test_bad_spec(kwargs, exc, pattern):
    with pytest.raises(exc, match=pattern):
        impls.AttentionSpec(**kwargs)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weights_are_rejected(bad):
    arrays = W.as_dict()
    arrays = {k: np.array(v) for k, v in arrays.items()}
    arrays["Wk"][0, 0, 0] = bad
    with pytest.raises(ValueError, match="Weights: Wk contains NaN or Inf"):
        impls.Weights(**arrays)


def test_non_finite_inputs_are_allowed():
    q = Q.copy()
    q[0, 0, 0] = np.nan
    out, _ = oracle.forward(SPEC, W, q, V)
    assert np.isnan(out[0, 0]).all() and np.isfinite(out[1]).all()


@pytest.mark.parametrize("mutate,pattern", [
    (lambda d: d.update(Wk=d["Wk"][..., :3]), "Wk must have shape"),
    (lambda d: d.update(Wv=d["Wv"][:, :1]), r"Wv must have shape \[Dv, 2, value_dim\]"),
    (lambda d: d.update(bo=d["bo"][:3]), r"bo must have shape \[8\]"),
    (lambda d: d.pop("bq"), "biases must be all present or all absent"),
    (lambda d: d.update(Wo=d["Wo"][0]), "Wo must have rank"),
])
def test_weight_shapes_are_checked(mutate, pattern):
    arrays = dict(W.as_dict())
    mutate(arrays)
    with pytest.raises(ValueError, match=pattern):
        impls.Weights(**arrays)


def test_weights_must_match_the_spec():
    other = impls.AttentionSpec(num_heads=4, key_dim=4)
    with pytest.raises(ValueError, match=r"weights: Wq has shape \[8, 2, 4\], expected \[8, 4, 4\]"):
        impls.get_adapter("torch_sdpa").build(other, W)
    nobias = impls.AttentionSpec(num_heads=2, key_dim=4, use_bias=False)
    with pytest.raises(ValueError, match="biases are present but spec.use_bias=False"):
        oracle.forward(nobias, W, Q, V)


@pytest.mark.parametrize("kwargs,pattern", [
    (dict(dtype="float8"), "dtype must be one of float16, bfloat16, float32, float64, got 'float8'"),
    (dict(device="tpu"), "device must be one of cpu, cuda"),
    (dict(mode="jit"), "mode must be one of"),
])
def test_unknown_dtype_device_mode(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        impls.get_adapter("numpy_oracle").build(SPEC, W, **kwargs)
    with pytest.raises(ValueError, match=pattern):
        oracle.forward(SPEC, W, Q, V, **{k: v for k, v in kwargs.items() if k == "dtype"}) if "dtype" in kwargs \
            else impls.get_adapter("torch_sdpa").build(SPEC, W, **kwargs)


def test_unknown_adapter_lists_known_names():
    with pytest.raises(ValueError, match=r"unknown adapter .nope.; known adapters: numpy_oracle, .*torch_sdpa"):
        impls.get_adapter("nope")


def test_missing_framework_says_what_to_install(monkeypatch):
    from mhabench.impls.torch_sdpa import TorchSDPAAdapter
    adapter = TorchSDPAAdapter()
    adapter.requires = ("a_framework_that_is_not_installed",)
    ok, why = adapter.availability()
    assert not ok and "cannot import a_framework_that_is_not_installed" in why and "pip install" in why
    with pytest.raises(impls.base.AdapterUnavailable, match="torch_sdpa is unavailable"):
        adapter.build(SPEC, W)


def test_weights_save_load_round_trip(tmp_path):
    path = tmp_path / "w.npz"
    W.save(path)
    assert impls.Weights.load(path) == W
    nobias = impls.AttentionSpec(num_heads=2, key_dim=4, use_bias=False)
    wn = impls.Weights.random(nobias, 8, 8, seed=1)
    wn.save(tmp_path / "n.npz")
    back = impls.Weights.load(tmp_path / "n.npz")
    assert back == wn and back.bq is None and "bq" not in back.as_dict()


def test_weights_random_is_reproducible():
    assert impls.Weights.random(SPEC, 8, 8, seed=7) == impls.Weights.random(SPEC, 8, 8, seed=7)
    assert impls.Weights.random(SPEC, 8, 8, seed=7) != impls.Weights.random(SPEC, 8, 8, seed=8)


def test_weights_are_read_only_copies():
    arr = np.array(W.Wq)
    w = impls.Weights(**{**W.as_dict(), "Wq": arr})
    arr[0, 0, 0] = 99.0
    assert w.Wq[0, 0, 0] != 99.0
    with pytest.raises(ValueError):
        w.Wq[0, 0, 0] = 1.0


# ---- the call-level features of modern attention -----------------------------------------------------
BAD_FEATURE_CALLS = [
    ("window_int", dict(window=2), TypeError, r"window must be None or a pair \(left, right\) of ints >= 0 or None, got 2"),
    ("window_triple", dict(window=(1, 2, 3)), TypeError, "window must be None or a pair"),
    ("window_negative", dict(window=(1, -1)), ValueError, r"window right must be an int >= 0 or None, got -1"),
    ("window_float", dict(window=(1.5, 0)), TypeError, r"window left must be an int >= 0 or None, got 1.5"),
    ("window_bool", dict(window=(True, 0)), TypeError, "window left must be an int"),
    ("bias_bool", dict(bias=np.ones((3, 5), bool)), TypeError,
     "bias must be a floating-point array .*a boolean may-attend mask goes in mask=.*got dtype bool"),
    ("bias_int", dict(bias=np.ones((3, 5), np.int32)), TypeError, "bias must be a floating-point array"),
    ("bias_not_broadcast", dict(bias=np.ones((2, 3, 4))), ValueError,
     r"bias of shape \[2, 3, 4\] does not broadcast to the scores \[2, 2, 3, 5\]: its last 2 axes are"),
    ("bias_too_many_axes", dict(bias=np.ones((1, 2, 2, 3, 5))), ValueError, r"bias of shape \[1, 2, 2, 3, 5\] has 5 axes"),
    ("query_lengths_float", dict(query_lengths=np.array([1.0, 2.0])), TypeError,
     r"query_lengths must be an integer array of shape \[B\] = \[2\], got dtype float64"),
    ("query_lengths_bool", dict(query_lengths=np.array([True, False])), TypeError, "query_lengths must be an integer"),
    ("query_lengths_shape", dict(query_lengths=np.array([[1, 2]])), ValueError,
     r"query_lengths must have shape \[B\] = \[2\] \(one length per batch element\), got shape \[1, 2\]"),
    ("query_lengths_scalar", dict(query_lengths=3), ValueError, r"query_lengths must have shape \[B\] = \[2\]"),
    ("query_lengths_too_long", dict(query_lengths=[3, 4]), ValueError,
     r"query_lengths must be in 0..3 \(the number of query positions, attended axes flattened\), got 4 at index 1"),
    ("key_value_lengths_negative", dict(key_value_lengths=[-1, 5]), ValueError,
     r"key_value_lengths must be in 0..5 \(the number of key/value positions.*got -1 at index 0"),
    ("query_offset_float", dict(query_offset=1.5, causal=True), TypeError,
     r"query_offset must be an int or an integer array of shape \[B\] = \[2\] \(the position of each sequence's "
     r"first query among the keys\), got 1.5"),
    ("query_offset_bool", dict(query_offset=np.array([True, False]), causal=True), TypeError,
     r"query_offset must be an int or an integer array of shape \[B\] = \[2\].*got dtype bool"),
    ("query_offset_shape", dict(query_offset=[1, 2, 3], causal=True), ValueError,
     r"query_offset must be an int or have shape \[B\] = \[2\] \(one offset per batch element\), got shape \[3\]"),
    ("query_offset_past_the_keys", dict(query_offset=[0, 6], causal=True), ValueError,
     r"query_offset must be in -3..5 \(-T..S, attended axes flattened.*got 6 at index 1"),
    ("query_offset_before_the_block", dict(query_offset=-4, causal=True), ValueError,
     r"query_offset must be in -3..5 .*got -4 at index 0"),
    ("query_offset_with_bottom_right", dict(query_offset=[1, 2], causal="bottom_right"), ValueError,
     r"query_offset cannot be combined with causal='bottom_right', which fixes every sequence's offset at S - T; "
     r"pass causal=True with query_offset"),
    ("softcap_zero", dict(softcap=0.0), ValueError,
     r"softcap must be a positive finite number \(logits become softcap \* tanh\(logits / softcap\)\), or None, got 0.0"),
    ("softcap_negative", dict(softcap=-1), ValueError, r"softcap must be a positive finite number.*got -1"),
    ("softcap_inf", dict(softcap=float("inf")), ValueError, r"softcap must be a positive finite number.*got inf"),
    ("softcap_bool", dict(softcap=True), TypeError, r"softcap must be a positive finite number.*got True"),
    ("softcap_string", dict(softcap="50"), TypeError, r"softcap must be a positive finite number.*got '50'"),
    ("softcap_array", dict(softcap=np.array([1.0, 2.0])), TypeError, r"softcap must be a positive finite number"),
    ("scale_nan", dict(scale=float("nan")), ValueError,
     r"scale must be a finite number \(it multiplies q . k in place of 1/sqrt\(key_dim\)\), or None, got nan"),
    ("scale_string", dict(scale="0.5"), TypeError, r"scale must be a finite number.*got '0.5'"),
    ("scale_bool", dict(scale=False), TypeError, r"scale must be a finite number.*got False"),
]


@pytest.mark.parametrize("bad", BAD_FEATURE_CALLS, ids=lambda b: b[0])
def test_bad_call_features(bad):
    _, kwargs, exc, pattern = bad
    with pytest.raises(exc, match=pattern):
        oracle.forward(SPEC, W, Q, V, **kwargs)
    with pytest.raises(exc, match=pattern):  # validation runs before the support check: same error
        impls.get_adapter("numpy_oracle").build(SPEC, W)(Q, V, **kwargs)


def test_call_features_are_read_into_the_call():
    from mhabench.impls.validation import validate_call
    call = validate_call(SPEC, (8, 8, 8), Q, V, causal="bottom_right", window=[2, None],
                         bias=np.zeros((3, 5), np.float32), query_lengths=[3, 1], key_value_lengths=np.array([5, 0]))
    assert call.causal is True and call.causal_alignment == "bottom_right" and call.diagonal_offset == 2
    assert call.window == (2, None)
    assert call.bias.shape == (1, 1, 3, 5) and call.given_bias.shape == (3, 5) and call.bias.dtype == np.float32
    assert call.query_lengths.dtype == np.int64 and list(call.key_value_lengths) == [5, 0]
    assert call.causal_argument == "bottom_right"
    assert set(call.feature_kwargs()) == {"window", "bias", "query_lengths", "key_value_lengths"}
    plain = validate_call(SPEC, (8, 8, 8), Q, V, causal=True, window=(None, None))
    assert plain.causal_alignment == "top_left" and plain.causal_argument is True and plain.window is None
    assert plain.feature_kwargs() == {} and plain.diagonal_offset == 0
    assert validate_call(SPEC, (8, 8, 8), Q, V).causal_alignment is None


def test_inference_features_are_read_into_the_call():
    from mhabench.impls.base import features_used
    from mhabench.impls.validation import validate_call
    call = validate_call(SPEC, (8, 8, 8), Q, V, causal=True, query_offset=[2, 0], softcap=np.float32(30),
                         scale=np.float64(0.25))
    assert call.query_offset.dtype == np.int64 and call.diagonal_offsets.tolist() == [2, 0] and call.offsets_vary
    assert call.softcap == 30.0 and type(call.softcap) is float and call.scale == 0.25 and type(call.scale) is float
    assert not call.top_left_causal and call.causal_argument is True
    with pytest.raises(ValueError, match=r"query_offset differs between sequences \(\[2, 0\]\)"):
        call.diagonal_offset
    assert set(call.feature_kwargs()) == {"query_offset", "softcap", "scale"}
    assert {"query_offset", "softcap", "scale", "causal"} <= features_used(SPEC, (8, 8, 8), call)
    assert "causal_bottom_right" not in features_used(SPEC, (8, 8, 8), call)
    shared = validate_call(SPEC, (8, 8, 8), Q, V, causal=True, query_offset=2)  # an int is every sequence's
    assert shared.query_offset.tolist() == [2, 2] and shared.diagonal_offset == 2 and not shared.offsets_vary
    bottom_right = validate_call(SPEC, (8, 8, 8), Q, V, causal="bottom_right")
    assert bottom_right.diagonal_offsets.tolist() == [2, 2] and bottom_right.query_offset is None
    # positions read by nothing (no causal, no window), or all 0, use no feature
    for unread in (dict(query_offset=[2, 1]), dict(query_offset=0, causal=True)):
        assert "query_offset" not in features_used(SPEC, (8, 8, 8), validate_call(SPEC, (8, 8, 8), Q, V, **unread))
    assert validate_call(SPEC, (8, 8, 8), Q, V, query_offset=[0, 0], causal=True).top_left_causal


def test_allowed_combines_every_restriction_and_its_flags_leave_parts_out():
    from mhabench.impls.validation import validate_call
    mask = np.ones((2, 3, 5), bool)
    mask[0, 0, 4] = False
    bias = np.zeros((3, 5))
    bias[1, 0] = -np.inf
    call = validate_call(SPEC, (8, 8, 8), Q, V, mask=mask, causal="bottom_right", window=(1, None), bias=bias,
                         key_value_lengths=[5, 4], query_lengths=[3, 2])
    allowed = call.allowed()
    assert allowed.shape == (2, 1, 3, 5)
    i, j = np.arange(3)[:, None], np.arange(5)[None, :]
    band = (j <= i + 2) & (j >= i + 2 - 1)
    expected = mask[:, None] & band & (bias != -np.inf) & (j < np.array([5, 4])[:, None, None, None]) \
        & (i < np.array([3, 2])[:, None, None, None])
    np.testing.assert_array_equal(allowed, expected)
    np.testing.assert_array_equal(call.flat_allowed(), expected)  # no free axes: the same layout
    np.testing.assert_array_equal(call.allowed(mask=False, bias=False, lengths=False), np.broadcast_to(band, (1, 1, 3, 5)))
    np.testing.assert_array_equal(call.flat_mask(), mask[:, None])
    np.testing.assert_array_equal(call.flat_mask(with_causal=True, window=True),
                                  mask[:, None] & band)
    assert call.allowed(mask=False, causal=False, window=False, lengths=False, bias=False) is None
    assert call.allowed(causal=False, window=False, lengths=False, bias=False) is call.mask  # as read
    np.testing.assert_array_equal(call.allowed_block(1, 3), expected[:, :, 1:3])
    np.testing.assert_array_equal(call.flat_bias(), bias[None, None])


def test_flattened_forms_of_lengths_repeat_over_free_axes():
    from mhabench.impls.validation import validate_call
    spec = impls.AttentionSpec(num_heads=2, key_dim=4, attention_axes=(2,))
    call = validate_call(spec, (8, 8, 8), np.zeros((2, 3, 4, 8)), np.zeros((2, 3, 5, 8)),
                         key_value_lengths=[5, 2])
    flat = call.flat_allowed()
    assert flat.shape == (6, 1, 4, 5)
    np.testing.assert_array_equal(flat[:3].all(axis=(1, 2, 3)), True)
    np.testing.assert_array_equal(flat[3:, 0, 0], np.broadcast_to([True, True, False, False, False], (3, 5)))
    assert call.allowed().shape == (2, 3, 1, 1, 5)  # constant along the query axis: kept of size 1


def test_key_value_length_zero_is_valid_input():
    from mhabench.impls.validation import validate_call
    call = validate_call(SPEC, (8, 8, 8), Q, V[:, :0], mask=np.ones((3, 0), bool), key_value_lengths=[0, 0])
    assert call.k_len == 0 and call.scores_shape == (2, 2, 3, 0)
    with pytest.raises(ValueError, match=r"key_value_lengths must be in 0..0"):
        validate_call(SPEC, (8, 8, 8), Q, V[:, :0], key_value_lengths=[1, 0])


# ---- features: detection, and the opt-in for the modern ones -----------------------------------------
def _used(spec=SPEC, q=Q, v=V, **kwargs):
    from mhabench.impls.base import features_used
    from mhabench.impls.validation import validate_call
    dims = (q.shape[-1], v.shape[-1], v.shape[-1])
    return features_used(spec, dims, validate_call(spec, dims, q, v, **kwargs))


def test_features_used_detects_every_modern_feature():
    assert not _used() & set(impls.base.EXTENSION_FEATURES)
    gqa = impls.AttentionSpec(num_heads=2, key_dim=4, num_kv_heads=1)
    assert "gqa" in _used(gqa)
    assert "gqa" not in _used(impls.AttentionSpec(num_heads=2, key_dim=4, num_kv_heads=2))
    assert {"causal", "causal_bottom_right"} <= _used(causal="bottom_right")         # T = 3, S = 5
    x = np.zeros((2, 5, 8))
    assert "causal_bottom_right" not in _used(q=x, v=x, causal="bottom_right")       # T = S: top-left too
    assert "causal" in _used(q=x, v=x, causal="bottom_right")
    assert "window" in _used(window=(1, 0)) and "window" not in _used(window=(None, None))
    assert "bias" in _used(bias=np.zeros((3, 5)))
    assert "lengths" in _used(query_lengths=[1, 2]) and "lengths" in _used(key_value_lengths=[1, 2])
    assert "mask" not in _used(key_value_lengths=[1, 2])


def test_modern_features_are_opt_in():
    from mhabench.impls.base import Adapter, Capabilities, EXTENSION_FEATURES

    class Old(Adapter):
        name = "old_adapter"

    reason = Old().unsupported_reason(SPEC, W, call=oracle.prepare(SPEC, W, Q, V, window=(1, 1)))
    assert reason == "a sliding window (left, right): old_adapter does not map window yet"
    gqa = impls.AttentionSpec(num_heads=2, key_dim=4, num_kv_heads=1)
    assert Old().unsupported_reason(gqa, (8, 8, 8)).endswith("old_adapter does not map gqa yet")
    assert Old().unsupported_reason(SPEC, W, call=oracle.prepare(SPEC, W, Q, V, causal="bottom_right")) \
        .endswith("old_adapter does not map causal_bottom_right yet")

    class Some(Adapter):
        name = "some_adapter"

        def capabilities(self):
            return Capabilities(supported_extensions={"window"},
                                unsupported_features={"bias": "the framework takes boolean masks only"})

    assert Some().capabilities().supported_extensions == frozenset({"window"})
    assert Some().unsupported_reason(SPEC, W, call=oracle.prepare(SPEC, W, Q, V, window=(1, 1))) is None
    assert Some().unsupported_reason(SPEC, W, call=oracle.prepare(SPEC, W, Q, V, bias=np.zeros((3, 5)))) \
        == "an additive float bias on the logits: the framework takes boolean masks only"
    with pytest.raises(ValueError, match=r"supported_extensions \['mask'\] are not opt-in features"):
        Capabilities(supported_extensions={"mask"})
    with pytest.raises(ValueError, match=r"features \['window'\] are listed both"):
        Capabilities(supported_extensions={"window"}, unsupported_features={"window": "no"})
    assert impls.get_adapter("numpy_oracle").capabilities().supported_extensions == frozenset(EXTENSION_FEATURES)


def test_an_adapter_that_does_not_map_a_feature_refuses_it():
    from mhabench.impls.numpy_oracle import NumpyOracleAdapter

    class NotMapping(NumpyOracleAdapter):  # the oracle's layer, but an adapter that opted into nothing
        name = "not_mapping"

        def capabilities(self):
            return impls.Capabilities(devices=("cpu",), modes=("eager",))

    adapter = NotMapping()
    layer = adapter.build(SPEC, W, dtype="float32")
    with pytest.raises(impls.UnsupportedError, match="not_mapping does not map window yet"):
        layer(Q, V, window=(1, 1))
    with pytest.raises(impls.UnsupportedError, match="not_mapping does not map lengths yet"):
        layer.gradients(Q, V, cotangent=np.ones((2, 3, 8)), key_value_lengths=[5, 5])
    gqa = impls.AttentionSpec(num_heads=2, key_dim=4, num_kv_heads=1)
    with pytest.raises(impls.UnsupportedError, match="does not map gqa yet"):
        adapter.build(gqa, impls.Weights.random(gqa, 8, 8))


@pytest.mark.parametrize("name", [cls.name for cls in impls.registry.builtin_adapter_classes()])
def test_every_builtin_adapter_gives_a_real_reason_for_what_it_does_not_map(name):
    """No built-in adapter leaves a modern feature at the placeholder 'does not map ... yet'."""
    from mhabench.impls.base import EXTENSION_FEATURES
    caps = impls.get_adapter(name).capabilities()
    for feature in EXTENSION_FEATURES:
        reason = caps.unsupported(name, feature)
        assert reason is None or "does not map" not in reason, (feature, reason)
    assert set(caps.supported_extensions) | set(caps.unsupported_features) >= set(EXTENSION_FEATURES)


def test_a_validate_override_that_predates_the_features_still_refuses_them():
    """A Layer subclass whose validate() override has no feature keywords: a call using none works; one
    using a feature its adapter does not map is refused by the shared checks, not a TypeError."""
    from mhabench.impls.numpy_oracle import NumpyOracleAdapter, NumpyOracleLayer

    class OldLayer(NumpyOracleLayer):
        def validate(self, query, value, key=None, mask=None, causal=False, *, return_scores=False,
                     training=False, gradients=False):
            return super().validate(query, value, key, mask, causal, return_scores=return_scores,
                                    training=training, gradients=gradients)

    class OldAdapter(NumpyOracleAdapter):
        name = "old_oracle"
        layer_class = OldLayer

        def capabilities(self):
            return impls.Capabilities(devices=("cpu",), modes=("eager",))

    layer = OldAdapter().build(SPEC, W, dtype="float64")
    np.testing.assert_array_equal(layer(Q, V)[0], oracle.forward(SPEC, W, Q, V)[0])
    with pytest.raises(impls.UnsupportedError, match="old_oracle does not map bias yet"):
        layer(Q, V, bias=np.zeros((3, 5)))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_numpy_oracle_adapter_passes_every_feature_through(dtype):
    spec = impls.AttentionSpec(num_heads=2, key_dim=4, num_kv_heads=1)
    w = impls.Weights.random(spec, 8, 8, seed=3)
    rng = np.random.default_rng(3)
    bias = rng.normal(size=(2, 3, 5))
    kwargs = dict(window=(1, None), bias=bias, query_lengths=[3, 2], key_value_lengths=[5, 3])
    layer = impls.get_adapter("numpy_oracle").build(spec, w, dtype=dtype)
    out, scores = layer(Q, V, None, None, "bottom_right", return_scores=True, **kwargs)
    want, want_scores = oracle.forward(spec, w, Q, V, causal="bottom_right", dtype=dtype, **kwargs)
    np.testing.assert_array_equal(out, want.astype(dtype))
    np.testing.assert_array_equal(scores, want_scores.astype(dtype))
    assert not np.array_equal(want, oracle.forward(spec, w, Q, V, causal=True, dtype=dtype)[0])
    ct = rng.normal(size=out.shape)
    grads = layer.gradients(Q, V, None, None, "bottom_right", ct, **kwargs)
    from mhabench.impls.oracle_backward import backward
    expected = backward(spec, w, Q, V, None, None, "bottom_right", ct, dtype=dtype, **kwargs)
    assert set(grads) == set(expected) and grads["bias"].shape == bias.shape
    for name in expected:
        np.testing.assert_array_equal(grads[name], expected[name], err_msg=name)


def test_num_kv_heads_round_trips_and_defaults():
    spec = impls.AttentionSpec(num_heads=6, key_dim=2, num_kv_heads=3)
    assert spec.kv_heads == 3 and spec.group_size == 2
    assert impls.AttentionSpec.from_dict(spec.to_dict()) == spec
    classic = impls.AttentionSpec(num_heads=6, key_dim=2)
    assert classic.num_kv_heads is None and classic.kv_heads == 6 and classic.group_size == 1
    old = {k: v for k, v in classic.to_dict().items() if k != "num_kv_heads"}  # a dict written before GQA
    assert impls.AttentionSpec.from_dict(old) == classic
    assert impls.AttentionSpec(6, 2, None, None, None, True, 0.0, 2).num_kv_heads == 2  # the last positional field


def test_evaluate_threads_the_call_features():
    layer = impls.get_adapter("numpy_oracle").build(SPEC, W, dtype="float64")
    kwargs = dict(window=(1, 0), bias=np.ones((3, 5)) * np.arange(5), key_value_lengths=[4, 5])
    ct = np.ones((2, 3, 8))
    found = layer.evaluate(Q, V, None, None, "bottom_right", cotangent=ct, **kwargs)
    want, want_scores = oracle.forward(SPEC, W, Q, V, causal="bottom_right", **kwargs)
    np.testing.assert_array_equal(found["output"], want)
    np.testing.assert_array_equal(found["scores"], want_scores)
    assert found["gradients"]["bias"].shape == (3, 5)


@pytest.mark.parametrize("name, refused", [("ort_attention", "onnxruntime"), ("torch_mha@ort", "onnxruntime"),
                                           ("torch_flex", "SIGFPE"), ("torch_sdpa", None), ("numpy_oracle", None)])
def test_an_adapter_that_cannot_take_zero_keys_says_so(name, refused):
    """S = 0 is canonical (every row fully masked: the output bias); an adapter whose framework fails on it
    declares why (Adapter.empty_keys_refused), for that call only."""
    from mhabench.impls.validation import validate_call
    spec = impls.AttentionSpec(2, 4)
    weights = impls.Weights.random(spec, 8, 8)
    adapter = impls.get_adapter(name)
    query = np.zeros((2, 4, 8))
    empty = validate_call(spec, (8, 8, 8), query, np.zeros((2, 0, 8)))
    some = validate_call(spec, (8, 8, 8), query, np.zeros((2, 3, 8)))
    reason = adapter.unsupported_reason(spec, weights, call=empty, mode=adapter.default_mode)
    assert (reason is None) if refused is None else (reason.startswith("a key/value length of 0") and refused in reason)
    assert adapter.unsupported_reason(spec, weights, call=some, mode=adapter.default_mode) is None
