"""A real headless Chromium loads the served dashboard and the charts draw."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip(
        "Debian's chromium is not installed (apt-get install chromium); .ci/run installs it", allow_module_level=True
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def served_dashboard(tmp_path):
    port = free_port()
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "xdg"), HOME=str(tmp_path))
    env.pop("JOULE_OTEL_DB", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "joule_otel.cli", "dashboard", "--no-browser", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/_stcore/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            time.sleep(0.3)
    else:
        proc.kill()
        pytest.fail("the dashboard did not start: " + (proc.stdout.read() if proc.stdout else ""))
    yield url
    proc.terminate()
    proc.wait(timeout=15)


def test_dashboard_renders_in_headless_chromium(served_dashboard, tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": 1600, "height": 1400})
        # warm-up: the first visit of a cold server renders half a page
        page.goto(served_dashboard, wait_until="networkidle")
        page.wait_for_selector(".js-plotly-plot", timeout=60_000)
        page.goto(served_dashboard, wait_until="networkidle")
        page.wait_for_selector("[data-testid='stMetric']", timeout=60_000)
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 6", timeout=60_000)
        text = page.inner_text("body")
        drawn = page.eval_on_selector_all(".js-plotly-plot .main-svg", "els => els.length")
        bars = page.eval_on_selector_all(".js-plotly-plot g.point path", "els => els.length")
        page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
        browser.close()
    assert "Where your joules go" in text
    assert "Energy" in text and "MJ" in text
    assert "Bundled sample data" in text
    assert "Traceback" not in text
    assert drawn >= 6
    assert bars > 20, "the bar charts drew their bars"
    assert (tmp_path / "dashboard.png").stat().st_size > 50_000
