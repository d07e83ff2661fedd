"""FeatureCache and the disk: a size estimate that refuses before filling it, writes without fsync, write errors surface."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import harmoniad.backbone.cache as cache_mod
import harmoniad.runtime.atomic as atomic_mod
from harmoniad.backbone import TINY_BACKBONE, BackboneConfig
from harmoniad.backbone.cache import CacheSpaceError, FeatureCache
from harmoniad.backbone.encoder import resolve_spec

GIB = 1 << 30


@pytest.fixture()
def images(tmp_path) -> list[Path]:
    rng = np.random.default_rng(1)
    (tmp_path / "img").mkdir()
    paths = [tmp_path / "img" / f"{i}.png" for i in range(5)]
    for p in paths:
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(p)
    return paths


def _cache(tmp_path, **kwargs) -> FeatureCache:
    return FeatureCache(TINY_BACKBONE, root=tmp_path / "cache", batch_size=2, device="cpu", **kwargs)


def test_size_per_image_is_the_fp16_maps_plus_a_header(tmp_path, images):
    cache = _cache(tmp_path)
    cache.ensure(images)
    sizes = [f.stat().st_size for f in cache.directory.rglob("*.safetensors")]
    assert len(sizes) == len(images)
    assert max(sizes) <= cache.bytes_per_image < max(sizes) + 8192
    # The figure: ViT-L-14-336, 4 layers of 1024 x 24 x 24 in fp16, ~4.5 MiB an image.
    big = FeatureCache(BackboneConfig(model="ViT-L-14-336", weights="random", image_size=336), root=tmp_path)
    assert big.bytes_per_image == pytest.approx(4.5 * (1 << 20), rel=0.01)
    assert resolve_spec(big.config).feature_shapes == [(1024, 24, 24)] * 4


def test_refuses_before_writing_when_the_disk_would_drop_below_the_margin(tmp_path, images, monkeypatch):
    cache = _cache(tmp_path, min_free_gib=5.0)
    per_image = cache.bytes_per_image
    # 5 images need ~5 x 266 KiB; with the margin 2 KiB short of fitting, nothing may be computed.
    monkeypatch.setattr(cache_mod, "free_bytes", lambda path: 5 * GIB + 5 * per_image - 2048)
    monkeypatch.setattr(FeatureCache, "_features", lambda *a: pytest.fail("the backbone ran"))
    with pytest.raises(CacheSpaceError) as err:
        cache.ensure(images)
    message = str(err.value)
    assert str(cache.directory) in message and "5 images" in message and "5 GiB must stay free" in message
    assert "on the fly" in message and "HARMONIAD_CACHE" in message
    assert not list((tmp_path / "cache").rglob("*.safetensors"))
    monkeypatch.undo()
    monkeypatch.setattr(cache_mod, "free_bytes", lambda path: 5 * GIB + 5 * per_image + 2048)
    assert cache.ensure(images) == 5  # just enough: it goes ahead
    assert cache.ensure(images) == 0  # and nothing more is needed (no check, no refusal)


def test_cache_writes_are_atomic_renames_without_fsync(tmp_path, images, monkeypatch):
    synced = []
    monkeypatch.setattr(atomic_mod.os, "fsync", lambda fd: synced.append(fd))
    cache = _cache(tmp_path)
    assert cache.ensure(images) == 5
    assert synced == []
    assert not [p for p in cache.directory.rglob("*") if p.name.endswith(".tmp")]
    atomic_mod.atomic_write_bytes(tmp_path / "other.bin", b"x")  # everything else stays durable
    assert len(synced) == 1


def test_a_write_error_in_the_background_writer_stops_extraction(tmp_path, images, monkeypatch):
    cache = _cache(tmp_path)
    real = FeatureCache._write
    written = []

    def failing(self, digest, tensors):
        if len(written) == 2:
            raise OSError(28, "No space left on device")
        real(self, digest, tensors)
        written.append(digest)

    monkeypatch.setattr(FeatureCache, "_write", failing)
    with pytest.raises(OSError, match="No space left"):
        cache.ensure(images)
    assert len(list(cache.directory.rglob("*.safetensors"))) == 2
    monkeypatch.undo()
    assert cache.ensure(images) == 3  # resumes with the rest
    assert os.path.isdir(cache.directory)
