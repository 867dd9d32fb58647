"""Charts as inline PNG data URIs (matplotlib, Agg backend: no display, no network)."""
from __future__ import annotations

import base64
import io
import math

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from matplotlib.ticker import FuncFormatter, NullFormatter  # noqa: E402

from . import tables  # noqa: E402
from .units import format_value  # noqa: E402

METHOD_TITLES = {
    "time_forward": "forward time", "time_forward_backward": "forward + backward time",
    "track_peakmem_forward": "forward peak memory per call",
    "track_peakmem_forward_backward": "forward + backward peak memory per call",
    "track_gflops_forward": "forward GFLOP/s", "track_gflops_forward_backward": "forward + backward GFLOP/s",
}
UNIT_LABELS = {"seconds": "time per call", "bytes": "peak memory per call"}
STATUS_COLOURS = {"pass": "#4caf50", "fail": "#e53935", "divergence": "#fb8c00", "unsupported": "#9e9e9e",
                  "error": "#8e24aa", "skip": "#cfd8dc"}


def plain(text) -> str:
    """Text matplotlib shows as written: no mathtext from '$', no control characters."""
    return "".join(ch if ch.isprintable() else "\N{REPLACEMENT CHARACTER}" for ch in str(text)).replace("$", r"\$")


def to_data_uri(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(_palette(buffer.getvalue())).decode("ascii")


def _palette(png: bytes) -> bytes:
    """The chart as a 256-colour palette PNG (a third of the size; line charts use far fewer colours)."""
    try:
        from PIL import Image
        image = Image.open(io.BytesIO(png)).convert("RGB").quantize(colors=256)
        out = io.BytesIO()
        image.save(out, format="PNG", optimize=True)
        return out.getvalue() if out.tell() < len(png) else png
    except Exception:  # no Pillow, or a format it cannot read: the chart as matplotlib wrote it
        return png


def _colours(series: list[str]) -> dict:
    cmap = plt.get_cmap("tab10" if len(series) <= 10 else "tab20")
    return {name: cmap(i % cmap.N) for i, name in enumerate(sorted(series))}


def _log_axes(ax, unit: str, y_log: bool = True) -> None:
    """Log axes with plain labels (L as integers, y in ms/MiB); no mathtext, which is slow to lay out.

    Call after plotting: a y range within one decade gets its minor ticks labelled, else it has none.
    """
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    if not y_log:
        return
    base = 2 if unit == "bytes" else 10  # powers of two read as whole KiB/MiB/GiB
    ax.set_yscale("log", base=base)
    label = FuncFormatter(lambda v, _: format_value(v, unit))
    ax.yaxis.set_major_formatter(label)
    low, high = ax.get_ylim()
    ax.yaxis.set_minor_formatter(label if low > 0 and high / low < base else NullFormatter())


def _guides(ax, lengths, values) -> None:
    """O(L) and O(L^2) lines through the median value at the smallest L, for the eye."""
    lengths, values = np.asarray(lengths, float), np.asarray(values, float)
    keep = np.isfinite(values) & (values > 0)
    if keep.sum() < 2 or len(np.unique(lengths[keep])) < 2:
        return
    l_min, l_max = lengths[keep].min(), lengths[keep].max()
    anchor = np.median(values[keep][lengths[keep] == l_min])
    xs = np.array([l_min, l_max])
    ax.plot(xs, anchor * (xs / l_min), color="0.55", linestyle="--", linewidth=1, label="O(L) guide")
    ax.plot(xs, anchor * (xs / l_min) ** 2, color="0.55", linestyle=":", linewidth=1.2, label="O(L²) guide")


def _panels(frame: pd.DataFrame, klass: str, methods: tuple[str, ...], device):
    """One panel per method with measurements: (figure, [(axes, method, rows)], colour per line) or None."""
    panels = [(m, tables.sweep(frame[frame["device"] == device], klass, m)) for m in methods]
    panels = [(m, rows) for m, rows in panels if not rows.empty and np.isfinite(rows["value"]).any()]
    if not panels:
        return None
    colours = _colours(list({s for _, rows in panels for s in rows["series"]}))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.2), squeeze=False)
    return fig, [(ax, m, rows) for ax, (m, rows) in zip(axes[0], panels)], colours


