"""This machine's float32 GEMM rate: the ceiling the attention GFLOP/s are read against.

A peak is a property of the machine; what lowers a measurement is other work running at the same time.
So it is measured in windows long enough to be stable (each at least ``window`` seconds of back-to-back
2048^3 GEMMs on CPU, 8192^3 on GPU) and the best window is kept; ``mhabench bench`` measures it next
to the benchmarks it divides, before and after each chunk, into ``bench/peaks.jsonl``, and the report
keeps the best of them.

    python -m mhabench.benchmarks.peak --results results --device cpu --label "before chunk torch"
"""
from __future__ import annotations

import argparse
import time

GEMM_SIZE = {"cpu": 2048, "cuda": 8192}


def gemm_flops(n: int) -> float:
    return 2.0 * n ** 3


def _matmul(device: str):
    """A zero-argument GEMM of GEMM_SIZE on ``device`` that returns once it is computed (torch where
    installed, else NumPy on CPU); ValueError when the device cannot be driven."""
    n = GEMM_SIZE[device]
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None:
        if device != "cpu":
            raise ValueError(f"device {device}: torch is not installed to drive it")
        import numpy as np
        a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
        return lambda: a @ a
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda absent: torch sees no CUDA device")
    a = torch.randn(n, n, dtype=torch.float32, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def matmul():
        out = a @ a
        sync()
        return out
    return matmul


def windows(device: str = "cpu", window: float = 0.5, count: int = 3) -> list[float]:
    """GFLOP/s of ``count`` windows of back-to-back GEMMs, each at least ``window`` seconds long."""
    matmul = _matmul(device)
    matmul()  # warm up: thread pool, cuBLAS handle, first-touch page faults
    flops = gemm_flops(GEMM_SIZE[device])
    rates = []
    for _ in range(count):
        calls, started = 0, time.perf_counter()
        while True:
            matmul()
            calls += 1
            elapsed = time.perf_counter() - started
            if elapsed >= window:
                break
        rates.append(calls * flops / elapsed / 1e9)
    return rates


def peak(device: str = "cpu", window: float = 0.5, count: int = 3) -> float:
    """The best window: background work only ever lowers a GEMM rate."""
    return max(windows(device, window, count))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", required=True, help="results directory; appends to bench/peaks.jsonl")
    parser.add_argument("--device", default="cpu", choices=sorted(GEMM_SIZE))
    parser.add_argument("--label", default="", help="when it was measured (e.g. before a chunk)")
    parser.add_argument("--window", type=float, default=0.5, help="seconds per window (default 0.5)")
    args = parser.parse_args(argv)
    from mhabench import results
    layout = results.Layout(args.results)
    try:
        rates = windows(args.device, args.window)
    except ValueError as exc:
        print(f"gemm peak: {exc}")
        return 0
    try:
        results.append_jsonl(layout.peaks, [{"device": args.device, "gflops": max(rates), "windows": rates,
                                             "label": args.label, "time": time.time()}])
    except results.WriteFailed as exc:
        print(f"gemm peak: {exc}")
        return 2
    print(f"gemm peak {args.device}: {max(rates):.1f} GFLOP/s (windows {', '.join(f'{r:.0f}' for r in rates)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
