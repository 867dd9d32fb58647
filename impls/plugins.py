"""Adapters from outside this package: installed plugins and ad-hoc ``module:Class`` strings.

Installed plugins declare an entry point in the group ``mhabench.adapters``::

    [project.entry-points."mhabench.adapters"]
    my_attention = "my_package.attention:MyAdapter"

The entry point's name is the adapter's name; its value names an
:class:`impls.Adapter` subclass, an Adapter instance, or a callable returning
one. Entry points are listed without importing anything; the plugin module is
imported the first time the adapter is used.

:func:`load_adhoc` registers one adapter without packaging: ``"module:Class"``
where ``module`` is importable (``sys.path`` plus the current directory), or
``"path/to/file.py:Class"``.

A plugin that fails to import, or is not an Adapter, is never an exception
for the caller: it is registered as a :class:`~impls.registry.BrokenAdapter`
whose reason says what went wrong, so listings and runs report it and go on.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import sys

import numpy as np

from .base import Adapter

ENTRY_POINT_GROUP = "mhabench.adapters"


def as_adapter(obj, origin: str) -> Adapter:
    """An Adapter from what a plugin exposes: an Adapter subclass, an instance, or a factory."""
    if isinstance(obj, type) and issubclass(obj, Adapter):
        obj = obj()
    elif not isinstance(obj, Adapter) and callable(obj) and not isinstance(obj, type):
        obj = obj()
    if not isinstance(obj, Adapter):
        raise TypeError(f"{origin} gives {obj!r}, expected an impls.Adapter subclass, an Adapter instance "
                        f"or a callable returning one")
    return obj


class PluginInterfaceError(TypeError):
    """A plugin's adapter imports but does not hold to the adapter interface."""


def checked(adapter: Adapter) -> Adapter:
    """``adapter`` if it passes :func:`interface_problem`; PluginInterfaceError with the problem otherwise."""
    problem = interface_problem(adapter)
    if problem:
        raise PluginInterfaceError(f"{adapter.name or type(adapter).__name__} fails the interface check: {problem}")
    return adapter


def _entry_point_loader(entry_point):
    def load() -> Adapter:
        adapter = as_adapter(entry_point.load(), f"entry point {entry_point.name} = {entry_point.value!r}")
        adapter.name = adapter.name or entry_point.name
        return checked(adapter)
    return load


def register_entry_points() -> list[str]:
    """Register every adapter declared in the ``mhabench.adapters`` group (not yet imported).

    A name already taken by another adapter is registered as broken under
    ``"<name>@<distribution>"`` so the clash is visible.
    """
    from .registry import BrokenAdapter, _registered, register_adapter
    names = []
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(getattr(ep, "dist", None), "name", None) or "unknown distribution"
        if ep.name in _registered:
            clash = f"{ep.name}@{dist}"
            register_adapter(clash, BrokenAdapter(clash, f"plugin {dist} declares adapter {ep.name!r} = "
                                                         f"{ep.value!r}, but that name is already registered"))
            names.append(clash)
            continue
        register_adapter(ep.name, _entry_point_loader(ep))
        names.append(ep.name)
    return names


def split_target(target) -> tuple[str, str]:
    """``"module:Class"`` -> ``("module", "Class")``; ValueError/TypeError for anything else."""
    if not isinstance(target, str):
        raise TypeError(f"adapter must be a 'module:Class' string, got {target!r}")
    module_part, sep, attr = target.rpartition(":")  # rpartition: a Windows path has a colon too
    if not sep or not module_part or not attr:
        raise ValueError(f"adapter must be given as 'module:Class' or 'path/to/file.py:Class', got {target!r}")
    return module_part, attr


def _import_target(module_part: str, attr: str):
    if module_part.endswith(".py") or os.sep in module_part or "/" in module_part:
        path = os.path.abspath(module_part)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no such file {module_part!r}")
        mod_name = "mhabench_adhoc_" + os.path.splitext(os.path.basename(path))[0]
        spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module  # dataclasses and pickling look the module up by name
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(mod_name, None)
            raise
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())  # as `python -m` would, so a module next to the user imports
        module = importlib.import_module(module_part)
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def load_adhoc(target: str) -> str:
    """Register the adapter named by ``"module:Class"`` (or ``"file.py:Class"``); return its name.

    The adapter's own ``name`` attribute names it. If the target cannot be
    imported or does not give a named Adapter, a broken placeholder is
    registered under ``target`` itself, with the error as its reason, and
    ``target`` is returned: the caller lists or runs it like any other and
    sees why it is unavailable.
    """
    from .registry import BrokenAdapter, _registered, get_adapter, register_adapter
    module_part, attr = split_target(target)
    try:
        adapter = as_adapter(_import_target(module_part, attr), target)
        name = adapter.name
        if not isinstance(name, str) or not name:
            raise TypeError(f"{type(adapter).__name__} has no name: set the class attribute "
                            f"name = '...' to the name its results should carry")
        if name in _registered:
            current = get_adapter(name)
            if type(current) is not type(adapter):
                raise ValueError(f"adapter name {name!r} is already taken by {current!r}")
            return name  # the same class loaded twice
        checked(adapter)
    except Exception as exc:  # a plugin's own error: reported, never fatal
        register_adapter(target, BrokenAdapter(target, f"could not load {target!r} "
                                                       f"({type(exc).__name__}: {exc})"))
        return target
    register_adapter(name, adapter)
    return name


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
        return f"export_weights returned {type(exported).__name__}, expected impls.Weights"
    if dtype == "float64" and not exported.equals(weights):
        return "export_weights does not give back the weights the layer was built from"
    return None
