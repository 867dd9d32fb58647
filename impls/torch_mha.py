"""PyTorch: ``torch.nn.MultiheadAttention``, its conventions translated here.

* ``batch_first=False`` (the module's default): inputs are ``[L, N, E]``.
* Boolean masks: True means *masked*, ours is inverted. A padding mask (one
  that depends on the batch and the key positions only) is passed as
  ``key_padding_mask [N, S]``, as torch users pass padding; any other mask as
  ``attn_mask``: ``[T, S]`` when one mask serves every batch and head, else
  ``[N * H, T, S]``. Causal is the boolean ``[T, S]`` triangle as ``attn_mask``
  (the module's ``is_causal`` is only a hint that needs that mask anyway), so
  causal is recorded on the row as emulated.
* Modern attention: the additive bias is a float ``attn_mask`` (the module
  adds it to the logits), ``-inf`` where the boolean restrictions mask
  (``bias.masked_fill(mask, -inf)``); key/value lengths become its
  ``key_padding_mask``. The module has no argument for bottom-right causal,
  query positions, a window or query lengths: those go into ``attn_mask``
  (emulated, recorded on the row), as does key padding when another restriction
  needs the mask. It projects key and value with ``num_heads`` heads: no
  grouped-query attention; it scales by 1/sqrt(head_dim) and has no soft cap.
* ``average_attn_weights=False`` so the scores stay per head.
* Weights: ``in_proj_weight [3E, E]`` (or separate ``q/k/v_proj_weight`` when
  the key/value widths differ from E), ``y = x @ W.T + b``; head ``h`` owns
  rows ``h*head_dim:(h+1)*head_dim``.
"""
from __future__ import annotations

import numpy as np

from . import _torch
from .base import Capabilities, emulated
from .spec import Weights


def canonical_to_module(w: Weights) -> dict[str, np.ndarray]:
    """Canonical weights -> the module's state_dict arrays (float64)."""
    E = w.query_dim
    rows = lambda W: W.reshape(W.shape[0], -1).T  # [D, H, k] -> [H*k, D]
    state = {"out_proj.weight": w.Wo.reshape(-1, E).T}
    if w.key_input_dim == E and w.value_input_dim == E:
        state["in_proj_weight"] = np.concatenate([rows(w.Wq), rows(w.Wk), rows(w.Wv)], axis=0)
    else:
        state.update({"q_proj_weight": rows(w.Wq), "k_proj_weight": rows(w.Wk), "v_proj_weight": rows(w.Wv)})
    if w.has_bias:
        state["in_proj_bias"] = np.concatenate([w.bq.reshape(-1), w.bk.reshape(-1), w.bv.reshape(-1)])
        state["out_proj.bias"] = w.bo.reshape(-1)
    return state


def module_to_canonical(state: dict[str, np.ndarray], num_heads: int) -> dict[str, np.ndarray]:
    """The module's arrays (or their gradients) -> canonical names and layout."""
    H = num_heads
    Wout = state["out_proj.weight"]
    E = Wout.shape[0]
    hd = E // H
    cols = lambda M: M.T.reshape(M.shape[1], H, hd)  # [H*k, D] -> [D, H, k]
    if "in_proj_weight" in state:
        Wq, Wk, Wv = np.split(state["in_proj_weight"], 3, axis=0)
    else:
        Wq, Wk, Wv = state["q_proj_weight"], state["k_proj_weight"], state["v_proj_weight"]
    out = {"Wq": cols(Wq), "Wk": cols(Wk), "Wv": cols(Wv), "Wo": Wout.T.reshape(H, hd, E)}
    if "in_proj_bias" in state:
        bq, bk, bv = np.split(state["in_proj_bias"], 3)
        out.update({"bq": bq.reshape(H, hd), "bk": bk.reshape(H, hd), "bv": bv.reshape(H, hd),
                    "bo": state["out_proj.bias"]})
    return out


