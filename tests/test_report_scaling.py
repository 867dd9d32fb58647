"""The scaling section read as a kernel engineer reads it: implausible lines flagged and kept out of the verdict,
fits with their residual, both memory figures, the --verify ratios, and charts per framework family."""
from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

from mhabench import plausibility, results  # noqa: E402
from mhabench.reports import charts, tables  # noqa: E402
from mhabench.reports.collect import collect, verdict  # noqa: E402
from mhabench.reports.html import render_html  # noqa: E402

LENGTHS = [128, 256, 512, 1024, 2048]
COLUMNS = ["result", "params", "version", "started_at", "duration", "stats_ci_99_a", "stats_ci_99_b", "stats_q_25",
           "stats_q_75", "stats_number", "stats_repeat", "samples", "profile"]
FAMILY = {"torch_sdpa": ("torch", False), "torch_mha": ("torch", True), "jax_dpa": ("jax", True),
          "keras_mha": ("tensorflow", True)}


def write_results(root: Path, lines: dict, spread=0.02, points=None):
    """An asv results tree and the suite's side files for ``lines``: {(class, method, adapter): [value per L]}."""
    adapters = sorted({a for _, _, a in lines})
    grid = [[repr(a) for a in adapters], ["'eager'"], [str(L) for L in LENGTHS], ["8"], ["'cpu'"]]
    combos = list(itertools.product(*grid))
    meta, entries = {}, {}
    for (klass, method, adapter), values in lines.items():
        name = f"bench_attention.{klass}.{method}"
        entry = entries.setdefault(name, [[math.nan] * len(combos), grid, "v1",
                                          None, None, [None] * len(combos), [None] * len(combos),
                                          [None] * len(combos), [None] * len(combos), [1] * len(combos),
                                          [None] * len(combos), None, None])
        for L, value in zip(LENGTHS, values):
            if value is None:
                continue
            i = combos.index((repr(adapter), "'eager'", str(L), "8", "'cpu'"))
            entry[0][i] = value
            entry[5][i], entry[6][i] = value * (1 - spread), value * (1 + spread)
            entry[7][i], entry[8][i] = value * (1 - spread / 2), value * (1 + spread / 2)
            entry[10][i] = 12
        meta[name] = {"name": name, "param_names": ["adapter", "mode", "seq_len", "num_heads", "device"],
                      "params": entry[1], "type": "track", "unit": "seconds" if "time" in method else "bytes",
                      "version": "v1"}
    asv = root / "asv"
    (asv / "m").mkdir(parents=True)
    (asv / "m" / "machine.json").write_text(json.dumps({"machine": "m", "version": 1}))
    (asv / "benchmarks.json").write_text(json.dumps({**meta, "version": 2}))
    (asv / "m" / "abc-env.json").write_text(json.dumps({
        "commit_hash": "abc", "env_name": "env", "date": 1, "params": {"machine": "m"}, "python": "3.11",
        "requirements": {}, "env_vars": {}, "result_columns": COLUMNS, "results": entries, "version": 2},
        allow_nan=True))
    layout = results.Layout(root)
    layout.bench.mkdir(parents=True, exist_ok=True)
    flops = [{"benchmark": f"bench_attention.{k}", "params": {"adapter": a, "mode": "eager", "seq_len": L,
              "num_heads": 8, "device": "cpu"}, "forward": 1e9 * (L / 128) ** 2, "forward_backward": 3e9,
              "kernel": "default", "family": FAMILY[a][0], "holds_scores": FAMILY[a][1]}
             for k, a in {(k, a) for k, _, a in lines} for L in LENGTHS]
    layout.flops.write_text("".join(json.dumps(r) + "\n" for r in flops))
    layout.peaks.write_text(json.dumps({"device": "cpu", "gflops": 100.0}) + "\n")
    if points:
        layout.points.write_text("".join(json.dumps(p) + "\n" for p in points))
    return root


def quadratic(scale, exponent=2.0):
    return [scale * (L / 128) ** exponent for L in LENGTHS]


