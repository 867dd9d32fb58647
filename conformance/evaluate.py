"""Evaluate one adapter on one case, in this process: the rows of that adapter x case x dtypes.

Everything here goes through the adapter interface only (``build``, the layer
call, ``gradients``, ``unsupported_reason``), so a new adapter needs no change.
"""
from __future__ import annotations

import time
import traceback
import zlib

import numpy as np

from mhabench import impls
from mhabench.impls.base import UnsupportedError
from mhabench.schema import Quantity, Refusal, RefusalKind, Row, Status

from . import catalogue as catalogue_mod
from .cases import Case, InvalidCase, from_dict
from .compare import compare, max_abs_diff

# a key of ``Layer.gradients`` (an input, a weight, the bias) -> the quantity of its gradient
GRADIENT_OF = {q.gradient_of: q for q in Quantity if q.is_gradient}
# what every row records about its adapter, from the adapter's own declarations (Row fields of the same names)
ADAPTER_FACTS = ("framework", "kernel", "opset")


def _oracle_backward():
    try:
        from mhabench.impls import oracle_backward
    except ImportError:
        return None
    return oracle_backward


def case_row(adapter, case: Case | InvalidCase, dtype: str, quantity: str, device: str = "cpu", **verdict) -> Row:
    """The row of ``adapter x case x dtype x quantity``: what the adapter and the case were, and ``verdict``
    (status, message, figures, what the adapter recorded about the call; a fact of ``ADAPTER_FACTS`` given there,
    such as the opset of the graph this call ran, replaces the adapter's)."""
    facts = {fact: verdict.pop(fact) if fact in verdict else getattr(adapter, fact) for fact in ADAPTER_FACTS}
    return Row(adapter=adapter.name, framework_version=adapter.version(), case=case.id, area=case.area, dtype=dtype,
               device=device, quantity=quantity, **facts, **case.row_fields(), **verdict)


def status_rows(adapter, case: Case | InvalidCase, dtypes, status: str, message: str, quantities=None) -> list[Row]:
    """Rows with one status and message for every dtype x quantity of a case (errors, skips)."""
    return [case_row(adapter, case, dtype, q, status=status, message=str(message))
            for dtype in dtypes for q in quantities or case.quantities()]


class Goldens:
    """The oracle's answers for one case, per (fully_masked policy, dtype, backward form), each part computed
    once, on demand: the forward (``output``, which is also what ``output_with_scores`` must be, and
    ``scores``), the analytic backward (``grad_*``) and the framework models a catalogue entry names."""

    def __init__(self, case: Case, inputs):
        self.case, self.inputs, self._cache = case, inputs, {}

    def get(self, policy: str, dtype: str, form: str = "probs") -> "_Lazy":
        """``form``: how the backward forms the softmax's gradient (``oracle_backward.backward``)."""
        return _Lazy(self, policy, dtype, form)

    def modelled(self, model: str, dtype: str, machine: dict | None = None) -> dict[str, np.ndarray]:
        """``framework_models.<model>`` of the case's inputs: every quantity, in float64 for the golden or rounded
        to ``dtype`` as the oracle rounds its reference. ``machine``: what a model of a machine-dependent
        kernel reads (the row's facts it names, the dtype the kernel ran), passed to it as keywords."""
        key = ("model", model, dtype, repr(sorted((machine or {}).items())))
        if key not in self._cache:
            from . import framework_models
            self._cache[key] = getattr(framework_models, model)(self.inputs, dtype, **(machine or {}))
        return self._cache[key]

    def sensitivity(self, dtype: str, quantity: str, policy: str = "zeros", form: str = "probs") -> float:
        """How far from the golden the reference lands when every intermediate is perturbed by up to two ulp
        (the largest of three draws, seeded by the case): the rounding sensitivity ``tolerances`` describes."""
        golden = np.asarray(self.get(policy, "float64")[quantity], np.float64)
        gradients = quantity.startswith("grad_")
        return max(max_abs_diff(golden, self._part(policy, dtype, gradients, form,
                                                   zlib.crc32(f"{self.case.id}/{dtype}/{draw}".encode()))[quantity])
                   for draw in range(3))

    def _part(self, policy: str, dtype: str, gradients: bool, form: str = "probs",
              noise: int | None = None) -> dict[str, np.ndarray]:
        key = (policy, dtype, gradients, form if gradients else "probs", noise)
        if key not in self._cache:
            i = self.inputs
            with np.errstate(all="ignore"):
                if gradients:
                    grads = _oracle_backward().backward(i.spec, i.weights, *i.args(), i.cotangent,
                                                        fully_masked=policy, dtype=dtype, rounding_noise=noise,
                                                        form=form, **i.features())
                    self._cache[key] = {GRADIENT_OF[k]: np.asarray(v, dtype=np.float64) for k, v in grads.items()}
                else:
                    out, scores = impls.oracle.forward(i.spec, i.weights, *i.args(), return_scores=True,
                                                       fully_masked=policy, dtype=dtype, rounding_noise=noise,
                                                       **i.features())
                    self._cache[key] = {Quantity.OUTPUT: out, Quantity.OUTPUT_WITH_SCORES: out,
                                        Quantity.SCORES: scores}
        return self._cache[key]


