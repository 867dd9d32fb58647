"""PyTorch FlexAttention: ``torch.nn.attention.flex_attention``, compiled as its users run it.

* Compiled: ``torch.compile(flex_attention)`` (Inductor's fused CPU/GPU template), made once per
  process; the projections stay eager. With ``dynamic=True``, the form FlexAttention users write for
  varying lengths, one program serves every length (a new one only where dynamo's guards on the sizes
  change: a size of 1, such as a batch of 1 or a single block of 128 positions; T == S; T < S). A call
  whose ``mask_mod`` or ``score_mod`` reads more than the positions (a mask, lengths, bias or per-sequence
  offset tensor, a window's bounds, the soft cap), or is causal, compiles with ``dynamic=False``
  instead, a program per shape: with symbolic sizes,
  Inductor's CPU template writes C++ naming an undeclared ``cur_kvSplitSize5`` and the compile fails.
  ``CppFlexAttentionTemplate.modification`` renames the split-size symbols to ``cur_qSplitSize`` and
  ``cur_kvSplitSize`` with a plain ``str.replace``, which also rewrites each longer size variable the
  name is a prefix of (``ks4`` inside ``ks45``); ``tests/test_torch_flex.py`` reproduces it. "eager"
  mode calls the uncompiled function (PyTorch warns that it materialises the scores).
* Every restriction is a ``BlockMask`` from ``create_block_mask``, whose ``mask_mod`` ANDs (``and_masks``)
  the small functions a user writes: the boolean mask tensor (True = attend, our polarity) read as
  ``M[q, kv]``, ``M[b, q, kv]``, ``M[h, q, kv]`` or ``M[b, h, q, kv]`` (batch and head axes only where the
  mask varies along them; the block mask broadcasts the rest); causal ``kv <= q + d`` (d = 0 top-left,
  S - T bottom-right, ``d[b]`` per sequence for query positions: a decoder's cache lengths); the window
  ``q + d - left <= kv <= q + d + right``; key/value and query lengths ``kv < kv_len[b]``, ``q < q_len[b]``.
  The ``score_mod`` a user writes carries the soft cap (``softcap * tanh(score / softcap)``, on the score
  FlexAttention has already scaled) and the additive bias after it (``+ bias[b, h, q, kv]``, reading index 0
  along the axes it broadcasts); the scale is ``scale=``; grouped-query attention is ``enable_gqa=True``
  with K and V projected with ``num_kv_heads`` heads. Nothing is emulated.
* Compile budget: every new ``mask_mod`` code object and dtype is a recompile (5-30 s each on a small
  CPU), and so is every new shape of a call compiled for its shape; past
  ``torch._dynamo.config.recompile_limit`` (8) dynamo silently falls back to the unfused path. The
  compiled function raises the limits to ``RECOMPILE_LIMIT`` and makes a hit an error
  (``fail_on_recompile_limit_hit``), so a row never silently judges the fallback; the adapter declares
  ``reduced_matrix``.
* What FlexAttention refuses (each reason is the framework's): float64 when compiled for the CPU
  (Inductor's CPU template takes float32, float16 and bfloat16; float64 then runs the eager path),
  gradients on the CPU, dropout; it never returns the attention probabilities.
"""
from __future__ import annotations

import os

import numpy as np

from ..schema import Refusal
from . import _torch, cache
from .base import Capabilities, UnsupportedError
from .validation import score_scale

RECOMPILE_LIMIT = 4096
_compiled: dict = {}  # dynamic (bool) -> the compiled flex_attention


def use_cache_folder() -> None:
    """Point Inductor at this project's cache folder for the CPU capability in force, before anything in torch asks
    where its cache is: the first to ask (the vector ISA check included) fixes it for the process, at Inductor's
    default folder shared by every process of the user."""
    for key, value in cache.torch_environment().items():
        os.environ.setdefault(key, value)


def compiled_flex(dynamic: bool = True):
    """``torch.compile(flex_attention, dynamic=dynamic)``, shared by every layer of this process."""
    if dynamic not in _compiled:
        use_cache_folder()
        import torch
        import torch._dynamo
        from torch.nn.attention.flex_attention import flex_attention
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, RECOMPILE_LIMIT)
        config.fail_on_recompile_limit_hit = True
        _compiled[dynamic] = torch.compile(flex_attention, dynamic=dynamic)
    return _compiled[dynamic]


