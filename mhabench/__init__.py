"""mhabench: cross-framework conformance and benchmarking for multi-head attention.

One installed package. Its subpackages ``mhabench.impls``, ``mhabench.conformance``,
``mhabench.benchmarks`` and ``mhabench.reports`` live in the repository's top-level
folders of the same names; the wheel puts them under ``mhabench/``. Run from a source
checkout (``PYTHONPATH=.``, or an editable install) the repository root joins this
package's search path, so the same imports work there too.
"""
from pathlib import Path as _Path

__version__ = "0.2.0"
SUBPACKAGES = ("impls", "conformance", "benchmarks", "reports")


def _source_checkout_root():
    """The repository root when this package runs from a source checkout, else None."""
    here = _Path(__file__).resolve().parent
    if (here / "impls").is_dir():  # an installed wheel: the subpackages sit inside this folder
        return None
    root = here.parent
    if all((root / name / "__init__.py").is_file() for name in SUBPACKAGES):
        return root
    return None


_root = _source_checkout_root()
if _root is not None and str(_root) not in __path__:
    __path__.append(str(_root))
del _root
