"""JAX: projections in ``jnp.einsum``, attention core in ``jax.nn.dot_product_attention``.

Every canonical feature is expressed:

* multi-axis attention by flattening the attended axes into one sequence and
  the non-attended axes into the batch (the function takes ``[B, T, N, H]``);
* masks through its boolean ``mask`` (True = takes part, our polarity), as a
  JAX user passes it: ``[B, N, T, S]`` with each of B, N, T, S of size 1 where
  the mask does not vary along it, broadcast by the function itself;
* causal through ``is_causal=True``, which builds ``tril(ones(T, S))``:
  top-left aligned, as ours, and combines it with the mask by AND;
* ``value_dim != key_dim``: the function wants one head width for q, k and v,
  so the narrower side is zero-padded and the output sliced back. Zero
  columns add exact zeros to q·k, and the scale stays ``1/sqrt(key_dim)``.

Modern attention, every feature through the function's own arguments:

* grouped-query attention: K and V with ``num_kv_heads`` heads (the function
  reshapes the query heads to ``[K, G]``: query head h reads kv head h // G);
* the additive bias: its ``bias`` (added to the scaled logits before the
  masks), its gradient through the VJP;
* lengths: ``query_seq_lengths`` / ``key_value_seq_lengths`` (int32, per
  sequence of the flattened batch);
* the window: ``local_window_size=(left, right)``, measured from the top-left
  diagonal, ANDed with ``is_causal`` (jax/_src/nn/functions.py,
  ``_apply_masks``, ``_get_window_mask``): our window exactly;
* bottom-right causal: ``is_causal`` is always top-left (``tril(ones(T, S))``),
  so bottom-right causal (with its window, if any) is the band it is,
  ``local_window_size=(left - d, d)`` with d = S - T (an unbounded side as
  T + S): the function's own band, no mask built here. The same holds for
  query positions shared by the whole batch (d = the offset);
* query positions that differ between sequences: a decode step (T = 1,
  causal) is what a JAX decoder passes, ``key_value_seq_lengths`` = each
  cache's length (key j <= p[b] is j < p[b] + 1); anything else (speculative
  queries, a left window) has no argument, and causal and the window are built
  into the mask (recorded on the row as emulated);
* the logit scale: ``scale=``. The function has no soft cap (unsupported).

Behaviours of the function itself, kept (the harness reports them):

* a query row with no allowed key is filled with a large *finite* negative
  before the softmax, so it gets uniform weights 1/S, not the canonical zeros;
* the softmax always runs in float32, float64 inputs included, so a float64
  layer is only float32-accurate.

The function returns no attention weights, so the adapter declares scores
unsupported (computing them apart would judge our code, not JAX's). Build option ``implementation``
(None, "xla" or "cudnn") is passed through; "cudnn" needs a GPU and float16 or
bfloat16. The kernel is an axis: ``jax_dpa`` passes None (the function picks;
today that is "xla" everywhere), ``jax_dpa+xla`` and ``jax_dpa+cudnn`` force
one implementation (cuDNN only on a GPU, in float16 and bfloat16; a call it
refuses raises in JAX, and is unsupported with JAX's message). Modes:
"compiled" wraps each entry point in ``jax.jit``; "eager" runs the same
functions without the outer jit (JAX dispatches op by op).
"""
from __future__ import annotations

import numpy as np

from . import _jax
from .base import Capabilities, emulated, kernel_refusals
from .validation import score_scale

IMPLEMENTATIONS = (None, "xla", "cudnn")