def static_shapes(call, bias) -> bool:
    """Whether the call compiles for its own shape: its mask_mod or score_mod reads more than the positions (a
    mask, lengths, bias or per-sequence offset tensor, the window's bounds, the soft cap), or is causal (the
    diagonal relates the query and key positions, and with symbolic sizes Inductor's CPU template writes C++
    naming an undeclared split size for causal calls, T == S included), which Inductor's CPU template cannot
    compile with symbolic sizes (see the module docstring)."""
    return (call.mask is not None or bias is not None or call.window is not None or call.softcap is not None
            or call.causal
            or any(n is not None for n in call.flat_lengths()))


def _mask_reader(mask, batch: bool, heads: bool):
    """``mask[b, h, q, kv]``, ``mask[b, q, kv]``, ``mask[h, q, kv]`` or ``mask[q, kv]``: the mask tensor read the
    way a user indexes it, with batch and head axes only where it varies along them."""
    if batch and heads:
        return lambda b, h, q, kv: mask[b, h, q, kv]
    if batch:
        return lambda b, h, q, kv: mask[b, q, kv]
    if heads:
        return lambda b, h, q, kv: mask[h, q, kv]
    return lambda b, h, q, kv: mask[q, kv]


def mask_mod(mask=None, batch: bool = False, heads: bool = False, *, causal: bool = False, offset=0,
             window=None, kv_lengths=None, q_lengths=None):
    """The mask_mod a user writes, each restriction a small function ANDed by ``and_masks``: the boolean ``mask``
    tensor (True = attend); causal, ``kv <= q + offset`` (``offset`` an int, or a tensor of one query position per
    sequence read as ``offset[b]``: a decoder's cache lengths); the window ``(left, right)`` around the same
    diagonal; ``kv < kv_lengths[b]`` and ``q < q_lengths[b]`` for the lengths. None when nothing restricts."""
    from torch.nn.attention.flex_attention import and_masks
    parts = [] if mask is None else [_mask_reader(mask, batch, heads)]
    position = (lambda b, q: q + offset) if isinstance(offset, int) else (lambda b, q: q + offset[b])
    if causal:
        parts.append(lambda b, h, q, kv: kv <= position(b, q))
    left, right = window if window is not None else (None, None)
    if left is not None:
        parts.append(lambda b, h, q, kv: kv >= position(b, q) - left)
    if right is not None:
        parts.append(lambda b, h, q, kv: kv <= position(b, q) + right)
    if kv_lengths is not None:
        parts.append(lambda b, h, q, kv: kv < kv_lengths[b])
    if q_lengths is not None:
        parts.append(lambda b, h, q, kv: q < q_lengths[b])
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else and_masks(*parts)


def score_mod(bias=None, softcap: float | None = None):
    """The score_mod a user writes: the soft cap ``softcap * tanh(score / softcap)`` (on the scaled score, as
    FlexAttention hands it over), then the additive ``bias`` (``[N|1, H|1, T|1, S|1]``, reading index 0 along the
    axes it broadcasts). None when there is neither."""
    if bias is None and softcap is None:
        return None
    import torch
    cap = (lambda score: score) if softcap is None else (lambda score: softcap * torch.tanh(score / softcap))
    if bias is None:
        return lambda score, b, hh, q, kv: cap(score)
    n, h, t, s = (size > 1 for size in bias.shape)
    return lambda score, b, hh, q, kv: cap(score) + bias[b if n else 0, hh if h else 0, q if t else 0, kv if s else 0]


