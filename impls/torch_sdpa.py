"""PyTorch: projections in torch, attention core in ``F.scaled_dot_product_attention``.

Every canonical feature is expressed: multi-axis attention by flattening the
attended axes into one sequence (non-attended axes into the batch), masks as
SDPA's boolean ``attn_mask`` (True = take part, the same polarity as ours) in
the form a torch user writes it: ``[T, S]`` when one mask serves every batch
and head, else ``[N, 1 or H, T or 1, S]``, broadcast by SDPA itself;
causal-only calls through ``is_causal=True`` (top-left aligned, as ours); SDPA
takes either is_causal or a mask, so causal with a mask is folded into it.
The attention scores are computed explicitly, only when asked for.
"""
from __future__ import annotations

import math

from . import _torch
from .base import Capabilities


class TorchSDPALayer(_torch.TorchLayer):
    def __init__(self, adapter, spec, weights, dtype, device, mode="eager", **options):
        super().__init__(adapter, spec, weights, dtype, device, mode, **options)
        self.params = {k: self._tensor(v) for k, v in weights.as_dict().items()}
        self._core = self._attention if mode == "eager" else self.torch.compile(self._attention, dynamic=False)

    def _mask(self, call):
        if call.mask is None:  # causal alone goes through is_causal
            return None
        mask = call.flat_mask(with_causal=call.causal)
        return _torch.bool_tensor(self.torch, mask[0, 0] if mask.shape[:2] == (1, 1) else mask, self.device)

    def _project(self, call, x, W, b):
        y = self.torch.einsum("nld,dhk->nhlk", self._flat(call, x), W)
        return y if b is None else y + b[None, :, None, :]

    def _attention(self, query, value, key, mask, causal: bool, p: dict, dropout_p: float, call):
        torch, F = self.torch, self.torch.nn.functional
        q = self._project(call, query, p["Wq"], p.get("bq"))
        k = self._project(call, key, p["Wk"], p.get("bk"))
        v = self._project(call, value, p["Wv"], p.get("bv"))
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                           is_causal=causal and mask is None, scale=1.0 / math.sqrt(self.spec.key_dim))
        o = self._unflat(call, o.transpose(1, 2))  # [B, *Q, H, vd]
        H, vd = self.spec.num_heads, self.spec.value_head_dim
        out = torch.einsum("...hv,hvo->...o", o, p["Wo"].reshape(H, vd, -1))
        if "bo" in p:
            out = out + p["bo"].reshape(-1)
        return out.reshape(tuple(call.output_shape)), (q, k)

    def _compute(self, inputs, params, dropout_p=0.0):
        call = inputs["call"]
        return self._core(inputs["query"], inputs["value"], inputs["key"], inputs["mask"], call.causal, params,
                          dropout_p, call)[0]

    def _run(self, inputs, return_scores, training, seed):
        torch, call = self.torch, inputs["call"]
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            out, _ = self._core(inputs["query"], inputs["value"], inputs["key"], inputs["mask"], call.causal,
                                self.params, self.spec.dropout if training else 0.0, call)
        return out, None

    def export_weights(self):
        from .spec import Weights
        return Weights(**{k: _torch.to_numpy(v).astype("float64") for k, v in self.params.items()})


class TorchSDPAAdapter(_torch.TorchAdapter):
    name = "torch_sdpa"
    framework = "PyTorch"
    description = "torch.einsum projections + torch.nn.functional.scaled_dot_product_attention"
    layer_class = TorchSDPALayer
    # SDPA's flash kernels (CPU and CUDA) visit only the key blocks at or below the diagonal under is_causal,
    # and never hold a [T, S] score matrix
    causal_skips_masked_blocks = True
    score_buffers = 0

    def capabilities(self):
        return Capabilities(
            unsupported_features={"scores": "F.scaled_dot_product_attention returns the output only; the weights "
                                            "its kernel used are never exposed"},
            devices=("cpu", "cuda"), modes=("eager", "compiled"))
