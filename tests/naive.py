"""A deliberately naive loop implementation of the canonical semantics, to check the oracle.

Written independently of impls.oracle: explicit loops over every batch
position, head, query position and key position, and no flattening tricks.
"""
from __future__ import annotations

import itertools
import math

import numpy as np


def naive_attention(spec, w, query, value, key=None, mask=None, causal=False, fully_masked="zeros"):
    key = value if key is None else key
    rank = query.ndim
    axes = spec.resolve_axes(rank)
    other = [a for a in range(1, rank - 1) if a not in axes]
    H, kd = spec.num_heads, spec.key_dim
    out_dims = spec.out_shape(query.shape[-1])
    bias = lambda b: 0.0 if b is None else b
    q = np.einsum("...d,dhk->...hk", query, w.Wq) + bias(w.bq)
    k = np.einsum("...d,dhk->...hk", key, w.Wk) + bias(w.bk)
    v = np.einsum("...d,dhv->...hv", value, w.Wv) + bias(w.bv)
    q_att = [query.shape[a] for a in axes]
    k_att = [key.shape[a] for a in axes]
    combined = np.empty(query.shape[:-1] + (H, v.shape[-1]))
    scores_shape = [query.shape[0]] + [query.shape[a] for a in other] + [H] + q_att + k_att
    scores = np.zeros(scores_shape)

    def mask_at(lead_index, qp, kp):
        """Keras's reading: the mask's last 2n axes are the attended query then key positions; its
        leading axes are the first ones of (batch, *non-attended, head); size-1 axes broadcast."""
        n_lead = mask.ndim - 2 * len(axes)
        index = tuple(lead_index[:n_lead]) + tuple(qp) + tuple(kp)
        return bool(mask[tuple(0 if size == 1 else i for i, size in zip(index, mask.shape))])
    for b in range(query.shape[0]):
        for rest in itertools.product(*[range(query.shape[a]) for a in other]):
            for h in range(H):
                q_positions = list(itertools.product(*[range(n) for n in q_att]))
                k_positions = list(itertools.product(*[range(n) for n in k_att]))
                for i, qp in enumerate(q_positions):
                    qi = [0] * (rank - 1)
                    qi[0] = b
                    for a, r in zip(other, rest):
                        qi[a] = r
                    for a, p in zip(axes, qp):
                        qi[a] = p
                    logits, allowed, values = [], [], []
                    for j, kp in enumerate(k_positions):
                        ki = list(qi)
                        for a, p in zip(axes, kp):
                            ki[a] = p
                        logits.append(float(np.dot(q[tuple(qi)][h], k[tuple(ki)][h])) / math.sqrt(kd))
                        ok = True if mask is None else mask_at((b, *rest, h), qp, kp)
                        if causal and j > i:
                            ok = False
                        allowed.append(ok)
                        values.append(v[tuple(ki)][h])
                    if fully_masked == "unmasked" and not any(allowed):
                        allowed = [True] * len(allowed)
                    if any(allowed):
                        m = max(l for l, ok in zip(logits, allowed) if ok)
                        e = [math.exp(l - m) if ok else 0.0 for l, ok in zip(logits, allowed)]
                        weights = [x / sum(e) for x in e]
                    else:
                        fill = {"zeros": 0.0, "uniform": 1.0 / len(logits), "nan": float("nan")}[fully_masked]
                        weights = [fill] * len(logits)
                    for j, kp in enumerate(k_positions):
                        scores[(b, *rest, h, *qp, *kp)] = weights[j]
                    combined[tuple(qi) + (h,)] = sum(wt * val for wt, val, ok in zip(weights, values, allowed)
                                                      if ok or not any(allowed) and fully_masked != "zeros")
    out = np.einsum("...hv,hvo->...o", combined, w.Wo.reshape(H, combined.shape[-1], -1))
    out = out + (0.0 if w.bo is None else w.bo.reshape(-1))
    return out.reshape(query.shape[:-1] + tuple(out_dims)), scores
