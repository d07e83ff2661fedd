"""First start of the dashboard on an empty cache: time to first render and to a finished demo.

Starts ``streamlit run dashboard/app.py`` against a fresh temporary cache (the real demo runs,
nothing is mocked), opens it in headless Chromium and prints:

- server start -> health endpoint answers;
- server start -> Overview rendered in the browser (with the demo's progress bar);
- server start -> demo finished (every demo method's run stored, ``demo.json`` written, the
  page says so).

Screenshots of the page during and after the demo go to ``benchmarks/out/`` (git-ignored).
Usage: ``python benchmarks/bench_dashboard_first_start.py [--timeout-min 20]``.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

from playwright.sync_api import TimeoutError as PlaywrightTimeout
from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parents[1]

from dashboard.bootstrap import MARKER
from harmoniad.demo import DEMO_METHODS
from harmoniad.store import ResultStore

OUT = REPO / "benchmarks" / "out"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _print_landed(cache: Path, started: datetime) -> None:
    """When each stored run was created and last updated, in seconds after the server started."""
    runs = ResultStore(cache / "runs").list_runs(check_stale=False)
    for _, run in runs.iloc[::-1].iterrows():
        created = (datetime.fromisoformat(run["created"]) - started).total_seconds()
        updated = (datetime.fromisoformat(run["updated"]) - started).total_seconds()
        print(f"  {run['method']:22s} created +{created:5.1f} s, {run['n_ok']} categories stored by +{updated:5.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout-min", type=float, default=20.0)
    parser.add_argument("--first-only", action="store_true", help="stop once the first results are on screen")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="harmoniad-first-start-") as tmp:
        cache = Path(tmp) / "cache"
        env = {k: v for k, v in os.environ.items() if k not in ("HARMONIAD_STORE", "HARMONIAD_NO_DEMO")}
        env["HARMONIAD_CACHE"] = str(cache)
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        log = (Path(tmp) / "streamlit.log").open("w+")
        t0 = time.monotonic()
        started = datetime.now(UTC)
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamlit", "run", "dashboard/app.py", "--server.port", str(port),
             "--server.headless", "true"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
        try:
            while True:
                try:
                    with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                        if r.read().strip() == b"ok":
                            break
                except OSError:
                    time.sleep(0.1)
                if proc.poll() is not None:
                    raise SystemExit(f"streamlit exited with {proc.returncode}")
            t_health = time.monotonic() - t0
            print(f"server start -> /_stcore/health ok:        {t_health:7.1f} s", flush=True)
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1400, "height": 1100})
                page.goto(url)
                page.locator("h1", has_text="Overview").first.wait_for(timeout=120_000)
                print(f"server start -> Overview rendered:          {time.monotonic() - t0:7.1f} s", flush=True)
                page.locator('[data-testid="stProgress"]').first.wait_for(timeout=60_000)
                print(f"server start -> demo progress bar shown:    {time.monotonic() - t0:7.1f} s", flush=True)
                page.get_by_text("Values in percent").first.wait_for(timeout=int(args.timeout_min * 60_000))
                t_first = time.monotonic() - t0
                print(f"server start -> first measured results:     {t_first:7.1f} s", flush=True)
                page.screenshot(path=str(OUT / "first-start-first-results.png"), full_page=True)
                if args.first_only:
                    browser.close()
                    _print_landed(cache, started)
                    return
                page.wait_for_timeout(20_000)
                page.screenshot(path=str(OUT / "first-start-demo-running.png"))
                try:
                    page.get_by_text("Offline demo finished").first.wait_for(timeout=int(args.timeout_min * 60_000))
                except PlaywrightTimeout:
                    print(f"demo not finished after {time.monotonic() - t0:.0f} s (timeout)", flush=True)
                else:
                    print(f"server start -> page says demo finished:    {time.monotonic() - t0:7.1f} s", flush=True)
                page.wait_for_timeout(3_000)
                page.screenshot(path=str(OUT / "first-start-demo-end.png"), full_page=True)
                browser.close()
            runs = ResultStore(cache / "runs").list_runs(check_stale=False)
            complete = runs[runs["status"] == "complete"]
            print(f"runs stored: {len(runs)} ({len(complete)} complete) of {len(DEMO_METHODS)} demo methods; "
                  f"{MARKER} written: {(cache / 'runs' / MARKER).exists()}")
            for _, run in runs.iloc[::-1].iterrows():
                print(f"  {run['method']:22s} {run['status']:9s} {run['n_ok']}/{len(run['categories'])} categories, "
                      f"created {run['created'][11:19]}, last update {run['updated'][11:19]}")
            print(f"screenshots: {OUT}/first-start-demo-*.png")
        finally:
            proc.terminate()
            proc.wait(15)
            log.close()


if __name__ == "__main__":
    main()
