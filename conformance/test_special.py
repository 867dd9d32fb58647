"""Conformance, area 'special': NaN and Inf in one input position: local, row, or batch, against the oracle's plain arithmetic.

Parametrized in conftest.py over adapter x case x dtype; the rows are computed once per session.
"""
AREA = "special"


def test_conformance(conformance_check):
    conformance_check()
