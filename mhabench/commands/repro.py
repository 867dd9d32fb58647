"""``mhabench repro``: a standalone script (the framework and NumPy only) that shows a catalogued divergence."""
from __future__ import annotations

import sys

HELP = "write a standalone reproducer (framework + NumPy only) for a divergence entry or row, shrunk"


def register(parser):
    parser.add_argument("ids", nargs="*", metavar="ID", help="a catalogue entry id or a row id "
                        "(<adapter>-<case>-<dtype>-<quantity>); several with --out")
    parser.add_argument("--all", action="store_true", help="every catalogue entry (with --out)")
    parser.add_argument("--out", metavar="DIR", help="write one script per entry and a README.md table linking them "
                        "(default: print the one script)")
    parser.add_argument("--no-shrink", action="store_true", help="keep the smallest matrix case as it is")
    parser.add_argument("--issue", action="store_true", help="print a ready upstream issue body (Markdown, in the "
                        "sections of the framework's bug template) instead of the script")


def main(args) -> int:
    from mhabench.cli import CLIError
    from mhabench.conformance import repro
    from mhabench.conformance.catalogue import load
    from mhabench.conformance.repro.issue import issue_body
    if args.all and args.ids:
        raise CLIError("give entry ids or --all, not both")
    if not args.all and not args.ids:
        raise CLIError("name an entry id or a row id (or --all with --out)")
    if (args.all or len(args.ids) > 1) and not args.out:
        raise CLIError("several reproducers need --out DIR")
    if args.issue and args.out:
        raise CLIError("--issue prints one issue body: give one ID and no --out")
    catalogue = load()
    log = lambda text: print(text, file=sys.stderr, flush=True)
    made = []
    for identifier in ([e.id for e in catalogue] if args.all else args.ids):
        try:
            entry, candidates = repro.resolve(identifier, catalogue)
        except repro.ReproError as exc:
            raise CLIError(str(exc)) from None
        made.append(repro.build(entry, candidates, shrinking=not args.no_shrink, log=log))
    if args.out:
        directory = repro.write_directory(made, args.out)
        summary = repro.summarise(made)
        print(f"{summary['scripts']} reproducers for {summary['entries']} entries in {directory} (median "
              f"{summary['median_lines']:g} lines; median shrink {summary['median_original']:g} -> "
              f"{summary['median_shrunk']:g} input elements)")
        stale = [r.entry.id for r in made if r.stale]
        if stale:  # as a stale catalogue entry fails a conformance run
            print(f"mhabench repro: {len(stale)} stale entr{'ies' if len(stale) > 1 else 'y'} (the catalogue says "
                  f"they show here, yet their script exits 0): {', '.join(stale)} (README.md says more)",
                  file=sys.stderr)
            return 1
        missing = [r.entry.id for r in made if not r.source]
        if missing and not args.all:  # an entry asked for by name that got no script
            print(f"mhabench repro: no reproducer for {', '.join(missing)} (README.md says why)", file=sys.stderr)
            return 1
        return 0
    result = made[0]
    if not result.reproduces:
        print(f"mhabench repro: no reproducer for {result.entry.id}: {result.reason}", file=sys.stderr)
        return 1
    print(issue_body(result) if args.issue else result.source, end="")
    return 0
