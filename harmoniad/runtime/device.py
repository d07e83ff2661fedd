"""Device and precision choice in one place: CUDA + bf16 when present, else CPU fp32.

Also what keeps GPU work running on any device: :class:`AdaptiveBatch` halves a chunk after
a CUDA out-of-memory error (a batch that is too large slows a run down instead of failing it)
and :func:`maybe_compile` applies ``torch.compile`` when asked (off by default: compilation
takes a while and only pays off on long runs).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    """``"auto"``/None picks CUDA when available, else CPU; other names are checked."""
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {str(name)!r} requested but CUDA is not available; use 'cpu' or 'auto'")
    return device


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """bf16 autocast on CUDA; a no-op on CPU, where fp32 is both exact and fast enough."""
    if enabled and device.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            yield
    else:
        yield


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError)


class AdaptiveBatch:
    """Chunked execution that halves the chunk size on CUDA out-of-memory and retries.

    ``size`` is the starting chunk size; after an OOM the smaller size sticks for the rest
    of this object's life (later batches would not fit either). An OOM at ``minimum`` is
    re-raised: the work does not fit at all. Other errors pass through untouched.
    """

    def __init__(self, size: int, minimum: int = 1) -> None:
        if size < 1 or not 1 <= minimum <= size:
            raise ValueError(f"AdaptiveBatch: need 1 <= minimum <= size, got size={size}, minimum={minimum}")
        self.size = size
        self.minimum = minimum

    def run(self, n: int, fn: Callable[[int, int], T]) -> list[T]:
        """``[fn(start, stop) for each chunk of range(n)]``, chunks as large as fit."""
        out: list[T] = []
        start = 0
        while start < n:
            stop = min(n, start + self.size)
            oom = False
            try:
                out.append(fn(start, stop))
            except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
                if not _is_oom(exc) or self.size <= self.minimum:
                    raise
                oom = True
            if oom:
                # Outside the except block, so the failed attempt's tensors are already freed.
                torch.cuda.empty_cache()
                self.size = max(self.minimum, self.size // 2)
                log.warning("CUDA out of memory; retrying with batches of %d", self.size)
                continue
            start = stop
        return out


def maybe_compile(module: Any, enabled: bool) -> Any:
    """``torch.compile(module)`` when ``enabled`` (the same object otherwise).

    The compiled wrapper shares parameters and state with ``module``; save and load the
    original, not the wrapper.
    """
    if not enabled:
        return module
    return torch.compile(module)
