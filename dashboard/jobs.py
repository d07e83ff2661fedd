"""Long work (the first-start demo, evaluations from the Run page) in background threads.

Why this shape: a Streamlit script run blocks its session while it runs. Doing an
evaluation in the script thread would freeze the page for minutes (the Cancel button could
not be clicked), and a page reload would start the work a second time. Instead each piece
of work is a :class:`Job` whose daemon thread is owned by one :class:`JobBoard` per server
process (made by ``st.cache_resource``, so every session and every reload sees the same
board). A page shows a job with :func:`show_job`: a fragment that polls the job's snapshot
once a second (``st.fragment(run_every=...)``) and reruns the whole app when it ends, so the
new results appear. Starting a job whose id is already running returns the running one:
that is what makes a reload, or a second browser tab, harmless.

Cancel sets an event; the job's progress callback raises :class:`~harmoniad.runtime.progress.Cancelled`
at the work's next progress update. Categories already stored stay stored; runs the job had
open are then marked ``failed`` with a clear reason (never left ``running``).
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import streamlit as st

from harmoniad.data import list_categories
from harmoniad.evaluate import EvalRequest, evaluate
from harmoniad.runtime.progress import Cancelled, ProgressEvent, ProgressFn, format_seconds
from harmoniad.store import ResultStore, RunStateError

JobState = Literal["running", "done", "failed", "cancelled"]
#: Work run by a job: gets a store (which reports the runs it creates) and a progress callback;
#: may return a one-line message shown when it ends.
Work = Callable[[ResultStore, ProgressFn], "str | None"]
POLL_S = 1.0
CANCEL_REASON = "cancelled from the dashboard; the categories finished before the cancel are kept"


@dataclass(frozen=True)
class JobSnapshot:
    """What a page needs to draw a job, copied under the job's lock."""

    id: str
    title: str
    state: JobState
    started: float
    finished: float | None
    overall: ProgressEvent | None  # the latest top-level event ("synthetic data", "evaluate")
    detail: ProgressEvent | None  # the latest event of any depth ("harmoniad: train ...")
    shape: tuple[int, int] | None  # (methods, categories) of an evaluation, from its announcement
    fit_s: float | None  # seconds the latest method fit took
    category_s: float | None  # mean seconds per scored category (latest few)
    unit_started: float | None  # time.monotonic() when the evaluation's current unit began
    run_ids: tuple[str, ...]
    closed_runs: tuple[str, ...]  # runs the job finished or failed so far
    error: str | None
    message: str | None
    cancel_requested: bool

    @property
    def running(self) -> bool:
        return self.state == "running"

    @property
    def elapsed_s(self) -> float:
        return (self.finished or time.time()) - self.started

    @property
    def fraction(self) -> float:
        """Progress of the current stage, counting the part of the unit in progress.

        The evaluation's own counter moves once per fitted method or scored category, which
        can take minutes; the nested event (e.g. training steps) fills in between.
        """
        if self.overall is None:
            return 0.0 if self.detail is None else self.detail.fraction
        if self.overall.total <= 0:
            return 1.0
        sub = 0.0
        if self.detail is not None and self.detail is not self.overall and ": " in self.detail.task:
            sub = min(self.detail.fraction, 0.999)
        return min(1.0, (self.overall.done + sub) / self.overall.total)

    @property
    def eta_s(self) -> float | None:
        """Time left for the whole current stage, or None until it can be estimated.

        An evaluation's units are unequal (fitting HarmoniAD takes minutes, scoring a category
        seconds), so its time left is remaining fits x the latest fit's time + remaining
        categories x the recent time per category: known once one method is fitted. (The
        first fit also extracts the features the later ones reuse: the latest is the better guess.)
        Other stages (e.g. generating the synthetic data) have equal units: their own ETA.
        """
        if self.overall is None:
            return None
        if self.overall.task != "evaluate" or self.shape is None:
            return self.overall.eta_s
        if self.fit_s is None:
            return None
        methods, categories = self.shape
        fitted, position = divmod(self.overall.done, categories + 1)
        if fitted >= methods:
            return 0.0
        fits_left = methods - fitted - (1 if position else 0)
        categories_left = methods * categories - (fitted * categories + max(0, position - 1))
        per_category = self.category_s or 0.0
        left = fits_left * self.fit_s + categories_left * per_category
        if self.unit_started is not None:  # part of the current unit is already done
            current = self.fit_s if position == 0 else per_category
            left -= min(time.monotonic() - self.unit_started, current)
        return max(0.0, left)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


