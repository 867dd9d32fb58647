"""The oracle against hand computations, a naive loop implementation, and its defining properties."""
import math

import numpy as np
import pytest

from mhabench import impls
from mhabench.impls import oracle
from tests.feature_cases import CASES, FULLY_MASKED
from tests.naive import naive_attention


def test_hand_computed_single_head():
    # One head, identity projections, no bias: attention is softmax(q k^T / sqrt(d)) v.
    spec = impls.AttentionSpec(num_heads=1, key_dim=2, use_bias=False)
    eye = np.eye(2).reshape(2, 1, 2)
    w = impls.Weights(Wq=eye, Wk=eye, Wv=eye, Wo=np.eye(2).reshape(1, 2, 2))
    q = np.array([[[1.0, 0.0]]])
    v = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    out, scores = oracle.forward(spec, w, q, v)
    a, b = math.exp(1 / math.sqrt(2)), math.exp(0.0)
    expected_w = np.array([a, b]) / (a + b)
    np.testing.assert_allclose(scores[0, 0, 0], expected_w, rtol=1e-15)
    np.testing.assert_allclose(out[0, 0], expected_w, rtol=1e-15)


def test_hand_computed_bias_and_fully_masked_row():
    spec = impls.AttentionSpec(num_heads=1, key_dim=1)
    one = np.ones((1, 1, 1))
    w = impls.Weights(Wq=one, Wk=one, Wv=one, Wo=one * 2, bq=np.zeros((1, 1)), bk=np.zeros((1, 1)),
                      bv=np.full((1, 1), 0.5), bo=np.array([3.0]))
    q = np.array([[[1.0], [2.0]]])
    v = np.array([[[1.0], [-1.0]]])
    mask = np.array([[[True, False], [False, False]]])
    out, scores = oracle.forward(spec, w, q, v, mask=mask)
    # row 0 attends only key 0: value 1 + 0.5 -> *2 + 3 = 6; row 1 attends nothing: zeros policy -> bo.
    np.testing.assert_allclose(out[0, :, 0], [6.0, 3.0])
    np.testing.assert_array_equal(scores[0, 0], [[1.0, 0.0], [0.0, 0.0]])
    out_u, scores_u = oracle.forward(spec, w, q, v, mask=mask, fully_masked="uniform")
    np.testing.assert_allclose(scores_u[0, 0, 1], [0.5, 0.5])
    np.testing.assert_allclose(out_u[0, 1, 0], 2 * (0.5 * 1.5 + 0.5 * -0.5) + 3)
    out_n, _ = oracle.forward(spec, w, q, v, mask=mask, fully_masked="nan")
    assert np.isnan(out_n[0, 1, 0]) and out_n[0, 0, 0] == 6.0


@pytest.mark.parametrize("case", CASES + [FULLY_MASKED], ids=lambda c: c.id)
def test_oracle_matches_naive_loops(case):
    w, q, v, k, mask = case.build(seed=3)
    out, scores = oracle.forward(case.spec, w, q, v, k, mask, case.causal)
    ref_out, ref_scores = naive_attention(case.spec, w, q, v, k, mask, case.causal)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("policy", ["zeros", "uniform", "nan", "unmasked"])
def test_fully_masked_policies_match_naive(policy):
    w, q, v, k, mask = FULLY_MASKED.build()
    out, scores = oracle.forward(FULLY_MASKED.spec, w, q, v, k, mask, fully_masked=policy)
    ref_out, ref_scores = naive_attention(FULLY_MASKED.spec, w, q, v, k, mask, fully_masked=policy)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-13, equal_nan=True)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-12, atol=1e-14, equal_nan=True)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_rows_sum_to_one_and_masked_are_exactly_zero(case):
    w, q, v, k, mask = case.build(seed=5)
    _, scores = oracle.forward(case.spec, w, q, v, k, mask, case.causal)
    np.testing.assert_allclose(scores.sum(axis=tuple(range(-len(case.spec.resolve_axes(q.ndim)), 0))), 1.0,
                               rtol=1e-13)
    call = oracle.prepare(case.spec, w, q, v, k, mask, case.causal)
    allowed = call.allowed()
    if allowed is not None:
        assert np.all(scores[~np.broadcast_to(allowed, scores.shape)] == 0.0)


def test_permuting_keys_with_values_changes_nothing(rng):
    spec = impls.AttentionSpec(num_heads=2, key_dim=3)
    w = impls.Weights.random(spec, 6, 6, seed=1)
    q, v = rng.normal(size=(2, 4, 6)), rng.normal(size=(2, 7, 6))
    perm = rng.permutation(7)
    out, scores = oracle.forward(spec, w, q, v)
    out_p, scores_p = oracle.forward(spec, w, q, v[:, perm])
    np.testing.assert_allclose(out_p, out, rtol=1e-12)
    np.testing.assert_allclose(scores_p, scores[..., perm], rtol=1e-12)


def test_causal_output_ignores_the_future(rng):
    spec = impls.AttentionSpec(num_heads=2, key_dim=3)
    w = impls.Weights.random(spec, 6, 6, seed=2)
    x = rng.normal(size=(1, 6, 6))
    out, _ = oracle.forward(spec, w, x, x, causal=True)
    for i in range(5):
        y = x.copy()
        y[:, i + 1:] = rng.normal(size=y[:, i + 1:].shape) * 10
        out_y, _ = oracle.forward(spec, w, y, y, causal=True)
        np.testing.assert_allclose(out_y[:, :i + 1], out[:, :i + 1], rtol=1e-12)
        assert not np.allclose(out_y[:, i + 1:], out[:, i + 1:])


