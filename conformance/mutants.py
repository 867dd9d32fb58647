"""Mutation check: deliberately broken adapters, each with one classic bug, that the harness must catch.

Each mutant is the NumPy oracle with one thing wrong. Most bugs are made by
feeding the oracle what the buggy code would in effect compute with (weights
rewritten, mask inverted, shifted or misread), so the rest of the computation
is the oracle's own; the ones that live inside the attention core (softmax
axis, float16 arithmetic, a dropped tile, a leaking masked value) get a small
core of their own built from the oracle's stages. A bug can sit on one path
only: the default call, the call with scores, or the backward pass (whose
gradients are the oracle's analytic backward on what the buggy code computes
with, so a forward-only bug shows in the gradients too, and a backward-only
bug only there).

``mhabench conform --self-check`` runs every mutant over the default matrix
and prints, per mutant, how many rows failed and which: a mutant that fewer
than two hand-written cases catch means the harness has lost its teeth there.
The unmodified oracle runs alongside as the control and must fail nowhere.
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


GENERATED_AREAS = ("random", "pairs")  # cases not written by hand: a catch there does not count towards the two
MIN_CASES = 2  # hand-written cases each mutant must fail: one catching row is weak evidence


def teeth_cases():
    """Hand-written cases of the default matrix that catch the mutants (each at least two), so the test of the
    self-check can run a small matrix and still ask for two catching cases per mutant.

    float16 accumulation error grows with the number of keys summed: at 128 keys a float16 running
    sum is within the tolerance (error ratio ~3 against a fudge of 4); from about 256 keys it is not,
    so cross_T4_S512-long_keys is there for the float16 mutant.
    """
    from .cases import default_cases
    wanted = {"self_T8-heads2_kd4", "self_T8-mask_full", "self_T8-mask_per_head", "self_T8-causal",
              "cross_T8_S4-causal", "cross_T4_S8-causal", "self_T8-mask_fully_masked_row", "shared_input_T8-causal",
              "cross_T8_S4-key_distinct-mask_fully_masked_row", "self_T8-output_shape2x3", "grad-self_T8-causal",
              "mask_rank3_BTS-free3_batch3-cross_T4_S5", "mask_rank4_BFTS-free3_batch3-cross_T4_S5",
              "mask_rank5_BTTSS-axes_2_3", "mask_rank4_BHTS-cross_T4_S6", "rank4-axes_default-causal",
              "rank5-axes_2_3", "decode_T1_S8-causal", "decode_T1_S8-mask_padding-causal", "self_T8-heads1_kd1",
              "self_T8-heads1_kd4", "self_T8-dropout0.3-not_training", "cross_T8_S4-nan_masked_value",
              "cross_T8_S4-inf_masked_value", "cross_T4_S512-long_keys", "tiles-cross_T63_S65", "tiles-cross_T255_S257",
              "tiles-cross_T129_S127-causal", "self_T8-heads1", "grad-self_T8-value_dim6-output_shape5",
              "self_T8-output_shape5", "cross_T8_S4-heads3", "mask_padding_rank3_B1S-free3_batch3",
              "cross_T6_S4-output_shape3x2-mask_padding", "rank5-axes_2_3-causal", "cross_T6_S4-dropout0.5-causal"}
    return [c for c in default_cases() if c.id in wanted]


class MutantLayer(NumpyOracleLayer):
    """The oracle layer; subclasses change what it is fed (per path), or its attention core."""

    def _forward(self, call, return_scores, training, seed):
        weights, mask, causal = self.mutate(self.weights, call, "scores" if return_scores else "default")
        return oracle.forward(self.spec, weights, call.query, call.value, call.key if call.key_given else None,
                              mask, causal, return_scores, fully_masked=self.fully_masked, dtype=self.dtype)

    def _gradients(self, call, cotangent):
        from mhabench.impls import oracle_backward
        weights, mask, causal = self.mutate(self.weights, call, "backward")
        return oracle_backward.backward(self.spec, weights, call.query, call.value,
                                        call.key if call.key_given else None, mask, causal, cotangent,
                                        fully_masked=self.fully_masked, dtype=self.dtype)

    def mutate(self, weights: Weights, call, path: str):
        """(weights, mask, causal) the buggy code in effect computes with on ``path``: "default" (the
        call without scores), "scores" (the call with them) or "backward"."""
        return weights, call.mask, call.causal


def _replace(weights: Weights, **arrays) -> Weights:
    return Weights(**{**weights.as_dict(), **arrays})


class ScaleByKeyDim(MutantLayer):
    """Scores divided by key_dim instead of sqrt(key_dim): the same as queries scaled by 1/sqrt(key_dim)."""

    def mutate(self, weights, call, path):
        s = 1.0 / math.sqrt(self.spec.key_dim)
        extra = {"bq": weights.bq * s} if weights.has_bias else {}
        return _replace(weights, Wq=weights.Wq * s, **extra), call.mask, call.causal


class MaskInverted(MutantLayer):
    """True read as *masked* (PyTorch's attn_mask convention) instead of may-attend."""

    def mutate(self, weights, call, path):
        return weights, None if call.mask is None else ~call.mask, call.causal


class OutputBiasDropped(MutantLayer):
    """The output projection forgets its bias."""

    def mutate(self, weights, call, path):
        if not weights.has_bias:
            return weights, call.mask, call.causal
        return _replace(weights, bo=np.zeros_like(weights.bo)), call.mask, call.causal


class HeadsConcatenatedWrongly(MutantLayer):
    """Heads merged as ``[value_dim, H]`` (a reshape without the transpose) before the output projection.

    The output projection then reads feature ``j * H + h`` where it expects ``h * value_dim + j``,
    which is the correct code with the rows of Wo permuted that way.
    """

    def mutate(self, weights, call, path):
        H, vd = weights.Wo.shape[:2]
        rows = weights.Wo.reshape(H * vd, -1)
        Wo = rows.reshape(vd, H, -1).transpose(1, 0, 2).reshape(weights.Wo.shape)
        return _replace(weights, Wo=Wo), call.mask, call.causal


class CausalOffByOne(MutantLayer):
    """The causal mask lets query i see key i + 1 (``triu(diagonal=2)`` where 1 was meant)."""

    def mutate(self, weights, call, path):
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
        return probs, _weighted(num, probs, v, allowed)


def _weighted(num, probs, v, allowed):
    """``probs @ v`` where a masked position is never read (0 * NaN must not leak in), as the oracle reads it:
    a core mutant keeps every part of the canonical semantics but its one bug."""
    if allowed is None or np.all(np.isfinite(v)):
        return num(np.einsum("nhts,nhsv->nhtv", probs, v))
    read = np.broadcast_to(allowed, probs.shape)[..., None]
    return num(np.where(read, probs[..., None] * v[:, :, None], 0.0).sum(axis=-2))


class SoftmaxOverQueries(CoreMutantLayer):
    """Softmax normalised over the query axis instead of the key axis."""

    def core(self, num, q, k, v, allowed):
        scores = num(np.einsum("nhtk,nhsk->nhts", q, k))
        if allowed is not None:
            allowed = np.swapaxes(np.broadcast_to(allowed, scores.shape), -1, -2)
        probs = np.swapaxes(num(oracle.masked_softmax(np.swapaxes(scores, -1, -2), allowed, self.fully_masked)),
                            -1, -2)
        if allowed is not None:
            allowed = np.swapaxes(allowed, -1, -2)
        return probs, _weighted(num, probs, v, allowed)


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


# ---- bugs on one path: the default call, the call with scores, or the backward -----------------------

def _right_aligned(call) -> np.ndarray | None:
    """The user's mask read NumPy-style (aligned from the right under [batch, *non_attended, T.., S..], the
    head axis inserted after), the reading the canonical (Keras) rule replaced."""
    given = call.given_mask
    if given is None:
        return None
    nb = call.n_batch
    nohead = call.scores_shape[:nb] + call.scores_shape[nb + 1:]
    if given.ndim == len(call.scores_shape):
        return given
    padded = given.reshape((1,) * (len(nohead) - given.ndim) + given.shape)
    return np.broadcast_to(np.expand_dims(padded, nb), call.scores_shape)


class DefaultPathIgnoresMask(MutantLayer):
    """The default call (no scores asked for) drops the mask; the call with scores applies it."""

    def mutate(self, weights, call, path):
        return weights, (None if path == "default" else call.mask), call.causal


class DefaultPathUniformEmptyRows(MutantLayer):
    """The default call gives a fully masked row uniform weights (an additive finite fill); with scores, zeros."""

    def _forward(self, call, return_scores, training, seed):
        policy = "zeros" if return_scores else "uniform"
        return oracle.forward(self.spec, self.weights, call.query, call.value, call.key if call.key_given else None,
                              call.mask, call.causal, return_scores, fully_masked=policy, dtype=self.dtype)


class MaskReadFromTheRight(MutantLayer):
    """A short mask read NumPy-style, aligned from the right: [B, T, S] on [B, F, H, T, S] becomes F, not B."""

    def mutate(self, weights, call, path):
        try:
            return weights, _right_aligned(call), call.causal
        except ValueError:  # the NumPy reading does not fit: what such code would do is fail
            raise ValueError("mask does not broadcast (read from the right)") from None


class HeadAxisOfMaskIgnored(MutantLayer):
    """A per-head mask's head axis is dropped: every head gets head 0's mask."""

    def mutate(self, weights, call, path):
        if call.mask is None:
            return weights, None, call.causal
        nb = call.n_batch
        return weights, np.take(call.mask, [0], axis=nb), call.causal


class BackwardCausalBottomRight(MutantLayer):
    """The backward pass aligns the causal mask bottom-right when T != S (the forward is right)."""

    def mutate(self, weights, call, path):
        if path != "backward" or not call.causal or call.q_len == call.k_len:
            return weights, call.mask, call.causal
        t, s = call.q_len, call.k_len
        shifted = np.tril(np.ones((t, s), dtype=bool), k=s - t).reshape(
            (1,) * (call.n_batch + 1) + call.scores_shape[call.n_batch + 1:])
        return weights, shifted if call.mask is None else call.mask & shifted, False


class BackwardMaskFromHeadZero(MutantLayer):
    """The backward pass uses head 0's mask for every head (the forward is right)."""

    def mutate(self, weights, call, path):
        if path != "backward" or call.mask is None:
            return weights, call.mask, call.causal
        return weights, np.take(call.mask, [0], axis=call.n_batch), call.causal


class BackwardOutputAxesSwapped(MutantLayer):
    """With a multi-axis output_shape, the backward pass reads Wo with its output axes transposed."""

    def mutate(self, weights, call, path):
        if path != "backward" or weights.Wo.ndim != 4 or weights.Wo.shape[2] == weights.Wo.shape[3]:
            return weights, call.mask, call.causal
        H, vd, a, b = weights.Wo.shape
        Wo = weights.Wo.reshape(H, vd, a * b).reshape(H, vd, b, a).transpose(0, 1, 3, 2)
        return _replace(weights, Wo=np.ascontiguousarray(Wo)), call.mask, call.causal


class BackwardCausalOverLastAxisOnly(MutantLayer):
    """With several attended axes, the backward's causal mask is the triangle over the last attended axis
    only, repeated (the forward flattens the attended axes correctly)."""

    def mutate(self, weights, call, path):
        if path != "backward" or not call.causal or len(call.attention_axes) < 2:
            return weights, call.mask, call.causal
        q_last = call.query.shape[call.attention_axes[-1]]
        k_last = call.key.shape[call.attention_axes[-1]]
        tri = np.tril(np.ones((q_last, k_last), dtype=bool))
        n = len(call.attention_axes)
        q_att = call.scores_shape[call.n_batch + 1:call.n_batch + 1 + n]
        k_att = call.scores_shape[call.n_batch + 1 + n:]
        # position (..., qa, ..., q_last, ka, ..., k_last): allowed iff k_last <= q_last
        shape = (1,) * (call.n_batch + 1) + (1,) * (n - 1) + (q_last,) + (1,) * (n - 1) + (k_last,)
        causal = np.broadcast_to(tri.reshape(shape), (1,) * (call.n_batch + 1) + q_att + k_att)
        return weights, causal if call.mask is None else call.mask & causal, False


class DropoutWhenNotTraining(MutantLayer):
    """dropout > 0 scales the attention output by 1/(1 - rate) even when not training (an inverted-dropout
    rescale applied at inference)."""

    def mutate(self, weights, call, path):
        if self.spec.dropout <= 0:
            return weights, call.mask, call.causal
        scale = 1.0 / (1.0 - self.spec.dropout)
        extra = {"bv": weights.bv * scale} if weights.has_bias else {}
        return _replace(weights, Wv=weights.Wv * scale, **extra), call.mask, call.causal


class MaskedValueLeaks(CoreMutantLayer):
    """Weights times values summed over every key, masked ones included: a NaN/Inf in a masked value leaks
    in as 0 * NaN."""

    def core(self, num, q, k, v, allowed):
        probs = num(oracle.masked_softmax(num(np.einsum("nhtk,nhsk->nhts", q, k)), allowed, self.fully_masked))
        with np.errstate(invalid="ignore"):
            return probs, num(np.einsum("nhts,nhsv->nhtv", probs, v))


class LastPartialTileDropped(CoreMutantLayer):
    """Keys are read in tiles of 64 and a last partial tile is skipped (S = 65 loses its last key)."""

    def core(self, num, q, k, v, allowed):
        s = k.shape[2]
        keep = s if s < 64 else s - s % 64
        scores = num(np.einsum("nhtk,nhsk->nhts", q, k))
        visible = np.zeros(scores.shape, dtype=bool)
        visible[..., :keep] = True
        allowed = visible if allowed is None else np.broadcast_to(allowed, scores.shape) & visible
        probs = num(oracle.masked_softmax(scores, allowed, self.fully_masked))
        return probs, _weighted(num, probs, v, allowed)


class CausalBottomRightWhenTShorter(MutantLayer):
    """Causal aligned bottom-right whenever T < S, on every path (the decode-style alignment), where the
    canonical alignment is top-left."""

    def mutate(self, weights, call, path):
        if not call.causal or call.q_len >= call.k_len:
            return weights, call.mask, call.causal
        t, s = call.q_len, call.k_len
        shifted = np.tril(np.ones((t, s), dtype=bool), k=s - t).reshape(
            (1,) * (call.n_batch + 1) + call.scores_shape[call.n_batch + 1:])
        return weights, shifted if call.mask is None else call.mask & shifted, False


class OneHeadSkipsTheScale(MutantLayer):
    """With a single head, the 1/sqrt(key_dim) scale is skipped (a special case for H = 1 gone wrong)."""

    def mutate(self, weights, call, path):
        if self.spec.num_heads != 1:
            return weights, call.mask, call.causal
        s = math.sqrt(self.spec.key_dim)
        extra = {"bq": weights.bq * s} if weights.has_bias else {}
        return _replace(weights, Wq=weights.Wq * s, **extra), call.mask, call.causal


class MutantAdapter(NumpyOracleAdapter):
    bug = ""
    baseline = False

    def capabilities(self):
        unsupported = {"dropout": "the oracle is deterministic: dropout is not modelled"}
        if issubclass(self.layer_class, CoreMutantLayer):
            unsupported["gradients"] = "the bug lives in a core of its own, which has no backward pass"
        return Capabilities(unsupported_features=unsupported, devices=("cpu",), modes=("eager",))


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
    _mutant("mutant_default_path_ignores_mask", DefaultPathIgnoresMask),
    _mutant("mutant_default_path_uniform_empty_rows", DefaultPathUniformEmptyRows),
    _mutant("mutant_mask_read_from_the_right", MaskReadFromTheRight),
    _mutant("mutant_head_axis_of_mask_ignored", HeadAxisOfMaskIgnored),
    _mutant("mutant_backward_causal_bottom_right", BackwardCausalBottomRight),
    _mutant("mutant_backward_mask_from_head_zero", BackwardMaskFromHeadZero),
    _mutant("mutant_backward_output_axes_swapped", BackwardOutputAxesSwapped),
    _mutant("mutant_backward_causal_over_last_axis", BackwardCausalOverLastAxisOnly),
    _mutant("mutant_dropout_when_not_training", DropoutWhenNotTraining),
    _mutant("mutant_masked_value_leaks", MaskedValueLeaks),
    _mutant("mutant_last_partial_tile_dropped", LastPartialTileDropped),
    _mutant("mutant_causal_bottom_right_when_T_shorter", CausalBottomRightWhenTShorter),
    _mutant("mutant_one_head_skips_the_scale", OneHeadSkipsTheScale),
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
    from .cases import Case, default_cases
    from .runner import run_rows
    register_mutants()
    cases = [c for c in (default_cases() if cases is None else cases) if isinstance(c, Case)]
    summaries = []
    all_rows = run_rows([CONTROL, *MUTANTS], cases, dtypes, isolate=False, entries=[])
    for name in (CONTROL, *MUTANTS):
        rows = [r for r in all_rows if r.adapter == name]
        failing = [r for r in rows if r.status.failing]
        by_area: dict[str, int] = {}
        for r in failing:
            by_area[r.area.value] = by_area.get(r.area.value, 0) + 1
        examples, seen_areas = [], set()
        for r in failing:  # one per area first, so the examples show the breadth of the catch
            if r.area not in seen_areas and len(examples) < 3:
                examples.append(r.row_id), seen_areas.add(r.area)
        by_hand = sorted({r.case for r in failing if r.area not in GENERATED_AREAS})
        summaries.append({"adapter": name, "bug": MUTANTS[name].bug if name in MUTANTS else "(none: the control)",
                          "rows": len(rows), "failing": len(failing), "by_area": by_area,
                          "example_rows": examples, "cases": by_hand,
                          "caught": len(by_hand) >= MIN_CASES if name in MUTANTS else bool(failing)})
    return summaries


def print_catch_table(summaries, file=None) -> bool:
    """Print the catch table; True when every mutant is caught and the control is clean."""
    import sys
    file = file or sys.stdout
    healthy = True
    print(f"{'adapter':42} {'failing rows':>12} {'cases':>6}  areas; example failing rows", file=file)
    for s in summaries:
        control = s["adapter"] == CONTROL
        ok = s["caught"] != control
        healthy &= ok
        areas = ", ".join(f"{a} {n}" for a, n in sorted(s["by_area"].items())) or "-"
        verdict = "" if ok else ("  <- CONTROL FAILED" if control else
                                 f"  <- CAUGHT BY FEWER THAN {MIN_CASES} HAND-WRITTEN CASES")
        print(f"{s['adapter']:42} {s['failing']:>5}/{s['rows']:<6} {len(s.get('cases', [])):>6}  {areas}; "
              f"{', '.join(s['example_rows']) or '-'}{verdict}", file=file)
        print(f"{'':42} {s['bug']}", file=file)
    print(f"every mutant caught by at least {MIN_CASES} hand-written cases, control clean" if healthy
          else "THE HARNESS MISSED A BUG (see above)", file=file)
    return healthy
