"""torch.distributed in one place: join a ``torchrun`` job, split work by rank, gather results.

Every helper is a no-op (or the identity) in a plain single process, so the same code and
the same commands run with and without ``torchrun``. The process group is torch's own
(process-wide) state; this module keeps none of its own.

Sharding follows ``DistributedSampler`` (item ``i`` goes to rank ``i % world``) but without
its padding: ranks get ``ceil`` or ``floor`` of ``n / world`` items, so no item is processed
twice, and :func:`gather_shards` puts results back in the original order.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import importlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from harmoniad.runtime.device import resolve_device

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Overrides the process-group backend (default: NCCL with CUDA, else gloo); ``gloo`` lets
#: several ranks share one GPU (e.g. a 2-process smoke run on a one-GPU machine).
BACKEND_ENV = "HARMONIAD_DIST_BACKEND"

#: The variables ``torchrun`` (``python -m torch.distributed.run``) sets for every worker.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """The launch environment or a collective is inconsistent; the message says what and where."""


# -- process group -------------------------------------------------------------------------------


def launched() -> bool:
    """True when this process was started by ``torchrun`` with more than one worker."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(backend: str | None = None, *, timeout_s: float = 1800.0) -> bool:
    """Join the process group described by torchrun's environment; returns whether one is active.

    A plain process (no ``WORLD_SIZE`` or ``WORLD_SIZE=1``) gets no group and everything
    below runs as a single process. ``backend`` defaults to NCCL when CUDA is present, else
    gloo (or ``$HARMONIAD_DIST_BACKEND``). With CUDA, this worker's GPU is ``cuda:LOCAL_RANK``
    (modulo the GPU count under gloo, so ranks can share a GPU), set as the current device so
    bare ``"cuda"`` means it too. Calling it again is harmless.
    """
    if is_initialized():
        return True
    if not launched():
        return False
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {missing} are not set; start the job with "
            "torchrun (python -m torch.distributed.run), which sets all of "
            f"{list(TORCHRUN_ENV)}"
        )
    if not dist.is_available():
        raise DistributedError("this torch build has no torch.distributed; run without torchrun")
    use_cuda = torch.cuda.is_available()
    backend = backend or os.environ.get(BACKEND_ENV) or ("nccl" if use_cuda else "gloo")
    if use_cuda:
        lr, gpus = local_rank(), torch.cuda.device_count()
        if lr >= gpus and backend == "nccl":
            raise DistributedError(
                f"LOCAL_RANK={lr} but this node has {gpus} GPU(s); use --nproc_per_node <= the number of GPUs "
                f"(NCCL cannot put two ranks on one GPU), or set {BACKEND_ENV}=gloo to share the GPUs"
            )
        torch.cuda.set_device(lr % gpus)
    # torch.distributed.nn's functions take ``group=group.WORLD`` as a default argument, bound
    # when the module is first imported. Imported after the group exists (by open_clip, or by
    # DDP), they would hold the group for good: destroy_process_group would then leave its gloo
    # threads running into interpreter shutdown, where tearing them down can abort the process
    # ("terminate called without an active exception", seen rarely in the 2-rank test).
    # Imported first, the default is None.
    importlib.import_module("torch.distributed.nn")

    kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(seconds=timeout_s)}
    if backend == "nccl":
        kwargs["device_id"] = torch.device("cuda", local_rank())
    dist.init_process_group(**kwargs)
    log.info("joined process group: rank %d of %d (%s)", rank(), world_size(), backend)
    return True


def cleanup() -> None:
    """Leave the process group (if any), so the job exits cleanly.

    Unreachable objects are collected first: one left in a reference cycle that holds the
    group (a DDP wrapper in a failed call's frame, say) would let the group outlive
    ``destroy_process_group``, its gloo threads running on into interpreter shutdown.
    """
    if is_initialized():
        gc.collect()
        dist.destroy_process_group()


