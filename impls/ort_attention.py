"""ONNX Runtime: the ONNX ``Attention`` operator inside a whole-layer ONNX graph.

The graph is the layer: MatMul + Add projections, ``Attention`` on 3-D ``[N, L, heads*d]`` inputs,
MatMul + Add output projection. So every dtype runs end to end in ORT as a deployed model does, and
the benchmarks time ORT alone; only the flattening of the attended axes happens in NumPy. The opset is
24, the newest ORT's CPU provider has an Attention kernel for (float32, float16; float64 runs the
operator's ONNX function body), except for a sliding window: its attributes arrive in opset 25, which
ORT runs through the operator's function body (ORT 1.32 registers no opset-25 kernel; the graph it
runs is the body's MatMul, Softmax, Where, ...). Each row records the opset of its graph.

What goes to the operator's own inputs and attributes, as an ONNX author writes them:

* grouped-query attention: K and V projected with ``num_kv_heads`` heads, ``kv_num_heads`` (query head
  h reads kv head h // group, as ours);
* the logit scale and soft cap: the ``scale`` and ``softcap`` attributes (the cap applied to the scaled
  logits before the mask and bias are added, as ours);
* causal: ``is_causal=1``, whose diagonal the operator places at the query block's position: the number
  of cached keys before it, ``past_sequence_length`` (internal cache: ``past_key``/``past_value``) or
  ``nonpad_kv_seqlen[b] - T`` (external cache); 0 without either (top-left). A sliding window
  (``left_window_size``/``right_window_size``, opset 25) is measured from the same diagonal. So the
  call's query positions choose the cache form (:meth:`OrtAttentionLayer._positions`):

  - every sequence at one offset P > 0: an internal cache, the keys and values before P fed as
    ``past_key``/``past_value`` (projected in the graph: the graph's inputs are the cached tokens' and
    the new ones'), the rest as K and V;
  - offsets that differ (or that only an external cache reaches): ``nonpad_kv_seqlen = offset + T``,
    exact where that length cuts no key the call allows (causal, or the call's own key/value lengths);
  - otherwise (offsets only a mask can place) causal and the window are built into ``attn_mask``,
    recorded on the row as emulated;
* key/value lengths: ``nonpad_kv_seqlen`` where it does not move the diagonal (a call whose positions
  nothing reads, or whose lengths are the cache's); otherwise in ``attn_mask`` (emulated): with
  ``is_causal``, ``nonpad_kv_seqlen`` is an external cache, never padding (ONNX's reference and ORT agree);
* the mask: the boolean ``attn_mask`` (True = attend, our polarity); with a bias, the float
  ``attn_mask`` (the bias, ``-inf`` where the boolean restrictions mask, as a torch user builds it).
  ORT's kernel broadcasts the mask's batch and head axes, never the query or key axis, so it goes as
  ``[T, S]``, ``[H, T, S]`` or ``[N, 1|H, T, S]``, always as long as the keys: ONNX (opset 24 on) lets the
  mask's last axis be shorter, padded with -inf, but ORT's kernel refuses that ("inconsistent
  total_sequence_length", attention_helper.h; a TODO in microsoft/onnxruntime#27542 says it enforces an
  exact match), so no graph here relies on it.

Query lengths have no argument (built into ``attn_mask``, emulated). Scores: ``qk_matmul_output`` in
mode 3 (the probabilities).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..schema import Refusal
from . import _onnx
from .base import emulated
from .spec import Weights
from .validation import flatten, unflatten

# the opset of ORT's CPU Attention kernel; the window's attributes need the next one (ORT runs its function body)
KERNEL_OPSET = 24
WINDOW_OPSET = 25


@dataclass(frozen=True)
class Positions:
    """How a call's query positions reach the operator: ``past`` cached keys (internal cache, one offset for all),
    ``nonpad`` lengths (external cache: each diagonal at ``nonpad[b] - T``) or neither (top-left, or built into the
    mask: ``in_mask``); ``lengths_in_mask`` where the call's key/value lengths are not what ``nonpad`` says."""

    past: int = 0
    nonpad: np.ndarray | None = None
    in_mask: bool = False
    lengths_in_mask: bool = False


