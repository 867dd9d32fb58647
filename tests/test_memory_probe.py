"""The per-call peak-memory probe: a known allocation is measured within 10%."""
import numpy as np
import pytest

from benchmarks import memory
from benchmarks.common import parse_bytes

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
    measured = memory.peak_rise(allocate_and_touch(nbytes), "cpu")
    assert abs(measured - nbytes) <= 0.1 * nbytes, measured


def test_peak_of_one_call_not_of_the_process():
    memory.peak_rise(allocate_and_touch(200 * MB), "cpu")  # an earlier, bigger peak
    measured = memory.peak_rise(allocate_and_touch(20 * MB), "cpu")
    assert abs(measured - 20 * MB) <= 0.1 * 20 * MB, measured


def test_nothing_allocated_reads_near_zero():
    assert memory.peak_rise(lambda: None, "cpu") < 2 * MB


def test_unknown_gpu_framework():
    with pytest.raises(memory.MemoryProbeUnavailable, match="no GPU peak-memory probe"):
        memory.peak_rise(lambda: None, "cuda", framework="mxnet")


@pytest.mark.parametrize("text, value", [("12GiB", 12 * 2 ** 30), ("500MB", 500 * MB), ("1e9", 10 ** 9),
                                         ("2048", 2048)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["lots", "12 parsecs", "-1GB", "0"])
def test_parse_bytes_rejects(text):
    with pytest.raises(ValueError, match="MHABENCH_MEMORY_BUDGET"):
        parse_bytes(text)