#: Seconds a failed worker may take to exit on its own before it is ended (``os._exit``).
EXIT_GRACE_S = 5.0


@contextlib.contextmanager
def session(backend: str | None = None, *, exit_grace_s: float = EXIT_GRACE_S) -> Iterator[bool]:
    """``with session():`` joins the torchrun group (if launched by torchrun) and leaves it after.

    A failure that leaves the block (an exception, Ctrl-C, a dashboard cancel) stops this
    worker fast, so ``torchrun`` sees it exit and stops the other ranks within seconds
    instead of leaving them waiting at their next collective (:func:`fail_fast`).
    """
    active = init(backend)
    failed = False
    try:
        yield active
    except BaseException as exc:
        failed = active and not (isinstance(exc, SystemExit) and exc.code in (0, None))
        if failed:
            fail_fast(exc, exit_grace_s)
        raise
    finally:
        if active and not failed:
            cleanup()


def fail_fast(exc: BaseException, grace_s: float = EXIT_GRACE_S) -> None:
    """After a failure on this rank: leave the process group at once and make sure the process exits.

    - the group is aborted (NCCL: pending collectives are dropped, not waited for) or, for
      gloo, destroyed, which closes its connections, so peers blocked in a collective fail
      right away instead of at the group's timeout;
    - a daemon watchdog ends the process ``grace_s`` seconds later if it is still alive:
      a non-daemon thread, a decode worker or a stuck driver call must not keep a failed
      rank around, because ``torchrun`` stops the other ranks only once one has exited.
    The exception itself is still raised by the caller, so the normal error reporting runs.
    """
    code = 130 if isinstance(exc, KeyboardInterrupt) else 1
    log.error("rank %d of %d failed (%s: %s); leaving the job", rank(), world_size(), type(exc).__name__, exc)

    def _end() -> None:
        time.sleep(grace_s)
        log.error("rank %d still running %.0f s after its failure; exiting with code %d", rank(), grace_s, code)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)

    threading.Thread(target=_end, name="harmoniad-exit-watchdog", daemon=True).start()
    if not is_initialized():
        return
    try:
        if dist.get_backend() == "nccl":
            dist.distributed_c10d._abort_process_group()
        else:
            dist.destroy_process_group()
    except Exception as err:  # noqa: BLE001 - best effort: the watchdog still ends the process
        log.warning("could not leave the process group cleanly after the failure: %s", err)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of workers in the job (1 without torchrun)."""
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    """This worker's global rank (0 without torchrun)."""
    return dist.get_rank() if is_initialized() else 0


def local_rank() -> int:
    """This worker's index on its node (torchrun's ``LOCAL_RANK``; 0 without torchrun)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on the one worker that reports progress and writes shared results (rank 0)."""
    return rank() == 0


def active() -> bool:
    """True when there is more than one worker, i.e. collectives actually communicate."""
    return world_size() > 1


def device(requested: str | torch.device | None = "auto") -> torch.device:
    """The device for this worker: ``"auto"``/``"cuda"`` become ``cuda:LOCAL_RANK`` in a job.

    An explicit index (``"cuda:3"``) or ``"cpu"`` is kept as asked.
    """
    dev = resolve_device(requested)
    if dev.type == "cuda" and dev.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return dev


def barrier() -> None:
    """Wait until every worker gets here (no-op in a single process)."""
    if active():
        if dist.get_backend() == "nccl":
            dist.barrier(device_ids=[torch.cuda.current_device()])
        else:
            dist.barrier()


# -- sharding ------------------------------------------------------------------------------------


def shard_indices(n: int, *, rank_: int | None = None, world: int | None = None) -> list[int]:
    """The indices of ``n`` items that ``rank_`` handles: ``rank_, rank_ + world, ...`` (no padding)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    if n < 0 or w < 1 or not 0 <= r < w:
        raise ValueError(f"shard_indices: need n >= 0 and 0 <= rank < world, got n={n}, rank={r}, world={w}")
    return list(range(r, n, w))


def shard(items: Sequence[T]) -> list[T]:
    """This worker's share of ``items`` (every item in a single process)."""
    return [items[i] for i in shard_indices(len(items))]


