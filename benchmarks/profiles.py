"""Benchmark grids. asv params are static, so the grid is chosen at import by
``MHABENCH_PROFILE`` (quick | default | full; default: "default").

Every profile lists every adapter and both devices: a case that cannot run
here (framework missing, no GPU) is skipped with its reason, so results from
different machines line up. ``mhabench bench --adapters/--devices`` narrows a
run with asv's ``--bench`` regex instead of changing the grid.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

ADAPTERS = ("numpy_oracle", "torch_sdpa", "torch_mha", "keras_mha", "keras_mha@jax", "keras_mha@torch",
            "jax_dpa", "flax_mha")
MODES = ("eager", "compiled")
DEVICES = ("cpu", "cuda")
ENV_PROFILE = "MHABENCH_PROFILE"


@dataclass(frozen=True)
class Profile:
    name: str
    seq_lens: tuple[int, ...]
    num_heads: tuple[int, ...]
    batch: int = 1
    model_dim: int = 512            # key_dim = model_dim // num_heads, so H*key_dim = model_dim
    cross_kv_ratio: float = 0.5     # CrossAttention: key/value length = ratio * query length
    adapters: tuple[str, ...] = ADAPTERS
    modes: tuple[str, ...] = MODES
    devices: tuple[str, ...] = DEVICES
    # adapter -> the modes this profile runs (adapters not listed: every mode). The quick profile
    # runs each adapter in its cheap-to-start mode: torch and TF eager (torch.compile and XLA take
    # tens of seconds per shape), JAX jitted (JAX's eager mode compiles every primitive on first use).
    modes_for: tuple[tuple[str, tuple[str, ...]], ...] | None = None
    # asv timing attributes
    rounds: int = 2
    repeat: tuple[int, int, float] = (5, 20, 10.0)   # (min, max samples, max seconds)
    warmup_time: float = 0.2
    gflops_repeats: int = 5                          # calls whose median gives GFLOP/s
    timeout: float = 600.0

    def keeps_mode(self, adapter: str, mode: str) -> bool:
        return self.modes_for is None or mode in dict(self.modes_for).get(adapter, MODES)


PROFILES = {
    "quick": Profile("quick", seq_lens=(256,), num_heads=(4,),
                     modes_for=(("numpy_oracle", ("eager",)), ("torch_sdpa", ("eager",)), ("torch_mha", ("eager",)),
                                ("keras_mha", ("eager",)), ("keras_mha@torch", ("eager",)),
                                ("keras_mha@jax", ("compiled",)), ("jax_dpa", ("compiled",)),
                                ("flax_mha", ("compiled",))),
                     rounds=1, repeat=(3, 10, 0.5), warmup_time=0.05, gflops_repeats=3, timeout=120.0),
    "default": Profile("default", seq_lens=tuple(2 ** p for p in range(7, 14)), num_heads=(1, 4, 8, 16)),
    "full": Profile("full", seq_lens=tuple(2 ** p for p in range(7, 16)), num_heads=(1, 4, 8, 16),
                    timeout=1800.0),
}


def get_profile(name: str | None = None) -> Profile:
    name = name or os.environ.get(ENV_PROFILE) or "default"
    if name not in PROFILES:
        raise ValueError(f"{ENV_PROFILE}={name!r}: expected one of {', '.join(PROFILES)}")
    return PROFILES[name]
