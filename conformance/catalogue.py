"""The divergence catalogue: known, named differences from the canonical semantics, as data.

One TOML file per framework in ``conformance/divergences/``. Each entry::

    [[divergence]]
    id = "torch_mha-fully_masked_row-nan"    # unique, appears in the rows it explains
    adapters = ["torch_mha"]
    cases = ["*fully_masked_row*"]           # fnmatch patterns on case ids
    dtypes = ["float32"]                     # optional: default every dtype
    quantities = ["output", "scores"]        # optional: default every quantity
    observed = "what the implementation does"
    oracle_policy = "nan"                    # optional: the oracle's fully_masked policy that reproduces it
    behaviour = "..."                        # optional: a named check in BEHAVIOURS, when no policy fits
    upstream = "https://github.com/..."      # optional: only a real issue

A row an entry covers that fails against the canonical golden but passes
against the entry's description becomes status ``divergence``. The check is
strict: an entry is *stale* when a row it covers no longer shows the
behaviour, or when it covers no row of a run that included its adapter and
the whole default matrix, so the catalogue stays true as frameworks change.
"""
from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

DIVERGENCE_DIR = Path(__file__).parent / "divergences"
POLICIES = ("zeros", "uniform", "nan")
_KEYS = {"id", "adapters", "cases", "dtypes", "quantities", "observed", "oracle_policy", "behaviour", "upstream"}


def _bad_batches(inputs) -> np.ndarray:
    """Batch elements whose query, key or value hold a NaN or Inf anywhere."""
    arrays = [inputs.query, inputs.value] + ([inputs.key] if inputs.key is not None else [])
    return np.any([~np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1) for a in arrays], axis=0)


def _nonfinite_input_poisons_batch(expected: np.ndarray, inputs, quantity: str) -> np.ndarray:
    """Every element of a batch element with a NaN/Inf input anywhere (masked or not) becomes NaN."""
    out = expected.copy()
    out[_bad_batches(inputs)] = np.nan
    return out


def _nan_row_output_is_bias(expected: np.ndarray, inputs, quantity: str) -> np.ndarray:
    """An output row the golden makes NaN instead gets zero attention weights: the output bias (or 0)."""
    out = expected.copy()
    out_dims = inputs.weights.Wo.ndim - 2
    rows = np.isnan(out).reshape(out.shape[:out.ndim - out_dims] + (-1,)).any(axis=-1)
    bias = inputs.weights.bo if inputs.weights.bo is not None else np.zeros(out.shape[out.ndim - out_dims:])
    out[rows] = bias
    return out


# Named behaviours no oracle policy reproduces: (golden or reference, inputs, quantity) -> the array the
# implementation is expected to return instead. Applied to both golden and reference, then compared as usual.
BEHAVIOURS: dict[str, Callable[[np.ndarray, object, str], np.ndarray]] = {
    "nonfinite_input_poisons_batch": _nonfinite_input_poisons_batch,
    "nan_row_output_is_bias": _nan_row_output_is_bias,
}


@dataclass(frozen=True)
class Entry:
    id: str
    adapters: tuple[str, ...]
    cases: tuple[str, ...]
    observed: str
    dtypes: tuple[str, ...] | None = None
    quantities: tuple[str, ...] | None = None
    oracle_policy: str | None = None
    behaviour: str | None = None
    upstream: str | None = None
    source: str = field(default="", compare=False)

    def covers(self, adapter: str, case_id: str, dtype: str, quantity: str) -> bool:
        return (adapter in self.adapters
                and any(fnmatch.fnmatchcase(case_id, p) for p in self.cases)
                and (self.dtypes is None or dtype in self.dtypes)
                and (self.quantities is None or quantity in self.quantities))

    def covers_row(self, row: dict) -> bool:
        return self.covers(row["adapter"], row["case"], row["dtype"], row["quantity"])


def _entry(raw: dict, source: str) -> Entry:
    where = f"{source}: divergence {raw.get('id', '?')!r}"
    unknown = set(raw) - _KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected some of {sorted(_KEYS)}")
    for key in ("id", "adapters", "cases", "observed"):
        if not raw.get(key):
            raise ValueError(f"{where}: '{key}' is required")
    policy, behaviour = raw.get("oracle_policy"), raw.get("behaviour")
    if policy is not None and policy not in POLICIES:
        raise ValueError(f"{where}: oracle_policy must be one of {POLICIES}, got {policy!r}")
    if behaviour is not None and behaviour not in BEHAVIOURS:
        raise ValueError(f"{where}: behaviour must be one of {sorted(BEHAVIOURS)}, got {behaviour!r}")
    if (policy is None) == (behaviour is None):
        raise ValueError(f"{where}: give exactly one of oracle_policy and behaviour, so the entry can be checked")
    upstream = raw.get("upstream")
    if upstream is not None and not str(upstream).startswith("https://"):
        raise ValueError(f"{where}: upstream must be an https:// link, got {upstream!r}")
    tup = lambda k: tuple(raw[k]) if raw.get(k) is not None else None
    return Entry(id=raw["id"], adapters=tuple(raw["adapters"]), cases=tuple(raw["cases"]), observed=raw["observed"],
                 dtypes=tup("dtypes"), quantities=tup("quantities"), oracle_policy=policy, behaviour=behaviour,
                 upstream=upstream, source=source)


def load(directory=DIVERGENCE_DIR) -> list[Entry]:
    """Every entry of every ``*.toml`` in ``directory``; a malformed file raises ValueError naming it."""
    entries: list[Entry] = []
    for path in sorted(Path(directory).glob("*.toml")):
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML: {exc}") from exc
        for raw in data.get("divergence", []):
            entries.append(_entry(raw, path.name))
    ids = [e.id for e in entries]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"divergence catalogue: duplicate ids {dup}")
    return entries


def covering(entries, adapter: str, case_id: str, dtype: str, quantity: str) -> list[Entry]:
    return [e for e in entries if e.covers(adapter, case_id, dtype, quantity)]


@dataclass
class EntryCheck:
    id: str
    status: str  # ok | stale | unchecked
    message: str
    rows: int


def check(entries, rows, adapters_run=(), full_matrix: bool = False) -> list[EntryCheck]:
    """The strict check: every row an entry covers must show the divergence it describes.

    ``adapters_run``: adapters this run included; ``full_matrix``: whether it ran every default case and
    dtype (only then is an entry covering no row stale rather than unchecked).
    """
    out = []
    for e in entries:
        covered = [r for r in rows if e.covers_row(r) and r["status"] not in ("unsupported", "skip", "error")]
        missing = [r["row_id"] for r in covered if r.get("divergence") != e.id]
        if missing:
            out.append(EntryCheck(e.id, "stale", f"{len(missing)}/{len(covered)} covered rows no longer show "
                                  f"'{e.observed}': {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}",
                                  len(covered)))
        elif covered:
            out.append(EntryCheck(e.id, "ok", f"reproduced in {len(covered)} rows", len(covered)))
        elif full_matrix and set(e.adapters) & set(adapters_run):
            out.append(EntryCheck(e.id, "stale", "covers no row of the full matrix (case pattern or dtype "
                                  "filter matches nothing)", 0))
        else:
            out.append(EntryCheck(e.id, "unchecked", "none of its rows ran", 0))
    return out
