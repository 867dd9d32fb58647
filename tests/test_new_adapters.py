"""The adapters of issue 18 hold to the adapter interface: the smoke check a plugin gets (build, call, output
shape, export_weights round trip) passes for each, and each declares itself in one module of impls/."""
from __future__ import annotations

import importlib

import pytest

from mhabench import impls
from mhabench.impls import interface

IN_PROCESS = ["ort_attention", "torch_mha@ort", "torch_flex", "keras_gqa", "tf_keras_mha"]
IN_WORKERS = ["keras_gqa@jax", "keras_gqa@torch"]  # Keras runs one backend per process


def check(name):
    adapter = impls.get_adapter(name)
    if not adapter.is_available():
        pytest.skip(adapter.availability()[1])
    assert interface.interface_problem(adapter) is None
    # the check runs float64 in the default mode: compiled FlexAttention refuses float64 on the CPU, so for
    # torch_flex it is skipped there (build(mode=None) takes default_mode, not preferred_mode) and its float64
    # eager layers are checked in tests/test_torch_flex.py
    spec = impls.AttentionSpec(num_heads=2, key_dim=4)
    ran = adapter.unsupported_reason(spec, (8, 8, 8), dtype="float64", mode=adapter.default_mode) is None
    assert ran or name == "torch_flex"


@pytest.mark.parametrize("name", IN_PROCESS)
def test_interface_smoke_check(name):
    if name == "torch_mha@ort" and importlib.util.find_spec("onnxscript") is None:
        pytest.skip("torch.onnx.export needs onnxscript")
    check(name)


@pytest.mark.slow
@pytest.mark.parametrize("name", IN_WORKERS)
def test_interface_smoke_check_in_a_worker(name):
    check(name)


@pytest.mark.parametrize("name", IN_PROCESS + IN_WORKERS)
def test_each_adapter_declares_its_facts(name):
    adapter = impls.get_adapter(name)
    assert adapter.framework and adapter.description and adapter.install_hint and adapter.family
    assert adapter.requires and adapter.distributions and adapter.layer_class is not None
    assert type(adapter).__module__.startswith("mhabench.impls.")
