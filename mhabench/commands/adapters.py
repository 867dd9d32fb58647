"""``mhabench adapters``: what is registered, what is installed here, and what each cannot express."""
from __future__ import annotations

import json

HELP = "list every adapter: framework, version, installed or not and why, devices, unsupported features"


def register(parser):
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="give the reason for each unsupported feature")
    parser.add_argument("--check", action="store_true", help="import each framework to confirm it works and list "
                        "the devices it sees (slower; by default the listing reads package metadata only)")
    parser.add_argument("--adapter", action="append", default=[], metavar="MODULE:CLASS",
                        help="also load this adapter ad hoc (an importable module or path/to/file.py); repeatable")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="seconds the interface check of an --adapter plugin may take, in a process of its own "
                             "(default 120)")


def describe(name: str, check: bool = False) -> dict:
    from mhabench import impls
    adapter = impls.get_adapter(name)
    if check:
        ok, why = adapter.availability()
    elif adapter.looks_installed():
        ok, why = True, ""
    else:
        ok, why = adapter.availability() if adapter._available is not None else \
            (False, f"not installed; install with: {adapter.install_hint}")
    caps = adapter.capabilities()
    return {
        "adapter": name,
        "framework": adapter.framework,
        "family": adapter.family,
        "version": adapter.version(),
        "available": ok,
        "checked": bool(check),
        "reason": why,
        "devices": list(adapter.available_devices()) if ok and check else [],
        "declared_devices": list(caps.devices),
        "modes": list(caps.modes),
        "default_mode": adapter.default_mode,
        "dtypes": list(caps.dtypes),
        "unsupported": {**caps.unsupported_features, **{f"dtype {k}": v for k, v in caps.unsupported_dtypes.items()}},
        "description": adapter.description,
    }


def main(args) -> int:
    from mhabench import impls
    from mhabench.cli import CLIError, printable
    from mhabench.options import SelectionError, load_plugins
    if args.timeout is not None and not args.timeout > 0:
        raise CLIError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    try:
        load_plugins(args.adapter, args.timeout)
    except SelectionError as exc:
        raise CLIError(str(exc)) from None
    rows = [describe(n, args.check) for n in impls.list_adapters()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    safe = lambda text: escape(printable(text))
    console = Console()
    table = Table(title="mhabench adapters" + ("" if args.check else " (package metadata; --check imports each)"))
    table.add_column("adapter", no_wrap=True)
    table.add_column("framework", overflow="fold")
    table.add_column("installed", no_wrap=True)
    table.add_column("modes", no_wrap=True)
    table.add_column("cannot express")
    for r in rows:
        installed = "[green]yes[/]" if r["available"] else "[red]no[/]"
        table.add_row(safe(r["adapter"]), safe(r["framework"]), installed, ", ".join(r["modes"]),
                      str(len(r["unsupported"])) if r["unsupported"] else "-")
    console.print(table)
    for r in rows:  # the details, one block per adapter, so they read at any terminal width
        devices = r["devices"] if r["checked"] else r["declared_devices"]
        console.print(f"[bold]{safe(r['adapter'])}[/]: {safe(r['version'])}; devices {', '.join(devices) or '-'}; "
                      f"dtypes {', '.join(r['dtypes'])}")
        if not r["available"]:
            console.print(f"  [red]not installed[/]: {safe(r['reason'])}")
        for feature, reason in r["unsupported"].items():
            console.print(f"  cannot express {safe(feature)}" + (f": {safe(reason)}" if args.verbose else ""))
    return 0
