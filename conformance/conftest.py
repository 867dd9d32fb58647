"""The conformance suite's pytest hooks and fixtures (defined in ``mhabench.conformance.pytest_view``)."""
from mhabench.conformance.pytest_view import (  # noqa: F401
    ConformanceRows, check_rows, conformance_check, conformance_rows, pytest_addoption, pytest_collection_finish,
    pytest_generate_tests, pytest_xdist_make_scheduler)