def test_key_defaults_to_value(rng):
    spec = impls.AttentionSpec(num_heads=2, key_dim=3)
    w = impls.Weights.random(spec, 6, 5, seed=2)
    q, v = rng.normal(size=(2, 3, 6)), rng.normal(size=(2, 4, 5))
    np.testing.assert_array_equal(oracle.forward(spec, w, q, v)[0], oracle.forward(spec, w, q, v, v)[0])


def test_head_axis_optional_in_mask(rng):
    spec = impls.AttentionSpec(num_heads=3, key_dim=2)
    w = impls.Weights.random(spec, 6, 6, seed=2)
    q, v = rng.normal(size=(2, 3, 6)), rng.normal(size=(2, 4, 6))
    m = rng.random((2, 3, 4)) > 0.4
    m[..., 0] = True
    a = oracle.forward(spec, w, q, v, mask=m)[0]
    b = oracle.forward(spec, w, q, v, mask=np.broadcast_to(m[:, None], (2, 3, 3, 4)))[0]
    c = oracle.forward(spec, w, q, v, mask=m[:, None])[0]  # [B, 1, T, S]: the head axis, broadcast
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("case", [c for c in CASES if c.id in
                                  ("self", "mask_per_head", "causal_cross_T4_S7", "axes_23_5d_mask_causal",
                                   "everything")], ids=lambda c: c.id)
@pytest.mark.parametrize("block", [1, 2, 3, 64])
def test_blockwise_equals_dense(case, block):
    w, q, v, k, mask = case.build(seed=7)
    dense, _ = oracle.forward(case.spec, w, q, v, k, mask, case.causal)
    blocked, none = oracle.forward(case.spec, w, q, v, k, mask, case.causal, return_scores=False,
                                   block_size=block)
    assert none is None
    np.testing.assert_allclose(blocked, dense, rtol=1e-12, atol=1e-12)


def test_blockwise_long_sequence_matches_dense(rng):
    spec = impls.AttentionSpec(num_heads=2, key_dim=8)
    w = impls.Weights.random(spec, 16, 16, seed=0)
    x = rng.normal(size=(1, 700, 16))
    dense, _ = oracle.forward(spec, w, x, x, causal=True, return_scores=False)
    blocked, _ = oracle.forward(spec, w, x, x, causal=True, return_scores=False, block_size=128)
    assert np.max(np.abs(blocked - dense)) <= 1e-12 * np.max(np.abs(dense))


def test_blockwise_refuses_scores():
    spec = impls.AttentionSpec(num_heads=1, key_dim=2)
    w = impls.Weights.random(spec, 2, 2)
    with pytest.raises(ValueError, match="return_scores"):
        oracle.forward(spec, w, np.ones((1, 2, 2)), np.ones((1, 2, 2)), block_size=4)
    with pytest.raises(ValueError, match="block_size"):
        oracle.forward(spec, w, np.ones((1, 2, 2)), np.ones((1, 2, 2)), return_scores=False, block_size=0)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_low_precision_reference_is_close_but_not_exact(dtype, rng):
    spec = impls.AttentionSpec(num_heads=2, key_dim=4)
    w = impls.Weights.random(spec, 8, 8, seed=0)
    q = rng.normal(size=(2, 5, 8))
    golden, _ = oracle.forward(spec, w, q, q)
    ref, _ = oracle.forward(spec, w, q, q, dtype=dtype)
    err = np.max(np.abs(ref - golden)) / np.max(np.abs(golden))
    eps = {"float32": 2 ** -23, "float16": 2 ** -10, "bfloat16": 2 ** -7}[dtype]
    assert 0 < err < 50 * eps
    # every value is representable in the dtype
    from mhabench.impls.validation import numpy_dtype
    np.testing.assert_array_equal(ref.astype(numpy_dtype(dtype)).astype(np.float64), ref)


def test_nan_in_one_value_position_poisons_only_rows_that_read_it(rng):
    spec = impls.AttentionSpec(num_heads=1, key_dim=2)
    w = impls.Weights.random(spec, 4, 4, seed=0)
    x = rng.normal(size=(2, 4, 4))
    x[1, 2, 0] = np.nan
    out, _ = oracle.forward(spec, w, x, x, causal=True)
    assert np.all(np.isfinite(out[0]))            # other batch element untouched
    assert np.all(np.isfinite(out[1, :2]))        # causal rows before the NaN never read it
    assert np.all(np.isnan(out[1, 2:]))


def test_nan_in_a_masked_value_position_is_never_read(rng):
    spec = impls.AttentionSpec(num_heads=2, key_dim=2)
    w = impls.Weights.random(spec, 4, 4, seed=0)
    q, v = rng.normal(size=(1, 3, 4)), rng.normal(size=(1, 5, 4))
    mask = np.ones((1, 3, 5), dtype=bool)
    mask[..., 4] = False
    clean, _ = oracle.forward(spec, w, q, v, mask=mask)
    v[0, 4] = [np.nan, np.inf, -np.inf, 1.0]
    dirty, _ = oracle.forward(spec, w, q, v, mask=mask)
    np.testing.assert_allclose(dirty, clean, rtol=1e-12)
    ref, _ = naive_attention(spec, w, q, v, mask=mask)
    np.testing.assert_allclose(dirty, ref, rtol=1e-12)


