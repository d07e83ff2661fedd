"""BackgroundWriter: jobs run in order off the caller's thread, a bounded queue, errors reach the caller."""

from __future__ import annotations

import threading
import time

import pytest

from harmoniad.runtime.background import BackgroundWriter


def test_jobs_run_in_order_on_another_thread_and_drain_waits_for_all():
    done: list[tuple[int, str]] = []
    with BackgroundWriter(depth=2) as writer:
        for i in range(6):
            writer.submit(lambda i=i: (time.sleep(0.005), done.append((i, threading.current_thread().name))))
    assert [i for i, _ in done] == list(range(6))
    assert all(name != threading.current_thread().name for _, name in done)


def test_submit_blocks_while_depth_jobs_wait_so_memory_stays_bounded():
    release = threading.Event()
    started = []
    writer = BackgroundWriter(depth=1)
    writer.submit(lambda: (started.append(1), release.wait(5)))
    blocked = threading.Event()

    def second() -> None:
        writer.submit(lambda: None)  # must wait: one job is already queued
        blocked.set()

    t = threading.Thread(target=second)
    t.start()
    assert not blocked.wait(0.3)
    release.set()
    assert blocked.wait(5)
    t.join()
    writer.drain()
    writer.close()


def test_a_job_error_surfaces_at_the_next_call_and_later_jobs_are_dropped():
    ran = []
    writer = BackgroundWriter(depth=1)
    writer.submit(lambda: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        writer.submit(lambda: ran.append("never queued"))
        writer.drain()
    writer.close(cancel=True)
    assert ran == []


def test_leaving_with_an_exception_cancels_what_has_not_started():
    ran = []
    gate = threading.Event()
    with pytest.raises(KeyError):
        with BackgroundWriter(depth=3) as writer:
            writer.submit(lambda: gate.wait(5))
            writer.submit(lambda: ran.append("queued"))
            threading.Timer(0.2, gate.set).start()  # the running job ends after the exception
            raise KeyError("cancelled")
    assert ran == []
    with pytest.raises(ValueError, match="depth"):
        BackgroundWriter(depth=0)


def test_several_workers_run_jobs_concurrently_and_bound_what_is_pending():
    barrier = threading.Barrier(2, timeout=5)
    with BackgroundWriter(workers=2) as writer:
        first = writer.submit(barrier.wait)  # both must be running at once to pass the barrier
        second = writer.submit(barrier.wait)
    assert first.done() and second.done() and first.exception() is None and second.exception() is None

    release = threading.Event()
    writer = BackgroundWriter(workers=2, depth=1)
    for _ in range(2):
        writer.submit(release.wait, 5)  # 2 pending: the bound of depth + workers - 1
    blocked = threading.Event()
    t = threading.Thread(target=lambda: (writer.submit(lambda: None), blocked.set()))
    t.start()
    assert not blocked.wait(0.3)
    release.set()
    assert blocked.wait(5)
    t.join()
    writer.drain()
    writer.close()


def test_writer_threads_follow_the_device(monkeypatch):
    import os

    import torch

    from harmoniad.runtime.background import writer_workers

    assert writer_workers(torch.device("cpu")) == 1 and writer_workers("cpu") == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert writer_workers(torch.device("cuda", 0)) == 4
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert writer_workers(torch.device("cuda", 0)) == 1


def _blas_threads() -> list[int]:
    from threadpoolctl import threadpool_info

    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_numpy_blas_runs_on_one_thread_while_a_writer_is_open_and_is_restored_after():
    from threadpoolctl import threadpool_limits

    with threadpool_limits(2, user_api="blas"):  # a known starting point, on any machine
        before = _blas_threads()
        assert before and all(n == 2 for n in before)
        seen: list[list[int]] = []
        with BackgroundWriter() as writer:
            writer.submit(lambda: seen.append(_blas_threads()))
        assert seen == [[1] * len(before)]
        assert _blas_threads() == before
        with BackgroundWriter(blas_threads=None) as writer:
            writer.submit(lambda: seen.append(_blas_threads()))
        assert seen[-1] == before
        writer = BackgroundWriter()
        writer.close(cancel=True)  # closed after a failure: restored too
        assert _blas_threads() == before
