"""The pytest view of the conformance suite: one test per adapter x case x dtype, with readable ids.

``conformance/conftest.py`` installs these hooks. The selection is the CLI's (``conformance.session``):
``--adapters a,b`` (default: every installed adapter), ``--dtypes`` (default: float32; all four with
``--dtypes float64,float32,float16,bfloat16``), ``--full-matrix`` (default: the reduced matrix of cases
marked ``quick``, so the whole project's tests stay fast), ``--examples N`` (random cases, default 3),
``--conform-timeout S``.

Every selected test's rows are computed once, together, at the first test
that needs them: one worker process per adapter, adapters in parallel. A test
then only looks its rows up, so ``-k`` selections run only what they select.
"""
from __future__ import annotations

import pytest

from mhabench.conformance import cases as cases_mod
from mhabench.conformance import session


def pytest_addoption(parser):
    group = parser.getgroup("mhabench conformance")
    group.addoption("--adapters", default=None, help="comma-separated adapters (default: every installed one)")
    group.addoption("--dtypes", default=None, help="comma-separated dtypes (default: float32)")
    group.addoption("--full-matrix", action="store_true", help="every default case, not the reduced matrix")
    group.addoption("--examples", type=int, default=3, help="hypothesis examples per adapter (default 3)")
    group.addoption("--conform-timeout", type=float, default=120.0, help="seconds one case may take")


def _plan(config) -> session.Plan:
    """The session's plan, made once per pytest run from the options, as the CLI makes it."""
    if not hasattr(config, "_conformance_plan"):
        try:
            config._conformance_plan = session.make_plan(
                config.getoption("--adapters"), config.getoption("--dtypes"),
                quick=not config.getoption("--full-matrix"), examples=0, default_dtypes=("float32",))
        except session.SelectionError as exc:
            raise pytest.UsageError(str(exc)) from None
    return config._conformance_plan


def selected_adapters(config) -> list[str]:
    return _plan(config).adapters


def selected_dtypes(config) -> list[str]:
    return _plan(config).dtypes


def area_cases(config, area: str) -> list:
    return [c for c in _plan(config).cases if c.area == area]


def pytest_generate_tests(metafunc):
    """Parametrize ``conformance_key`` (adapter, case id, dtype) for the module's AREA."""
    if "conformance_key" not in metafunc.fixturenames:
        return
    config = metafunc.config
    area = getattr(metafunc.module, "AREA")
    keys = []
    for adapter in selected_adapters(config):
        for case in area_cases(config, area):
            for dtype in (["float32"] if area == "invalid" else selected_dtypes(config)):
                keys.append((adapter, case.id, dtype))
    metafunc.parametrize("conformance_key", keys, ids=[f"{a}-{c}-{d}" for a, c, d in keys])


def catalogue_keys(config, entry) -> list[tuple[str, str, str]]:
    """Every (adapter, case, dtype) of the full default matrix a catalogue entry covers, among those selected."""
    adapters = [a for a in entry.adapters if a in selected_adapters(config)]
    dtypes = [d for d in selected_dtypes(config) if entry.dtypes is None or d in entry.dtypes]
    return [(a, c.id, d) for a in adapters for c in cases_mod.default_cases() for d in dtypes
            if any(entry.covers(a, c.id, d, q) for q in c.quantities())]


class ConformanceRows:
    """Rows for the selected tests, computed in one batch on first use."""

    def __init__(self, config, keys):
        self.config, self.keys, self._rows = config, keys, None

    def _compute(self):
        from mhabench.conformance.runner import run_rows
        by_adapter: dict[str, dict[str, set]] = {}
        for adapter, case_id, dtype in self.keys:
            by_adapter.setdefault(adapter, {}).setdefault(case_id, set()).add(dtype)
        all_cases = {c.id: c for c in cases_mod.default_cases()}
        rows = []
        # one run per adapter set, cases x dtypes merged: the children compute each case once per dtype
        dtypes = sorted({d for cases in by_adapter.values() for ds in cases.values() for d in ds})
        case_ids = sorted({c for cases in by_adapter.values() for c in cases})
        rows = run_rows(list(by_adapter), [all_cases[c] for c in case_ids], dtypes,
                        timeout=self.config.getoption("--conform-timeout"))
        self._rows = {}
        for row in rows:
            self._rows.setdefault((row["adapter"], row["case"], row["dtype"]), []).append(row)

    def get(self, key) -> list[dict]:
        if self._rows is None:
            self._compute()
        return self._rows.get(key, [])


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    keys = set()
    for item in session.items:
        params = getattr(item, "callspec", None) and item.callspec.params or {}
        if "conformance_key" in params:
            keys.add(params["conformance_key"])
        if "catalogue_entry" in params:
            keys |= set(catalogue_keys(session.config, params["catalogue_entry"]))
    session.config._conformance_rows = ConformanceRows(session.config, keys)


@pytest.fixture(scope="session")
def conformance_rows(request) -> ConformanceRows:
    return request.config._conformance_rows


def describe(row: dict) -> str:
    figures = ", ".join(f"{k}={row[k]:.3g}" for k in ("max_abs_err", "max_rel_err", "tolerance", "reference_err",
                                                         "error_ratio") if row.get(k) is not None)
    return f"{row['row_id']}: {row['status']}: {row['message']} [{figures}] (seed {row['seed']}, spec {row['spec']}, " \
           f"query {row['query_shape']}, key {row['key_shape']}, value {row['value_shape']}, mask {row['mask']}, " \
           f"causal {row['causal']}, window {row.get('window')}, bias {row.get('bias')}, lengths {row.get('lengths')}, " \
           f"kernel {row.get('kernel', 'default')})"


def check_rows(rows: list[dict]) -> None:
    """Pass, divergence: fine. All unsupported/skip: a pytest skip with the reason. Fail or error: a failure."""
    assert rows, "no rows were produced for this test"
    bad = [r for r in rows if r["status"] in ("fail", "error")]
    if bad:
        pytest.fail("\n".join(describe(r) for r in bad), pytrace=False)
    if all(r["status"] in ("unsupported", "skip") for r in rows):
        pytest.skip(f"{rows[0]['status']}: {rows[0]['message']}")


@pytest.fixture
def conformance_check(conformance_rows, conformance_key):
    return lambda: check_rows(conformance_rows.get(conformance_key))
