"""A real headless Chromium opens the served dashboard: every tab, every chart, as a person sees it.

Screenshots of each tab are kept as test artifacts in ``$JOULE_OTEL_ARTIFACTS`` (default
``test-artifacts/`` in the checkout): look at them.
"""

from __future__ import annotations

import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from joule_otel.ledger import _schema as schema
from joule_otel.ledger._compact import compact
from joule_otel.ledger._spool import Spool
from joule_otel.ledger._writer import rows_to_arrow

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None and not os.environ.get("CI"):
    pytest.skip(
        "Debian's chromium is not installed (apt-get install chromium); .ci/run installs it", allow_module_level=True
    )

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = Path(os.environ.get("JOULE_OTEL_ARTIFACTS", ROOT / "test-artifacts"))
TABS = ["Overview", "Router", "Carbon", "Efficiency", "Budgets", "Migration", "What if", "Receipts", "Bill"]
SUB_SECOND_TICK = re.compile(r"\d:\d\d:\d\d|\.\d{3}\b|\d{1,2}:\d\d\s*(AM|PM)?$")
"""A time tick that shows seconds or milliseconds (or a time of day, on an axis of days)."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_dashboard(tmp_path: Path, env_extra: dict[str, str]) -> tuple[subprocess.Popen[str], str]:
    port = free_port()
    env = dict(os.environ, XDG_DATA_HOME=str(tmp_path / "xdg"), HOME=str(tmp_path), **env_extra)
    if "JOULE_OTEL_DB" not in env_extra:
        env.pop("JOULE_OTEL_DB", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "joule_otel._cli", "dashboard", "--no-browser", "--port", str(port)],
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
                    return proc, url
        except OSError:
            time.sleep(0.3)
    proc.kill()
    pytest.fail("the dashboard did not start: " + (proc.stdout.read() if proc.stdout else ""))


@pytest.fixture(scope="module")
def demo_ledger(tmp_path_factory) -> tuple[Path, Path]:
    """A demo's ledger and budgets: ten days of history and today's traffic, through the real capture path."""
    folder = tmp_path_factory.mktemp("demo")
    db = folder / "demo.duckdb"
    env = dict(os.environ, XDG_DATA_HOME=str(folder / "xdg"))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "joule_otel._cli",
            "demo",
            "--no-dashboard",
            "--calls",
            "80",
            "--history-days",
            "7",
            "--db",
            str(db),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return db, db.with_name("demo-budgets.json")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(
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
        yield chromium
        chromium.close()


def open_page(browser, url: str, timezone_id: str = "UTC"):
    context = browser.new_context(viewport={"width": 1600, "height": 1300}, timezone_id=timezone_id)
    page = context.new_page()
    page.goto(url, wait_until="networkidle")  # warm-up: the first visit of a cold server renders half a page
    page.wait_for_selector("[data-testid='stMetric']", timeout=90_000)
    page.goto(url, wait_until="networkidle")
    page.wait_for_selector("[data-testid='stMetric']", timeout=90_000)
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 2", timeout=90_000)
    return page


CHARTS_DRAWN = """() => {
    const panel = [...document.querySelectorAll("[role='tabpanel']")].find(p => p.offsetParent !== null);
    return panel && [...panel.querySelectorAll('.js-plotly-plot')].every(plot => plot.querySelector('.main-svg'));
}"""
"""The visible tab's charts have all drawn."""
TABLES_WIDER_THAN_THEIR_BOX = """() => {
    const panel = [...document.querySelectorAll("[role='tabpanel']")].find(p => p.offsetParent !== null);
    return [...panel.querySelectorAll('[data-testid=stDataFrame] .dvn-scroller')]
        .filter(s => s.scrollWidth > s.clientWidth + 1).map(s => [s.scrollWidth, s.clientWidth]);
}"""


