"""The report page rendered by headless Chromium: not blank, charts present, no network needed, and the
inline script's filters and sorting driven by real clicks.

Chromium is driven over its DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages
ending in NUL on file descriptors 3 and 4), with the standard library only.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

from mhabench import reports  # noqa: E402
from tests.test_reports import MIXED, _copy, fixture_report, raw_rows  # noqa: E402

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
WIDTH, HEIGHT = 1400, 4000
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
NO_CHROMIUM = "no chromium on PATH (Debian: apt-get install -y chromium)"
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason=NO_CHROMIUM)


class Browser:
    """One headless Chromium tab, driven over the DevTools protocol on a pipe."""

    def __init__(self, profile: Path):
        to_chromium, from_us = os.pipe()
        to_us, from_chromium = os.pipe()
        # --remote-debugging-pipe reads fd 3 and writes fd 4. The ends move to 10 and up first, so that neither
        # is 3 or 4 already; they are not inheritable, so only 3 and 4 reach chromium (close_fds=False keeps
        # those two, which the child makes after the fork)
        ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_chromium, from_chromium)]
        os.close(to_chromium)
        os.close(from_chromium)

        def on_fds_3_and_4():
            os.dup2(ends[0], 3)
            os.dup2(ends[1], 4)
        self.process = subprocess.Popen([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe",
                                         f"--window-size={WIDTH},1200", "about:blank"], close_fds=False,
                                        preexec_fn=on_fds_3_and_4, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        for fd in ends:
            os.close(fd)
        self.writer, self.reader = os.fdopen(from_us, "wb"), to_us
        self.buffer, self.events, self.last_id = b"", [], 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", session=True)

    def call(self, method: str, session: bool = False, **params) -> dict:
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        self.writer.write(json.dumps(message).encode() + b"\0")
        self.writer.flush()
        while True:
            reply = self._next()
            if reply.get("id") == self.last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def _next(self) -> dict:
        while b"\0" not in self.buffer:
            chunk = os.read(self.reader, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, page: Path) -> None:
        self.events.clear()
        self.call("Page.navigate", session=True, url=page.resolve().as_uri())
        while not any(e.get("method") == "Page.loadEventFired" for e in self.events):
            self.events.append(self._next())

    def js(self, expression: str):
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def click(self, selector: str) -> None:
        """A real mouse click at the middle of the element (scrolled into view first)."""
        box = self.js(f"(function(){{var e=document.querySelector({json.dumps(selector)});e.scrollIntoView();"
                      "var r=e.getBoundingClientRect();return [r.x+r.width/2,r.y+r.height/2];})()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", session=True, type=kind, x=box[0], y=box[1], button="left",
                      clickCount=1)

    def close(self) -> None:
        try:
            self.call("Browser.close")
        except (RuntimeError, OSError):
            pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def screenshot(page: Path, png: Path, profile: Path) -> None:
    command = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", f"--screenshot={png}", f"--window-size={WIDTH},{HEIGHT}",
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
    assert "<link" not in page and "@import" not in page
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page, flags=re.S)
    assert len(scripts) == 1 and scripts[0][0] == ""  # one inline script, nothing loaded
    assert not re.search(r"https?:|fetch|XMLHttpRequest|import\(", scripts[0][1])


def test_charts_are_in_the_page(built):
    data, paths = built
    page = paths["html"].read_text()
    charts = page.count('<img class="chart"') + page.count("<svg")
    classes = data.attention["class"].nunique()
    # per class: time and memory against L, GFLOP/s against L; plus the conformance status chart
    assert charts >= 3 * classes + 1


@needs_chromium
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


# --- the inline script, driven by clicks ---------------------------------------------------------

@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if CHROMIUM is None:
        pytest.skip(NO_CHROMIUM)
    chromium = Browser(tmp_path_factory.mktemp("chromium-profile"))
    yield chromium
    chromium.close()


@pytest.fixture(scope="module")
def mixed_page(tmp_path_factory):
    _, paths = reports.build_report(MIXED, tmp_path_factory.mktemp("mixed-page"))
    return paths["html"]


VISIBLE_ROWS = "Array.from(document.querySelectorAll('tr.f')).filter(function(r){return !r.closest('[hidden]')})"


def test_filters_hide_rows_when_clicked(browser, mixed_page):
    browser.open(mixed_page)
    rows = raw_rows(MIXED)
    not_passing = [r for r in rows if r["status"] != "pass"]
    assert browser.js("document.getElementById('filters').hidden") is False  # the script showed the bar
    assert browser.js("document.getElementById('fcount').textContent") == \
        f"{len(not_passing)} of {len(not_passing)} rows shown"
    # choose an adapter (what picking an option does: a new value and a change event) ...
    browser.js("var s=document.querySelector('#filters select[name=adapter]');s.value='torch_mha';"
               "s.dispatchEvent(new Event('change'))")
    mine = Counter(r["status"] for r in not_passing if r["adapter"] == "torch_mha")
    assert set(mine) == {"divergence", "unsupported"}
    assert browser.js("document.getElementById('fcount').textContent").startswith(f"{sum(mine.values())} of ")
    assert set(browser.js(VISIBLE_ROWS + ".map(function(r){return r.dataset.adapter})")) == {"torch_mha"}
    # ... then click the divergence status off: only the unsupported rows of torch_mha are left
    browser.click("#filters button[data-status=divergence]")
    assert browser.js("document.querySelector('#filters button[data-status=divergence]')"
                      ".getAttribute('aria-pressed')") == "false"
    assert browser.js("document.getElementById('fcount').textContent").startswith(f"{mine['unsupported']} of ")
    shown = browser.js(VISIBLE_ROWS + ".map(function(r){return +(r.dataset.n||1)})")
    assert sum(shown) == mine["unsupported"]
    # a divergence entry with no row left is hidden as a whole; the failures of other adapters are gone
    assert browser.js("Array.from(document.querySelectorAll('details.fg[id^=div-]'))"
                      ".every(function(d){return d.hidden})") is True
    assert browser.js("document.querySelectorAll('#filters ~ table tr.f:not([hidden])').length") == 0
    browser.click("#filters button[data-status=divergence]")  # and back
    assert browser.js("document.getElementById('fcount').textContent").startswith(f"{sum(mine.values())} of ")


def test_clicking_a_heading_sorts_the_column(browser, mixed_page):
    browser.open(mixed_page)
    heading = "h3#failures + table th:nth-child(1)"
    column = "Array.from(document.querySelectorAll('h3#failures + table tbody tr')).map(function(r){" \
             "return r.cells[%d].textContent})"
    names = browser.js("Array.from(document.querySelectorAll('h3#failures + table th')).map(function(h){"
                       "return h.textContent})")
    ratio = names.index("error_ratio")
    browser.click(heading.replace("nth-child(1)", f"nth-child({ratio + 1})"))
    values = [float(v) if v else float("inf") for v in browser.js(column % ratio)]
    finite = [v for v in values if v != float("inf")]
    assert finite and finite == sorted(finite) and values[:len(finite)] == finite  # numbers ascending, blanks last
    browser.click(heading.replace("nth-child(1)", f"nth-child({ratio + 1})"))
    again = [float(v) if v else float("inf") for v in browser.js(column % ratio)]
    assert [v for v in again if v != float("inf")] == sorted(finite, reverse=True)


def test_merged_page_of_two_machines(browser, tmp_path):
    a, b = _copy(MIXED, tmp_path / "a"), _copy(MIXED, tmp_path / "b")
    _, paths = reports.build_report([a, b], tmp_path / "out", machines=["cpu-box", "gpu-box"])
    browser.open(paths["html"])
    section = browser.js("document.getElementById('machines').parentNode.innerText")
    assert "cpu-box" in section and "gpu-box" in section
    heads = browser.js("Array.from(document.querySelectorAll('#machines ~ table th')).map(function(h){"
                       "return h.textContent})")
    assert "cpu-box" in heads and "gpu-box" in heads  # one matrix row per machine x device
    assert browser.js("document.getElementById('machines').getBoundingClientRect().height") > 0
    options = browser.js("Array.from(document.querySelectorAll('#filters select[name=machine] option'))"
                         ".map(function(o){return o.value})")
    assert options == ["", "cpu-box", "gpu-box"]
    png = tmp_path / "merged.png"
    screenshot(paths["html"], png, tmp_path / "profile")
    pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert pixels.std() > 10
