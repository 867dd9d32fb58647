"""The oracle behind the adapter interface, in any float dtype (the same-precision reference)."""
from __future__ import annotations

from . import oracle
from .base import EXTENSION_FEATURES, Adapter, Capabilities, Layer
from .spec import Weights


class NumpyOracleLayer(Layer):
    def __init__(self, adapter, spec, weights, dtype, device, mode="eager", fully_masked="zeros",
                 block_size=None, **options):
        super().__init__(adapter, spec, weights, dtype, device, mode, **options)
        self.weights = weights
        self.fully_masked = fully_masked
        self.block_size = block_size

    def _forward(self, call, return_scores, training, seed):
        return oracle.forward(self.spec, self.weights, call.query, call.value,
                              call.key if call.key_given else None, call.given_mask, call.causal_argument, return_scores,
                              fully_masked=self.fully_masked, dtype=self.dtype,
                              block_size=None if return_scores else self.block_size, **call.feature_kwargs())

    def _gradients(self, call, cotangent):
        from . import oracle_backward
        return oracle_backward.backward(self.spec, self.weights, call.query, call.value,
                                        call.key if call.key_given else None, call.given_mask, call.causal_argument,
                                        cotangent, fully_masked=self.fully_masked,
                                        dtype=self.dtype, **call.feature_kwargs())

    def export_weights(self) -> Weights:
        return self.weights


class NumpyOracleAdapter(Adapter):
    name = "numpy_oracle"
    framework = "NumPy"
    requires = ("numpy",)
    distributions = ("numpy",)
    install_hint = "pip install numpy"
    description = "the float64 reference (mhabench.impls.oracle) run in the requested dtype"
    layer_class = NumpyOracleLayer
    baseline = True
    score_buffers = 4  # scores, their exponentials, the probabilities and the masked copy

    def capabilities(self):
        return Capabilities(unsupported_features={"dropout": "the oracle is deterministic: dropout is not modelled"},
                            devices=("cpu",), modes=("eager",), supported_extensions=frozenset(EXTENSION_FEATURES))
