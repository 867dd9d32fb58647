"""The pytest view of the conformance suite: one test per adapter x case x dtype, with readable ids.

``conformance/conftest.py`` installs these hooks. The selection is the CLI's (``conformance.session``):
``--adapters a,b`` (default: every installed adapter), ``--dtypes`` (default: float32; all four with
``--dtypes float64,float32,float16,bfloat16``), ``--full-matrix`` (default: the reduced matrix of cases
marked ``quick``, so the whole project's tests stay fast), ``--examples N`` (random cases, default 3),
``--conform-timeout S``.

Every selected test's rows are computed once, together, at the first test
that needs them: worker processes per adapter, adapters in parallel. A test
then only looks its rows up, so ``-k`` selections run only what they select.
Under pytest-xdist (``pytest -n 2``) each adapter's tests run in one xdist
worker, which computes that adapter's rows at its first test.
"""
from __future__ import annotations

import pytest

from mhabench.conformance import cases as cases_mod
from mhabench.conformance import session
from mhabench.schema import Row, RowId

# What one pytest run keeps on its config (``config.stash``): the plan made from the options, the divergence
# catalogue, the rows computed for the selected tests.
PLAN = pytest.StashKey[session.Plan]()
CATALOGUE = pytest.StashKey[object]()
ROWS = pytest.StashKey["ConformanceRows"]()


def pytest_addoption(parser):
    group = parser.getgroup("mhabench conformance")
    group.addoption("--adapters", default=None, help="comma-separated adapters (default: every installed one)")
    group.addoption("--dtypes", default=None, help="comma-separated dtypes (default: float32)")
    group.addoption("--full-matrix", action="store_true", help="every default case, not the reduced matrix")
    group.addoption("--examples", type=int, default=3, help="hypothesis examples per adapter (default 3)")
    group.addoption("--conform-timeout", type=float, default=120.0, help="seconds one case may take")


def _plan(config) -> session.Plan:
    """The session's plan, made once per pytest run from the options, as the CLI makes it."""
    if PLAN not in config.stash:
        try:
            config.stash[PLAN] = session.make_plan(
                config.getoption("--adapters"), config.getoption("--dtypes"),
                quick=not config.getoption("--full-matrix"), examples=0, default_dtypes=("float32",))
        except session.SelectionError as exc:
            raise pytest.UsageError(str(exc)) from None
    return config.stash[PLAN]


def catalogue(config):
    """The divergence catalogue, loaded once per pytest run (with the case properties it consults)."""
    if CATALOGUE not in config.stash:
        from mhabench.conformance import catalogue as catalogue_mod
        config.stash[CATALOGUE] = catalogue_mod.load()
    return config.stash[CATALOGUE]


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
    keys = [(adapter, case.id, dtype) for adapter in selected_adapters(config) for case in area_cases(config, area)
            for dtype in case.run_dtypes(selected_dtypes(config))]
    metafunc.parametrize("conformance_key", keys, ids=[RowId(*key).format() for key in keys])


def catalogue_keys(config, entry) -> list[tuple[str, str, str]]:
    """Every (adapter, case, dtype) of the full default matrix a catalogue entry covers, among those selected."""
    adapters = [a for a in entry.adapters if a in selected_adapters(config)]
    dtypes = [d for d in selected_dtypes(config) if entry.dtypes is None or d in entry.dtypes]
    covers = catalogue(config).covers
    return [(a, c.id, d) for a in adapters for c in cases_mod.default_cases() for d in dtypes
            if any(covers(entry, a, c.id, d, q) for q in c.quantities())]


class ConformanceRows:
    """Rows for the selected tests, computed in batches on first use.

    ``batches``: batch name -> the (adapter, case id, dtype) keys its tests read. A serial run has one
    batch, computed at the first test with every core busy (``runner.run_rows``). Under pytest-xdist
    each adapter's tests form one batch, and all of them go to one xdist worker
    (``pytest_xdist_make_scheduler``): that worker computes the batch at its first test, with one worker
    process for the adapter, so no key is computed twice and no adapter's process starts once per test.
    """

    def __init__(self, config, batches: dict[str, set], jobs: int | None = None):
        self.config, self.batches, self.jobs = config, batches, jobs
        self._rows: dict = {}
        self._done: set = set()

    def _batch_of(self, key) -> str | None:
        adapter = key[0]
        if key in self.batches.get(adapter, ()):
            return adapter
        return next((name for name in sorted(self.batches) if key in self.batches[name]), None)

    def _compute(self, keys: set):
        from mhabench.conformance.runner import run_rows
        keys = set(keys) - self._done
        if not keys:
            return
        all_cases = {c.id: c for c in cases_mod.default_cases()}
        adapters = sorted({a for a, _, _ in keys})
        case_ids = sorted({c for _, c, _ in keys})
        dtypes = sorted({d for _, _, d in keys})
        rows = run_rows(adapters, [all_cases[c] for c in case_ids], dtypes, include=keys, jobs=self.jobs,
                        timeout=self.config.getoption("--conform-timeout"))
        for row in rows:
            self._rows.setdefault(row.task, []).append(row)
        self._done |= keys

    def get(self, key) -> list[Row]:
        if key not in self._done:
            batch = self._batch_of(key)
            self._compute(self.batches[batch] if batch is not None else {key})
        return self._rows.get(key, [])


