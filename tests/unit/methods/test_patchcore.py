"""PatchCore: exact coreset size, greedy k-center choice, exact nearest-neighbour distances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from harmoniad.backbone import TINY_BACKBONE
from harmoniad.data import load_dataset, make_synthetic
from harmoniad.backbone.cache import FeatureCache
from harmoniad.methods.base import Context
from harmoniad.methods.patchcore import (
    MulticlassPatchCore,
    PatchCore,
    PatchCoreConfig,
    coreset_size,
    embed_patches,
    greedy_coreset,
    middle_layers,
    nearest_distances,
)

RES = 64


@pytest.mark.parametrize(("n", "fraction"), [(1000, 0.1), (999, 0.1), (37, 0.25), (5, 0.01), (8, 1.0)])
def test_coreset_keeps_exactly_the_requested_fraction(n: int, fraction: float) -> None:
    features = torch.randn(n, 16, generator=torch.Generator().manual_seed(n))
    idx = greedy_coreset(features, fraction, seed=3)
    assert len(idx) == coreset_size(n, fraction) == min(n, max(1, math.ceil(fraction * n)))
    assert len(set(idx.tolist())) == len(idx)  # distinct rows
    assert torch.equal(idx, greedy_coreset(features, fraction, seed=3))  # seeded


def test_coreset_is_greedy_k_center_and_handles_duplicates() -> None:
    features = torch.randn(300, 8, generator=torch.Generator().manual_seed(0))
    idx = greedy_coreset(features, 0.1, projection_dim=8, seed=1).tolist()  # no projection at D=8
    # Reference: farthest-point selection from the same start, one point at a time.
    x = features.double().numpy()
    chosen = [idx[0]]
    for _ in range(len(idx) - 1):
        d = np.min(((x[:, None, :] - x[chosen][None]) ** 2).sum(-1), axis=1)
        d[chosen] = -1
        chosen.append(int(np.argmax(d)))
    assert idx == chosen
    duplicates = torch.zeros(50, 4)  # all rows identical: still ceil(0.2 * 50) distinct indices
    assert len(set(greedy_coreset(duplicates, 0.2).tolist())) == 10


def test_coreset_projection_used_for_wide_features() -> None:
    features = torch.randn(400, 512, generator=torch.Generator().manual_seed(2))
    idx = greedy_coreset(features, 0.05, projection_dim=32, seed=0)
    assert len(idx) == 20 and len(set(idx.tolist())) == 20


def test_nearest_distances_match_brute_force() -> None:
    g = torch.Generator().manual_seed(4)
    queries, bank = torch.randn(257, 24, generator=g), torch.randn(90, 24, generator=g)
    got = nearest_distances(queries, bank).numpy()
    q, b = queries.double().numpy(), bank.double().numpy()
    want = np.array([min(np.sqrt(((qi - bj) ** 2).sum()) for bj in b) for qi in q])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_middle_layers_and_embedding_shape() -> None:
    assert middle_layers(4) == (1, 2) and middle_layers(1) == (0,) and middle_layers(2) == (0, 1)
    maps = [torch.randn(2, 8, 5, 5) for _ in range(4)]
    out = embed_patches(maps, PatchCoreConfig(embed_dim=12), torch.device("cpu"))
    assert out.shape == (2, 5, 5, 12)
    # With a 1x1 neighbourhood and no channel pooling the embedding is the two layers concatenated.
    raw = embed_patches(maps, PatchCoreConfig(neighbourhood=1, embed_dim=64), torch.device("cpu"))
    assert torch.equal(raw, torch.cat([maps[1], maps[2]], dim=1).permute(0, 2, 3, 1))
    with pytest.raises(ValueError, match="out of range"):
        embed_patches(maps, PatchCoreConfig(layers=(7,)), torch.device("cpu"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[list, list, Context]:
    root = tmp_path_factory.mktemp("pc")
    data = make_synthetic(root / "data", seed=0, n_train=6, n_test=6, size=64)
    categories = sorted({s.category for s in load_dataset("synthetic", data, split="train")})[:2]
    train = load_dataset("synthetic", data, categories, split="train")
    test = load_dataset("synthetic", data, categories, split="test")
    return train, test, Context(resolution=RES, backbone=TINY_BACKBONE, cache_root=root / "cache", seed=0)


def test_scores_are_brute_force_nearest_bank_distances(setup: tuple[list, list, Context]) -> None:
    train, test, ctx = setup
    method = PatchCore(PatchCoreConfig(coreset_fraction=0.1))
    method.fit(train, ctx)
    category = test[0].category
    samples = [s for s in test if s.category == category]
    pred = method.predict(samples, ctx)
    assert pred.scores.shape == (len(samples),) and pred.maps.shape == (len(samples), RES, RES)

    bank = method.banks[category]
    cache = FeatureCache(TINY_BACKBONE, root=ctx.cache_root / "features")
    train_maps = cache.load(
        [s.image_path for s in train if s.category == category]
    )
    n_patches = math.prod(train_maps[0].shape[-2:]) * len([s for s in train if s.category == category])
    assert bank.shape[0] == math.ceil(0.1 * n_patches)

    test_maps = cache.load([s.image_path for s in samples])
    patches = embed_patches(test_maps, method.cfg, torch.device("cpu")).double()
    flat = patches.reshape(len(samples), -1, patches.shape[-1])
    brute = ((flat[:, :, None, :] - bank.double()[None, None]) ** 2).sum(-1).sqrt().min(-1).values.max(-1).values
    np.testing.assert_allclose(pred.scores, brute.numpy(), rtol=1e-4, atol=1e-5)


def test_per_category_versus_multiclass_bank(setup: tuple[list, list, Context]) -> None:
    train, test, ctx = setup
    categories = sorted({s.category for s in train})
    per_cat = PatchCore(PatchCoreConfig(coreset_fraction=1.0))
    multi = MulticlassPatchCore(PatchCoreConfig(coreset_fraction=1.0, per_category=False))
    per_cat.fit(train, ctx)
    multi.fit(train, ctx)
    assert sorted(per_cat.banks) == categories
    assert list(multi.banks) == ["*"]
    assert multi.banks["*"].shape[0] == sum(b.shape[0] for b in per_cat.banks.values())
    for category in categories:
        samples = [s for s in test if s.category == category]
        # The full multi-class bank contains the category's bank: never farther, ...
        a, b = per_cat.predict(samples, ctx).scores, multi.predict(samples, ctx).scores
        assert np.all(b <= a + 1e-5)
        # ... and a training image is at distance 0 from a full bank of its own category.
        own = [s for s in train if s.category == category][:2]
        np.testing.assert_allclose(per_cat.predict(own, ctx).scores, 0.0, atol=1e-6)
    with pytest.raises(RuntimeError, match="no memory bank"):
        _predict_other(train, test, ctx)
    assert MulticlassPatchCore.name == "patchcore_multiclass" and PatchCore.name == "patchcore"


def _predict_other(train: list, test: list, ctx: Context) -> None:
    """Fit one category, then ask for another."""
    method = PatchCore(PatchCoreConfig())
    first = train[0].category
    method.fit([s for s in train if s.category == first], ctx)
    method.predict([s for s in test if s.category != first][:1], ctx)
