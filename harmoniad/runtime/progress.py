"""Progress reporting with time left, shared by extraction, training and evaluation.

Long work takes a ``ProgressFn`` callback. The default prints one line per update to
stderr; the dashboard passes one that drives ``st.progress``. A callback may raise
:class:`Cancelled` to stop the work cleanly (what was already saved is kept).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


class Cancelled(Exception):
    """Raised by a progress callback to ask long-running work to stop."""


@dataclass(frozen=True)
class ProgressEvent:
    """One progress update: ``done`` of ``total`` units of ``task``."""

    task: str
    done: int
    total: int
    elapsed_s: float
    eta_s: float | None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def fraction(self) -> float:
        return 1.0 if self.total <= 0 else min(1.0, self.done / self.total)

    def describe(self) -> str:
        """A one-line human summary, e.g. ``train 40/100 (40%) 12s left loss=0.31``."""
        eta = "" if self.eta_s is None else f", {format_seconds(self.eta_s)} left"
        extra = "".join(
            f" {k}={v:.4g}" if isinstance(v, float) else f" {k}={v}" for k, v in self.info.items()
        )
        return f"{self.task} {self.done}/{self.total} ({self.fraction:.0%}{eta}){extra}"


ProgressFn = Callable[[ProgressEvent], None]


def format_seconds(seconds: float) -> str:
    """``75.2 -> '1m15s'``; short and stable for progress lines."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f}s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def print_progress(event: ProgressEvent) -> None:
    """Default callback: one line on stderr."""
    print(event.describe(), file=sys.stderr, flush=True)


def silent(event: ProgressEvent) -> None:
    """A callback that reports nothing (tests, nested work)."""


class Progress:
    """Counts units of work and reports them with an ETA to a callback.

    ``min_interval_s`` throttles reports so a fast loop doesn't flood the output;
    the first and the final update are always reported.
    """

    def __init__(
        self,
        task: str,
        total: int,
        callback: ProgressFn | None = None,
        *,
        start: int = 0,
        min_interval_s: float = 0.5,
    ) -> None:
        self.task = task
        self.total = total
        self.done = start
        self._start_done = start
        self._callback = callback or print_progress
        self._t0 = time.monotonic()
        self._last = -float("inf")
        self._min_interval = min_interval_s

    def update(self, n: int = 1, **info: Any) -> None:
        """Advance by ``n`` units and report (throttled)."""
        self.done += n
        now = time.monotonic()
        if self.done >= self.total or now - self._last >= self._min_interval:
            self._last = now
            self._callback(self.event(**info))

    def event(self, **info: Any) -> ProgressEvent:
        elapsed = time.monotonic() - self._t0
        advanced = self.done - self._start_done
        eta = None
        if advanced > 0 and self.total > 0:
            eta = elapsed / advanced * max(0, self.total - self.done)
        return ProgressEvent(self.task, self.done, self.total, elapsed, eta, dict(info))
