"""Conformance, area 'decode': a decoder step against a key/value cache (T = 1, and T = 4 speculative queries, against
up to 4096 keys), each sequence at its own past length, grouped-query, multi-query and classic heads, with the soft
cap, the logit scale and a sliding window, alone and together; forward and gradients.

Parametrized in conftest.py over adapter x case x dtype; the rows are computed once per session.
"""
AREA = "decode"


def test_conformance(conformance_check):
    conformance_check()
