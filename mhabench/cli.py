"""The ``mhabench`` command. Each subcommand lives in ``mhabench.commands.<name>``
with ``register(subparsers)`` and ``main(args) -> int``; they are imported lazily
so ``mhabench adapters`` never pays for a framework it does not list."""
from __future__ import annotations

import argparse
import importlib
import sys

# subcommand -> one-line help
COMMANDS = {
    "adapters": "list every adapter: framework, version, availability, devices, unsupported features",
}


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mhabench", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        module = importlib.import_module(f"mhabench.commands.{name}")
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.register(p)
        p.set_defaults(_module=module)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(args._module.main(args) or 0)
    except CLIError as exc:
        print(f"mhabench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mhabench {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
