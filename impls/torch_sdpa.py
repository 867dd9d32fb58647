"""PyTorch: projections in torch, attention core in ``F.scaled_dot_product_attention``.

Every canonical feature is expressed: multi-axis attention by flattening the
attended axes into one sequence (non-attended axes into the batch), masks as
SDPA's boolean ``attn_mask`` (True = take part, the same polarity as ours) in
the form a torch user writes it: ``[T, S]`` when one mask serves every batch
and head, else ``[N, 1 or H, T or 1, S]``, broadcast by SDPA itself;
causal-only calls through ``is_causal=True`` (top-left aligned, as ours); SDPA
takes either is_causal or a mask, so causal with a mask is folded into it
(recorded on the row as emulated). SDPA returns no attention weights, so
scores are unsupported (computing them apart would judge our code, not torch's).

Modern attention, through SDPA's own arguments wherever it has one:

* grouped-query attention: K and V projected with ``num_kv_heads`` heads and
  ``enable_gqa=True`` (SDPA repeats each kv head over its group of query
  heads, ``repeat_interleave``: query head h reads kv head h // group, ours);
* bottom-right causal: ``torch.nn.attention.bias.causal_lower_right(T, S)``
  as ``attn_mask`` when causal is the only restriction (on CPU torch itself
  materialises it as a boolean mask for the kernel; on CUDA flash and
  efficient attention take it natively), ``is_causal`` when T == S;
* the additive bias: a float ``attn_mask``, combined with the boolean
  restrictions the way a torch user does, ``bias.masked_fill(~mask, -inf)``;
  its gradient is autograd's through ``attn_mask``;
* SDPA has no window, no lengths and no query positions argument: they are
  built into the boolean mask (a band; a ``key_padding``-style ``[N, 1, 1, S]``
  and query rows; per-sequence diagonals, a decode step against a cache), and
  recorded on the row as emulated. A causal-only call whose every sequence sits
  at ``S - T`` is ``causal_lower_right``, however it was said;
* the logit scale: ``scale=``; SDPA has no soft cap (unsupported).

The kernel is an axis: ``torch_sdpa`` lets SDPA choose (what users run);
``torch_sdpa+math``, ``+flash``, ``+efficient`` and ``+cudnn`` restrict
``torch.nn.attention.sdpa_kernel`` to that one backend, so a call the kernel
cannot take raises instead of silently running another kernel, and becomes
``unsupported`` with SDPA's own reason (its warnings). PyTorch's CPU build has
the math and flash kernels; efficient and cuDNN attention exist only on CUDA.
"""
from __future__ import annotations

import warnings

from . import _torch
from .base import Capabilities, UnsupportedError, emulated
from .validation import score_scale

# Our kernel names -> torch.nn.attention.SDPBackend members
SDPA_BACKENDS = {"math": "MATH", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION",
                 "cudnn": "CUDNN_ATTENTION"}
CUDA_ONLY_KERNELS = ("efficient", "cudnn")


