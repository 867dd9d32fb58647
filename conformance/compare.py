"""NaN-aware comparison of an implementation's array against the golden and the reference."""
from __future__ import annotations

import numpy as np

from mhabench.schema import Comparison, Finding, FindingKind

from .tolerances import tolerance_and_source

__all__ = ["Comparison", "compare", "max_abs_diff", "nonfinite_findings"]


def _f64(x) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| over the positions where both are finite (0 when there are none)."""
    both = np.isfinite(a) & np.isfinite(b)
    return float(np.max(np.abs(a[both] - b[both]))) if np.any(both) else 0.0


def _where(kind: FindingKind, where: np.ndarray, **details) -> Finding:
    first = tuple(int(i) for i in np.argwhere(where)[0]) if np.any(where) else ()
    return Finding(kind, int(where.sum()), int(where.size), first, **details)


def nonfinite_findings(golden: np.ndarray, actual: np.ndarray) -> tuple[Finding, ...]:
    """Where ``actual`` has NaN/Inf that the golden lacks, or lacks the golden's; none when they agree."""
    extra_nan = np.isnan(actual) & ~np.isnan(golden)
    missing_nan = np.isnan(golden) & ~np.isnan(actual)
    inf_differs = (np.isinf(golden) | np.isinf(actual)) & ~np.isnan(golden) & ~np.isnan(actual) & (golden != actual)
    return tuple(_where(kind, where) for kind, where in ((FindingKind.EXTRA_NAN, extra_nan),
                                                        (FindingKind.MISSING_NAN, missing_nan),
                                                        (FindingKind.INF_MISMATCH, inf_differs)) if np.any(where))


def compare(golden, reference, actual, dtype: str, quantity: str, sensitivity=None) -> Comparison:
    """Compare ``actual`` against ``golden``, with the tolerance the ``reference`` error allows.

    ``sensitivity``: a callable giving the quantity's rounding sensitivity (``tolerances``), called only when
    the error exceeds the tolerance without it."""
    golden, reference, actual = _f64(golden), _f64(reference), _f64(actual)
    if actual.shape != golden.shape:
        return Comparison(None, None, None, None, None, findings=(
            Finding(FindingKind.SHAPE, shapes=(tuple(actual.shape), tuple(golden.shape))),))
    reference_err = max_abs_diff(golden, reference)
    finite = golden[np.isfinite(golden)]
    magnitude = float(np.max(np.abs(finite))) if finite.size else 1.0
    tol, source = tolerance_and_source(dtype, quantity, reference_err, magnitude)
    abs_err = max_abs_diff(golden, actual)
    if abs_err > tol and sensitivity is not None:
        tol, source = tolerance_and_source(dtype, quantity, reference_err, magnitude, sensitivity())
    both = np.isfinite(golden) & np.isfinite(actual)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        rel = np.abs(golden - actual)[both] / np.maximum(np.abs(golden[both]), np.finfo(np.float64).tiny)
    rel_err = float(np.max(rel)) if rel.size else 0.0
    ratio = abs_err / reference_err if reference_err > 0 else (0.0 if abs_err == 0 else None)
    findings = nonfinite_findings(golden, actual)
    if abs_err > tol:
        findings += (_where(FindingKind.TOLERANCE, both & (np.abs(golden - actual) > tol), error=abs_err,
                            tolerance=tol, quantity=str(quantity)),)
    return Comparison(abs_err, rel_err, tol, reference_err, ratio, source, findings)
