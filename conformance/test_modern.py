"""Conformance, area 'modern': grouped-query attention, bottom-right causal (T < S and T > S), sliding windows (also
across kernel tiles), the additive bias (with fully masked rows) and lengths, alone and with masks and causal,
forward and gradients (the bias's included).

Parametrized in conftest.py over adapter x case x dtype; the rows are computed once per session.
"""
AREA = "modern"


def test_conformance(conformance_check):
    conformance_check()
