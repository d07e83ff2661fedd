"""FeatureCache: values, hits without a backbone, resume after interruption, repair of bad files."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save as safetensors_save

import harmoniad.backbone.cache as features_mod
from harmoniad.backbone import TINY_BACKBONE, Backbone, BackboneConfig, file_sha256
from harmoniad.data import read_image
from harmoniad.backbone.cache import FeatureCache
from harmoniad.runtime.progress import Cancelled, ProgressEvent


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    return Backbone(TINY_BACKBONE, "cpu")


@pytest.fixture()
def images(tmp_path) -> list[Path]:
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    paths = []
    for i in range(5):
        size = (40, 48) if i != 3 else (30, 30)  # one odd size in the mix
        path = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def _cache(tmp_path, backbone=TINY_BACKBONE, **kwargs) -> FeatureCache:
    return FeatureCache(backbone, root=tmp_path / "cache", batch_size=2, device="cpu", **kwargs)


def _direct(tiny: Backbone, paths) -> list[torch.Tensor]:
    return tiny.extract(tiny.preprocess([read_image(p) for p in paths]))


def _feature_files(cache: FeatureCache) -> list[Path]:
    return sorted(cache.directory.rglob("*.safetensors"))


def test_load_gives_backbone_features_in_order(tmp_path, images, tiny):
    cache = _cache(tmp_path, tiny)
    order = [images[2], images[0], images[4], images[1], images[3]]
    feats = cache.load(order, progress=lambda e: None)
    direct = _direct(tiny, order)
    assert len(feats) == 4
    for got, want in zip(feats, direct):
        assert got.shape == (5, 64, 16, 16) and got.dtype == torch.float32
        torch.testing.assert_close(got, want.half().float(), rtol=0, atol=0)  # the fp16-rounded values
    files = _feature_files(cache)
    assert len(files) == 5
    sha = file_sha256(images[0])
    assert cache.feature_file(images[0]) == tmp_path / "cache" / cache.key / sha[:2] / f"{sha}.safetensors"
    assert cache.feature_file(images[0]).is_file()


def test_cached_load_needs_no_backbone(tmp_path, images, tiny, monkeypatch):
    first = _cache(tmp_path, tiny).load(images, progress=lambda e: None)

    def refuse(*args, **kwargs):
        raise AssertionError("the backbone was built although everything is cached")

    monkeypatch.setattr(Backbone, "__init__", refuse)
    again = _cache(tmp_path)  # from the config: same key, nothing built
    assert again.key == tiny.key
    assert again.ensure(images) == 0
    for a, b in zip(first, again.load(images)):
        assert torch.equal(a, b)
    assert again._backbone is None
    assert again.provenance()["random"] is True and again.provenance()["key"] == tiny.key


def test_backbone_is_built_lazily_from_a_config(tmp_path, images):
    cache = _cache(tmp_path)
    assert cache._backbone is None
    assert cache.ensure(images[:1], progress=lambda e: None) == 1
    assert isinstance(cache._backbone, Backbone)


def test_key_is_the_image_content_not_its_path(tmp_path, images, tiny):
    cache = _cache(tmp_path, tiny)
    cache.ensure(images, progress=lambda e: None)
    moved = tmp_path / "elsewhere" / "renamed.png"
    moved.parent.mkdir()
    shutil.copy(images[1], moved)
    assert cache.ensure([moved]) == 0  # same bytes, cache hit
    both = cache.load([images[1], moved])
    assert torch.equal(both[0][0], both[0][1])
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(moved)  # new content
    assert cache.ensure([moved], progress=lambda e: None) == 1


def test_duplicates_are_extracted_once(tmp_path, images, tiny):
    cache = _cache(tmp_path, tiny)
    assert cache.ensure([images[0], images[0], images[1]], progress=lambda e: None) == 2
    feats = cache.load([images[0], images[1], images[0]])
    assert torch.equal(feats[3][0], feats[3][2]) and not torch.equal(feats[3][0], feats[3][1])


def test_interrupted_extraction_resumes(tmp_path, images, tiny):
    cache = _cache(tmp_path, tiny)

    def cancel_after_first_batch(event: ProgressEvent) -> None:
        if event.done >= 2:
            raise Cancelled

    with pytest.raises(Cancelled):
        cache.ensure(images, progress=cancel_after_first_batch)
    assert len(_feature_files(cache)) == 2  # the first batch was kept
    assert not list(cache.directory.rglob("*.tmp"))

    events: list[ProgressEvent] = []
    assert cache.ensure(images, progress=events.append) == 3  # only what was missing
    assert events[-1].done == events[-1].total == 3
    for got, want in zip(cache.load(images), _direct(tiny, images)):
        torch.testing.assert_close(got, want.half().float(), rtol=0, atol=0)


def test_failure_mid_extraction_leaves_only_complete_files(tmp_path, images, tiny, monkeypatch):
    cache = _cache(tmp_path, tiny)
    real = features_mod.read_image

    def flaky(path):
        if Path(path) == images[3]:
            raise OSError(f"{path}: disk went away")
        return real(path)

    monkeypatch.setattr(features_mod, "read_image", flaky)
    with pytest.raises(OSError, match="disk went away"):
        cache.ensure(images, progress=lambda e: None)
    monkeypatch.setattr(features_mod, "read_image", real)
    leftovers = [p for p in cache.directory.rglob("*") if p.is_file() and p.suffix != ".safetensors"]
    assert leftovers == []
    files = _feature_files(cache)
    assert len(files) == 2  # batch [0, 1] written; batch [2, 3] failed before any write
    assert {f.stem for f in files} == {file_sha256(images[0]), file_sha256(images[1])}
    assert cache.ensure(images, progress=lambda e: None) == 3


def test_damaged_files_are_recomputed(tmp_path, images, tiny, caplog):
    cache = _cache(tmp_path, tiny)
    good = cache.load(images, progress=lambda e: None)
    truncated, garbage, wrong_shape, wrong_key = (cache.feature_file(p) for p in images[:4])
    truncated.write_bytes(truncated.read_bytes()[:-100])
    garbage.write_bytes(b"not a safetensors file")
    wrong_shape.write_bytes(
        safetensors_save(
            {f"layer{i}": torch.zeros(64, 8, 8, dtype=torch.float16) for i in range(4)},
            metadata={"format": features_mod.FORMAT_VERSION, "backbone_key": cache.key},
        )
    )
    wrong_key.write_bytes(
        safetensors_save(
            {f"layer{i}": torch.zeros(64, 16, 16, dtype=torch.float16) for i in range(4)},
            metadata={"format": features_mod.FORMAT_VERSION, "backbone_key": "some-other-backbone"},
        )
    )
    with caplog.at_level(logging.WARNING, logger="harmoniad.backbone.cache"):
        again = _cache(tmp_path, tiny).load(images, progress=lambda e: None)
    assert sum("damaged" in r.message for r in caplog.records) == 4
    for a, b in zip(good, again):
        assert torch.equal(a, b)
    assert _cache(tmp_path, tiny).ensure(images) == 0  # repaired on disk


def test_non_finite_values_are_recomputed(tmp_path, images, tiny):
    cache = _cache(tmp_path, tiny)
    good = cache.load(images[:1], progress=lambda e: None)
    bad = [torch.full((64, 16, 16), float("nan"), dtype=torch.float16) for _ in range(4)]
    cache._write(file_sha256(images[0]), bad)
    assert cache.ensure(images[:1]) == 0  # header checks pass...
    again = cache.load(images[:1], progress=lambda e: None)  # ...but a full read catches it
    assert torch.equal(good[0], again[0])


def test_files_are_fp16_with_provenance_metadata(tmp_path, images, tiny):
    from safetensors import safe_open

    cache = _cache(tmp_path, tiny)
    cache.ensure(images[:1], progress=lambda e: None)
    with safe_open(str(cache.feature_file(images[0])), framework="pt") as fh:
        meta = fh.metadata()
        assert sorted(fh.keys()) == ["layer0", "layer1", "layer2", "layer3"]
        assert fh.get_tensor("layer0").dtype == torch.float16
    assert meta["backbone_key"] == tiny.key and meta["image_sha256"] == file_sha256(images[0])
    assert meta["layers"] == "1,2,3,4"


def test_backbones_do_not_share_features(tmp_path, images, tiny):
    full = _cache(tmp_path, tiny)
    two = _cache(tmp_path, BackboneConfig("harmoniad-tiny", "random", 128, layers=(2, 4)))
    assert full.directory != two.directory
    full.ensure(images[:2], progress=lambda e: None)
    assert two.ensure(images[:2], progress=lambda e: None) == 2
    a, b = full.load(images[:2]), two.load(images[:2])
    assert len(b) == 2 and torch.equal(b[0], a[1]) and torch.equal(b[1], a[3])


def test_empty_and_missing_inputs(tmp_path, images, tiny):
    cache = _cache(tmp_path, tiny)
    assert [t.shape for t in cache.load([])] == [(0, 64, 16, 16)] * 4
    with pytest.raises(FileNotFoundError, match="nope.png"):
        cache.load([tmp_path / "nope.png"])
    with pytest.raises(ValueError, match="batch_size"):
        FeatureCache(TINY_BACKBONE, root=tmp_path, batch_size=0)
    with pytest.raises(TypeError, match="BackboneConfig or a Backbone"):
        FeatureCache("harmoniad-tiny", root=tmp_path)  # type: ignore[arg-type]


def test_default_root_is_under_the_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("HARMONIAD_CACHE", str(tmp_path / "hc"))
    assert FeatureCache(TINY_BACKBONE).directory.parent == tmp_path / "hc" / "features"