class OrtAttentionLayer(_onnx.OrtLayer):
    def __init__(self, adapter, spec, weights, dtype, device, mode="compiled", **options):
        super().__init__(adapter, spec, weights, dtype, device, mode, **options)
        self.shapes = {n: a.shape for n, a in weights.as_dict().items()}
        # [D, heads, d] -> [D, heads*d]; Wo [H, d, *out] -> [H*d, F]; biases flat
        self.arrays = {n: a.reshape(a.shape[0] * a.shape[1] if n == "Wo" else a.shape[0], -1) if n[0] == "W"
                       else a.reshape(-1) for n, a in weights.as_dict().items()}

    # ---- what the operator takes natively, what is built into attn_mask ----------------------------------
    @staticmethod
    def _positions(call) -> Positions:
        """The cache form that places the call's query block where the call does (see the module docstring)."""
        T, S = call.q_len, call.k_len
        lengths = call.flat_lengths()[1]  # [N] or None
        if not call.positions_matter:
            return Positions(nonpad=lengths)
        offsets = call.flat_offsets()
        if not np.any(offsets):  # top-left: no cache; nonpad only where it is exactly the diagonal's own length
            exact = lengths is not None and np.all(lengths == T)
            return Positions(nonpad=lengths if exact else None, lengths_in_mask=lengths is not None and not exact)
        reach = offsets + T  # an external cache's valid length for these positions
        if lengths is not None and np.array_equal(lengths, reach):
            return Positions(nonpad=reach)
        if not call.offsets_vary and 0 < offsets[0] < S:
            return Positions(past=int(offsets[0]), lengths_in_mask=lengths is not None)
        cuts_nothing = call.causal or (call.window is not None and call.window[1] == 0) or \
            (lengths is not None and np.all(lengths <= reach))
        if cuts_nothing and np.all((reach >= 0) & (reach <= S)):
            return Positions(nonpad=reach, lengths_in_mask=lengths is not None and bool(np.any(lengths < reach)))
        return Positions(nonpad=lengths, in_mask=True)

    def call_opset(self, call):
        return WINDOW_OPSET if self._native_window(call) else KERNEL_OPSET

    def _native_window(self, call) -> bool:
        return call.window is not None and not self._positions(call).in_mask

    def emulations(self, call):
        positions = self._positions(call)
        built = emulated(call, causal=positions.in_mask, window=positions.in_mask, lengths=positions.lengths_in_mask)
        return built + (("lengths",) if call.query_lengths is not None and "lengths" not in built else ())

    def _attn_mask(self, call, positions: Positions):
        """The operator's attn_mask (boolean, or float with a bias) in the layout its kernel broadcasts, or None."""
        lengths = True if positions.lengths_in_mask else "query"
        allowed = call.allowed_block(causal=positions.in_mask, window=positions.in_mask, lengths=lengths,
                                     bias=False)  # [N|1, H|1, T|1, S|1]
        bias = call.flat_bias()
        if allowed is None and bias is None:
            return None
        parts = [x for x in (allowed, bias) if x is not None]
        n, h = (max(x.shape[a] for x in parts) for a in (0, 1))
        shape = (n, h, call.q_len, call.k_len)
        if bias is None:
            mask = np.broadcast_to(allowed, shape)
        else:
            mask = np.broadcast_to(self._array(bias), shape)
            if allowed is not None:
                mask = np.where(allowed, mask, self.np_dtype.type(-np.inf))
        if n == 1:
            mask = mask[0] if h > 1 else mask[0, 0]
        return np.ascontiguousarray(mask)

    # ---- the graph -------------------------------------------------------------------------------------
    def _dense(self, x, w, out):
        from onnx import helper
        if "b" + w[1] not in self.arrays:
            return [helper.make_node("MatMul", [x, w], [out])]
        return [helper.make_node("MatMul", [x, w], [out + "0"]), helper.make_node("Add", [out + "0", "b" + w[1]], [out])]

    def _cache(self, x, w, out, head_dim):
        """The cached tokens ``x`` projected by ``w`` into the operator's 4-D cache ``[N, kv_heads, P, head_dim]``."""
        from onnx import helper
        return self._dense(x, w, out + "_flat") + [
            helper.make_node("Reshape", [out + "_flat", "cache_shape_" + w], [out + "_split"]),
            helper.make_node("Transpose", [out + "_split"], [out], perm=[0, 2, 1, 3])]

    def _model(self, key_given, mask_kind, causal, nonpad, scores, cached=False, window=None, softcap=None, scale=None,
               opset=KERNEL_OPSET):
        from onnx import TensorProto, helper, numpy_helper
        value_info = lambda name, elem=_onnx.element_type(self.dtype): helper.make_tensor_value_info(name, elem, None)
        inputs = [value_info(n) for n in ["query", "value"] + ["key"] * key_given]
        if cached:
            inputs += [value_info(n) for n in ["cached_value"] + ["cached_key"] * key_given]
        if mask_kind:
            inputs.append(value_info("mask", TensorProto.BOOL) if mask_kind == "bool" else value_info("mask"))
        if nonpad:
            inputs.append(value_info("nonpad_kv_seqlen", TensorProto.INT64))
        nodes = self._dense("query", "Wq", "q") + self._dense("key" if key_given else "value", "Wk", "k") \
            + self._dense("value", "Wv", "v")
        operands = ["q", "k", "v", "mask" if mask_kind else ""]
        extra = []
        if cached:
            nodes += self._cache("cached_key" if key_given else "cached_value", "Wk", "past_key", self.spec.key_dim)
            nodes += self._cache("cached_value", "Wv", "past_value", self.spec.value_head_dim)
            operands += ["past_key", "past_value"]
            Hkv = self.spec.kv_heads
            extra = [numpy_helper.from_array(np.array([0, 0, Hkv, d], np.int64), f"cache_shape_{w}")
                     for w, d in (("Wk", self.spec.key_dim), ("Wv", self.spec.value_head_dim))]
        if nonpad:
            operands += ["", ""] * (not cached) + ["nonpad_kv_seqlen"]
        attributes = dict(q_num_heads=self.spec.num_heads, kv_num_heads=self.spec.kv_heads, is_causal=int(causal))
        if scores:
            attributes["qk_matmul_output_mode"] = 3
        if window is not None:
            attributes.update(left_window_size=-1 if window[0] is None else window[0],
                              right_window_size=-1 if window[1] is None else window[1])
        if softcap is not None:
            attributes["softcap"] = softcap
        if scale is not None:
            attributes["scale"] = scale
        # ORT's kernel refuses past_key without present_key: a cache's user receives the grown cache anyway
        outputs = ["y"] + (["present_key", "present_value"] if cached else ["", ""]) + ["probs"] * scores
        while outputs[-1] == "":
            outputs.pop()
        nodes.append(helper.make_node("Attention", operands, outputs, **attributes))
        nodes += self._dense("y", "Wo", "output")
        weights = [numpy_helper.from_array(self._array(a), n) for n, a in self.arrays.items()] + extra
        graph = helper.make_graph(nodes, self.adapter.name, inputs,
                                  [value_info("output")] + [value_info("probs")] * scores, weights)
        opsets = [helper.make_opsetid("", opset)]
        return helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))

    def _native(self, call, requires_grad=False):
        positions = self._positions(call)
        names = ["query", "value"] + ["key"] * call.key_given
        flat = {n: flatten(call, getattr(call, n)) for n in names}
        feeds = {}
        if positions.past:  # the first P keys and values are the cache; the graph projects them as it does K and V
            P = positions.past
            feeds.update({f"cached_{n}": self._array(flat[n][:, :P]) for n in names if n != "query"})
            flat.update({n: flat[n][:, P:] for n in names if n != "query"})
        feeds.update({n: self._array(x) for n, x in flat.items()})
        mask = self._attn_mask(call, positions)
        if mask is not None:
            feeds["mask"] = mask
        if positions.nonpad is not None:
            feeds["nonpad_kv_seqlen"] = positions.nonpad.astype(np.int64)
        return {"feeds": feeds, "call": call, "positions": positions}

    def _run(self, inputs, return_scores, training, seed):
        call, feeds, positions = inputs["call"], inputs["feeds"], inputs["positions"]
        mask = feeds.get("mask")
        mask_kind = None if mask is None else "bool" if mask.dtype == bool else "float"
        window = call.window if self._native_window(call) else None
        key = (call.key_given, mask_kind, call.causal and not positions.in_mask, "nonpad_kv_seqlen" in feeds,
               bool(return_scores), bool(positions.past), window, call.softcap, call.scale, self.call_opset(call))
        results = self._run_graph(key, lambda: self._model(*key), feeds)
        out = unflatten(call, results[0]).reshape(call.output_shape)
        return out, (results[1].reshape(call.scores_shape) if return_scores else None)

    def _output(self, inputs):
        return self._run(inputs, False, False, None)[0]

    def export_weights(self):
        return Weights(**{n: self._array(a).astype(np.float64).reshape(self.shapes[n]) for n, a in self.arrays.items()})