def unshard(parts: Sequence[Sequence[T]], n: int) -> list[T]:
    """Interleave per-rank results (rank ``r``'s list is for :func:`shard_indices` of ``r``) back into order."""
    world = len(parts)
    out: list[Any] = [None] * n
    for r, part in enumerate(parts):
        idx = shard_indices(n, rank_=r, world=world)
        if len(part) != len(idx):
            raise DistributedError(f"rank {r} returned {len(part)} results for its {len(idx)} of {n} items")
        for i, value in zip(idx, part):
            out[i] = value
    return out


def gather_shards(local: Sequence[T], n: int, *, to_all: bool = False) -> list[T] | None:
    """Results of every rank's shard, in the original order of the ``n`` items.

    On rank 0 (on every rank with ``to_all``) the full list; None on the other ranks.
    In a single process, ``local`` itself (as a list).
    """
    if not active():
        return list(local)
    parts = all_gather_object(list(local)) if to_all else gather_object(list(local))
    if parts is None:
        return None
    return unshard(parts, n)


def split_batch(batch: Sequence[T]) -> tuple[list[T], float]:
    """This rank's slice of a global batch and the factor that makes DDP's mean the global mean.

    DDP averages gradients over ranks. With per-rank losses that are means over their own
    ``k_r`` samples, scaling rank ``r``'s loss by ``k_r * world / B`` makes that average
    equal to the gradient of the mean over all ``B`` samples, also when ``B`` does not divide
    evenly. A rank whose slice is empty gets the batch's first item with factor 0: it still
    takes part in the gradient all-reduce but adds nothing.
    """
    if not batch:
        raise ValueError("split_batch: empty batch")
    local = shard(batch)
    if not local:
        return [batch[0]], 0.0
    return local, len(local) * world_size() / len(batch)


# -- collectives ---------------------------------------------------------------------------------


def _comm_device() -> torch.device:
    """Where tensors for collectives must live: this GPU under NCCL, else the CPU."""
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj`` (picklable), indexed by rank, on every rank; ``[obj]`` in one process."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj: T, dst: int = 0) -> list[T] | None:
    """Every rank's ``obj``, indexed by rank, on ``dst`` only (None elsewhere); ``[obj]`` in one process."""
    if not active():
        return [obj]
    out: list[Any] | None = [None] * world_size() if rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """``src``'s ``obj`` on every rank (what the other ranks pass is ignored)."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]  # type: ignore[return-value]


def all_reduce_sum(values: Sequence[float] | torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks of a small float vector, as a float64 CPU tensor."""
    t = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    if not active():
        return t.clone()
    t = t.to(_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu()


def raise_if_any_failed(error: BaseException | None, what: str) -> None:
    """A collective check after work that may fail on some ranks only.

    Every rank calls it (it is a synchronisation point); if any rank failed, every rank
    raises: the failing ones their own exception, the others a :class:`DistributedError`
    naming the rank and its error. So no worker waits forever at the next collective.
    """
    if not active():
        if error is not None:
            raise error
        return
    reports = all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, msg) for r, msg in enumerate(reports) if msg is not None]
    if failed:
        r, msg = failed[0]
        raise DistributedError(f"{what} failed on rank {r} of {world_size()}: {msg}")


__all__ = [
    "BACKEND_ENV",
    "TORCHRUN_ENV",
    "DistributedError",
    "active",
    "all_gather_object",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cleanup",
    "device",
    "fail_fast",
    "gather_object",
    "gather_shards",
    "init",
    "is_initialized",
    "is_main",
    "launched",
    "local_rank",
    "raise_if_any_failed",
    "rank",
    "session",
    "shard",
    "shard_indices",
    "split_batch",
    "unshard",
    "world_size",
]
