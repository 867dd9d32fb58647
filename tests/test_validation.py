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
    ("causal_not_bool", dict(query=Q, value=V, causal="yes"), TypeError, "causal must be a bool"),
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
    (lambda d: d.update(Wk=d["Wk"][:, :1]), "Wk must have shape"),
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