class OrtAttentionAdapter(_onnx.OrtAdapter):
    name = "ort_attention"
    framework = "ONNX Runtime"
    opset = KERNEL_OPSET
    description = ("ONNX graph of MatMul/Add projections + Attention (opset 24: ORT's CPU kernel in float32 and "
                   "float16, the operator's function body in float64; opset 25, the function body, for a sliding "
                   "window) + output projection, in onnxruntime")
    layer_class = OrtAttentionLayer
    supported_extensions = frozenset({"gqa", "causal_bottom_right", "window", "bias", "lengths", "query_offset",
                                      "softcap", "scale"})

    def unsupported_features(self):
        return {**super().unsupported_features(), "dropout": "the ONNX Attention operator has no dropout"}

    def unsupported_reason(self, spec, weights, *, dtype="float32", call=None, **kwargs):
        reason = super().unsupported_reason(spec, weights, dtype=dtype, call=call, **kwargs)
        if reason is None and call is not None and call.scale is not None:
            if call.scale < 0:
                return Refusal.constraint("the ONNX Attention operator multiplies q and k each by sqrt(scale) (its "
                                          "reference implementation and function body): a negative scale has no "
                                          "square root, and the result is NaN", subject="a negative scale")
            if call.scale == 0 and dtype != "float64":
                return Refusal.constraint("ORT's CPU Attention kernel refuses it when the session is created: 'scale "
                                          "must be greater than 0 if specified' (attention.cc)", subject="scale 0")
        return reason

    def unsupported_dtypes(self):
        return {"bfloat16": "onnxruntime's CPU provider has no bfloat16 Attention kernel, and the operator's "
                            "function body fails to load (NOT_IMPLEMENTED: no bfloat16 Expand kernel)"}
