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