class JaxDPALayer(_jax.JaxLayer):
    def __init__(self, adapter, spec, weights, dtype, device, mode="eager", implementation=None, **options):
        if implementation is None and adapter.kernel != "default":  # a kernel variant: its implementation
            implementation = adapter.kernel
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        if implementation == "cudnn" and (not device.startswith("cuda") or dtype not in ("float16", "bfloat16")):
            raise ValueError(f"implementation='cudnn' (cuDNN flash attention) needs device='cuda' and dtype "
                             f"float16 or bfloat16, got device={device!r}, dtype={dtype!r}")
        super().__init__(adapter, spec, weights, dtype, device, mode, **options)
        import jax.numpy as jnp
        self.jnp = jnp
        self.implementation = implementation
        with _jax.precision_scope(dtype):
            self.params = {k: _jax.array(v, dtype, self.jax_device) for k, v in weights.as_dict().items()}

    def _refusals(self):
        """cuDNN's implementation refuses what it cannot run (shapes, a right window without causal) by raising in
        JAX: for the forced cudnn kernel that is unsupported, with JAX's message."""
        return kernel_refusals(self.adapter.name, self.implementation == "cudnn",
                               "jax.nn.dot_product_attention(implementation='cudnn')")

    def _forward(self, call, return_scores, training, seed):
        with self._refusals():
            return super()._forward(call, return_scores, training, seed)

    def _gradients(self, call, cotangent):
        with self._refusals():
            return super()._gradients(call, cotangent)

    def evaluate(self, *args, **kwargs):
        with self._refusals():
            return super().evaluate(*args, **kwargs)

    # ---- the computation (pure functions of jax arrays) ---------------------
    def _project(self, x, W, b, layout, width):
        """``[B, *A, D]`` -> ``[N, L, H, width]`` (the function's BTNH layout), zero-padded to ``width``."""
        y = self.jnp.einsum("nld,dhk->nlhk", _jax.flatten(x, layout), W)
        if b is not None:
            y = y + b
        pad = width - y.shape[-1]
        return y if pad == 0 else self.jnp.pad(y, ((0, 0), (0, 0), (0, 0), (0, pad)))

    def _flags(self, call):
        return _jax.Flags(causal=call.causal and not call.offsets_vary and call.diagonal_offset == 0,
                          window=local_window_size(call), scale=score_scale(self.spec, call))

    def _mask(self, call):
        positions = _positions_in_mask(call)
        return _jax.mask_array(call.flat_mask(with_causal=positions, window=positions), self.jax_device)

    def _extras(self, call):
        q_len, kv_len = call.flat_lengths()
        if _decode_lengths(call):  # one query at position p[b]: causal is "the first p[b] + 1 keys"
            reach = call.flat_offsets() + 1
            kv_len = reach if kv_len is None else np.minimum(kv_len, reach)
        lengths = lambda n: None if n is None else self.jax.device_put(n.astype("int32"), self.jax_device)
        bias = call.flat_bias()
        return {"mask": self._mask(call), "bias": None if bias is None else _jax.array(bias, self.dtype, self.jax_device),
                "query_lengths": lengths(q_len), "key_value_lengths": lengths(kv_len)}

    def emulations(self, call):
        return emulated(call, causal=True, window=True) if _positions_in_mask(call) else ()

    def _apply(self, params, query, value, key, extras, layout, flags):
        kd, vd = self.spec.key_dim, self.spec.value_head_dim
        width = max(kd, vd)
        key = value if key is None else key
        q = self._project(query, params["Wq"], params.get("bq"), layout, width)
        k = self._project(key, params["Wk"], params.get("bk"), layout, width)
        v = self._project(value, params["Wv"], params.get("bv"), layout, width)
        o = self.jax.nn.dot_product_attention(
            q, k, v, bias=extras["bias"], mask=extras["mask"], scale=flags.scale, is_causal=flags.causal,
            query_seq_lengths=extras["query_lengths"], key_value_seq_lengths=extras["key_value_lengths"],
            local_window_size=flags.window, implementation=self.implementation)
        o = _jax.unflatten_query(o[..., :vd], query.shape, layout)  # [B, *Q, H, vd]
        Wo = params["Wo"]
        out = self.jnp.einsum("...hv,hvo->...o", o, Wo.reshape(Wo.shape[0], Wo.shape[1], -1))
        if "bo" in params:
            out = out + params["bo"].reshape(-1)
        return out.reshape(query.shape[:-1] + Wo.shape[2:])

    def _canonical(self, tree):
        return dict(tree)  # the parameters are the canonical arrays

    def _run(self, inputs, return_scores, training, seed):
        with _jax.precision_scope(self.dtype):
            return self._output(inputs), None


