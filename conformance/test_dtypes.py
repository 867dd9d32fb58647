"""Conformance, area 'dtypes': numerics: large logits (~1e4, softmax stability), tiny inputs, long key sequences.

Parametrized in conftest.py over adapter x case x dtype; the rows are computed once per session.
"""
AREA = "dtypes"


def test_conformance(conformance_check):
    conformance_check()
