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

from . import catalogue as catalogue_mod
from .cases import Case, row_id
from .compare import compare, max_abs_diff

GRAD_NAME = {"query": "grad_query", "key": "grad_key", "value": "grad_value", "bias": "grad_bias", **{
    n: f"grad_{n}" for n in ("Wq", "bq", "Wk", "bk", "Wv", "bv", "Wo", "bo")}}


def _oracle_backward():
    try:
        from mhabench.impls import oracle_backward
    except ImportError:
        return None
    return oracle_backward


def base_row(adapter, case: Case, dtype: str, quantity: str) -> dict:
    return {
        "row_id": row_id(adapter.name, case.id, dtype, quantity),
        "adapter": adapter.name, "framework": adapter.framework, "framework_version": adapter.version(),
        "case": case.id, "area": case.area, "dtype": dtype, "device": "cpu", "quantity": quantity,
        "status": None, "max_abs_err": None, "max_rel_err": None, "tolerance": None, "reference_err": None,
        "error_ratio": None, "tolerance_source": None, "divergence": None, "message": "", "seed": case.seed, "spec": case.spec,
        "query_shape": list(case.query_shape), "key_shape": list(case.key_shape) if case.key_shape else None,
        "value_shape": list(case.value_shape), "mask": case.mask, "causal": case.causal,
        "window": list(case.window) if case.window is not None else None, "bias": case.bias, "lengths": case.lengths,
        "kernel": getattr(adapter, "kernel", "default"), "mode": None, "contradicts": None,
        "emulated": None, "facts": None, "duration_s": None,
    }


def status_rows(adapter, case: Case, dtypes, status: str, message: str, quantities=None) -> list[dict]:
    """Rows with one status and message for every dtype x quantity of a case (errors, skips)."""
    rows = []
    for dtype in dtypes:
        for q in quantities or case.quantities():
            row = base_row(adapter, case, dtype, q)
            row.update(status=status, message=message)
            rows.append(row)
    return rows


class Goldens:
    """The oracle's answers for one case, per (fully_masked policy, dtype, backward form), each part computed
    once, on demand: the forward (``output``, which is also what ``output_with_scores`` must be, and
    ``scores``) and the analytic backward (``grad_*``)."""

    def __init__(self, case: Case, inputs):
        self.case, self.inputs, self._cache = case, inputs, {}

    def get(self, policy: str, dtype: str, form: str = "probs") -> "_Lazy":
        """``form``: how the backward forms the softmax's gradient (``oracle_backward.backward``)."""
        return _Lazy(self, policy, dtype, form)

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
                    self._cache[key] = {GRAD_NAME[k]: np.asarray(v, dtype=np.float64) for k, v in grads.items()}
                else:
                    out, scores = impls.oracle.forward(i.spec, i.weights, *i.args(), return_scores=True,
                                                       fully_masked=policy, dtype=dtype, rounding_noise=noise,
                                                       **i.features())
                    self._cache[key] = {"output": out, "output_with_scores": out, "scores": scores}
        return self._cache[key]


class _Lazy:
    """The goldens of one (policy, dtype), indexed by quantity: the backward runs only if a gradient is asked."""

    def __init__(self, goldens: Goldens, policy: str, dtype: str, form: str = "probs"):
        self.goldens, self.policy, self.dtype, self.form = goldens, policy, dtype, form

    def __getitem__(self, quantity: str) -> np.ndarray:
        return self.goldens._part(self.policy, self.dtype, quantity.startswith("grad_"), self.form)[quantity]


def _judge(row: dict, quantity: str, actual, goldens: Goldens, dtype: str, entries) -> None:
    """Fill the row's figures and status: pass, fail, or divergence (a catalogued behaviour that shows)."""
    golden, reference = goldens.get("zeros", "float64")[quantity], goldens.get("zeros", dtype)[quantity]
    result = compare(golden, reference, actual, dtype, quantity, lambda: goldens.sensitivity(dtype, quantity))
    row.update(result.figures())
    facts = row.get("facts")
    covering = catalogue_mod.covering(entries, row["adapter"], row["case"], dtype, quantity, facts)
    reproduce = lambda entry, arr: catalogue_mod.reproduce(entry, quantity, dtype, arr, goldens, result, compare, facts)
    if result.ok:
        row.update(status="pass", message="")
        for entry in covering:  # a pass where the entry predicts a visibly different result contradicts it,
            if entry.max_error_ratio is not None or entry.check is not None:  # unless the result fits both
                continue
            predicted = reproduce(entry, golden)
            if predicted is not None and not predicted.ok and not reproduce(entry, actual).ok:
                row.update(contradicts=entry.id, message=f"passes canonically, so catalogue entry {entry.id} "
                                                         f"no longer shows here")
        return
    row.update(status="fail", message=result.message)
    for entry in covering:
        alt = reproduce(entry, actual)
        if alt is None:
            row["message"] += f" (catalogue entry {entry.id} does not apply to {quantity})"
            continue
        if alt.ok:
            row.update(alt.figures())
            row.update(status="divergence", divergence=entry.id,
                       message=f"{entry.observed} (canonical comparison: {result.message})")
            return
    if covering:
        row["message"] += " (covered by a catalogue entry, but not as it describes)"


