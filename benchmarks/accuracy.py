"""How large an adapter's error is, and how it grows with L: the measurement behind the accuracy benchmarks.

For one adapter, attention pattern (self or causal self-attention), input distribution and length, each dtype
the adapter runs (float32, float16, bfloat16) is measured against the float64 oracle on the same inputs and
weights, through the public call users make (``layer(query, value, causal=...)``, the default path):

- ``max_rel_error``: the largest absolute error over the largest magnitude of the golden output,
  ``max|y - g| / max|g|`` (relative to the output's scale, so a near-zero element does not blow it up);
- ``rms_error``: the root mean square of ``y - g`` (the figure the FlashAttention-3 paper tabulates);
- ``sum_error``: the error of the output-weighted sum ``sum(w * y)``, the scalar a loss sees and the one whose
  gradient the backward computes (``w``: seeded standard normals, the cotangent), relative to ``sum|w * g|``.

Where the adapter has a backward and ``gradients`` is asked (the default and full profiles), also
``grad_rel_rms_error``: the gradients of ``sum(w * y)`` (``layer.gradients``, with respect to the inputs and
every weight) against the float64 oracle's backward, the largest over the gradients of ``rms(error) /
rms(exact)`` (a gradient that is zero canonically, the key bias's, left out); up to ``GRADIENT_MAX_LEN``
keys, since the oracle's backward holds the scores whole.

Beside each, the same figure of the *same-precision reference* (the oracle run in that dtype, every stage
rounded as the frameworks' kernels round, as conformance uses it), so a kernel's error reads against what a
plain implementation in the dtype gets: ``ratio`` = error / reference error.

The inputs are self-attention's: one seeded input ``x`` is the query, the key and the value. ``normal``: standard
normals (with the suite's Glorot weights the logits have a standard deviation of about 1); ``peaky``: ``x`` scaled
by the square root of ``PEAKY_LOGIT_SCALE``, so the logits' spread is about 8 and each softmax row is dominated by
a few keys, where kernels' maxima, exponentials and accumulations part (the values grow by the same root, which
the ratio to the reference does not see).

The float64 golden is computed blockwise from ``BLOCKWISE_FROM`` keys on (the scores are never held whole),
and kept in the cache folder (``accuracy/``) with the reference's errors, so the adapters measured after the
first one at a length read them instead of computing them again.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from mhabench.results import ACCURACY_FIGURES

DTYPES = ("float32", "float16", "bfloat16")
METRICS = ACCURACY_FIGURES[:3]             # the forward's figures
GRADIENT = "grad_rel_rms_error"            # the gradients' figure
GRADIENT_MAX_LEN = 2048
INPUTS = ("normal", "peaky")
KINDS = ("self", "causal")
# asv's unit of each figure: all three are dimensionless (the RMS error is in the output's own units, which
# with unit-variance inputs and Glorot weights are of order 1)
UNITS = {"max_rel_error": "relative error", "rms_error": "RMS error", "sum_error": "relative error",
         "grad_rel_rms_error": "relative error"}
PEAKY_LOGIT_SCALE = 8.0
BLOCKWISE_FROM = 1024      # keys; the golden's block of query rows is BLOCK_ROWS
BLOCK_ROWS = 256
SEED = 0
# A case's measurement costs about one forward call per dtype, and ORACLE_CALLS calls' worth for the oracle's
# golden and its references (NumPy computes them at a fraction of a kernel's speed; the first adapter at a length
# pays it), shared by its methods
ORACLE_CALLS = 24
CALLS_PER_METHOD = (len(DTYPES) + ORACLE_CALLS) / (len(DTYPES) * len(ACCURACY_FIGURES))
VERSION = 3                # of the cached goldens: bump when how they are computed changes


def errors(actual, golden, weight) -> dict[str, float]:
    """The three figures of ``actual`` against ``golden`` (both any float dtype; computed in float64)."""
    y = np.asarray(actual, dtype=np.float64)
    g = np.asarray(golden, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    if y.shape != g.shape:
        raise ValueError(f"actual has shape {y.shape}, expected the golden's {g.shape}")
    if not np.all(np.isfinite(y)):
        nan = math.nan
        return {"max_rel_error": nan, "rms_error": nan, "sum_error": nan}
    diff = y - g
    scale = float(np.max(np.abs(g))) or 1.0
    terms = float(np.sum(np.abs(w * g))) or 1.0
    return {"max_rel_error": float(np.max(np.abs(diff))) / scale,
            "rms_error": float(np.sqrt(np.mean(diff * diff))),
            "sum_error": abs(float(np.sum(w * y)) - float(np.sum(w * g))) / terms}


@dataclass(frozen=True)
class Problem:
    """One accuracy problem: the pattern, the inputs and the shape; everything it needs is drawn from SEED."""

    kind: str          # self | causal
    inputs: str        # normal | peaky
    seq_len: int
    num_heads: int = 8
    batch: int = 1
    model_dim: int = 512

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.inputs not in INPUTS:
            raise ValueError(f"inputs must be one of {', '.join(INPUTS)}, got {self.inputs!r}")
        for name in ("seq_len", "num_heads", "batch", "model_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")

    @property
    def causal(self) -> bool:
        return self.kind == "causal"

    @property
    def spec(self):
        from mhabench.impls import AttentionSpec
        return AttentionSpec(num_heads=self.num_heads, key_dim=max(1, self.model_dim // self.num_heads))

    def weights(self):
        from mhabench.impls import Weights
        return Weights.random(self.spec, query_dim=self.model_dim, value_dim=self.model_dim, seed=SEED)

    def draw(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query, value, w): self-attention's one input as both (key = value = query), float64 standard normals
        scaled for ``peaky``; w, standard normals of the output's shape."""
        rng = np.random.default_rng([SEED, self.seq_len, self.batch, self.model_dim])
        shape = (self.batch, self.seq_len, self.model_dim)
        x = rng.standard_normal(shape)
        weight = rng.standard_normal(shape)  # the output's shape: out_shape is the query's width here
        if self.inputs == "peaky":  # q and k both scale with x: the logits by its square
            x = x * math.sqrt(PEAKY_LOGIT_SCALE)
        return x, x, weight

    def key(self) -> str:
        text = json.dumps({**asdict(self), "seed": SEED, "peaky": PEAKY_LOGIT_SCALE, "version": VERSION},
                          sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def oracle_gradients(self, dtype: str = "float64") -> dict[str, np.ndarray]:
        """The oracle's gradients of ``sum(w * output)`` in ``dtype`` (float64: the golden)."""
        from mhabench.impls import oracle_backward
        query, value, weight = self.draw()
        return oracle_backward.backward(self.spec, self.weights(), query, value, causal=self.causal,
                                        cotangent=weight, dtype=dtype)

    def oracle(self, dtype: str = "float64") -> np.ndarray:
        """The oracle's output in ``dtype`` (float64: the golden), blockwise at long lengths."""
        from mhabench.impls import oracle
        query, value, _ = self.draw()
        block = BLOCK_ROWS if self.seq_len >= BLOCKWISE_FROM else None
        out, _ = oracle.forward(self.spec, self.weights(), query, value, causal=self.causal, return_scores=False,
                                dtype=dtype, block_size=block)
        return out


ZERO_GRADIENT = 1e-9  # a gradient this small against the largest is zero canonically (the key bias's)


def gradient_error(actual: dict, golden: dict) -> float:
    """The largest, over the gradients both hold, of ``rms(actual - golden) / rms(golden)``; NaN where a gradient
    is not finite or none is shared. A gradient that is zero canonically is left out: adding the key bias adds
    the same to every logit of a row, which the softmax ignores, so its exact gradient is 0 and any rounding
    would be an unbounded relative error."""
    shared = sorted(set(actual) & set(golden))
    scales = {n: float(np.sqrt(np.mean(np.asarray(golden[n], np.float64) ** 2))) for n in shared}
    largest = max(scales.values(), default=0.0)
    worst = math.nan
    for name in shared:
        y, g = np.asarray(actual[name], np.float64), np.asarray(golden[name], np.float64)
        if y.shape != g.shape or not np.all(np.isfinite(y)):
            return math.nan
        if scales[name] <= ZERO_GRADIENT * largest:
            continue
        error = float(np.sqrt(np.mean((y - g) ** 2))) / scales[name]
        worst = error if not worst >= error else worst
    return worst


@dataclass
class Golden:
    """The float64 golden of a problem, its gradients when asked, and its same-precision reference's errors per
    dtype (``{dtype: {figure: error}}``)."""

    output: np.ndarray
    reference: dict[str, dict[str, float]] = field(default_factory=dict)
    gradients: dict[str, np.ndarray] | None = None


def golden(problem: Problem, dtypes=DTYPES, gradients: bool = False) -> Golden:
    """The problem's golden and reference errors, from the cache folder where an earlier process left them."""
    from mhabench.impls import cache
    folder = cache.folder("accuracy")
    stem = folder / problem.key() if folder is not None else None
    found = _read(stem, gradients)
    if found is None:
        found = Golden(problem.oracle("float64"))
    _, _, weight = problem.draw()
    changed = found.output is not None and stem is not None and not stem.with_suffix(".npy").exists()
    for dtype in dtypes:
        if dtype not in found.reference:
            found.reference[dtype] = errors(problem.oracle(dtype), found.output, weight)
            changed = True
    if gradients:
        if found.gradients is None:
            found.gradients = problem.oracle_gradients("float64")
            changed = True
        for dtype in dtypes:
            if GRADIENT not in found.reference[dtype]:
                found.reference[dtype][GRADIENT] = gradient_error(problem.oracle_gradients(dtype), found.gradients)
                changed = True
    if stem is not None and changed:
        _write(stem, found)
    return found


def _read(stem, gradients: bool) -> Golden | None:
    if stem is None:
        return None
    try:
        output = np.load(stem.with_suffix(".npy"), allow_pickle=False)
        reference = json.loads(stem.with_suffix(".json").read_text())
        grads = None
        if gradients and stem.with_suffix(".npz").exists():
            with np.load(stem.with_suffix(".npz"), allow_pickle=False) as stored:
                grads = {k: stored[k] for k in stored.files}
    except (OSError, ValueError):
        return None
    if not isinstance(reference, dict):
        return None
    return Golden(output, reference, grads)


def _write(stem, found: Golden) -> None:
    """The files through a temporary file and a rename each: a reader in another process sees whole files."""
    import io
    from mhabench import results
    files = {stem.with_suffix(".json"): json.dumps(found.reference, sort_keys=True)}
    buffer = io.BytesIO()
    np.save(buffer, found.output, allow_pickle=False)
    files[stem.with_suffix(".npy")] = buffer.getvalue()
    if found.gradients is not None:
        buffer = io.BytesIO()
        np.savez(buffer, **found.gradients)
        files[stem.with_suffix(".npz")] = buffer.getvalue()
    try:
        results.atomic_write_many(files)
    except OSError:  # an unwritable cache costs time, never a result
        pass


def ratio(error: float, reference: float) -> float:
    """error / reference error; 1 where both are 0 (exact), inf where only the reference is."""
    if not (math.isfinite(error) and math.isfinite(reference)):
        return math.nan
    if reference == 0:
        return 1.0 if error == 0 else math.inf
    return error / reference


def measure(build, problem: Problem, dtypes=DTYPES, gradients: bool = False) -> list[dict]:
    """One record per dtype. ``build(dtype)`` gives the layer, or the reason (a str) it cannot run in that dtype;
    a layer is built, called and dropped before the next. A record holds the three figures, the reference's and
    their ratios, or the ``skipped``/``failed`` reason (a build or call that raises fails its dtype only).
    ``gradients``: also the gradients' figure (``GRADIENT``), where the adapter has a backward and L is at most
    ``GRADIENT_MAX_LEN``; ``gradient_status`` and ``gradient_reason`` say why where it is not measured."""
    gradients = gradients and problem.seq_len <= GRADIENT_MAX_LEN
    gold = golden(problem, DTYPES, gradients)
    query, value, weight = problem.draw()
    out = []
    for dtype in dtypes:
        record = {"dtype": dtype, "inputs": problem.inputs, "kind": problem.kind, "seq_len": problem.seq_len}
        try:
            layer = build(dtype)
            if isinstance(layer, str):
                out.append({**record, "status": "skipped", "reason": layer})
                continue
            with np.errstate(all="ignore"):
                actual, _ = layer(query, value, causal=problem.causal)
        except Exception as exc:  # the adapter's fault: the record says so and the other dtypes go on
            out.append({**record, "status": _status(exc), "reason": f"{type(exc).__name__}: {exc}"})
            continue
        figures = errors(actual, gold.output, weight)
        reference = dict(gold.reference[dtype])
        if gradients:
            try:
                with np.errstate(all="ignore"):
                    grads = layer.gradients(query, value, causal=problem.causal, cotangent=weight)
                figures[GRADIENT] = gradient_error(grads, gold.gradients)
                record["gradient_status"] = "ok"
            except Exception as exc:  # no backward, or a backward that fails: the forward's figures stand
                record.update(gradient_status=_status(exc), gradient_reason=f"{type(exc).__name__}: {exc}")
        else:
            record.update(gradient_status="skipped", gradient_reason="gradients not asked" if problem.seq_len <=
                          GRADIENT_MAX_LEN else f"gradients are measured up to L = {GRADIENT_MAX_LEN} (the float64 "
                          f"oracle's backward holds the scores whole)")
        reference = {k: v for k, v in reference.items() if k in figures}
        layer = None
        out.append({**record, "status": "ok", **figures,
                    "reference": reference, "ratio": {m: ratio(figures[m], reference[m]) for m in figures}})
    return out


def _status(exc: BaseException) -> str:
    from mhabench.impls.base import UnsupportedError
    return "skipped" if isinstance(exc, (UnsupportedError, NotImplementedError)) else "failed"
