"""The float64 oracle as the sequence grows, against float64 torch math attention.

    python -m mhabench.benchmarks.oracle_scaling [--lengths 1024 4096 16384] [--modes dense blockwise torch_math]
                                                 [--block-size 256] [--out FILE]

Self-attention with H = 8, key_dim = 64 (model width 512), B = 1, float64, no mask: the setting of
the two targets of issue 14:

* dense oracle at L = 4096 within 3x of float64 torch math attention (SDPA restricted to
  ``SDPBackend.MATH``, with the same canonical projections, in and out);
* blockwise oracle at L = 16384 in <= 120 s at <= 2 GiB peak (the process's peak RSS).

Each measurement runs in a fresh interpreter, so one does not inherit another's heap. It reports
the call's time, the rise of peak RSS during the call and the process's peak RSS. A case whose
estimated peak exceeds the budget (default: 80% of the memory available now) is skipped with the
estimate as its reason. Each row also has the call's CPU time (every thread of the process) and
the 1-minute load average: other work on a shared machine stretches the wall time of every mode
alike, so read the dense/torch ratio rather than absolute times, and the CPU time as the work done.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

NUM_HEADS, KEY_DIM, BATCH = 8, 64, 1
MODEL_DIM = NUM_HEADS * KEY_DIM
FLOAT64 = 8
BUDGET_FRACTION = 0.8
MODES = ("dense", "blockwise", "torch_math")
TARGETS = {"dense_over_torch_at_4096": 3.0, "blockwise_seconds_at_16384": 120.0,
           "blockwise_peak_bytes_at_16384": 2 * 2 ** 30}


def estimate_bytes(seq_len: int, mode: str, block_size: int) -> int:
    """Peak of one call: the live [H, rows, S] float64 score arrays plus the [L, width] activations."""
    rows = min(block_size, seq_len) if mode == "blockwise" else seq_len
    live_scores = {"dense": 1, "blockwise": 2, "torch_math": 3}[mode]  # the oracle's softmax runs in place
    scores = live_scores * BATCH * NUM_HEADS * rows * seq_len * FLOAT64
    activations = 12 * BATCH * seq_len * MODEL_DIM * FLOAT64
    return scores + activations


def available_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable")


def _inputs():
    import numpy as np

    from mhabench import impls
    spec = impls.AttentionSpec(num_heads=NUM_HEADS, key_dim=KEY_DIM)
    weights = impls.Weights.random(spec, query_dim=MODEL_DIM, value_dim=MODEL_DIM, seed=0)
    return spec, weights, np.random.default_rng(0).standard_normal


def _torch_math_call(weights, x):
    """The layer in float64 torch: canonical projections, SDPA restricted to the math kernel."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    w = {k: torch.from_numpy(v.copy()) for k, v in weights.as_dict().items()}  # (weights are read-only)
    xt = torch.from_numpy(x)
    H, kd = NUM_HEADS, KEY_DIM

    def project(W, b):  # [B, L, D] -> [B, H, L, k]
        y = xt @ W.reshape(W.shape[0], -1) + b.reshape(-1)
        return y.view(BATCH, -1, H, kd).transpose(1, 2)

    def call():
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            q, k, v = project(w["Wq"], w["bq"]), project(w["Wk"], w["bk"]), project(w["Wv"], w["bv"])
            o = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            out = o.transpose(1, 2).reshape(BATCH, -1, H * kd) @ w["Wo"].reshape(H * kd, -1) + w["bo"]
        return out.numpy()
    return call


