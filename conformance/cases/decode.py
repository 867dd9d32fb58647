"""Inference attention: the area ``decode``. A decoder step against a key/value cache: T = 1 new query (or T = 4,
speculative decoding) per sequence against S up to 4096 keys, each sequence at its own position (``query_offset``:
the past length, different within a batch, from 0 to S - T), the cache's valid length as key/value lengths (the
``cache`` kind: past + T; the rest of the buffer is padding), grouped-query (8 query heads over 2 key/value heads),
multi-query (8 over 1) and classic heads; the soft cap, the logit scale and a sliding window, alone and together;
forward and gradients.

A batch at one shared position (an internal cache, ONNX's ``past_key``) and ``causal="bottom_right"`` are here
too, since frameworks take them through other arguments than per-sequence positions.
"""
from __future__ import annotations

from .case import Case, spec

GQA = spec(8, 4, num_kv_heads=2)   # Llama-style grouping: query head h reads key/value head h // 4
MQA = spec(8, 4, num_kv_heads=1)
MHA = spec(4, 4)
WIDTH = {8: 32, 4: 16}             # input widths num_heads * key_dim: no head_width feature in the way


def _past(S: int, T: int) -> tuple[int, int, int]:
    """Three sequences' past lengths: an empty cache, one mid-way, and a full one (S - T: the T new tokens end the
    buffer)."""
    return (0, (S - T) * 3 // 8, S - T)


def cases() -> list[Case]:
    def c(id, S, T=1, heads=GQA, past="differing", lengths="cache", causal=True, **kw):
        """A decode case; ``past``: the sequences' past lengths (``"differing"``: :func:`_past`), one int for the
        whole batch, or None (no positions: ``causal`` says the alignment)."""
        width = WIDTH[heads["num_heads"]]
        past = _past(S, T) if past == "differing" else past
        return Case(id=f"decode-{id}", area="decode", spec=heads, batch=len(past) if isinstance(past, tuple) else 2,
                    q_shape=(T,), k_shape=(S,), query_dim=width, key_dim=width, value_dim=width, key_distinct=True,
                    causal=causal, query_offset=past, lengths=lengths, **kw)
    return [
        # one query per sequence, each at its own past length, against a long cache
        c("T1_S4096-gqa8_2-cache", 4096, quick=True),
        c("T1_S512-mqa8_1-cache", 512, heads=MQA),
        c("T1_S512-mha4-cache", 512, heads=MHA, quick=True),
        c("T1_S4096-mha4-cache", 4096, heads=MHA),
        # speculative decoding: four queries per sequence, each row one position further
        c("T4_S4096-gqa8_2-cache", 4096, T=4),
        c("T4_S512-mqa8_1-cache", 512, T=4, heads=MQA),
        c("T4_S512-mha4-cache", 512, T=4, heads=MHA),
        # the soft cap, the logit scale and a sliding window, each alone
        c("T1_S1024-gqa8_2-cache-softcap", 1024, softcap=2.0, quick=True),
        c("T1_S1024-gqa8_2-cache-scale", 1024, logit_scale=0.3),
        c("T4_S1024-gqa8_2-cache-window_255_0", 1024, T=4, window=(255, 0)),
        c("T4_S1024-mha4-cache-softcap", 1024, T=4, heads=MHA, softcap=2.0),
        c("T1_S1024-mha4-cache-scale", 1024, heads=MHA, logit_scale=0.3),
        # a window without causal: both sides measured from each sequence's position, cut by the cache's length
        c("T4_S512-gqa8_2-cache-window_16_16-not_causal", 512, T=4, window=(16, 16), causal=False),
        # together
        c("T4_S4096-gqa8_2-cache-softcap-scale-window_1023_0", 4096, T=4, softcap=2.0, logit_scale=0.3,
          window=(1023, 0)),
        c("T4_S1024-mqa8_1-cache-softcap-scale-window_63_0", 1024, T=4, heads=MQA, softcap=1.0, logit_scale=0.5,
          window=(63, 0)),
        c("T1_S512-mha4-cache-softcap-scale-window_31_0", 512, heads=MHA, softcap=1.0, logit_scale=0.5,
          window=(31, 0)),
        # one position shared by the batch (an internal cache), and its bottom-right spelling
        c("T1_S1024-gqa8_2-shared_past", 1024, past=1023, lengths=None),
        c("T4_S1024-gqa8_2-shared_past-softcap", 1024, T=4, past=600, lengths=None, softcap=2.0),
        c("T4_S1024-gqa8_2-bottom_right", 1024, T=4, past=None, lengths=None, causal="bottom_right"),
        # padding given by a mask instead of the cache's lengths
        c("T1_S512-gqa8_2-mask_padding", 512, lengths=None, mask="padding"),
    ]
