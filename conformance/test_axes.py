"""Conformance, area 'axes': attention_axes: default multi-axis, single axes with extra batch axes, negative axes, with masks and causal.

Parametrized in conftest.py over adapter x case x dtype; the rows are computed once per session.
"""
AREA = "axes"


def test_conformance(conformance_check):
    conformance_check()
