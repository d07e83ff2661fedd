"""harmoniad.data.loading: decode workers share every batch, and chunks come back as the same batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from harmoniad.data import DatasetError
from harmoniad.data.loading import batch_len, decoded_batches, rebatch, reuse_decode_workers
from tests.fixtures.decoding import decoder_pids, pid_image


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


# -- reuse_decode_workers: worker processes started once for many calls --------------------------


def _decode(paths: list[Path], **kw: object) -> tuple[list[int], set[tuple[int, ...]]]:
    """File numbers in the order decoded and the set of worker pids, of one decoded_batches call."""
    batches = list(decoded_batches(paths, 4, workers=2, processes=True, reader=pid_image, **kw))
    return np.concatenate([b.numpy() for b in batches])[:, 1, 1, 0].tolist(), decoder_pids(batches)


def _pid(spelled: tuple[int, ...]) -> int:
    return (int(spelled[0]) << 16) | (int(spelled[1]) << 8) | int(spelled[2])


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split(")")[-1][:3]


def _files(first: int, n: int) -> list[Path]:
    return [Path(f"{i}.png") for i in range(first, first + n)]


def test_calls_outside_the_block_start_their_own_workers():
    _, pids_a = _decode(_files(0, 8))
    _, pids_b = _decode(_files(0, 8))
    assert len(pids_a) == 2 and not pids_a & pids_b


def test_calls_inside_the_block_reuse_the_same_workers_then_stop_them():
    with reuse_decode_workers():
        order_a, pids_a = _decode(_files(0, 8))
        order_b, pids_b = _decode(_files(20, 11))  # another length, another list
        order_c, pids_c = _decode(_files(40, 3))  # fewer than a batch
        assert order_a == list(range(8)) and order_b == list(range(20, 31)) and order_c == [40, 41, 42]
        assert len(pids_a) == 2 and pids_b <= pids_a and pids_c <= pids_a
        assert all(_alive(_pid(p)) for p in pids_a)
    assert not any(_alive(_pid(p)) for p in pids_a)


def test_a_pass_stopped_early_is_not_read_by_the_next_call():
    with reuse_decode_workers():
        _, pids_a = _decode(_files(0, 8))
        gen = decoded_batches(_files(0, 40), 4, workers=2, processes=True, reader=pid_image)
        next(gen)
        gen.close()  # stopped after one batch: the rest of that pass must not reach the next call
        order, pids_b = _decode(_files(100, 9))
        assert order == list(range(100, 109))
        assert not pids_a & pids_b  # the stopped pass's workers were closed, fresh ones decoded this


def bad_seven(path: Path) -> np.ndarray:
    if Path(path).stem == "7":
        raise DatasetError(f"{path}: not an image")
    return pid_image(path)


def test_a_decode_error_reaches_the_caller_and_the_next_call_still_works():
    with reuse_decode_workers():
        with pytest.raises(DatasetError, match="7.png: not an image"):
            list(decoded_batches(_files(0, 12), 4, workers=2, processes=True, reader=bad_seven))
        order, _ = _decode(_files(0, 12))
        assert order == list(range(12))


def test_two_passes_read_at_once_each_get_their_own_images():
    with reuse_decode_workers():
        first = decoded_batches(_files(0, 12), 4, workers=2, processes=True, reader=pid_image)
        got_first = [next(first).numpy()]
        order, _ = _decode(_files(50, 10))  # while the first pass is still open
        got_first += [b.numpy() for b in first]
        assert order == list(range(50, 60))
        assert np.concatenate(got_first)[:, 1, 1, 0].tolist() == list(range(12))
