"""The per-call peak-memory probe: a known allocation is measured within 10%."""
import numpy as np
import pytest

from mhabench import impls
from mhabench.benchmarks.common import parse_bytes
from mhabench.impls import memory

ok, why = memory.cpu_probe_available()
pytestmark = pytest.mark.skipif(not ok, reason=why)

MB = 1_000_000


def allocate_and_touch(nbytes):
    def fn():
        a = np.empty(nbytes // 8, dtype=np.float64)
        a.fill(1.0)  # touch every page: untouched pages are never resident
        return float(a[::4096].sum())
    return fn


@pytest.mark.parametrize("nbytes", [200 * MB, 50 * MB])
def test_known_allocation_within_ten_percent(nbytes):
    measured = memory.cpu_peak_rise(allocate_and_touch(nbytes))
    assert abs(measured - nbytes) <= 0.1 * nbytes, measured


def test_peak_of_one_call_not_of_the_process():
    memory.cpu_peak_rise(allocate_and_touch(200 * MB))  # an earlier, bigger peak
    measured = memory.cpu_peak_rise(allocate_and_touch(20 * MB))
    assert abs(measured - 20 * MB) <= 0.1 * 20 * MB, measured


def test_nothing_allocated_reads_near_zero():
    assert memory.cpu_peak_rise(lambda: None) < 2 * MB


def test_an_adapter_without_a_gpu_probe_says_so():
    class NoGPUProbe(impls.Adapter):
        name = "no_gpu_probe"
    adapter = NoGPUProbe()
    assert adapter.peak_memory(allocate_and_touch(20 * MB), "cpu") > 15 * MB  # the default CPU probe
    with pytest.raises(memory.MemoryProbeUnavailable, match="no_gpu_probe: no peak-memory probe for device cuda"):
        adapter.peak_memory(lambda: None, "cuda")


@pytest.mark.parametrize("text, value", [("12GiB", 12 * 2 ** 30), ("500MB", 500 * MB), ("1e9", 10 ** 9),
                                         ("2048", 2048)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["lots", "12 parsecs", "-1GB", "0"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match="MHABENCH_MEMORY_BUDGET"):
        parse_bytes(text)
