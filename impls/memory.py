"""Peak memory of one call, not of the process: the CPU probe every adapter can use.

CPU: the rise of the resident-set high-water mark (``VmHWM``) around the call.
Writing "5" to ``/proc/self/clear_refs`` resets ``VmHWM`` to the current RSS
(Linux >= 4.0), and ``malloc_trim`` first hands memory that glibc kept from
earlier calls back to the kernel, so the call's allocations show up as new
pages instead of reused ones. Frameworks that pool memory (TensorFlow), and
every GPU, are measured by the framework's own peak counter instead: each
adapter declares which probe measures it (``Adapter.peak_memory``), and the
family helpers (``_torch``, ``_jax``, ``_keras``) hold those probes.

One sample moves in steps of a few MiB (the allocator's arenas), so the
benchmarks take several, after a warm-up, and report their median.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Callable

_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


class MemoryProbeUnavailable(RuntimeError):
    """This platform (or this framework on this device) offers no way to measure the peak of one call."""


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


# ---- refusing a call that cannot fit ----------------------------------------------------------------
ENV_CHECK = "MHABENCH_MEMORY_CHECK"  # "off": let every call through, however large


class CallTooLarge(ValueError):
    """A call estimated to need more memory than the machine has available; refused before any framework
    sees it (each framework fails its own way otherwise, or hangs)."""


def available_bytes() -> int | None:
    """Memory available now (psutil where installed, else /proc/meminfo); None when unknown."""
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except Exception:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def call_bytes(call, spec, itemsize: int, gradients: bool = False) -> int:
    """Bytes one call needs at its peak, roughly and on the high side: a few score-sized buffers (scores,
    their exponentials, the weights, a mask), the inputs and their projections, the output; a backward
    pass keeps about two and a half times as much."""
    import math
    n, t, s = call.n_flat, call.q_len, call.k_len
    heads, width = spec.num_heads, max(spec.key_dim, spec.value_head_dim)
    scores = n * heads * t * s
    projections = n * (t + 2 * s) * heads * width
    inputs = sum(math.prod(a.shape) for a in (call.query, call.value, call.key))
    output = math.prod(call.output_shape)
    total = itemsize * (3 * scores + 2 * projections + 2 * inputs + output) + scores  # + a boolean mask
    return int(total * (2.5 if gradients else 1))


def check_call_fits(call, spec, itemsize: int, gradients: bool = False) -> None:
    """CallTooLarge when the call's estimate exceeds the memory available (unless MHABENCH_MEMORY_CHECK=off)."""
    if os.environ.get(ENV_CHECK, "").lower() in ("off", "0", "no"):
        return
    limit = available_bytes()
    need = call_bytes(call, spec, itemsize, gradients)
    if limit is not None and need > limit:
        gib = lambda b: f"{b / 2 ** 30:.1f} GiB"
        raise CallTooLarge(f"this call needs about {gib(need)} (scores {list(call.scores_shape)}, key_dim "
                           f"{spec.key_dim}, {itemsize}-byte elements{', with gradients' if gradients else ''}) but "
                           f"{gib(limit)} of memory are available; use smaller inputs, or set "
                           f"{ENV_CHECK}=off (or layer.check_memory = False) to attempt it anyway")
