"""Adapters from outside this package: installed plugins and ad-hoc ``module:Class`` strings.

Installed plugins declare an entry point in the group ``mhabench.adapters``::

    [project.entry-points."mhabench.adapters"]
    my_attention = "my_package.attention:MyAdapter"

The entry point's name is the adapter's name; its value names an
:class:`~mhabench.impls.Adapter` subclass, an Adapter instance, or a callable
returning one. Entry points are listed without importing anything (the
registry finds them); the plugin module is imported the first time the
adapter is used, and one that fails to load is listed with its error.

:func:`load_adhoc` registers one adapter without packaging: ``"module:Class"``
where ``module`` is importable (``sys.path`` plus the current directory), or
``"path/to/file.py:Class"``. An adapter named this way that cannot be loaded
raises :class:`PluginLoadError` with the reason: the user asked for it by name.

Adapter names follow :data:`~mhabench.impls.registry.NAME_PATTERN`.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

from . import interface, registry
from .registry import ENTRY_POINT_GROUP  # noqa: F401  (documented here, defined where it is read)


from .isolation import CHECK_TIMEOUT, PluginLoadError, check_isolated  # noqa: F401  (part of this API)


def split_target(target) -> tuple[str, str]:
    """``"module:Class"`` -> ``("module", "Class")``; ValueError/TypeError for anything else."""
    if not isinstance(target, str):
        raise TypeError(f"adapter must be a 'module:Class' string, got {target!r}")
    module_part, sep, attr = target.rpartition(":")  # rpartition: a Windows path has a colon too
    if not sep or not module_part or not attr:
        raise ValueError(f"adapter must be given as 'module:Class' or 'path/to/file.py:Class', "
                         f"got {interface.printable(target)!r}")
    return module_part, attr


def _is_file(module_part: str) -> bool:
    return module_part.endswith(".py") or os.sep in module_part or "/" in module_part


def portable_target(target: str) -> str:
    """``target`` as another process finds it whatever its directory: a file made absolute, a module as
    it is (the process adds the caller's directory to its path)."""
    module_part, attr = split_target(target)
    return f"{os.path.abspath(module_part)}:{attr}" if _is_file(module_part) else target


def _import_target(module_part: str, attr: str):
    if _is_file(module_part):
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


def load_adhoc(target: str, *, timeout: float = CHECK_TIMEOUT, isolate: bool | None = None,
               check: bool = True) -> str:
    """Register the adapter named by ``"module:Class"`` (or ``"file.py:Class"``); return its name.

    The adapter's own ``name`` attribute names it. PluginLoadError (a ValueError, one line) when the
    target cannot be imported, gives no named Adapter, takes a name already used by another adapter, or
    fails the interface check.

    The plugin is imported and its interface checked (a build, a call, the weights' round trip) in a
    worker process first (:func:`check_isolated`, ``timeout`` seconds for the check's calls), so a
    plugin that hangs, crashes, exits or floods its output there costs one line, not this process.
    ``isolate`` False checks it here instead: in a process that is itself a worker (the default there),
    or whose parent checked the same plugin. ``check`` False loads it without any check: a process whose
    parent checked it and that must not run the framework while loading (asv's benchmark processes, where
    running it would start the framework's thread pool in asv's forkserver and every benchmark forked from
    it would hang: see ``benchmarks.profiles.load_plugins``).
    """
    split_target(target)  # a malformed target is refused before any process starts
    shown = interface.printable(target)
    if isolate is None:
        from .worker import in_worker
        isolate = not in_worker()
    if check and isolate and portable_target(target) not in _passed:
        check_isolated(portable_target(target), timeout, shown)
    adapter = _imported(target, shown)
    name = adapter.name
    if not isinstance(name, str) or not name:
        raise PluginLoadError(f"could not load {shown}: {type(adapter).__name__} has no name: set the class "
                              f"attribute name = '...' to the name its results should carry")
    try:
        registry.check_name(name)
    except (TypeError, ValueError) as exc:
        raise PluginLoadError(f"could not load {shown}: {exc}") from None
    if registry.is_registered(name):
        current = registry.get_adapter(name)
        if type(current) is not type(adapter):
            raise PluginLoadError(f"could not load {shown}: adapter name {name!r} is already taken by {current!r}")
        return name  # the same class loaded twice
    if check and not isolate:
        _checked(adapter, shown)
    registry.register_adapter(name, adapter)
    _passed.add(portable_target(target))
    return name


_passed: set[str] = set()  # targets this process loaded after their check: loading one again is not checked again


def _imported(target: str, shown: str):
    """The Adapter ``target`` names, imported in this process; PluginLoadError saying why not."""
    module_part, attr = split_target(target)
    try:
        return interface.as_adapter(_import_target(module_part, attr), shown)
    except SyntaxError as exc:
        raise PluginLoadError(f"could not load {shown}: SyntaxError at line {exc.lineno}: {exc.msg}") from None
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # a plugin's own error, whatever it raised at import (SystemExit included)
        raise PluginLoadError(f"could not load {shown} ({type(exc).__name__}: "
                              f"{interface.printable(exc)})") from None


def _checked(adapter, shown: str) -> None:
    try:
        interface.checked(adapter)
    except Exception as exc:
        raise PluginLoadError(f"could not load {shown}: {interface.printable(exc)}") from None


_in_worker: dict = {}  # the adapter the worker imported, for the check that follows


def _import_in_worker(target: str, shown: str) -> None:
    _in_worker["adapter"] = _imported(target, shown)


def _check_in_worker(shown: str) -> None:
    _checked(_in_worker["adapter"], shown)
