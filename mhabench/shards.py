"""Deterministic shards: one run's work split into N parts of about equal estimated cost.

``mhabench conform --shard K/N`` and ``mhabench bench --shard K/N`` run part K of N, typically one part
per machine of a CI matrix or per task of a cluster job array. Each shard computes the split itself,
from nothing but the work items and their estimated costs, so shards started on different machines
agree without talking to each other, and any N shards together cover the unsharded run exactly once.

Costs are integers (milliseconds, or any unit the caller picks) so that the split is the same on every
machine: no floating-point sum can come out differently. Items are placed longest first onto the least
loaded shard (the LPT rule: within 4/3 of the best possible largest shard), ties broken by key.
"""
from __future__ import annotations

import heapq
import re

from .options import SelectionError

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse(text, option: str = "--shard") -> tuple[int, int]:
    """``"K/N"`` -> (K, N) with 1 <= K <= N; SelectionError (one line naming the option) otherwise."""
    match = _SHARD.match(str(text))
    if not match:
        raise SelectionError(f"{option}: expected K/N, shard K of N (e.g. 2/3), got {str(text)!r}")
    k, n = int(match.group(1)), int(match.group(2))
    if n < 1 or not 1 <= k <= n:
        raise SelectionError(f"{option}: shard {k}/{n} does not exist; K must be between 1 and N (got {text!r})")
    return k, n


def assign(costs: dict[str, int], count: int) -> dict[str, int]:
    """Each item's shard (1..count), from ``{key: cost}``: longest first onto the least loaded shard."""
    if count < 1:
        raise ValueError(f"shard count must be >= 1, got {count}")
    for key, cost in costs.items():
        if not isinstance(cost, int) or cost < 0:
            raise ValueError(f"cost of {key!r} must be an integer >= 0, got {cost!r}")
    loads = [(0, shard) for shard in range(1, count + 1)]  # a heap of (load, shard)
    placed = {}
    for key, cost in sorted(costs.items(), key=lambda item: (-item[1], item[0])):
        load, shard = heapq.heappop(loads)
        placed[key] = shard
        heapq.heappush(loads, (load + cost, shard))
    return placed


def select(costs: dict[str, int], shard: tuple[int, int] | None) -> set[str]:
    """The keys shard ``(K, N)`` runs (every key when ``shard`` is None)."""
    if shard is None:
        return set(costs)
    k, n = shard
    return {key for key, placed in assign(costs, n).items() if placed == k}
