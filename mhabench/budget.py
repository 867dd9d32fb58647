"""Time budgets: the duration syntax every command shares, and how the main job splits one between its stages.

A budget is given as ``300``, ``300s``, ``5m``, ``5min``, ``1h30m`` or ``0`` (no budget: everything). The
main job (``mhabench run``) gives each stage a share (:func:`split`): first every stage's coverage (what it
must run for the page to be complete: a row per adapter x area x dtype, four lengths per benchmark class),
then the rest of the time in proportion to the work each stage has left. What this machine measured of
each stage is kept in the cache's ``costs/`` folder (:func:`learned`, :func:`remember`), so the next
split starts from the truth.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

_UNITS = {"h": 3600.0, "m": 60.0, "min": 60.0, "s": 1.0, "": 1.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(h|min|m|s|)")
LEARNED_FILE = "run.json"  # in the cache's costs/ folder


def parse_duration(text, option: str = "--budget") -> float:
    """Seconds in ``text`` ("300", "90s", "5m", "5min", "1h30m", "0"); ValueError naming ``option`` otherwise."""
    value = re.sub(r"\s+", "", str(text)).lower()
    parts, position = [], 0
    for match in _PART.finditer(value):
        if match.start() != position or (match.group(2) == "" and match.end() != len(value)):
            break
        parts.append(float(match.group(1)) * _UNITS[match.group(2)])
        position = match.end()
    if not parts or position != len(value):
        raise ValueError(f"{option}: expected a duration such as 300, 300s, 5m or 1h30m (0: no budget), got {text!r}")
    return sum(parts)


def format_duration(seconds: float) -> str:
    """``5 min``, ``90 s``, ``1 h 30 min``: a budget as the summary prints it."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    words = [f"{hours} h"] * bool(hours) + [f"{minutes} min"] * bool(minutes) + [f"{secs} s"] * bool(secs)
    return " ".join(words) or "0 s"


@dataclass(frozen=True)
class Need:
    """What a stage needs, in seconds: for its coverage, and for all of its work."""

    coverage: float
    everything: float


def split(seconds: float, needs: dict[str, Need]) -> dict[str, float]:
    """Each stage's share of ``seconds``: coverage first, then the rest in proportion to the work left.

    If the coverages alone do not fit, each stage gets its coverage's proportion of the time. Otherwise
    each gets its coverage, and the time left is shared in proportion to what each still has to do, a
    stage never getting more than all of its work; what one cannot use goes to the others. Time nobody
    can use is left unshared (the job ends early)."""
    coverage = {name: max(0.0, need.coverage) for name, need in needs.items()}
    total_coverage = sum(coverage.values())
    if total_coverage >= seconds:
        if total_coverage <= 0:
            return {name: 0.0 for name in needs}
        return {name: seconds * share / total_coverage for name, share in coverage.items()}
    shares = dict(coverage)
    wanting = {name: max(0.0, need.everything - coverage[name]) for name, need in needs.items()}
    left = seconds - total_coverage
    while left > 1e-9 and any(w > 1e-9 for w in wanting.values()):
        total_wanted = sum(wanting.values())
        given = {name: min(w, left * w / total_wanted) for name, w in wanting.items()}
        for name, g in given.items():
            shares[name] += g
            wanting[name] -= g
        left -= sum(given.values())
    return shares


def learned_path() -> Path | None:
    from .impls import cache
    where = cache.folder("costs")
    return None if where is None else where / LEARNED_FILE


def learned() -> dict:
    """What this machine measured of the main job's stages ({} when nothing was kept)."""
    path = learned_path()
    try:
        data = json.loads(path.read_text()) if path is not None and path.is_file() else {}
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def remember(**figures) -> None:
    """Keep figures measured in this run for the next split (newest wins)."""
    from .results import atomic_write
    path = learned_path()
    if path is None:
        return
    data = {**learned(), **{k: v for k, v in figures.items() if v is not None}}
    try:
        atomic_write(path, json.dumps(data, sort_keys=True))
    except OSError:  # an unwritable cache costs planning accuracy, never a result
        pass
