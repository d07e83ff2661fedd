"""The analysis pages clicked through in headless Chromium at the window sizes the issue names.

One server on a copy of the demo store for the whole module (starting one takes seconds).
Each test does what a quality engineer would: pick an image and see every method's map, toggle
the colour scale, move the operating point, download the report; one test reads the rendered
SVG text boxes of every chart and fails on any overlap. Screenshots go to
``tests/screenshots/`` (git-ignored).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from harmoniad.store import ResultStore
from tests.browser.svg_text import overlapping_text
from tests.browser.test_browser import CHROMIUM, CHROMIUM_ARGS, SCREENSHOTS, TIMEOUT_MS, running_app

pytestmark = pytest.mark.browser

SIZES = ((1280, 800), (1920, 1080))
MAPS = '.st-key-inspect_maps [data-testid="stPlotlyChart"]'
#: HarmoniAD's anomaly, high and low maps, PatchCore's and the frequency filter's (tests/fixtures/dashboard.py).
N_MAPS = 5


@pytest.fixture(scope="module")
def app(demo_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, str]]]:
    cache = tmp_path_factory.mktemp("browser") / "cache"
    shutil.copytree(demo_cache, cache)
    runs = ResultStore(cache / "runs").list_runs(status="complete")
    with running_app(cache) as url:
        yield url, dict(zip(runs["method"], runs["id"]))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.is_file(), f"{CHROMIUM} is missing: install Debian's chromium to run the browser tests"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def _open(browser: Browser, url: str, size: tuple[int, int] = SIZES[0]) -> Page:
    page = browser.new_page(viewport={"width": size[0], "height": size[1]}, accept_downloads=True)
    page.goto(url)
    _settle(page)
    return page


def _settle(page: Page) -> None:
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', timeout=TIMEOUT_MS)
    page.wait_for_timeout(800)
    exceptions = page.locator('[data-testid="stException"]')
    assert exceptions.count() == 0, exceptions.first.inner_text()


def _tall(page: Page) -> None:
    """Grow the viewport to the page's height so every chart is laid out and painted."""
    height = page.evaluate("() => document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
    page.set_viewport_size({"width": page.viewport_size["width"], "height": min(12000, int(height) + 40)})
    page.wait_for_timeout(1500)


def _screenshot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def _colourbar_ticks(page: Page, chart: int) -> list[str]:
    # SVG text has no innerText: read textContent (the tick labels, then the bar's title).
    return page.locator(MAPS).nth(chart).locator("g.colorbar text").evaluate_all(
        "els => els.map(e => e.textContent.trim()).filter(t => t)")


def _metric(page: Page, label: str) -> str:
    box = page.locator('[data-testid="stMetric"]').filter(has_text=label).first
    return box.locator('[data-testid="stMetricValue"]').inner_text()


def test_inspect_shows_every_method_and_the_colour_scale_toggle_changes_the_colour_bars(app, browser) -> None:
    url, ids = app
    page = _open(browser, f"{url}/inspect?run={ids['harmoniad']}")
    expect(page.locator(MAPS)).to_have_count(N_MAPS, timeout=TIMEOUT_MS)
    for i in range(N_MAPS):
        box = page.locator(MAPS).nth(i).locator("svg.main-svg").first.bounding_box()
        assert box is not None and box["width"] >= 384, f"map {i} is {box} wide at 1280x800 (needs >= 384 px)"
        ticks = _colourbar_ticks(page, i)
        numbers = [t for t in ticks if t.replace(".", "", 1).replace("−", "").replace("-", "").isdigit()]
        assert len(numbers) >= 3, f"map {i}: colour bar without values: {ticks}"
    _screenshot(page, "inspect-1280")

    shared = [_colourbar_ticks(page, i) for i in range(N_MAPS)]
    page.get_by_text("per map: raw scores, each map's own range").click()
    _settle(page)
    expect(page.locator(MAPS)).to_have_count(N_MAPS, timeout=TIMEOUT_MS)
    own = [_colourbar_ticks(page, i) for i in range(N_MAPS)]
    # Shared: one 0-100 percentile scale on every map; per map: each map's own raw range.
    assert all(ticks == shared[0] for ticks in shared) and shared[0][0] == "0" and "100" in shared[0], shared
    changed = [i for i in range(N_MAPS) if own[i] != shared[i]]
    assert len(changed) == N_MAPS, f"colour bars unchanged by the per-map scale: {shared} vs {own}"

    # Next image in the list: another image, still one map per method.
    before = page.locator(".st-key-inspect_maps").inner_text()
    page.get_by_role("button", name="Next").first.click()
    _settle(page)
    expect(page.locator(MAPS)).to_have_count(N_MAPS, timeout=TIMEOUT_MS)
    assert page.locator(".st-key-inspect_maps").inner_text() != before
    page.close()


def test_moving_the_operating_point_changes_the_failure_counts(app, browser) -> None:
    url, ids = app
    page = _open(browser, f"{url}/failures?run={ids['patchcore']}")
    expect(page.get_by_text("False positives").first).to_be_visible(timeout=TIMEOUT_MS)
    before = (_metric(page, "False positives"), _metric(page, "False negatives"))
    page.get_by_text("target false-positive rate").first.click()
    _settle(page)
    fpr = page.get_by_role("spinbutton", name="Target FPR (%)")
    fpr.fill("50")
    fpr.press("Enter")
    _settle(page)
    after = (_metric(page, "False positives"), _metric(page, "False negatives"))
    assert after != before, f"counts did not move with the threshold: {before} -> {after}"
    normals = int(after[0].split(" of ")[1])
    assert int(after[0].split(" of ")[0]) <= normals // 2  # at most 50% of the normal images flagged
    # Each card opens Inspect on that image.
    open_buttons = page.get_by_role("button", name="Open in Inspect")
    if open_buttons.count():
        open_buttons.first.click()
        expect(page.locator("h1", has_text="Inspect an image")).to_be_visible(timeout=TIMEOUT_MS)
    page.close()


def test_the_report_downloads_and_states_random_weights(app, browser, tmp_path: Path) -> None:
    url, ids = app
    page = _open(browser, f"{url}/export?run={ids['harmoniad']}")
    button = page.get_by_role("button", name="Download the HTML report")
    expect(button).to_be_visible(timeout=TIMEOUT_MS)
    with page.expect_download(timeout=TIMEOUT_MS) as download:
        button.click()
    path = tmp_path / "report.html"
    download.value.save_as(path)
    text = path.read_text()
    assert text.startswith("<!DOCTYPE html>") and "random weights: not a result" in text
    assert "Worst failures" in text and "data:image/png;base64," in text
    page.close()


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_no_chart_text_overlaps(app, browser, size: tuple[int, int]) -> None:
    url, ids = app
    for name in ("", "compare", "inspect", "failures", "export"):
        page = _open(browser, f"{url}/{name}?run={ids['harmoniad']}", size)
        _tall(page)
        problems = overlapping_text(page)
        _screenshot(page, f"{name or 'overview'}-{size[0]}")
        assert not problems, f"/{name} at {size}: " + "; ".join(problems[:10])
        page.close()
