"""The textbook PyTorch multi-head self-attention module, as an adapter (``classic_torch``).

The module is written the way tutorials teach it: one fused
``qkv_proj = Linear(input_dim, 3 * embed_dim)`` whose output is reshaped to
``[B, L, H, 3 * head_dim]`` and chunked into q, k and v, an output projection
``o_proj``, and an optional mask (1 = keep; ``masked_fill(mask == 0, -1e9)``).

Because of that reshape the fused weight is **interleaved per head**: rows
``h*3*hd : h*3*hd + hd`` are head ``h``'s query, the next ``hd`` its key, the
next ``hd`` its value; ``nn.MultiheadAttention``'s ``in_proj_weight`` is instead
``[all q; all k; all v]``. :func:`canonical_to_fused` gets this right.

It is self-attention only: the module takes one ``x`` and projects it once, so
query = key = value. A call with a separate key, a value that differs from the
query, or different lengths is declared unsupported.

Behaviour kept on purpose (catalogued): a fully masked row gets uniform weights
(every logit is the same ``-1e9``); in float16 ``masked_fill`` refuses ``-1e9``
(it does not fit in float16), so masked float16 calls are declared unsupported.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from .. import _torch
from . import MODERN_REASONS
from ...schema import Refusal
from ..base import Capabilities
from ..spec import Weights
from ..validation import check_dtype
from ..validation import flatten, unflatten

MASK_FILL = -1e9  # the textbook's "minus infinity" for masked logits


@functools.lru_cache(maxsize=None)
def textbook_module_class():
    """The module class (defined on first use: subclassing nn.Module imports torch)."""
    import torch
    from torch import nn

    def scaled_dot_product(q, k, v, mask=None):
        logits = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
        if mask is not None:
            logits = logits.masked_fill(mask == 0, MASK_FILL)
        attention = torch.softmax(logits, dim=-1)
        return torch.matmul(attention, v), attention

    class TextbookMultiheadAttention(nn.Module):
        def __init__(self, input_dim, embed_dim, num_heads, output_dim=None, bias=True):
            super().__init__()
            if embed_dim % num_heads:
                raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
            self.embed_dim, self.num_heads = embed_dim, num_heads
            self.head_dim = embed_dim // num_heads
            self.qkv_proj = nn.Linear(input_dim, 3 * embed_dim, bias=bias)
            self.o_proj = nn.Linear(embed_dim, output_dim or input_dim, bias=bias)

        def forward(self, x, mask=None, return_attention=False):
            batch_size, seq_length, _ = x.shape
            qkv = self.qkv_proj(x)
            qkv = qkv.reshape(batch_size, seq_length, self.num_heads, 3 * self.head_dim)
            qkv = qkv.permute(0, 2, 1, 3)  # [batch, head, seq, 3 * head_dim]
            q, k, v = qkv.chunk(3, dim=-1)
            values, attention = scaled_dot_product(q, k, v, mask=mask)
            values = values.permute(0, 2, 1, 3).reshape(batch_size, seq_length, self.embed_dim)
            out = self.o_proj(values)
            return (out, attention) if return_attention else out

    return TextbookMultiheadAttention


def canonical_to_fused(w: Weights) -> dict[str, np.ndarray]:
    """Canonical weights -> the module's state_dict arrays (float64)."""
    D = w.query_dim
    qkv = np.stack([w.Wq, w.Wk, w.Wv], axis=2)  # [D, H, 3, hd]: per head, q then k then v
    state = {"qkv_proj.weight": qkv.reshape(D, -1).T, "o_proj.weight": w.Wo.reshape(w.Wo.shape[0] * w.Wo.shape[1], -1).T}
    if w.has_bias:
        state["qkv_proj.bias"] = np.stack([w.bq, w.bk, w.bv], axis=1).reshape(-1)
        state["o_proj.bias"] = w.bo.reshape(-1)
    return state


def fused_to_canonical(state: dict[str, np.ndarray], num_heads: int, out_shape: tuple[int, ...]) -> dict:
    """The module's arrays (values or gradients) -> canonical names and layout."""
    H = num_heads
    W = state["qkv_proj.weight"]
    qkv = W.T.reshape(W.shape[1], H, 3, -1)
    out = {"Wq": qkv[:, :, 0], "Wk": qkv[:, :, 1], "Wv": qkv[:, :, 2],
           "Wo": state["o_proj.weight"].T.reshape(H, -1, *out_shape)}
    if "qkv_proj.bias" in state:
        b = state["qkv_proj.bias"].reshape(H, 3, -1)
        out.update({"bq": b[:, 0], "bk": b[:, 1], "bv": b[:, 2], "bo": state["o_proj.bias"].reshape(out_shape)})
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