class TorchSDPALayer(_torch.ProjectedLayer):
    # ---- what SDPA takes natively, what is folded into its mask ------------------------------------------
    @staticmethod
    def _causal_is_native(call) -> bool:
        """SDPA takes causal alone (is_causal or causal_lower_right) only when nothing else restricts the call, and
        every sequence's diagonal is top-left or bottom-right (offsets that differ between sequences, or sit
        elsewhere, need a mask)."""
        alone = call.causal and call.mask is None and call.bias is None and call.window is None \
            and call.query_lengths is None and call.key_value_lengths is None
        return alone and not call.offsets_vary and call.diagonal_offset in (0, call.k_len - call.q_len)

    def emulations(self, call):
        return emulated(call, causal=not self._causal_is_native(call), window=True, lengths=True)

    def _mask(self, call):
        """The boolean attn_mask (mask, and whatever SDPA has no argument for), or None."""
        mask = call.flat_mask(with_causal=call.causal and not self._causal_is_native(call), window=True, lengths=True)
        if mask is None:
            return None
        return _torch.bool_tensor(self.torch, mask[0, 0] if mask.shape[:2] == (1, 1) else mask, self.device)

    def _causal(self, call):
        """(is_causal, a CausalBias for attn_mask or None) for a call whose causal SDPA takes natively."""
        if not self._causal_is_native(call):
            return False, None
        if call.diagonal_offset != 0:  # S - T: bottom-right, however the call said it
            from torch.nn.attention.bias import causal_lower_right
            return False, causal_lower_right(call.q_len, call.k_len)
        return True, None

    # ---- the computation ---------------------------------------------------------------------------------
    def _heads(self, q, k, v, mask, bias, dropout_p: float, call):
        torch, F = self.torch, self.torch.nn.functional
        is_causal, attn_mask = self._causal(call)
        if bias is not None:  # a float attn_mask: the bias, -inf where the boolean restrictions mask
            attn_mask = bias if mask is None else \
                bias.expand(torch.broadcast_shapes(bias.shape, mask.shape)).masked_fill(~mask, float("-inf"))
        elif mask is not None:
            attn_mask = mask
        return self._sdpa(F.scaled_dot_product_attention, q, k, v, attn_mask=attn_mask, dropout_p=dropout_p,
                          is_causal=is_causal, scale=score_scale(self.spec, call),
                          enable_gqa=self.spec.kv_heads != self.spec.num_heads)

    def _sdpa(self, sdpa, *args, **kwargs):
        """SDPA as users call it, or, for a kernel variant, restricted to that one kernel: a call the kernel
        cannot take raises (SDPA says why in its warnings), and is unsupported with that reason."""
        kernel = self.adapter.kernel
        if kernel == "default":
            return sdpa(*args, **kwargs)
        from torch.nn.attention import SDPBackend, sdpa_kernel
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with sdpa_kernel([getattr(SDPBackend, SDPA_BACKENDS[kernel])]):
                    return sdpa(*args, **kwargs)
            except RuntimeError as exc:
                reason = _torch.refusal_reason(exc, caught)
                if reason is None:
                    raise
                mask = kwargs.get("attn_mask")
                if getattr(mask, "requires_grad", False):  # SDPA's warning gives no reason for this one
                    reason += " (the call differentiates its float attn_mask, the bias)"
                raise UnsupportedError(self.adapter.name, "this call",
                                       f"SDPA's {kernel} kernel refuses it: {reason}") from None

    def _run(self, inputs, return_scores, training, seed):
        torch, call = self.torch, inputs["call"]
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            out, _ = self._core(inputs["query"], inputs["value"], inputs["key"], inputs["mask"], inputs["bias"],
                                self.params, self.spec.dropout if training else 0.0, call)
        return out, None


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
                                            "its kernel used are never exposed",
                                  "softcap": "F.scaled_dot_product_attention has no hook on the logits but an "
                                             "additive attn_mask, which cannot cap them (FlexAttention's score_mod "
                                             "can: torch_flex)"},
            devices=("cpu", "cuda"), modes=("eager", "compiled"),
            supported_extensions=frozenset({"gqa", "causal_bottom_right", "window", "bias", "lengths", "query_offset",
                                            "scale"}))


class TorchSDPAKernelAdapter(TorchSDPAAdapter):
    """SDPA restricted to one kernel (``sdpa_kernel([backend])``, eager). Not registered itself: its subclasses
    name the kernel."""

    name = ""
    default_mode = "eager"

    def capabilities(self):
        caps = super().capabilities()
        devices = ("cuda",) if self.kernel in CUDA_ONLY_KERNELS else ("cpu", "cuda")
        return Capabilities(unsupported_features=caps.unsupported_features, devices=devices, modes=("eager",),
                            supported_extensions=caps.supported_extensions,
                            devices_reason=f"SDPA's {self.kernel} kernel (SDPBackend.{SDPA_BACKENDS[self.kernel]}) "
                                           f"exists only on CUDA; PyTorch's CPU build has the math and flash kernels")


class TorchSDPAMathAdapter(TorchSDPAKernelAdapter):
    name = "torch_sdpa+math"
    kernel = "math"
    description = "scaled_dot_product_attention restricted to its math kernel (sdpa_kernel)"
    causal_skips_masked_blocks = False  # the math kernel forms the whole [T, S] scores, masked or not
    score_buffers = 3


class TorchSDPAFlashAdapter(TorchSDPAKernelAdapter):
    name = "torch_sdpa+flash"
    kernel = "flash"
    description = "scaled_dot_product_attention restricted to its flash kernel (sdpa_kernel)"


class TorchSDPAEfficientAdapter(TorchSDPAKernelAdapter):
    name = "torch_sdpa+efficient"
    kernel = "efficient"
    description = "scaled_dot_product_attention restricted to its memory-efficient kernel (CUDA only)"


class TorchSDPACudnnAdapter(TorchSDPAKernelAdapter):
    name = "torch_sdpa+cudnn"
    kernel = "cudnn"
    description = "scaled_dot_product_attention restricted to its cuDNN kernel (CUDA only)"
