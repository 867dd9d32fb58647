"""The ``mhabench`` command.

Each subcommand is a module ``mhabench.commands.<name>`` with a one-line
``HELP``, ``register(parser)`` and ``main(args) -> int``. Command modules
import no framework at module level, so ``mhabench adapters`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from . import commands as _commands

# the order in --help; any other command module found is listed after these
_ORDER = ("run", "adapters", "conform", "bench", "report")


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def printable(text) -> str:
    """Text for a terminal: control characters (escape and OSC sequences included) shown as '?'."""
    from mhabench.impls.interface import printable as safe
    return safe(text)


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors on one line (the usage block is what --help is for)."""

    def error(self, message):
        self.exit(2, printable(f"{self.prog}: error: {message} (see {self.prog} --help)") + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="mhabench", description="Cross-framework conformance and "
                     "benchmarking suite for multi-head attention.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    found = [m.name for m in pkgutil.iter_modules(_commands.__path__) if not m.name.startswith("_")]
    for name in sorted(found, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n)):
        module = importlib.import_module(f"mhabench.commands.{name}")
        help_text = getattr(module, "HELP", "")
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
    for option in ("cache_dir", "results", "out"):  # an empty path is a mistake, not "the default"
        if getattr(args, option, None) == "":
            print(f"mhabench {args.command}: error: --{option.replace('_', '-')} must name a directory, got ''",
                  file=sys.stderr)
            return 2
    if getattr(args, "cache_dir", None):
        import os
        from mhabench.impls import cache
        os.environ[cache.ENV] = args.cache_dir  # read by every process the command starts
    try:
        return int(args._module.main(args) or 0)
    except CLIError as exc:
        print(printable(f"mhabench {args.command}: error: {exc}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mhabench {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
