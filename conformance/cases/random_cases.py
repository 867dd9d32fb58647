"""Random cases: the area ``random``, one description of the space drawn two ways.

``random_case(seed)`` draws with NumPy, so a case is rebuilt from its id (``random<seed>-...``) for
``mhabench conform --rerun``; ``strategies.cases()`` is the hypothesis strategy over the same space, so
failing examples shrink. Each case carries its own input seed.
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from .case import Case

HEADS = (1, 2, 3, 4)
KEY_DIMS = (1, 2, 3, 5)
LENGTHS = (1, 2, 3, 5, 7)
FEATURE_WIDTHS = (1, 3, 4, 6)  # input feature widths (query, key, value)
MASKS = ("none", "full", "broadcast", "padding", "per_head", "all_allowed")
AXES = {3: (None,), 4: (None, (1,), (2,), (-2,), (1, 2))}


def describe_random(choose: Callable[[str, tuple], object], seed: int, prefix: str) -> Case:
    """Build a case from ``choose(name, options)``, whichever source of randomness backs it."""
    rank = choose("rank", (3, 4))
    axes = choose("attention_axes", AXES[rank])
    q_shape = tuple(choose(f"q{i}", LENGTHS) for i in range(rank - 2))
    k_shape = tuple(choose(f"k{i}", LENGTHS) for i in range(rank - 2))
    attended = {1, 2} if axes is None else {a if a > 0 else a + rank for a in axes}
    # a non-attended axis is an extra batch axis: it must match between query and key
    k_shape = tuple(q if (i + 1) not in attended else k for i, (q, k) in enumerate(zip(q_shape, k_shape))) \
        if rank == 4 else k_shape
    spec = {"num_heads": choose("num_heads", HEADS), "key_dim": choose("key_dim", KEY_DIMS),
            "value_dim": choose("value_dim", (None,) + KEY_DIMS), "output_shape": choose("output_shape", (None, 2, 5)),
            "attention_axes": axes, "use_bias": choose("use_bias", (True, False))}
    key_distinct = choose("key_distinct", (False, True))
    query_dim, value_dim = choose("query_dim", FEATURE_WIDTHS), choose("value_dim_in", FEATURE_WIDTHS)
    key_dim = choose("key_dim_in", FEATURE_WIDTHS) if key_distinct else value_dim
    mask, causal = choose("mask", MASKS), choose("causal", (False, True))
    batch = choose("batch", (1, 2, 3))
    shape = "x".join(map(str, q_shape)) + "_" + "x".join(map(str, k_shape))
    case_id = (f"{prefix}{seed}-{shape}-heads{spec['num_heads']}_kd{spec['key_dim']}-mask_{mask}"
               f"{'-causal' if causal else ''}")
    return Case(id=case_id, area="random", spec=spec, batch=batch, q_shape=q_shape, k_shape=k_shape,
                query_dim=query_dim, key_dim=key_dim, value_dim=value_dim, key_distinct=key_distinct, mask=mask,
                causal=causal, seed=seed)


def random_case(seed: int) -> Case:
    rng = np.random.default_rng(seed)
    return describe_random(lambda name, options: options[int(rng.integers(len(options)))], seed, "random")


def random_cases(count: int, first_seed: int = 0) -> list[Case]:
    return [random_case(first_seed + i) for i in range(count)]


def random_case_from_id(case_id: str) -> Case | None:
    """The case behind a ``random<seed>-...`` id, or None when it does not rebuild to exactly that id."""
    digits = case_id[len("random"):].split("-", 1)[0]
    if not digits.isdigit():
        return None
    case = random_case(int(digits))
    return case if case.id == case_id else None


def reproducer(case: Case) -> str:
    """What a failing random case prints: enough to rebuild it exactly."""
    return (f"Case.from_dict({case.to_dict()!r})  # spec={case.spec} query={list(case.query_shape)} "
            f"value={list(case.value_shape)} key={case.key_shape} mask={case.mask} causal={case.causal} "
            f"seed={case.seed}")
