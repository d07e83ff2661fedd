"""A background writer: slow host work (metrics, store writes) off the scoring loop, in order.

Scoring a category and recording the previous one overlap: the GPU (or the main thread)
goes on while one worker thread computes metrics and writes files. At most ``depth`` jobs
wait, so memory stays bounded (a category's maps are held until its job ran) and a slow
disk slows the run down instead of filling the memory. A job's exception is re-raised in
the caller at the next :meth:`BackgroundWriter.submit` or at :meth:`BackgroundWriter.drain`.

While a writer is open, numpy's BLAS (OpenBLAS, through threadpoolctl) runs on one thread:
the writer's matrix products (bootstrap, curve areas) are small, and OpenBLAS's idle threads
spin after every call, taking the cores that score from torch (about 1.7 ms of CPU an image
on a 2-core machine; docs/design.md#cost-of-the-scoring-path).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import Any

from threadpoolctl import threadpool_limits


class BackgroundWriter:
    """Runs submitted jobs on ``workers`` threads (in order with one), at most ``depth + workers - 1`` pending.

    More than one worker is for machines whose cores would otherwise idle while a GPU scores
    (metrics are numpy work that releases the GIL); jobs must then be independent.
    """

    def __init__(self, depth: int = 1, name: str = "harmoniad-writer", *, workers: int = 1,
                 blas_threads: int | None = 1) -> None:
        if depth < 1 or workers < 1:
            raise ValueError(f"BackgroundWriter: depth and workers must be >= 1, got {depth}, {workers}")
        self.depth = depth
        self.workers = workers
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        self._pending: deque[Future[Any]] = deque()
        # Process-wide, until close(); None leaves numpy's BLAS as it is.
        self._blas = None if blas_threads is None else threadpool_limits(blas_threads, user_api="blas")

    def submit(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future[Any]:
        """Queue ``fn(*args, **kwargs)``; first waits until fewer than ``depth + workers - 1`` jobs are pending."""
        self._collect(keep=self.depth + self.workers - 2)
        future = self._pool.submit(fn, *args, **kwargs)
        self._pending.append(future)
        return future

    def drain(self) -> None:
        """Wait for every queued job; re-raises the first job error."""
        self._collect(keep=0)

    def close(self, *, cancel: bool = False) -> None:
        """Stop the worker; ``cancel`` drops jobs that have not started (after a failure)."""
        if cancel:
            for future in self._pending:
                future.cancel()
            self._pending.clear()
        self._pool.shutdown(wait=True, cancel_futures=cancel)
        if self._blas is not None:
            self._blas.restore_original_limits()
            self._blas = None

    def _collect(self, keep: int) -> None:
        # Finished jobs are collected as they come, so an error surfaces at the next call.
        while self._pending and (len(self._pending) > keep or self._pending[0].done()):
            self._pending.popleft().result()

    def __enter__(self) -> BackgroundWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            try:
                self.drain()
            finally:
                self.close(cancel=True)
        else:
            self.close(cancel=True)


def writer_workers(device: object) -> int:
    """Writer threads for scoring on ``device``: one on a CPU (the cores score), up to 4 beside a GPU."""
    import os

    if getattr(device, "type", str(device)) != "cuda":
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(4, cores // 4))


__all__ = ["BackgroundWriter", "writer_workers"]