@pytest.mark.parametrize("policy", ["zeros", "uniform"])
def test_fully_masked_row_with_nan_value_follows_policy(policy, rng):
    spec = impls.AttentionSpec(num_heads=1, key_dim=2)
    w = impls.Weights.random(spec, 4, 4, seed=0)
    q, v = rng.normal(size=(1, 2, 4)), rng.normal(size=(1, 3, 4))
    v[0, 2, 1] = np.nan
    mask = np.array([[[True, True, False], [False, False, False]]])
    out, _ = oracle.forward(spec, w, q, v, mask=mask, fully_masked=policy)
    ref, _ = naive_attention(spec, w, q, v, mask=mask, fully_masked=policy)
    np.testing.assert_allclose(out, ref, rtol=1e-12, equal_nan=True)
    assert np.all(np.isfinite(out[0, 0]))
    if policy == "zeros":
        np.testing.assert_allclose(out[0, 1], w.bo)   # nothing attended: the output bias
    else:
        assert np.all(np.isnan(out[0, 1]))            # the uniform mean reads the NaN


# ---- the mask rule: Keras's, not NumPy's -----------------------------------------------------------
def test_a_short_mask_lines_up_from_the_left_with_the_batch():
    """Scores [B=3, F=3, H, T=4, S=2] and a mask [3, 4, 2]: its first axis is the batch (Keras's rule),
    not the free axis F (NumPy's right alignment would say F; both are 3, so only the values tell)."""
    spec = impls.AttentionSpec(num_heads=2, key_dim=4, attention_axes=(2,))
    w = impls.Weights.random(spec, 8, 8, seed=5)
    rng = np.random.default_rng(5)
    q, v = rng.normal(size=(3, 3, 4, 8)), rng.normal(size=(3, 3, 2, 8))
    mask = rng.random((3, 4, 2)) < 0.6
    mask[..., 0] = True
    out, scores = oracle.forward(spec, w, q, v, mask=mask)
    batch_read = np.broadcast_to(mask[:, None, None], (3, 3, 2, 4, 2))  # [B, 1, 1, T, S]
    free_read = np.broadcast_to(mask[None, :, None], (3, 3, 2, 4, 2))   # [1, F, 1, T, S]
    np.testing.assert_array_equal(scores == 0, ~batch_read)
    assert not np.array_equal(scores == 0, ~free_read)
    naive_out, naive_scores = naive_attention(spec, w, q, v, mask=mask)
    np.testing.assert_allclose(out, naive_out, atol=1e-12)
    np.testing.assert_allclose(scores, naive_scores, atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 2), (3, 4, 2), (3, 3, 4, 2), (3, 3, 2, 4, 2), (1, 1, 4, 1), (3, 1, 1, 2),
                                   (1, 3, 1, 4, 2)])
def test_every_mask_rank_agrees_with_the_naive_reading(shape):
    spec = impls.AttentionSpec(num_heads=2, key_dim=4, attention_axes=(2,))
    w = impls.Weights.random(spec, 8, 8, seed=6)
    rng = np.random.default_rng(6)
    q, v = rng.normal(size=(3, 3, 4, 8)), rng.normal(size=(3, 3, 2, 8))
    mask = rng.random(shape) < 0.7
    out, scores = oracle.forward(spec, w, q, v, mask=mask)
    naive_out, naive_scores = naive_attention(spec, w, q, v, mask=mask)
    np.testing.assert_allclose(out, naive_out, atol=1e-12)
    np.testing.assert_allclose(scores, naive_scores, atol=1e-12)


def test_two_attended_axes_read_the_last_four_mask_axes():
    spec = impls.AttentionSpec(num_heads=2, key_dim=4, attention_axes=(2, 3))
    w = impls.Weights.random(spec, 8, 8, seed=7)
    rng = np.random.default_rng(7)
    q, v = rng.normal(size=(3, 3, 4, 3, 8)), rng.normal(size=(3, 3, 3, 2, 8))
    for shape in [(4, 3, 3, 2), (3, 4, 3, 3, 2), (3, 3, 4, 3, 3, 2)]:
        mask = rng.random(shape) < 0.7
        out, scores = oracle.forward(spec, w, q, v, mask=mask)
        naive_out, naive_scores = naive_attention(spec, w, q, v, mask=mask)
        np.testing.assert_allclose(out, naive_out, atol=1e-12)
        np.testing.assert_allclose(scores, naive_scores, atol=1e-12)


# ---- modern attention: each feature against the naive loops and its defining properties ------------------
from tests.feature_cases import MODERN_CASES  # noqa: E402


def _modern(case, seed=3, **extra):
    w, q, v, k, mask = case.build(seed=seed)
    kwargs = {**case.feature_kwargs(seed), **extra}
    return w, q, v, k, mask, kwargs


@pytest.mark.parametrize("case", MODERN_CASES, ids=lambda c: c.id)
def test_modern_features_match_naive_loops(case):
    w, q, v, k, mask, kwargs = _modern(case)
    out, scores = oracle.forward(case.spec, w, q, v, k, mask, case.causal, **kwargs)
    ref_out, ref_scores = naive_attention(case.spec, w, q, v, k, mask, case.causal, **kwargs)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("policy", ["uniform", "nan", "unmasked"])
@pytest.mark.parametrize("case", [c for c in MODERN_CASES if c.id in (
    "bottom_right_T6_S3", "window_1_none_T6_S3", "bias_neg_inf_row", "lengths_zero", "modern_everything",
    "key_value_length_0_everything", "offset_negative_rows_see_nothing", "inference_everything")],
    ids=lambda c: c.id)
