"""Mutation check: deliberately broken adapters, each with one classic bug, that the harness must catch.

Each mutant is the NumPy oracle with one thing wrong. Most bugs are made by
feeding the oracle what the buggy code would in effect compute with (weights
rewritten, mask inverted or shifted), so the rest of the computation is the
oracle's own; the two that live inside the attention core (softmax axis,
float16 arithmetic) get a small core of their own built from the oracle's
stages. The bugs are in the forward pass, so mutants declare gradients
unsupported rather than report the oracle's correct gradients.

``mhabench conform --self-check`` runs every mutant over the default matrix
and prints, per mutant, how many rows failed and which: a mutant no row
catches means the harness has lost its teeth. The unmodified oracle runs
alongside as the control and must fail nowhere.
"""
from __future__ import annotations

import math

import numpy as np

from mhabench.impls import oracle
from mhabench.impls.base import Capabilities
from mhabench.impls.numpy_oracle import NumpyOracleAdapter, NumpyOracleLayer
from mhabench.impls.spec import Weights

CONTROL = "numpy_oracle"
SELF_CHECK_DTYPES = ("float64", "float32", "float16")


def teeth_cases():
    """Cases the self-check adds to the default matrix, each because a mutant escapes without it.

    float16 accumulation error grows with the number of keys summed: at 128 keys a float16 running
    sum is within the tolerance (error ratio ~3 against a fudge of 4); from about 256 keys it is not.
    """
    from .cases import Case
    return [Case(id="cross_T4_S512-long_keys", area="dtypes", spec={"num_heads": 2, "key_dim": 4},
                 q_shape=(4,), k_shape=(512,), seed=2001)]


class MutantLayer(NumpyOracleLayer):
    """The oracle layer; subclasses change what it is fed, or its attention core."""

    def _forward(self, call, return_scores, training, seed):
        weights, mask, causal = self.mutate(self.weights, call)
        return oracle.forward(self.spec, weights, call.query, call.value, call.key if call.key_given else None,
                              mask, causal, return_scores, fully_masked=self.fully_masked, dtype=self.dtype)

    def mutate(self, weights: Weights, call):
        """(weights, mask, causal) the buggy code in effect computes with."""
        return weights, call.mask, call.causal


def _replace(weights: Weights, **arrays) -> Weights:
    return Weights(**{**weights.as_dict(), **arrays})


class ScaleByKeyDim(MutantLayer):
    """Scores divided by key_dim instead of sqrt(key_dim): the same as queries scaled by 1/sqrt(key_dim)."""

    def mutate(self, weights, call):
        s = 1.0 / math.sqrt(self.spec.key_dim)
        extra = {"bq": weights.bq * s} if weights.has_bias else {}
        return _replace(weights, Wq=weights.Wq * s, **extra), call.mask, call.causal


class MaskInverted(MutantLayer):
    """True read as *masked* (PyTorch's attn_mask convention) instead of may-attend."""

    def mutate(self, weights, call):
        return weights, None if call.mask is None else ~call.mask, call.causal


class OutputBiasDropped(MutantLayer):
    """The output projection forgets its bias."""

    def mutate(self, weights, call):
        if not weights.has_bias:
            return weights, call.mask, call.causal
        return _replace(weights, bo=np.zeros_like(weights.bo)), call.mask, call.causal


class HeadsConcatenatedWrongly(MutantLayer):
    """Heads merged as ``[value_dim, H]`` (a reshape without the transpose) before the output projection.

    The output projection then reads feature ``j * H + h`` where it expects ``h * value_dim + j``,
    which is the correct code with the rows of Wo permuted that way.
    """

    def mutate(self, weights, call):
        H, vd = weights.Wo.shape[:2]
        rows = weights.Wo.reshape(H * vd, -1)
        Wo = rows.reshape(vd, H, -1).transpose(1, 0, 2).reshape(weights.Wo.shape)
        return _replace(weights, Wo=Wo), call.mask, call.causal