class ClassicTorchLayer(_torch.TorchLayer):
    def __init__(self, adapter, spec, weights, dtype, device, mode="eager", **options):
        super().__init__(adapter, spec, weights, dtype, device, mode, **options)
        torch = self.torch
        self.out_shape = spec.out_shape(weights.query_dim)
        self.module = textbook_module_class()(
            weights.query_dim, spec.num_heads * spec.key_dim, spec.num_heads, output_dim=math.prod(self.out_shape),
            bias=spec.use_bias).to(device=device, dtype=_torch.torch_dtype(torch, dtype))
        state = {k: torch.from_numpy(np.array(v)) for k, v in canonical_to_fused(weights).items()}
        own = self.module.state_dict()
        self.module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
        self.module.eval()

    def _inputs(self, call, requires_grad=False):
        x = self._tensor(flatten(call, call.query), requires_grad)
        return x, _torch.bool_tensor(self.torch, call.flat_mask(with_causal=True), self.device)  # broadcast by torch

    def _native(self, call, requires_grad=False):
        x, mask = self._inputs(call, requires_grad)
        return {"x": x, "mask": mask, "call": call}

    def _unflat_output(self, call, out):
        return self._unflat(call, out.reshape(tuple(out.shape[:2]) + tuple(self.out_shape)))

    def _output(self, inputs):
        with self.torch.no_grad():
            return self._unflat_output(inputs["call"], self.module(inputs["x"], mask=inputs["mask"]))

    def _run(self, inputs, return_scores, training, seed):
        call = inputs["call"]
        with self.torch.no_grad():
            out, attention = self.module(inputs["x"], mask=inputs["mask"], return_attention=True)
        return self._unflat_output(call, out), (attention.reshape(call.scores_shape) if return_scores else None)

    def _gradients(self, call, cotangent):
        torch = self.torch
        x, mask = self._inputs(call, requires_grad=True)
        projected = []

        def keep_projection(module, inputs, output):  # returns None: the output is left as it is
            output.retain_grad()
            projected.append(output)
        hook = self.module.qkv_proj.register_forward_hook(keep_projection)
        try:
            self.module.zero_grad(set_to_none=True)
            out = self.module(x, mask=mask)
            ct = flatten(call, cotangent.reshape(call.query.shape[:-1] + (-1,))).reshape(out.shape)
            out.backward(_torch.tensor(torch, ct, self.dtype, self.device))
        finally:
            hook.remove()
        params = {n: _torch.to_numpy(p.grad).astype(np.float64) for n, p in self.module.named_parameters()}
        grads = fused_to_canonical(params, self.spec.num_heads, self.out_shape)
        # x feeds the query and the key/value paths at once; the canonical gradients keep them apart.
        # The projection is linear, so each path's share is its slice of d(qkv) times its weight rows.
        H, hd = self.spec.num_heads, self.spec.key_dim
        d_qkv = projected[0].grad.reshape(*projected[0].shape[:2], H, 3, hd).double()
        W = self.module.qkv_proj.weight.detach().double().reshape(H, 3, hd, -1)
        d_query = torch.einsum("nlhj,hjd->nld", d_qkv[:, :, :, 0], W[:, 0])
        d_value = torch.einsum("nlhsj,hsjd->nld", d_qkv[:, :, :, 1:], W[:, 1:])
        for name, g in (("query", d_query), ("value", d_value)):
            grads[name] = unflatten(call, g.cpu().numpy())
        self.module.zero_grad(set_to_none=True)
        return grads

    def export_weights(self) -> Weights:
        state = {k: _torch.to_numpy(v).astype(np.float64) for k, v in self.module.state_dict().items()}
        return Weights(**fused_to_canonical(state, self.spec.num_heads, self.out_shape))


class ClassicTorchAdapter(_torch.TorchAdapter):
    name = "classic_torch"
    framework = "PyTorch"
    description = "the tutorial PyTorch self-attention module: fused per-head-interleaved qkv_proj, masked_fill(-1e9)"
    layer_class = ClassicTorchLayer

    def capabilities(self):
        one_input = "the module projects one input x with a fused qkv_proj, so query = key = value"
        return Capabilities(
            unsupported_features={
                "cross_attention": one_input,
                "separate_key": one_input,
                "key_value_dims": one_input,
                "value_dim": "qkv_proj's output is chunked into three equal parts: q, k and v share head_dim",
                "dropout": "the textbook module has no dropout",
                **MODERN_REASONS,
            },
            devices=("cpu", "cuda"), modes=("eager",))

    def unsupported_reason(self, spec, weights, *, dtype="float32", call=None, **kwargs):
        reason = super().unsupported_reason(spec, weights, dtype=dtype, call=call, **kwargs)
        if reason is None and call is not None:
            if check_dtype(dtype) == "float16" and (call.mask is not None or call.causal):
                reason = Refusal.constraint(f"masked_fill(mask == 0, {MASK_FILL:g}) raises in torch because "
                                            f"{MASK_FILL:g} does not fit in float16 ('value cannot be converted to "
                                            f"type c10::Half without overflow')", subject="a mask in float16")
            elif call.value is not call.query and not np.array_equal(call.value, call.query, equal_nan=True):
                reason = Refusal.constraint(self.capabilities().unsupported_features['separate_key'],
                                            subject="a value different from the query")
        return reason
