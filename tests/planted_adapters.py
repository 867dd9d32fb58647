"""Misbehaving adapters for the reliability tests: each is the oracle with one planted fault.

The fault fires only on a query of length 1 (case ``self_T1-len1``), so the
case after it shows that the run goes on. The ``Always...`` adapters misbehave
on every call, the interface check's at load time included.
"""
import ctypes
import os
import sys
import time

from mhabench.impls.numpy_oracle import NumpyOracleAdapter, NumpyOracleLayer


class _FaultyLayer(NumpyOracleLayer):
    fault = None
    every_call = False  # else only on a query of length 1

    def _fires(self, call) -> bool:
        return self.every_call or call.q_len == 1

    def _forward(self, call, return_scores, training, seed):
        if self._fires(call):
            type(self).fault()
        return super()._forward(call, return_scores, training, seed)

    def _gradients(self, call, cotangent):
        if self._fires(call):
            type(self).fault()
        return super()._gradients(call, cotangent)


def _raise():
    raise RuntimeError("planted failure inside the framework")


def _hang():
    time.sleep(3600)


def _exit():
    os._exit(3)


def _segfault():
    ctypes.string_at(0)


def _slow():
    pass


def _exit_quietly():
    os._exit(0)


def _garbage():
    """64 KB of binary and terminal escape sequences on stdout and stderr."""
    junk = bytes(range(256)) * 128 + b"\x1b[2J\x1b]0;planted\x07" * 1024
    for stream in (sys.stdout, sys.stderr):
        stream.buffer.write(junk)
        stream.flush()


def _planted(name, fault, delay=0.0, every_call=False):
    layer = type(f"{name}Layer", (_FaultyLayer,), {"fault": staticmethod(fault), "every_call": every_call})

    class Planted(NumpyOracleAdapter):
        layer_class = layer
        framework = "planted"

        def _build(self, *args, **kwargs):
            time.sleep(delay)
            return super()._build(*args, **kwargs)
    Planted.name = name
    Planted.__name__ = Planted.__qualname__ = name
    return Planted


RaisingAdapter = _planted("planted_raising", _raise)
HangingAdapter = _planted("planted_hanging", _hang)
ExitingAdapter = _planted("planted_exiting", _exit)
SegfaultingAdapter = _planted("planted_segfaulting", _segfault)
SlowAdapter = _planted("planted_slow", _slow, delay=0.05)
AlwaysHanging = _planted("planted_always_hanging", _hang, every_call=True)
AlwaysSegfaulting = _planted("planted_always_segfaulting", _segfault, every_call=True)
AlwaysExitingQuietly = _planted("planted_always_exiting", _exit_quietly, every_call=True)
AlwaysPrintingGarbage = _planted("planted_always_garbage", _garbage, every_call=True)


class _Float16SegfaultingLayer(NumpyOracleLayer):
    """Segfaults in every float16 call, as TensorFlow's 16-bit matmuls do under ONEDNN_MAX_CPU_ISA=AVX2."""

    def _forward(self, call, return_scores, training, seed):
        if self.dtype == "float16":
            _segfault()
        return super()._forward(call, return_scores, training, seed)


class Float16SegfaultingAdapter(NumpyOracleAdapter):
    name = "planted_float16_segfaulting"
    framework = "planted"
    layer_class = _Float16SegfaultingLayer


class _SequentialHalfLayer(NumpyOracleLayer):
    """In float16, the weighted sum of the values accumulated key by key in a float16 register, as a kernel
    without a wider accumulator would: each addition rounds the running sum, so the error grows with the number
    of keys. Everything else, and every other dtype, is the oracle's."""

    def _forward(self, call, return_scores, training, seed):
        if self.dtype != "float16" or return_scores:
            return super()._forward(call, return_scores, training, seed)
        import numpy as np
        w = {k: np.asarray(v, np.float32) for k, v in self.weights.as_dict().items()}
        x, kv = np.asarray(call.query, np.float32), np.asarray(call.value, np.float32)
        q = np.einsum("bte,ehk->bhtk", x, w["Wq"]) + w["bq"][None, :, None, :]
        k = np.einsum("bse,ehk->bhsk", kv, w["Wk"]) + w["bk"][None, :, None, :]
        v = np.einsum("bse,ehk->bhsk", kv, w["Wv"]) + w["bv"][None, :, None, :]
        logits = np.einsum("bhtk,bhsk->bhts", q, k) / np.float32(np.sqrt(q.shape[-1]))
        if call.causal:
            T, S = logits.shape[-2:]
            logits = np.where(np.tril(np.ones((T, S), bool)), logits, -np.inf)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        acc = np.zeros(q.shape[:3] + v.shape[-1:], np.float16)
        for s in range(v.shape[2]):
            acc = (acc + (p[..., s:s + 1] * v[:, :, s:s + 1, :]).astype(np.float16)).astype(np.float16)
        out = np.einsum("bhtk,hkd->btd", acc.astype(np.float32), w["Wo"]) + w["bo"]
        return out, None


class SequentialHalfAdapter(NumpyOracleAdapter):
    name = "planted_sequential_half"
    framework = "planted"
    layer_class = _SequentialHalfLayer