class Job:
    """One piece of long work in a daemon thread, observable through :meth:`snapshot`."""

    def __init__(self, job_id: str, title: str, work: Work, store_root: Path) -> None:
        self.id = job_id
        self.title = title
        self.store_root = Path(store_root)
        self._work = work
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._state: JobState = "running"
        self._started = time.time()
        self._finished: float | None = None
        self._overall: ProgressEvent | None = None
        self._detail: ProgressEvent | None = None
        self._shape: tuple[int, int] | None = None
        self._unit_times: dict[str, list[float]] = {"fit": [], "category": []}
        self._unit_started: float | None = None
        self._run_ids: list[str] = []
        self._closed_runs: list[str] = []
        self._error: str | None = None
        self._message: str | None = None
        self._thread = threading.Thread(target=self._main, name=f"harmoniad-job-{job_id}", daemon=True)

    # ------------------------------------------------------------------ control
    def start(self) -> Job:
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the work to stop at its next progress update."""
        self._cancel.set()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the thread; True if it ended (tests, shutdown)."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def running(self) -> bool:
        with self._lock:
            return self._state == "running"

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            return JobSnapshot(
                id=self.id,
                title=self.title,
                state=self._state,
                started=self._started,
                finished=self._finished,
                overall=self._overall,
                detail=self._detail,
                shape=self._shape,
                fit_s=_mean(self._unit_times["fit"][-1:]),  # the first fit also extracts features
                category_s=_mean(self._unit_times["category"][-8:]),
                unit_started=self._unit_started,
                run_ids=tuple(self._run_ids),
                closed_runs=tuple(self._closed_runs),
                error=self._error,
                message=self._message,
                cancel_requested=self._cancel.is_set(),
            )

    # ------------------------------------------------------------------ worker side
    def _progress(self, event: ProgressEvent) -> None:
        """The work's progress callback: record the event, stop if cancel was asked."""
        with self._lock:
            self._detail = event
            if ": " not in event.task:  # nested events are "<method>: <task>"
                if event.task == "evaluate":
                    self._time_unit(event)
                self._overall = event
        if self._cancel.is_set():
            raise Cancelled(f"job {self.id} cancelled")

    def _time_unit(self, event: ProgressEvent) -> None:
        """Time one finished evaluation unit (a fit or a category), from consecutive events."""
        now = time.monotonic()
        if "methods" in event.info and "categories" in event.info:
            self._shape = (int(event.info["methods"]), int(event.info["categories"]))
        before = self._overall.done if self._overall is not None and self._overall.task == event.task else 0
        if self._unit_started is not None and event.done == before + 1:  # a failed fit jumps: not timed
            kind = "fit" if event.info.get("step") == "fit" else "category" if "category" in event.info else None
            if kind is not None:
                self._unit_times[kind].append(now - self._unit_started)
        if event.done != before or self._unit_started is None:
            self._unit_started = now

    def run_status(self, run_id: str, status: str) -> None:
        """The job's store observer (``ResultStore(on_status=...)``): which runs the work opened and closed."""
        with self._lock:
            if status == "running":
                self._run_ids.append(run_id)
            elif run_id not in self._closed_runs:
                self._closed_runs.append(run_id)

    def _main(self) -> None:
        state: JobState = "done"
        error = message = None
        store: ResultStore | None = None
        try:
            store = ResultStore(self.store_root, on_status=self.run_status)
            message = self._work(store, self._progress)
        except Cancelled:
            state = "cancelled"
        except BaseException as exc:  # noqa: BLE001 - shown on the page; the thread must not die silently
            state, error = "failed", f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}"
        if store is not None and state != "done":
            reason = CANCEL_REASON if state == "cancelled" else f"stopped: {(error or '').splitlines()[0]}"
            self._close_open_runs(store, reason)
        with self._lock:
            self._state, self._error, self._message = state, error, message
            self._finished = time.time()

    def _close_open_runs(self, store: ResultStore, reason: str) -> None:
        """Runs the work left ``running`` (it was interrupted) become ``failed`` with ``reason``."""
        with self._lock:
            open_runs = [r for r in self._run_ids if r not in self._closed_runs]
        for run_id in open_runs:
            try:
                store.fail_run(run_id, reason)
            except RunStateError:
                pass  # it was closed after all


class JobBoard:
    """The jobs of this server process, by id (one board per process, see :func:`board`)."""

    def __init__(self) -> None:
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def start(self, job_id: str, title: str, work: Work, store_root: Path) -> tuple[Job, bool]:
        """Start ``work`` as job ``job_id`` unless that job is running; returns (job, started)."""
        with self._lock:
            existing = self._jobs.get(job_id)
            if existing is not None and existing.running:
                return existing, False
            job = Job(job_id, title, work, store_root)
            self._jobs[job_id] = job
        return job.start(), True

    def get(self, job_id: str | None) -> Job | None:
        if job_id is None:
            return None
        with self._lock:
            return self._jobs.get(job_id)

    def all(self, store_root: Path | None = None) -> list[Job]:
        """Every job of this process, running or ended (optionally only those writing to ``store_root``)."""
        with self._lock:
            jobs = list(self._jobs.values())
        root = None if store_root is None else Path(store_root).resolve()
        return [j for j in jobs if root is None or j.store_root.resolve() == root]

    def running(self, store_root: Path | None = None) -> list[Job]:
        """Jobs still running (optionally only those writing to ``store_root``), oldest first."""
        with self._lock:
            jobs = list(self._jobs.values())
        root = None if store_root is None else Path(store_root).resolve()
        return [j for j in jobs if j.running and (root is None or j.store_root.resolve() == root)]


