"""PyTorch FlexAttention: ``torch.nn.attention.flex_attention``, compiled as its users run it.

* Compiled: ``torch.compile(flex_attention, dynamic=False)``, once per process (Inductor's fused
  CPU/GPU template; static shapes, as gpt-fast and most FlexAttention examples compile it); the
  projections stay eager. Why not dynamic shapes: on the CPU, once dynamo marks a size dynamic, a
  ``mask_mod`` that reads a captured mask tensor fails to compile (Inductor's C++ names an
  undeclared ``cur_kvSplitSize5`` or ``cur_qSplitSize1``; ``tests/test_torch_flex.py`` reproduces it).
  "eager" mode calls the uncompiled function (PyTorch warns that it materialises the scores).
* Masks and causal are a ``BlockMask`` from ``create_block_mask``: a ``mask_mod`` reading the boolean
  mask tensor (True = attend, our polarity) in the shape a user writes it, ``M[q, kv]``,
  ``M[b, q, kv]``, ``M[h, q, kv]`` or ``M[b, h, q, kv]`` (batch and head axes only where the mask
  varies along them; the block mask broadcasts the rest), and ``q >= kv`` for causal (top-left, as
  ours), ANDed in the same function (one code object per mask layout). The additive bias of the
  semantics issue will be a ``score_mod``.
* Compile budget: every new shape, ``mask_mod`` code object and dtype is a recompile (5-30 s each on a
  small CPU), and past ``torch._dynamo.config.recompile_limit`` (8) dynamo silently falls back to the
  unfused path. The compiled function raises the limits to ``RECOMPILE_LIMIT`` and makes a hit an
  error (``fail_on_recompile_limit_hit``), so a row never silently judges the fallback; the adapter
  declares ``reduced_matrix``.
* What FlexAttention refuses (each reason is the framework's): float64 when compiled for the CPU
  (Inductor's CPU template takes float32, float16 and bfloat16; float64 then runs the eager path),
  gradients on the CPU, dropout; it never returns the attention probabilities.
"""
from __future__ import annotations

import dataclasses

from . import _torch, torch_sdpa
from .base import Capabilities, UnsupportedError

RECOMPILE_LIMIT = 4096
_compiled = None


def compiled_flex():
    """``torch.compile(flex_attention, dynamic=False)``, shared by every layer of this process."""
    global _compiled
    if _compiled is None:
        import torch
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, RECOMPILE_LIMIT)
        config.fail_on_recompile_limit_hit = True
        _compiled = torch.compile(flex_attention, dynamic=False)
    return _compiled


def mask_mod(mask, batch: bool, heads: bool, causal: bool):
    """The mask_mod a user writes for a boolean ``mask`` tensor (None: causal alone), reading only the axes
    it has; causal is ANDed in the same function. One code object per layout, so shapes share kernels."""
    if mask is None:
        return lambda b, h, q, kv: q >= kv
    if batch and heads:
        return (lambda b, h, q, kv: mask[b, h, q, kv] & (q >= kv)) if causal else (lambda b, h, q, kv: mask[b, h, q, kv])
    if batch:
        return (lambda b, h, q, kv: mask[b, q, kv] & (q >= kv)) if causal else (lambda b, h, q, kv: mask[b, q, kv])
    if heads:
        return (lambda b, h, q, kv: mask[h, q, kv] & (q >= kv)) if causal else (lambda b, h, q, kv: mask[h, q, kv])
    return (lambda b, h, q, kv: mask[q, kv] & (q >= kv)) if causal else (lambda b, h, q, kv: mask[q, kv])


