"""Image loading for scoring and feature extraction: decoding off the main thread, in order.

- :func:`decoded_batches` decodes images ahead of the compute. On CUDA it uses a torch
  ``DataLoader`` with worker processes (decoding large PNGs is CPU-bound and would starve
  a GPU) and pinned memory (so the host-to-device copy of the raw pixels is asynchronous);
  each worker decodes chunks of about ``batch / workers`` images, joined back into batches
  in order (:func:`rebatch`), so even a one-batch category is decoded by every worker;
  on the CPU a small thread pool, which costs no process start-up and leaves the cores to
  the model. Both yield the same batches: a uint8 ``B x H x W x 3`` tensor when the images
  share a size, else the list of ``H x W x 3`` arrays.
- :func:`reuse_decode_workers`: within it, the worker processes start once and serve every
  call (an evaluation makes two calls a category), instead of starting once a call.

Channels-last: the backbone is a ViT whose work is token matrix products, where memory
format does not apply; HarmoniAD's depthwise convolutions receive token maps that are
channels-last views already (``tokens_to_map``), so no extra conversion is made.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from harmoniad.data.io import read_image

#: Most images one decode worker process turns into one shared-memory tensor at a time.
MAX_CHUNK = 16

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


def rebatch(chunks: Iterable[ImageBatch], batch_size: int, *, pin_memory: bool = False) -> Iterator[ImageBatch]:
    """Decoded chunks, in order -> batches of exactly ``batch_size`` images (the last may be smaller)."""
    parts: list[ImageBatch] = []
    held = 0
    for chunk in chunks:
        parts.append(chunk)
        held += batch_len(chunk)
        while held >= batch_size:
            batch, rest, taken = [], [], 0
            for part in parts:
                n = batch_len(part)
                if taken + n <= batch_size:
                    batch.append(part)
                    taken += n
                elif taken < batch_size:
                    cut = batch_size - taken
                    batch.append(part[:cut])
                    rest.append(part[cut:])
                    taken = batch_size
                else:
                    rest.append(part)
            parts, held = rest, held - batch_size
            yield _join(batch, pin_memory)
    if parts:
        yield _join(parts, pin_memory)


def _join(parts: list[ImageBatch], pin_memory: bool) -> ImageBatch:
    """One batch from chunks: a tensor (pinned if asked) when they share an image size, else a list."""
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, torch.Tensor) for p in parts) and len({tuple(p.shape[1:]) for p in parts}) == 1:
        first = parts[0]
        n = sum(int(p.shape[0]) for p in parts)
        out = torch.empty((n, *first.shape[1:]), dtype=first.dtype, pin_memory=pin_memory)
        return torch.cat(parts, out=out)  # type: ignore[arg-type]
    return [np.asarray(img) for part in parts for img in (part.numpy() if isinstance(part, torch.Tensor) else part)]


class _PathFiles(Dataset):
    """Decodes, in a DataLoader worker, the path it is handed as its index: the batch sampler
    (iterated in this process) hands out chunks of paths, so one loader serves any list."""

    def __init__(self, reader: Callable[[Path], np.ndarray]) -> None:
        self.reader = reader

    def __getitem__(self, path: Path) -> np.ndarray:  # type: ignore[override]
        return self.reader(path)


class _Chunks:
    """The chunks of paths a loader decodes on its next pass (its batch sampler)."""

    def __init__(self, chunks: list[list[Path]] | None = None) -> None:
        self.chunks = chunks or []

    def __iter__(self) -> Iterator[list[Path]]:
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


def _loader(reader: Callable[[Path], np.ndarray], chunks: _Chunks, workers: int, pin_memory: bool,
            prefetch: int, persistent: bool) -> DataLoader:
    return DataLoader(_PathFiles(reader), batch_sampler=chunks, num_workers=workers, collate_fn=collate_images,
                      pin_memory=pin_memory, prefetch_factor=prefetch, persistent_workers=persistent)


def _chunk_size(n: int, batch_size: int, workers: int) -> int:
    """About a batch's share per worker (of ``n`` images when fewer than a batch)."""
    return max(1, min(MAX_CHUNK, math.ceil(min(batch_size, n) / workers)))


