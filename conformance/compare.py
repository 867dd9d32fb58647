"""NaN-aware comparison of an implementation's array against the golden and the reference."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .tolerances import tolerance_and_source


@dataclass
class Comparison:
    ok: bool
    max_abs_err: float | None
    max_rel_err: float | None
    tolerance: float | None
    reference_err: float | None
    error_ratio: float | None
    message: str
    tolerance_source: str | None = None  # "reference", "floor" or "rounding": what set the tolerance

    def figures(self) -> dict:
        return {k: getattr(self, k) for k in ("max_abs_err", "max_rel_err", "tolerance", "reference_err",
                                              "error_ratio", "tolerance_source")}


def _f64(x) -> np.ndarray:
    return np.asarray(x).astype(np.float64)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| over the positions where both are finite (0 when there are none)."""
    both = np.isfinite(a) & np.isfinite(b)
    return float(np.max(np.abs(a[both] - b[both]))) if np.any(both) else 0.0


def nonfinite_mismatch(golden: np.ndarray, actual: np.ndarray) -> str | None:
    """Where ``actual`` has NaN/Inf that the golden lacks, or lacks the golden's; None when they agree."""
    problems = []
    extra_nan = np.isnan(actual) & ~np.isnan(golden)
    missing_nan = np.isnan(golden) & ~np.isnan(actual)
    inf_differs = (np.isinf(golden) | np.isinf(actual)) & ~np.isnan(golden) & ~np.isnan(actual) & (golden != actual)
    for what, where in (("NaN where the golden is not NaN", extra_nan),
                        ("no NaN where the golden is NaN", missing_nan),
                        ("Inf differing from the golden", inf_differs)):
        if np.any(where):
            first = tuple(int(i) for i in np.argwhere(where)[0])
            problems.append(f"{int(where.sum())}/{where.size} elements with {what} (first at {list(first)})")
    return "; ".join(problems) or None


def compare(golden, reference, actual, dtype: str, quantity: str, sensitivity=None) -> Comparison:
    """Compare ``actual`` against ``golden``, with the tolerance the ``reference`` error allows.

    ``sensitivity``: a callable giving the quantity's rounding sensitivity (``tolerances``), called only when
    the error exceeds the tolerance without it."""
    golden, reference, actual = _f64(golden), _f64(reference), _f64(actual)
    if actual.shape != golden.shape:
        return Comparison(False, None, None, None, None, None,
                          f"shape {list(actual.shape)} differs from the golden's {list(golden.shape)}")
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
    problems = []
    mismatch = nonfinite_mismatch(golden, actual)
    if mismatch:
        problems.append(mismatch)
    if abs_err > tol:
        where = np.argwhere(both & (np.abs(golden - actual) > tol))
        first = [int(i) for i in where[0]] if len(where) else []
        problems.append(f"max |golden - {quantity}| = {abs_err:.3g} > tolerance {tol:.3g} "
                        f"({len(where)}/{golden.size} elements, first at {first})")
    return Comparison(not problems, abs_err, rel_err, tol, reference_err, ratio, "; ".join(problems), source)
