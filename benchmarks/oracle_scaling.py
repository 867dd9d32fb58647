"""The float64 oracle, dense against blockwise, as the sequence grows.

    python -m benchmarks.oracle_scaling [--lengths 1024 4096 16384] [--block-size 256] [--out FILE]

Self-attention with H = 8, key_dim = 64 (model width 512), B = 1. Each
measurement runs in a fresh interpreter, so one does not inherit another's
heap: it reports the call's time, the rise of peak RSS during the call and the
process's peak RSS. A case whose estimated peak exceeds the budget (default:
80% of the memory available now) is skipped with the estimate as its reason.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

NUM_HEADS, KEY_DIM, BATCH = 8, 64, 1
MODEL_DIM = NUM_HEADS * KEY_DIM
FLOAT64 = 8
BUDGET_FRACTION = 0.8


def estimate_bytes(seq_len: int, block_size: int | None) -> int:
    """Peak of one oracle call: the live [H, rows, S] float64 arrays (scores, exp, probs) plus q, k, v."""
    rows = seq_len if block_size is None else min(block_size, seq_len)
    scores = 3 * BATCH * NUM_HEADS * rows * seq_len * FLOAT64
    activations = 10 * BATCH * seq_len * MODEL_DIM * FLOAT64
    return scores + activations


def available_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def measure_one(seq_len: int, block_size: int | None) -> dict:
    """Runs in the child: one oracle call on fresh inputs."""
    import numpy as np

    from mhabench import impls
    from mhabench.benchmarks import memory
    spec = impls.AttentionSpec(num_heads=NUM_HEADS, key_dim=KEY_DIM)
    weights = impls.Weights.random(spec, query_dim=MODEL_DIM, value_dim=MODEL_DIM, seed=0)
    x = np.random.default_rng(0).standard_normal((BATCH, seq_len, MODEL_DIM))
    timing = {}

    def call():
        start = time.perf_counter()
        out, _ = impls.oracle.forward(spec, weights, x, x, return_scores=False, block_size=block_size)
        timing["seconds"] = time.perf_counter() - start
        return out

    rise = memory.peak_rise(call, "cpu")
    return {"seconds": timing["seconds"], "call_peak_bytes": rise,
            "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def run_case(seq_len: int, block_size: int | None, budget: int, timeout: float) -> dict:
    row = {"seq_len": seq_len, "mode": "dense" if block_size is None else "blockwise", "block_size": block_size,
           "num_heads": NUM_HEADS, "key_dim": KEY_DIM, "batch": BATCH,
           "estimated_peak_bytes": estimate_bytes(seq_len, block_size)}
    if row["estimated_peak_bytes"] > budget:
        return {**row, "status": "skipped",
                "reason": f"estimated peak {row['estimated_peak_bytes'] / 2 ** 30:.1f} GiB exceeds the budget "
                          f"{budget / 2 ** 30:.1f} GiB"}
    cmd = [sys.executable, "-m", "mhabench.benchmarks.oracle_scaling", "--one", str(seq_len), str(block_size or 0)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "status": "failed", "reason": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {**row, "status": "failed", "reason": (proc.stderr or "").strip()[-500:]}
    return {**row, "status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--budget-gib", type=float, default=None,
                        help=f"skip above this estimate (default: {BUDGET_FRACTION:.0%} of available memory)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    parser.add_argument("--out", default="results/bench/oracle_scaling.json")
    parser.add_argument("--one", nargs=2, type=int, help=argparse.SUPPRESS)  # child: seq_len block_size
    args = parser.parse_args(argv)
    if args.one:
        seq_len, block = args.one
        print(json.dumps(measure_one(seq_len, block or None)))
        return 0
    if args.block_size < 1 or any(n < 1 for n in args.lengths):
        parser.error("--lengths and --block-size must be positive")
    budget = int(args.budget_gib * 2 ** 30) if args.budget_gib else int(available_bytes() * BUDGET_FRACTION)
    rows = []
    print(f"{'L':>6} {'mode':>9} {'time s':>9} {'call peak MiB':>14} {'process RSS MiB':>16}  note")
    for seq_len in args.lengths:
        for block in (None, args.block_size):
            row = run_case(seq_len, block, budget, args.timeout)
            rows.append(row)
            if row["status"] == "ok":
                print(f"{seq_len:>6} {row['mode']:>9} {row['seconds']:>9.3f} {row['call_peak_bytes'] / 2 ** 20:>14.0f} "
                      f"{row['process_peak_rss_bytes'] / 2 ** 20:>16.0f}", flush=True)
            else:
                print(f"{seq_len:>6} {row['mode']:>9} {'-':>9} {'-':>14} {'-':>16}  {row['status']}: {row['reason']}",
                      flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"budget_bytes": budget, "rows": rows}, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
