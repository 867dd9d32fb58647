"""torch_flex (FlexAttention) against the oracle, what it refuses, and the Inductor bug that keeps the calls
reading a tensor on static shapes. Compiling costs 5-30 s on a small CPU: the compiled tests are marked slow
and share shapes; the eager path (float64) is cheap."""
from __future__ import annotations

import numpy as np
import pytest

from mhabench import impls
from mhabench.impls import oracle
from tests.feature_cases import CASES, FULLY_MASKED, MODERN_CASES, FeatureCase, modern_forward_errors, modern_support

torch = pytest.importorskip("torch")
pytest.importorskip("torch.nn.attention.flex_attention")

ADAPTER = impls.get_adapter("torch_flex")
BY_ID = {c.id: c for c in CASES}


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-30))


@pytest.mark.parametrize("case_id", ["kv_widths", "value_dim", "output_tuple", "axes_2_4d", "mask_TS", "mask_padding",
                                     "mask_per_head", "causal_cross_T4_S7", "causal_cross_T6_S3",
                                     "axes_23_5d_mask_causal", "everything"])
def test_flex_eager_float64_matches_the_oracle(case_id):
    case = BY_ID[case_id]
    w, q, v, k, mask = case.build(seed=1)
    mode = ADAPTER.preferred_mode(case.spec, w, dtype="float64")
    assert mode == "eager"  # compiled float64 is refused on the CPU
    layer = ADAPTER.build(case.spec, w, dtype="float64", mode=mode)
    out, scores = layer(q, v, k, mask, case.causal, return_scores=False)
    assert scores is None and rel_err(out, oracle.forward(case.spec, w, q, v, k, mask, case.causal)[0]) < 1e-12
    assert layer.export_weights().equals(w)


def test_flex_block_mask_reads_the_mask_in_the_layout_a_user_writes():
    spec = impls.AttentionSpec(2, 4)
    layer = ADAPTER.build(spec, impls.Weights.random(spec, 8, 8), dtype="float64", mode="eager")
    x = np.zeros((3, 5, 8))
    block = lambda m, causal=False: layer._native(layer.validate(x, x, mask=m, causal=causal))["mask"]
    assert block(None) is None
    shared = block(np.ones((5, 5), bool), causal=True)             # [T, S]: one block mask for every batch and head
    assert shared.kv_num_blocks.shape[:2] == (1, 1)
    padding = block(np.ones((3, 1, 5), bool))                        # per batch element
    assert padding.kv_num_blocks.shape[:2] == (3, 1)
    per_head = block(np.ones((3, 2, 5, 5), bool))
    assert per_head.kv_num_blocks.shape[:2] == (3, 2)


def test_flex_declares_what_it_refuses_with_the_framework_reason():
    spec = impls.AttentionSpec(2, 4, dropout=0.1)
    w = impls.Weights.random(spec, 8, 8)
    assert "backward on CPU" in ADAPTER.unsupported_reason(spec, w, mode="compiled", gradients=True)
    assert "supported in FlexAttention for CPU" in ADAPTER.unsupported_reason(spec, w, dtype="float64", mode="compiled")
    assert ADAPTER.unsupported_reason(spec, w, dtype="float64", mode="eager") is None
    assert "probabilities" in ADAPTER.unsupported_reason(spec, w, mode="compiled", return_scores=True)
    assert "dropout" in ADAPTER.unsupported_reason(spec, w, mode="compiled", training=True)
    assert ADAPTER.reduced_matrix


def test_flex_cpu_backward_is_refused_by_flex_attention_itself():
    """Keeps the declared gradients reason true."""
    from torch.nn.attention.flex_attention import flex_attention
    q = torch.randn(1, 1, 4, 4, requires_grad=True)
    with pytest.raises(NotImplementedError, match="backward on CPU"):
        flex_attention(q, q, q).sum().backward()


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_flex_compiled_matches_the_oracle(dtype):
    """One shape, four mask layouts (a compile each): masks with causal, a fully masked row (zero weights)."""
    tol = 2e-6 if dtype == "float32" else 3e-2
    spec = FULLY_MASKED.spec
    for mask_kind, causal in (("fully_masked_row", False), ("BTS", True), ("TS", True), ("per_head", False)):
        case = FeatureCase("flex", spec, FULLY_MASKED.query, FULLY_MASKED.value, mask=mask_kind,
                           causal=causal)
        w, q, v, k, mask = case.build(seed=6)
        layer = ADAPTER.build(spec, w, dtype=dtype)
        assert layer.mode == "compiled"
        out, _ = layer(q, v, k, mask, causal, return_scores=False)
        assert rel_err(out, oracle.forward(spec, w, q, v, k, mask, causal)[0]) < tol, (mask_kind, causal)


