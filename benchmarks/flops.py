"""FLOPs of multi-head attention from the shapes (multiply-adds count 2).

Forward: the four projections plus the attention core
``2*B*H*T*S*key_dim`` (scores) + ``2*B*H*T*S*value_dim`` (weighted sum).
Softmax, bias and scaling are not counted (they are O(T*S), not O(T*S*k)).

Causal: the core is halved only for an adapter whose kernel skips the
masked blocks (it declares ``causal_skips_masked_blocks``); one that computes
the full score matrix and masks it does the full work, so its useful-work rate
is not flattered.

Backward: 2x the forward for the projections (input and weight gradients),
2.5x for the core (the FlashAttention convention: five matmuls against two,
counting the recomputation of the scores).
"""
from __future__ import annotations

BACKWARD_PROJECTION_FACTOR = 2.0
BACKWARD_CORE_FACTOR = 2.5


def projection_flops(batch: int, q_len: int, kv_len: int, model_dim: int, num_heads: int,
                     key_dim: int, value_dim: int | None = None, out_dim: int | None = None) -> float:
    value_dim = key_dim if value_dim is None else value_dim
    out_dim = model_dim if out_dim is None else out_dim
    q = 2.0 * batch * q_len * model_dim * num_heads * key_dim
    k = 2.0 * batch * kv_len * model_dim * num_heads * key_dim
    v = 2.0 * batch * kv_len * model_dim * num_heads * value_dim
    o = 2.0 * batch * q_len * num_heads * value_dim * out_dim
    return q + k + v + o


def core_flops(batch: int, q_len: int, kv_len: int, num_heads: int, key_dim: int,
               value_dim: int | None = None, causal_skipped: bool = False) -> float:
    value_dim = key_dim if value_dim is None else value_dim
    flops = 2.0 * batch * num_heads * q_len * kv_len * (key_dim + value_dim)
    return flops / 2 if causal_skipped else flops


def attention_flops(batch: int, q_len: int, kv_len: int, model_dim: int, num_heads: int, key_dim: int,
                    value_dim: int | None = None, *, causal: bool = False, skips_masked_blocks: bool = False,
                    backward: bool = False) -> float:
    """FLOPs of one forward call, or of forward + backward when ``backward``. ``skips_masked_blocks``: the
    kernel's declared ``causal_skips_masked_blocks`` (only then does causal halve the core)."""
    skipped = causal and skips_masked_blocks
    proj = projection_flops(batch, q_len, kv_len, model_dim, num_heads, key_dim, value_dim)
    core = core_flops(batch, q_len, kv_len, num_heads, key_dim, value_dim, skipped)
    if backward:
        return proj * (1 + BACKWARD_PROJECTION_FACTOR) + core * (1 + BACKWARD_CORE_FACTOR)
    return proj + core

