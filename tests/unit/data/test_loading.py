"""harmoniad.data.loading: decode workers share every batch, and chunks come back as the same batches."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from harmoniad.data.loading import batch_len, decoded_batches, rebatch


def pid_image(path: Path) -> np.ndarray:
    """A 2 x 2 'image' whose pixels spell the decoding process' id (and the file's number)."""
    pid = os.getpid()
    img = np.zeros((2, 2, 3), dtype=np.uint8)
    img[0, 0] = [(pid >> 16) & 255, (pid >> 8) & 255, pid & 255]
    img[1, 1, 0] = int(Path(path).stem)
    return img


def test_one_batch_is_decoded_by_every_worker_in_order():
    # A category smaller than one batch: a DataLoader batch per worker would leave one worker doing it all.
    paths = [Path(f"{i}.png") for i in range(12)]
    batches = list(decoded_batches(paths, 64, workers=2, processes=True, reader=pid_image))
    assert len(batches) == 1 and batch_len(batches[0]) == 12
    batch = batches[0].numpy()
    assert batch[:, 1, 1, 0].tolist() == list(range(12))  # in order
    pids = {tuple(img[0, 0]) for img in batch}
    assert len(pids) == 2


@pytest.mark.parametrize("sizes,batch", [([4, 4, 4, 1], 5), ([3, 3, 3], 3), ([2, 5, 1], 4), ([7], 2)])
def test_rebatch_gives_full_batches_in_order(sizes, batch):
    start, chunks = 0, []
    for n in sizes:
        chunks.append(torch.arange(start, start + n).view(n, 1, 1, 1).expand(n, 2, 2, 3).to(torch.uint8).clone())
        start += n
    out = list(rebatch(chunks, batch))
    assert [batch_len(b) for b in out] == [batch] * (start // batch) + ([start % batch] if start % batch else [])
    assert torch.cat(out)[:, 0, 0, 0].tolist() == list(range(start))


def test_rebatch_of_mixed_image_sizes_gives_lists_of_arrays():
    a = torch.zeros(2, 4, 4, 3, dtype=torch.uint8)
    b = [np.ones((5, 5, 3), dtype=np.uint8)]
    out = list(rebatch([a, b], 3))
    assert len(out) == 1 and isinstance(out[0], list)
    assert [img.shape for img in out[0]] == [(4, 4, 3), (4, 4, 3), (5, 5, 3)]