class TorchFlexLayer(torch_sdpa.TorchSDPALayer):
    def __init__(self, adapter, spec, weights, dtype, device, mode="compiled", **options):
        super().__init__(adapter, spec, weights, dtype, device, "eager", **options)  # eager projections
        from torch.nn.attention import flex_attention
        self.mode, self.flex = mode, flex_attention
        self._flex = compiled_flex() if mode == "compiled" else flex_attention.flex_attention

    def _mask(self, call):
        """The BlockMask for the call's mask and causal, or None."""
        if call.mask is None and not call.causal:
            return None
        mask, batch, heads = None, False, False
        if call.mask is not None:
            mask = dataclasses.replace(call, causal=False).flat_allowed()  # [N, 1|H, T, S]
            batch, heads = any(n != 1 for n in call.mask.shape[:call.n_batch]), mask.shape[1] > 1
            mask = mask[tuple(slice(None) if keep else 0 for keep in (batch, heads))]
            mask = _torch.bool_tensor(self.torch, mask, self.device)
        return self.flex.create_block_mask(mask_mod(mask, batch, heads, call.causal), mask.shape[0] if batch else None,
                                           self.spec.num_heads if heads else None, call.q_len, call.k_len,
                                           device=self.device)

    def _attention(self, query, value, key, mask, causal, p, dropout_p, call):
        q = self._project(call, query, p["Wq"], p.get("bq"))
        k = self._project(call, key, p["Wk"], p.get("bk"))
        v = self._project(call, value, p["Wv"], p.get("bv"))
        o = self._unflat(call, self._flex(q, k, v, block_mask=mask).transpose(1, 2))  # [B, *Q, H, vd]
        H, vd = self.spec.num_heads, self.spec.value_head_dim
        out = self.torch.einsum("...hv,hvo->...o", o, p["Wo"].reshape(H, vd, -1))
        if "bo" in p:
            out = out + p["bo"].reshape(-1)
        return out.reshape(tuple(call.output_shape)), (q, k)

    def _run(self, inputs, return_scores, training, seed):
        raise UnsupportedError(self.adapter.name, "this call", "flex_attention returns no attention probabilities")


class TorchFlexAdapter(_torch.TorchAdapter):
    name = "torch_flex"
    framework = "PyTorch"
    description = "torch.einsum projections + torch.compile(flex_attention) with a BlockMask for masks and causal"
    layer_class = TorchFlexLayer
    default_mode = "compiled"
    reduced_matrix = ("compiled flex_attention is recompiled for every new shape, mask layout and dtype, 5-30 s each "
                      "on a small CPU (Inductor's C++ template): about an hour for the full matrix")
    causal_skips_masked_blocks = True  # the BlockMask lists no key block above the diagonal
    score_buffers = 0  # the compiled kernel never holds a [T, S] score matrix
    empty_keys_refused = ("the compiled flex_attention kernel on the CPU dies with SIGFPE (an integer division by "
                          "zero), taking its process with it")

    def capabilities(self):
        return Capabilities(
            unsupported_features={
                "scores": "flex_attention returns the output (and optionally the log-sum-exp), never the "
                          "attention probabilities",
                "dropout": "flex_attention has no dropout",
                # flex_attention can express each (enable_gqa, score_mod, block_mask); this adapter's BlockMask
                # holds the mask and causal only, so a case using them is refused rather than run without them
                **{f: f"torch_flex builds its BlockMask from the mask and top-left causal only ({f} is not "
                      f"wired into score_mod / block_mask / enable_gqa)"
                   for f in ("gqa", "bias", "lengths", "window", "causal_bottom_right")},
            },
            devices=("cpu", "cuda"), modes=("eager", "compiled"))

    def unsupported_reason(self, spec, weights, *, dtype="float32", device="cpu", mode="compiled",
                           gradients=False, **kwargs):
        reason = super().unsupported_reason(spec, weights, dtype=dtype, device=device, mode=mode,
                                            gradients=gradients, **kwargs)
        cpu = device.split(":")[0] == "cpu"
        if reason is None and cpu and gradients:
            return "FlexAttention does not support backward on CPU (NotImplementedError in flex_attention)"
        if reason is None and cpu and mode == "compiled" and dtype == "float64":
            return ("dtype float64: Inductor's FlexAttention CPU template raises 'torch.float, torch.float16 and "
                    "torch.bfloat16 are supported in FlexAttention for CPU device'")
        return reason
