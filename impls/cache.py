"""Where compiled programs are kept between runs, so a second run compiles nothing it compiled before.

One directory, ``$MHABENCH_CACHE_DIR`` or ``~/.cache/mhabench`` (``$XDG_CACHE_HOME`` respected), with a
folder per compiler: ``jax/`` (XLA's persistent compilation cache, used by the JAX adapters and Keras on
JAX, every program cached however small or quick to compile), ``inductor/<setting>/`` (torch.compile's,
one per ``ATEN_CPU_CAPABILITY`` setting), ``onnx/`` (the graphs ``torch.onnx.export`` exported and the
models onnxruntime optimised); ``accuracy/``, the float64 goldens of the accuracy benchmarks and their
same-precision references' errors; and ``costs/``, what this machine's earlier runs measured, from which a run
with a time budget plans its work. Delete it to start cold; move it with the variable (``mhabench conform
--cache-dir`` sets it). Set ``MHABENCH_CACHE_DIR=off`` to keep nothing.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV = "MHABENCH_CACHE_DIR"
_enabled: set[str] = set()


def cache_root() -> Path | None:
    """The cache directory, or None when caching is off."""
    value = os.environ.get(ENV)
    if value and value.lower() in ("off", "none", "0"):
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mhabench"


def folder(name: str) -> Path | None:
    """The cache's folder ``name``, created; None when caching is off or the folder cannot be made."""
    root = cache_root()
    if root is None:
        return None
    path = root / name
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:  # an unwritable cache costs speed, never a result
        return None
    return path


def enable_jax() -> None:
    """XLA's persistent cache for this process (the JAX settings are process-wide; set once)."""
    if "jax" in _enabled:
        return
    _enabled.add("jax")
    where = folder("jax")
    if where is None:
        return
    import jax
    jax.config.update("jax_compilation_cache_dir", str(where))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# Inductor's cache keys omit the CPU capability torch runs its own kernels with (ATEN_CPU_CAPABILITY): a
# FlexAttention program compiled under AVX-512 and loaded under avx2 computes wrong outputs (decode calls with
# per-sequence positions, off by up to 3.5, reproduced with one cache shared by the two settings). So each
# setting gets a folder of its own, and with caching off Inductor keeps nothing either (its default folder is
# shared by every process of the user).
INDUCTOR_ISA_ENV = "ATEN_CPU_CAPABILITY"


def torch_environment() -> dict[str, str]:
    """The environment torch.compile reads its cache folder from (set before torch compiles anything): a
    folder per CPU capability setting, or Inductor's caches disabled when caching is off."""
    where = folder(f"inductor/{os.environ.get(INDUCTOR_ISA_ENV) or 'native'}")
    return {"TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"} if where is None else {"TORCHINDUCTOR_CACHE_DIR": str(where)}
