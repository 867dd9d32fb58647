"""Conformance, area 'gradients': gradients of every input and weight against the oracle's analytic backward.

Parametrized in conftest.py over adapter x case x dtype; the rows are computed once per session.
"""
AREA = "gradients"


def test_conformance(conformance_check):
    conformance_check()
