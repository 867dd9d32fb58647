"""Models of framework behaviours the canonical oracle's policies cannot express, built from the oracle's stages.

Each is a float64 NumPy reimplementation of what one framework computes, written from its source and checked
against the framework in the tests, so a catalogue entry can describe the behaviour value for value
(``behaviours.BEHAVIOURS``) instead of with a weaker check.
"""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np

from mhabench.impls import oracle
from mhabench.impls.oracle import group_sum
from mhabench.impls.oracle_backward import projection_gradients, softcap_backward
from mhabench.impls.validation import flatten, numpy_dtype, score_scale


def jax_filled_attention(inputs, dtype: str = "float64") -> dict[str, np.ndarray]:
    """What ``jax.nn.dot_product_attention``'s XLA path computes (jax/_src/nn/functions.py,
    ``_dot_product_attention_core`` and ``_apply_masks``), for the case ``inputs``: ``output``, ``scores`` and every
    ``grad_*``.

    The additive bias is added to the scaled logits; then every position masked by the mask, causal, the window
    or the lengths is *replaced* by a large finite negative (``-0.7 * finfo.max``), while a ``-inf`` from the bias
    stays ``-inf``. The softmax runs over all S positions, so a row with no allowed key gets uniform weights 1/S;
    a row whose allowed positions are all ``-inf`` attends uniformly to its *masked* positions (or is NaN when it
    has none); the other rows are canonical. The output rows past ``query_seq_lengths`` are multiplied by zero
    (their weights stay as above). Gradients are those of that computation: the filled positions carry none.
    """
    fill = -0.7 * float(ml_dtypes.finfo(numpy_dtype(dtype)).max)  # the dtype's, as JAX takes it

    def weights(logits, allowed):
        filled = np.where(allowed, logits, fill)
        shifted = filled - filled.max(axis=-1, keepdims=True, initial=-np.inf)  # (S = 0: no keys)
        e = np.exp(shifted)
        probs = e / e.sum(axis=-1, keepdims=True)
        return probs, probs
    return _attention_model(inputs, weights, dtype=dtype)


def keras2_logsumexp_rounded(inputs, dtype: str = "float64") -> dict[str, np.ndarray]:
    """What legacy Keras 2 (``tf_keras.layers.MultiHeadAttention``) computes when it attends over more than one
    axis, in a 16- or 32-bit dtype: its ``Softmax`` layer adds ``(1 - mask) * -1e9`` (float16: its lowest value)
    to the logits and, for a tuple of axes, returns ``exp(x - reduce_logsumexp(x, axes))``. In a query row with
    no allowed key every ``x`` rounds to that constant and so does the logsumexp (log S is far below its ulp),
    so every weight is ``exp(0) = 1``, not 1/S: the output row is the projected *sum* of the values. The other
    rows are canonical. Backward, TensorFlow's logsumexp gradient is the softmax of the rounded ``x`` (uniform,
    1/S, in those rows), so their logits' gradient is ``g - mean(g)`` over the row.
    """
    def weights(logits, allowed):
        empty = ~allowed.any(axis=-1, keepdims=True)
        e = np.exp(np.where(allowed, logits - logits.max(axis=-1, keepdims=True, where=allowed, initial=-np.inf),
                            -np.inf))
        with np.errstate(all="ignore"):
            probs = np.where(empty, 1.0, e / e.sum(axis=-1, keepdims=True))
        softmax = np.where(empty, 1.0 / max(logits.shape[-1], 1), probs)
        return probs, softmax
    return _attention_model(inputs, weights, grad_where_masked=True, dtype=dtype)