def test_modern_fully_masked_rows_follow_every_policy(case, policy):
    w, q, v, k, mask, kwargs = _modern(case)
    out, scores = oracle.forward(case.spec, w, q, v, k, mask, case.causal, fully_masked=policy, **kwargs)
    ref_out, ref_scores = naive_attention(case.spec, w, q, v, k, mask, case.causal, policy, **kwargs)
    np.testing.assert_allclose(out, ref_out, rtol=1e-12, atol=1e-12, equal_nan=True)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-12, atol=1e-14, equal_nan=True)


@pytest.mark.parametrize("block", [1, 2, 5])
@pytest.mark.parametrize("case", [c for c in MODERN_CASES if c.id in (
    "gqa_cross_causal_mask_value_dim", "bottom_right_T6_S3", "window_2_1_cross", "bias_BHTS_mask",
    "lengths_both_causal_mask", "lengths_axes_23_5d", "modern_everything", "key_value_length_0",
    "offset_speculative_T3_S8_cache", "offset_axes_23_5d", "softcap_bias_mask", "inference_everything")],
    ids=lambda c: c.id)
def test_modern_blockwise_equals_dense(case, block):
    w, q, v, k, mask, kwargs = _modern(case, seed=7)
    dense, _ = oracle.forward(case.spec, w, q, v, k, mask, case.causal, **kwargs)
    blocked, _ = oracle.forward(case.spec, w, q, v, k, mask, case.causal, False, block_size=block, **kwargs)
    np.testing.assert_allclose(blocked, dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_modern_low_precision_reference_is_rounded_and_close(dtype):
    case = next(c for c in MODERN_CASES if c.id == "modern_everything")
    w, q, v, k, mask, kwargs = _modern(case)
    golden, _ = oracle.forward(case.spec, w, q, v, k, mask, case.causal, **kwargs)
    ref, _ = oracle.forward(case.spec, w, q, v, k, mask, case.causal, dtype=dtype, **kwargs)
    from mhabench.impls.validation import numpy_dtype
    np.testing.assert_array_equal(ref.astype(numpy_dtype(dtype)).astype(np.float64), ref)
    eps = {"float32": 2 ** -23, "float16": 2 ** -10, "bfloat16": 2 ** -7}[dtype]
    assert 0 < np.max(np.abs(ref - golden)) / np.max(np.abs(golden)) < 50 * eps


# -- grouped-query attention
def _expanded_to_classic(spec, w):
    """The same layer as classic MHA: each key/value head's weights repeated for its query heads."""
    G = spec.group_size
    arrays = dict(w.as_dict())
    for name in ("Wk", "Wv"):
        arrays[name] = np.repeat(arrays[name], G, axis=1)
    for name in ("bk", "bv"):
        if name in arrays:
            arrays[name] = np.repeat(arrays[name], G, axis=0)
    classic = impls.AttentionSpec(spec.num_heads, spec.key_dim, spec.value_dim, spec.output_shape,
                                  spec.attention_axes, spec.use_bias, spec.dropout)
    return classic, impls.Weights(**arrays)


@pytest.mark.parametrize("kv_heads", [1, 2, 3, 6])
def test_gqa_is_classic_attention_with_repeated_kv_heads(kv_heads, rng):
    spec = impls.AttentionSpec(num_heads=6, key_dim=2, value_dim=3, num_kv_heads=kv_heads)
    w = impls.Weights.random(spec, 8, 5, seed=kv_heads)
    assert w.Wk.shape == (5, kv_heads, 2) and w.bv.shape == (kv_heads, 3) and w.num_kv_heads == kv_heads
    q, v = rng.normal(size=(2, 4, 8)), rng.normal(size=(2, 6, 5))
    mask = rng.random((2, 6, 4, 6)) < 0.7
    out, scores = oracle.forward(spec, w, q, v, mask=mask, causal="bottom_right")
    classic, wc = _expanded_to_classic(spec, w)
    out_c, scores_c = oracle.forward(classic, wc, q, v, mask=mask, causal="bottom_right")
    np.testing.assert_allclose(out, out_c, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(scores, scores_c, rtol=1e-13, atol=1e-15)
    if 1 < kv_heads < 6:  # another grouping (head h reading kv head h % Hkv) really differs
        wrong = impls.Weights(**{**wc.as_dict(), "Wk": np.tile(w.Wk, (1, 6 // kv_heads, 1))})
        assert not np.allclose(oracle.forward(classic, wrong, q, v, mask=mask)[1],
                               oracle.forward(classic, wc, q, v, mask=mask)[1])


def test_num_kv_heads_equal_to_num_heads_is_classic_attention(rng):
    spec = impls.AttentionSpec(num_heads=2, key_dim=4, num_kv_heads=2)
    classic = impls.AttentionSpec(num_heads=2, key_dim=4)
    w = impls.Weights.random(spec, 8, 8, seed=1)
    assert w == impls.Weights.random(classic, 8, 8, seed=1)  # the same draws: seeds keep their meaning
    q = rng.normal(size=(2, 3, 8))
    np.testing.assert_array_equal(oracle.forward(spec, w, q, q)[0], oracle.forward(classic, w, q, q)[0])


def test_gqa_weights_must_match_the_spec():
    spec = impls.AttentionSpec(num_heads=4, key_dim=2, num_kv_heads=2)
    w = impls.Weights.random(impls.AttentionSpec(num_heads=4, key_dim=2), 8, 8)
    with pytest.raises(ValueError, match=r"weights: Wk has shape \[8, 4, 2\], expected \[8, 2, 2\]"):
        oracle.forward(spec, w, np.ones((1, 2, 8)), np.ones((1, 2, 8)))
    with pytest.raises(ValueError, match=r"Wk must have shape \[Dk, Hkv, 2\] with Hkv dividing the 4 heads"):
        impls.Weights(**{**w.as_dict(), "Wk": np.ones((8, 3, 2)), "bk": np.ones((3, 2))})


# -- causal alignment
def test_bottom_right_rows_with_no_key_output_the_output_bias(rng):
    """T = 6 > S = 3 bottom-right: query i sees keys j <= i - 3, so rows 0..2 see nothing: zero weights,
    output bo (the canonical fully masked row); rows 3..5 see 1, 2, 3 keys."""
    spec = impls.AttentionSpec(num_heads=2, key_dim=4)
    w = impls.Weights.random(spec, 8, 8, seed=2)
    q, v = rng.normal(size=(2, 6, 8)), rng.normal(size=(2, 3, 8))
    out, scores = oracle.forward(spec, w, q, v, causal="bottom_right")
    np.testing.assert_array_equal(scores[:, :, :3], 0.0)
    np.testing.assert_array_equal(out[:, :3], np.broadcast_to(w.bo, (2, 3, 8)))
    np.testing.assert_array_equal((scores[0, 0, 3:] > 0).sum(axis=-1), [1, 2, 3])


def test_bottom_right_last_query_sees_every_key_and_equals_top_left_when_square(rng):
    spec = impls.AttentionSpec(num_heads=2, key_dim=4)
    w = impls.Weights.random(spec, 8, 8, seed=2)
    q, v = rng.normal(size=(2, 3, 8)), rng.normal(size=(2, 7, 8))
    _, scores = oracle.forward(spec, w, q, v, causal="bottom_right")
    np.testing.assert_array_equal((scores[0, 0] > 0).sum(axis=-1), [5, 6, 7])
    _, top_left = oracle.forward(spec, w, q, v, causal=True)
    np.testing.assert_array_equal((top_left[0, 0] > 0).sum(axis=-1), [1, 2, 3])
    x = rng.normal(size=(2, 5, 8))
    for alias in (True, "top_left"):
        np.testing.assert_array_equal(oracle.forward(spec, w, x, x, causal="bottom_right")[0],
                                      oracle.forward(spec, w, x, x, causal=alias)[0])
    decode = rng.normal(size=(2, 1, 8))  # one new token against the whole cache: nothing masked
    np.testing.assert_array_equal(oracle.forward(spec, w, decode, v, causal="bottom_right")[0],
                                  oracle.forward(spec, w, decode, v)[0])


# -- per-sequence query positions (a key/value cache)
def test_query_offset_zero_is_top_left_and_s_minus_t_is_bottom_right(rng):
    spec = impls.AttentionSpec(num_heads=2, key_dim=4)
    w = impls.Weights.random(spec, 8, 8, seed=2)
    q, v = rng.normal(size=(2, 3, 8)), rng.normal(size=(2, 7, 8))
    for window in (None, (2, 1)):
        np.testing.assert_array_equal(oracle.forward(spec, w, q, v, causal=True, query_offset=0, window=window)[0],
                                      oracle.forward(spec, w, q, v, causal=True, window=window)[0])
        np.testing.assert_array_equal(oracle.forward(spec, w, q, v, causal=True, query_offset=[4, 4], window=window)[0],
                                      oracle.forward(spec, w, q, v, causal="bottom_right", window=window)[0])


def test_each_sequence_sits_at_its_own_offset(rng):
    """A batch with offsets (0, 3, 6) computes, per batch element, what that element alone computes with its
    offset: query i of element b sees keys j <= offsets[b] + i."""
    spec = impls.AttentionSpec(num_heads=4, key_dim=2, num_kv_heads=2)
    w = impls.Weights.random(spec, 8, 8, seed=3)
    q, v = rng.normal(size=(3, 2, 8)), rng.normal(size=(3, 8, 8))
    offsets = [0, 3, 6]
    out, scores = oracle.forward(spec, w, q, v, causal=True, query_offset=offsets, window=(2, None))
    for b, offset in enumerate(offsets):
        alone, alone_scores = oracle.forward(spec, w, q[b:b + 1], v[b:b + 1], causal=True, query_offset=offset,
                                             window=(2, None))
        np.testing.assert_array_equal(out[b:b + 1], alone)
        np.testing.assert_array_equal(scores[b:b + 1], alone_scores)
        allowed = np.array([[offset + i - 2 <= j <= offset + i for j in range(8)] for i in range(2)])
        np.testing.assert_array_equal(scores[b, 0] > 0, allowed)


def test_query_offset_alone_changes_nothing(rng):
    """Without causal or a window nothing reads the positions (as ONNX's nonpad_kv_seqlen without is_causal)."""
    spec = impls.AttentionSpec(num_heads=2, key_dim=4)
    w = impls.Weights.random(spec, 8, 8, seed=2)
    q, v = rng.normal(size=(2, 3, 8)), rng.normal(size=(2, 7, 8))
    np.testing.assert_array_equal(oracle.forward(spec, w, q, v, query_offset=[1, 4])[0],
                                  oracle.forward(spec, w, q, v)[0])


def test_decode_blockwise_at_a_long_cache_equals_dense(rng):
    """The blockwise mode on a decode step (T = 4 speculative queries, S = 3000 keys, offsets differing per
    sequence, grouped heads, softcap and scale): what a decode benchmark's reference computes."""
    spec = impls.AttentionSpec(num_heads=8, key_dim=4, num_kv_heads=2)
    w = impls.Weights.random(spec, 8, 8, seed=6)
    q, v = rng.normal(size=(3, 4, 8)), rng.normal(size=(3, 3000, 8))
    kwargs = dict(causal=True, query_offset=[0, 1500, 2996], key_value_lengths=[4, 1504, 3000], softcap=5.0,
                  scale=0.3)
    dense, _ = oracle.forward(spec, w, q, v, **kwargs)
    blocked, _ = oracle.forward(spec, w, q, v, return_scores=False, block_size=1, **kwargs)
    np.testing.assert_allclose(blocked, dense, rtol=1e-12, atol=1e-12)


# -- soft cap and scale
def test_softcap_bounds_the_logits_before_the_bias_and_the_mask(rng):
    """softcap * tanh(s / softcap), applied to the scaled logits before the bias: a huge softcap changes nothing,
    a small one flattens the weights toward uniform; a -inf bias (added after the cap) still masks."""
    spec = impls.AttentionSpec(num_heads=2, key_dim=4)
    w = impls.Weights.random(spec, 8, 8, seed=8)
    q, v = 30 * rng.normal(size=(2, 3, 8)), rng.normal(size=(2, 5, 8))
    plain, plain_scores = oracle.forward(spec, w, q, v)
    np.testing.assert_allclose(oracle.forward(spec, w, q, v, softcap=1e9)[0], plain, rtol=1e-9)
    _, capped = oracle.forward(spec, w, q, v, softcap=0.01)
    assert np.max(np.abs(capped - 0.2)) < 0.01 < np.max(np.abs(plain_scores - 0.2))
    bias = rng.normal(size=(3, 5))
    bias[:, 1] = -np.inf
    _, scores = oracle.forward(spec, w, q, v, softcap=0.5, bias=bias)
    np.testing.assert_array_equal(scores[..., 1], 0.0)
    # the bias is not capped: a bias of 3 on key 0 moves its logit by 3 even with a cap of 0.5
    bias = np.zeros((3, 5))
    bias[:, 0] = 3.0
    _, base = oracle.forward(spec, w, q, v, softcap=0.5)
    _, shifted = oracle.forward(spec, w, q, v, softcap=0.5, bias=bias)
    ratio = (shifted[..., 0] / shifted[..., 2]) / (base[..., 0] / base[..., 2])
    np.testing.assert_allclose(ratio, np.exp(3.0), rtol=1e-12)


def test_scale_replaces_one_over_sqrt_key_dim(rng):
    spec = impls.AttentionSpec(num_heads=2, key_dim=4)
    w = impls.Weights.random(spec, 8, 8, seed=8)
    q, v = rng.normal(size=(2, 3, 8)), rng.normal(size=(2, 5, 8))
    np.testing.assert_array_equal(oracle.forward(spec, w, q, v, scale=0.5)[0], oracle.forward(spec, w, q, v)[0])
    _, zero = oracle.forward(spec, w, q, v, scale=0.0)  # every logit 0: uniform weights
    np.testing.assert_allclose(zero, 0.2, rtol=1e-15)
    doubled = impls.Weights(**{**w.as_dict(), "Wq": 2 * w.Wq, "bq": 2 * w.bq})
    np.testing.assert_allclose(oracle.forward(spec, w, q, v, scale=1.0)[0], oracle.forward(spec, doubled, q, v)[0],
                               rtol=1e-12)


# -- sliding window
def test_window_selects_a_band_around_the_diagonal(rng):
    spec = impls.AttentionSpec(num_heads=1, key_dim=4)
    w = impls.Weights.random(spec, 8, 8, seed=4)
    q, v = rng.normal(size=(1, 5, 8)), rng.normal(size=(1, 8, 8))
    _, scores = oracle.forward(spec, w, q, v, window=(1, 2))
    expected = np.array([[i - 1 <= j <= i + 2 for j in range(8)] for i in range(5)])
    np.testing.assert_array_equal(scores[0, 0] > 0, expected)
    # bottom-right causal moves the window's diagonal to i + S - T = i + 3
    _, scores = oracle.forward(spec, w, q, v, causal="bottom_right", window=(1, 2))
    expected = np.array([[i + 3 - 1 <= j <= i + 3 for j in range(8)] for i in range(5)])
    np.testing.assert_array_equal(scores[0, 0] > 0, expected)


def test_window_agrees_with_jax_local_window_size():
    """JAX's local_window_size=(left, right) is our window (top-left, without bottom-right causal)."""
    jax_functions = pytest.importorskip("jax._src.nn.functions")
    from mhabench.impls.validation import band_mask
    for T, S, window in [(5, 8, (1, 2)), (6, 3, (0, 0)), (4, 4, (3, 1)), (7, 2, (2, 5))]:
        theirs = np.asarray(jax_functions._get_window_mask(T, S, window))[0, 0]
        np.testing.assert_array_equal(band_mask(0, T, S, window=window), theirs)


def test_window_edge_values(rng):
    spec = impls.AttentionSpec(num_heads=2, key_dim=4)
    w = impls.Weights.random(spec, 8, 8, seed=4)
    x = rng.normal(size=(2, 6, 8))
    plain, _ = oracle.forward(spec, w, x, x)
    np.testing.assert_array_equal(oracle.forward(spec, w, x, x, window=(None, None))[0], plain)
    np.testing.assert_array_equal(oracle.forward(spec, w, x, x, window=(6, 6))[0], plain)  # covers every key
    np.testing.assert_array_equal(oracle.forward(spec, w, x, x, window=(2, 0))[0],
                                  oracle.forward(spec, w, x, x, window=(2, 0), causal=True)[0])
    _, diagonal = oracle.forward(spec, w, x, x, window=(0, 0))
    np.testing.assert_array_equal(diagonal[0, 0], np.eye(6))


# -- additive bias
def test_bias_shifting_a_whole_row_changes_nothing(rng):
    spec = impls.AttentionSpec(num_heads=2, key_dim=4)
    w = impls.Weights.random(spec, 8, 8, seed=5)
    q, v = rng.normal(size=(2, 4, 8)), rng.normal(size=(2, 6, 8))
    plain, _ = oracle.forward(spec, w, q, v)
    row_constant = np.broadcast_to(rng.normal(size=(2, 1, 4, 1)) * 5, (2, 1, 4, 6))
    np.testing.assert_allclose(oracle.forward(spec, w, q, v, bias=row_constant)[0], plain, rtol=1e-12, atol=1e-13)
    np.testing.assert_array_equal(oracle.forward(spec, w, q, v, bias=np.zeros((4, 6)))[0], plain)
    per_key = rng.normal(size=(6,)) * 3  # a bias varying along keys does change the result
    assert not np.allclose(oracle.forward(spec, w, q, v, bias=np.broadcast_to(per_key, (4, 6)))[0], plain)


def test_bias_is_added_after_scaling(rng):
    """One head, identity projections: weights = softmax(q.k / sqrt(d) + bias)."""
    spec = impls.AttentionSpec(num_heads=1, key_dim=2, use_bias=False)
    eye = np.eye(2).reshape(2, 1, 2)
    w = impls.Weights(Wq=eye, Wk=eye, Wv=eye, Wo=np.eye(2).reshape(1, 2, 2))
    q, v = np.array([[[1.0, 0.0]]]), np.array([[[1.0, 0.0], [0.0, 1.0]]])
    _, scores = oracle.forward(spec, w, q, v, bias=np.array([[0.25, -0.5]]))
    logits = np.array([1 / math.sqrt(2) + 0.25, 0.0 - 0.5])
    np.testing.assert_allclose(scores[0, 0, 0], np.exp(logits) / np.exp(logits).sum(), rtol=1e-15)


def test_neg_inf_bias_is_a_mask_and_masked_positions_ignore_the_bias(rng):
    spec = impls.AttentionSpec(num_heads=2, key_dim=4)
    w = impls.Weights.random(spec, 8, 8, seed=6)
    q, v = rng.normal(size=(2, 4, 8)), rng.normal(size=(2, 6, 8))
    mask = rng.random((2, 4, 6)) < 0.6
    mask[..., 0] = True
    mask[0, 2] = False  # a fully masked row
    bias = rng.normal(size=(2, 4, 6))
    as_mask, _ = oracle.forward(spec, w, q, v, mask=mask, bias=bias)
    neg_inf = np.where(mask, bias, -np.inf)
    as_bias, scores = oracle.forward(spec, w, q, v, bias=neg_inf)
    np.testing.assert_array_equal(as_bias, as_mask)
    np.testing.assert_array_equal(as_bias[0, 2], w.bo)  # every position -inf: fully masked, zeros policy
    for poison in (np.nan, np.inf, -np.inf):  # whatever sits at a masked position is never read
        dirty = np.where(mask, bias, poison)
        np.testing.assert_array_equal(oracle.forward(spec, w, q, v, mask=mask, bias=dirty)[0], as_mask)


def test_nan_or_inf_bias_at_an_allowed_position_makes_its_row_nan(rng):
    spec = impls.AttentionSpec(num_heads=1, key_dim=4)
    w = impls.Weights.random(spec, 8, 8, seed=6)
    q, v = rng.normal(size=(1, 3, 8)), rng.normal(size=(1, 5, 8))
    for poison in (np.nan, np.inf):
        bias = np.zeros((3, 5))
        bias[1, 2] = poison
        out, scores = oracle.forward(spec, w, q, v, bias=bias)
        assert np.all(np.isnan(out[0, 1])) and np.all(np.isnan(scores[0, 0, 1]))
        assert np.all(np.isfinite(out[0, [0, 2]]))


def test_bias_reads_like_a_mask_from_the_left(rng):
    """Scores [B=3, F=3, H, T, S] and a bias [3, T, S]: the 3 is the batch (Keras's rule), not F."""
    spec = impls.AttentionSpec(num_heads=2, key_dim=4, attention_axes=(2,))
    w = impls.Weights.random(spec, 8, 8, seed=5)
    q, v = rng.normal(size=(3, 3, 4, 8)), rng.normal(size=(3, 3, 2, 8))
    bias = rng.normal(size=(3, 4, 2)) * 3
    out, _ = oracle.forward(spec, w, q, v, bias=bias)
    np.testing.assert_array_equal(out, oracle.forward(spec, w, q, v, bias=bias[:, None, None])[0])
    assert not np.allclose(out, oracle.forward(spec, w, q, v, bias=bias[None, :, None])[0])


# -- lengths
def test_key_value_lengths_are_a_padding_mask_and_query_lengths_give_the_output_bias(rng):
    spec = impls.AttentionSpec(num_heads=2, key_dim=4)
    w = impls.Weights.random(spec, 8, 8, seed=8)
    q, v = rng.normal(size=(3, 4, 8)), rng.normal(size=(3, 6, 8))
    kv_lengths, q_lengths = np.array([6, 1, 3]), np.array([4, 2, 0])
    padding = np.arange(6)[None, None, :] < kv_lengths[:, None, None]  # [B, 1, S]
    by_lengths, scores = oracle.forward(spec, w, q, v, key_value_lengths=kv_lengths, query_lengths=q_lengths)
    by_mask, _ = oracle.forward(spec, w, q, v, mask=padding)
    for b, n in enumerate(q_lengths):
        np.testing.assert_array_equal(by_lengths[b, :n], by_mask[b, :n])
        np.testing.assert_array_equal(by_lengths[b, n:], np.broadcast_to(w.bo, (4 - n, 8)))
        np.testing.assert_array_equal(scores[b, :, n:], 0.0)
    full, _ = oracle.forward(spec, w, q, v, key_value_lengths=[6, 6, 6], query_lengths=np.array([4, 4, 4], np.int8))
    np.testing.assert_array_equal(full, oracle.forward(spec, w, q, v)[0])


def test_lengths_count_flattened_positions_and_broadcast_over_free_axes(rng):
    spec = impls.AttentionSpec(num_heads=2, key_dim=4, attention_axes=(1, 2))
    w = impls.Weights.random(spec, 8, 8, seed=9)
    q, v = rng.normal(size=(2, 2, 3, 8)), rng.normal(size=(2, 3, 2, 8))
    kv_lengths = np.array([5, 2])
    padding = (np.arange(6) < kv_lengths[:, None]).reshape(2, 1, 1, 3, 2)  # [B, 1, 1, *K]
    np.testing.assert_array_equal(oracle.forward(spec, w, q, v, key_value_lengths=kv_lengths)[0],
                                  oracle.forward(spec, w, q, v, mask=padding)[0])
    free = impls.AttentionSpec(num_heads=2, key_dim=4, attention_axes=(2,))
    q, v = rng.normal(size=(2, 3, 4, 8)), rng.normal(size=(2, 3, 5, 8))
    padding = np.arange(5)[None, None, None, :] < kv_lengths[:, None, None, None]  # [B, 1, 1, S]: every F
    np.testing.assert_array_equal(oracle.forward(free, w, q, v, key_value_lengths=kv_lengths)[0],
                                  oracle.forward(free, w, q, v, mask=padding)[0])


# -- key/value length S = 0 (issue 13, section 6)
@pytest.mark.parametrize("policy", ["zeros", "uniform", "nan", "unmasked"])
@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_key_value_length_zero_outputs_the_output_bias(policy, dtype, rng):
    """Every row is fully masked: its weight vector is empty whatever the policy, the sum over no values
    is 0, so the output is bo (rounded to the dtype); scores have shape [..., 0]."""
    spec = impls.AttentionSpec(num_heads=2, key_dim=4, output_shape=(2, 3))
    w = impls.Weights.random(spec, 8, 8, seed=10)
    q = rng.normal(size=(2, 3, 8))
    out, scores = oracle.forward(spec, w, q, np.zeros((2, 0, 8)), mask=np.ones((3, 0), bool), causal=True,
                                 fully_masked=policy, dtype=dtype)
    assert scores.shape == (2, 2, 3, 0) and out.shape == (2, 3, 2, 3)
    bo = w.bo.astype(np.float16).astype(np.float64) if dtype == "float16" else w.bo
    np.testing.assert_array_equal(out, np.broadcast_to(bo, out.shape))
    blocked, _ = oracle.forward(spec, w, q, np.zeros((2, 0, 8)), return_scores=False, block_size=2,
                                fully_masked=policy, dtype=dtype)
    np.testing.assert_array_equal(blocked, out)


# ---- speed: the parallel, piecewise softmax computes exactly what the whole-array one does --------------
@pytest.mark.parametrize("policy", ["zeros", "uniform", "nan", "unmasked"])
def test_piecewise_parallel_softmax_is_bit_identical(policy, monkeypatch):
    rng = np.random.default_rng(11)
    scores = rng.normal(size=(2, 3, 40, 700)) * 4
    allowed = rng.random((2, 1, 40, 700)) < 0.5
    allowed[0, 0, 3] = False  # a fully masked row
    allowed = oracle.effective_allowed(allowed, policy)
    whole = scores.copy()
    oracle._softmax_rows(whole, allowed, policy)
    monkeypatch.setattr(oracle, "_PARALLEL_MIN_ELEMENTS", 1)
    monkeypatch.setattr(oracle, "_PIECE_ELEMENTS", 1500)  # two rows a piece, over every worker
    monkeypatch.setattr(oracle, "_workers", lambda: 3)
    pieces = scores.copy()
    oracle._softmax_inplace(pieces, allowed, policy)
    np.testing.assert_array_equal(pieces, whole)
    spec = impls.AttentionSpec(num_heads=3, key_dim=4)
    w = impls.Weights.random(spec, 8, 8, seed=1)
    q, v = rng.normal(size=(2, 40, 8)), rng.normal(size=(2, 70, 8))
    mask = rng.random((2, 40, 70)) < 0.6
    got = oracle.forward(spec, w, q, v, mask=mask, causal="bottom_right", fully_masked=policy)
    monkeypatch.setattr(oracle, "_PARALLEL_MIN_ELEMENTS", 1 << 40)
    want = oracle.forward(spec, w, q, v, mask=mask, causal="bottom_right", fully_masked=policy)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
