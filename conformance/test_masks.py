"""Conformance, area 'masks': masks ([B,T,S], [T,S], key padding, per head), causal (T != S: top-left), causal + padding, fully masked rows, all allowed.

Parametrized in conftest.py over adapter x case x dtype; the rows are computed once per session.
"""
AREA = "masks"


def test_conformance(conformance_check):
    conformance_check()
