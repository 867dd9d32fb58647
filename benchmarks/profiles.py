"""Benchmark grids. asv params are static, so the grid is chosen at import by
``MHABENCH_PROFILE`` (quick | default | full; default: "default").

Every profile lists every registered adapter (built-in, entry-point plugins, and the ``--adapter``
plugins ``mhabench bench`` passes in ``MHABENCH_ADAPTERS``) and both devices: a case that cannot run
here (framework missing, no GPU) is skipped with its reason, so results from different machines line
up. ``mhabench bench --adapters/--devices`` narrows a run with asv's ``--bench`` regex instead of
changing the grid. The modes each adapter runs come from the adapter (``quick_mode``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from mhabench.impls.base import MODES

DEVICES = ("cpu", "cuda")
ENV_PROFILE = "MHABENCH_PROFILE"
ENV_ADAPTERS = "MHABENCH_ADAPTERS"  # ad-hoc plugin adapters ("file.py:Class"), separated by os.pathsep


def load_plugins() -> list[str]:
    """Register the ``--adapter`` plugins ``mhabench bench`` passed to this (asv) process; their names."""
    targets = [t for t in os.environ.get(ENV_ADAPTERS, "").split(os.pathsep) if t]
    if not targets:
        return []
    from mhabench.impls import plugins
    return [plugins.load_adhoc(t) for t in targets]


def adapter_names() -> tuple[str, ...]:
    """The adapters of the grid: every registered adapter, plugins included."""
    from mhabench import impls
    load_plugins()
    return tuple(impls.list_adapters())


@dataclass(frozen=True)
class Profile:
    name: str
    seq_lens: tuple[int, ...]
    num_heads: tuple[int, ...]
    batch: int = 1
    model_dim: int = 512            # key_dim = model_dim // num_heads, so H*key_dim = model_dim
    cross_kv_ratio: float = 0.5     # CrossAttention: key/value length = ratio * query length
    devices: tuple[str, ...] = DEVICES
    one_mode: bool = False          # each adapter in its quick_mode only (else every mode it has)
    # asv timing attributes
    rounds: int = 2
    repeat: tuple[int, int, float] = (5, 20, 10.0)   # (min, max samples, max seconds)
    warmup_time: float = 0.2
    gflops_repeats: int = 5                          # calls whose median gives GFLOP/s
    memory_samples: int = 5                          # per-call peaks whose median is reported
    timeout: float = 600.0

    @property
    def adapters(self) -> tuple[str, ...]:
        return adapter_names()

    def keeps_mode(self, adapter: str, mode: str) -> bool:
        """Whether this profile runs ``adapter`` in ``mode``: a mode the adapter has, and in the quick profile
        only the one its users usually run fastest (its ``quick_mode``, else its default mode)."""
        from mhabench import impls
        a = impls.get_adapter(adapter)
        if self.one_mode:
            return mode == (a.quick_mode or a.default_mode)
        return mode in a.capabilities().modes


PROFILES = {
    "quick": Profile("quick", seq_lens=(256,), num_heads=(4,), one_mode=True,
                     rounds=1, repeat=(3, 10, 0.5), warmup_time=0.05, gflops_repeats=3, memory_samples=3,
                     timeout=120.0),
    "default": Profile("default", seq_lens=tuple(2 ** p for p in range(7, 14)), num_heads=(1, 4, 8, 16)),
    "full": Profile("full", seq_lens=tuple(2 ** p for p in range(7, 16)), num_heads=(1, 4, 8, 16),
                    timeout=1800.0),
}


def get_profile(name: str | None = None) -> Profile:
    name = name or os.environ.get(ENV_PROFILE) or "default"
    if name not in PROFILES:
        raise ValueError(f"{ENV_PROFILE}={name!r}: expected one of {', '.join(PROFILES)}")
    return PROFILES[name]
