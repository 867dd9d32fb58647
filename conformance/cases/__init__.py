"""The conformance case matrix, as data.

- ``case``: the :class:`Case` type (everything needed to rebuild a call bit for bit) and the inputs it draws;
- one module per area family: ``shapes`` (areas shapes, dtypes), ``masks`` (masks, axes), ``special``,
  ``gradients``, ``modern``, ``decode`` (inference attention against a key/value cache), ``pairs`` (the pairwise
  covering design, read from ``pair_design.txt``);
- ``invalid``: bad input, its own type (:class:`InvalidCase`, PyTorch OpInfo's ``ErrorInput`` for attention);
- ``random_cases``: the random area, drawn from a seed or by hypothesis.

:func:`default_cases` is the default matrix (every area but ``random`` and ``plugin``); each case's seed
comes from its id, so adding or moving a case changes no other case's inputs.
"""
from __future__ import annotations

from dataclasses import replace

from mhabench.schema import DTYPES, FORWARD_QUANTITIES  # noqa: F401  (the dtypes a case runs in)

from . import decode, gradients, invalid, masks, modern, pairs, shapes, special
from .case import (BIAS_KINDS, LENGTHS_KINDS, MASK_KINDS, SPECIALS, Case, Inputs, case_seed, make_bias,  # noqa: F401
                   make_lengths, make_mask, spec)
from .invalid import INVALID_INPUTS, BadCall, InvalidCase  # noqa: F401
from .pairs import PAIR_DESIGN, PAIR_EXCLUDED, PAIR_FACTORS, case_factors, pair_case, pair_coverage  # noqa: F401
from .random_cases import (describe_random, random_case, random_case_from_id, random_cases,  # noqa: F401
                           reproducer)

__all__ = ["AnyCase", "FAMILIES", "default_cases", "select", "find_case", "from_dict",
           "Case", "Inputs", "InvalidCase", "BadCall", "INVALID_INPUTS", "DTYPES", "FORWARD_QUANTITIES",
           "MASK_KINDS", "BIAS_KINDS", "LENGTHS_KINDS", "SPECIALS", "case_seed", "spec", "make_mask", "make_bias",
           "make_lengths", "PAIR_FACTORS", "PAIR_DESIGN", "PAIR_EXCLUDED", "case_factors", "pair_case",
           "pair_coverage", "describe_random", "random_case", "random_cases", "random_case_from_id", "reproducer"]

AnyCase = Case | InvalidCase
FAMILIES = (shapes, masks, special, gradients, invalid, modern, decode, pairs)  # each module's cases() joins the matrix


def default_cases() -> list[AnyCase]:
    """The default matrix (every area but ``random`` and ``plugin``); each case's seed comes from its id."""
    out = [replace(case, seed=case_seed(case.id)) for family in FAMILIES for case in family.cases()]
    ids = [c.id for c in out]
    duplicates = {i for i in ids if ids.count(i) > 1}
    if duplicates:  # row ids must map back to exactly one case
        raise AssertionError(f"duplicate case ids: {sorted(duplicates)}")
    return out


def select(cases, areas=None, quick=False) -> list[AnyCase]:
    return [c for c in cases if (areas is None or c.area in areas) and (c.quick or not quick)]


def find_case(case_id: str, extra=()) -> AnyCase | None:
    """The case with this id, from the default matrix, ``extra`` cases, or a random case's seed."""
    for case in list(extra) + default_cases():
        if case.id == case_id:
            return case
    if case_id.startswith("random"):
        return random_case_from_id(case_id)
    return None


def from_dict(d: dict) -> AnyCase:
    """A case from its ``to_dict`` (how cases travel to worker processes)."""
    return InvalidCase.from_dict(d) if d.get("invalid") else Case.from_dict(d)
