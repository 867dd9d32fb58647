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

Behaviours of the function itself, kept (the harness reports them):

* a query row with no allowed key is filled with a large *finite* negative
  before the softmax, so it gets uniform weights 1/S, not the canonical zeros;
* the softmax always runs in float32, float64 inputs included, so a float64
  layer is only float32-accurate.

The function returns no attention weights, so the adapter declares scores
unsupported (computing them apart would judge our code, not JAX's). Build option ``implementation``
(None, "xla" or "cudnn") is passed through; "cudnn" needs a GPU and float16 or
bfloat16. Modes: "compiled" wraps each entry point in ``jax.jit``; "eager"
runs the same functions without the outer jit (JAX dispatches op by op).
"""
from __future__ import annotations

import math

from . import _jax
from .base import Capabilities

IMPLEMENTATIONS = (None, "xla", "cudnn")


class JaxDPALayer(_jax.JaxLayer):
    def __init__(self, adapter, spec, weights, dtype, device, mode="eager", implementation=None, **options):
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

    # ---- the computation (pure functions of jax arrays) ---------------------
    def _project(self, x, W, b, layout, width):
        """``[B, *A, D]`` -> ``[N, L, H, width]`` (the function's BTNH layout), zero-padded to ``width``."""
        y = self.jnp.einsum("nld,dhk->nlhk", _jax.flatten(x, layout), W)
        if b is not None:
            y = y + b
        pad = width - y.shape[-1]
        return y if pad == 0 else self.jnp.pad(y, ((0, 0), (0, 0), (0, 0), (0, pad)))

    def _apply(self, params, query, value, key, allowed, layout, causal):
        kd, vd = self.spec.key_dim, self.spec.value_head_dim
        width = max(kd, vd)
        key = value if key is None else key
        q = self._project(query, params["Wq"], params.get("bq"), layout, width)
        k = self._project(key, params["Wk"], params.get("bk"), layout, width)
        v = self._project(value, params["Wv"], params.get("bv"), layout, width)
        o = self.jax.nn.dot_product_attention(q, k, v, mask=allowed, scale=1.0 / math.sqrt(kd), is_causal=causal,
                                              implementation=self.implementation)
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


class JaxDPAAdapter(_jax.JaxAdapter):
    name = "jax_dpa"
    framework = "JAX"
    description = "jnp.einsum projections + jax.nn.dot_product_attention"
    layer_class = JaxDPALayer

    def capabilities(self):
        return Capabilities(
            unsupported_features={"dropout": "jax.nn.dot_product_attention has no dropout argument",
                                  "scores": "jax.nn.dot_product_attention returns the output only; the weights "
                                            "it used are never exposed"},
            devices=("cpu", "cuda"), modes=("eager", "compiled"))