class CausalOffByOne(MutantLayer):
    """The causal mask lets query i see key i + 1 (``triu(diagonal=2)`` where 1 was meant)."""

    def mutate(self, weights, call):
        if not call.causal:
            return weights, call.mask, False
        shifted = np.tril(np.ones((call.q_len, call.k_len), dtype=bool), k=1)
        shifted = shifted.reshape((1,) * (call.n_batch + 1) + call.scores_shape[call.n_batch + 1:])
        mask = shifted if call.mask is None else call.mask & shifted
        return weights, mask, False


# ---- bugs inside the attention core ------------------------------------------------------------------

class CoreMutantLayer(MutantLayer):
    def _forward(self, call, return_scores, training, seed):
        num = oracle.Numerics(self.dtype)
        w, _, q, k, v = oracle._projections(self.spec, self.weights, call, num)
        probs, o = self.core(num, q, k, v, call.flat_allowed())
        out = oracle.output_projection(self.spec, w, call, num, o)
        return out, probs.reshape(call.scores_shape).astype(np.float64) if return_scores else None

    def core(self, num, q, k, v, allowed):
        """(attention weights, their product with v), both ``[N, H, T, *]``."""
        probs = num(oracle.masked_softmax(num(np.einsum("nhtk,nhsk->nhts", q, k)), allowed, self.fully_masked))
        return probs, num(np.einsum("nhts,nhsv->nhtv", probs, v))


class SoftmaxOverQueries(CoreMutantLayer):
    """Softmax normalised over the query axis instead of the key axis."""

    def core(self, num, q, k, v, allowed):
        scores = num(np.einsum("nhtk,nhsk->nhts", q, k))
        if allowed is not None:
            allowed = np.swapaxes(np.broadcast_to(allowed, scores.shape), -1, -2)
        probs = np.swapaxes(num(oracle.masked_softmax(np.swapaxes(scores, -1, -2), allowed, self.fully_masked)),
                            -1, -2)
        return probs, num(np.einsum("nhts,nhsv->nhtv", probs, v))


def _running_sum16(x: np.ndarray, axis: int) -> np.ndarray:
    """A float16 sum accumulated element by element in float16, as a naive kernel loop does."""
    return np.take(np.cumsum(x.astype(np.float16), axis=axis, dtype=np.float16), -1, axis=axis)


class Float16NoUpcast(CoreMutantLayer):
    """In float16, scores, softmax and ``probs @ v`` computed and accumulated in float16.

    The reference (and every framework kernel) accumulates in float32 and rounds once.
    Other dtypes are computed correctly.
    """

    def core(self, num, q, k, v, allowed):
        if self.dtype != "float16":
            return super().core(num, q, k, v, allowed)
        h = np.float16
        scores = _running_sum16(q.astype(h)[:, :, :, None, :] * k.astype(h)[:, :, None, :, :], axis=-1)
        if allowed is not None:
            scores = np.where(allowed, scores, h(-np.inf))
        with np.errstate(all="ignore"):
            row_max = np.max(scores, axis=-1, keepdims=True)
            e = np.exp(scores - np.where(np.isneginf(row_max), h(0), row_max)).astype(h)
            probs = (e / _running_sum16(e, axis=-1)[..., None]).astype(h)
        if allowed is not None:
            probs = np.where(np.any(np.broadcast_to(allowed, probs.shape), axis=-1, keepdims=True), probs, h(0))
        o = _running_sum16(probs[..., :, :, None] * v.astype(h)[:, :, None, :, :], axis=-2)
        return probs.astype(np.float32), o.astype(np.float32)


class MutantAdapter(NumpyOracleAdapter):
    bug = ""

    def capabilities(self):
        return Capabilities(unsupported_features={
            "dropout": "the oracle is deterministic: dropout is not modelled",
            "gradients": "a mutant's bug is in the forward pass; its gradients would be the oracle's"},
            devices=("cpu",), modes=("eager",))


