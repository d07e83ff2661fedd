"""First start: generate the synthetic dataset and run the offline demo, exactly once.

The demo starts by itself when the store has no runs, ``HARMONIAD_NO_DEMO`` is not set and
the demo has not run for this store before. It runs as a background :class:`~dashboard.jobs.Job`
(see ``jobs.py`` for why a thread and polling), so the first page renders at once and shows
the demo's progress bar with time left; each method's results appear as it finishes.

Why it never runs twice:
- a reload or a second tab in the same server finds the running job by its id on the
  process-wide job board (``demo:<store folder>``) instead of starting another;
- two server processes on one cache: the job holds an exclusive ``flock`` on
  ``<store>/demo.lock`` while it works; the other process's job waits for the lock, then
  finds the demo done and stops;
- once it has run (finished, failed or cancelled) ``<store>/demo.json`` says so, so deleting
  every run later does not start it again (the Overview and Run pages offer a button).
A process killed during the demo leaves no ``demo.json``: if it had stored no run yet, the
next start runs the demo again; runs it had open are reported as interrupted by the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import streamlit as st

from dashboard.jobs import Job, announce_evaluation, board, show_ended, show_job
from harmoniad.runtime.atomic import atomic_write_text
from harmoniad.data import ensure_synthetic
from harmoniad.demo import DEMO_METHODS, demo_request, run_demo
from harmoniad.methods import METHODS
from harmoniad.runtime.progress import ProgressEvent, ProgressFn
from harmoniad.store import ResultStore

NO_DEMO_ENV = "HARMONIAD_NO_DEMO"
MARKER = "demo.json"
LOCK = "demo.lock"
TITLE = "Offline demo"
_LOCK_POLL_S = 1.0


def demo_job_id(store_root: Path) -> str:
    return f"demo:{Path(store_root).resolve()}"


def demo_disabled() -> bool:
    """True when ``HARMONIAD_NO_DEMO`` is set to anything but empty or ``0`` (tests, CI)."""
    return os.environ.get(NO_DEMO_ENV, "").strip() not in ("", "0")


def demo_has_run(store_root: Path) -> bool:
    return (Path(store_root) / MARKER).exists()


def auto_demo_wanted(store: ResultStore) -> bool:
    """Start the demo by itself? Only on a first start: no runs, never ran, not disabled."""
    if demo_disabled() or demo_has_run(store.root):
        return False
    return store.list_runs(limit=1, check_stale=False).empty


def start_demo(store_root: Path, *, again: bool = False) -> Job:
    """Start the demo job for ``store_root`` (or return the one already running).

    ``again`` runs it even if it ran before (the button); the automatic first start doesn't.
    """
    work = functools.partial(_demo_work, again=again)
    job, _ = board().start(demo_job_id(store_root), TITLE, work, Path(store_root))
    return job


@contextlib.contextmanager
def _exclusive(path: Path, progress: ProgressFn) -> Iterator[None]:
    """Hold an exclusive lock on ``path``, reporting (and staying cancellable) while waiting."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        t0 = time.monotonic()
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - t0
                progress(ProgressEvent("waiting for the demo running in another dashboard process", 0, 1, waited, None))
                time.sleep(_LOCK_POLL_S)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _demo_work(store: ResultStore, progress: ProgressFn, *, again: bool = False) -> str:
    """Generate the synthetic data, evaluate the demo methods, then leave ``demo.json``."""
    with _exclusive(store.root / LOCK, progress):
        if not again and demo_has_run(store.root):
            return "Another dashboard process ran the demo; its results are shown."
        started = datetime.now(UTC).isoformat(timespec="seconds")
        outcome = "interrupted"
        try:
            ensure_synthetic(progress=progress)
            announce_evaluation(demo_request(), progress)
            run_ids = run_demo(store, progress)
            outcome = "finished"
        except BaseException as exc:
            outcome = f"stopped: {type(exc).__name__}"
            raise
        finally:
            record = {"started": started, "ended": datetime.now(UTC).isoformat(timespec="seconds"),
                      "outcome": outcome, "methods": list(DEMO_METHODS)}
            atomic_write_text(store.root / MARKER, json.dumps(record, indent=2) + "\n")
    return f"{len(run_ids)} method runs stored."


# ---------------------------------------------------------------------- display
def demo_panel(store: ResultStore) -> None:
    """On first start, start the demo; while it runs, show its progress (every page calls this)."""
    job_id = demo_job_id(store.root)
    job = board().get(job_id)
    if job is None and auto_demo_wanted(store):
        job = start_demo(store.root)
    if job is None:
        return
    snap = job.snapshot()
    watched = f"_demo_watched_{job_id}"
    if snap.running:
        st.session_state[watched] = True
        names = ", ".join(METHODS[m].label for m in DEMO_METHODS if m in METHODS)
        st.info(
            "**First start: running the offline demo.** HarmoniAD generates a small synthetic "
            f"dataset and evaluates {names} on a tiny CLIP backbone with **random weights** (no "
            "download). Results appear as each category is scored, fastest methods first; the numbers only show that the "
            "pipeline works, not how good a method is.",
            icon=":material/rocket_launch:",
        )
        show_job(job, key="demo")
    elif st.session_state.get(watched):
        # Only the session that watched it is told how it ended (once, until dismissed).
        show_ended(snap)
        if st.button("Dismiss", key="demo-dismiss"):
            st.session_state[watched] = False
            st.rerun()


def demo_button(store: ResultStore, *, key: str) -> None:
    """A button to (re)run the offline demo on demand."""
    job = board().get(demo_job_id(store.root))
    busy = job is not None and job.running
    label = "Run the offline demo" if not demo_has_run(store.root) else "Run the offline demo again"
    if st.button(label, key=key, disabled=busy, icon=":material/rocket_launch:",
                 help="Synthetic dataset + every method on a tiny random-weights backbone; a few minutes on a laptop CPU."):
        start_demo(store.root, again=True)
        st.session_state[f"_demo_watched_{demo_job_id(store.root)}"] = True
        st.rerun()