def scaling_chart(frame: pd.DataFrame, klass: str, methods: tuple[str, ...], device) -> str | None:
    """Log-log value against L, one line per adapter(+mode), fitted exponent in the legend."""
    drawn = _panels(frame, klass, methods, device)
    if drawn is None:
        return None
    fig, panels, colours = drawn
    for ax, method, rows in panels:
        for series, line in rows.groupby("series", sort=True):
            line = line[np.isfinite(line["value"]) & (line["value"] > 0)]
            if line.empty:
                continue
            exponent = tables.fit_exponent(line["seq_len"], line["value"])
            label = plain(series) + (f"  (L^{exponent:.2f})" if math.isfinite(exponent) else "")
            ax.plot(line["seq_len"], line["value"], marker="o", markersize=3.5, color=colours[series], label=label)
        _guides(ax, rows["seq_len"], rows["value"])
        _log_axes(ax, rows["unit"].iloc[0])
        heads = rows["num_heads"].iloc[0]
        ax.set_title(plain(f"{klass}: {METHOD_TITLES.get(method, method)} ({device}, heads={_int(heads)})"),
                     fontsize=10)
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(UNIT_LABELS.get(rows["unit"].iloc[0], plain(rows["unit"].iloc[0])))
        ax.grid(True, which="both", alpha=0.25)
        # beside the plot, not over the lines: with a dozen adapters an inside legend hides the small lengths
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return to_data_uri(fig)


def heads_chart(frame: pd.DataFrame, klass: str, method: str) -> str | None:
    rows = tables.heads_sweep(frame, klass, method)
    if rows.empty:
        return None
    colours = _colours(list(rows["series"].unique()))
    fig, ax = plt.subplots(figsize=(6.2, 4.0))
    for series, line in rows.groupby("series", sort=True):
        ax.plot(line["num_heads"], line["value"], marker="o", markersize=3.5, color=colours[series],
                label=plain(series))
    _log_axes(ax, rows["unit"].iloc[0])
    length = _int(rows["seq_len"].iloc[0])
    ax.set_title(plain(f"{klass}: {METHOD_TITLES.get(method, method)} against heads (L={length})"),
                 fontsize=10)
    ax.set_xlabel("number of heads")
    ax.set_ylabel(UNIT_LABELS.get(rows["unit"].iloc[0], plain(rows["unit"].iloc[0])))
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=7)
    return to_data_uri(fig)


def gflops_chart(frame: pd.DataFrame, klass: str, methods: tuple[str, ...], device, peaks: dict) -> str | None:
    """GFLOP/s against L, with each machine's GEMM peak (``peaks``: label -> GFLOP/s) as a horizontal line."""
    drawn = _panels(frame, klass, methods, device)
    if drawn is None:
        return None
    fig, panels, colours = drawn
    for ax, method, rows in panels:
        for series, line in rows.groupby("series", sort=True):
            line = line[np.isfinite(line["value"])]
            ax.plot(line["seq_len"], line["value"], marker="o", markersize=3.5, color=colours[series],
                    label=plain(series))
        for (label, peak), style in zip(sorted(peaks.items()), ("--", ":", "-.", (0, (5, 1)))):
            if peak and math.isfinite(peak):
                ax.axhline(peak, color="black", linestyle=style, linewidth=1,
                           label=plain(f"GEMM peak {label if len(peaks) > 1 else ''} {peak:.1f} GFLOP/s"))
        _log_axes(ax, "GFLOP/s", y_log=False)
        ax.set_title(plain(f"{klass}: {METHOD_TITLES.get(method, method)} ({device})"), fontsize=10)
        ax.set_xlabel("sequence length L")
        ax.set_ylabel("GFLOP/s")
        ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7, loc="lower right")
    return to_data_uri(fig)


def status_chart(summary: pd.DataFrame) -> str | None:
    """A stacked bar per adapter of its conformance statuses."""
    if summary.empty:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(summary) + 1.4))
    names = [plain(a) for a in summary["adapter"]]
    left = np.zeros(len(summary))
    for status, colour in STATUS_COLOURS.items():
        counts = summary[status].to_numpy(dtype=float)
        if counts.any():
            ax.barh(names, counts, left=left, color=colour, label=status)
            left += counts
    ax.invert_yaxis()
    ax.set_xlabel("conformance rows")
    ax.legend(fontsize=7, ncol=6, loc="upper center", bbox_to_anchor=(0.5, -0.18 if len(summary) > 3 else -0.35))
    ax.grid(True, axis="x", alpha=0.25)
    return to_data_uri(fig)


def _int(value):
    try:
        return int(value)
    except (TypeError, ValueError):
        return value