@pytest.fixture()
def scaled(tmp_path):
    lines = {("SelfAttention", "track_time_forward", "torch_sdpa"): quadratic(1e-3, 1.6),
             ("SelfAttention", "track_time_forward", "torch_mha"): quadratic(2e-3),
             # a busy machine: keras_mha's time at 2048 below 1024, well past both spreads
             ("SelfAttention", "track_time_forward", "keras_mha"): [1e-4, 2e-4, 4e-4, 8e-3, 4e-4],
             ("SelfAttention", "track_time_forward", "jax_dpa"): quadratic(1.5e-3),
             ("SelfAttention", "track_peakmem_forward", "torch_sdpa"): quadratic(1e6, 1.0),
             ("SelfAttention", "track_peakmem_forward", "torch_mha"): quadratic(1e6),
             ("SelfAttention", "track_peakmem_forward", "jax_dpa"): quadratic(1e6, 3.8),  # faster than L²
             ("SelfAttention", "track_peakmem_forward", "keras_mha"): quadratic(3e6)}
    return write_results(tmp_path / "r", lines)


def test_an_implausible_line_is_flagged_with_its_rule_and_numbers_and_left_out_of_the_verdict(scaled):
    data = collect(scaled)
    lines = data.tables["scaling_lines"].set_index("series")
    assert plausibility.TIME_FALLS in lines.at["keras_mha", "implausible"]
    assert "L=2048" in lines.at["keras_mha", "implausible"] and "below L=1024" in lines.at["keras_mha", "implausible"]
    assert plausibility.MEMORY_EXPONENT in lines.at["jax_dpa", "implausible"]
    assert lines.at["torch_sdpa", "implausible"] == "" and lines.at["torch_mha", "implausible"] == ""
    # keras_mha's 0.4 ms at 2048 would be the fastest: the verdict quotes the fastest plausible line
    fastest = data.summary()["fastest"]
    assert fastest["series"] == "torch_sdpa" and fastest["excluded"] == 1
    assert any("1 implausible line(s) left out" in line for line in verdict(data))
    winners = data.tables["scaling_winners"]
    assert "keras_mha" not in set(winners["fastest"]) and "jax_dpa" not in set(winners["leanest"])
    page = render_html(data)
    assert "2 line(s) break a plausibility rule" in page and "Not measured again" in page


def test_each_fit_reports_its_residual_and_how_well_a_power_law_fits(scaled):
    lines = collect(scaled).tables["scaling_lines"].set_index("series")
    assert lines.at["torch_mha", "time_exponent"] == pytest.approx(2.0)
    assert lines.at["torch_mha", "time_fit_residual"] == pytest.approx(0, abs=1e-9)
    assert lines.at["torch_mha", "time_fit"] == "good"
    assert lines.at["keras_mha", "time_fit"] == "poor"


def test_remeasured_points_say_what_they_were(scaled):
    layout = results.Layout(scaled)
    layout.remeasured.write_text(json.dumps({
        "benchmark": "bench_attention.SelfAttention.track_time_forward", "rule": plausibility.TIME_FALLS,
        "params": {"adapter": "keras_mha", "mode": "eager", "seq_len": 2048, "num_heads": 8, "device": "cpu"},
        "before": 3e-4, "after": 4e-4}) + "\n")
    lines = collect(scaled).tables["scaling_lines"].set_index("series")
    assert lines.at["keras_mha", "remeasured"] == "time: L=2048 (was 300 µs)"


