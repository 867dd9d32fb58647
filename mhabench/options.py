"""The option syntax every entry point shares (the CLI commands, the pytest view, the benchmark sweep):
comma-separated lists checked against what exists, and plugin adapters named by the user."""
from __future__ import annotations

from .impls import interface, plugins, registry


class SelectionError(ValueError):
    """A selection a user made that cannot be run; the message is one line naming the option."""


def split_list(value, known, what: str, option: str) -> list[str] | None:
    """A comma-separated option value, checked against ``known``; None when not given.

    One syntax for every list option of every command: ``a,b,c`` (spaces around commas allowed).
    """
    if value is None:
        return None
    items = [v.strip() for v in str(value).split(",") if v.strip()]
    unknown = [v for v in items if v not in known]
    if unknown or not items:
        shown = ", ".join(interface.printable(u) for u in unknown) or repr(value)
        raise SelectionError(f"{option}: unknown {what} {shown}; expected a comma-separated list of "
                             f"{', '.join(known)}")
    return list(dict.fromkeys(items))


def load_plugins(targets, timeout: float | None = None) -> list[str]:
    """Register each ``module:Class`` adapter the user named, each checked in a worker process whose calls
    may take ``timeout`` seconds (default ``plugins.CHECK_TIMEOUT``); SelectionError (one line) if one
    cannot load."""
    names = []
    for target in targets or ():
        try:
            names.append(plugins.load_adhoc(target, timeout=timeout or plugins.CHECK_TIMEOUT))
        except (plugins.PluginLoadError, TypeError, ValueError) as exc:
            raise SelectionError(f"--adapter {interface.printable(target)}: {exc}") from None
    return names


def broken_plugins() -> list[tuple[str, str]]:
    """Entry-point plugins that failed to load: (name, reason). They are reported and left out."""
    out = []
    for name in registry.list_adapters():
        adapter = registry.get_adapter(name)
        if isinstance(adapter, registry.BrokenAdapter):
            out.append((name, adapter.availability()[1]))
    return out


def runnable_adapters(plugin_names=(), installed_only: bool = True) -> list[str]:
    """The default selection: every registered adapter (whose framework is installed, found without
    importing it), the broken ones left out, then the named plugins."""
    names = [n for n in registry.list_adapters() if not isinstance(registry.get_adapter(n), registry.BrokenAdapter)
             and (not installed_only or registry.get_adapter(n).looks_installed())]
    return names + [n for n in plugin_names if n not in names]
