"""The PyTorch family: what every torch adapter shares (torch is imported lazily, on first use).

``TorchAdapter`` declares the family's facts (distribution, install hint, devices, the CUDA peak
counter); ``TorchLayer`` does the plumbing once: tensors in and out, flattened inputs, gradients
through autograd and the device sync. A torch adapter then writes only its ``_compute`` (the
framework's default call on native inputs) and what it translates (weights, mask).
"""
from __future__ import annotations

import os

import numpy as np

from . import cache, memory
from .base import Adapter, Layer
from .facts import Switch
from .validation import flatten, unflatten

TORCH_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32", "float64": "float64"}


def torch_dtype(torch, name: str):
    return getattr(torch, TORCH_DTYPES[name])


class XP:
    """The two array functions ``validation.flatten``/``unflatten`` need, in torch's spelling."""

    @staticmethod
    def transpose(x, perm):
        return x.permute(*perm)

    @staticmethod
    def reshape(x, shape):
        return x.reshape(shape)


def available_devices() -> tuple[str, ...]:
    import torch
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def tensor(torch, x, dtype: str, device: str, requires_grad: bool = False):
    """NumPy (any float dtype, bfloat16 included) -> torch tensor of ``dtype`` on ``device``."""
    arr = np.asarray(x)
    if arr.dtype.kind == "V" or arr.dtype.name == "bfloat16":
        arr = arr.astype(np.float32)
    t = torch.from_numpy(np.array(arr, copy=True, order="C")).to(device=device, dtype=torch_dtype(torch, dtype))
    return t.requires_grad_(requires_grad) if requires_grad else t


def bool_tensor(torch, x, device: str):
    return None if x is None else torch.from_numpy(np.array(x, dtype=bool, copy=True, order="C")).to(device)


def to_numpy(t) -> np.ndarray:
    """A torch tensor back to NumPy; bfloat16 goes through float32 (exact)."""
    import torch
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


