"""The dashboard in a real browser: `streamlit run dashboard/app.py` driven by headless Chromium.

Needs Debian's ``chromium`` at /usr/bin/chromium (``.ci/run`` installs it). The test fails,
rather than skips, when it is missing: a silently skipped browser test proves nothing.
Screenshots of every page go to ``tests/screenshots/`` (git-ignored).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect, sync_playwright

from harmoniad.store import ResultStore
from tests.paths import REPO as _REPO

pytestmark = pytest.mark.browser

REPO = _REPO
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SCREENSHOTS = REPO / "tests" / "screenshots"
RANDOM_BANNER = "Random backbone weights"
WIDTH = 1400
MAX_HEIGHT = 6000
TIMEOUT_MS = 60_000

#: URL path (as st.navigation assigns it) -> (screenshot name, page title, selectors that must be
#: present (with a minimum count), texts that must be shown).
PAGES: dict[str, tuple[str, str, dict[str, int], tuple[str, ...]]] = {
    "": ("overview", "Overview", {'[data-testid="stDataFrame"]': 3}, (RANDOM_BANNER, "Published results")),
    "run": ("run", "Run", {'[data-testid="stTextInput"]': 1}, ("Found 2 categories", "Start evaluation")),
    "compare": ("compare", "Compare methods", {'[data-testid="stPlotlyChart"]': 1}, (RANDOM_BANNER,)),
    "inspect": ("inspect", "Inspect an image", {'.st-key-inspect_maps [data-testid="stPlotlyChart"]': 5}, (RANDOM_BANNER,)),
    "failures": ("failures", "Failure cases", {'[data-testid="stImage"]': 1}, (RANDOM_BANNER,)),
    "export": ("export", "Export", {'[data-testid="stDownloadButton"]': 4, '[data-testid="stPlotlyChart"]': 1},
               (RANDOM_BANNER, "Per-image scores (CSV)")),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def running_app(cache: Path) -> Iterator[str]:
    """``streamlit run dashboard/app.py`` from the repo root (so .streamlit/config.toml applies) on
    the results store under ``cache``; yields its URL and checks its log when it stops."""
    port = _free_port()
    env = {**os.environ, "HARMONIAD_NO_DEMO": "1", "HARMONIAD_CACHE": str(cache),
           "HARMONIAD_STORE": str(cache / "runs")}
    log = (cache / "streamlit.log").open("w+")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "dashboard/app.py",
         "--server.port", str(port), "--server.headless", "true"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"streamlit exited with {proc.returncode}:\n{log.read()}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("streamlit did not answer /_stcore/health within 60 s")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)
        log.seek(0)
        output = log.read()
        log.close()
    assert "Traceback" not in output, f"the server logged an error:\n{output}"
    # .streamlit/config.toml (read from the working folder) applied: loopback only, no telemetry.
    assert f"127.0.0.1:{port}" in output, output
    assert "usage statistics" not in output.lower(), output


@pytest.fixture
def server(demo_store: ResultStore) -> Iterator[str]:
    with running_app(demo_store.root.parent) as url:
        yield url


def _settle(page: Page, title: str) -> None:
    """Wait until the page's title is shown and the script has finished running."""
    expect(page.locator("h1", has_text=title).first).to_be_visible(timeout=TIMEOUT_MS)
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=TIMEOUT_MS)
    page.wait_for_timeout(500)  # let charts and images paint


def _screenshot(page: Page, name: str) -> Path:
    """The whole page: Streamlit scrolls inside its main block, so grow the viewport to fit it."""
    height = page.evaluate("() => document.querySelector('[data-testid=\"stMain\"]')?.scrollHeight ?? 1000")
    page.set_viewport_size({"width": WIDTH, "height": min(MAX_HEIGHT, max(900, int(height) + 40))})
    page.wait_for_timeout(400)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path))
    page.set_viewport_size({"width": WIDTH, "height": 1000})
    return path


def _check_page(page: Page, url: str, path: str) -> None:
    name, title, selectors, texts = PAGES[path]
    page.goto(f"{url}/{path}")
    _settle(page, title)
    exceptions = page.locator('[data-testid="stException"]')
    assert exceptions.count() == 0, f"{name}: Streamlit exception shown: {exceptions.first.inner_text()}"
    for selector, minimum in selectors.items():
        # Data frames and charts mount a moment after the script ends: wait for them, then check.
        try:
            page.wait_for_function("([s, n]) => document.querySelectorAll(s).length >= n", arg=[selector, minimum],
                                   timeout=TIMEOUT_MS)
        except Exception:  # noqa: BLE001 - reported by the assertion below
            pass
        assert page.locator(selector).count() >= minimum, f"{name}: fewer than {minimum} of {selector}"
    body = page.locator('[data-testid="stMain"]').inner_text()
    for text in texts:
        assert text in body, f"{name}: {text!r} not shown"
    sidebar = page.locator('[data-testid="stSidebar"]')
    expect(sidebar.get_by_text("Results store")).to_be_visible()
    _screenshot(page, name)


def test_every_page_renders_in_chromium(server: str) -> None:
    assert CHROMIUM.is_file(), (
        f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium; .ci/run does) "
        "to run the browser tests"
    )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": WIDTH, "height": 1000})
            for path in PAGES:
                _check_page(page, server, path)

            # Navigation through the menu keeps working, and the Run page validates the root as typed.
            page.goto(server)
            _settle(page, "Overview")
            page.locator('[data-testid="stSidebarNav"]').get_by_text("Run", exact=True).click()
            _settle(page, "Run")
            assert page.url.rstrip("/").endswith("/run")
            root = page.get_by_role("textbox", name="Root folder")
            root.fill("/nonexistent/harmoniad-data")
            root.press("Enter")
            expect(page.get_by_text("dataset root does not exist")).to_be_visible(timeout=TIMEOUT_MS)
            expect(page.get_by_role("button", name="Start evaluation")).to_be_disabled()
            assert page.locator('[data-testid="stException"]').count() == 0
            _screenshot(page, "run-bad-root")
        finally:
            browser.close()
