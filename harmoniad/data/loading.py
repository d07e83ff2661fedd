"""Image loading for scoring and feature extraction: decoding off the main thread, in order.

- :func:`decoded_batches` decodes images ahead of the compute. On CUDA it uses a torch
  ``DataLoader`` with worker processes (decoding large PNGs is CPU-bound and would starve
  a GPU) and pinned memory (so the host-to-device copy of the raw pixels is asynchronous);
  each worker decodes chunks of about ``batch / workers`` images, joined back into batches
  in order (:func:`rebatch`), so even a one-batch category is decoded by every worker;
  on the CPU a small thread pool, which costs no process start-up and leaves the cores to
  the model. Both yield the same batches: a uint8 ``B x H x W x 3`` tensor when the images
  share a size, else the list of ``H x W x 3`` arrays.

Channels-last: the backbone is a ViT whose work is token matrix products, where memory
format does not apply; HarmoniAD's depthwise convolutions receive token maps that are
channels-last views already (``tokens_to_map``), so no extra conversion is made.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
        # A DataLoader hands each worker whole batches, so a category that fits in one batch
        # would be decoded by one worker while the others idle: workers decode small chunks
        # instead (about a batch's share each, two batches ahead), joined here in order.
        chunk = max(1, min(MAX_CHUNK, math.ceil(min(batch_size, len(plist)) / workers)))
        loader = DataLoader(
            _ImageFiles(plist, reader),
            batch_size=chunk,
            shuffle=False,
            num_workers=min(workers, math.ceil(len(plist) / chunk)),
            collate_fn=collate_images,
            pin_memory=pin_memory,
            prefetch_factor=max(2, math.ceil(2 * batch_size / (chunk * workers))),
        )
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
]
