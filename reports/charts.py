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
UNIT_LABELS = {"seconds": "time per call", "bytes": "memory per call", "fraction": "fraction of GEMM peak"}
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


REFERENCE = "torch_sdpa"      # drawn in every panel, so each family reads against one line
PANEL_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2",
                 "#bcbd22", "#7f7f7f")  # tab10, red second: the first lines of a panel are far apart


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


def _families(rows: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """The panels: one per framework family, largest first (a line without a recorded family is its own)."""
    family = rows["family"] if "family" in rows else pd.Series([None] * len(rows), index=rows.index)
    family = family.where(family.notna(), rows["adapter"].astype(str))
    groups = [(str(name), part) for name, part in rows.assign(_family=family).groupby("_family", sort=True)]
    return sorted(groups, key=lambda g: (-g[1]["series"].nunique(), g[0]))


def _by_last_value(rows: pd.DataFrame) -> list[str]:
    """Line names ordered by their value at their largest length, highest first: the legend reads top-down as the
    lines end on the right."""
    ends = rows.sort_values("seq_len").groupby("series")["value"].last()
    return list(ends.sort_values(ascending=False).index)


def _grid(count: int, width: float = 5.2, height: float = 5.0):
    columns = min(3, count)
    rows = math.ceil(count / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False)
    for extra in axes.flat[count:]:
        extra.set_visible(False)
    return fig, list(axes.flat[:count])


def _draw_line(ax, line: pd.DataFrame, colour, label: str, flagged: bool, spread=True) -> None:
    """One line; each point with its samples' interquartile range as an error bar where it has one, and hollow
    where its value is the compiler's own figure (XLA's memory)."""
    line = line.sort_values("seq_len")
    style = dict(color=colour, linewidth=1.4, markersize=4, linestyle=":" if flagged else "-",
                 marker="x" if flagged else "o")
    ax.plot(line["seq_len"], line["value"], label=label, **style)
    if spread:
        _draw_spread(ax, line, colour)
    hollow = (line["memory_charted"] == "program").to_numpy() if "memory_charted" in line else None
    if hollow is not None and hollow.any():
        ax.plot(line["seq_len"][hollow], line["value"][hollow], linestyle="none", marker="o", markersize=7,
                markerfacecolor="white", markeredgecolor=colour, zorder=3)


def _draw_spread(ax, line: pd.DataFrame, colour) -> None:
    """Each point's interquartile range as an error bar, where the point has one."""
    if not {"q25", "q75"} <= set(line):
        return
    low, high = line["q25"].to_numpy(float), line["q75"].to_numpy(float)
    known = np.isfinite(low) & np.isfinite(high) & (high > low)
    if known.any():
        y = line["value"].to_numpy(float)[known]
        ax.errorbar(line["seq_len"].to_numpy(float)[known], y,
                    yerr=[np.clip(y - low[known], 0, None), np.clip(high[known] - y, 0, None)], fmt="none",
                    ecolor=colour, elinewidth=0.9, capsize=2.5, alpha=0.7)


def scaling_chart(frame: pd.DataFrame, klass: str, method: str, device, flagged: set = frozenset(),
                  y_of=None, unit: str | None = None, guides: bool = True, title: str | None = None) -> str | None:
    """Value against L on log-log axes, one panel per framework family (small multiples), each with the reference
    line (torch_sdpa) and the O(L) and O(L²) guides; each point with its interquartile range as an error bar; a
    line's legend entry gives its fitted exponent, and the legend runs in the order the lines end at the largest L. A line that breaks a plausibility rule
    (``flagged``) is dotted with crosses and says so. ``y_of``: the value to draw from a row (default: the
    value), with its ``unit``."""
    rows = tables.sweep(frame[frame["device"] == device], klass, method)
    if rows.empty or not np.isfinite(rows["value"]).any():
        return None
    rows = rows[np.isfinite(rows["value"]) & (rows["value"] > 0)].copy()
    if y_of is not None:
        rows["value"] = y_of(rows)
        rows = rows[np.isfinite(rows["value"])]
    if rows.empty:
        return None
    unit = unit or rows["unit"].iloc[0]
    reference = rows[rows["adapter"] == REFERENCE]
    reference_series = set(reference["series"])
    panels = _families(rows)
    fig, axes = _grid(len(panels))
    heads = _int(rows["num_heads"].iloc[0])
    for ax, (family, part) in zip(axes, panels):
        names = [s for s in _by_last_value(part) if s not in reference_series]
        colours = {name: PANEL_COLOURS[i % len(PANEL_COLOURS)] for i, name in enumerate(names)}
        drawn = pd.concat([part, reference]).drop_duplicates()
        for series in _by_last_value(drawn):
            line = drawn[drawn["series"] == series]
            is_flagged = (klass, method, device, series) in flagged
            exponent = tables.fit_exponent(line["seq_len"], line["value"]) if y_of is None else math.nan
            label = plain(series) + (f"  L^{exponent:.2f}" if math.isfinite(exponent) else "") + \
                (" (reference)" if series in reference_series else "") + (" IMPLAUSIBLE" if is_flagged else "")
            if series in reference_series:
                ax.plot(line.sort_values("seq_len")["seq_len"], line.sort_values("seq_len")["value"], color="black",
                        linewidth=2.2, alpha=0.35, label=label)
                if y_of is None:
                    _draw_spread(ax, line, "0.55")
            else:
                _draw_line(ax, line, colours[series], label, is_flagged, spread=y_of is None)
        if guides:  # clipped to the lines' own range, so a steep guide never squeezes the lines together
            _guides(ax, drawn["seq_len"], drawn["value"])
            ax.set_ylim(drawn["value"].min() / 1.6, drawn["value"].max() * 1.6)
        _log_axes(ax, unit, y_log=guides)
        if unit == "fraction":
            ax.set_ylim(bottom=0)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0%}"))
            if (drawn["value"] > 1).any():
                ax.axhline(1.0, color="#d62728", linewidth=1, label="GEMM peak: above it, a measurement fault")
        ax.set_title(plain(f"{family}"), fontsize=10)
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(UNIT_LABELS.get(unit, plain(unit)))
        ax.grid(True, which="both", alpha=0.25)
        # under the panel, never over its lines; in the order the lines end at the largest L
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.16), borderaxespad=0.0, frameon=False)
    fig.suptitle(plain(f"{klass}: {title or METHOD_TITLES.get(method, method)} ({device}, heads={heads})"),
                 fontsize=11)
    fig.tight_layout()
    return to_data_uri(fig)


