"""``torch.nn.MultiheadAttention`` exported to ONNX by ``torch.onnx.export`` and run in onnxruntime.

The porter's question: does the exported model still compute the attention the eager module does?
Everything up to the module call is ``torch_mha``'s: the module, its weights, and the call it makes
(``batch_first``, the mask as ``attn_mask``/``key_padding_mask`` the way ``torch_mha`` passes it,
``need_weights=False`` for the default call, ``need_weights=True, average_attn_weights=False`` for
the scores). That call is exported instead of run: the module wrapped with those keyword arguments,
``dynamo=True`` (the exporter's default), ``opset_version=25`` (the newest it exports correctly:
26 and 27 give models ORT rejects), every sequence and batch axis dynamic, as one deploys a model.
ORT then runs the ONNX graph on the call's tensors. Modern attention goes through as ``torch_mha``
maps it (a float ``attn_mask`` for the bias, ``key_padding_mask`` for key/value lengths, bottom-right
causal, windows and query lengths in ``attn_mask``): each is only another tensor of the exported call.

Exporting takes seconds, so a graph is exported once for each structure (module configuration,
dtype, which masks are tensors and their ranks, need_weights) and kept: in this process, and in the
cache's ``onnx/`` folder (keyed by the structure and the exporter's versions), so a new process loads
the file instead of exporting again. Later layers of that structure load their own weights into a copy
of it by initializer name; where the exporter folded a weight into another constant, the layer exports
its own graph. ORT's optimised model is kept as well (``_onnx.session``).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import threading

from . import _onnx, cache, torch_mha

EXPORT_OPSET = 25
TENSOR_ARGUMENTS = ("query", "key", "value", "attn_mask", "key_padding_mask")  # what the exported graph takes
EXAMPLE = {"N": 2, "T": 3, "S": 5}  # export-time sizes: distinct and >= 2, so no axis is specialised to its size
_templates: dict = {}  # structure -> the ONNX model exported first for it, in this process
_lock = threading.Lock()


def example_shape(name: str, shape: tuple, batch_first: bool, num_heads: int) -> tuple:
    """An export-time shape for one argument, from nn.MultiheadAttention's documented layouts."""
    N, T, S = EXAMPLE["N"], EXAMPLE["T"], EXAMPLE["S"]
    seq = lambda L: (N, L) if batch_first else (L, N)
    if name in ("query", "key", "value"):
        return seq(T if name == "query" else S) + tuple(shape[2:])
    if name == "key_padding_mask":
        return (N, S)
    return (T, S) if len(shape) == 2 else (N * num_heads, T, S)  # attn_mask


class ExportedCall:
    """Stands in for the module in ``torch_mha``'s layer (its ``module_call``): exports the call it receives,
    runs it in ORT."""

    def __init__(self, layer):
        self.layer, self.torch = layer, layer.torch
        self.structure = (layer.spec, layer.dims, layer.dtype, layer.batch_first)
        self._sessions: dict = {}

    def __call__(self, query, key, value, **kwargs):
        torch = self.torch
        tensors = dict(query=query, key=key, value=value, **{k: v for k, v in kwargs.items() if torch.is_tensor(v)})
        constants = {k: v for k, v in kwargs.items() if k not in tensors}
        unknown = set(tensors) - set(TENSOR_ARGUMENTS)
        if unknown:
            raise TypeError(f"torch_mha@ort: the module call passes tensors {sorted(unknown)} this export does not map")
        structure = (self.structure, tuple((n, t.ndim, str(t.dtype)) for n, t in tensors.items()),
                     tuple(sorted((k, repr(v)) for k, v in constants.items())))
        if structure not in self._sessions:
            self._sessions[structure] = _onnx.session(self._model(structure, tensors, constants))
        outputs = _onnx.run(self._sessions[structure], {n: t.detach().cpu().contiguous().numpy()
                                                        for n, t in tensors.items()})
        out = [torch.from_numpy(o) for o in outputs]
        return out[0], (out[1] if constants.get("need_weights", True) else None)

    def _model(self, structure, tensors, constants):
        """The template for this structure with this layer's weights, exporting it first if needed."""
        import onnx
        from onnx import numpy_helper
        with _lock:
            if structure not in _templates:
                _templates[structure] = self._exported(structure, tensors, constants)
            model = onnx.ModelProto()
            model.CopyFrom(_templates[structure])
        state = {f"mha.{k}": v for k, v in self.layer.module.state_dict().items()}
        found = {init.name for init in model.graph.initializer} & set(state)
        if found != set(state):  # the exporter folded a weight into another constant: export this layer's own
            return self._export(tensors, constants)
        for init in model.graph.initializer:
            if init.name in state:
                init.CopyFrom(numpy_helper.from_array(_torch_numpy(state[init.name]), init.name))
        return model

    def _exported(self, structure, tensors, constants):
        """The structure's graph from the cache folder, or exported now and written there."""
        import onnx
        path = template_path(structure)
        if path is not None and path.is_file():
            try:
                return onnx.load(str(path))
            except Exception:  # unreadable (a write cut short): export again
                pass
        model = self._export(tensors, constants)
        if path is not None:
            partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}")
            try:
                onnx.save(model, str(partial))
                os.replace(partial, path)
            except OSError:  # an unwritable cache costs the next process an export, never a result
                pass
        return model

    def _export(self, tensors, constants):
        torch, layer = self.torch, self.layer
        auto = torch.export.Dim.AUTO
        examples, dynamic = {}, {}
        for name, t in tensors.items():
            shape = example_shape(name, tuple(t.shape), layer.batch_first, layer.spec.num_heads)
            examples[name] = torch.zeros(shape, dtype=t.dtype)
            feature_axis = name in ("query", "key", "value")
            dynamic[name] = {axis: auto for axis in range(len(shape) - feature_axis)}

        class Call(torch.nn.Module):
            def __init__(self, mha):
                super().__init__()
                self.mha = mha

            def forward(self, query, key, value, attn_mask=None, key_padding_mask=None):
                masks = {"attn_mask": attn_mask, "key_padding_mask": key_padding_mask}
                return self.mha(query, key, value, **{k: v for k, v in masks.items() if v is not None}, **constants)

        args = tuple(examples.get(n) for n in TENSOR_ARGUMENTS)
        shapes = tuple(dynamic.get(n) for n in TENSOR_ARGUMENTS)
        with contextlib.redirect_stdout(io.StringIO()):  # the exporter prints its progress
            program = torch.onnx.export(Call(layer.module).eval(), args, dynamo=True, opset_version=EXPORT_OPSET,
                                        dynamic_shapes=shapes, verbose=False)
        return program.model_proto


