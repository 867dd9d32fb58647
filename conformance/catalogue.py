"""The divergence catalogue: known, named differences from the canonical semantics, as data.

One TOML file per framework in ``conformance/divergences/``. Each entry::

    [[divergence]]
    id = "torch_mha-fully_masked_row-nan"    # unique, appears in the rows it explains
    adapters = ["torch_mha"]
    cases = ["*fully_masked_row*"]           # fnmatch patterns on case ids (default: every case)
    when = ["empty_rows"]                    # optional: properties every covered case has (CASE_PROPERTIES)
    dtypes = ["float32"]                     # optional: default every dtype
    quantities = ["output", "scores"]        # optional: default every quantity
    observed = "what the implementation does"
    oracle_policy = "nan"                    # the oracle's fully_masked policy that reproduces it, or
    behaviour = "..."                        # a named transformation of the golden in BEHAVIOURS, or
    check = "..."                            # a named predicate on (golden, actual) in CHECKS (the golden of
                                             # its oracle_policy and backward_form where given), or
    max_error_ratio = 6.0                    # a precision shortfall: fails only on magnitude, ratio <= this
    precision = "float32"                    # optional, alone or with a policy/behaviour: judged as computed
                                             # in this dtype (reference and floor of that dtype)
    backward_form = "flash"                  # optional, alone or with the above: gradients judged against a
                                             # reference whose softmax backward has that form (FlashAttention's)
    facts = { tf_onednn = true }             # optional: the kernel facts under which it applies (a row's
                                             # ``facts``; a list of values means any of them)
    kind = "answer"                          # what a porter meets (KINDS); only where it is not derived:
                                             # a `when` naming NaN/Inf or empty rows, an oracle_policy, or a
                                             # precision figure alone (precision, max_error_ratio, backward_form)
    upstream = "https://github.com/..."      # optional: only a real issue
    varies = "the deciding fact is unknown: ..."   # optional, only where no recorded fact decides whether it
                                             # shows: then its absence is not stale

A row an entry covers that fails against the canonical golden but passes
against the entry's description becomes status ``divergence``. The check is
strict: an entry is *stale* when a row it covers fails in another way than
described, when a covered row passes canonically although the description
predicts a visibly different result there (the framework was fixed), or when
it shows in no row of a run that included its adapter and the whole default
matrix, so the catalogue stays true as frameworks change. An entry with
``facts`` covers only the rows computed under those facts: on a machine (or under
a switch) where they do not hold, its rows are judged canonically and it is not
expected to show.

This module loads the entries and checks rows against them; what they are written in (the case
properties, behaviours and checks they name) is ``behaviours``.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from mhabench.schema import DivergenceKind, Row, Status

from .behaviours import BEHAVIOURS, CASE_PROPERTIES, CHECKS, POLICIES, CaseProperties, Modelled

DIVERGENCE_DIR = Path(__file__).parent / "divergences"
PRECISIONS = ("float32", "float16", "bfloat16")
KINDS = DivergenceKind.values()  # what an entry means to someone porting a model, most urgent first
# the case properties that say an entry is about NaN/Inf in the inputs
NONFINITE_PROPERTIES = ("nonfinite", "masked_nonfinite", "masked_nonfinite_key", "masked_nonfinite_value",
                        "nonfinite_query", "unread_nonfinite_query")


@dataclass(frozen=True)
class Entry:
    """One catalogue entry, its fields the TOML keys (see the module docstring)."""

    id: str
    adapters: tuple[str, ...]
    observed: str
    cases: tuple[str, ...] = ("*",)
    when: tuple[str, ...] = ()
    dtypes: tuple[str, ...] | None = None
    quantities: tuple[str, ...] | None = None
    oracle_policy: str | None = None
    behaviour: str | None = None
    check: str | None = None
    max_error_ratio: float | None = None
    precision: str | None = None
    backward_form: str | None = None
    kind: str | None = None  # one of KINDS: declared, or derived when the catalogue is loaded (derived_kind)
    upstream: str | None = None
    varies: str | None = None
    facts: tuple[tuple[str, tuple], ...] = ()  # (kernel fact, the values under which the entry applies), sorted
    source: str = field(default="", compare=False)

    @property
    def how(self) -> str:
        """How the entry is reproduced, in words (for reports)."""
        parts = [f"oracle policy {self.oracle_policy}" if self.oracle_policy else None,
                 f"behaviour {self.behaviour}" if self.behaviour else None,
                 f"check {self.check}" if self.check else None,
                 f"error ratio <= {self.max_error_ratio:g}" if self.max_error_ratio is not None else None,
                 f"computed in {self.precision}" if self.precision else None,
                 f"{self.backward_form}-form backward" if self.backward_form else None,
                 f"when {self.conditions}" if self.facts else None]
        return ", ".join(p for p in parts if p)

    def applies(self, facts) -> bool:
        """Whether a row computed under ``facts`` (a row's ``facts``; None: unknown) is under this entry's facts."""
        if not self.facts:
            return True
        facts = facts or {}
        return all(name in facts and facts[name] in values for name, values in self.facts)

    @property
    def conditions(self) -> str:
        """The facts it applies under, in words ("" for none)."""
        return ", ".join(f"{name} = {' or '.join(_fact_text(v) for v in values)}" for name, values in self.facts)

    def matches(self, adapter: str, case_id: str, dtype: str, quantity: str) -> bool:
        """Whether the entry names this adapter, case, dtype and quantity (its ``when`` aside: the properties of
        the case, which a :class:`Catalogue` knows)."""
        return (adapter in self.adapters
                and any(fnmatch.fnmatchcase(case_id, p) for p in self.cases)
                and (self.dtypes is None or dtype in self.dtypes)
                and (self.quantities is None or quantity in self.quantities))


# How each key's TOML value becomes the Entry's, checked: (key, value, where) -> the value. A key not listed here
# is taken as written; every Entry field but ``source`` is a key, so a new key is one field of Entry (and a line
# here if its value needs reading).
def _names(value, key, where):
    return tuple(value)


def _one_of(known):
    def read(value, key, where):
        if value not in known:
            raise ValueError(f"{where}: {key} must be one of {sorted(known)}, got {value!r}")
        return value
    return read


def _properties(value, key, where):
    unknown = set(value) - set(CASE_PROPERTIES)
    if unknown:
        raise ValueError(f"{where}: 'when' names unknown properties {sorted(unknown)}; known: "
                         f"{sorted(CASE_PROPERTIES)}")
    return tuple(value)


def _ratio(value, key, where):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 1:
        raise ValueError(f"{where}: max_error_ratio must be a number > 1, got {value!r}")
    return float(value)


def _fact_text(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _facts(value, key, where):
    """An entry's ``facts`` table as sorted (name, values) pairs: known kernel facts (``impls.facts.KERNEL_FACTS``),
    each a value or a list of values."""
    from mhabench.impls.facts import KERNEL_FACTS
    if not isinstance(value, dict) or not value:
        raise ValueError(f"{where}: 'facts' must be a table of kernel facts, e.g. facts = {{ tf_onednn = true }}")
    out = []
    for name, given in sorted(value.items()):
        if name not in KERNEL_FACTS:
            raise ValueError(f"{where}: 'facts' names unknown fact {name!r}; known: {sorted(KERNEL_FACTS)}")
        values = tuple(given) if isinstance(given, list) else (given,)
        if not values or not all(isinstance(v, (bool, int, float, str)) for v in values):
            raise ValueError(f"{where}: facts.{name} must be a value or a list of values, got {given!r}")
        out.append((name, values))
    return tuple(out)


def _link(value, key, where):
    if not str(value).startswith("https://"):
        raise ValueError(f"{where}: upstream must be an https:// link, got {value!r}")
    return value


READ = {"adapters": _names, "cases": _names, "when": _properties, "dtypes": _names, "quantities": _names,
        "oracle_policy": _one_of(POLICIES), "behaviour": _one_of(BEHAVIOURS), "check": _one_of(CHECKS),
        "max_error_ratio": _ratio, "precision": _one_of(PRECISIONS), "backward_form": _one_of(("flash",)),
        "upstream": _link, "facts": _facts, "kind": _one_of(KINDS)}
KEYS = tuple(f.name for f in dataclasses.fields(Entry) if f.name != "source")
REQUIRED = ("id", "adapters", "observed")
HOW = ("oracle_policy", "behaviour", "check", "max_error_ratio")  # exactly one says how the entry is reproduced


def _entry(raw: dict, source: str) -> Entry:
    where = f"{source}: divergence {raw.get('id', '?')!r}"
    unknown = set(raw) - set(KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected some of {sorted(KEYS)}")
    for key in REQUIRED:
        if not raw.get(key):
            raise ValueError(f"{where}: '{key}' is required")
    given = {k: READ.get(k, lambda value, key, where: value)(v, k, where) for k, v in raw.items() if v is not None}
    kinds = [k for k in HOW if k in given and not (k == "oracle_policy" and "check" in given)]
    if len(kinds) > 1 or (not kinds and "precision" not in given and "backward_form" not in given):
        raise ValueError(f"{where}: give exactly one of oracle_policy, behaviour, check and max_error_ratio "
                         f"(or precision or backward_form alone; a check may name the oracle_policy it is judged "
                         f"against), so the entry can be checked; got {kinds or 'none'}")
    given["cases"] = given.get("cases") or ("*",)
    given["kind"] = _kind(given, where)
    return Entry(**given, source=source)


def derived_kind(given: dict) -> tuple[str, str] | None:
    """An entry's kind as its other keys give it, and which key gave it; None where they do not tell."""
    nonfinite = [p for p in given.get("when", ()) if p in NONFINITE_PROPERTIES]
    if nonfinite:
        return "nonfinite", f"'when' names {nonfinite[0]}"
    if "empty_rows" in given.get("when", ()):
        return "empty_rows", "'when' names empty_rows"
    if "oracle_policy" in given:
        return "empty_rows", f"oracle_policy {given['oracle_policy']!r} is a policy for rows with no allowed key"
    if not any(k in given for k in ("oracle_policy", "behaviour", "check")):
        return "precision", "it is judged by precision alone (precision, max_error_ratio or backward_form)"
    return None


def _kind(given: dict, where: str) -> str:
    """Exactly one kind per entry: derived where its keys tell, declared (``kind``) where not, never both
    different."""
    derived, declared = derived_kind(given), given.get("kind")
    if derived is None and declared is None:
        raise ValueError(f"{where}: 'kind' is required (one of {list(KINDS)}): its behaviour or check does not "
                         f"say which kind of divergence it is")
    if derived is not None and declared is not None and declared != derived[0]:
        raise ValueError(f"{where}: kind {declared!r} contradicts the kind {derived[0]!r} its keys give "
                         f"({derived[1]}); leave 'kind' out")
    return declared or derived[0]


class Catalogue:
    """The entries of a catalogue and what they consult: the properties of each case their ``when`` names,
    computed once per case and kept by this object (one per run, per worker process, per pytest session).

    It reads as the tuple of its entries (iterate, index, ``len``)."""

    def __init__(self, entries=(), properties: CaseProperties | None = None):
        self.entries = tuple(entries)
        self.properties = properties if properties is not None else CaseProperties()
        self._by_id = {e.id: e for e in self.entries}

    def __iter__(self):
        return iter(self.entries)

    def __len__(self):
        return len(self.entries)

    def __getitem__(self, index):
        return self.entries[index]

    def __repr__(self):
        return f"Catalogue({len(self.entries)} entries)"

    def get(self, entry_id: str) -> Entry | None:
        return self._by_id.get(entry_id)

    def only(self, *entries: Entry) -> "Catalogue":
        """A catalogue of some of these entries, consulting the same case properties."""
        return Catalogue(entries, self.properties)

    def covers(self, entry: Entry, adapter: str, case_id: str, dtype: str, quantity: str) -> bool:
        return entry.matches(adapter, case_id, dtype, quantity) and all(self.properties(case_id, name)
                                                                        for name in entry.when)

    def covers_row(self, entry: Entry, row: Row) -> bool:
        """Whether ``entry`` covers ``row``: its adapter, case, dtype and quantity, and the facts it was computed
        under (a row contradicts an entry only under the facts the entry names)."""
        return self.covers(entry, row.adapter, row.case, row.dtype, row.quantity) and entry.applies(row.facts)

    def covering(self, adapter: str, case_id: str, dtype: str, quantity: str, facts=None) -> list[Entry]:
        """The entries covering a row computed under ``facts``."""
        return [e for e in self.entries if self.covers(e, adapter, case_id, dtype, quantity) and e.applies(facts)]

    def check(self, rows, adapters_run=(), full_matrix: bool = False) -> list["EntryCheck"]:
        """The strict check: every row an entry covers must show the divergence it describes.

        ``adapters_run``: adapters this run included; ``full_matrix``: whether it ran every default case and
        dtype (only then is an entry covering no row stale rather than unchecked).
        """
        out = []
        for e in self.entries:
            covered = [r for r in rows if self.covers_row(e, r) and r.status not in
                       (Status.UNSUPPORTED, Status.SKIP, Status.ERROR)]
            # a covered row contradicts the entry when it fails some other way, or passes although the entry
            # predicts a visibly different result there; a pass the entry cannot tell apart is neutral
            missing = [r.row_id for r in covered if r.divergence != e.id
                       and (r.status is Status.FAIL or r.contradicts == e.id)]
            shown = [r for r in covered if r.divergence == e.id]
            # on the full matrix every adapter the entry names must show it somewhere: an entry never over-claims.
            # An adapter none of whose rows ran under the entry's facts cannot show it (another machine's kernels).
            under = {r.adapter for r in rows if e.applies(r.facts)} if e.facts else set(adapters_run)
            silent = tuple(sorted(a for a in set(e.adapters) & set(adapters_run) & under
                                  if not any(r.adapter == a for r in shown))) if full_matrix else ()
            elsewhere = sorted(set(e.adapters) & set(adapters_run) - under)
            if missing:
                out.append(EntryCheck(e.id, "stale", f"{len(missing)}/{len(covered)} covered rows no longer show "
                                      f"'{e.observed}': {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}",
                                      len(covered)))
            elif silent and e.varies:
                out.append(EntryCheck(e.id, "ok" if shown else "unchecked",
                                      f"reproduced in {len(shown)} rows; not on this machine for {', '.join(silent)} "
                                      f"({e.varies})", len(shown), silent))
            elif silent:
                out.append(EntryCheck(e.id, "stale", f"{', '.join(silent)} show it in no row of the full matrix "
                                      f"(the behaviour is gone there, or the entry names an adapter it never applied "
                                      f"to)", len(shown), silent))
            elif shown:
                out.append(EntryCheck(e.id, "ok", f"reproduced in {len(shown)} rows", len(shown)))
            elif elsewhere and not covered:
                out.append(EntryCheck(e.id, "unchecked", f"applies when {e.conditions}: no row of "
                                      f"{', '.join(elsewhere)} ran under those facts here", 0))
            else:
                out.append(EntryCheck(e.id, "unchecked", "none of its rows ran", 0))
        return out


def as_catalogue(entries) -> Catalogue:
    """``entries`` as a Catalogue (a Catalogue stays itself; a list of entries gets case properties of its own)."""
    return entries if isinstance(entries, Catalogue) else Catalogue(entries)


def load(directory=DIVERGENCE_DIR) -> Catalogue:
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
    return Catalogue(entries)


def covering(entries, adapter: str, case_id: str, dtype: str, quantity: str, facts=None) -> list[Entry]:
    return as_catalogue(entries).covering(adapter, case_id, dtype, quantity, facts)


@dataclass
class EntryCheck:
    id: str
    status: str  # ok | stale | unchecked
    message: str
    rows: int
    silent: tuple[str, ...] = ()  # on the full matrix: the adapters it names that showed it in no row


def check(entries, rows, adapters_run=(), full_matrix: bool = False) -> list[EntryCheck]:
    """``Catalogue.check`` of ``entries`` (a Catalogue, or entries that get case properties of their own)."""
    return as_catalogue(entries).check(rows, adapters_run, full_matrix)


def export(entries, checks) -> list[dict]:
    """The entries a run checked, each with its verdict: what ``catalogue.json`` in the results holds."""
    verdicts = {c.id: c for c in checks}
    out = []
    for e in entries:
        c = verdicts.get(e.id)
        out.append({"id": e.id, "framework": Path(e.source).stem, "adapters": list(e.adapters),
                    "cases": list(e.cases), "when": list(e.when), "dtypes": list(e.dtypes) if e.dtypes else None,
                    "quantities": list(e.quantities) if e.quantities else None, "observed": e.observed,
                    "facts": {name: list(values) for name, values in e.facts} or None, "how": e.how, "kind": e.kind,
                    "upstream": e.upstream, "status": c.status if c else "unchecked",
                    "message": c.message if c else "", "rows": c.rows if c else 0})
    return out


def reproduce(entry: Entry, quantity: str, dtype: str, actual, goldens, canonical, compare, facts=None):
    """Compare ``actual`` with what ``entry`` describes; a Comparison (``ok``: it shows), or None if the entry
    cannot be applied to this quantity. ``goldens.get(policy, dtype)`` gives the oracle's arrays,
    ``goldens.modelled(model, dtype)`` a framework model's; ``facts`` are the row's (a model of a
    machine-dependent kernel reads those it names)."""
    policy = entry.oracle_policy or "zeros"
    judged_as = entry.precision or dtype
    form = entry.backward_form or "probs"
    golden = goldens.get(policy, "float64")[quantity]
    reference = goldens.get(policy, judged_as, form)[quantity]
    if entry.max_error_ratio is not None:
        shows = (not canonical.ok and canonical.error_ratio is not None
                 and canonical.error_ratio <= entry.max_error_ratio and not canonical.nonfinite)
        return Shown(shows, canonical)
    if entry.check is not None:
        shows = CHECKS[entry.check](np.asarray(actual, np.float64), goldens, quantity, judged_as, compare, policy,
                                    form)
        return Shown(bool(shows), canonical)
    if entry.behaviour is not None:
        behaviour = BEHAVIOURS[entry.behaviour]
        try:
            if isinstance(behaviour, Modelled):  # the model gives its own same-precision reference
                machine = behaviour.machine(facts, judged_as)
                golden = goldens.modelled(behaviour.model, "float64", machine)[quantity]
                reference = goldens.modelled(behaviour.model, judged_as, machine)[quantity]
            else:
                golden = behaviour(np.asarray(golden, np.float64), goldens.inputs, quantity)
                reference = behaviour(np.asarray(reference, np.float64), goldens.inputs, quantity)
        except (ValueError, IndexError, KeyError):
            return None
        return compare(golden, reference, actual, judged_as, quantity)
    return compare(golden, reference, actual, judged_as, quantity,
                   lambda: goldens.sensitivity(judged_as, quantity, policy, form))


@dataclass(frozen=True)
class Shown:
    """Whether a row shows an entry that names no values (a check, an error-ratio bound), with the canonical
    comparison's figures for the row."""

    ok: bool
    canonical: object

    def figures(self) -> dict:
        return self.canonical.figures()
