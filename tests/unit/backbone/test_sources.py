"""Feature sources: every producer (tensors, cache, live backbone, a subset) gives the same features."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harmoniad.backbone import TINY_BACKBONE, Backbone
from harmoniad.backbone.cache import FeatureCache
from harmoniad.backbone.sources import BackboneSource, CacheSource, TensorSource, source_for


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("imgs")
    paths = []
    for i in range(5):
        rgb = np.random.default_rng(i).integers(0, 255, (40 + i, 36, 3), dtype=np.uint8)
        paths.append(root / f"{i}.png")
        Image.fromarray(rgb).save(paths[-1])
    return paths


def _cat(batches: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.cat(layer) for layer in zip(*batches, strict=True)]


def test_cache_and_live_backbone_give_the_same_features_in_order(images: list[Path], tmp_path: Path) -> None:
    backbone = Backbone(TINY_BACKBONE, device="cpu")
    live = source_for(backbone, images)
    cached = source_for(FeatureCache(TINY_BACKBONE, root=tmp_path, device="cpu"), images)
    assert isinstance(live, BackboneSource) and isinstance(cached, CacheSource)
    a, b = _cat(list(live.batches(2))), _cat(list(cached.batches(3)))
    assert len(a) == len(b) == backbone.num_layers
    for x, y in zip(a, b, strict=True):
        assert x.shape == (5, *backbone.feature_shapes[0])
        torch.testing.assert_close(x, y.float(), atol=2e-3, rtol=2e-3)  # the cache stores fp16
    # load by index agrees with the in-order batches (reversed order, one image per layer map)
    for x, y in zip(live.load([4, 0]), a, strict=True):
        torch.testing.assert_close(x, y[[4, 0]], atol=1e-5, rtol=1e-5)


def test_a_subset_is_a_view_on_the_parent_indices() -> None:
    feats = [torch.arange(6.0).reshape(6, 1, 1, 1), -torch.arange(6.0).reshape(6, 1, 1, 1)]
    sub = TensorSource(feats).subset([5, 1, 3])
    assert len(sub) == 3
    got = _cat(list(sub.batches(2)))
    assert got[0].flatten().tolist() == [5.0, 1.0, 3.0]
    assert got[1].flatten().tolist() == [-5.0, -1.0, -3.0]
    with pytest.raises(IndexError, match="out of range"):
        TensorSource(feats).subset([6])


def test_source_for_refuses_what_is_not_a_feature_provider(images: list[Path]) -> None:
    with pytest.raises(TypeError, match="FeatureCache or a Backbone"):
        source_for(object(), images)  # type: ignore[arg-type]


def test_a_source_with_only_load_is_read_in_order() -> None:
    from harmoniad.backbone.sources import FeatureSource, in_order

    class Minimal:  # the protocol's three methods, nothing inherited
        def __len__(self) -> int:
            return 5

        def load(self, indices):
            return [torch.tensor(list(indices), dtype=torch.float32).reshape(-1, 1, 1, 1)]

        def describe(self):
            return {}

    assert isinstance(Minimal(), FeatureSource)
    got = torch.cat([b[0] for b in in_order(Minimal(), 2)]).flatten().tolist()
    assert got == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_live_load_decodes_a_training_batch_in_several_threads(images: list[Path], monkeypatch) -> None:
    # Training's shuffled batches come through load(); one decoding thread made a GPU step wait on it.
    import threading
    import time

    import harmoniad.data.io as image_io
    import harmoniad.data.loading as loading

    read, threads = image_io.read_image, set()

    def slow_read(path: Path) -> np.ndarray:
        threads.add(threading.get_ident())
        time.sleep(0.05)  # long enough that the pool starts a thread for every file
        return read(path)

    backbone = Backbone(TINY_BACKBONE, device="cpu")
    live = BackboneSource(backbone, images)
    expected = live.load([3, 1, 4, 2])
    monkeypatch.setattr(image_io, "read_image", slow_read)
    monkeypatch.setattr(loading, "default_workers", lambda device: 4)
    got = live.load([3, 1, 4, 2])
    assert len(threads) == 4 and threading.get_ident() not in threads
    for x, y in zip(got, expected, strict=True):
        torch.testing.assert_close(x, y)  # same images, same order