def _prefetch(chunk: int, batch_size: int, workers: int) -> int:
    """Chunks a worker decodes ahead: two batches in flight in all."""
    return max(2, math.ceil(2 * batch_size / (chunk * workers)))


class _DecodePool:
    """Decode worker processes that outlive one pass: each pass sets the loader's chunks and
    iterates it again. Reused only after a pass that ran to its end (any error, cancel or
    early stop closes it, so a half-read pass never leaks into the next)."""

    def __init__(self, reader: Callable[[Path], np.ndarray], workers: int, pin_memory: bool, batch_size: int) -> None:
        self.chunks = _Chunks()
        prefetch = _prefetch(_chunk_size(batch_size, batch_size, workers), batch_size, workers)
        self.loader: DataLoader | None = _loader(reader, self.chunks, workers, pin_memory, prefetch, persistent=True)
        self.busy = False

    def run(self, chunks: list[list[Path]]) -> Iterator[ImageBatch]:
        assert self.loader is not None
        self.busy, self.chunks.chunks, finished = True, chunks, False
        try:
            yield from self.loader
            finished = True
        finally:
            self.busy = False
            if not finished:
                self.close()

    @property
    def open(self) -> bool:
        return self.loader is not None

    def close(self) -> None:
        """Stop the worker processes now (DataLoader has no public call for it; the garbage
        collector would, later)."""
        loader, self.loader = self.loader, None
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


_scope = threading.local()


@contextmanager
def reuse_decode_workers() -> Iterator[None]:
    """Within this block, in this thread, ``decoded_batches(processes=True)`` starts its decode
    worker processes once per setting (reader, workers, pinning, batch size) and reuses them
    for every call, instead of starting and stopping them every call.

    Why: an evaluation decodes each category's test images and held-out normals in separate
    calls, and starting workers costs ~15 ms a worker a call (measured on CPU, while the GPU
    waits): with 16 workers, more than the GPU needs for a 100-image category. Nested
    blocks share the outermost one's workers; they stop when it ends.
    """
    if getattr(_scope, "pools", None) is not None:
        yield
        return
    _scope.pools = {}
    try:
        yield
    finally:
        pools, _scope.pools = _scope.pools, None
        for pool in pools.values():
            pool.close()


def _pool_for(reader: Callable[[Path], np.ndarray], workers: int, pin_memory: bool,
              batch_size: int) -> _DecodePool | None:
    """This thread's reusable workers for these settings (None outside :func:`reuse_decode_workers`,
    or while an earlier pass of them is still being read)."""
    pools: dict[tuple[object, ...], _DecodePool] | None = getattr(_scope, "pools", None)
    if pools is None:
        return None
    key = (reader, workers, pin_memory, batch_size)
    pool = pools.get(key)
    if pool is None or not pool.open:
        pool = pools[key] = _DecodePool(reader, workers, pin_memory, batch_size)
    return None if pool.busy else pool


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
        # A DataLoader hands each worker whole batches, so a category that fits in one batch
        # would be decoded by one worker while the others idle: workers decode small chunks
        # instead (about a batch's share each, two batches ahead), joined here in order.
        chunk = _chunk_size(len(plist), batch_size, workers)
        chunks = [plist[i : i + chunk] for i in range(0, len(plist), chunk)]
        pool = _pool_for(reader, workers, pin_memory, batch_size)
        if pool is not None:  # inside reuse_decode_workers(): workers already running
            yield from rebatch(pool.run(chunks), batch_size, pin_memory=pin_memory)
            return
        loader = _loader(reader, _Chunks(chunks), min(workers, len(chunks)), pin_memory,
                         _prefetch(chunk, batch_size, workers), persistent=False)
        yield from rebatch(loader, batch_size, pin_memory=pin_memory)
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


__all__ = [
    "ImageBatch",
    "batch_len",
    "collate_images",
    "decoded_batches",
    "default_workers",
    "rebatch",
    "reuse_decode_workers",
]
