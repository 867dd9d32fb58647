"""Conformance under other machines' kernels, so a green run here means green there.

TensorFlow turns its oneDNN kernels on by default only on CPUs with AVX512_VNNI, AVX512_BF16, AVX_VNNI or AMX,
and torch's vectorised kernels run 16 float lanes under AVX-512 and 8 under AVX2: the same commit can pass on
one CPU generation and fail on another. Each test judges one adapter under one setting of a kernel switch its
framework declares (``impls.facts.Switch``: TF_ENABLE_ONEDNN_OPTS on and off, every ATEN_CPU_CAPABILITY this
CPU can run), set in its worker process, over the areas whose verdicts those kernels decide (special values,
gradients, dtypes: every special case, the reduced matrix of the others, all with --full-matrix), in the
selected dtypes (float32 by default), and asserts: the framework reports the setting, no row fails or errors,
no catalogue entry is contradicted.
"""
import pytest

from mhabench.conformance import cases as cases_mod
from mhabench.conformance.pytest_view import catalogue, describe, selected_adapters, selected_dtypes, under_xdist
from mhabench.conformance.runner import run_rows
from mhabench.impls import registry

AREAS = ("special", "gradients", "dtypes")
MAX_CASE_BYTES = 1 << 19  # the tile-length cases of the dtypes area are left to the matrix: seconds each


def _settings(config) -> list[tuple]:
    """(switch, setting, adapter) for every setting this CPU runs of every switch a selected adapter declares.
    The adapters that let the framework choose its kernel, as users run them: a forced-kernel variant runs the
    same kernels, and an adapter held to the reduced matrix (each shape a compilation) is left to the plain
    conformance tests."""
    out = []
    for adapter in selected_adapters(config):
        declared = registry.get_adapter(adapter)
        if declared.kernel != "default" or getattr(declared, "reduced_matrix", None):
            continue
        for switch in registry.get_adapter(adapter).switches():
            out += [(switch, setting, adapter) for setting in switch.runnable()]
    return out


def pytest_generate_tests(metafunc):
    if "switched" in metafunc.fixturenames:
        found = _settings(metafunc.config)
        metafunc.parametrize("switched", found, ids=[f"{s.name}={v}-{a}" for s, v, a in found])


def _cases(config):
    """Every case of the special area (where the kernels decide verdicts), the reduced matrix of the other two;
    with --full-matrix, all of them."""
    found = cases_mod.select(cases_mod.default_cases(), AREAS)
    if config.getoption("--full-matrix"):
        return found
    return [c for c in found if (c.area == "special" or c.quick) and c.estimated_bytes() <= MAX_CASE_BYTES]


COMPUTED = pytest.StashKey[dict]()  # on the config: setting label -> the rows of every adapter it reaches


def _rows(config, switch, setting, adapter) -> list:
    """The rows of ``adapter`` under ``setting``, computed with every adapter the setting reaches, once per pytest
    run: their worker processes share the cores (under pytest-xdist all of a setting's tests go to one xdist
    worker, which runs them one process at a time)."""
    computed = config.stash.setdefault(COMPUTED, {})
    label = f"{switch.name}={setting}"
    if label not in computed:
        adapters = [a for s, v, a in _settings(config) if (s.name, v) == (switch.name, setting)]
        computed[label] = run_rows(adapters, _cases(config), selected_dtypes(config), switches={switch.name: setting},
                                   jobs=1 if under_xdist(config) else None,
                                   timeout=config.getoption("--conform-timeout"))
    return [r for r in computed[label] if r.adapter == adapter]


def test_conformance_under_another_machines_kernels(switched, request):
    switch, setting, adapter = switched
    rows = _rows(request.config, switch, setting, adapter)
    ran = [r for r in rows if r.facts]
    assert ran, f"no row of {adapter} ran: {rows[0].message if rows else 'no rows'}"
    reported = {r.facts.get(switch.fact) for r in ran}
    assert reported == {switch.expect[setting]}, \
        f"{switch.variable}={switch.value(setting)}: {adapter} reports {switch.fact} = {reported}"
    bad = [r for r in rows if r.status.failing]
    assert not bad, "\n".join(describe(r) for r in bad)
    stale = [c for c in catalogue(request.config).check(rows, [adapter]) if c.status == "stale"]
    assert not stale, "\n".join(f"{c.id}: {c.message}" for c in stale)
