"""``mhabench adapters``: what is registered, what runs here, and what each cannot express."""
from __future__ import annotations

import json

HELP = "list every adapter: framework, version, installed or not and why, devices, unsupported features"


def register(parser):
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    parser.add_argument("-v", "--verbose", action="store_true", help="give the reason for each unsupported feature")
    parser.add_argument("--adapter", action="append", default=[], metavar="MODULE:CLASS",
                        help="also load this adapter ad hoc (an importable module or path/to/file.py); repeatable")


def describe(name: str) -> dict:
    import impls
    adapter = impls.get_adapter(name)
    ok, why = adapter.availability()
    caps = adapter.capabilities()
    return {
        "adapter": name,
        "framework": adapter.framework,
        "version": adapter.version(),
        "available": ok,
        "reason": why,
        "devices": list(adapter.available_devices()) if ok else [],
        "declared_devices": list(caps.devices),
        "modes": list(caps.modes),
        "dtypes": list(caps.dtypes),
        "unsupported": {**caps.unsupported_features, **{f"dtype {k}": v for k, v in caps.unsupported_dtypes.items()}},
        "description": adapter.description,
    }


def main(args) -> int:
    import impls
    from impls import plugins
    for target in args.adapter:
        try:
            plugins.load_adhoc(target)  # a plugin that fails to load is listed with its error
        except (TypeError, ValueError) as exc:
            from mhabench.cli import CLIError
            raise CLIError(f"--adapter: {exc}") from exc
    rows = [describe(n) for n in impls.list_adapters()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table
    from rich.markup import escape
    table = Table(title="mhabench adapters", show_lines=True)
    for col in ("adapter", "framework", "version", "installed", "devices", "dtypes", "unsupported"):
        table.add_column(col, overflow="fold")
    for r in rows:
        installed = "[green]yes[/]" if r["available"] else f"[red]no[/]: {escape(r['reason'])}"
        if args.verbose:
            unsupported = "\n".join(f"{escape(k)}: {escape(v)}" for k, v in r["unsupported"].items()) or "-"
        else:
            unsupported = ", ".join(escape(k) for k in r["unsupported"]) or "-"
        table.add_row(escape(r["adapter"]), escape(r["framework"]), escape(r["version"]), installed,
                      ", ".join(r["devices"]) or "-", ", ".join(r["dtypes"]), unsupported)
    Console().print(table)
    return 0