def measure_one(seq_len: int, mode: str, block_size: int) -> dict:
    """Runs in the child: one call on fresh inputs."""
    from mhabench import impls
    from mhabench.impls import memory
    spec, weights, normal = _inputs()
    x = normal((BATCH, seq_len, MODEL_DIM))
    if mode == "torch_math":
        call = _torch_math_call(weights, x)
    else:
        block = block_size if mode == "blockwise" else None
        call = lambda: impls.oracle.forward(spec, weights, x, x, return_scores=False, block_size=block)[0]
    timing = {}

    def timed():
        start, cpu = time.perf_counter(), time.process_time()
        out = call()
        timing["seconds"], timing["cpu_seconds"] = time.perf_counter() - start, time.process_time() - cpu
        return out

    load_before = os.getloadavg()[0]
    rise = memory.cpu_peak_rise(timed)
    return {"seconds": timing["seconds"], "cpu_seconds": timing["cpu_seconds"], "call_peak_bytes": rise,
            "process_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "load_average": max(load_before, os.getloadavg()[0])}


def run_case(seq_len: int, mode: str, block_size: int, budget: int, timeout: float) -> dict:
    row = {"seq_len": seq_len, "mode": mode, "block_size": block_size if mode == "blockwise" else None,
           "num_heads": NUM_HEADS, "key_dim": KEY_DIM, "batch": BATCH, "dtype": "float64",
           "estimated_peak_bytes": estimate_bytes(seq_len, mode, block_size)}
    if row["estimated_peak_bytes"] > budget:
        return {**row, "status": "skipped",
                "reason": f"estimated peak {row['estimated_peak_bytes'] / 2 ** 30:.1f} GiB exceeds the budget "
                          f"{budget / 2 ** 30:.1f} GiB"}
    cmd = [sys.executable, "-m", "mhabench.benchmarks.oracle_scaling", "--one", str(seq_len), mode, str(block_size)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "status": "failed", "reason": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {**row, "status": "failed", "reason": (proc.stderr or "").strip()[-500:]}
    return {**row, "status": "ok", **json.loads(proc.stdout.strip().splitlines()[-1])}


def targets(rows: list[dict]) -> list[dict]:
    """Each target of issue 14 with the figure measured here (None where a row is missing)."""
    ok = {(r["seq_len"], r["mode"]): r for r in rows if r["status"] == "ok"}
    dense, torch_math, block = ok.get((4096, "dense")), ok.get((4096, "torch_math")), ok.get((16384, "blockwise"))
    ratio = dense["seconds"] / torch_math["seconds"] if dense and torch_math else None
    return [
        {"target": "dense oracle / torch math at L=4096", "limit": TARGETS["dense_over_torch_at_4096"],
         "measured": ratio},
        {"target": "blockwise oracle seconds at L=16384", "limit": TARGETS["blockwise_seconds_at_16384"],
         "measured": block["seconds"] if block else None},
        {"target": "blockwise oracle process peak RSS (bytes) at L=16384",
         "limit": TARGETS["blockwise_peak_bytes_at_16384"],
         "measured": block["process_peak_rss_bytes"] if block else None},
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--budget-gib", type=float, default=None,
                        help=f"skip above this estimate (default: {BUDGET_FRACTION:.0%} of available memory)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    parser.add_argument("--out", default="results/bench/oracle_scaling.json")
    parser.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # child: seq_len mode block_size
    args = parser.parse_args(argv)
    if args.one:
        seq_len, mode, block = args.one
        print(json.dumps(measure_one(int(seq_len), mode, int(block))))
        return 0
    if args.block_size < 1 or any(n < 1 for n in args.lengths):
        parser.error("--lengths and --block-size must be positive")
    budget = int(args.budget_gib * 2 ** 30) if args.budget_gib else int(available_bytes() * BUDGET_FRACTION)
    rows = []
    print(f"{'L':>6} {'mode':>10} {'time s':>9} {'cpu s':>8} {'call peak MiB':>14} {'process RSS MiB':>16} "
          f"{'load':>5}  note")
    for seq_len in args.lengths:
        for mode in args.modes:
            row = run_case(seq_len, mode, args.block_size, budget, args.timeout)
            rows.append(row)
            if row["status"] == "ok":
                print(f"{seq_len:>6} {mode:>10} {row['seconds']:>9.2f} {row['cpu_seconds']:>8.2f} "
                      f"{row['call_peak_bytes'] / 2 ** 20:>14.0f} "
                      f"{row['process_peak_rss_bytes'] / 2 ** 20:>16.0f} {row['load_average']:>5.1f}", flush=True)
            else:
                print(f"{seq_len:>6} {mode:>10} {'-':>9} {'-':>8} {'-':>14} {'-':>16} {'-':>5}  "
                      f"{row['status']}: {row['reason']}",
                      flush=True)
    checked = targets(rows)
    for t in checked:
        m = t["measured"]
        verdict = "not measured" if m is None else ("met" if m <= t["limit"] else "MISSED")
        shown = "-" if m is None else (f"{m / 2 ** 30:.2f} GiB" if "bytes" in t["target"] else f"{m:.2f}")
        limit = f"{t['limit'] / 2 ** 30:.0f} GiB" if "bytes" in t["target"] else f"{t['limit']:g}"
        print(f"target: {t['target']}: {shown} (limit {limit}) {verdict}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"budget_bytes": budget, "machine": platform.machine(), "cpus": os.cpu_count(),
                               "rows": rows, "targets": checked}, indent=2))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
