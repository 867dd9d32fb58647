"""``mhabench bench``: the asv benchmarks (time, per-call peak memory, GFLOP/s), run here."""
from __future__ import annotations

import os
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
    parser.add_argument("--budget", metavar="SECONDS", help="wall-clock seconds for this whole command (0: no "
                        "budget). Every adapter first gets its 4 shortest lengths of each selected benchmark; a "
                        "longer length whose cost, predicted from what the run measured so far, would break the "
                        "adapter's share of what is left is not run and recorded in bench/skips.jsonl as "
                        "'not run: budget' with the prediction. The run ends within 10%% of the budget")
    parser.add_argument("--verify", action="store_true", help="also time every point's call plainly "
                        "(perf_counter_ns around the call and the adapter's own sync, once after each of the suite's "
                        "samples, in the same process; the median), and print suite / plain per point; the report "
                        "shows the ratios")
    parser.add_argument("-v", "--verbose", action="store_true", help="all of asv's output, with the "
                        "benchmarks' stderr")
    parser.add_argument("--dry-run", action="store_true", help="print the asv commands, run nothing")
    parser.add_argument("--shard", metavar="K/N", help="run part K of N of the selected benchmarks, split evenly "
                        "by estimated cost and the same on every machine; bench/plan.json records it")
    parser.add_argument("--machine", metavar="NAME", help="the machine name asv files these results under "
                        "(default: asv's own, the host name); give every shard of one kind of machine the "
                        "same name, and conform the same --machine")
    parser.add_argument("--repair", action="store_true", help="first move aside any asv file of the results "
                        "directory that a full disk or a killed run left damaged (as <name>.damaged), and forget "
                        "the finished chunks it held, so --resume measures them again")
    parser.add_argument("--merge", nargs="+", metavar="DIR", help="run nothing: merge the benchmark results of "
                        "these results directories (shards, machines, nights) into --results, one asv tree that "
                        "asv publish shows whole (asv publish --config RESULTS/bench/asv.conf.json)")


def main(args) -> int:
    from mhabench import results
    from mhabench.benchmarks import sweep
    from mhabench.cli import CLIError, printable
    if args.quick and args.profile not in (None, "quick"):
        raise CLIError(f"--quick contradicts --profile {args.profile}")
    if args.merge:
        return merge(args)
    try:
        options = sweep.make_options("quick" if args.quick else args.profile, args.adapters, args.devices,
                                     args.results, args.bench, args.memory_budget, args.adapter, args.shard,
                                     args.machine, args.budget, args.verify)
        say = lambda line: print(printable(line), flush=True)
        if args.dry_run:
            return sweep.run(options, resume=args.resume, verbose=args.verbose, dry_run=True, say=say)
        with results.locked(options.results, " ".join(["mhabench", *sys.argv[1:]])):
            return sweep.run(options, resume=args.resume, verbose=args.verbose, say=say, fix=args.repair)
    except (sweep.SweepError, results.ResultsLocked, results.WriteFailed) as exc:
        raise CLIError(str(exc)) from None


def merge(args) -> int:
    from mhabench import results
    from mhabench.benchmarks import merge as merge_mod
    from mhabench.benchmarks import sweep
    from mhabench.cli import CLIError, printable
    for option, given in (("--shard", args.shard), ("--resume", args.resume), ("--dry-run", args.dry_run),
                          ("--bench", args.bench), ("--machine", args.machine), ("--budget", args.budget),
                          ("--verify", args.verify), ("--repair", args.repair)):
        if given:
            raise CLIError(f"--merge and {option} cannot be used together")
    missing = [d for d in args.merge if not os.path.isdir(d)]
    if missing:
        raise CLIError(f"--merge: {', '.join(missing)}: no such directory")
    layout = results.Layout(os.path.abspath(args.results))  # asv reads the config's paths from its own folder
    try:
        with results.locked(layout.root, " ".join(["mhabench", *sys.argv[1:]])):
            lines = merge_mod.merge(args.merge, layout.root)
            config = sweep.asv_config(layout)
    except (merge_mod.MergeError, results.ResultsLocked, results.WriteFailed) as exc:
        raise CLIError(str(exc)) from None
    for line in lines:
        print(printable(line))
    print(printable(f"mhabench bench: merged {len(args.merge)} directories into {layout.asv}; "
                    f"asv publish --config {config}"))
    return 0