def _error_text(exc: BaseException) -> str:
    tb = traceback.extract_tb(exc.__traceback__)
    where = f" at {tb[-1].filename.rsplit('/', 1)[-1]}:{tb[-1].lineno}" if tb else ""
    return f"{type(exc).__name__}: {exc}{where}"


def evaluate_case(adapter_name: str, case: Case, dtypes, entries=None, memory_budget: int | None = None,
                  device: str = "cpu") -> list[dict]:
    """Rows for ``adapter x case x dtypes`` (every quantity of the case), never raising for the adapter's faults."""
    adapter = impls.get_adapter(adapter_name)
    entries = catalogue_mod.load() if entries is None else entries
    ok, why = adapter.availability()
    if not ok:
        return status_rows(adapter, case, dtypes, "unsupported", f"adapter unavailable: {why}")
    if memory_budget is not None and case.estimated_bytes() > memory_budget:
        return status_rows(adapter, case, dtypes, "skip", f"needs about {case.estimated_bytes() / 2**20:.1f} MiB, "
                           f"over the memory budget of {memory_budget / 2**20:.1f} MiB")
    inputs = case.inputs()
    goldens = Goldens(case, inputs)
    rows = []
    for dtype in dtypes:
        rows.extend(_evaluate_dtype(adapter, case, dtype, inputs, goldens, entries, device))
    return rows


def _evaluate_dtype(adapter, case, dtype, inputs, goldens, entries, device) -> list[dict]:
    """One dtype of a case, along each path a user takes: the default call (``output``), the call with
    scores (``output_with_scores``, ``scores``) and the gradients. A path the adapter cannot take, or
    that raises, costs that path's rows only."""
    from mhabench.impls.validation import validate_call
    rows = {q: base_row(adapter, case, dtype, q) for q in case.quantities()}
    facts = adapter.row_facts()  # what chose the kernels here: a catalogue entry may apply under some facts only
    for r in rows.values():
        r.update(device=device, facts=facts)
    i = inputs
    started = time.perf_counter()
    try:
        call = validate_call(i.spec, case.dims, *i.args(), **i.features())
        mode = adapter.preferred_mode(i.spec, case.dims, dtype=dtype, device=device, call=call)
        support = lambda **kw: adapter.unsupported_reason(i.spec, case.dims, dtype=dtype, device=device, mode=mode,
                                                           call=call, **kw)
        for r in rows.values():
            r["mode"] = mode
        reason = support()
        if reason:
            return _finish(rows, "unsupported", reason, started)
        layer = adapter.build(i.spec, i.weights, dtype=dtype, device=device, mode=mode)
        emulated = ", ".join(layer.emulations(call)) or None
        for r in rows.values():
            r["emulated"] = emulated
    except UnsupportedError as exc:
        return _finish(rows, "unsupported", exc.reason, started)
    except Exception as exc:  # the adapter's fault, recorded in the row
        return _finish(rows, "error", _error_text(exc), started)

    def default_call():
        return {"output": layer(*i.args(), return_scores=False, **i.features())[0]}

    def with_scores():
        out, scores = layer(*i.args(), return_scores=True, **i.features())
        return {"output_with_scores": out, "scores": scores}

    def gradients():
        grads = layer.gradients(*i.args(), cotangent=i.cotangent, **i.features())
        return {GRAD_NAME[k]: v for k, v in grads.items() if k in GRAD_NAME}

    gradient_rows = [q for q in rows if q.startswith("grad_")]
    paths = [(["output"], None, default_call), (["output_with_scores", "scores"], dict(return_scores=True), with_scores),
             (gradient_rows, dict(gradients=True), gradients)]
    scores_reason, gradients_reason = support(return_scores=True), support(gradients=True) if gradient_rows else None
    at_once = _all_at_once(layer, i, not scores_reason, bool(gradient_rows) and not gradients_reason)
    actual = at_once or {}
    if at_once is not None:  # the paths the adapter cannot take are unsupported, with their reasons
        for quantities, reason in ((["output_with_scores", "scores"], scores_reason), (gradient_rows, gradients_reason)):
            if reason:
                _finish({q: rows[q] for q in quantities if q in rows}, "unsupported", reason, started)
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
            _finish({q: rows[q] for q in quantities}, "unsupported", exc.reason, path_started)
        except Exception as exc:  # the adapter's fault on this path, recorded in its rows
            _finish({q: rows[q] for q in quantities}, "error", _error_text(exc), path_started)
        else:
            for q in quantities:
                rows[q]["duration_s"] = time.perf_counter() - path_started
    for q, row in rows.items():
        if row["status"] is not None:
            continue
        if "_duration" in actual:
            row["duration_s"] = actual["_duration"]
        if actual.get(q) is None:
            row.update(status="error", message=f"the adapter returned no {q}")
            continue
        _judge(row, q, actual[q], goldens, dtype, entries)
    return list(rows.values())