class _Lazy:
    """The goldens of one (policy, dtype), indexed by quantity: the backward runs only if a gradient is asked."""

    def __init__(self, goldens: Goldens, policy: str, dtype: str, form: str = "probs"):
        self.goldens, self.policy, self.dtype, self.form = goldens, policy, dtype, form

    def __getitem__(self, quantity: str) -> np.ndarray:
        return self.goldens._part(self.policy, self.dtype, quantity.startswith("grad_"), self.form)[quantity]


def _judge(verdict: dict, adapter: str, case_id: str, quantity: str, actual, goldens: Goldens, dtype: str,
           catalogue, facts: dict | None = None) -> None:
    """Fill a row's verdict (figures and status): pass, fail, or divergence (a catalogued behaviour that shows).
    ``facts``: what chose the kernels that computed it; an entry applies only under the facts it names."""
    golden, reference = goldens.get("zeros", "float64")[quantity], goldens.get("zeros", dtype)[quantity]
    result = compare(golden, reference, actual, dtype, quantity, lambda: goldens.sensitivity(dtype, quantity))
    verdict.update(result.figures())
    covering = catalogue.covering(adapter, case_id, dtype, quantity, facts)
    reproduce = lambda entry, arr: catalogue_mod.reproduce(entry, quantity, dtype, arr, goldens, result, compare,
                                                            facts)
    if result.ok:
        verdict.update(status=Status.PASS, message="")
        for entry in covering:  # a pass where the entry predicts a visibly different result contradicts it,
            if entry.max_error_ratio is not None or entry.check is not None:  # unless the result fits both
                continue
            predicted = reproduce(entry, golden)
            if predicted is not None and not predicted.ok and not reproduce(entry, actual).ok:
                verdict.update(contradicts=entry.id, message=f"passes canonically, so catalogue entry {entry.id} "
                                                             f"no longer shows here")
        return
    verdict.update(status=Status.FAIL, message=result.message)
    for entry in covering:
        alt = reproduce(entry, actual)
        if alt is None:
            verdict["message"] += f" (catalogue entry {entry.id} does not apply to {quantity})"
            continue
        if alt.ok:
            verdict.update(alt.figures())
            verdict.update(status=Status.DIVERGENCE, divergence=entry.id,
                           canonical_err=_relative(result.max_abs_err, golden), canonical_nonfinite=result.nonfinite,
                           message=f"{entry.observed} (canonical comparison: {result.message})")
            return
    if covering:
        verdict["message"] += " (covered by a catalogue entry, but not as it describes)"


def _relative(abs_err: float | None, golden) -> float | None:
    """``abs_err`` relative to the golden's largest finite magnitude where that exceeds 1, absolute below (a
    gradient that is canonically zero, such as the key bias's, would make any relative figure unbounded):
    comparable across quantities and input scales."""
    finite = np.abs(np.asarray(golden, np.float64))
    finite = finite[np.isfinite(finite)]
    return None if abs_err is None else abs_err / max(1.0, float(finite.max()) if finite.size else 1.0)


