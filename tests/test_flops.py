"""FLOP formulas of the benchmarks, against counts worked out by hand."""
import pytest

from mhabench import impls
from mhabench.benchmarks import flops


def test_projections_by_hand():
    # B=2, T=3, S=5, D=4, H=2, k=3: Q 2*2*3*4*6=288, K 2*2*5*4*6=480, V 480, O 2*2*3*6*4=288
    assert flops.projection_flops(2, 3, 5, 4, 2, 3) == 288 + 480 + 480 + 288


def test_core_by_hand():
    # 2*B*H*T*S*(k + v) = 2*2*2*3*5*(3+3) = 720, i.e. 4*B*H*T*S*k
    assert flops.core_flops(2, 3, 5, 2, 3) == 720 == 4 * 2 * 2 * 3 * 5 * 3
    assert flops.core_flops(2, 3, 5, 2, 3, value_dim=1) == 2 * 2 * 2 * 3 * 5 * 4
    assert flops.core_flops(2, 3, 5, 2, 3, causal_skipped=True) == 360


def test_attention_at_4096_heads_8():
    # B=1, L=4096, D=512, H=8, k=64: projections 4 * 2*4096*512*512, core 4*8*4096^2*64
    proj = 4 * 2 * 4096 * 512 * 512
    core = 4 * 8 * 4096 * 4096 * 64
    assert flops.attention_flops(1, 4096, 4096, 512, 8, 64) == proj + core == 42_949_672_960
    assert flops.attention_flops(1, 4096, 4096, 512, 8, 64, backward=True) == 3 * proj + 3.5 * core


@pytest.mark.parametrize("adapter, halved", [("torch_sdpa", True), ("numpy_oracle", False), ("jax_dpa", False),
                                             ("keras_mha@jax", False), ("torch_mha", False)])
def test_causal_halves_the_core_only_where_the_kernel_skips(adapter, halved):
    skips = impls.get_adapter(adapter).causal_skips_masked_blocks
    full = flops.attention_flops(1, 64, 64, 32, 4, 8, skips_masked_blocks=skips)
    causal = flops.attention_flops(1, 64, 64, 32, 4, 8, causal=True, skips_masked_blocks=skips)
    core = flops.core_flops(1, 64, 64, 4, 8)
    assert full - causal == (core / 2 if halved else 0)


def test_gemm():
    from mhabench.benchmarks import peak
    assert peak.gemm_flops(1000) == 2e9