def _decode_lengths(call) -> bool:
    """One query per sequence at positions that differ (a decode step against caches of different lengths), causal,
    with no left window bound: "key j <= p[b]" is the length ``p[b] + 1``, and ``key_value_seq_lengths`` says it,
    as a JAX decoder passes its caches' lengths."""
    return call.offsets_vary and call.causal and call.q_len == 1 and (call.window is None or call.window[0] is None)


def _positions_in_mask(call) -> bool:
    """Per-sequence positions the function has no argument for (its is_causal and local_window_size are one
    diagonal for the whole batch): causal and the window are built into the mask."""
    return call.offsets_vary and call.positions_matter and not _decode_lengths(call)


def local_window_size(call) -> tuple[int, int] | None:
    """The call's window, and causal on a diagonal other than the top-left, as ``local_window_size=(left, right)``
    around the function's top-left diagonal (key k allowed iff q - left <= k <= q + right), or None (also where
    the diagonals differ between sequences: see :func:`_positions_in_mask`).

    Ours is measured from the diagonal i + d (d = S - T bottom-right, the query offset, or 0):
    i + d - left <= j <= i + d + right, so the function's sides are (left - d, right + d); causal on a moved
    diagonal caps the right side at it (right = 0). An unbounded side is T + S, further than any key."""
    if call.offsets_vary:
        return None
    d = call.diagonal_offset
    moved = call.causal and d != 0
    if call.window is None and not moved:
        return None
    far = call.q_len + call.k_len
    left, right = (far if w is None else w for w in (call.window or (None, None)))
    if moved:
        right = 0
    return (left - d, right + d)


class JaxDPAAdapter(_jax.JaxAdapter):
    name = "jax_dpa"
    framework = "JAX"
    description = "jnp.einsum projections + jax.nn.dot_product_attention"
    layer_class = JaxDPALayer

    def capabilities(self):
        return Capabilities(
            unsupported_features={"dropout": "jax.nn.dot_product_attention has no dropout argument",
                                  "scores": "jax.nn.dot_product_attention returns the output only; the weights "
                                            "it used are never exposed",
                                  "softcap": "jax.nn.dot_product_attention has no hook on the logits but its "
                                             "additive bias, which cannot cap them"},
            devices=("cpu", "cuda"), modes=("eager", "compiled"),
            supported_extensions=frozenset({"gqa", "causal_bottom_right", "window", "bias", "lengths", "query_offset",
                                            "scale"}))


class JaxDPAXlaAdapter(JaxDPAAdapter):
    name = "jax_dpa+xla"
    kernel = "xla"
    description = "jax.nn.dot_product_attention(implementation='xla')"


class JaxDPACudnnAdapter(JaxDPAAdapter):
    name = "jax_dpa+cudnn"
    kernel = "cudnn"
    description = "jax.nn.dot_product_attention(implementation='cudnn'): cuDNN flash attention (GPU only)"
    causal_skips_masked_blocks = True  # cuDNN skips the non-causal blocks (the function's docstring)
    score_buffers = 0

    def capabilities(self):
        caps = super().capabilities()
        only = "cuDNN flash attention runs float16 and bfloat16 only"
        return Capabilities(unsupported_features=caps.unsupported_features, devices=("cuda",), modes=caps.modes,
                            unsupported_dtypes={"float32": only, "float64": only},
                            supported_extensions=caps.supported_extensions,
                            devices_reason="jax.nn.dot_product_attention's 'cudnn' implementation runs on NVIDIA "
                                           "GPUs only")