def announce_evaluation(request: EvalRequest, progress: ProgressFn) -> None:
    """Report the evaluation's size before it starts (methods x (categories + 1) units, as
    ``evaluate`` counts them), so the bar shows the whole job while the first method fits and
    the time left can weigh fits and categories separately."""
    categories = request.categories or tuple(list_categories(request.dataset, request.root))
    methods = len(request.methods)
    progress(ProgressEvent("evaluate", 0, methods * (len(categories) + 1), 0.0, None,
                           {"methods": methods, "categories": len(categories)}))


def evaluation_work(request: EvalRequest) -> Work:
    """Work that runs ``evaluate(request)`` into the job's store."""

    def work(store: ResultStore, progress: ProgressFn) -> str:
        announce_evaluation(request, progress)
        ids = evaluate(request, store, progress)
        return f"{len(ids)} method run(s) stored."

    return work


@st.cache_resource(show_spinner=False)
def board() -> JobBoard:
    """The process-wide job board (``st.cache_resource`` keeps one per server process)."""
    return JobBoard()


# ---------------------------------------------------------------------- display
def describe_eta(snap: JobSnapshot) -> str:
    """``"about 1m20s left"`` once the work can estimate it, else what is known so far."""
    eta = snap.eta_s
    if eta is not None:
        rough = " (at least)" if snap.shape is not None and snap.category_s is None else ""
        return f"about {format_seconds(eta)} left{rough}"
    detail = snap.detail
    if detail is not None and detail is not snap.overall and detail.eta_s is not None:
        return (f"current step about {format_seconds(detail.eta_s)} left; the total is estimated once the "
                "first method is fitted")
    return "estimating time left..."


def _draw(snap: JobSnapshot, *, allow_cancel: bool, key: str) -> None:
    event = snap.overall or snap.detail
    if event is None:
        step = "starting..."
    elif event.task == "evaluate":
        step = f"evaluate, step {event.done} of {event.total} (a step fits a method or scores a category)"
    else:
        step = f"{event.task} {event.done}/{event.total}"
    st.progress(snap.fraction, text=f"**{snap.title}**: {step} · {snap.fraction:.0%}")
    parts = [describe_eta(snap), f"running for {format_seconds(snap.elapsed_s)}"]
    if snap.shape is not None:
        parts.append(f"{len(snap.closed_runs)} of {snap.shape[0]} methods done")
    st.caption(" · ".join(parts))
    if snap.detail is not None and snap.detail is not snap.overall:
        st.caption(f"Now: {snap.detail.describe()}")
    if snap.cancel_requested:
        st.info("Cancelling: the work stops at its next progress step; finished categories stay saved.")
    elif allow_cancel:
        job = board().get(snap.id)
        if job is not None:  # a callback: it runs before the (fragment or app) rerun the click causes
            st.button("Cancel", key=f"cancel-{key}", icon=":material/stop_circle:", on_click=job.cancel,
                      help="Stops at the next progress step; categories already finished stay saved.")


def show_ended(snap: JobSnapshot) -> None:
    """A one-line result for a job that ended."""
    took = format_seconds(snap.elapsed_s)
    if snap.state == "done":
        st.success(f"**{snap.title}** finished in {took}. " + (snap.message or ""), icon=":material/check_circle:")
    elif snap.state == "cancelled":
        st.warning(f"**{snap.title}** was cancelled after {took}. {CANCEL_REASON.capitalize()}.")
    else:
        first = (snap.error or "unknown error").splitlines()[0]
        st.error(f"**{snap.title}** failed after {took}: {first}")
        with st.expander("Details"):
            st.code(snap.error or "", language=None)


def _landed(snap: JobSnapshot) -> tuple[int, int]:
    """What the pages can show so far: runs closed, and evaluation units (fits, categories) done.
    A change reruns the app, so each category appears as soon as it is stored."""
    done = snap.overall.done if snap.overall is not None and snap.overall.task == "evaluate" else 0
    return len(snap.closed_runs), done


def show_job(job: Job, *, allow_cancel: bool = True, key: str | None = None) -> None:
    """Draw ``job``; while it runs, poll it every second and rerun the app when a run lands or it ends."""
    key = key or job.id
    snap = job.snapshot()
    if not snap.running:
        show_ended(snap)
        return
    seen_key = f"_job_seen_{key}"
    st.session_state[seen_key] = _landed(snap)

    @st.fragment(run_every=POLL_S)
    def poll() -> None:
        now = job.snapshot()
        if not now.running or _landed(now) != st.session_state.get(seen_key):
            st.rerun()  # whole app: new results to show
        _draw(now, allow_cancel=allow_cancel, key=key)

    poll()
