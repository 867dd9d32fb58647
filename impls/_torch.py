"""Helpers shared by the PyTorch adapters (torch is imported by the caller, lazily)."""
from __future__ import annotations

import math

import numpy as np

from .validation import Call, flatten_perm, inverse_perm

TORCH_DTYPES = {"float16": "float16", "bfloat16": "bfloat16", "float32": "float32", "float64": "float64"}


def torch_dtype(torch, name: str):
    return getattr(torch, TORCH_DTYPES[name])


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


def to_numpy(t) -> np.ndarray:
    """A torch tensor back to NumPy; bfloat16 goes through float32 (exact)."""
    import torch
    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        import ml_dtypes
        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


def flatten(call: Call, x):
    """``[B, *A, D]`` -> ``[prod(batch axes), prod(attended axes), D]`` (torch)."""
    x = x.permute(*flatten_perm(call))
    nb = call.n_batch
    return x.reshape(math.prod(x.shape[:nb]), math.prod(x.shape[nb:-1]), x.shape[-1])


def unflatten_query(call: Call, o):
    """``[N, T, F...]`` back to ``[B, *Q, F...]`` for the query's layout."""
    perm = flatten_perm(call)[:-1]
    q_perm_shape = tuple(call.query.shape[a] for a in perm)
    extra = tuple(o.shape[2:])
    o = o.reshape(q_perm_shape + extra)
    inv = inverse_perm(perm)
    return o.permute(*inv, *range(len(inv), len(inv) + len(extra)))


def sync(torch, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def safe_softmax(torch, scores, allowed):
    """Softmax over allowed positions; a row with none allowed gets zeros (SDPA's math path does the same)."""
    if allowed is None:
        return torch.softmax(scores, dim=-1)
    masked = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(masked, dim=-1)
    return torch.where(allowed.any(dim=-1, keepdim=True), probs, torch.zeros_like(probs))
