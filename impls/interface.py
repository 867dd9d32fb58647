"""What an adapter from outside this package must hold to, checked before any conformance case runs,
and how text from it is made safe for a terminal."""
from __future__ import annotations

import numpy as np

from .base import Adapter


class PluginInterfaceError(TypeError):
    """A plugin's adapter imports but does not hold to the adapter interface."""


def printable(text) -> str:
    """Text from a plugin or a framework, made safe for a terminal: control characters (escape and OSC
    sequences included) shown as '?'."""
    return "".join(ch if ch.isprintable() else "?" for ch in str(text))


def as_adapter(obj, origin: str) -> Adapter:
    """An Adapter from what a plugin exposes: an Adapter subclass, an instance, or a factory."""
    if isinstance(obj, type) and issubclass(obj, Adapter):
        obj = obj()
    elif not isinstance(obj, Adapter) and callable(obj) and not isinstance(obj, type):
        obj = obj()
    if not isinstance(obj, Adapter):
        raise TypeError(f"{origin} gives {printable(repr(obj))}, expected an mhabench.impls.Adapter subclass, "
                        f"an Adapter instance or a callable returning one")
    return obj


def checked(adapter: Adapter) -> Adapter:
    """``adapter`` if it passes :func:`interface_problem`; PluginInterfaceError with the problem otherwise."""
    problem = interface_problem(adapter)
    if problem:
        raise PluginInterfaceError(f"{printable(adapter.name or type(adapter).__name__)} fails the interface "
                                   f"check: {problem}")
    return adapter


def _rounded(weights, dtype):
    from .spec import Weights
    return Weights(**{n: a.astype(dtype).astype(np.float64) for n, a in weights.as_dict().items()})


def interface_problem(adapter: Adapter) -> str | None:
    """Smoke-test an adapter's side of the interface on a tiny self-attention; None if it holds.

    Checks what a plugin most often gets wrong before any conformance case
    runs: build, call, output shape and the ``export_weights`` round-trip.
    An adapter whose framework is missing, or that declares the tiny case
    unsupported, is not checked here (the listing and the rows say why).
    Whether the numbers are right is the conformance run's business.
    """
    from .spec import AttentionSpec, Weights
    if not adapter.is_available():
        return None
    dtype = "float64" if "float64" in adapter.capabilities().dtypes else adapter.capabilities().dtypes[-1]
    spec = AttentionSpec(num_heads=2, key_dim=4)
    weights = Weights.random(spec, query_dim=8, value_dim=8, seed=0)
    x = np.random.default_rng(0).standard_normal((2, 3, 8))
    try:
        if adapter.unsupported_reason(spec, weights, dtype=dtype, call=None, return_scores=False):
            return None
    except Exception as exc:
        return f"unsupported_reason raised {type(exc).__name__}: {exc}"
    try:
        layer = adapter.build(spec, weights, dtype=dtype)
    except Exception as exc:
        return f"build raised {type(exc).__name__}: {exc}"
    try:
        out, _ = layer(x, x, return_scores=False)
    except Exception as exc:  # includes the wrong-output-shape RuntimeError of Layer.__call__
        return f"calling the layer raised {type(exc).__name__}: {exc}"
    try:
        exported = layer.export_weights()
    except Exception as exc:
        return f"export_weights raised {type(exc).__name__}: {exc}"
    if not isinstance(exported, Weights):
        return f"export_weights returned {type(exported).__name__}, expected mhabench.impls.Weights"
    if dtype == "float64" and not (exported.equals(weights) or exported.equals(_rounded(weights, np.float32))):
        # a framework that keeps float64 weights in float32 (Keras on JAX with x64 off) gives them back rounded;
        # its precision is the catalogue's business, the round trip of names, shapes and layout is checked here
        return "export_weights does not give back the weights the layer was built from"
    return None
