"""ONNX Runtime: the ONNX ``Attention`` operator (opset 24) inside a whole-layer ONNX graph.

The graph is the layer: MatMul + Add projections, ``Attention`` on 3-D ``[N, L, H*d]`` inputs with
``q_num_heads = kv_num_heads = H``, MatMul + Add output projection. So every dtype runs end to end in
ORT as a deployed model does, and the benchmarks time ORT alone; only the flattening of the attended
axes happens in NumPy. Opset 24 is the newest ORT's CPU provider has an Attention kernel for (float32,
float16); float64 runs the operator's ONNX function body. The mask is the boolean ``attn_mask``
(True = attend, our polarity); ORT's kernel broadcasts its batch and head axes, never the query or
key axis, so it goes as ``[T, S]``, ``[H, T, S]`` or ``[N, 1|H, T, S]``. Causal is ``is_causal=1``,
top-left without a KV cache as ours. Scores: ``qk_matmul_output`` in mode 3 (the probabilities).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from . import _onnx
from .spec import Weights
from .validation import flatten, unflatten


class OrtAttentionLayer(_onnx.OrtLayer):
    def __init__(self, adapter, spec, weights, dtype, device, mode="compiled", **options):
        super().__init__(adapter, spec, weights, dtype, device, mode, **options)
        self.shapes = {n: a.shape for n, a in weights.as_dict().items()}
        # [D, H, d] -> [D, H*d]; Wo [H, d, *out] -> [H*d, F]; biases flat
        self.arrays = {n: a.reshape(a.shape[0] * a.shape[1] if n == "Wo" else a.shape[0], -1) if n[0] == "W"
                       else a.reshape(-1) for n, a in weights.as_dict().items()}

    def _dense(self, x, w, out):
        from onnx import helper
        if "b" + w[1] not in self.arrays:
            return [helper.make_node("MatMul", [x, w], [out])]
        return [helper.make_node("MatMul", [x, w], [out + "0"]), helper.make_node("Add", [out + "0", "b" + w[1]], [out])]

    def _model(self, key_given, mask_rank, causal, scores):
        from onnx import TensorProto, helper, numpy_helper
        value_info = lambda name, elem=_onnx.element_type(self.dtype): helper.make_tensor_value_info(name, elem, None)
        inputs = [value_info(n) for n in ["query", "value"] + ["key"] * key_given]
        inputs += [value_info("mask", TensorProto.BOOL)] * bool(mask_rank)
        nodes = self._dense("query", "Wq", "q") + self._dense("key" if key_given else "value", "Wk", "k") \
            + self._dense("value", "Wv", "v")
        nodes.append(helper.make_node("Attention", ["q", "k", "v"] + ["mask"] * bool(mask_rank),
                                      ["y", "", "", "probs"] if scores else ["y"], q_num_heads=self.spec.num_heads,
                                      kv_num_heads=self.spec.num_heads, is_causal=int(causal),
                                      **({"qk_matmul_output_mode": 3} if scores else {})))
        nodes += self._dense("y", "Wo", "output")
        weights = [numpy_helper.from_array(self._array(a), n) for n, a in self.arrays.items()]
        graph = helper.make_graph(nodes, self.adapter.name, inputs,
                                  [value_info("output")] + [value_info("probs")] * scores, weights)
        opsets = [helper.make_opsetid("", self.adapter.opset)]
        return helper.make_model(graph, opset_imports=opsets, ir_version=helper.find_min_ir_version_for(opsets))

    def _mask(self, call):
        """The mask alone (causal goes to ``is_causal``), with the batch axes kept where they broadcast."""
        mask = dataclasses.replace(call, causal=False).flat_allowed()  # [N, 1|H, T, S]
        if all(n == 1 for n in call.mask.shape[:call.n_batch]):
            mask = mask[0] if mask.shape[1] > 1 else mask[0, 0]
        return np.ascontiguousarray(mask)

    def _native(self, call, requires_grad=False):
        feeds = {n: self._array(flatten(call, getattr(call, n))) for n in ["query", "value"] + ["key"] * call.key_given}
        if call.mask is not None:
            feeds["mask"] = self._mask(call)
        return {"feeds": feeds, "call": call}

    def _run(self, inputs, return_scores, training, seed):
        call, feeds = inputs["call"], inputs["feeds"]
        key = (call.key_given, feeds["mask"].ndim if "mask" in feeds else 0, call.causal, bool(return_scores))
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

    def unsupported_features(self):
        return {**super().unsupported_features(), "dropout": "the ONNX Attention operator has no dropout",
                # the operator has kv_num_heads, a float attn_mask and nonpad_kv_seqlen; the graph this adapter
                # builds wires none of them yet, so a case using them is refused rather than run without them
                "gqa": "ort_attention's graph projects key and value with num_heads heads (the operator's "
                       "kv_num_heads is not wired)",
                "bias": "ort_attention's graph passes the mask as a boolean attn_mask (a float one is not wired)",
                "lengths": "ort_attention's graph takes padding as the mask only (nonpad_kv_seqlen is not wired)",
                "window": "the ONNX Attention operator has no sliding window; ort_attention does not build one "
                          "into attn_mask",
                "causal_bottom_right": "the operator's is_causal is top-left; ort_attention does not build the "
                                       "bottom-right triangle into attn_mask"}

    def unsupported_dtypes(self):
        return {"bfloat16": "onnxruntime's CPU provider has no bfloat16 Attention kernel, and the operator's "
                            "function body fails to load (NOT_IMPLEMENTED: no bfloat16 Expand kernel)"}