@pytest.mark.slow
def test_inductor_cpu_flex_fails_on_dynamic_shapes_with_a_captured_mask():
    """Why a call whose mask_mod reads a tensor compiles with dynamic=False. With symbolic sizes, Inductor's CPU
    template renames its split-size symbols in the generated C++ with a plain str.replace, which also rewrites
    every longer size variable the symbol's name is a prefix of (ks4 inside ks45 becomes cur_kvSplitSize5): the
    C++ names an undeclared variable and does not compile. When this test fails, the bug is fixed and every
    call can compile with dynamic=True."""
    import torch._dynamo
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    torch._dynamo.reset()
    compiled = torch.compile(flex_attention, dynamic=True)
    q, k, v = torch.randn(2, 2, 5, 4), torch.randn(2, 2, 6, 4), torch.randn(2, 2, 6, 4)
    M = torch.rand(2, 5, 6) > 0.3
    block = create_block_mask(lambda b, h, qi, kv: M[b, qi, kv], 2, None, 5, 6, device="cpu")
    with pytest.raises(Exception, match=r"cur_(kv|q)SplitSize\d+. was not declared"):
        compiled(q, k, v, block_mask=block)


@pytest.mark.slow
def test_flex_compiles_one_program_for_every_length_of_a_plain_call():
    """A call whose mask_mod reads no tensor and no diagonal runs the dynamic-shape program: the lengths of a
    benchmark sweep share one compile, with the same values as the program compiled for the length alone. A causal
    call compiles per shape (``static_shapes``): with symbolic sizes Inductor's CPU template writes C++ naming an
    undeclared split size for it, and the compile fails."""
    from mhabench.impls import torch_flex
    from torch._dynamo.utils import counters
    import torch._dynamo
    torch._dynamo.reset()
    torch_flex._compiled.clear()
    spec = impls.AttentionSpec(2, 4)
    w = impls.Weights.random(spec, 8, 8, seed=3)
    graphs = []
    for length in (130, 200, 300):  # all past one block of 128 (a single block is a size-1 dimension dynamo specialises)
        x = np.random.default_rng(length).normal(size=(1, length, 8))
        for causal in (False, True):
            out, _ = ADAPTER.build(spec, w, dtype="float32")(x, x, causal=causal, return_scores=False)
            golden, _ = oracle.forward(spec, w, x, x, causal=causal)
            assert rel_err(out, golden) < 2e-6, (length, causal)
        graphs.append(counters["stats"]["unique_graphs"])
    assert set(torch_flex._compiled) == {True, False}  # both programs in use: the plain one dynamic
    assert graphs[-1] - graphs[0] == 2, graphs  # the later lengths compiled only their causal programs


@pytest.mark.slow
def test_flex_compiled_nan_query_row_gets_zero_weights():
    """The cause of torch_flex-cpu_compiled_nan_query_row_zero_weights: compiled on the CPU, a query row whose
    logits are all NaN comes out as the output bias (zero weights); the eager path gives NaN, as canonical."""
    spec = impls.AttentionSpec(2, 4)
    w = impls.Weights.random(spec, 8, 8, seed=2)
    rng = np.random.default_rng(2)
    q, v = rng.normal(size=(2, 8, 8)), rng.normal(size=(2, 8, 8))
    q[0, 1, 0] = np.nan
    compiled, _ = ADAPTER.build(spec, w, dtype="float32")(q, v, return_scores=False)
    eager, _ = ADAPTER.build(spec, w, dtype="float32", mode="eager")(q, v, return_scores=False)
    np.testing.assert_allclose(compiled[0, 1], w.bo, atol=1e-6)
    assert np.isnan(eager[0, 1]).all()


# ---- modern attention: every feature through the block mask, score_mod and enable_gqa ------------------------
MODERN_BY_ID = {c.id: c for c in MODERN_CASES}


@pytest.mark.parametrize("case", MODERN_CASES, ids=lambda c: c.id)
def test_flex_eager_modern_features_match_the_oracle(case):
    """GQA (enable_gqa), bottom-right causal, windows and lengths (mask_mod parts), the bias (score_mod), in
    float64 on the eager path (compiled float64 is refused on the CPU)."""
    reason = modern_support("torch_flex", case, "float64")
    if reason:
        assert "SIGFPE" in reason, reason  # S = 0 only
        pytest.skip(reason)
    errors = modern_forward_errors("torch_flex", case, "float64")
    assert set(errors) == {"output"} and errors["output"] < 1e-12, errors


@pytest.mark.slow
@pytest.mark.parametrize("case_id", ["gqa_cross_causal_mask_value_dim", "window_bottom_right_decode", "bias_neg_inf_row",
                                     "lengths_both_causal_mask", "modern_everything"])