def fraction_chart(frame: pd.DataFrame, klass: str, method: str, device, peaks: dict,
                   flagged: set = frozenset()) -> str | None:
    """GFLOP/s as a fraction of its machine's GEMM peak against L, one panel per framework family. A fraction
    above 1 is a measurement fault (the peak was measured low), drawn at its value and marked by the line at 1."""
    def fraction(rows):
        peak = [peaks.get((str(m), str(d)), math.nan) for m, d in zip(rows["machine"], rows["device"])]
        return rows["value"].to_numpy(float) / np.asarray(peak, float)
    known = [v for v in peaks.values() if np.isfinite(v)]
    if not known:
        return None
    title = f"{METHOD_TITLES.get(method, method)} as a fraction of the GEMM peak ({max(known):.0f} GFLOP/s)"
    return scaling_chart(frame, klass, method, device, flagged, y_of=fraction, unit="fraction", guides=False,
                         title=title)


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


def status_chart(summary: pd.DataFrame) -> str | None:
    """A stacked bar per adapter of its conformance statuses."""
    if summary.empty:
        return None
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(summary) + 1.4))
    several = summary["adapter"].duplicated(keep=False)  # an adapter with a line per framework version
    names = [plain(f"{a} ({v})" if twice else a)
             for a, v, twice in zip(summary["adapter"], summary["framework_version"], several)]
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


DTYPE_STYLES = {"float32": "-", "float16": "--", "bfloat16": ":"}
ACCURACY_TITLES = {"rms_error": "RMS error against the float64 oracle",
                   "ratio_rms_error": "RMS error over the same-precision reference's"}


def accuracy_chart(accuracy: pd.DataFrame, klass: str, device, figure: str = "rms_error") -> str | None:
    """An accuracy figure against L on log-log axes, one panel per framework family, one line per adapter (a
    colour) and dtype (a line style), each labelled with its fitted exponent. ``rms_error``: the same-precision
    reference of each dtype in grey underneath, so a line above its grey one is worse than a plain
    implementation in that dtype; ``ratio_rms_error``: the ratio itself, with 1 marked."""
    rows = accuracy[(accuracy["class"] == klass) & (accuracy["device"] == device) & (accuracy["status"] == "ok")]
    rows = rows[np.isfinite(rows[figure].astype(float)) & (rows[figure].astype(float) > 0)].copy()
    if rows.empty:
        return None
    rows["series"] = [tables.accuracy_series(r) for r in rows.to_dict("records")]
    rows["value"] = rows[figure].astype(float)
    panels = _families(rows)
    fig, axes = _grid(len(panels))
    for ax, (family, part) in zip(axes, panels):
        adapters = list(dict.fromkeys(tables.series_label(r) for r in part.sort_values("adapter").to_dict("records")))
        colours = {name: PANEL_COLOURS[i % len(PANEL_COLOURS)] for i, name in enumerate(adapters)}
        if figure == "rms_error":  # the reference of each dtype: the same inputs, so one line per dtype
            for dtype, ref in part.groupby("dtype"):
                ref = ref.drop_duplicates("seq_len").sort_values("seq_len")
                ax.plot(ref["seq_len"], ref["reference_rms_error"], color="black", alpha=0.3, linewidth=2.2,
                        linestyle=DTYPE_STYLES.get(dtype, "-"), label=plain(f"reference {dtype}"))
        else:
            ax.axhline(1.0, color="0.55", linewidth=1, label="as the reference")
        for series in _by_last_value(part):
            line = part[part["series"] == series].sort_values("seq_len")
            first = line.iloc[0]
            exponent = tables.fit_exponent(line["seq_len"], line["value"])
            ax.plot(line["seq_len"], line["value"], color=colours[tables.series_label(first)], marker="o",
                    markersize=3.5, linewidth=1.3, linestyle=DTYPE_STYLES.get(first["dtype"], "-"),
                    label=plain(series) + (f"  L^{exponent:.2f}" if math.isfinite(exponent) else ""))
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_yscale("log")
        plain_ticks = FuncFormatter(lambda v, _: f"{v:.3g}")  # no mathtext: 1.3, not 1.3 x 10^0
        ax.yaxis.set_major_formatter(plain_ticks)
        low, high = ax.get_ylim()
        ax.yaxis.set_minor_formatter(plain_ticks if low > 0 and high / low < 10 else NullFormatter())
        ax.set_title(plain(family), fontsize=10)
        ax.set_xlabel("sequence length L")
        ax.set_ylabel("RMS error" if figure == "rms_error" else "error / reference error")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(0.0, -0.16), borderaxespad=0.0, frameon=False)
    fig.suptitle(plain(f"{klass}: {ACCURACY_TITLES.get(figure, figure)} ({device})"), fontsize=11)
    fig.tight_layout()
    return to_data_uri(fig)
