"""Background jobs: progress is recorded, cancel stops the work and closes its runs cleanly."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from dashboard.jobs import CANCEL_REASON, JobBoard, JobSnapshot
from harmoniad.runtime.progress import Progress, ProgressEvent, ProgressFn
from harmoniad.store import ResultStore


def _add_category(store: ResultStore, run_id: str, category: str) -> None:
    images = pd.DataFrame({"image_path": ["a.png", "b.png"], "label": [0, 1], "score": [0.1, 0.9]})
    store.add_category(run_id, category, metrics={"image_auroc": 1.0}, images=images)


def _open_run(store: ResultStore, categories: list[str]) -> str:
    return store.create_run(method="freqfilter", dataset="synthetic", root="/data", categories=categories, resolution=8)


def test_job_records_progress_and_runs(tmp_path: Path) -> None:
    def work(store: ResultStore, progress: ProgressFn) -> str:
        run_id = _open_run(store, ["a"])
        tracker = Progress("evaluate", 2, progress, min_interval_s=0)
        tracker.update()
        _add_category(store, run_id, "a")
        store.finish_run(run_id)
        tracker.update()
        return "one run"

    job, started = JobBoard().start("j1", "Test job", work, tmp_path)
    assert started
    assert job.join(30)
    snap = job.snapshot()
    assert snap.state == "done" and snap.message == "one run" and snap.error is None
    assert snap.overall is not None and snap.overall.task == "evaluate" and snap.overall.fraction == 1.0
    assert len(snap.run_ids) == 1 and snap.closed_runs == snap.run_ids
    assert ResultStore(tmp_path).get_run(snap.run_ids[0]).complete


def test_starting_a_running_job_again_returns_it(tmp_path: Path) -> None:
    release = threading.Event()
    calls = []

    def work(store: ResultStore, progress: ProgressFn) -> None:
        calls.append(1)
        release.wait(30)

    board = JobBoard()
    first, started = board.start("same", "Job", work, tmp_path)
    second, started_again = board.start("same", "Job", work, tmp_path)
    assert started and not started_again and second is first
    assert board.running(tmp_path) == [first]
    release.set()
    assert first.join(30)
    assert calls == [1] and board.running() == []


def test_cancel_keeps_finished_categories_and_fails_the_open_run(tmp_path: Path) -> None:
    in_second_category = threading.Event()

    def work(store: ResultStore, progress: ProgressFn) -> None:
        run_id = _open_run(store, ["a", "b"])
        _add_category(store, run_id, "a")
        nested = Progress("freqfilter: score b", 1000, lambda e: progress(e), min_interval_s=0)
        in_second_category.set()
        for _ in range(1000):
            threading.Event().wait(0.01)
            nested.update()  # raises Cancelled once cancel was asked
        raise AssertionError("the cancel was not honoured")

    job, _ = JobBoard().start("c", "Cancellable", work, tmp_path)
    assert in_second_category.wait(30)
    job.cancel()
    assert job.join(30)
    snap = job.snapshot()
    assert snap.state == "cancelled" and snap.cancel_requested
    info = ResultStore(tmp_path).get_run(snap.run_ids[0])
    assert info.status == "failed" and info.error == CANCEL_REASON
    metrics = ResultStore(tmp_path).load_metrics(info.id)
    assert list(metrics["category"]) == ["a"] and metrics["image_auroc"].iloc[0] == pytest.approx(1.0)


def test_failing_work_reports_the_error_and_closes_runs(tmp_path: Path) -> None:
    def work(store: ResultStore, progress: ProgressFn) -> None:
        _open_run(store, ["a"])
        raise RuntimeError("disk full")

    job, _ = JobBoard().start("f", "Failing", work, tmp_path)
    assert job.join(30)
    snap = job.snapshot()
    assert snap.state == "failed" and snap.error is not None and snap.error.startswith("RuntimeError: disk full")
    info = ResultStore(tmp_path).get_run(snap.run_ids[0])
    assert info.status == "failed" and "disk full" in (info.error or "")


def test_snapshot_fraction_counts_the_unit_in_progress(tmp_path: Path) -> None:
    step, release = threading.Event(), threading.Event()

    def work(store: ResultStore, progress: ProgressFn) -> None:
        progress(ProgressEvent("evaluate", 0, 4, 0.0, None, {"methods": 2, "categories": 1}))
        time.sleep(0.2)
        progress(ProgressEvent("evaluate", 1, 4, 0.2, None, {"method": "harmoniad", "step": "fit"}))
        time.sleep(0.05)
        progress(ProgressEvent("evaluate", 2, 4, 0.25, None, {"method": "harmoniad", "category": "a"}))
        progress(ProgressEvent("patchcore: extract", 50, 100, 1.0, None))  # half of the next unit
        step.set()
        assert release.wait(30)

    job, _ = JobBoard().start("frac", "Fraction", work, tmp_path)
    assert step.wait(30)
    snap = job.snapshot()
    release.set()
    assert job.join(30)
    assert snap.fraction == pytest.approx(2.5 / 4)
    assert snap.shape == (2, 1)
    assert snap.fit_s == pytest.approx(0.2, abs=0.15) and snap.category_s == pytest.approx(0.05, abs=0.1)
    assert snap.eta_s is not None and 0 < snap.eta_s <= snap.fit_s + snap.category_s


def _snapshot(done: int, **kw: object) -> JobSnapshot:
    fields: dict[str, object] = {
        "id": "j", "title": "t", "state": "running", "started": 0.0, "finished": None, "detail": None,
        "run_ids": (), "closed_runs": (), "error": None, "message": None, "cancel_requested": False,
        "unit_started": None, "overall": ProgressEvent("evaluate", done, 6, 1.0, None), "shape": (2, 2),
        "fit_s": 10.0, "category_s": 1.0,
    }  # fmt: skip
    fields.update(kw)
    return JobSnapshot(**fields)  # type: ignore[arg-type]


def test_time_left_weighs_fits_and_categories() -> None:
    # 2 methods x (fit + 2 categories): units are [fit, a, b, fit, a, b].
    assert _snapshot(3).eta_s == pytest.approx(10 + 2 * 1)  # first method done: one fit, two categories left
    assert _snapshot(4).eta_s == pytest.approx(2 * 1)  # second fit done
    assert _snapshot(1).eta_s == pytest.approx(2 * 1 + 10 + 2 * 1)
    assert _snapshot(6).eta_s == 0.0
    assert _snapshot(0, fit_s=None).eta_s is None  # unknown until one method is fitted
    synthetic = ProgressEvent("synthetic data", 10, 20, 5.0, 5.0)
    assert _snapshot(0, overall=synthetic).eta_s == 5.0  # equal units: the stage's own estimate
