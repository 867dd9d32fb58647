"""Turn conformance and asv result files into tables, charts, one HTML page and a Markdown summary.

Reads only result files, so a report can be built where no framework is installed.
"""
from .build import build_report, write_report
from .collect import collect, strict_failures, verdict
from .compare import compare
from .load import ResultsError, load_benchmarks, load_conformance, load_results

__all__ = ["build_report", "collect", "compare", "load_benchmarks", "load_conformance", "load_results",
           "ResultsError", "verdict", "write_report"]