def _error_text(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"


def evaluate_case(adapter_name: str, case: Case, dtypes, entries=None, memory_budget: int | None = None,
                  device: str = "cpu") -> list[Row]:
    """Rows for ``adapter x case x dtypes`` (every quantity of the case), never raising for the adapter's faults.

    ``entries``: the divergence catalogue (a ``catalogue.Catalogue``, or entries), loaded when None."""
    adapter = impls.get_adapter(adapter_name)
    catalogue = catalogue_mod.load() if entries is None else catalogue_mod.as_catalogue(entries)
    ok, why = adapter.availability()
    if not ok:
        return status_rows(adapter, case, dtypes, Status.UNSUPPORTED, f"adapter unavailable: {why}")
    if memory_budget is not None and case.estimated_bytes() > memory_budget:
        return status_rows(adapter, case, dtypes, Status.SKIP, f"needs about {case.estimated_bytes() / 2**20:.1f} "
                           f"MiB, over the memory budget of {memory_budget / 2**20:.1f} MiB")
    inputs = case.inputs()
    goldens = Goldens(case, inputs)
    catalogue.properties.judging(case)
    rows = []
    for dtype in dtypes:
        rows.extend(_evaluate_dtype(adapter, case, dtype, inputs, goldens, catalogue, device))
    return rows


def _evaluate_dtype(adapter, case, dtype, inputs, goldens, catalogue, device) -> list[Row]:
    """One dtype of a case, along each path a user takes: the default call (``output``), the call with
    scores (``output_with_scores``, ``scores``) and the gradients. A path the adapter cannot take, or
    that raises, costs that path's rows only."""
    from mhabench.impls.validation import validate_call
    verdicts = {q: {} for q in case.quantities()}  # quantity -> its row's verdict, filled as the paths run
    recorded = {}  # what every row of the call records: the mode, the features emulated

    def rows():
        return [case_row(adapter, case, dtype, q, device, **recorded, **verdict) for q, verdict in verdicts.items()]

    def finish(quantities, status, message, started):
        duration = time.perf_counter() - started
        for q in quantities:
            if "status" not in verdicts[q]:
                verdicts[q].update(status=status, message=str(message), duration_s=duration)

    i = inputs
    started = time.perf_counter()
    # what chose the kernels here (Adapter.kernel_facts): a catalogue entry may hold under some facts only
    recorded["facts"] = adapter.row_facts()
    try:
        call = validate_call(i.spec, case.dims, *i.args(), **i.features())
        mode = adapter.preferred_mode(i.spec, case.dims, dtype=dtype, device=device, call=call)
        support = lambda **kw: Refusal.of(adapter.unsupported_reason(i.spec, case.dims, dtype=dtype, device=device,
                                                                     mode=mode, call=call, **kw))
        recorded["mode"] = mode
        reason = support()
        if reason:
            finish(verdicts, Status.UNSUPPORTED, reason, started)
            return rows()
        layer = adapter.build(i.spec, i.weights, dtype=dtype, device=device, mode=mode)
        recorded["emulated"] = ", ".join(layer.emulations(call)) or None
        recorded["opset"] = layer.call_opset(call)
    except UnsupportedError as exc:
        finish(verdicts, Status.UNSUPPORTED, exc.reason, started)
        return rows()
    except Exception as exc:  # the adapter's fault, recorded in the row
        finish(verdicts, Status.ERROR, _error_text(exc), started)
        return rows()

    def default_call():
        return {Quantity.OUTPUT: layer(*i.args(), return_scores=False, **i.features())[0]}

    def with_scores():
        out, scores = layer(*i.args(), return_scores=True, **i.features())
        return {Quantity.OUTPUT_WITH_SCORES: out, Quantity.SCORES: scores}

    def gradients():
        grads = layer.gradients(*i.args(), cotangent=i.cotangent, **i.features())
        return {GRADIENT_OF[k]: v for k, v in grads.items() if k in GRADIENT_OF}

    scores_path = [Quantity.OUTPUT_WITH_SCORES, Quantity.SCORES]
    gradient_rows = [q for q in verdicts if q.is_gradient]
    paths = [([Quantity.OUTPUT], None, default_call), (scores_path, dict(return_scores=True), with_scores),
             (gradient_rows, dict(gradients=True), gradients)]
    scores_reason, gradients_reason = support(return_scores=True), support(gradients=True) if gradient_rows else None
    at_once = _all_at_once(layer, i, not scores_reason, bool(gradient_rows) and not gradients_reason)
    actual, together = at_once if at_once is not None else ({}, None)
    if at_once is not None:  # the paths the adapter cannot take are unsupported, with their reasons
        for quantities, reason in ((scores_path, scores_reason), (gradient_rows, gradients_reason)):
            if reason:
                finish([q for q in quantities if q in verdicts], Status.UNSUPPORTED, reason, started)
    for quantities, needs, compute in paths if at_once is None else ():
        if not quantities:
            continue
        path_started = time.perf_counter()
        reason = support(**needs) if needs else None
        try:
            if reason:
                raise UnsupportedError(adapter.name, "this call", reason)
            with np.errstate(all="ignore"):
                actual.update(compute())
        except UnsupportedError as exc:
            finish(quantities, Status.UNSUPPORTED, exc.reason, path_started)
        except Exception as exc:  # the adapter's fault on this path, recorded in its rows
            finish(quantities, Status.ERROR, _error_text(exc), path_started)
        else:
            for q in quantities:
                verdicts[q]["duration_s"] = time.perf_counter() - path_started
    for q, verdict in verdicts.items():
        if "status" in verdict:
            continue
        if together is not None:
            verdict["duration_s"] = together
        if actual.get(q) is None:
            verdict.update(status=Status.ERROR, message=f"the adapter returned no {q}")
            continue
        _judge(verdict, adapter.name, case.id, q, actual[q], goldens, dtype, catalogue, recorded["facts"])
    return rows()


def _all_at_once(layer, i, scores: bool, gradients: bool) -> tuple[dict, float] | None:
    """Every supported quantity from one ``layer.evaluate`` (one compiled program where the framework
    compiles), and the seconds it took; None to fall back to one call per path (which also tells which path
    failed)."""
    started = time.perf_counter()
    try:
        with np.errstate(all="ignore"):
            found = layer.evaluate(*i.args(), cotangent=i.cotangent if gradients else None, scores=scores,
                                   **i.features())
    except Exception:
        return None
    actual = {k: v for k, v in found.items() if k != "gradients"}
    actual.update({GRADIENT_OF[k]: v for k, v in found.get("gradients", {}).items() if k in GRADIENT_OF})
    return actual, time.perf_counter() - started


# ---- invalid input ---------------------------------------------------------------------------------

def attempt_invalid(adapter, case: InvalidCase) -> BaseException | None:
    """Make the case's bad call through ``adapter``; the exception it raised, or None if it raised none."""
    call = case.call()
    try:
        spec = impls.AttentionSpec(**call.spec)
        layer = adapter.build(spec, call.weights(spec), dtype=call.dtype, device=call.device)
        with np.errstate(all="ignore"):
            layer(call.query, call.value, call.key, call.mask, call.causal, **call.features)
    except Exception as exc:
        return exc
    return None


def evaluate_invalid(adapter_name: str, case: InvalidCase, device: str = "cpu") -> list[Row]:
    """One ``raises`` row: the adapter must raise the shared validation's ValueError/TypeError, word for word."""
    adapter = impls.get_adapter(adapter_name)
    row = lambda **verdict: [case_row(adapter, case, "float32", Quantity.RAISES, **verdict)]
    ok, why = adapter.availability()
    if not ok:
        return row(status=Status.UNSUPPORTED, message=f"adapter unavailable: {why}")
    call = case.call()
    try:  # an adapter that cannot run this dtype on this device at all (a GPU-only kernel) is not judged here
        spec = impls.AttentionSpec(**call.spec)
        refused = Refusal.of(adapter.unsupported_reason(spec, call.weights(spec), dtype=call.dtype,
                                                        device=call.device))
    except Exception:  # the bad input may be in the spec, dtype or device itself: that is what is judged
        refused = None
    if refused is not None and refused.kind in (RefusalKind.DEVICE, RefusalKind.DTYPE):
        return row(status=Status.UNSUPPORTED, message=str(refused))
    started = time.perf_counter()
    expected = attempt_invalid(impls.get_adapter("numpy_oracle"), case)
    got = attempt_invalid(adapter, case)
    duration = time.perf_counter() - started
    if not isinstance(expected, (ValueError, TypeError)) or isinstance(expected, UnsupportedError):
        return row(status=Status.ERROR, duration_s=duration, message=f"harness: the shared validation did not "
                                                                      f"reject {case.invalid} (got {expected!r})")
    if got is None:
        return row(status=Status.FAIL, duration_s=duration,
                   message=f"no exception: the bad input was accepted (expected {type(expected).__name__}: {expected})")
    if type(got) is not type(expected) or str(got) != str(expected):
        return row(status=Status.FAIL, duration_s=duration, message=f"raised {type(got).__name__}: {got} -- "
                                                                     f"expected {type(expected).__name__}: {expected}")
    return row(status=Status.PASS, duration_s=duration, message=f"{type(got).__name__}: {got}")


def evaluate(adapter_name: str, case: Case | InvalidCase, dtypes, entries=None, memory_budget=None,
             device="cpu") -> list[Row]:
    """The rows of one adapter x case: a bad input gives one row, a case one per dtype x quantity."""
    if isinstance(case, InvalidCase):
        return evaluate_invalid(adapter_name, case, device)
    return evaluate_case(adapter_name, case, dtypes, entries, memory_budget, device)


# ---- inside a runner's worker process ----------------------------------------------------------------

class Evaluator:
    """What a runner's worker process evaluates cases with: the run's plugins registered and its catalogue
    loaded (with the case properties it consults), once, when the process starts. The worker keeps it
    (``impls.worker.Worker(objects=...)``) and the runner calls :meth:`evaluate`."""

    def __init__(self, setup: dict):
        import sys
        from mhabench.impls import plugins
        for path in setup.get("sys_path", []):
            if path not in sys.path:
                sys.path.append(path)
        for target in setup.get("adhoc", []):
            plugins.load_adhoc(target)
        self.catalogue = catalogue_mod.load(setup["catalogue"]) if setup.get("catalogue") else catalogue_mod.load()

    def evaluate(self, adapter_name: str, case: dict, dtypes, memory_budget=None, device="cpu") -> list[Row]:
        """``evaluate`` for a case sent as its ``to_dict``."""
        return evaluate(adapter_name, from_dict(case), dtypes, self.catalogue, memory_budget, device)
