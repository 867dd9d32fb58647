"""The divergence catalogue stays true: every entry still reproduces exactly as described."""
import pytest

from mhabench.conformance import catalogue

ENTRIES = catalogue.load()


def test_catalogue_loads_and_every_entry_is_checkable():
    for entry in ENTRIES:
        assert entry.how, entry.id
        assert entry.observed.strip(), entry.id


@pytest.mark.parametrize("catalogue_entry", ENTRIES, ids=[e.id for e in ENTRIES])
def test_entry_reproduces(catalogue_entry, conformance_rows, request):
    from mhabench.conformance import pytest_view
    from mhabench.conformance.pytest_view import catalogue_keys, selected_adapters, selected_dtypes
    if not set(catalogue_entry.adapters) & set(selected_adapters(request.config)):
        pytest.skip(f"none of {catalogue_entry.adapters} selected or installed")
    if catalogue_entry.dtypes and not set(catalogue_entry.dtypes) & set(selected_dtypes(request.config)):
        pytest.skip(f"covers dtypes {list(catalogue_entry.dtypes)}, none selected (--dtypes)")
    rows = [r for key in catalogue_keys(request.config, catalogue_entry) for r in conformance_rows.get(key)]
    entry = pytest_view.catalogue(request.config).only(catalogue_entry)
    [check] = entry.check(rows, selected_adapters(request.config), full_matrix=True)
    if check.status == "unchecked" and catalogue_entry.varies and check.silent:
        pytest.skip(f"{catalogue_entry.id}: {check.message}")  # declared machine-dependent, not shown here
    if check.status == "unchecked" and catalogue_entry.facts and check.message.startswith("applies when"):
        # another machine's kernels: conformance/test_switches.py runs them
        pytest.skip(f"{catalogue_entry.id}: {check.message}")
    assert check.status == "ok", f"{catalogue_entry.id} ({catalogue_entry.source}) is {check.status}: {check.message}"
