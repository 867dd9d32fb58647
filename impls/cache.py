"""Where compiled programs are kept between runs, so a second run compiles nothing it compiled before.

One directory, ``$MHABENCH_CACHE_DIR`` or ``~/.cache/mhabench`` (``$XDG_CACHE_HOME`` respected), with a
folder per compiler: ``jax/`` (XLA's persistent compilation cache, used by the JAX adapters and Keras on
JAX, every program cached however small or quick to compile), ``inductor/`` (torch.compile's), ``onnx/``
(the graphs ``torch.onnx.export`` exported and the models onnxruntime optimised); and ``costs/``, what
this machine's earlier runs measured, from which a run with a time budget plans its work. Delete it to
start cold; move it with the variable (``mhabench conform --cache-dir`` sets it). Set
``MHABENCH_CACHE_DIR=off`` to keep nothing.
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


def torch_environment() -> dict[str, str]:
    """The environment torch.compile reads its cache folder from (set before torch compiles anything)."""
    where = folder("inductor")
    return {} if where is None else {"TORCHINDUCTOR_CACHE_DIR": str(where)}