class TorchFlexLayer(_torch.ProjectedLayer):
    def __init__(self, adapter, spec, weights, dtype, device, mode="compiled", **options):
        super().__init__(adapter, spec, weights, dtype, device, "eager", **options)  # eager projections
        from torch.nn.attention import flex_attention
        self.mode, self.flex = mode, flex_attention

    def emulations(self, call):
        return ()  # the block mask and score_mod express every feature natively

    def _mask(self, call):
        """The BlockMask for the call's mask, causal, window and lengths, or None."""
        mask, batch, heads = None, False, False
        if call.mask is not None:
            mask = call.allowed_block(causal=False, window=False, lengths=False, bias=False)  # [N|1, H|1, T|1, S|1]
            batch, heads = mask.shape[0] > 1, mask.shape[1] > 1
            mask = np.broadcast_to(mask, mask.shape[:2] + (call.q_len, call.k_len))
            mask = mask[tuple(slice(None) if keep else 0 for keep in (batch, heads))]
            mask = _torch.bool_tensor(self.torch, np.ascontiguousarray(mask), self.device)
        q_lengths, kv_lengths = (None if n is None else self.torch.as_tensor(n, device=self.device)
                                 for n in call.flat_lengths())
        offset = self.torch.as_tensor(call.flat_offsets(), device=self.device) if call.offsets_vary \
            else call.diagonal_offset
        mod = mask_mod(mask, batch, heads, causal=call.causal, offset=offset, window=call.window,
                       kv_lengths=kv_lengths, q_lengths=q_lengths)
        if mod is None:
            return None
        per_batch = batch or q_lengths is not None or kv_lengths is not None or not isinstance(offset, int)
        return self.flex.create_block_mask(mod, call.n_flat if per_batch else None,
                                           self.spec.num_heads if heads else None, call.q_len, call.k_len,
                                           device=self.device)

    def _heads(self, q, k, v, mask, bias, dropout_p, call):
        flex = compiled_flex(not static_shapes(call, bias)) if self.mode == "compiled" else self.flex.flex_attention
        return flex(q, k, v, score_mod=score_mod(bias, call.softcap), block_mask=mask,
                    scale=score_scale(self.spec, call), enable_gqa=self.spec.kv_heads != self.spec.num_heads)

    def _run(self, inputs, return_scores, training, seed):
        raise UnsupportedError(self.adapter.name, "this call", "flex_attention returns no attention probabilities")


class TorchFlexAdapter(_torch.TorchAdapter):
    name = "torch_flex"
    framework = "PyTorch"
    description = "torch.einsum projections + torch.compile(flex_attention) with a BlockMask for masks and causal"
    layer_class = TorchFlexLayer
    default_mode = "compiled"
    reduced_matrix = ("compiled flex_attention is recompiled for every new mask layout and dtype, and with a mask, "
                      "lengths or a bias for every new shape, 5-30 s each on a small CPU (Inductor's C++ template): "
                      "about an hour for the full matrix")
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
            },
            devices=("cpu", "cuda"), modes=("eager", "compiled"),
            supported_extensions=frozenset({"gqa", "causal_bottom_right", "window", "bias", "lengths",
                                            "query_offset", "softcap", "scale"}))

    def unsupported_reason(self, spec, weights, *, dtype="float32", device="cpu", mode="compiled",
                           gradients=False, **kwargs):
        reason = super().unsupported_reason(spec, weights, dtype=dtype, device=device, mode=mode,
                                            gradients=gradients, **kwargs)
        cpu = device.split(":")[0] == "cpu"
        if reason is None and cpu and gradients:
            return Refusal.feature("gradients", "FlexAttention does not support backward on CPU "
                                                "(NotImplementedError in flex_attention)")
        if reason is None and cpu and mode == "compiled" and dtype == "float64":
            return Refusal.dtype(dtype, "Inductor's FlexAttention CPU template raises 'torch.float, torch.float16 and "
                                        "torch.bfloat16 are supported in FlexAttention for CPU device'")
        if reason is None and cpu and mode == "compiled" and inductor_vector_bits() is None:
            return Refusal.device("cpu", "Inductor compiles for no vector ISA here (torch's scalar capability: "
                                         "ATEN_CPU_CAPABILITY=default, or a CPU without AVX2), and its CPU "
                                         "FlexAttention template does not compile without one: CppCompileError, "
                                         "'transpose_block' and 'pack_vnni2' are not members of 'at::vec'")
        return reason

    def kernel_facts(self):
        return {**super().kernel_facts(), "inductor_vector_bits": inductor_vector_bits()}


def inductor_vector_bits() -> int | None:
    """The vector width Inductor compiles CPU code for in this process (it follows ATEN_CPU_CAPABILITY and the
    CPU: torch/_inductor/cpu_vec_isa.py, pick_vec_isa), None for none; 0 where torch cannot say."""
    use_cache_folder()  # the ISA check compiles a probe into the cache folder, and fixes which folder that is
    try:
        from torch._inductor import cpu_vec_isa
        isa = cpu_vec_isa.pick_vec_isa()
    except Exception:  # a torch without this module: let the compile decide
        return 0
    return isa.bit_width() if isa else None
