"""This machine's float32 GEMM rate per device: the ceiling the attention GFLOP/s are read against."""
import statistics
import time

from mhabench.benchmarks import common
from mhabench.benchmarks.flops import gemm_flops
from mhabench.benchmarks.profiles import get_profile

PROFILE = get_profile()
GEMM_SIZE = {"cpu": 2048, "cuda": 8192}
REPEATS = 7


class Machine:
    param_names = ["device"]
    params = [list(PROFILE.devices)]
    timeout = PROFILE.timeout

    def setup(self, device):
        n = GEMM_SIZE[device]
        try:
            import torch
        except ImportError:
            torch = None
        if torch is None:
            if device != "cpu":
                reason = "device cuda: torch is not installed to drive it"
                common.record(["bench_machine.Machine.track_gemm_gflops"], {"device": device}, "skipped", reason)
                raise common.Skip(reason)
            import numpy as np
            a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
            self.matmul = lambda: a @ a
        else:
            if device == "cuda" and not torch.cuda.is_available():
                reason = "device cuda absent: torch sees no CUDA device"
                common.record(["bench_machine.Machine.track_gemm_gflops"], {"device": device}, "skipped", reason)
                raise common.Skip(reason)
            a = torch.randn(n, n, dtype=torch.float32, device=device)
            sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

            def matmul():
                out = a @ a
                sync()
                return out
            self.matmul = matmul
        self.n = n
        self.matmul()  # warm up (thread pool, cuBLAS handle)

    def track_gemm_gflops(self, device):
        samples = []
        for _ in range(REPEATS):
            start = time.perf_counter()
            self.matmul()
            samples.append(time.perf_counter() - start)
        return gemm_flops(self.n) / statistics.median(samples) / 1e9

    track_gemm_gflops.unit = "GFLOP/s"
