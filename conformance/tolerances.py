"""Tolerances, the way PyTorch's own SDPA tests set them.

golden    = the oracle in float64
reference = the same oracle run in the tested dtype (every intermediate rounded to it)
tolerance = max(floor[dtype], fudge[quantity] * max|golden - reference|, sensitivity)

The reference error measures how much a faithful implementation in that
dtype is expected to be off; the fudge factor allows for a different but
reasonable order of operations (fused kernels, other reductions). Gradients
accumulate over more terms than the forward pass, and the query gradient
goes through the softmax Jacobian twice, so its fudge factor is the largest
(PyTorch's SDPA tests do the same: see ``test_transformers.py``,
``fudge_factors`` in the flash/memory-efficient gradient tests).

One reference is one sample of rounding, and it can be exact by luck where
the quantity is ill-conditioned: with logits near 1e4, a float32 softmax row
rounds to exactly one-hot, the reference's query gradient comes out 1e-23,
and any implementation whose softmax is an ulp off is off by 1e-3.
``sensitivity`` measures that: the largest error of the reference rerun
three times with every intermediate perturbed by up to two ulp
(``oracle.Numerics(rounding_noise=...)``): what a correct implementation
whose steps round differently, or whose exp and division are accurate to an
ulp or two, can give. It is computed only for a result that would otherwise
fail, and it is not multiplied by a fudge factor. On well-conditioned cases
it is mostly below the fudged reference error (median 0.56x over the
float32 and bfloat16 output, grad_query and grad_Wv rows of the shapes,
masks and gradients areas), up to 3x on a few tiny bfloat16 outputs.
"""
from __future__ import annotations

# Absolute floors per dtype: PyTorch's default atol for 16/32-bit floats. float64 is held far tighter than
# float32's floor, so an implementation that quietly computes in float32 when asked for float64 fails.
FLOOR = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-3, "bfloat16": 1e-3}

FUDGE = {
    "output": 4.0,
    "output_with_scores": 4.0,
    "scores": 4.0,
    "grad_query": 32.0,
    "grad_key": 16.0,
    "grad_value": 8.0,
    "grad_Wq": 32.0,
    "grad_bq": 32.0,
    "grad_Wk": 16.0,
    "grad_bk": 16.0,
    "grad_Wv": 8.0,
    "grad_bv": 8.0,
    "grad_Wo": 8.0,
    "grad_bo": 8.0,
    # the additive bias's gradient is the scores' gradient (summed over the axes the bias broadcasts along),
    # the same softmax-Jacobian product the key gradient is formed from
    "grad_bias": 16.0,
}


def fudge(quantity: str) -> float:
    if quantity not in FUDGE:
        raise ValueError(f"no fudge factor for quantity {quantity!r}; known: {', '.join(FUDGE)}")
    return FUDGE[quantity]


def tolerance(dtype: str, quantity: str, reference_err: float, magnitude: float = 1.0) -> float:
    """The absolute tolerance for ``quantity`` in ``dtype`` given the reference's own error.

    The floor is an absolute error for values of order one; it grows with ``magnitude`` (the golden's
    largest finite value) when that exceeds one, as a rounding error does. It matters only where the
    reference error is zero or tiny (float64, or a lucky low-precision reference).
    """
    return tolerance_and_source(dtype, quantity, reference_err, magnitude)[0]


def tolerance_and_source(dtype: str, quantity: str, reference_err: float, magnitude: float = 1.0,
                         sensitivity: float = 0.0) -> tuple[float, str]:
    """The tolerance, and what set it: ``"reference"`` (fudge x the reference's error), ``"floor"``, or
    ``"rounding"`` (the ``sensitivity``: the error two ulp of noise on each intermediate gives).

    Only where the reference set it does the error ratio |golden - impl| / |golden - reference| say
    something; where the floor did, the reference is exact by luck or symmetry and the ratio divides
    by almost nothing."""
    if dtype not in FLOOR:
        raise ValueError(f"no tolerance floor for dtype {dtype!r}; known: {', '.join(FLOOR)}")
    floor = FLOOR[dtype] * max(1.0, float(magnitude))
    fudged = fudge(quantity) * float(reference_err)
    best = (fudged, "reference") if fudged >= floor else (floor, "floor")
    return (float(sensitivity), "rounding") if sensitivity > best[0] else best