def under_xdist(config) -> bool:
    """Whether this process is a pytest-xdist worker."""
    return hasattr(config, "workerinput")


SWITCHED_TEST = "test_conformance_under_another_machines_kernels"  # conformance/test_switches.py


def switch_setting_of(nodeid: str) -> str | None:
    """The kernel switch setting ("tf_onednn=off") whose rows a test of ``SWITCHED_TEST`` reads: its adapters'
    rows are computed together, once, so its tests go to one xdist worker."""
    function, _, param = nodeid.rpartition("::")[2].partition("[")
    return param.partition("-")[0] if function == SWITCHED_TEST and "=" in param else None


def adapter_of(config, nodeid: str) -> str | None:
    """The adapter whose rows a test reads, from its node id (``...::test_conformance[<adapter>-<case>-<dtype>]``,
    ``test_random_cases[<adapter>]``, ``test_entry_reproduces[<entry>]``: the entry's first selected adapter),
    or None for a test that reads none. Node ids are all the process scheduling the tests sees."""
    function, _, param = nodeid.rpartition("::")[2].partition("[")
    param = param[:-1] if param.endswith("]") else param
    selected = selected_adapters(config)
    if function == "test_entry_reproduces":
        entry = catalogue(config).get(param)
        return next((a for a in entry.adapters if a in selected), None) if entry is not None else None
    if function == "test_random_cases":
        return param if param in selected else None
    if function == "test_conformance":
        key = RowId.parse(param, selected, quantity=False)
        return key.adapter if key is not None else None
    return None


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist (``-n N``, whose default is ``--dist load``, or ``--dist loadgroup``) all tests of one
    adapter are one unit of work, sent to one xdist worker: that worker starts the adapter's process and
    computes its rows once. Other tests are distributed one by one.

    xdist's own grouping (``xdist_group`` marks with ``--dist loadgroup``) renames node ids inside the
    workers, which pytest 9.2 no longer lets it do (pytest-xdist issue 1386): the groups are silently
    lost. Here the scheduler reads the adapter from each node id itself."""
    if config.getoption("dist") not in ("load", "loadgroup"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByAdapter(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            adapter = adapter_of(config, nodeid)
            if adapter is not None:
                return f"adapter {adapter}"
            setting = switch_setting_of(nodeid)
            return f"switch {setting}" if setting is not None else nodeid

    return ByAdapter(config, log)


@pytest.hookimpl(trylast=True)
def pytest_collection_finish(session):
    config = session.config
    xdist = under_xdist(config)
    batches: dict[str, set] = {}
    for item in session.items:
        params = getattr(item, "callspec", None) and item.callspec.params or {}
        keys = set()
        if "conformance_key" in params:
            keys.add(params["conformance_key"])
        if "catalogue_entry" in params:
            keys |= set(catalogue_keys(config, params["catalogue_entry"]))
        if keys:
            batches.setdefault((adapter_of(config, item.nodeid) or "") if xdist else "all", set()).update(keys)
    # an xdist worker is one of several processes sharing the cores: its batches run one process at a time
    config.stash[ROWS] = ConformanceRows(config, batches, jobs=1 if xdist else None)


@pytest.fixture(scope="session")
def conformance_rows(request) -> ConformanceRows:
    return request.config.stash[ROWS]


def describe(row: Row) -> str:
    figures = ", ".join(f"{k}={getattr(row, k):.3g}" for k in ("max_abs_err", "max_rel_err", "tolerance",
                                                                  "reference_err", "error_ratio")
                        if getattr(row, k) is not None)
    return f"{row.row_id}: {row.status}: {row.message} [{figures}] (seed {row.seed}, spec {row.spec}, " \
           f"query {row.query_shape}, key {row.key_shape}, value {row.value_shape}, mask {row.mask}, " \
           f"causal {row.causal}, window {row.window}, bias {row.bias}, lengths {row.lengths}, kernel {row.kernel})"


def check_rows(rows: list[Row]) -> None:
    """Pass, divergence: fine. All unsupported/skip: a pytest skip with the reason. Fail or error: a failure."""
    assert rows, "no rows were produced for this test"
    bad = [r for r in rows if r.status.failing]
    if bad:
        pytest.fail("\n".join(describe(r) for r in bad), pytrace=False)
    if all(r.status.not_run for r in rows):
        pytest.skip(f"{rows[0].status}: {rows[0].message}")


@pytest.fixture
def conformance_check(conformance_rows, conformance_key):
    return lambda: check_rows(conformance_rows.get(conformance_key))