def test_flex_compiled_modern_features_match_the_oracle(case_id):
    errors = modern_forward_errors("torch_flex", MODERN_BY_ID[case_id], "float32")
    assert errors["output"] < 2e-6, errors


def test_flex_takes_positions_in_its_mask_mod_and_the_soft_cap_as_its_score_mod():
    """inference_everything (per-sequence offsets, their cache lengths, a window, GQA, softcap, scale, a bias): the
    block mask holds each sequence's diagonal, the score_mod caps then adds the bias, scale= is passed; nothing is
    emulated, and the eager float64 result is the oracle's."""
    case = MODERN_BY_ID["inference_everything"]
    w, q, v, k, mask = case.build(seed=4)
    layer = ADAPTER.build(case.spec, w, dtype="float64", mode="eager")
    call = layer.validate(q, v, k, mask, case.causal, **case.feature_kwargs(4))
    inputs = layer._native(call)
    from torch.nn.attention.flex_attention import create_mask
    dense = create_mask(inputs["mask"].mask_mod, call.n_flat, 1, call.q_len, call.k_len, device="cpu").numpy()[:, 0]
    np.testing.assert_array_equal(dense, call.flat_allowed(bias=False)[:, 0])
    assert layer.emulations(call) == ()
    import torch
    from mhabench.impls.torch_flex import score_mod
    mod = score_mod(torch.zeros((1, 1, 1, 1), dtype=torch.float64), 1.0)
    assert float(mod(torch.tensor(100.0, dtype=torch.float64), 0, 0, 0, 0)) == pytest.approx(1.0)
    assert modern_forward_errors("torch_flex", case, "float64", mode="eager")["output"] < 1e-12


def test_flex_mask_mod_is_the_and_of_what_a_user_writes():
    """Each restriction of modern_everything (mask, bottom-right causal, window, both lengths) lands in the block
    mask, per flattened batch element, with nothing emulated; the bias is a score_mod."""
    case = MODERN_BY_ID["modern_everything"]
    w, q, v, k, mask = case.build(seed=4)
    layer = ADAPTER.build(case.spec, w, dtype="float64", mode="eager")
    call = layer.validate(q, v, k, mask, case.causal, **case.feature_kwargs(4))
    inputs = layer._native(call)
    from torch.nn.attention.flex_attention import create_mask
    block = inputs["mask"]
    dense = create_mask(block.mask_mod, call.n_flat, 1, call.q_len, call.k_len, device="cpu").numpy()[:, 0]
    np.testing.assert_array_equal(dense, call.flat_allowed(bias=False)[:, 0])
    assert layer.emulations(call) == () and inputs["bias"] is not None


def test_calls_whose_mods_read_more_than_positions_compile_for_their_shape():
    """Symbolic sizes fail in Inductor's CPU template for causal calls (T == S too), per-sequence offsets and the
    soft cap as they do for a mask tensor; a call with none of them keeps the one dynamic program a length sweep
    shares."""
    from mhabench.impls.torch_flex import static_shapes
    spec = impls.AttentionSpec(2, 4)
    layer = ADAPTER.build(spec, impls.Weights.random(spec, 8, 8, seed=1), dtype="float32", mode="eager")
    x6, x3 = np.zeros((2, 6, 8)), np.zeros((2, 3, 8))
    assert static_shapes(layer.validate(x6, x6, causal=True), None)
    assert not static_shapes(layer.validate(x6, x6), None)
    assert static_shapes(layer.validate(x3, x6, causal=True), None)
    assert static_shapes(layer.validate(x3, x6, causal="bottom_right"), None)
    assert static_shapes(layer.validate(x3, x6, causal=True, query_offset=np.array([0, 3])), None)
    assert static_shapes(layer.validate(x6, x6, softcap=5.0), None)


def test_inductor_cache_is_kept_per_cpu_capability(monkeypatch, tmp_path):
    """A program Inductor compiled under AVX-512 and loaded under ATEN_CPU_CAPABILITY=avx2 gives wrong decode
    outputs, so the cache folder depends on the setting; with caching off Inductor's own default folder (shared by
    every process) is not used either. The ISA check asks for the folder first, so it must be set by then."""
    from mhabench.impls import cache
    monkeypatch.setenv(cache.ENV, str(tmp_path))
    monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
    native = cache.torch_environment()["TORCHINDUCTOR_CACHE_DIR"]
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    avx2 = cache.torch_environment()["TORCHINDUCTOR_CACHE_DIR"]
    assert native != avx2 and avx2.endswith("avx2") and native.startswith(str(tmp_path))
    monkeypatch.setenv(cache.ENV, "off")
    assert cache.torch_environment() == {"TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"}
    monkeypatch.setenv(cache.ENV, str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    from mhabench.impls import torch_flex
    torch_flex.use_cache_folder()
    import os
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == avx2
