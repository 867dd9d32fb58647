"""asv benchmarks of multi-head attention: time, per-call peak memory and GFLOP/s.

The benchmark grid comes from a profile (``MHABENCH_PROFILE``, see
:mod:`benchmarks.profiles`); no framework is imported at module import.
"""
