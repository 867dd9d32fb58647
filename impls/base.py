"""The adapter interface every wrapped implementation follows.

An :class:`Adapter` describes an implementation (framework, version,
capabilities) and builds a :class:`Layer` from a canonical spec and weights.
Frameworks are imported inside methods, never at module import, so listing
adapters never imports a framework the user did not ask for.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ..schema import Feature, Refusal
from . import memory
from .spec import AttentionSpec, Weights
from .validation import (DTYPES, Call, check_cotangent, check_device, check_dtype, numpy_dtype, validate_call,
                         weights_dims)

# Every feature a case can use (``mhabench.schema.Feature``, name -> what it is); an adapter lists the ones it
# cannot express, each with its reason.
FEATURES: dict[str, str] = {feature.value: feature.description for feature in Feature}
# The features an adapter must opt into (Capabilities.supported_extensions): modern attention, each with its
# exact semantics in validate_call. An adapter written before they existed never silently ignores one.
EXTENSION_FEATURES: tuple[str, ...] = tuple(feature.value for feature in Feature if feature.opt_in)
# The call-level keyword arguments of validate_call, oracle.forward and Layer.__call__ beyond the classic ones.
CALL_FEATURE_ARGS: tuple[str, ...] = ("window", "bias", "query_lengths", "key_value_lengths", "query_offset", "softcap",
                                      "scale")
# How a layer runs: op by op ("eager"); traced into a graph the framework runs without an optimising compiler
# ("graph": TensorFlow's tf.function without XLA); compiled (jax.jit, XLA, torch.compile).
MODES = ("eager", "graph", "compiled")


class UnsupportedError(ValueError):
    """The adapter cannot express this feature, dtype, device or mode; ``reason`` (a :class:`Refusal`, also
    its text) says why."""

    def __init__(self, adapter: str, what: str, reason: str):
        self.adapter, self.what = adapter, what
        self.reason = reason if isinstance(reason, Refusal) else Refusal.constraint(str(reason))
        super().__init__(f"{adapter} does not support {what}: {reason}")


@contextlib.contextmanager
def kernel_refusals(adapter: str, forced: bool, kernel: str):
    """Inside, an error the framework raises because a *forced* kernel cannot take the call becomes
    UnsupportedError with the framework's message (nothing changes when ``forced`` is false: the same error
    from a kernel the framework chose itself is the adapter's error)."""
    try:
        yield
    except (ValueError, NotImplementedError, RuntimeError) as exc:
        if not forced or isinstance(exc, UnsupportedError):
            raise
        raise UnsupportedError(adapter, "this call",
                               Refusal.constraint(f"{kernel} refuses it: {type(exc).__name__}: {exc}")) from None


class AdapterUnavailable(RuntimeError):
    """The adapter's framework is not importable here."""


@dataclass(frozen=True)
class Capabilities:
    """What an adapter can do. Unsupported things map to the reason they are unsupported.

    ``supported_extensions`` lists the features of :data:`EXTENSION_FEATURES` the adapter expresses. Those
    are opt-in: one not listed is unsupported with the reason "<adapter> does not map <feature> yet"
    (``unsupported_features`` may give a real reason instead), so an adapter that predates a feature
    refuses it rather than running the call without it.
    """

    unsupported_features: Mapping[str, str] = field(default_factory=dict)
    unsupported_dtypes: Mapping[str, str] = field(default_factory=dict)
    devices: tuple[str, ...] = ("cpu",)
    modes: tuple[str, ...] = ("eager",)
    supported_extensions: frozenset = frozenset()
    devices_reason: str = ""  # why the other devices are out (a kernel that exists on one device only, say)

    def __post_init__(self):
        unknown = set(self.unsupported_features) - set(FEATURES)
        if unknown:
            raise ValueError(f"unknown feature names {sorted(unknown)}; known: {sorted(FEATURES)}")
        extensions = frozenset(self.supported_extensions)
        if not extensions <= set(EXTENSION_FEATURES):
            raise ValueError(f"supported_extensions {sorted(extensions - set(EXTENSION_FEATURES))} are not "
                             f"opt-in features; expected a subset of {list(EXTENSION_FEATURES)}")
        both = extensions & set(self.unsupported_features)
        if both:
            raise ValueError(f"features {sorted(both)} are listed both as supported_extensions and as "
                             f"unsupported_features")
        object.__setattr__(self, "supported_extensions", extensions)

    def unsupported(self, adapter: str, feature: str) -> Refusal | None:
        """Why ``adapter`` cannot run ``feature``, or None if it can."""
        if feature in self.unsupported_features:
            return Refusal.feature(feature, self.unsupported_features[feature])
        if feature in EXTENSION_FEATURES and feature not in self.supported_extensions:
            return Refusal.feature(feature, f"{adapter} does not map {feature} yet")
        return None

    @property
    def dtypes(self) -> tuple[str, ...]:
        return tuple(d for d in DTYPES if d not in self.unsupported_dtypes)


