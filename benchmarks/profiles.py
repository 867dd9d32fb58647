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
ENV_ADAPTERS = "MHABENCH_ADAPTERS"  # the --adapter plugins of ``mhabench bench``, as :func:`plugins_env` writes them


def plugins_env(targets, directory: str | None = None) -> str:
    """``MHABENCH_ADAPTERS`` for asv's processes: JSON, so no target's own characters (the ':' between file and
    class, a Windows drive letter, a space) can split it; files made absolute, and the directory a module
    target is found from (``mhabench bench`` was run there; asv's processes run elsewhere)."""
    import json
    from mhabench.impls import plugins
    return json.dumps({"adapters": [plugins.portable_target(t) for t in targets],
                       "path": [directory or os.getcwd()]})


def load_plugins() -> list[str]:
    """Register the ``--adapter`` plugins ``mhabench bench`` passed to this (asv) process; their names. Their
    interface was checked by ``mhabench bench`` itself, so it is not checked again in every asv process."""
    import json
    import sys
    text = os.environ.get(ENV_ADAPTERS, "")
    if not text:
        return []
    try:
        passed = json.loads(text)
        targets, path = list(passed["adapters"]), list(passed.get("path", []))
    except (ValueError, TypeError, KeyError):
        raise ValueError(f"{ENV_ADAPTERS}={text!r}: expected what mhabench bench writes "
                         f'({{"adapters": ["file.py:Class", ...], "path": [...]}})') from None
    sys.path.extend(p for p in path if p not in sys.path)
    from mhabench.impls import plugins
    return [plugins.load_adhoc(t, isolate=False) for t in targets]


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
    classes: tuple[str, ...] | None = None  # benchmark classes run (None: all)
    methods: tuple[str, ...] | None = None  # benchmark methods run (None: all)
    # lengths only an adapter whose kernel never holds the scores (score_buffers == 0) runs: the fast ones
    fused_only_lens: tuple[int, ...] = ()
    # asv timing attributes
    rounds: int = 2
    repeat: tuple[int, int, float] = (5, 20, 10.0)   # (min, max samples, max seconds)
    warmup_time: float = 0.2
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

    def keeps(self, benchmark: str, adapter: str, seq_len: int) -> bool:
        """Whether this profile runs ``benchmark`` ("bench_attention.Class.method") for ``adapter`` at ``seq_len``."""
        _, cls, method = benchmark.split(".")
        if (self.classes and cls not in self.classes) or (self.methods and method not in self.methods):
            return False
        if seq_len in self.fused_only_lens:
            from mhabench import impls
            return impls.get_adapter(adapter).score_buffers == 0
        return True


PROFILES = {
    # the main job's: time and per-call memory of self and causal self-attention against L, enough lengths
    # to fit the exponent (the heads sweep and cross-attention are the default profile's)
    "quick": Profile("quick", seq_lens=(128, 256, 512, 1024, 2048, 4096), num_heads=(8,), one_mode=True,
                     classes=("SelfAttention", "CausalSelfAttention"), methods=("time_forward", "track_peakmem_forward"),
                     fused_only_lens=(4096,), rounds=1, repeat=(3, 10, 0.5), warmup_time=0.05, memory_samples=3,
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