def torch_cpu_flash_row_max(inputs, dtype: str = "float64", facts=None, kernel_dtype: str = "float32"
                            ) -> dict[str, np.ndarray]:
    """What torch's CPU flash attention kernel (``cpu_flash_attention``, aten/src/ATen/native/cpu/
    FlashAttentionKernel.cpp, the kernel SDPA runs on the CPU) gives a query row whose logits are all NaN or -inf,
    for a call without a mask: the row maximum (``_mul_reduce_max_fusion_kernel``) runs the first
    ``lanes * (S // lanes)`` logits through ``at::vec::maximum``, which keeps a NaN, and the rest through a scalar
    ``std::max(max, x)``, which drops it (``x < NaN`` is false). With ``S < lanes`` the whole row is that scalar
    tail, its maximum stays ``-inf``, and the kernel zero-fills the row as a fully masked one: zero weights, the
    output bias. From ``lanes`` keys on the vectorised part sees the NaN and the row is NaN, as canonically; any
    finite logit in the row makes it NaN too (``exp(NaN - max)``). With a mask the kernel takes its maximum with
    ``vec::reduce_all``, which pads the tail into a vector, and the row is NaN: this model refuses masked calls.

    ``lanes`` is the width of ``at::vec::Vectorized`` for the kernel's accumulation type (float for float16,
    bfloat16 and float32, double for float64: ``kernel_dtype``, the dtype the kernel ran, whatever ``dtype`` the
    model's stages are rounded to): ``facts["torch_vector_bits"]`` (512 under torch's AVX-512 capability, 256
    under AVX2 and the scalar default) divided by 32 or 64. The backward is not modelled, only what the
    forward's saved output gives: ``grad_Wo`` (the zero row contributes nothing to it)."""
    bits = (facts or {})["torch_vector_bits"]
    return _row_max_drops_nan(inputs, dtype, int(bits) // (64 if kernel_dtype == "float64" else 32))


def torch_flex_cpu_row_max(inputs, dtype: str = "float64") -> dict[str, np.ndarray]:
    """What compiled FlexAttention on the CPU (Inductor's C++ flex template, torch/_inductor/codegen/
    cpp_flex_attention_template.py) gives a query row whose logits are all NaN or -inf: the template's
    ``_mul_reduce_max_fusion_kernel`` takes the scalar tail's maximum with ``std::max`` and then combines it with
    the vectorised part's as ``std::max(tail, vector)``, which drops a NaN coming from either side, so the row
    maximum stays ``-inf`` at every key length and vector width and the row is zero-filled as a fully masked
    one (the output bias). A +inf logit still reaches the maximum and makes the row NaN, as canonically.
    Measured at S = 4, 8, 16, 17 and 33 under ATEN_CPU_CAPABILITY=avx512 and avx2."""
    return _row_max_drops_nan(inputs, dtype, math.inf)


def _row_max_drops_nan(inputs, dtype: str, lanes: float) -> dict[str, np.ndarray]:
    """The oracle's attention, except that a query row shorter than ``lanes`` whose logits are all NaN or -inf
    gets zero weights (a row maximum that never sees the NaN): ``output`` and ``grad_Wo``. Calls with a mask or
    bias are refused (their kernels take another maximum)."""
    call = oracle.prepare(inputs.spec, inputs.weights, *inputs.args(), **inputs.features())
    if call.allowed_block(bias=False) is not None or call.bias is not None:
        raise ValueError("the row-maximum models take calls without a mask or bias only")

    def weights(logits, allowed):
        probs = oracle.masked_softmax(logits, allowed)
        if logits.shape[-1] < lanes:  # the whole row is the scalar tail: NaN never reaches its maximum
            dropped = np.all(np.isnan(logits) | (logits == -np.inf), axis=-1, keepdims=True)
            probs = np.where(dropped, 0.0, probs)
        return probs, probs
    model = _attention_model(inputs, weights, dtype=dtype)
    return {q: model[q] for q in ("output", "grad_Wo")}


def _attention_model(inputs, weights_of, grad_where_masked: bool = False, dtype: str = "float64"
                     ) -> dict[str, np.ndarray]:
    """The oracle's stages around a framework's own weights: ``weights_of(logits, allowed)`` gives the weights
    and the softmax its backward uses (``g_logits = w * g_w - softmax * sum(g_w * w)``); the gradient at a masked
    position is kept where ``grad_where_masked`` (the mask was added, not substituted), else zero. Every stage is
    rounded to ``dtype`` (the same-precision reference of the model, as the oracle's own)."""
    i = inputs
    call = oracle.prepare(i.spec, i.weights, *i.args(), **i.features())
    spec, num = i.spec, oracle.Numerics(dtype)
    w, x, q, k, v = oracle._projections(spec, i.weights, call, num)  # q already scaled (the call's scale)
    H, Hkv = spec.num_heads, spec.kv_heads
    K, V = oracle.expand_heads(k, H), oracle.expand_heads(v, H)
    N, _, T, _ = q.shape
    with np.errstate(all="ignore"):
        bias = call.flat_bias()
        logits = oracle.logits(num, q, k, bias, softcap=call.softcap)  # scaled, soft-capped, biased
        masked = call.allowed_block(bias=False)
        allowed = np.ones((1, 1, 1, 1), bool) if masked is None else masked
        allowed = np.broadcast_to(allowed, logits.shape)
        probs, softmax = (num(a) for a in weights_of(logits, allowed))
        query_lengths = call.flat_lengths()[0]
        live = np.ones((N, 1, T, 1)) if query_lengths is None else \
            (np.arange(T)[None, None, :, None] < query_lengths[:, None, None, None]).astype(np.float64)
        o = num((probs @ V) * live)
        out = oracle.output_projection(spec, w, call, num, o)
        result = {"output": out, "output_with_scores": out, "scores": probs.reshape(call.scores_shape)}

        # the backward of the same computation
        vd = spec.value_head_dim
        Wo = w["Wo"].reshape(H * vd, -1)
        g_out = flatten(call, i.cotangent.reshape(call.query.shape[:-1] + (Wo.shape[-1],)))  # [N, T, O]
        g_out = num.cast(g_out)
        grads = {"Wo": num((np.transpose(o, (0, 2, 1, 3)).reshape(N * T, H * vd).T
                            @ g_out.reshape(N * T, -1)).reshape(w["Wo"].shape))}
        if "bo" in w:
            grads["bo"] = num(g_out.sum(axis=(0, 1)).reshape(w["bo"].shape))
        g_o = num((g_out.reshape(N * T, -1) @ Wo.T).reshape(N, T, H, vd).transpose(0, 2, 1, 3) * live)
        g_v = num(group_sum(np.swapaxes(probs, -1, -2) @ g_o, Hkv))
        g_probs = num(g_o @ np.swapaxes(V, -1, -2))
        g_logits = num(probs * g_probs - softmax * num(np.sum(g_probs * probs, axis=-1, keepdims=True)))
        if not grad_where_masked:
            g_logits = np.where(allowed, g_logits, 0.0)  # a filled position is a constant
        if bias is not None:
            grads["bias"] = call.bias_gradient(g_logits)
        if call.softcap is not None:
            g_logits = softcap_backward(num, q, k, call.softcap, g_logits)
        g_q = num(num(g_logits @ K) * num(score_scale(spec, call)))
        g_k = num(group_sum(np.swapaxes(g_logits, -1, -2) @ q, Hkv))
        gradients = projection_gradients(call, num, w, x, g_q, g_k, g_v, grads)
    result.update({f"grad_{name}": g for name, g in gradients.items()})
    return {name: np.asarray(a, np.float64) for name, a in result.items()}