def features_used(spec: AttentionSpec, dims: tuple[int, int, int], call: Call | None = None,
                  return_scores: bool = False, training: bool = False) -> set[str]:
    """The FEATURES a spec (and, if given, a validated call) relies on.

    ``gqa`` is a spec feature (the weights' shapes depend on it), so ``build`` already refuses it; the other
    modern features are call features: ``causal_bottom_right`` only where T != S (elsewhere it is plain
    ``causal``, which a bottom-right call also uses), ``window``, ``bias``, ``lengths``; ``query_offset`` only
    where an offset is not 0 and causal or a window reads it (elsewhere the positions change nothing);
    ``softcap`` and ``scale`` whenever given."""
    q_dim, k_dim, v_dim = dims
    used = set()
    if k_dim != q_dim or v_dim != q_dim:
        used.add("key_value_dims")
    if spec.value_dim is not None and spec.value_dim != spec.key_dim:
        used.add("value_dim")
    out = spec.out_shape(q_dim)
    if out != (q_dim,):
        used.add("output_shape")
    if len(out) > 1:
        used.add("multi_output")
    if spec.num_heads * spec.key_dim != q_dim:
        used.add("head_width")
    if not spec.use_bias:
        used.add("no_bias")
    if training and spec.dropout > 0:
        used.add("dropout")
    if spec.kv_heads != spec.num_heads:
        used.add("gqa")
    if return_scores:
        used.add("scores")
    if call is not None:
        if len(call.attention_axes) > 1:
            used.add("multi_axis")
        if len(call.batch_axes) > 1:
            used.add("batch_axes")
        if call.key_given:
            used.add("separate_key")
        if call.query.shape[:-1] != call.key.shape[:-1]:
            used.add("cross_attention")
        if call.mask is not None:
            used.add("mask")
            if call.mask.shape[call.n_batch] != 1:
                used.add("per_head_mask")
        if call.causal:
            used.add("causal")
            # Bottom-right equals top-left when T == S: only a call where they differ relies on the alignment.
            if call.causal_alignment == "bottom_right" and call.q_len != call.k_len:
                used.add("causal_bottom_right")
        if call.window is not None:
            used.add("window")
        if call.bias is not None:
            used.add("bias")
        if call.query_lengths is not None or call.key_value_lengths is not None:
            used.add("lengths")
        if call.uses_query_offset:
            used.add("query_offset")
        if call.softcap is not None:
            used.add("softcap")
        if call.scale is not None:
            used.add("scale")
    return used


def emulated(call: Call, *, causal: bool = False, window: bool = False, lengths: bool = False) -> tuple[str, ...]:
    """What a layer records as emulated (``Layer.emulations``) when it builds the call's causal triangle, its window
    or its lengths into a mask because its framework has no argument for them: causal under the name of the
    diagonal it is measured from (:attr:`Call.causal_feature`: per-sequence positions, bottom-right or plain), the
    window, and with it ``query_offset`` where the window is measured from per-sequence positions."""
    names = []
    if causal and call.causal:
        names.append(call.causal_feature)
    if window and call.window is not None:
        names += ["window"] + (["query_offset"] if call.uses_query_offset else [])
    if lengths and (call.query_lengths is not None or call.key_value_lengths is not None):
        names.append("lengths")
    return tuple(dict.fromkeys(names))


