"""The GPU fast path: image decoding off the main thread, a batch size that fits, optional compile.

Everything here keeps the CPU path working and gives the same numbers on both paths:

- :func:`decoded_batches` decodes images ahead of the compute. On CUDA it uses a torch
  ``DataLoader`` with worker processes (decoding large PNGs is CPU-bound and would starve
  a GPU) and pinned memory (so the host-to-device copy of the raw pixels is asynchronous);
  on the CPU a small thread pool, which costs no process start-up and leaves the cores to
  the model. Both yield the same batches: a uint8 ``B x H x W x 3`` tensor when the images
  share a size, else the list of ``H x W x 3`` arrays.
- :class:`AdaptiveBatch` runs work in chunks and halves the chunk after a CUDA
  out-of-memory error, so a batch size that is too large for the GPU slows a run down
  instead of failing it; the smaller size is kept for later batches.
- :func:`maybe_compile` applies ``torch.compile`` to the trainable heads when asked
  (off by default: compilation takes a while and only pays off on long runs).

Channels-last: the backbone is a ViT whose work is token matrix products, where memory
format does not apply; HarmoniAD's depthwise convolutions receive token maps that are
channels-last views already (``tokens_to_map``), so no extra conversion is made.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from harmoniad.data import read_image

log = logging.getLogger(__name__)

T = TypeVar("T")

#: A decoded batch: one uint8 ``B x H x W x 3`` tensor (same-size images) or a list of arrays.
ImageBatch = torch.Tensor | list[np.ndarray]


def default_workers(device: torch.device) -> int:
    """Decoding workers: most cores on CUDA (the GPU waits on them), a few threads on the CPU."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    if device.type == "cuda":
        per_gpu = cores // max(1, torch.cuda.device_count())
        return max(2, min(16, per_gpu - 1))
    return max(1, min(4, cores // 2))


def collate_images(images: Sequence[np.ndarray]) -> ImageBatch:
    """Stack same-size ``H x W x 3`` uint8 images into one tensor (one host-to-device copy)."""
    if images and all(img.shape == images[0].shape for img in images):
        return torch.from_numpy(np.stack([np.ascontiguousarray(img) for img in images]))
    return list(images)


def batch_len(batch: ImageBatch) -> int:
    return int(batch.shape[0]) if isinstance(batch, torch.Tensor) else len(batch)


class _ImageFiles(Dataset):
    """Image files decoded by ``reader`` (in DataLoader workers)."""

    def __init__(self, paths: Sequence[Path], reader: Callable[[Path], np.ndarray]) -> None:
        self.paths = [Path(p) for p in paths]
        self.reader = reader

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.reader(self.paths[i])


def decoded_batches(
    paths: Sequence[str | os.PathLike[str]],
    batch_size: int,
    *,
    workers: int,
    processes: bool,
    pin_memory: bool = False,
    reader: Callable[[Path], np.ndarray] = read_image,
) -> Iterator[ImageBatch]:
    """Decode ``paths`` in order, ``batch_size`` at a time, ahead of the consumer.

    ``processes``: a ``DataLoader`` with ``workers`` worker processes (and pinned batches
    if ``pin_memory``); else a pool of ``workers`` threads that reads the next batch while
    the current one is computed. ``reader`` decodes one file (default
    :func:`harmoniad.data.read_image`); its errors (``DatasetError``) reach the caller.
    """
    if batch_size < 1 or workers < 1:
        raise ValueError(f"decoded_batches: batch_size and workers must be >= 1, got {batch_size}, {workers}")
    plist = [Path(p) for p in paths]
    if not plist:
        return
    if processes:
        loader = DataLoader(
            _ImageFiles(plist, reader),
            batch_size=batch_size,
            shuffle=False,
            num_workers=min(workers, len(plist)),
            collate_fn=collate_images,
            pin_memory=pin_memory,
            prefetch_factor=2,
        )
        yield from loader
        return
    batches = [plist[i : i + batch_size] for i in range(0, len(plist), batch_size)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: list[Future[np.ndarray]] = [pool.submit(reader, p) for p in batches[0]]
        try:
            for k in range(len(batches)):
                images = [f.result() for f in pending]
                nxt = batches[k + 1] if k + 1 < len(batches) else []
                pending = [pool.submit(reader, p) for p in nxt]
                yield collate_images(images)
        finally:
            for f in pending:
                f.cancel()


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


__all__ = [
    "AdaptiveBatch",
    "ImageBatch",
    "batch_len",
    "collate_images",
    "decoded_batches",
    "default_workers",
    "maybe_compile",
]
