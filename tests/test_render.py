"""The report page rendered by headless Chromium: not blank, charts present, no network needed."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

from tests.test_reports import fixture_report  # noqa: E402
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
WIDTH, HEIGHT = 1400, 4000


def screenshot(page: Path, png: Path, profile: Path) -> None:
    command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={WIDTH},{HEIGHT}",
               page.resolve().as_uri()]
    subprocess.run(command, check=True, capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return fixture_report(tmp_path_factory)


def test_page_is_self_contained(built):
    _, paths = built
    page = paths["html"].read_text()
    # no fetch of anything: every src/href is inline data or an in-page anchor (upstream links are plain <a>)
    sources = re.findall(r'\s(?:src)="([^"]*)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    assert "<link" not in page and "@import" not in page and "<script" not in page.lower()


def test_charts_are_in_the_page(built):
    data, paths = built
    page = paths["html"].read_text()
    charts = page.count('<img class="chart"') + page.count("<svg")
    classes = data.attention["class"].nunique()
    # per class: time and memory against L, GFLOP/s against L; plus the conformance status chart
    assert charts >= 3 * classes + 1


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install -y chromium)")
def test_rendered_page_is_not_blank(built, tmp_path):
    _, paths = built
    png = tmp_path / "page.png"
    screenshot(paths["html"], png, tmp_path / "profile")
    assert png.stat().st_size > 50_000  # a page of charts and tables, not an empty canvas
    pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert pixels.shape == (HEIGHT, WIDTH)
    assert pixels.std() > 10, "the rendered page is (nearly) one flat colour"
    # content reaches well down the page: the bottom half is not empty either
    rows_with_ink = (pixels < 200).any(axis=1)
    assert rows_with_ink[: HEIGHT // 2].mean() > 0.2 and rows_with_ink[HEIGHT // 2:].any()
