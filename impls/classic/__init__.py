"""Classic from-scratch attention layers, written the way textbooks and tutorials teach them,
wrapped as adapters: worked examples of bringing your own implementation to mhabench.

``keras_textbook``: a Keras subclassed layer (separate Dense wq/wk/wv, split_heads, an
additive ``mask * -1e9``). ``torch_textbook``: an ``nn.Module`` with one fused
``qkv_proj`` whose output is interleaved per head. Neither module imports its
framework until a layer is built.

The textbook layers see one sequence axis; the adapters flatten the attended
axes into it and the non-attended axes into the batch (a reshape that does not
change what is computed), with the helpers below.
"""
from __future__ import annotations

import numpy as np

from ..oracle import _flat_inputs as flatten  # [B, *A, D] -> [prod(batch axes), prod(attended axes), D]
from ..validation import Call, flatten_perm, inverse_perm


def unflatten(call: Call, x: np.ndarray, like_shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of :func:`flatten` for an input of shape ``like_shape`` (the last axis may differ)."""
    perm = flatten_perm(call)[:-1]
    permuted = tuple(like_shape[a] for a in perm)
    x = np.asarray(x).reshape(permuted + tuple(x.shape[2:]))
    inv = inverse_perm(perm)
    return np.transpose(x, inv + tuple(range(len(inv), x.ndim)))
