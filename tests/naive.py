"""A deliberately naive loop implementation of the canonical semantics, to check the oracle.

Written independently of impls.oracle: explicit loops over every batch
position, head, query position and key position, and no flattening tricks.
Each modern feature is written from its definition, position by position:
query head h reads key/value head h // (H // Hkv); causal top-left j <= i,
bottom-right j <= i + S - T, or at per-sequence positions j <= i + query_offset[b];
the window i + d - left <= j <= i + d + right (d the diagonal's offset); the logit
q . k times scale (default 1/sqrt(key_dim)), then softcap * tanh(logit / softcap);
the bias read by the mask rule and added to that, a -inf bias masking its position;
key j of batch b allowed iff j < key_value_lengths[b], query rows i >= query_lengths[b]
attend nothing.
"""
from __future__ import annotations

import itertools
import math

import numpy as np


def naive_attention(spec, w, query, value, key=None, mask=None, causal=False, fully_masked="zeros", *,
                    window=None, bias=None, query_lengths=None, key_value_lengths=None, query_offset=None,
                    softcap=None, scale=None):
    key = value if key is None else key
    rank = query.ndim
    axes = spec.resolve_axes(rank)
    other = [a for a in range(1, rank - 1) if a not in axes]
    H, kd = spec.num_heads, spec.key_dim
    kv_heads = w.Wk.shape[1]
    out_dims = spec.out_shape(query.shape[-1])
    add_bias = lambda b: 0.0 if b is None else b
    q = np.einsum("...d,dhk->...hk", query, w.Wq) + add_bias(w.bq)
    k = np.einsum("...d,dhk->...hk", key, w.Wk) + add_bias(w.bk)
    v = np.einsum("...d,dhv->...hv", value, w.Wv) + add_bias(w.bv)
    q_att = [query.shape[a] for a in axes]
    k_att = [key.shape[a] for a in axes]
    T, S = math.prod(q_att), math.prod(k_att)
    alignment = {False: None, True: "top_left"}.get(causal, causal) if not isinstance(causal, str) else causal
    if query_offset is None:
        offsets = [S - T if alignment == "bottom_right" else 0] * query.shape[0]
    else:
        offsets = [int(p) for p in np.broadcast_to(query_offset, (query.shape[0],))]
    logit_scale = 1.0 / math.sqrt(kd) if scale is None else scale
    combined = np.empty(query.shape[:-1] + (H, v.shape[-1]))
    scores_shape = [query.shape[0]] + [query.shape[a] for a in other] + [H] + q_att + k_att
    scores = np.zeros(scores_shape)

    def read_at(array, lead_index, qp, kp):
        """Keras's reading: the array's last 2n axes are the attended query then key positions; its
        leading axes are the first ones of (batch, *non-attended, head); size-1 axes broadcast."""
        n_lead = array.ndim - 2 * len(axes)
        index = tuple(lead_index[:n_lead]) + tuple(qp) + tuple(kp)
        return array[tuple(0 if size == 1 else i for i, size in zip(index, array.shape))]
    for b in range(query.shape[0]):
        diagonal = offsets[b]
        for rest in itertools.product(*[range(query.shape[a]) for a in other]):
            for h in range(H):
                g = h // (H // kv_heads)  # the key/value head this query head reads
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
                        logit = float(np.dot(q[tuple(qi)][h], k[tuple(ki)][g])) * logit_scale
                        if softcap is not None:
                            logit = softcap * math.tanh(logit / softcap)
                        ok = True if mask is None else bool(read_at(mask, (b, *rest, h), qp, kp))
                        if bias is not None:
                            extra = float(read_at(bias, (b, *rest, h), qp, kp))
                            logit = logit + extra
                            if extra == -math.inf:
                                ok = False
                        if alignment is not None and j > i + diagonal:
                            ok = False
                        if window is not None:
                            left, right = window
                            if left is not None and j < i + diagonal - left:
                                ok = False
                            if right is not None and j > i + diagonal + right:
                                ok = False
                        if key_value_lengths is not None and j >= key_value_lengths[b]:
                            ok = False
                        if query_lengths is not None and i >= query_lengths[b]:
                            ok = False
                        logits.append(logit)
                        allowed.append(ok)
                        values.append(v[tuple(ki)][g])
                    if fully_masked == "unmasked" and not any(allowed):
                        allowed = [True] * len(allowed)
                    if any(allowed):
                        m = max(l for l, ok in zip(logits, allowed) if ok)
                        if m == -math.inf:  # an unmasked row that is -inf everywhere: 0 / 0
                            m = 0.0
                        e = [(math.exp(l - m) if not math.isnan(l - m) else math.nan) if ok else 0.0
                             for l, ok in zip(logits, allowed)]
                        total = sum(e)
                        weights = [x / total if total != 0 else math.nan for x in e]
                    else:
                        if logits:  # (with no key at all, S = 0, there are no weights to fill)
                            fill = {"zeros": 0.0, "uniform": 1.0 / len(logits), "nan": math.nan}[fully_masked]
                        weights = [fill] * len(logits) if logits else []
                    for j, kp in enumerate(k_positions):
                        scores[(b, *rest, h, *qp, *kp)] = weights[j]
                    read = [(wt, val) for wt, val, ok in zip(weights, values, allowed)
                            if ok or not any(allowed) and fully_masked != "zeros"]
                    combined[tuple(qi) + (h,)] = sum((wt * val for wt, val in read), np.zeros(v.shape[-1]))
    out = np.einsum("...hv,hvo->...o", combined, w.Wo.reshape(H, combined.shape[-1], -1))
    out = out + (0.0 if w.bo is None else w.bo.reshape(-1))
    return out.reshape(query.shape[:-1] + tuple(out_dims)), scores
