"""Write a report: index.html, summary.md and one CSV per table."""
from __future__ import annotations

from pathlib import Path

from mhabench import results

from .collect import ReportData, collect
from .compare import Comparison
from .html import render_html
from .load import ResultsError
from .markdown import render_markdown


def write_report(data: ReportData, out_dir: Path) -> dict:
    """Write index.html, summary.md and one CSV per table; return their paths.

    All or nothing: every file is rendered and written to a temporary file first, and only then renamed
    into place (``results.atomic_write_many``), so a full disk, a read-only folder or a directory where a
    file goes leaves the previous report whole and no temporary file behind (a ResultsError naming the
    file)."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ResultsError(f"cannot create the report directory {out_dir}: {exc.strerror or exc}") from None
    paths = {name: out_dir / f"{name}.csv" for name in data.tables}
    files = {paths[name]: table.to_csv(index=False) for name, table in data.tables.items()}
    paths["html"] = out_dir / "index.html"
    paths["markdown"] = out_dir / "summary.md"
    files[paths["html"]] = render_html(data)
    files[paths["markdown"]] = render_markdown(data)
    try:
        results.atomic_write_many(files)
    except results.WriteFailed as exc:
        raise ResultsError(f"{exc}; the report in {out_dir} was left as it was") from None
    return paths


def build_report(results_dir, out_dir: Path, comparison: Comparison | None = None, machines=None):
    """Collect and write a report of one results directory, or of several merged (see :func:`collect`)."""
    data = collect(results_dir, comparison, machines)
    return data, write_report(data, out_dir)


