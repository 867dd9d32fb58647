"""mhabench: cross-framework conformance and benchmarking for multi-head attention."""
__version__ = "0.1.0"
