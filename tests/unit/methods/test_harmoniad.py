"""The HarmoniAD method's Scorer: features, images and checkpoints in, maps and scores out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from harmoniad.backbone import TINY_BACKBONE, Backbone, BackboneConfig
from harmoniad.maps import (
    FinalMaps,
    ScoreConfig,
)
from harmoniad.methods.harmoniad import Scorer
from harmoniad.model import GridMaps, HarmoniAD, ModelConfig
from harmoniad.train import CheckpointInfo, TrainConfig, build_model, save_checkpoint

SMALL = ModelConfig(hidden_dim=16, fsam_heads=2, gscm_heads=2, fsam_window=4)


def _grid(b: int = 3, h: int = 6, w: int = 6, branches: bool = True) -> GridMaps:
    gen = torch.Generator().manual_seed(0)
    maps = [torch.rand(b, h, w, generator=gen) for _ in range(3)]
    return GridMaps(maps[0], maps[1] if branches else None, maps[2] if branches else None)


def test_scorer_on_features_images_and_checkpoint(tmp_path: Path) -> None:
    backbone = Backbone(TINY_BACKBONE, device="cpu")
    model = build_model(SMALL, backbone.embed_dim, backbone.num_layers, seed=0)
    scorer = Scorer(model, backbone, ScoreConfig(resolution=32), device="cpu", batch_size=2)
    images = [np.random.default_rng(i).integers(0, 255, (48, 40, 3), dtype=np.uint8) for i in range(3)]
    pred = scorer.score_images(images)
    assert pred.maps.shape == pred.high_maps.shape == pred.low_maps.shape == (3, 32, 32)
    assert pred.scores.shape == (3,) and pred.maps.dtype == np.float32
    direct = scorer.score_features(backbone.extract(backbone.preprocess(images)))
    assert isinstance(direct, FinalMaps)
    np.testing.assert_allclose(direct.scores.numpy(), pred.scores, rtol=1e-5)

    info = CheckpointInfo("harmoniad-checkpoint", 1, "test", SMALL, TINY_BACKBONE, TrainConfig(),
                          backbone.embed_dim, backbone.num_layers, backbone.grid)
    save_checkpoint(tmp_path / "ckpt", model, info, {})
    reloaded = Scorer.from_checkpoint(tmp_path / "ckpt", ScoreConfig(resolution=32), device="cpu", use_cache=False,
                                        batch_size=2)
    assert reloaded.info is not None and reloaded.info.backbone == TINY_BACKBONE
    np.testing.assert_array_equal(reloaded.score_images(images).maps, pred.maps)

    other = HarmoniAD(SMALL, in_dim=backbone.embed_dim * 2, num_layers=backbone.num_layers)
    with pytest.raises(ValueError, match="channels"):
        Scorer(other, backbone, device="cpu")


def test_trained_tiny_model_finds_large_defects(tmp_path: Path) -> None:
    """End to end on the synthetic 'grain' texture: images -> cached features -> training -> checkpoint ->
    scorer. (Whether training is what finds defects is tested on features with a known structure in
    ``tests/unit/train/test_train.py``: on this tiny texture set the normalised features alone already
    separate the large colour defect.)"""
    from harmoniad.data import load_dataset, make_synthetic, read_mask
    from harmoniad.metrics import image_metrics, pixel_metrics
    from harmoniad.train import train

    root = make_synthetic(tmp_path / "data", seed=0, categories=["grain"], n_train=8, n_test=12, size=64)
    train_set = load_dataset("synthetic", root, split="train")
    test_set = load_dataset("synthetic", root, split="test")
    backbone = BackboneConfig(model=TINY_BACKBONE.model, weights="random", image_size=64)
    model_cfg = ModelConfig(hidden_dim=32, fsam_heads=2, gscm_heads=2, fsam_window=4)
    out = train(train_set, backbone, model_cfg, TrainConfig(max_steps=40, batch_size=8, lr=3e-3),
                tmp_path / "ckpt", cache_root=tmp_path / "cache", device="cpu", progress=lambda e: None)
    scorer = Scorer.from_checkpoint(out, ScoreConfig(resolution=64), device="cpu", cache_root=tmp_path / "cache")
    pred = scorer.score_samples(test_set, progress=lambda e: None)
    labels = np.array([s.label for s in test_set])
    masks = np.stack([
        read_mask(s.mask_path) if s.mask_path is not None else np.zeros((64, 64), dtype=bool) for s in test_set
    ])
    assert labels.sum() >= 2 and (labels == 0).sum() >= 2
    pixel = pixel_metrics(masks, pred.maps)
    image = image_metrics(labels, pred.scores)
    assert pixel["auroc"] > 0.85, pixel
    assert image["auroc"] >= 0.9, image
    assert pred.scores[labels == 1].mean() > pred.scores[labels == 0].mean()


def test_ablations_report_under_their_own_names() -> None:
    from harmoniad.methods import METHODS, build_method

    ablations = [name for name, spec in METHODS.items() if spec.kind == "ablation"]
    assert len(ablations) == 3
    for name in ablations:
        assert build_method(name).name == name


def test_training_takes_the_evaluation_seed_unless_options_fix_one(tmp_path, monkeypatch) -> None:
    import harmoniad.methods.harmoniad as module
    from harmoniad.methods import build_method
    from harmoniad.methods.base import Context

    seen: list[tuple[int, Path]] = []

    class Stop(Exception):
        pass

    def fake_train(samples, backbone, model_cfg, train_cfg, out, **kwargs):
        seen.append((train_cfg.seed, Path(out)))
        raise Stop

    monkeypatch.setattr(module, "train", fake_train)
    ctx = Context(backbone=TINY_BACKBONE, cache_root=tmp_path, seed=7)
    for options in ({}, {"train": {"seed": 3}}):
        with pytest.raises(Stop):
            build_method("harmoniad", options).fit([], ctx)
    with pytest.raises(Stop):
        build_method("harmoniad").fit([], Context(backbone=TINY_BACKBONE, cache_root=tmp_path, seed=8))
    assert [s for s, _ in seen] == [7, 3, 8]
    assert len({out for _, out in seen}) == 3  # each seed trains into its own checkpoint folder


def test_scoring_halves_the_heads_batch_on_out_of_memory(monkeypatch) -> None:
    from harmoniad.backbone.sources import TensorSource

    model = build_model(SMALL, 64, 4, seed=0)
    scorer = Scorer(model, None, ScoreConfig(resolution=16), device="cpu", batch_size=4)
    real, sizes = scorer.score_features, []

    def tight_memory(feats):
        sizes.append(int(feats[0].shape[0]))
        if sizes[-1] > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(feats)

    monkeypatch.setattr(scorer, "score_features", tight_memory)
    feats = [torch.randn(5, 64, 6, 6, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    pred = scorer.score_source(TensorSource(feats))
    assert pred.maps.shape == (5, 16, 16)
    assert sizes[0] == 4 and max(sizes[1:]) <= 2 and sum(s for s in sizes if s <= 2) == 5
    torch.testing.assert_close(torch.from_numpy(pred.scores), torch.from_numpy(
        Scorer(model, None, ScoreConfig(resolution=16), device="cpu", batch_size=8).score_source(TensorSource(feats)).scores))
