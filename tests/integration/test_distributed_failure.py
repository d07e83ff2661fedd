"""A failing or cancelled rank ends the whole torchrun job within seconds (gloo, 2 CPU processes).

The job runs this file under ``python -m torch.distributed.run --nproc_per_node 2``:

- ``lingering``: rank 1 fails while a non-daemon thread of its own is still running (a
  writer or decoder that would keep the process alive), and rank 0 is busy for minutes
  without touching a collective (a long GPU phase). Only a failed rank that really exits
  lets torchrun stop rank 0, so the job must end seconds after the failure, not minutes;
- ``cancel``: a real evaluation, cancelled on rank 1 only (its progress callback raises
  ``Cancelled``, as the dashboard's cancel does) while rank 0 goes on.

Both must make torchrun exit non-zero, quickly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harmoniad.runtime import distributed
from tests.paths import REPO

#: Generous for this slow shared machine (two ranks importing torch take ~10 s); a hang takes minutes.
JOB_LIMIT_S = 150


def _torchrun(tmp_path: Path, scenario: str, *extra: str) -> tuple[int, str, float]:
    """Run the scenario under torchrun; (exit code, output, seconds from rank 1's failure to the job's end)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "HARMONIAD_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), __file__, scenario, str(tmp_path), *extra]
    # Its own session, so a hung job is ended with all its ranks (they hold the output pipe open).
    job = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        output, _ = job.communicate(timeout=JOB_LIMIT_S)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        output, _ = job.communicate()
        pytest.fail(f"torchrun still running after {JOB_LIMIT_S} s: a rank hangs\n{output[-3000:]}")
    ended = time.time()
    failed_at = tmp_path / "failed_at"
    assert failed_at.exists(), output[-3000:]
    return job.returncode, output, ended - float(failed_at.read_text())


def test_a_failed_rank_with_a_lingering_thread_ends_the_job_within_seconds(tmp_path):
    code, output, after = _torchrun(tmp_path, "lingering")
    assert code != 0, output[-3000:]
    assert "rank 1 fails on purpose" in output
    assert after < distributed.EXIT_GRACE_S + 20, f"job ended {after:.1f} s after the failure\n{output[-3000:]}"


def test_cancelling_one_rank_mid_evaluation_ends_the_job(tmp_path):
    from harmoniad.data import make_synthetic

    data = make_synthetic(tmp_path / "data", categories=("weave",), n_train=4, n_test=4, size=64)
    code, output, after = _torchrun(tmp_path, "cancel", str(data))
    assert code != 0, output[-3000:]
    assert "Cancelled" in output
    assert after < distributed.EXIT_GRACE_S + 30, f"job ended {after:.1f} s after the cancel\n{output[-3000:]}"


# -- the ranks ---------------------------------------------------------------------------------


def _lingering(work: Path) -> None:
    with distributed.session():
        if distributed.rank() == 1:
            threading.Thread(target=time.sleep, args=(600,), name="stuck-writer").start()
            (work / "failed_at").write_text(repr(time.time()))
            raise RuntimeError("rank 1 fails on purpose")
        deadline = time.time() + 600  # rank 0: long work without collectives
        while time.time() < deadline:
            time.sleep(0.2)
        distributed.barrier()


def _cancel(work: Path, data: Path) -> None:
    import torch

    from harmoniad.backbone import TINY_BACKBONE
    from harmoniad.evaluate import EvalRequest, evaluate
    from harmoniad.methods.harmoniad import HarmoniADMethod
    from harmoniad.runtime.progress import Cancelled
    from harmoniad.store import ResultStore

    torch.set_num_threads(1)

    def cancelled(self, test, ctx):  # noqa: ANN001 - the Method.predict signature
        (work / "failed_at").write_text(repr(time.time()))
        raise Cancelled("cancelled on rank 1 while scoring")

    with distributed.session():
        if distributed.rank() == 1:
            HarmoniADMethod.predict = cancelled  # this process only
        request = EvalRequest(dataset="synthetic", root=str(data), methods=("harmoniad",), backbone=TINY_BACKBONE,
                              resolution=32, device="cpu",
                              options={"harmoniad": {"model": {"hidden_dim": 16}, "train": {"max_steps": 2}}})
        store = ResultStore(work / "runs") if distributed.is_main() else None
        evaluate(request, store, progress=lambda event: None)


if __name__ == "__main__":
    name, folder = sys.argv[1], Path(sys.argv[2])
    if name == "lingering":
        _lingering(folder)
    else:
        _cancel(folder, Path(sys.argv[3]))