def visit_tabs(page, name: str, tabs: list[str] = TABS) -> dict[str, str]:
    """Click each tab, wait for its charts, save a screenshot; the text each tab shows."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    seen = {}
    for tab in tabs:
        page.get_by_role("tab", name=tab).click()
        page.wait_for_function(CHARTS_DRAWN, timeout=30_000)
        page.wait_for_timeout(300)  # plotly's transitions settle before the screenshot
        panel = page.locator("[role='tabpanel']:visible")
        seen[tab] = panel.inner_text()
        page.screenshot(path=str(ARTIFACTS / f"{name}-{tab.lower().replace(' ', '-')}.png"), full_page=True)
    page.get_by_role("tab", name="Overview").click()
    return seen


def time_axis_ticks(page) -> list[str]:
    """The x tick labels of the energy-over-time chart (the first chart of the Overview), once it has drawn them."""
    ticks = page.locator("[role='tabpanel']:visible .js-plotly-plot").first.locator(".xtick text")
    ticks.first.wait_for(state="attached", timeout=90_000)  # other charts may be drawn before this one
    return ticks.all_text_contents()


def test_every_tab_of_the_demo_ledger_draws(demo_ledger, browser, tmp_path):
    db, budgets = demo_ledger
    bill = db.with_name("demo-bill.csv")
    proc, url = serve_dashboard(
        tmp_path, {"JOULE_OTEL_DB": str(db), "JOULE_OTEL_BUDGETS": str(budgets), "JOULE_OTEL_BILL": str(bill)}
    )
    try:
        page = open_page(browser, url, timezone_id="Asia/Kolkata")
        body = page.inner_text("body")
        calls_shown = page.locator("[data-testid='stMetric']").nth(2).inner_text()
        seen = visit_tabs(page, "demo")
        page.get_by_role("tab", name="Bill").click()
        page.get_by_text("Billed but in no ledger").wait_for(timeout=60_000)  # the bill is read on first view
        seen["Bill"] = page.inner_text("body")
        page.screenshot(path=str(ARTIFACTS / "demo-bill.png"), full_page=True)
        page.set_viewport_size({"width": 1280, "height": 1000})  # a laptop: every table fits, none scrolls sideways
        page.wait_for_timeout(500)
        wider = {}
        for tab in ("Budgets", "What if", "Migration", "Efficiency"):
            page.get_by_role("tab", name=tab).click()
            page.wait_for_function(CHARTS_DRAWN, timeout=30_000)
            wider[tab] = page.evaluate(TABLES_WIDER_THAN_THEIR_BOX)
        page.set_viewport_size({"width": 1600, "height": 1300})
        page.get_by_role("tab", name="Overview").click()
        ticks = time_axis_ticks(page)
        page.goto(url + "/?range=Last+24+hours&tz=UTC", wait_until="networkidle")
        page.wait_for_selector("[data-testid='stMetric']", timeout=90_000)
        page.wait_for_function("document.querySelectorAll('.js-plotly-plot .main-svg').length >= 2", timeout=90_000)
        page.screenshot(path=str(ARTIFACTS / "demo-last-24-hours.png"), full_page=True)
        hour_ticks = time_axis_ticks(page)
    finally:
        proc.terminate()
        proc.communicate(timeout=15)  # reads and closes the pipe: no unclosed file left for the collector
    assert "Traceback" not in body
    assert wider == {tab: [] for tab in wider}, f"at 1280 px these tables scroll sideways: {wider}"
    assert "Asia/Kolkata" in body or "Asia/Calcutta" in body, "the page says which zone it uses (the browser's)"
    from joule_otel.ledger import _reader as reader

    with reader.connect(db) as con:
        in_ledger = con.execute("SELECT count(*) FROM inference_calls").fetchone()[0]
    assert f"{in_ledger:,}" in calls_shown, "the default range shows every call of the period, in +05:30 too"
    assert ticks and not any(SUB_SECOND_TICK.search(t) for t in ticks), f"an axis of days shows days: {ticks}"
    assert any(":" in t for t in hour_ticks), f"an axis of a day shows hours: {hour_ticks}"
    assert not any(re.search(r":\d\d:\d\d", t) for t in hour_ticks), hour_ticks
    for tab in TABS:
        assert "Traceback" not in seen[tab], tab
        assert "energy_j" not in seen[tab] and "cumulative_j" not in seen[tab], f"raw column names on {tab}"
    assert "Joule Cloud refused calls with 402" in seen["Budgets"], "the 402s the service enforced are said"
    assert "Share of calls still on another provider" in seen["Migration"] and "EcoLogits" in seen["Migration"]
    assert "Choose a model, tier or region" in seen["What if"]
    # the demo's cron script, with no joule-otel, is on the bill and in no ledger: the tab names its key
    assert "Billed but in no ledger" in seen["Bill"], seen["Bill"][-3000:]
    assert "jc_…c41f" in seen["Bill"], seen["Bill"][-3000:]
    assert all((ARTIFACTS / f"demo-{t.lower().replace(' ', '-')}.png").stat().st_size > 30_000 for t in TABS)


def test_sample_data_in_a_browser_in_newfoundland(browser, tmp_path):
    proc, url = serve_dashboard(tmp_path, {})
    try:
        page = open_page(browser, url, timezone_id="America/St_Johns")
        body = page.inner_text("body")
        seen = visit_tabs(page, "sample")
        ticks = time_axis_ticks(page)
        calls_shown = page.locator("[data-testid='stMetric']").nth(2).inner_text()
    finally:
        proc.terminate()
        proc.communicate(timeout=15)  # reads and closes the pipe: no unclosed file left for the collector
    import duckdb

    from joule_otel.dashboard._sources import SAMPLE_PATH

    total = duckdb.connect().execute(f"SELECT count(*) FROM '{SAMPLE_PATH}'").fetchone()[0]
    assert f"{total:,}" in calls_shown, "every call of the sample is in the default range, in any zone"
    assert "Bundled sample data" in body and "America/St_Johns" in body
    assert ticks and not any(SUB_SECOND_TICK.search(t) for t in ticks), ticks
    assert "Traceback" not in "".join(seen.values())


class _Counting(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:
        type(self).hits.append(self.path)
        self.send_response(404)
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_values_from_the_ledger_are_text_never_markup(browser, tmp_path):
    """A region of ``![b](url)`` fetches nothing; a model holding ``<a href>`` is no link, anywhere."""
    trap = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Counting)
    threading.Thread(target=trap.serve_forever, daemon=True).start()
    bait = f"http://127.0.0.1:{trap.server_address[1]}"
    hostile_region = f"![b]({bait}/markdown.png)"
    hostile_model = f'<a href="{bait}/link">click</a><img src="{bait}/img.png">'
    db = tmp_path / "hostile.duckdb"
    now = datetime.now(timezone.utc) - timedelta(minutes=5)
    rows = []
    for i in range(6):
        record = dict.fromkeys(schema.COLUMN_NAMES)
        record.update(
            receipt_id=f"rcpt_{i}",
            started_at=int((now - timedelta(hours=i)).timestamp() * 1_000_000),
            workload=f"**bold** [x]({bait}/wl)",
            service="svc",
            provider="joule_cloud",
            requested_model=hostile_model,
            routed_to=hostile_model,
            region=hostile_region,
            tier="standard",
            energy_j=10.0 + i,
            carbon_mg=1.0,
            input_tokens=10,
            output_tokens=20,
            status_code=200,
            duration_ms=100.0,
            operation="chat",
            stream=False,
        )
        rows.append(tuple(record[name] for name in schema.COLUMN_NAMES))
    Spool(db).write_segment(rows_to_arrow(rows))
    compact(db)
    proc, url = serve_dashboard(tmp_path, {"JOULE_OTEL_DB": str(db)})
    try:
        page = open_page(browser, url)
        # the tabs that draw these values (labels, legends, hovers, treemap, sankey): none fetched or linked
        seen = visit_tabs(page, "hostile", ["Overview", "Router", "Carbon", "Efficiency", "Receipts"])
        page.get_by_role("tab", name="Carbon").click()
        page.wait_for_timeout(1000)
        links = page.eval_on_selector_all("a", "els => els.map(e => e.getAttribute('href'))")
        carbon_text = page.locator("[role='tabpanel']:visible").inner_text()
        images = page.eval_on_selector_all("img", "els => els.map(e => e.getAttribute('src'))")
    finally:
        proc.terminate()
        proc.communicate(timeout=15)  # reads and closes the pipe: no unclosed file left for the collector
        trap.shutdown()
    assert _Counting.hits == [], f"the browser fetched what a ledger value asked: {_Counting.hits}"
    assert not any(bait in (href or "") for href in links), links
    assert not any(bait in (src or "") for src in images), images
    assert f"({hostile_region})" in carbon_text, "the value is shown as it is, as text"
    assert all("Traceback" not in text for text in seen.values())
