"""mhabench implementations: the canonical spec, the NumPy oracle and one adapter per framework."""
from .spec import AttentionSpec, Weights
from . import oracle
from .base import Adapter, Capabilities, Layer, UnsupportedError, FEATURES
from .registry import available_adapters, get_adapter, list_adapters, register_adapter

__all__ = ["AttentionSpec", "Weights", "oracle", "Adapter", "Capabilities", "Layer", "UnsupportedError",
           "FEATURES", "available_adapters", "get_adapter", "list_adapters", "register_adapter"]
