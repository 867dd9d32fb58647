"""PyTorch: projections in torch, attention core in ``F.scaled_dot_product_attention``.

Every canonical feature is expressed: multi-axis attention by flattening the
attended axes into one sequence (non-attended axes into the batch), masks as
SDPA's boolean ``attn_mask`` (True = take part, the same polarity as ours),
causal-only calls through ``is_causal=True`` (top-left aligned, as ours).
The attention scores are computed explicitly, only when asked for.
"""
from __future__ import annotations

import math

import numpy as np

from . import _torch
from .base import Adapter, Capabilities, Layer
from .spec import Weights


class TorchSDPALayer(Layer):
    def __init__(self, adapter, spec, weights, dtype, device, mode="eager", **options):
        super().__init__(adapter, spec, weights, dtype, device, mode, **options)
        import torch
        self.torch = torch
        self.params = {k: _torch.tensor(torch, v, dtype, device) for k, v in weights.as_dict().items()}
        self._core_fn = self._core if mode == "eager" else torch.compile(self._core, dynamic=False)

    # The computation, on torch tensors. ``allowed`` is [N, 1|H, T, S] bool or None.
    def _core(self, query, value, key, allowed, causal: bool, p: dict, dropout_p: float, call):
        torch, F = self.torch, self.torch.nn.functional
        kd = self.spec.key_dim

        def project(x, W, b):
            y = torch.einsum("nld,dhk->nhlk", _torch.flatten(call, x), W)
            return y if b is None else y + b[None, :, None, :]

        q = project(query, p["Wq"], p.get("bq"))
        k = project(key, p["Wk"], p.get("bk"))
        v = project(value, p["Wv"], p.get("bv"))
        if allowed is None:
            o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal,
                                               scale=1.0 / math.sqrt(kd))
        else:
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p,
                                               scale=1.0 / math.sqrt(kd))
        o = _torch.unflatten_query(call, o.transpose(1, 2))  # [B, *Q, H, vd]
        H, vd = self.spec.num_heads, self.spec.value_head_dim
        out = torch.einsum("...hv,hvo->...o", o, p["Wo"].reshape(H, vd, -1))
        if "bo" in p:
            out = out + p["bo"].reshape(-1)
        return out.reshape(tuple(call.output_shape)), (q, k)

    def _allowed(self, call):
        # Causal alone goes through is_causal (the fused path); with a mask, the two are combined.
        if call.mask is None:
            return None
        return _torch.tensor(self.torch, call.flat_allowed(), "float32", self.device).bool()

    def _inputs(self, call, requires_grad=False):
        t = lambda x: _torch.tensor(self.torch, x, self.dtype, self.device, requires_grad)
        query, value = t(call.query), t(call.value)
        key = t(call.key) if call.key_given else value
        return query, value, key

    def _forward(self, call, return_scores, training, seed):
        torch = self.torch
        if seed is not None:
            torch.manual_seed(seed)
        dropout_p = self.spec.dropout if training else 0.0
        query, value, key = self._inputs(call)
        allowed = self._allowed(call)
        with torch.no_grad():
            out, (q, k) = self._core_fn(query, value, key, allowed, call.causal and allowed is None,
                                        self.params, dropout_p, call)
            scores = None
            if return_scores:
                s = torch.einsum("nhtk,nhsk->nhts", q, k) / math.sqrt(self.spec.key_dim)
                full = call.flat_allowed()
                a = None if full is None else _torch.tensor(torch, full, "float32", self.device).bool()
                scores = _torch.safe_softmax(torch, s, a).reshape(call.scores_shape)
                scores = _torch.to_numpy(scores)
        return _torch.to_numpy(out), scores

    def _gradients(self, call, cotangent):
        torch = self.torch
        query, value, key = self._inputs(call, requires_grad=True)
        params = {k: v.detach().clone().requires_grad_(True) for k, v in self.params.items()}
        out, _ = self._core(query, value, key, self._allowed(call), call.causal and call.mask is None,
                            params, 0.0, call)
        out.backward(_torch.tensor(torch, cotangent, self.dtype, self.device))
        grads = {"query": query.grad, "value": value.grad}
        if call.key_given:
            grads["key"] = key.grad
        grads.update({k: v.grad for k, v in params.items()})
        return {k: _torch.to_numpy(v).astype(np.float64) for k, v in grads.items()}

    def export_weights(self) -> Weights:
        return Weights(**{k: _torch.to_numpy(v).astype(np.float64) for k, v in self.params.items()})

    # ---- native path ---------------------------------------------------------
    def native_inputs(self, query, value, key=None, mask=None, causal=False, *, requires_grad=False):
        call = self.validate(query, value, key, mask, causal)
        query, value, key = self._inputs(call, requires_grad)
        allowed = self._allowed(call)
        return dict(query=query, value=value, key=key, allowed=allowed, call=call)

    def native_forward(self, inputs):
        torch = self.torch
        with torch.no_grad():
            call = inputs["call"]
            out, _ = self._core_fn(inputs["query"], inputs["value"], inputs["key"], inputs["allowed"],
                                   call.causal and inputs["allowed"] is None, self.params, 0.0, call)
        _torch.sync(torch, self.device)
        return out

    def native_forward_backward(self, inputs):
        call = inputs["call"]
        if not hasattr(self, "_grad_params"):
            self._grad_params = {k: v.detach().clone().requires_grad_(True) for k, v in self.params.items()}
        out, _ = self._core_fn(inputs["query"], inputs["value"], inputs["key"], inputs["allowed"],
                               call.causal and inputs["allowed"] is None, self._grad_params, 0.0, call)
        out.sum().backward()
        _torch.sync(self.torch, self.device)
        return out


class TorchSDPAAdapter(Adapter):
    name = "torch_sdpa"
    framework = "PyTorch"
    requires = ("torch",)
    distributions = ("torch",)
    install_hint = 'pip install torch==2.13.0 "mhabench[torch]"'
    description = "torch.einsum projections + torch.nn.functional.scaled_dot_product_attention"
    layer_class = TorchSDPALayer

    def capabilities(self):
        return Capabilities(devices=("cpu", "cuda"), modes=("eager", "compiled"))

    def available_devices(self):
        return _torch.available_devices()
