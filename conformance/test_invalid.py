"""Conformance, area 'invalid': bad input: every adapter raises the shared validation's ValueError/TypeError, word for word.

Parametrized in conftest.py over adapter x case x dtype; the rows are computed once per session.
"""
AREA = "invalid"


def test_conformance(conformance_check):
    conformance_check()