def test_the_memory_figure_charted_is_named_and_both_are_kept(tmp_path, monkeypatch):
    lines = {("SelfAttention", "track_peakmem_forward", "jax_dpa"): quadratic(1e6)}
    point = lambda L: {"benchmark": "bench_attention.SelfAttention.track_peakmem_forward", "quantity": "memory",
                       "params": {"adapter": "jax_dpa", "mode": "eager", "seq_len": L, "num_heads": 8,
                                  "device": "cpu"}, "charted": "program", "program_bytes": 1e6 * (L / 128) ** 2,
                       "probe_median": 1000.0, "probe": "VmHWM rise"}
    root = write_results(tmp_path / "r", lines, points=[point(L) for L in LENGTHS])
    data = collect(root)
    memory = data.attention[data.attention["method"] == "track_peakmem_forward"]
    assert set(memory["memory_charted"]) == {"program"} and set(memory["probe_bytes"]) == {1000.0}
    page = render_html(data)
    assert "memory_analysis()" in page and "hollow" in page
    drawn = {}
    real = charts.to_data_uri
    monkeypatch.setattr(charts, "to_data_uri", lambda fig: drawn.setdefault("fig", fig) and real(fig))
    charts.scaling_chart(data.attention, "SelfAttention", "track_peakmem_forward", "cpu")
    [ax] = [a for a in drawn["fig"].axes if a.get_visible()]
    hollow = [ln for ln in ax.get_lines() if ln.get_markerfacecolor() in ("white", (1.0, 1.0, 1.0, 1.0))]
    assert len(hollow) == 1 and list(hollow[0].get_xdata()) == LENGTHS  # every point, in the line's order
    assert ax.collections  # each point's spread, as an error bar


def test_verify_ratios_are_shown_and_those_outside_the_range_flagged(tmp_path):
    lines = {("SelfAttention", "track_time_forward", "torch_sdpa"): quadratic(1e-3)}
    point = lambda L, plain: {"benchmark": "bench_attention.SelfAttention.track_time_forward", "quantity": "time",
                              "params": {"adapter": "torch_sdpa", "mode": "eager", "seq_len": L, "num_heads": 8,
                                         "device": "cpu"}, "median": 1e-3 * (L / 128) ** 2,
                              "verify": {"median": plain, "samples": 12, "paired_ratio": 1.0 if L != 2048 else 0.9}}
    root = write_results(tmp_path / "r", lines, points=[point(L, 1e-3 * (L / 128) ** 2 * (1.10 if L == 1024 else 1.0))
                                                        for L in LENGTHS])
    verify = collect(root).tables["verify"].set_index("L")
    assert verify.at[512, "ratio"] == pytest.approx(1.0) and verify.at[512, "flag"] == ""
    # the medians differ, but sample by sample the suite and the plain call agree: the load moved between them
    assert verify.at[1024, "ratio"] == pytest.approx(1 / 1.1) and verify.at[1024, "flag"] == ""
    assert verify.at[2048, "paired_ratio"] == 0.9 and verify.at[2048, "flag"] == "outside [0.95, 1.05]"
    assert "Timings checked against plain timing" in render_html(collect(root))


def test_charts_have_a_panel_per_family_with_the_reference_and_a_legend_ordered_by_the_last_value(scaled,
                                                                                                     monkeypatch):
    drawn = {}
    real = charts.to_data_uri

    def keep(fig):
        drawn["axes"] = [ax for ax in fig.axes if ax.get_visible()]
        drawn["legends"] = [[t.get_text() for t in ax.get_legend().get_texts()] for ax in drawn["axes"]]
        return real(fig)
    monkeypatch.setattr(charts, "to_data_uri", keep)
    data = collect(scaled)
    flagged = tables.flagged_lines(data.tables["scaling"])
    assert charts.scaling_chart(data.attention, "SelfAttention", "time_forward", "cpu", flagged).startswith("data:")
    titles = [ax.get_title() for ax in drawn["axes"]]
    assert sorted(titles) == ["jax", "tensorflow", "torch"]
    for legend in drawn["legends"]:
        assert any("torch_sdpa" in text and "(reference)" in text for text in legend)
        assert "O(L) guide" in legend and "O(L²) guide" in legend
    torch = drawn["legends"][titles.index("torch")]
    lines = [t for t in torch if "guide" not in t]
    assert lines[0].startswith("torch_mha") and lines[1].startswith("torch_sdpa")  # ordered by the value at 2048
    tensorflow = drawn["legends"][titles.index("tensorflow")]
    assert any(t.startswith("keras_mha") and "IMPLAUSIBLE" in t for t in tensorflow)
    assert charts.fraction_chart(data.attention, "SelfAttention", "track_gflops_forward", "cpu",
                                 {("m", "cpu"): 100.0}).startswith("data:")
