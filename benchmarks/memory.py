"""Peak memory of one call, not of the process.

CPU: the rise of the resident-set high-water mark (``VmHWM``) around the call.
Writing "5" to ``/proc/self/clear_refs`` resets ``VmHWM`` to the current RSS
(Linux >= 4.0), and ``malloc_trim`` first hands memory that glibc kept from
earlier calls back to the kernel, so the call's allocations show up as new
pages instead of reused ones. GPU: the framework's own peak counter, reset
before the call (``torch.cuda.reset_peak_memory_stats``); JAX cannot reset its
counter, so the JAX probe reads ``peak_bytes_in_use`` and only reports a rise.
TensorFlow pools freed memory on CPU as well (a repeated call raises no RSS), so
for TensorFlow the allocator's own peak counter is used on both devices.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Callable

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


class MemoryProbeUnavailable(RuntimeError):
    """This platform offers no way to measure the peak of one call."""


def _status_kib(field: str) -> int:
    with open(_STATUS) as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise MemoryProbeUnavailable(f"{_STATUS} has no {field} line")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def hwm_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def _malloc_trim() -> None:
    libc_name = ctypes.util.find_library("c")
    if libc_name:
        try:
            ctypes.CDLL(libc_name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc: nothing to trim
            pass


def cpu_probe_available() -> tuple[bool, str]:
    if not (os.path.exists(_STATUS) and os.path.exists(_CLEAR_REFS)):
        return False, "needs Linux /proc/self/status and /proc/self/clear_refs"
    try:
        reset_hwm()
    except OSError as exc:
        return False, f"cannot reset VmHWM through {_CLEAR_REFS}: {exc}"
    return True, ""


def reset_hwm() -> None:
    with open(_CLEAR_REFS, "w") as fh:
        fh.write("5")


def cpu_peak_rise(fn: Callable[[], object]) -> int:
    """Bytes by which the process's peak RSS rises during ``fn()`` (its result is dropped after)."""
    ok, why = cpu_probe_available()
    if not ok:
        raise MemoryProbeUnavailable(why)
    _malloc_trim()
    reset_hwm()
    base = rss_bytes()
    result = fn()
    peak = hwm_bytes()
    del result
    return max(peak - base, 0)


def torch_cuda_peak_rise(fn: Callable[[], object]) -> int:
    import torch
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del result
    return max(peak - base, 0)


def jax_gpu_peak_rise(fn: Callable[[], object]) -> int:
    """JAX's peak counter never resets: a call below an earlier peak reports 0, so run this first."""
    import jax
    device = jax.devices("gpu")[0]
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" not in stats:
        raise MemoryProbeUnavailable("jax memory_stats() has no peak_bytes_in_use "
                                     "(XLA_PYTHON_CLIENT_ALLOCATOR=platform?)")
    base = stats["bytes_in_use"]
    result = fn()
    peak = device.memory_stats()["peak_bytes_in_use"]
    del result
    return max(peak - base, 0)


def tensorflow_peak_rise(fn: Callable[[], object], device: str = "cpu") -> int:
    """TensorFlow keeps freed tensor memory in its own allocator pool on CPU too, so a repeated
    call raises no RSS: its allocator's own peak counter is the measure, on CPU and GPU."""
    import tensorflow as tf
    name = "CPU:0" if device == "cpu" else "GPU:0"
    tf.config.experimental.reset_memory_stats(name)
    base = tf.config.experimental.get_memory_info(name)["current"]
    result = fn()
    peak = tf.config.experimental.get_memory_info(name)["peak"]
    del result
    return max(peak - base, 0)


def peak_rise(fn: Callable[[], object], device: str = "cpu", framework: str = "torch") -> int:
    """Per-call peak memory of ``fn()`` on ``device`` ("cpu" or "cuda"), in bytes."""
    if framework == "tensorflow":
        return tensorflow_peak_rise(fn, device)
    if device == "cpu":
        return cpu_peak_rise(fn)
    if framework == "torch":
        return torch_cuda_peak_rise(fn)
    if framework == "jax":
        return jax_gpu_peak_rise(fn)
    raise MemoryProbeUnavailable(f"no GPU peak-memory probe for framework {framework!r}")
