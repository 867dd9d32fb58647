"""Conformance, area 'shapes': self and cross attention, T != S, key != value, heads 1..16, key_dim != value_dim, output_shape, no bias, batch and length 1.

Parametrized in conftest.py over adapter x case x dtype; the rows are computed once per session.
"""
AREA = "shapes"


def test_conformance(conformance_check):
    conformance_check()