def sync(torch, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def cuda_peak_rise(fn) -> int:
    """torch's own CUDA peak counter, reset before the call."""
    import torch
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return max(peak - base, 0)


def refusal_reason(exc: BaseException, caught) -> str | None:
    """Why SDPA refused a call under ``sdpa_kernel`` (the kernel's own warnings, then the error), or None when
    ``exc`` is not such a refusal."""
    text = str(exc)
    if not isinstance(exc, RuntimeError) or not ("No available kernel" in text or "No viable backend" in text):
        return None
    why = [str(w.message).split(" (Triggered internally at")[0].strip() for w in caught]
    why = [w for w in dict.fromkeys(why) if w]
    return "; ".join(why + [text.strip()])


# torch compiles its vectorised CPU kernels once per capability and picks one at start-up, from the CPU or from
# ATEN_CPU_CAPABILITY; Inductor follows the same variable (torch/_inductor/cpu_vec_isa.py, pick_vec_isa).
CPU_CAPABILITY = Switch(
    name="torch_cpu", variable="ATEN_CPU_CAPABILITY",
    settings={"default": "default", "avx2": "avx2", "avx512": "avx512"},
    fact="torch_cpu_capability", expect={"default": "default", "avx2": "avx2", "avx512": "avx512"},
    requires={"avx2": ("avx2", "fma"), "avx512": ("avx512f", "avx512bw", "avx512vl", "avx512dq")},
    description="torch's vectorised CPU kernels: the scalar build (default), AVX2 or AVX-512")
# Lanes of at::vec::Vectorized: 64 bytes under the AVX-512 capability, 32 under every other x86 one, the scalar
# default included (aten/src/ATen/cpu/vec/vec_base.h, VECTOR_WIDTH)
VECTOR_BITS = {"avx512": 512, "avx2": 256, "default": 256}


def kernel_facts() -> dict:
    """torch's kernel choice in this process, as torch reports it."""
    import torch
    capability = torch.backends.cpu.get_cpu_capability().lower()
    return {"torch_cpu_capability": capability, "torch_vector_bits": VECTOR_BITS.get(capability),
            "torch_mkldnn": bool(torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled),
            "torch_threads": torch.get_num_threads()}


class TorchAdapter(Adapter):
    """The facts every PyTorch adapter shares."""

    family = "torch"
    requires = ("torch",)
    distributions = ("torch",)
    install_hint = 'pip install torch==2.13.0 "mhabench[torch]"'

    def available_devices(self):
        return available_devices()

    def switches(self):
        return (CPU_CAPABILITY,)

    def kernel_facts(self):
        return kernel_facts()

    def peak_memory(self, fn, device="cpu"):
        return cuda_peak_rise(fn) if device.startswith("cuda") else memory.cpu_peak_rise(fn)


class TorchLayer(Layer):
    """Plumbing shared by the torch layers.

    A subclass sets ``self.params`` (name -> tensor, canonical or its module's names) and implements
    ``_compute(inputs, params)``: the framework's default call on the inputs ``_native`` built (the
    ``query``/``value``/``key`` tensors, the translated ``mask``, the additive ``bias`` as
    ``Call.flat_bias`` gives it or None, ``call``).
    """

    def __init__(self, adapter, spec, weights, dtype, device, mode="eager", **options):
        super().__init__(adapter, spec, weights, dtype, device, mode, **options)
        if mode == "compiled":
            for key, value in cache.torch_environment().items():
                os.environ.setdefault(key, value)
        import torch
        self.torch = torch

    def _tensor(self, x, requires_grad=False):
        return tensor(self.torch, x, self.dtype, self.device, requires_grad)

    def _native(self, call, requires_grad=False):
        t = lambda x: self._tensor(x, requires_grad)
        query, value = t(call.query), t(call.value)
        key = t(call.key) if call.key_given else value  # without a key, value feeds both projections
        bias = call.flat_bias()  # [N|1, H|1, T|1, S|1], -inf kept (it masks)
        return {"query": query, "value": value, "key": key, "mask": self._mask(call), "call": call,
                "bias": None if bias is None else t(bias)}

    def _mask(self, call):
        """The mask in the form the framework takes it (None: no mask)."""
        return None

    def _native_array(self, x):
        return self._tensor(x)

    def _flat(self, call, x):
        return flatten(call, x, XP)

    def _unflat(self, call, o):
        return unflatten(call, o, XP)

    def _compute(self, inputs, params):
        raise NotImplementedError

    def _output(self, inputs):
        with self.torch.no_grad():
            return self._compute(inputs, self.params)

    def _backward(self, inputs, cotangent):
        torch = self.torch
        call = inputs["call"]
        names = ["query", "value"] + (["key"] if call.key_given else []) + (["bias"] if call.bias is not None else [])
        leaves = {n: inputs[n] for n in names}
        params = self._grad_leaves()
        with torch.enable_grad():
            out = self._compute(inputs, params)
            grads = torch.autograd.grad(out, list(leaves.values()) + list(params.values()), cotangent,
                                        allow_unused=True)
        # an input autograd never reached (a bias over S = 0 keys, say) has a zero gradient
        result = {n: g if g is not None else torch.zeros_like(leaves[n]) for n, g in zip(names, grads[:len(names)])}
        result.update({k: (g if g is not None else torch.zeros_like(params[k]))
                       for k, g in zip(params, grads[len(names):])})
        return result

    def _grad_leaves(self) -> dict:
        """The parameter tensors autograd differentiates, under the names ``_compute`` reads."""
        return {k: v.detach().requires_grad_(True) for k, v in self.params.items()}

    def _to_numpy(self, x):
        return to_numpy(x)

    def _sync(self, x):
        sync(self.torch, self.device)
        return x


class ProjectedLayer(TorchLayer):
    """Attention as its PyTorch users write it around a fused core: ``torch.einsum`` projections of query,
    key and value into heads, the core (``_heads``: ``scaled_dot_product_attention``, ``flex_attention``),
    the output projection. ``params`` are the canonical weights as tensors; mode "compiled" compiles the
    whole computation with ``torch.compile``."""

    def __init__(self, adapter, spec, weights, dtype, device, mode="eager", **options):
        super().__init__(adapter, spec, weights, dtype, device, mode, **options)
        self.params = {k: self._tensor(v) for k, v in weights.as_dict().items()}
        self._core = self._attention if mode == "eager" else self.torch.compile(self._attention, dynamic=False)

    def _project(self, call, x, W, b):
        y = self.torch.einsum("nld,dhk->nhlk", self._flat(call, x), W)
        return y if b is None else y + b[None, :, None, :]

    def _attention(self, query, value, key, mask, bias, p: dict, dropout_p: float, call):
        q = self._project(call, query, p["Wq"], p.get("bq"))
        k = self._project(call, key, p["Wk"], p.get("bk"))
        v = self._project(call, value, p["Wv"], p.get("bv"))
        o = self._heads(q, k, v, mask, bias, dropout_p, call)  # [N, H, T, vd]
        o = self._unflat(call, o.transpose(1, 2))  # [B, *Q, H, vd]
        H, vd = self.spec.num_heads, self.spec.value_head_dim
        out = self.torch.einsum("...hv,hvo->...o", o, p["Wo"].reshape(H, vd, -1))
        if "bo" in p:
            out = out + p["bo"].reshape(-1)
        return out.reshape(tuple(call.output_shape)), (q, k)

    def _heads(self, q, k, v, mask, bias, dropout_p: float, call):
        """The attention core on projected heads ``[N, H|H_kv, L, d]``: the output heads ``[N, H, T, vd]``."""
        raise NotImplementedError

    def _compute(self, inputs, params, dropout_p=0.0):
        return self._core(inputs["query"], inputs["value"], inputs["key"], inputs["mask"], inputs["bias"], params,
                          dropout_p, inputs["call"])[0]

    def export_weights(self):
        from .spec import Weights
        return Weights(**{k: to_numpy(v).astype("float64") for k, v in self.params.items()})

