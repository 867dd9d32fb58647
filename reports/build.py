"""Write a report: index.html, summary.md and one CSV per table."""
from __future__ import annotations

from pathlib import Path

from .collect import ReportData, collect
from .compare import Comparison
from .html import render_html
from .load import ResultsError
from .markdown import render_markdown


def write_report(data: ReportData, out_dir: Path) -> dict:
    """Write index.html, summary.md and one CSV per table; return their paths."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResultsError(f"cannot create the report directory {out_dir}: {exc.strerror}") from None
    paths = {}
    for name, table in data.tables.items():
        path = out_dir / f"{name}.csv"
        table.to_csv(path, index=False)
        paths[name] = path
    paths["html"] = out_dir / "index.html"
    paths["html"].write_text(render_html(data), encoding="utf-8")
    paths["markdown"] = out_dir / "summary.md"
    paths["markdown"].write_text(render_markdown(data), encoding="utf-8")
    return paths


def build_report(results_dir, out_dir: Path, comparison: Comparison | None = None, machines=None):
    """Collect and write a report of one results directory, or of several merged (see :func:`collect`)."""
    data = collect(results_dir, comparison, machines)
    return data, write_report(data, out_dir)


