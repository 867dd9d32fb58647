"""Misbehaving adapters for the reliability tests: each is the oracle with one planted fault.

The fault fires only on a query of length 1 (case ``self_T1-len1``), so the
case after it shows that the run goes on.
"""
import ctypes
import os
import time

from mhabench.impls.numpy_oracle import NumpyOracleAdapter, NumpyOracleLayer


def _fires(call) -> bool:
    return call.q_len == 1


class _FaultyLayer(NumpyOracleLayer):
    fault = None

    def _forward(self, call, return_scores, training, seed):
        if _fires(call):
            type(self).fault()
        return super()._forward(call, return_scores, training, seed)

    def _gradients(self, call, cotangent):
        if _fires(call):
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


def _planted(name, fault, delay=0.0):
    layer = type(f"{name}Layer", (_FaultyLayer,), {"fault": staticmethod(fault)})

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