class TorchMHALayer(_torch.TorchLayer):
    """``module_call(layer)``, when given, stands in for the module in every call (torch_mha@ort's export)."""

    def __init__(self, adapter, spec, weights, dtype, device, mode="eager", batch_first=False, module_call=None,
                 **options):
        super().__init__(adapter, spec, weights, dtype, device, mode, **options)
        torch = self.torch
        self.batch_first = bool(batch_first)
        E = weights.query_dim
        self.module = torch.nn.MultiheadAttention(
            E, spec.num_heads, dropout=spec.dropout, bias=spec.use_bias, kdim=weights.key_input_dim,
            vdim=weights.value_input_dim, batch_first=self.batch_first, device=device,
            dtype=_torch.torch_dtype(torch, dtype))
        state = {k: torch.from_numpy(np.array(v, order="C")) for k, v in canonical_to_module(weights).items()}
        own = self.module.state_dict()
        if set(state) != set(own):  # the module's layout changed under us: say so, never load half
            raise RuntimeError(f"torch_mha: unexpected state_dict keys {sorted(own)}; expected {sorted(state)}")
        self.module.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})
        self.module.eval()
        self.params = dict(self.module.named_parameters())  # the leaves autograd differentiates, in place
        if module_call is not None:
            self._fn = module_call(self)
        else:
            self._fn = self.module if mode == "eager" else torch.compile(self.module, dynamic=False)

    def _mask(self, call):
        """Our may-attend restrictions -> the module's (key_padding_mask [N, S], the attn_mask's may-attend part
        [N|1, H|1, T, S] or None), both boolean; the key padding True = masked, the other ours (True = attend),
        turned into the module's form with the bias in ``_attn_mask``."""
        T, S = call.q_len, call.k_len
        padding_mask = call.is_key_padding()
        padding = call.allowed_block(mask=padding_mask, causal=False, window=False, lengths="key_value", bias=False)
        key_padding = None
        if padding is not None:  # [N|1, 1, 1, S]
            key_padding = _torch.bool_tensor(self.torch, ~np.broadcast_to(padding[:, 0, 0, :], (call.n_flat, S)),
                                             self.device)
        allowed = call.allowed_block(mask=not padding_mask, causal=True, window=True, lengths="query", bias=False)
        return key_padding, None if allowed is None else _torch.bool_tensor(self.torch, allowed, self.device)

    def emulations(self, call):
        return emulated(call, causal=True, window=True, lengths=True)

    def _attn_mask(self, call, allowed, bias):
        """The module's attn_mask: boolean True = masked, or, with a bias, float (the bias, -inf where masked);
        ``[T, S]`` when one serves every batch and head, else ``[N * H, T, S]``."""
        torch, T, S = self.torch, call.q_len, call.k_len
        if allowed is None and bias is None:
            return None
        parts = [x for x in (allowed, bias) if x is not None]
        shape = torch.broadcast_shapes(*(x.shape for x in parts))
        if bias is None:
            mask = ~allowed
        else:
            mask = bias.expand(shape)
            if allowed is not None:
                mask = mask.masked_fill(~allowed, float("-inf"))
        if shape[0] == 1 and shape[1] == 1:
            return mask.expand(1, 1, T, S)[0, 0]
        return mask.expand(call.n_flat, self.spec.num_heads, T, S).reshape(-1, T, S)

    def _call_module(self, inputs, need_weights, fn):
        call = inputs["call"]
        seq = lambda x: self._flat(call, x) if self.batch_first else self._flat(call, x).transpose(0, 1)
        key_padding, allowed = inputs["mask"]
        attn = self._attn_mask(call, allowed, inputs["bias"])
        out, weights = fn(seq(inputs["query"]), seq(inputs["key"]), seq(inputs["value"]), key_padding_mask=key_padding,
                          attn_mask=attn, need_weights=need_weights, average_attn_weights=False)
        if not self.batch_first:
            out = out.transpose(0, 1)
        return self._unflat(call, out), weights

    def _compute(self, inputs, params):
        return self._call_module(inputs, False, self._fn)[0]  # ``params`` are the module's own (_grad_leaves)

    def _run(self, inputs, return_scores, training, seed):
        torch, call = self.torch, inputs["call"]
        if seed is not None:
            torch.manual_seed(seed)
        self.module.train(bool(training))
        try:
            with torch.no_grad():
                out, weights = self._call_module(inputs, return_scores, self._fn)
        finally:
            self.module.eval()
        return out, (weights.reshape(call.scores_shape) if return_scores else None)

    def _grad_leaves(self):
        return self.params

    def _canonical_gradients(self, grads):
        weights = {k: grads.pop(k) for k in list(grads) if k not in ("query", "key", "value", "bias")}
        return {**grads, **module_to_canonical(weights, self.spec.num_heads)}

    def export_weights(self) -> Weights:
        state = {k: _torch.to_numpy(v).astype(np.float64) for k, v in self.module.state_dict().items()}
        return Weights(**module_to_canonical(state, self.spec.num_heads))


class TorchMHAAdapter(_torch.TorchAdapter):
    name = "torch_mha"
    framework = "PyTorch"
    description = "torch.nn.MultiheadAttention (batch_first=False, average_attn_weights=False)"
    layer_class = TorchMHALayer

    def capabilities(self):
        why_width = "nn.MultiheadAttention splits embed_dim (the query width) into num_heads equal heads"
        return Capabilities(
            unsupported_features={
                "gqa": "nn.MultiheadAttention projects key and value with num_heads heads too (no num_kv_heads)",
                "value_dim": "nn.MultiheadAttention uses one head_dim = embed_dim // num_heads for q, k and v",
                "output_shape": "nn.MultiheadAttention's out_proj maps back to embed_dim (the query width)",
                "multi_output": "nn.MultiheadAttention's output is [L, N, embed_dim]",
                "head_width": why_width,
                "softcap": "nn.MultiheadAttention has no logit soft cap (its attn_mask is additive)",
                "scale": "nn.MultiheadAttention scales by 1/sqrt(head_dim) itself and takes no scale (the "
                         "functional F.multi_head_attention_forward has none either)",
            },
            devices=("cpu", "cuda"), modes=("eager", "compiled"),
            supported_extensions=frozenset({"causal_bottom_right", "window", "bias", "lengths", "query_offset"}))
