"""ONNX Runtime: the ONNX ``Attention`` operator (opset 24) inside a whole-layer ONNX graph.

The graph is the layer: MatMul + Add projections, ``Attention`` on 3-D ``[N, L, heads*d]`` inputs,
MatMul + Add output projection. So every dtype runs end to end in ORT as a deployed model does, and
the benchmarks time ORT alone; only the flattening of the attended axes happens in NumPy. Opset 24 is
the newest ORT's CPU provider has an Attention kernel for (float32, float16); float64 runs the
operator's ONNX function body.

What goes to the operator's own inputs and attributes, as an ONNX author writes them:

* grouped-query attention: K and V projected with ``num_kv_heads`` heads, ``kv_num_heads`` (query head
  h reads kv head h // group, as ours);
* top-left causal: ``is_causal=1`` (without a KV cache the operator's diagonal is top-left, as ours);
* key/value lengths: ``nonpad_kv_seqlen`` (opset 24), one length per sequence of the flattened batch;
* the mask: the boolean ``attn_mask`` (True = attend, our polarity); with a bias, the float
  ``attn_mask`` (the bias, ``-inf`` where the boolean restrictions mask, as a torch user builds it).
  ORT's kernel broadcasts the mask's batch and head axes, never the query or key axis, so it goes as
  ``[T, S]``, ``[H, T, S]`` or ``[N, 1|H, T, S]``.

Opset 24 has no argument for the rest (the sliding window arrives in opset 25, which ORT's CPU provider
does not run): a window, bottom-right causal and query lengths are built into ``attn_mask`` and recorded
on the row as emulated. Scores: ``qk_matmul_output`` in mode 3 (the probabilities).
"""
from __future__ import annotations

import numpy as np

from . import _onnx
from .spec import Weights
from .validation import flatten, unflatten


class OrtAttentionLayer(_onnx.OrtLayer):
    def __init__(self, adapter, spec, weights, dtype, device, mode="compiled", **options):
        super().__init__(adapter, spec, weights, dtype, device, mode, **options)
        self.shapes = {n: a.shape for n, a in weights.as_dict().items()}
        # [D, heads, d] -> [D, heads*d]; Wo [H, d, *out] -> [H*d, F]; biases flat
        self.arrays = {n: a.reshape(a.shape[0] * a.shape[1] if n == "Wo" else a.shape[0], -1) if n[0] == "W"
                       else a.reshape(-1) for n, a in weights.as_dict().items()}

    # ---- what the operator takes natively, what is built into attn_mask ----------------------------------
    @staticmethod
    def _causal_is_native(call) -> bool:
        """is_causal is the top-left triangle (bottom-right with T == S is the same one); bottom-right with
        T != S is built into the mask."""
        return call.top_left_causal

    def emulations(self, call):
        built = [f for f, used in (("causal_bottom_right", call.causal and not self._causal_is_native(call)),
                                   ("window", call.window is not None),
                                   ("lengths", call.query_lengths is not None)) if used]
        return tuple(built)

    def _attn_mask(self, call):
        """The operator's attn_mask (boolean, or float with a bias) in the layout its kernel broadcasts, or None."""
        allowed = call.allowed_block(causal=not self._causal_is_native(call), window=True, lengths="query",
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

    def _model(self, key_given, mask_kind, causal, lengths, scores):
        from onnx import TensorProto, helper, numpy_helper
        value_info = lambda name, elem=_onnx.element_type(self.dtype): helper.make_tensor_value_info(name, elem, None)
        inputs = [value_info(n) for n in ["query", "value"] + ["key"] * key_given]
        if mask_kind:
            inputs.append(value_info("mask", TensorProto.BOOL) if mask_kind == "bool" else value_info("mask"))
        if lengths:
            inputs.append(value_info("nonpad_kv_seqlen", TensorProto.INT64))
        nodes = self._dense("query", "Wq", "q") + self._dense("key" if key_given else "value", "Wk", "k") \
            + self._dense("value", "Wv", "v")
        operands = ["q", "k", "v", "mask" if mask_kind else ""] + (["", "", "nonpad_kv_seqlen"] if lengths else [])
        nodes.append(helper.make_node("Attention", operands, ["y", "", "", "probs"] if scores else ["y"],
                                      q_num_heads=self.spec.num_heads, kv_num_heads=self.spec.kv_heads,
                                      is_causal=int(causal), **({"qk_matmul_output_mode": 3} if scores else {})))
        nodes += self._dense("y", "Wo", "output")
        weights = [numpy_helper.from_array(self._array(a), n) for n, a in self.arrays.items()]
        graph = helper.make_graph(nodes, self.adapter.name, inputs,
                                  [value_info("output")] + [value_info("probs")] * scores, weights)
        opsets = [helper.make_opsetid("", self.adapter.opset)]
        return helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))

    def _native(self, call, requires_grad=False):
        feeds = {n: self._array(flatten(call, getattr(call, n))) for n in ["query", "value"] + ["key"] * call.key_given}
        mask = self._attn_mask(call)
        if mask is not None:
            feeds["mask"] = mask
        if call.key_value_lengths is not None:
            feeds["nonpad_kv_seqlen"] = call.flat_lengths()[1].astype(np.int64)
        return {"feeds": feeds, "call": call}

    def _run(self, inputs, return_scores, training, seed):
        call, feeds = inputs["call"], inputs["feeds"]
        mask = feeds.get("mask")
        mask_kind = None if mask is None else "bool" if mask.dtype == bool else "float"
        key = (call.key_given, mask_kind, self._causal_is_native(call), "nonpad_kv_seqlen" in feeds,
               bool(return_scores))
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
    opset = 24
    description = ("ONNX graph of MatMul/Add projections + Attention (opset 24: ORT's CPU kernel in float32 and "
                   "float16, the operator's function body in float64) + output projection, in onnxruntime")
    layer_class = OrtAttentionLayer
    supported_extensions = frozenset({"gqa", "causal_bottom_right", "window", "bias", "lengths"})

    def unsupported_features(self):
        return {**super().unsupported_features(), "dropout": "the ONNX Attention operator has no dropout"}

    def unsupported_dtypes(self):
        return {"bfloat16": "onnxruntime's CPU provider has no bfloat16 Attention kernel, and the operator's "
                            "function body fails to load (NOT_IMPLEMENTED: no bfloat16 Expand kernel)"}
