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
from mhabench.results import ACCURACY_CLASSES, is_accuracy

from .sampling import Sampling

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
    """Register the ``--adapter`` plugins ``mhabench bench`` passed to this (asv) process; their names.

    Without the interface check: ``mhabench bench`` made it before starting asv, and running an adapter here,
    where asv's forkserver imports the suite, would start its framework's thread pool, in which every
    benchmark process forked from the server then hangs (GNU OpenMP does not survive a fork)."""
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
    return [plugins.load_adhoc(t, isolate=False, check=False) for t in targets]


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
    # the longest sweeps first cover this many lengths per adapter and class (mhabench bench --budget)
    coverage_lengths: int = 4
    accuracy_heads: int = 8         # the accuracy classes run at this head count only
    accuracy_lens: tuple[int, ...] | None = None  # and at these lengths (None: every one of seq_lens)
    accuracy_gradients: bool = True  # the accuracy of the gradients too (up to accuracy.GRADIENT_MAX_LEN)
    sampling: Sampling = Sampling(max_samples=100, max_seconds=5.0, warmup_seconds=0.2)
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

    def keeps(self, benchmark: str, num_heads: int | None = None, seq_len: int | None = None) -> bool:
        """Whether this profile runs ``benchmark`` ("bench_attention.Class.method"), at ``num_heads`` and
        ``seq_len`` when given (the accuracy classes run at ``accuracy_heads`` and ``accuracy_lens`` only)."""
        _, cls, method = benchmark.split(".")
        if is_accuracy(cls) and not self.keeps_accuracy_point(num_heads, seq_len):
            return False
        return not ((self.classes and cls not in self.classes) or (self.methods and method not in self.methods))

    def keeps_accuracy_point(self, num_heads: int | None, seq_len: int | None) -> bool:
        """Whether the accuracy classes run at this head count and length (None: any)."""
        return (num_heads is None or int(num_heads) == self.accuracy_heads) and \
            (seq_len is None or self.accuracy_lens is None or int(seq_len) in self.accuracy_lens)


def accuracy_methods(metrics=None, dtypes=None) -> tuple[str, ...]:
    """The accuracy classes' method names (``track_<figure>_<dtype>``), for the figures and dtypes given."""
    from .accuracy import ACCURACY_FIGURES, DTYPES
    return tuple(f"track_{m}_{d}" for m in metrics or ACCURACY_FIGURES for d in dtypes or DTYPES)


PROFILES = {
    # the main job's: time and per-call memory of self and causal self-attention against L, enough lengths
    # to fit the exponent (the heads sweep and cross-attention are the default profile's)
    "quick": Profile("quick", seq_lens=(128, 256, 512, 1024, 2048, 4096), num_heads=(8,), one_mode=True,
                     # accuracy: self and causal self-attention on normal inputs at the 4 shortest lengths, one
                     # asv method per dtype (each case's measurement records every figure in bench/accuracy.jsonl)
                     classes=("SelfAttention", "CausalSelfAttention", "SelfAccuracy", "CausalAccuracy"),
                     methods=("track_time_forward", "track_peakmem_forward") + accuracy_methods(["rms_error"]),
                     accuracy_lens=(128, 256, 512, 1024), accuracy_gradients=False,
                     sampling=Sampling(max_samples=40, max_seconds=1.0, warmup_seconds=0.05), timeout=300.0),
    "default": Profile("default", seq_lens=tuple(2 ** p for p in range(7, 14)), num_heads=(1, 4, 8, 16)),
    "full": Profile("full", seq_lens=tuple(2 ** p for p in range(7, 16)), num_heads=(1, 4, 8, 16),
                    timeout=1800.0),
}


def get_profile(name: str | None = None) -> Profile:
    name = name or os.environ.get(ENV_PROFILE) or "default"
    if name not in PROFILES:
        raise ValueError(f"{ENV_PROFILE}={name!r}: expected one of {', '.join(PROFILES)}")
    return PROFILES[name]