def _all_at_once(layer, i, scores: bool, gradients: bool) -> dict | None:
    """Every supported quantity from one ``layer.evaluate`` (one compiled program where the framework
    compiles); None to fall back to one call per path (which also tells which path failed)."""
    started = time.perf_counter()
    try:
        with np.errstate(all="ignore"):
            found = layer.evaluate(*i.args(), cotangent=i.cotangent if gradients else None, scores=scores,
                                   **i.features())
    except Exception:
        return None
    actual = {k: v for k, v in found.items() if k != "gradients"}
    actual.update({GRAD_NAME[k]: v for k, v in found.get("gradients", {}).items() if k in GRAD_NAME})
    actual["_duration"] = time.perf_counter() - started
    return actual


def _finish(rows: dict, status: str, message: str, started: float) -> list[dict]:
    duration = time.perf_counter() - started
    for row in rows.values():
        if row["status"] is None:
            row.update(status=status, message=message, duration_s=duration)
    return list(rows.values())


# ---- invalid input ---------------------------------------------------------------------------------

def attempt_invalid(adapter, case: Case) -> BaseException | None:
    """Make the case's bad call through ``adapter``; the exception it raised, or None if it raised none."""
    from .cases import invalid_call
    call = invalid_call(case)
    try:
        spec = impls.AttentionSpec(**call["spec"])
        layer = adapter.build(spec, call["weights"](spec), dtype=call["dtype"], device=call["device"])
        with np.errstate(all="ignore"):
            layer(call["query"], call["value"], call["key"], call["mask"], call["causal"], **call["features"])
    except Exception as exc:
        return exc
    return None


def evaluate_invalid(adapter_name: str, case: Case, device: str = "cpu") -> list[dict]:
    """One ``raises`` row: the adapter must raise the shared validation's ValueError/TypeError, word for word."""
    adapter = impls.get_adapter(adapter_name)
    row = base_row(adapter, case, "float32", "raises")
    ok, why = adapter.availability()
    if not ok:
        row.update(status="unsupported", message=f"adapter unavailable: {why}")
        return [row]
    from .cases import invalid_call
    call = invalid_call(case)
    try:  # an adapter that cannot run this dtype on this device at all (a GPU-only kernel) is not judged here
        spec = impls.AttentionSpec(**call["spec"])
        refused = adapter.unsupported_reason(spec, call["weights"](spec), dtype=call["dtype"], device=call["device"])
    except Exception:  # the bad input may be in the spec, dtype or device itself: that is what is judged
        refused = None
    if refused and refused.startswith(("device ", "dtype ")):
        row.update(status="unsupported", message=refused)
        return [row]
    started = time.perf_counter()
    expected = attempt_invalid(impls.get_adapter("numpy_oracle"), case)
    got = attempt_invalid(adapter, case)
    row["duration_s"] = time.perf_counter() - started
    if not isinstance(expected, (ValueError, TypeError)) or isinstance(expected, UnsupportedError):
        row.update(status="error", message=f"harness: the shared validation did not reject {case.invalid} "
                                           f"(got {expected!r})")
    elif got is None:
        row.update(status="fail", message=f"no exception: the bad input was accepted (expected "
                                          f"{type(expected).__name__}: {expected})")
    elif type(got) is not type(expected) or str(got) != str(expected):
        row.update(status="fail", message=f"raised {type(got).__name__}: {got} -- expected "
                                          f"{type(expected).__name__}: {expected}")
    else:
        row.update(status="pass", message=f"{type(got).__name__}: {got}")
    return [row]


def evaluate(adapter_name: str, case: Case, dtypes, entries=None, memory_budget=None, device="cpu") -> list[dict]:
    """The rows of one adapter x case: invalid-input cases give one row, the others one per dtype x quantity."""
    if case.area == "invalid":
        return evaluate_invalid(adapter_name, case, device)
    return evaluate_case(adapter_name, case, dtypes, entries, memory_budget, device)


# ---- inside a runner's worker process ----------------------------------------------------------------

_child: dict = {}


def setup_child(setup: dict) -> int:
    """What every fresh worker runs first: the run's plugins registered, its catalogue loaded once."""
    import os
    import sys
    from mhabench.impls import plugins
    for path in setup.get("sys_path", []):
        if path not in sys.path:
            sys.path.append(path)
    for target in setup.get("adhoc", []):
        plugins.load_adhoc(target)
    _child["entries"] = catalogue_mod.load(setup["catalogue"]) if setup.get("catalogue") else catalogue_mod.load()
    return os.getpid()


def evaluate_in_child(adapter_name: str, case: dict, dtypes, memory_budget=None, device="cpu") -> list[dict]:
    """``evaluate`` for a case sent as a dict, with the catalogue ``setup_child`` loaded."""
    return evaluate(adapter_name, Case.from_dict(case), dtypes, _child.get("entries"), memory_budget, device)
