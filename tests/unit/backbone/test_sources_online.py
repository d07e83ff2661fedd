"""Training features on the fly (the GPU default) or from the cache (the CPU default): same numbers, same identity."""

from __future__ import annotations

import torch

from harmoniad.backbone import TINY_BACKBONE
from harmoniad.backbone.sources import BackboneSource, CacheSource, source_from_samples
from harmoniad.data import load_dataset, make_synthetic


def test_online_and_cached_training_sources_agree(tmp_path):
    root = make_synthetic(tmp_path / "data", categories=("weave",), n_train=5, n_test=2, size=64)
    samples = load_dataset("synthetic", root, split="train")
    cached = source_from_samples(samples, TINY_BACKBONE, cache_root=tmp_path / "features", device="cpu")
    online = source_from_samples(samples, TINY_BACKBONE, cache_root=tmp_path / "none", device="cpu", online=True)
    assert isinstance(cached, CacheSource) and isinstance(online, BackboneSource)
    assert not (tmp_path / "none").exists()  # nothing written on the fly
    # The description is what a checkpoint's identity is made of: it must not depend on the route.
    assert online.describe() == cached.describe()
    order = [3, 0, 4]
    for a, b in zip(online.load(order), cached.load(order)):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)  # the cache keeps fp16


def test_the_default_follows_the_device(tmp_path, monkeypatch):
    root = make_synthetic(tmp_path / "data", categories=("weave",), n_train=3, n_test=2, size=64)
    samples = load_dataset("synthetic", root, split="train")
    assert isinstance(source_from_samples(samples, TINY_BACKBONE, cache_root=tmp_path / "f", device="cpu"), CacheSource)
    built = []
    monkeypatch.setattr("harmoniad.backbone.sources.resolve_device", lambda d: torch.device("cuda"), raising=False)
    monkeypatch.setattr("harmoniad.runtime.device.resolve_device", lambda d: torch.device("cuda"))
    monkeypatch.setattr("harmoniad.backbone.sources.Backbone", lambda cfg, dev: built.append(dev) or "live")
    monkeypatch.setattr("harmoniad.backbone.sources.BackboneSource",
                        lambda backbone, paths, description: ("online", backbone, len(paths)))
    assert source_from_samples(samples, TINY_BACKBONE, cache_root=tmp_path / "g", device="cuda") == ("online", "live", 3)
    assert built == [torch.device("cuda")] and not (tmp_path / "g").exists()
