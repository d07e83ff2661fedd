from __future__ import annotations

from harmoniad.runtime.progress import Progress, ProgressEvent, format_seconds


def test_progress_reports_first_and_last_with_eta() -> None:
    events: list[ProgressEvent] = []
    progress = Progress("extract", total=10, callback=events.append, min_interval_s=3600)
    for _ in range(10):
        progress.update(loss=0.5)
    assert [e.done for e in events] == [1, 10]
    assert events[0].eta_s is not None and events[-1].eta_s == 0
    assert events[-1].fraction == 1.0
    assert "extract 10/10 (100%" in events[-1].describe()
    assert "loss=0.5" in events[-1].describe()


def test_resumed_progress_estimates_from_new_work_only() -> None:
    events: list[ProgressEvent] = []
    progress = Progress("train", total=100, callback=events.append, start=90, min_interval_s=0)
    progress.update(5)
    assert events[-1].done == 95 and events[-1].eta_s is not None


def test_format_seconds() -> None:
    assert format_seconds(5.2) == "5s"
    assert format_seconds(75) == "1m15s"
    assert format_seconds(3700) == "1h01m"
