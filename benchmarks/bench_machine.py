"""This machine's float32 GEMM rate per device, as an asv benchmark (the same measurement as
``benchmarks.peak``, which ``mhabench bench`` also takes before and after each chunk)."""
from mhabench.benchmarks import common, peak
from mhabench.benchmarks.profiles import get_profile
from mhabench.impls.worker import die_with_parent

PROFILE = get_profile()


class Machine:
    param_names = ["device"]
    params = [list(PROFILE.devices)]
    timeout = PROFILE.timeout

    def setup(self, device):
        die_with_parent()  # a benchmark process ends with asv's forkserver
        try:
            peak._matmul(device)
        except ValueError as exc:
            common.record(["bench_machine.Machine.track_gemm_gflops"], {"device": device}, "skipped", str(exc))
            raise common.Skip(str(exc)) from None

    def track_gemm_gflops(self, device):
        return peak.peak(device)

    track_gemm_gflops.unit = "GFLOP/s"
