"""The adapter registry. Adapter modules are imported on demand; frameworks only when used."""
from __future__ import annotations

import importlib
import threading

from .base import Adapter


class BrokenAdapter(Adapter):
    """Stands in for an adapter whose own module could not be loaded: listed, never available."""

    framework = "?"

    def __init__(self, name: str, reason: str):
        super().__init__()
        self.name = name
        self._available = (False, reason)

# name -> "module:Class". Adapter modules import no framework at import time.
_BUILTIN = {
    "numpy_oracle": "impls.numpy_oracle:NumpyOracleAdapter",
    "torch_sdpa": "impls.torch_sdpa:TorchSDPAAdapter",
    "torch_mha": "impls.torch_mha:TorchMHAAdapter",
    "keras_mha": "impls.keras_mha:KerasMHAAdapter",
    "keras_mha@jax": "impls.keras_mha:KerasMHAJaxAdapter",
    "keras_mha@torch": "impls.keras_mha:KerasMHATorchAdapter",
    "jax_dpa": "impls.jax_dpa:JaxDPAAdapter",
    "flax_mha": "impls.flax_mha:FlaxMHAAdapter",
    "classic_keras": "impls.classic.keras_textbook:ClassicKerasAdapter",
    "classic_torch": "impls.classic.torch_textbook:ClassicTorchAdapter",
}
_registered: dict[str, str | Adapter] = dict(_BUILTIN)
_instances: dict[str, Adapter] = {}
_plugins_discovered = False
_discovery_lock = threading.RLock()  # the conformance runner looks adapters up from several threads


def _discover_plugins() -> None:
    """Register the entry-point plugins once, on first listing (see impls.plugins)."""
    global _plugins_discovered
    if _plugins_discovered:
        return
    with _discovery_lock:
        if _plugins_discovered:
            return
        try:
            from .plugins import register_entry_points
            register_entry_points()
        except Exception as exc:  # broken packaging metadata must not break the built-in adapters
            register_adapter("plugins", BrokenAdapter("plugins", f"plugin discovery failed "
                                                                 f"({type(exc).__name__}: {exc})"))
        _plugins_discovered = True


def register_adapter(name: str, target) -> None:
    """Register ``target`` (an Adapter instance, an Adapter subclass, "module:Class", or a
    zero-argument callable returning an Adapter, called on first use) under ``name``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"adapter name must be a non-empty str, got {name!r}")
    if isinstance(target, type) and issubclass(target, Adapter):
        target = target()
    if not isinstance(target, (str, Adapter)) and not callable(target):
        raise TypeError(f"adapter target must be an Adapter, an Adapter subclass or 'module:Class', got {target!r}")
    _registered[name] = target
    _instances.pop(name, None)


def list_adapters() -> list[str]:
    """Names of every registered adapter, installed or not."""
    _discover_plugins()
    return list(_registered)


def get_adapter(name: str) -> Adapter:
    _discover_plugins()
    if name not in _registered:
        raise ValueError(f"unknown adapter {name!r}; known adapters: {', '.join(list_adapters())}")
    if name not in _instances:
        target = _registered[name]
        if callable(target) and not isinstance(target, Adapter):  # a plugin's lazy loader
            try:
                target = target()
                if not isinstance(target, Adapter):
                    raise TypeError(f"its loader returned {target!r}, not an impls.Adapter")
            except Exception as exc:  # a broken plugin is listed with its error, never fatal
                target = BrokenAdapter(name, f"plugin adapter {name!r} failed to load "
                                             f"({type(exc).__name__}: {exc})")
        if isinstance(target, str):
            try:
                module, _, cls = target.partition(":")
                target = getattr(importlib.import_module(module), cls)()
            except Exception as exc:  # a broken adapter module must not break the listing
                target = BrokenAdapter(name, f"adapter module {target!r} failed to load "
                                             f"({type(exc).__name__}: {exc})")
        if not target.name:
            target.name = name
        _instances[name] = target
    return _instances[name]


def available_adapters() -> list[str]:
    """Names of the adapters whose framework imports here."""
    return [n for n in list_adapters() if get_adapter(n).is_available()]
