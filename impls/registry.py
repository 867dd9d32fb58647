"""The adapter registry: built-in adapters found in this package, plugins registered through its API.

Built-in adapters are discovered, not listed: every module of this package (and its subpackages)
whose name does not start with ``_`` is imported, and each :class:`Adapter` subclass it defines
with a ``name`` is registered. Adapter modules import no framework at import time, so this is
cheap. Adding an adapter is adding one module. Plugins (``impls.plugins``) register through
:func:`register_adapter`; installed ones are found through their entry points on first listing.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import pkgutil
import re
import threading

from . import interface
from .base import Adapter

ENTRY_POINT_GROUP = "mhabench.adapters"
# What an adapter's name may be: it appears in row ids, file names and terminal output.
# "+" names a kernel variant ("torch_sdpa+flash"), "@" a backend ("keras_mha@jax").
NAME_PATTERN = re.compile(r"[A-Za-z0-9_.@+-]+")
NAME_RULE = "letters, digits and _ . @ + - only"


class BrokenAdapter(Adapter):
    """Stands in for an adapter that could not be loaded: listed with its reason, never available."""

    framework = "?"

    def __init__(self, name: str, reason: str):
        super().__init__()
        self.name = name
        self._available = (False, reason)


def check_name(name) -> str:
    """``name`` if it is a valid adapter name; ValueError/TypeError naming the rule otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"adapter name must be a str, got {type(name).__name__}")
    if not NAME_PATTERN.fullmatch(name):
        raise ValueError(f"adapter name {interface.printable(name)!r} is not allowed: use {NAME_RULE}")
    return name


_registered: dict[str, object] = {}   # name -> Adapter, or a zero-argument loader returning one
_instances: dict[str, Adapter] = {}
_discovered = False
_lock = threading.RLock()  # the conformance runner looks adapters up from several threads


def builtin_adapter_classes() -> list[type[Adapter]]:
    """Every adapter class defined in this package's modules, the baseline first, then by name."""
    found = []
    package = importlib.import_module(__package__)
    for info in pkgutil.walk_packages(package.__path__, prefix=__package__ + "."):
        leaf = info.name.rpartition(".")[2]
        if leaf.startswith("_"):
            continue
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, Adapter) and value.__module__ == module.__name__
                    and isinstance(value.__dict__.get("name"), str) and value.__dict__["name"]):
                found.append(value)
    return sorted(found, key=lambda cls: (not cls.baseline, cls.name))


def _discover() -> None:
    """Register the built-in adapters and the entry-point plugins, once."""
    global _discovered
    if _discovered:
        return
    with _lock:
        if _discovered:
            return
        for cls in builtin_adapter_classes():
            _registered.setdefault(cls.name, cls)
        try:
            for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                _register_entry_point(ep)
        except Exception as exc:  # broken packaging metadata must not break the built-in adapters
            _registered["plugins"] = BrokenAdapter("plugins", f"plugin discovery failed ({type(exc).__name__}: {exc})")
        _discovered = True


def _register_entry_point(ep) -> None:
    dist = getattr(getattr(ep, "dist", None), "name", None) or "unknown distribution"
    try:
        check_name(ep.name)
    except (TypeError, ValueError) as exc:
        _registered[f"invalid-plugin@{dist}"] = BrokenAdapter(f"invalid-plugin@{dist}", f"plugin {dist}: {exc}")
        return
    if ep.name in _registered:
        clash = f"{ep.name}@{dist}"
        _registered[clash] = BrokenAdapter(clash, f"plugin {dist} declares adapter {ep.name!r} = {ep.value!r}, "
                                                  f"but that name is already registered")
        return

    def load() -> Adapter:
        from .worker import in_worker
        isolate = not in_worker() and bool(ep.attr)
        if isolate:  # imported and checked in a worker process first, as an --adapter plugin is
            from .isolation import check_isolated
            check_isolated(f"{ep.module}:{ep.attr}")
        adapter = interface.as_adapter(ep.load(), f"entry point {ep.name} = {ep.value!r}")
        adapter.name = adapter.name or ep.name
        return adapter if isolate else interface.checked(adapter)
    _registered[ep.name] = load


def register_adapter(name: str, target) -> None:
    """Register ``target`` (an Adapter instance or subclass, or a zero-argument callable returning an
    Adapter, called on first use) under ``name``."""
    check_name(name)
    if isinstance(target, type) and issubclass(target, Adapter):
        target = target()
    if not isinstance(target, Adapter) and not callable(target):
        raise TypeError(f"adapter target must be an Adapter, an Adapter subclass or a callable returning one, "
                        f"got {target!r}")
    _discover()
    with _lock:
        _registered[name] = target
        _instances.pop(name, None)


def is_registered(name: str) -> bool:
    _discover()
    return name in _registered


def list_adapters() -> list[str]:
    """Names of every registered adapter, installed or not."""
    _discover()
    return list(_registered)


def get_adapter(name: str) -> Adapter:
    _discover()
    with _lock:
        if name not in _registered:
            raise ValueError(f"unknown adapter {interface.printable(name)!r}; known adapters: "
                             f"{', '.join(list_adapters())}")
        if name not in _instances:
            target = _registered[name]
            if isinstance(target, type):
                target = target()
            elif callable(target) and not isinstance(target, Adapter):  # a plugin's lazy loader
                try:
                    target = target()
                    if not isinstance(target, Adapter):
                        raise TypeError(f"its loader returned {target!r}, not an Adapter")
                except Exception as exc:  # a broken plugin is listed with its error, never fatal
                    target = BrokenAdapter(name, f"plugin adapter {name!r} failed to load "
                                                 f"({type(exc).__name__}: {exc})")
            if not target.name:
                target.name = name
            _instances[name] = target
        return _instances[name]


def available_adapters() -> list[str]:
    """Names of the adapters whose framework imports here."""
    return [n for n in list_adapters() if get_adapter(n).is_available()]


def all_distributions() -> list[tuple[str, ...]]:
    """Every distribution any registered adapter reports (alternatives kept together), in listing order."""
    seen: dict[tuple[str, ...], None] = {}
    for name in list_adapters():
        for names in get_adapter(name).distribution_names():
            seen.setdefault(names, None)
    return list(seen)


def resolve(target) -> Adapter:
    """An adapter from a registered name or a "module:Class" path (what a worker is asked to build)."""
    if target in list_adapters():
        return get_adapter(target)
    module, _, cls = str(target).partition(":")
    if not cls:
        raise ValueError(f"adapter target must be a registered name or 'module:Class', got {target!r}")
    return getattr(importlib.import_module(module), cls)()
