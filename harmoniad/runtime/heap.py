"""Freed host memory kept for reuse while evaluating (glibc), instead of fresh zeroed pages.

Scoring allocates and frees large arrays of much the same sizes every batch and every
category: activations, final maps, metric buffers, map codes. glibc gives a block above its
mmap threshold straight back to the kernel, and trims the free top of a heap beyond its trim
threshold, so the next array of that size is fresh memory that the kernel zeroes page by
page (``clear_page`` in ``perf``: about 7% of the end-to-end CPU time of
``benchmarks/bench_end_to_end.py --quick`` on a 2-core machine). :func:`keep_freed_memory`
raises the thresholds once a process, so blocks up to 32 MiB come from the heap and up to
256 MiB of freed memory stay there for the next batch: the process's resident memory
stays near its peak instead of dropping between batches (docs/design.md#cost-of-the-scoring-path).

Nothing happens without glibc, or when the user tunes malloc with ``MALLOC_*_`` variables or
``GLIBC_TUNABLES``.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
#: Blocks up to this size come from the heap (glibc's largest mmap threshold on 64-bit).
MMAP_THRESHOLD = 32 << 20
#: Free memory a heap keeps at its top before giving it back to the kernel.
TRIM_THRESHOLD = 256 << 20
#: Extra memory asked for each time a heap grows, kept for the next allocations.
TOP_PAD = 64 << 20
_USER_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")

_lock = threading.Lock()
_applied: bool | None = None  # None: not tried yet


def keep_freed_memory() -> bool:
    """Set glibc's heap thresholds (once a process); True when they are in effect."""
    global _applied
    with _lock:
        if _applied is None:
            _applied = _apply()
        return _applied


def _apply() -> bool:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(os.environ.get(name) for name in _USER_SETTINGS):
        return False  # the user's own malloc settings win
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success; the mmap threshold first (it also fixes the others' dynamic values).
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD), (_M_TOP_PAD, TOP_PAD)))


__all__ = ["MMAP_THRESHOLD", "TOP_PAD", "TRIM_THRESHOLD", "keep_freed_memory"]
