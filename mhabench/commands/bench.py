"""``mhabench bench``: the asv benchmarks (time, per-call peak memory, GFLOP/s), run here."""
from __future__ import annotations

import sys

HELP = "run the asv benchmarks (time, per-call peak memory, GFLOP/s) here; results in <results>/asv"


def register(parser):
    parser.add_argument("--profile", default=None, help="benchmark grid: quick, default or full "
                        "(default: $MHABENCH_PROFILE or 'default')")
    parser.add_argument("--quick", action="store_true", help="shorthand for --profile quick")
    parser.add_argument("--adapters", metavar="A,B", help="comma-separated adapters (default: every one; those "
                        "not installed here are skipped with the reason)")
    parser.add_argument("--adapter", action="append", default=[], metavar="MODULE:CLASS",
                        help="also benchmark an adapter class not in the registry (repeatable)")
    parser.add_argument("--devices", metavar="D,E", help="comma-separated devices: cpu, cuda "
                        "(default: cpu, and cuda where an NVIDIA driver is loaded; one named must be present)")
    parser.add_argument("--results", default="results", help="results directory (default: ./results); "
                        "asv results go to <results>/asv, skip reasons to <results>/bench/skips.jsonl")
    parser.add_argument("--bench", metavar="REGEX", help="only benchmarks whose asv name "
                        "'bench_attention.SelfAttention.time_forward(...params)' matches")
    parser.add_argument("--resume", action="store_true", help="skip the chunks an earlier interrupted run "
                        "of the same commit, profile and machine finished")
    parser.add_argument("--cache-dir", metavar="DIR", help="where compiled programs are kept between runs "
                        "(default: $MHABENCH_CACHE_DIR or ~/.cache/mhabench; 'off' keeps nothing)")
    parser.add_argument("--memory-budget", metavar="BYTES", help="skip cases estimated above this "
                        "(e.g. 12GiB; default: half the RAM)")
    parser.add_argument("-v", "--verbose", action="store_true", help="all of asv's output, with the "
                        "benchmarks' stderr")
    parser.add_argument("--dry-run", action="store_true", help="print the asv commands, run nothing")
    parser.add_argument("--shard", metavar="K/N", help="run part K of N of the selected benchmarks, split evenly "
                        "by estimated cost and the same on every machine; bench/plan.json records it")
    parser.add_argument("--machine", metavar="NAME", help="the machine name asv files these results under "
                        "(default: asv's own, the host name); give every shard of one kind of machine the "
                        "same name, and conform the same --machine")


def main(args) -> int:
    from mhabench import results
    from mhabench.benchmarks import sweep
    from mhabench.cli import CLIError, printable
    if args.quick and args.profile not in (None, "quick"):
        raise CLIError(f"--quick contradicts --profile {args.profile}")
    try:
        options = sweep.make_options("quick" if args.quick else args.profile, args.adapters, args.devices,
                                     args.results, args.bench, args.memory_budget, args.adapter, args.shard,
                                     args.machine)
        say = lambda line: print(printable(line), flush=True)
        if args.dry_run:
            return sweep.run(options, resume=args.resume, verbose=args.verbose, dry_run=True, say=say)
        with results.locked(options.results, " ".join(["mhabench", *sys.argv[1:]])):
            return sweep.run(options, resume=args.resume, verbose=args.verbose, say=say)
    except (sweep.SweepError, results.ResultsLocked) as exc:
        raise CLIError(str(exc)) from None
