"""keep_freed_memory: arrays that come and go reuse freed memory instead of fresh pages."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

# Arrays of a batch's sizes come and go, two alive at a time, in a worker thread and in the
# main thread; the second pass counts the page faults (fresh pages the kernel had to zero).
SCRIPT = """
import ctypes, resource, sys, threading
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: one fault per 4 KiB page, on any THP setting
import numpy as np
from harmoniad.runtime.heap import keep_freed_memory

applied = keep_freed_memory() if sys.argv[1] == "keep" else None
sizes_mib = [24, 8, 30, 16, 4, 6, 3, 5, 2, 7]

def churn():
    alive = []
    for mib in sizes_mib:
        alive.append(np.ones(mib << 18, np.float32))  # every page touched
        if len(alive) > 2:
            alive.pop(0)

def second_pass_faults():
    churn()
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    churn()
    return resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before

out = {}
worker = threading.Thread(target=lambda: out.update(thread=second_pass_faults()))
worker.start()
worker.join()
print(applied, second_pass_faults(), out["thread"])
"""
PAGES = sum([24, 8, 30, 16, 4, 6, 3, 5, 2, 7]) * 256  # 4 KiB pages touched by one pass

needs_glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's malloc only"
)


def _run(mode: str, **env: str) -> tuple[str, int, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=120,
                          env={**clean, **env}, check=True)
    applied, main, thread = done.stdout.split()
    return applied, int(main), int(thread)


@needs_glibc
def test_freed_memory_is_reused_instead_of_faulting_fresh_pages_in_every_thread():
    _, main, thread = _run("pristine")
    # The control: glibc's defaults give part of it back, so a second pass faults again.
    assert main > PAGES // 50 and thread > PAGES // 50, (main, thread)
    applied, main, thread = _run("keep")
    assert applied == "True"
    assert main < PAGES // 200 and thread < PAGES // 200, (main, thread)


@needs_glibc
def test_the_users_own_malloc_settings_win():
    applied, _, _ = _run("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert applied == "False"