def _given(**features) -> dict:
    """The call-level feature arguments that were given. Only those reach ``Layer.validate``, so a subclass
    whose ``validate`` override predates them keeps working for every call that uses none."""
    return {k: v for k, v in features.items() if v is not None}


@functools.lru_cache(maxsize=None)
def _takes_call_features(validate) -> bool:
    """Whether a ``validate`` method accepts the call-level feature keywords (named, or through **kwargs)."""
    params = inspect.signature(validate).parameters
    return any(p.kind is p.VAR_KEYWORD for p in params.values()) or all(a in params for a in CALL_FEATURE_ARGS)


def to_numpy(x, dtype: str) -> np.ndarray:
    """A float array in ``dtype`` (bfloat16 through ml_dtypes)."""
    return np.asarray(x).astype(numpy_dtype(dtype))


class Adapter:
    """One wrapped implementation, declaring everything about itself.

    Subclasses set the class attributes below and a ``layer_class`` (or override ``_build``).
    Every table of adapters in the suite (the registry, the benchmark grid and its process groups,
    FLOP and memory rules, the versions written with the results) is derived from these
    declarations, for built-in and plugin adapters alike.
    """

    name: str = ""
    framework: str = ""            # what the user sees, e.g. "PyTorch"
    # The framework family whose device sync and memory counters measure this adapter ("numpy", "torch",
    # "jax", "tensorflow", ...); adapters of one family share a benchmark process group.
    family: str = "numpy"
    requires: tuple[str, ...] = ()  # modules that must import
    # Distributions whose versions are reported; an entry may be a tuple of alternative names of one
    # framework (the first one installed is reported), e.g. ("tensorflow", "tensorflow-cpu").
    distributions: tuple = ()
    install_hint: str = ""
    description: str = ""
    layer_class: type | None = None
    default_mode: str = "eager"    # what a user of the framework runs by default (build's mode=None)
    quick_mode: str | None = None  # the mode the quick benchmark profile runs; None: the default mode
    # Why conformance runs only the reduced matrix for this adapter by default (each new shape costs it a
    # compilation or an export of seconds); None: the whole matrix. ``mhabench conform --every-case`` overrides.
    reduced_matrix: str | None = None
    baseline: bool = False         # the reference every other adapter is read against (listed first)
    # The attention kernel this adapter forces: "default" lets the framework choose (what users run); a kernel
    # variant (registered as "<adapter>+<kernel>") restricts the framework to one kernel, so a case that kernel
    # refuses is unsupported with the framework's reason instead of silently running another kernel.
    kernel: str = "default"
    opset: int | None = None  # the ONNX opset of the graphs the adapter runs (ONNX Runtime adapters); None: none
    # why the framework cannot run a call with no key at all (S = 0), or "" when it can
    empty_keys_refused: str = ""
    # Kernel facts, for the benchmark cases (no mask; causal through the framework's own flag):
    causal_skips_masked_blocks: bool = False  # does causal skip the masked half of the score work?
    score_buffers: int = 3         # [B, H, T, S] float buffers alive at the forward peak (0: never holds them)

    def __init__(self):
        self._available: tuple[bool, str] | None = None

    # ---- environment --------------------------------------------------------
    def availability(self) -> tuple[bool, str]:
        """(available, reason): reason says what is missing and what to install."""
        if self._available is None:
            for module in self.requires:
                try:
                    importlib.import_module(module)
                except Exception as exc:  # ImportError, or a broken install raising anything
                    self._available = (False, f"cannot import {module} ({type(exc).__name__}: {exc}); "
                                              f"install with: {self.install_hint}")
                    break
            else:
                self._available = (True, "")
        return self._available

    def is_available(self) -> bool:
        return self.availability()[0]

    def looks_installed(self) -> bool:
        """Whether the required modules are installed, without importing them (importing decides for sure)."""
        if self._available is not None:
            return self._available[0]
        try:  # top-level names only: finding "flax.nnx" would import flax
            return all(importlib.util.find_spec(m.partition(".")[0]) is not None for m in self.requires)
        except (ImportError, ValueError):
            return False

    def distribution_names(self) -> list[tuple[str, ...]]:
        """Each reported distribution as its tuple of alternative names."""
        return [(d,) if isinstance(d, str) else tuple(d) for d in self.distributions]

    def versions(self) -> dict[str, str]:
        """Installed version per distribution, read from package metadata (nothing is imported)."""
        out = {}
        for names in self.distribution_names():
            for name in names:
                try:
                    out[name] = importlib.metadata.version(name)
                    break
                except importlib.metadata.PackageNotFoundError:
                    continue
            else:
                out[names[0]] = "not installed"
        return out

    def version(self) -> str:
        return ", ".join(f"{k} {v}" for k, v in self.versions().items())

    def preimport(self) -> tuple[str, ...]:
        """Modules a benchmark process imports once, before it forks a process per case."""
        return tuple(self.requires)

    def worker_env(self) -> dict[str, str]:
        """Environment a process needs to run this adapter in-process (e.g. KERAS_BACKEND)."""
        return {}

    def in_process(self) -> bool:
        """Whether this process can run the adapter's layers itself (else they live in a worker)."""
        return True

    # ---- what chooses the kernels -------------------------------------------
    def switches(self) -> tuple:
        """The kernel switches (``impls.facts.Switch``) that reach this adapter's kernels: environment variables
        one machine sets to run another machine's kernels (TensorFlow's oneDNN on or off, torch's CPU
        capability)."""
        return ()

    def kernel_environment(self) -> tuple[str, ...]:
        """Environment variables that change this adapter's kernels: its switches' and any other."""
        return tuple(s.variable for s in self.switches())

    def kernel_facts(self) -> dict:
        """What the framework reports about the kernels it chose, in the process that runs this adapter's layers
        (TensorFlow's oneDNN state, torch's CPU capability, ...): flat, JSON-able, recorded on every row."""
        return {}

    def row_facts(self) -> dict:
        """:meth:`kernel_facts` and the kernel environment variables set in this process, gathered once: the
        ``facts`` of every row this process computes. A framework that cannot say gives ``facts_error``."""
        cached = getattr(self, "_row_facts", None)
        if cached is None:
            try:
                cached = dict(self.kernel_facts())
            except Exception as exc:  # never lose a row for want of a fact
                cached = {"facts_error": f"{type(exc).__name__}: {exc}"}
            cached.update({v: os.environ[v] for v in self.kernel_environment() if v in os.environ})
            self._row_facts = cached
        return dict(cached)

    def peak_memory(self, fn, device: str = "cpu") -> int:
        """Bytes by which memory peaks during one ``fn()`` call, measured the way this framework allows.

        CPU: the resident-set high-water mark. Frameworks that pool memory, and GPUs, override this
        with the framework's own peak counter."""
        if device.split(":")[0] == "cpu":
            return memory.cpu_peak_rise(fn)
        raise memory.MemoryProbeUnavailable(f"{self.name}: no peak-memory probe for device {device}")

    def memory_source(self, device: str = "cpu") -> str:
        """What :meth:`peak_memory` reads, in words (the report says which figure it charts)."""
        return "VmHWM rise" if device.split(":")[0] == "cpu" else f"{self.framework} peak counter"

    def capabilities(self) -> Capabilities:
        return Capabilities()

    def available_devices(self) -> tuple[str, ...]:
        """Devices usable in this process (a subset of ``capabilities().devices``)."""
        return ("cpu",)

    # ---- support ------------------------------------------------------------
    def extra_constraints(self, spec: AttentionSpec, dims: tuple[int, int, int],
                          call: Call | None) -> Refusal | str | None:
        """Adapter-specific limits beyond the feature table: a reason (a string, or a :class:`Refusal`) or None."""
        return None

    def unsupported_reason(self, spec: AttentionSpec, weights: Weights | tuple[int, int, int], *,
                           dtype: str = "float32", device: str = "cpu", mode: str = "eager",
                           call: Call | None = None, return_scores: bool = False,
                           training: bool = False, gradients: bool = False) -> Refusal | None:
        """Why this adapter cannot run the given configuration (a :class:`Refusal`: its kind, subject and
        reason, and the text that says it), or None if it can."""
        caps = self.capabilities()
        dtype = check_dtype(dtype)
        device = check_device(device)
        if device.split(":")[0] not in caps.devices:  # first: a kernel that is not on this device has no dtypes
            return Refusal.device(device, caps.devices_reason or f"{self.name} runs on {', '.join(caps.devices)} only")
        if dtype in caps.unsupported_dtypes:
            return Refusal.dtype(dtype, caps.unsupported_dtypes[dtype])
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode not in caps.modes:
            return Refusal.mode(mode, f"{self.name} has modes {', '.join(caps.modes)}")
        dims = weights_dims(weights) if isinstance(weights, Weights) else tuple(weights)
        used = features_used(spec, dims, call, return_scores, training)
        if gradients:
            used.add("gradients")
        for feat in sorted(used):
            why = caps.unsupported(self.name, feat)
            if why:
                return why
        if self.empty_keys_refused and call is not None and call.k_len == 0:
            return Refusal.constraint(self.empty_keys_refused, subject="a key/value length of 0")
        return Refusal.of(self.extra_constraints(spec, dims, call))

    # ---- building -----------------------------------------------------------
    def preferred_mode(self, spec: AttentionSpec, weights, *, dtype: str = "float32", device: str = "cpu",
                       call: Call | None = None) -> str:
        """``default_mode``, or the first other mode that supports this dtype and device where it does not."""
        modes = [self.default_mode] + [m for m in self.capabilities().modes if m != self.default_mode]
        for mode in modes:
            if self.unsupported_reason(spec, weights, dtype=dtype, device=device, mode=mode, call=call) is None:
                return mode
        return self.default_mode

    def build(self, spec: AttentionSpec, weights: Weights, dtype: str = "float32", device: str = "cpu",
              mode: str | None = None, **options) -> "Layer":
        """A layer for ``spec`` with ``weights``; ``mode`` None means the adapter's ``default_mode``."""
        if not isinstance(spec, AttentionSpec):
            raise TypeError(f"spec must be an AttentionSpec, got {type(spec).__name__}")
        if not isinstance(weights, Weights):
            raise TypeError(f"weights must be a Weights, got {type(weights).__name__}")
        weights.check_spec(spec)
        dtype, device = check_dtype(dtype), check_device(device)
        ok, why = self.availability()
        if not ok:
            raise AdapterUnavailable(f"{self.name} is unavailable: {why}")
        mode = self.default_mode if mode is None else mode
        reason = self.unsupported_reason(spec, weights, dtype=dtype, device=device, mode=mode)
        if reason:
            raise UnsupportedError(self.name, "this configuration", reason)
        if device.split(":")[0] not in self.available_devices():
            raise ValueError(f"device={device!r}: {self.framework} sees no such device here "
                             f"(available: {', '.join(self.available_devices())})")
        return self._build(spec, weights, dtype, device, mode, **options)

    def _build(self, spec, weights, dtype, device, mode, **options) -> "Layer":
        if self.layer_class is None:
            raise NotImplementedError(f"{type(self).__name__} must set layer_class or override _build")
        return self.layer_class(self, spec, weights, dtype, device, mode, **options)

    def __repr__(self):
        return f"<adapter {self.name} ({self.framework})>"