def template_path(structure):
    """Where the cache keeps the graph exported for ``structure``: named by the structure and the versions of
    everything that writes the graph (torch's exporter, onnxscript, onnx, the opset); None when caching is off."""
    import importlib.metadata
    folder = cache.folder("onnx")
    if folder is None:
        return None
    versions = [f"{dist} {importlib.metadata.version(dist)}" for dist in ("torch", "onnxscript", "onnx")]
    key = repr((structure, versions, EXPORT_OPSET)).encode()
    return folder / f"torch_mha-{hashlib.sha256(key).hexdigest()[:32]}.onnx"


def _torch_numpy(t):
    return t.detach().cpu().numpy()


class TorchMHAOrtAdapter(_onnx.OrtAdapter):
    name = "torch_mha@ort"
    framework = "PyTorch -> ONNX Runtime"
    requires = ("torch", "onnxscript", "onnxruntime", "onnx")
    distributions = ("torch", "onnxscript", "onnxruntime", "onnx")
    install_hint = 'pip install torch==2.13.0 "mhabench[torch,onnx]"'
    opset = EXPORT_OPSET
    description = ("torch.nn.MultiheadAttention as torch_mha calls it, exported by torch.onnx.export (dynamo, "
                   "opset 25, dynamic axes) and run by onnxruntime")

    layer_class = torch_mha.TorchMHALayer  # torch_mha's layer: its module, weights, mask translation and call

    def _build(self, spec, weights, dtype, device, mode, **options):
        """torch_mha's layer, composed with an ExportedCall that runs the module's call as an ONNX graph."""
        return self.layer_class(self, spec, weights, dtype, device, mode, module_call=ExportedCall, **options)

    @property
    def supported_extensions(self):
        """torch_mha's (a float attn_mask for the bias, key_padding_mask, the rest in attn_mask): the exported call
        takes the same tensors."""
        return torch_mha.TorchMHAAdapter().capabilities().supported_extensions
    reduced_matrix = ("each new module structure, dtype and mask form is a torch.onnx.export (3-15 s on a small CPU): "
                      "the full matrix took 10.5 minutes on a busy 2-core machine")

    def unsupported_features(self):
        eager = torch_mha.TorchMHAAdapter().capabilities().unsupported_features
        return {**eager, **super().unsupported_features(),
                "dropout": "torch.onnx.export exports the module in eval mode (training=TrainingMode.EVAL)"}

    def unsupported_dtypes(self):
        return {"bfloat16": "onnxruntime's CPU provider has no bfloat16 kernel for the exported graph's Gemm "
                            "(NOT_IMPLEMENTED when the session is created)"}
