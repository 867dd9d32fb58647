"""Conformance, area 'pairs': the pairwise covering design over lengths, mask form, causal, heads, key_dim,
value_dim, output rank, attention axes, a distinct key, biases and input widths, forward and gradients.

Parametrized in conftest.py over adapter x case x dtype; the rows are computed once per session.
"""
AREA = "pairs"


def test_conformance(conformance_check):
    conformance_check()