class Layer:
    """A built layer. Subclasses implement ``_forward`` (and, where they can, ``_gradients``)."""

    def __init__(self, adapter: Adapter, spec: AttentionSpec, weights: Weights, dtype: str, device: str,
                 mode: str = "eager", **options):
        if options:
            raise TypeError(f"{adapter.name}: unknown options {sorted(options)}")
        self.adapter, self.spec, self.dtype, self.device, self.mode = adapter, spec, dtype, device, mode
        self.dims = weights_dims(weights)
        self.has_bias = weights.has_bias

    # ---- the public boundary: NumPy in, NumPy out --------------------------
    check_memory = True  # refuse a call estimated not to fit in the memory available (set False to try anyway)

    def _validated(self, query, value, key, mask, causal, features: dict, **flags) -> Call:
        """``self.validate`` with the call-level ``features`` that were given.

        A subclass's ``validate`` override written before those features existed cannot take them; the
        shared checks then run alone, and refuse (UnsupportedError) every feature the adapter does not list
        as supported. An adapter that lists one must let its override take it: a TypeError says so."""
        features = _given(**features)
        if features and not _takes_call_features(type(self).validate):
            Layer.validate(self, query, value, key, mask, causal, **flags, **features)
            raise TypeError(f"{type(self).__name__}.validate must accept the keyword arguments "
                            f"{', '.join(CALL_FEATURE_ARGS)}: {self.adapter.name} declares {sorted(features)} "
                            f"supported")
        return self.validate(query, value, key, mask, causal, **flags, **features)

    def validate(self, query, value, key=None, mask=None, causal=False, *, return_scores=False,
                 training=False, gradients=False, window=None, bias=None, query_lengths=None,
                 key_value_lengths=None, query_offset=None, softcap=None, scale=None) -> Call:
        call = validate_call(self.spec, self.dims, query, value, key, mask, causal, window=window, bias=bias,
                             query_lengths=query_lengths, key_value_lengths=key_value_lengths,
                             query_offset=query_offset, softcap=softcap, scale=scale)
        reason = self.adapter.unsupported_reason(self.spec, self.dims, dtype=self.dtype, device=self.device,
                                                 mode=self.mode, call=call, return_scores=return_scores,
                                                 training=training, gradients=gradients)
        if reason:
            raise UnsupportedError(self.adapter.name, "this call", reason)
        if self.check_memory:
            memory.check_call_fits(call, self.spec, numpy_dtype(self.dtype).itemsize, gradients)
        return call

    def __call__(self, query, value, key=None, mask=None, causal=False, return_scores=False, *,
                 training=False, seed=None, window=None, bias=None, query_lengths=None, key_value_lengths=None,
                 query_offset=None, softcap=None, scale=None):
        """Run the layer. Returns ``(output, scores)`` as NumPy arrays in the layer's dtype; ``scores`` is
        None unless ``return_scores`` (off by default, as Keras's ``return_attention_scores``: the default
        call is the framework's, the path its users run). ``causal`` (False, True, "top_left",
        "bottom_right"), ``window``, ``bias``, the lengths, ``query_offset``, ``softcap`` and ``scale`` mean
        what :func:`impls.validation.validate_call` says."""
        call = self._validated(query, value, key, mask, causal, dict(
            window=window, bias=bias, query_lengths=query_lengths, key_value_lengths=key_value_lengths,
            query_offset=query_offset, softcap=softcap, scale=scale),
            return_scores=return_scores, training=training)
        out, scores = self._forward(call, bool(return_scores), bool(training), seed)
        out = to_numpy(out, self.dtype)
        if out.shape != call.output_shape:
            raise RuntimeError(f"{self.adapter.name} returned shape {out.shape}, expected {call.output_shape}")
        if return_scores:
            scores = to_numpy(scores, self.dtype)
            if scores.shape != call.scores_shape:
                raise RuntimeError(f"{self.adapter.name} returned scores {scores.shape}, "
                                   f"expected {call.scores_shape}")
            return out, scores
        return out, None

    def gradients(self, query, value, key=None, mask=None, causal=False, cotangent=None, *, window=None,
                  bias=None, query_lengths=None, key_value_lengths=None, query_offset=None, softcap=None,
                  scale=None) -> dict[str, np.ndarray]:
        """Gradients of ``sum(output * cotangent)`` in the canonical layout, float64.

        Keys: ``query``, ``value``, ``key`` (only when a key was given; otherwise
        ``value`` holds the total through both uses), every weight name, and ``bias`` where
        the adapter differentiates a given bias (the oracle does).
        """
        call = self._validated(query, value, key, mask, causal, dict(
            window=window, bias=bias, query_lengths=query_lengths, key_value_lengths=key_value_lengths,
            query_offset=query_offset, softcap=softcap, scale=scale), gradients=True)
        if cotangent is None:
            raise TypeError(f"cotangent must be an array of the output's shape {list(call.output_shape)}, got None")
        ct = check_cotangent(call, cotangent)
        grads = self._gradients(call, ct)
        return {k: np.asarray(v).astype(np.float64) for k, v in grads.items()}

    def evaluate(self, query, value, key=None, mask=None, causal=False, *, cotangent=None,
                 scores: bool = True, window=None, bias=None, query_lengths=None,
                 key_value_lengths=None, query_offset=None, softcap=None, scale=None) -> dict[str, np.ndarray]:
        """Everything conformance judges about one call, in one go: ``output`` (the default call),
        ``output_with_scores`` and ``scores`` (when ``scores``) and, when a ``cotangent`` is given,
        ``gradients`` (a dict as :meth:`gradients` returns). A framework that compiles can override
        this to build one program for all of them; by default, one call per path. The call-level
        features mean what :meth:`__call__` says."""
        features = _given(window=window, bias=bias, query_lengths=query_lengths, key_value_lengths=key_value_lengths,
                          query_offset=query_offset, softcap=softcap, scale=scale)
        result = {"output": self(query, value, key, mask, causal, return_scores=False, **features)[0]}
        if scores:
            result["output_with_scores"], result["scores"] = self(query, value, key, mask, causal,
                                                                  return_scores=True, **features)
        if cotangent is not None:
            result["gradients"] = self.gradients(query, value, key, mask, causal, cotangent=cotangent, **features)
        return result

    def export_weights(self) -> Weights:
        raise NotImplementedError

    def emulations(self, call: Call) -> tuple[str, ...]:
        """Features of ``call`` this layer emulates (e.g. by building a mask itself) because its framework
        offers nothing to express them; recorded on every row of the call."""
        return ()

    def call_opset(self, call: Call) -> int | None:
        """The ONNX opset of the graph this call runs (the adapter's ``opset`` unless a call needs another);
        recorded on every row of the call."""
        return self.adapter.opset

    # ---- what subclasses implement ---------------------------------------------------------
    # A layer either implements ``_forward`` on NumPy arrays (the simplest plugin), or the native
    # hooks below, from which ``_forward``, ``_gradients`` and the benchmarks' native path are all
    # derived, so the call conformance judges and the call benchmarks time are one function.
    def _forward(self, call: Call, return_scores: bool, training: bool, seed) -> tuple[Any, Any]:
        inputs = self._native(call)
        if return_scores or training:
            out, scores = self._run(inputs, return_scores, training, seed)
        else:  # the default call, as a user of the framework makes it
            out, scores = self._output(inputs), None
        return self._to_numpy(out), (None if scores is None else self._to_numpy(scores))

    def _gradients(self, call: Call, cotangent: np.ndarray) -> dict[str, Any]:
        if not self._overrides("_backward"):
            raise UnsupportedError(self.adapter.name, "gradients", "not implemented by this adapter")
        inputs = self._native(call, requires_grad=True)
        grads = {k: self._to_numpy(v) for k, v in self._backward(inputs, self._native_array(cotangent)).items()}
        return self._finish_gradients(call, grads)

    def _finish_gradients(self, call: Call, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``_backward``'s gradients (NumPy) as ``gradients`` returns them: the bias's (with respect to the bias
        as ``_native`` passed it) summed back to the shape it was given in, the rest canonically named."""
        if "bias" in grads:
            grads["bias"] = call.bias_gradient(grads["bias"])
        return self._canonical_gradients(grads)

    def _canonical_gradients(self, grads: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """``_backward``'s gradients (NumPy) under canonical names and layouts; identity by default."""
        return grads

    def _native(self, call: Call, requires_grad: bool = False):
        """The call's inputs as the framework's objects (converted once; the mask in the framework's form)."""
        return call

    def _native_array(self, x: np.ndarray):
        """One array (a cotangent) in the framework's form, dtype and device."""
        return x

    def _output(self, inputs):
        """The default call (no scores, not training) on native inputs: the path users run and benchmarks time."""
        if self._overrides("_forward"):  # a NumPy-level layer: its _forward is the default call
            return self._forward(inputs, False, False, None)[0]
        raise NotImplementedError(f"{self.adapter.name} implements neither _forward nor _output")

    def _run(self, inputs, return_scores: bool, training: bool, seed) -> tuple[Any, Any]:
        """A call with scores and/or in training mode: ``(output, scores or None)``."""
        raise UnsupportedError(self.adapter.name, "this call", "returning scores or training is not implemented")

    def _backward(self, inputs, cotangent) -> dict[str, Any]:
        """Gradients of ``sum(output * cotangent)``: query, value, key (when given), every weight (under the
        framework's names, which ``_canonical_gradients`` maps) and, where the call has a bias, ``bias``: with
        respect to the bias as ``_native`` passed it (``Call.flat_bias``'s compact form; ``_gradients`` sums it
        back to the shape the bias was given in)."""
        raise NotImplementedError

    def _to_numpy(self, x) -> np.ndarray:
        return np.asarray(x)

    def _sync(self, x):
        """Wait until ``x`` is computed on the device (the end of every timed call)."""
        return x

    def _overrides(self, method: str) -> bool:
        return getattr(type(self), method) is not getattr(Layer, method)

    # ---- the native path used by benchmarks (conversion not timed) ---------
    def native_inputs(self, query, value, key=None, mask=None, causal=False, *, requires_grad=False, window=None,
                      bias=None, query_lengths=None, key_value_lengths=None, query_offset=None, softcap=None,
                      scale=None):
        """Inputs converted once to the framework's objects on the layer's device, the call-level features
        (a decode step's ``query_offset``, GQA, ``softcap``, ``scale``) through the framework's own arguments
        as the default call passes them, so a benchmark times exactly the call conformance judges."""
        call = self._validated(query, value, key, mask, causal, dict(
            window=window, bias=bias, query_lengths=query_lengths, key_value_lengths=key_value_lengths,
            query_offset=query_offset, softcap=softcap, scale=scale), gradients=requires_grad)
        cotangent = self._native_array(np.ones(call.output_shape)) if requires_grad else None
        return {"inputs": self._native(call, requires_grad), "cotangent": cotangent}

    def native_forward(self, inputs):
        """One default call on native inputs, ending with the framework's device sync."""
        return self._sync(self._output(inputs["inputs"]))

    def native_program_bytes(self, inputs, backward: bool = False) -> int | None:
        """The bytes one native call allocates (its temporaries and its output, beyond the inputs and weights), as
        the compiler's own buffer assignment states them for the compiled program; None where no compiler
        states it (eager frameworks, runtimes without the analysis). Unlike a process's memory high-water mark,
        it does not depend on what the allocator already holds from earlier calls."""
        return None

    def native_forward_backward(self, inputs):
        """One forward and backward call (inputs from ``native_inputs(..., requires_grad=True)``), synced."""
        if not self._overrides("_backward"):
            raise NotImplementedError(f"{self.adapter.name} has no native backward path")
        grads = self._backward(inputs["inputs"], inputs["cotangent"])
        return self._sync(grads)

    def __repr__(self):
        return f"<{self.adapter.name} layer {self.spec} {self.dtype} {self.device} {self.mode}>"