def _mutant(name: str, layer: type) -> type:
    doc = (layer.__doc__ or "").strip().splitlines()[0]
    return type(f"{layer.__name__}Adapter", (MutantAdapter,), {
        "name": name, "layer_class": layer, "bug": doc, "description": f"mutant: {doc}", "__module__": __name__})


MUTANTS = {m.name: m for m in (
    _mutant("mutant_scale_by_key_dim", ScaleByKeyDim),
    _mutant("mutant_mask_inverted", MaskInverted),
    _mutant("mutant_softmax_over_queries", SoftmaxOverQueries),
    _mutant("mutant_output_bias_dropped", OutputBiasDropped),
    _mutant("mutant_heads_concat_order", HeadsConcatenatedWrongly),
    _mutant("mutant_causal_off_by_one", CausalOffByOne),
    _mutant("mutant_float16_no_upcast", Float16NoUpcast),
)}


# ---- the self-check ----------------------------------------------------------------------------------

def register_mutants() -> list[str]:
    """Register every mutant adapter in this process (they are never listed otherwise)."""
    from mhabench import impls
    for name, cls in MUTANTS.items():
        impls.register_adapter(name, cls)
    return list(MUTANTS)


def self_check(cases=None, dtypes=SELF_CHECK_DTYPES) -> list[dict]:
    """Run the control and every mutant through the harness (``run_rows``); one summary per adapter.

    Each summary: ``adapter``, ``bug``, ``rows`` (evaluated), ``failing`` (count), ``example_rows``
    (up to three failing row ids, from different areas where possible), ``by_area`` and ``caught``
    (for the control: whether it wrongly failed anywhere). Runs in this process (``isolate=False``):
    the mutants are NumPy, nothing to isolate, and they are registered here only.
    """
    from .cases import default_cases
    from .runner import run_rows
    register_mutants()
    if cases is None:
        cases = default_cases()
        known = {c.id for c in cases}
        cases += [c for c in teeth_cases() if c.id not in known]
    cases = [c for c in cases if c.area not in ("invalid", "gradients")]
    summaries = []
    all_rows = run_rows([CONTROL, *MUTANTS], cases, dtypes, isolate=False, entries=[])
    for name in (CONTROL, *MUTANTS):
        rows = [r for r in all_rows if r["adapter"] == name]
        failing = [r for r in rows if r["status"] in ("fail", "error")]
        by_area: dict[str, int] = {}
        for r in failing:
            by_area[r["area"]] = by_area.get(r["area"], 0) + 1
        examples, seen_areas = [], set()
        for r in failing:  # one per area first, so the examples show the breadth of the catch
            if r["area"] not in seen_areas and len(examples) < 3:
                examples.append(r["row_id"]), seen_areas.add(r["area"])
        summaries.append({"adapter": name, "bug": MUTANTS[name].bug if name in MUTANTS else "(none: the control)",
                          "rows": len(rows), "failing": len(failing), "by_area": by_area,
                          "example_rows": examples, "caught": bool(failing)})
    return summaries


def print_catch_table(summaries, file=None) -> bool:
    """Print the catch table; True when every mutant is caught and the control is clean."""
    import sys
    file = file or sys.stdout
    healthy = True
    print(f"{'adapter':30} {'failing':>9}  {'areas':28} example failing rows", file=file)
    for s in summaries:
        control = s["adapter"] == CONTROL
        ok = s["caught"] != control
        healthy &= ok
        areas = ", ".join(f"{a} {n}" for a, n in sorted(s["by_area"].items())) or "-"
        verdict = "" if ok else ("  <- CONTROL FAILED" if control else "  <- NOT CAUGHT")
        print(f"{s['adapter']:30} {s['failing']:>4}/{s['rows']:<4}  {areas:28} "
              f"{', '.join(s['example_rows']) or '-'}{verdict}", file=file)
        print(f"{'':30} {s['bug']}", file=file)
    print("every mutant caught, control clean" if healthy else "THE HARNESS MISSED A BUG (see above)", file=file)
    return healthy
