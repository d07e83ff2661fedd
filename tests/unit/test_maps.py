"""Scoring: final maps and scores from grid maps, the Scorer, and an end-to-end check on synthetic data."""

from __future__ import annotations


import numpy as np
import pytest
import torch
from scipy import ndimage

from harmoniad.maps import (
    ScoreConfig,
    finalize_maps,
    gaussian_blur,
    image_scores,
    resize_and_blur,
    upsample,
)
from harmoniad.model import GridMaps, ModelConfig

SMALL = ModelConfig(hidden_dim=16, fsam_heads=2, gscm_heads=2, decoder_heads=2, fsam_window=4)


def _grid(b: int = 3, h: int = 6, w: int = 6, branches: bool = True) -> GridMaps:
    gen = torch.Generator().manual_seed(0)
    maps = [torch.rand(b, h, w, generator=gen) for _ in range(3)]
    return GridMaps(maps[0], maps[1] if branches else None, maps[2] if branches else None)


def test_finalize_shapes_and_types() -> None:
    final = finalize_maps(_grid(), ScoreConfig(resolution=48))
    assert final.anomaly.shape == final.high.shape == final.low.shape == (3, 48, 48)
    assert final.scores.shape == (3,) and final.anomaly.dtype == torch.float32
    arrays = final.numpy()
    assert arrays["maps"].shape == (3, 48, 48) and arrays["scores"].dtype == np.float32
    no_branches = finalize_maps(_grid(branches=False), ScoreConfig(resolution=32))
    assert no_branches.high is None and no_branches.low is None and no_branches.anomaly.shape == (3, 32, 32)


def test_each_map_is_processed_on_its_own() -> None:
    """Batching anomaly/high/low through one blur must not mix them up."""
    grid = _grid()
    together = finalize_maps(grid, ScoreConfig(resolution=40))
    alone = finalize_maps(GridMaps(grid.high, None, None), ScoreConfig(resolution=40))
    torch.testing.assert_close(together.high, alone.anomaly)


@pytest.mark.parametrize("sigma", [1.0, 4.0])
def test_gaussian_blur_matches_scipy(sigma: float) -> None:
    maps = np.random.default_rng(0).random((2, 40, 52)).astype(np.float32)
    ours = gaussian_blur(torch.from_numpy(maps), sigma).numpy()
    ref = np.stack([ndimage.gaussian_filter(m, sigma, mode="mirror", truncate=4.0) for m in maps])
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_blur_keeps_uniform_maps_and_mass_in_the_middle() -> None:
    flat = torch.full((1, 20, 20), 0.7)
    torch.testing.assert_close(gaussian_blur(flat, 4.0), flat)  # kernel wider than the map: replicate borders
    spike = torch.zeros(1, 64, 64)
    spike[0, 32, 32] = 1.0
    blurred = gaussian_blur(spike, 4.0)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-4) and blurred.argmax().item() == 32 * 64 + 32
    assert torch.equal(gaussian_blur(spike, 0.0), spike)


@pytest.mark.parametrize("grid, resolution, sigma", [((6, 6), 64, 4.0), ((5, 9), 48, 2.0), ((16, 16), 16, 4.0),
                                                     ((8, 8), 20, 4.0), ((40, 30), 24, 1.5), ((7, 7), 32, 0.0)])
def test_resize_and_blur_equals_upsample_then_blur(grid: tuple[int, int], resolution: int, sigma: float) -> None:
    maps = torch.rand(3, *grid, generator=torch.Generator().manual_seed(1))
    fused = resize_and_blur(maps, resolution, sigma)
    torch.testing.assert_close(fused, gaussian_blur(upsample(maps, resolution), sigma), atol=1e-5, rtol=1e-5)


def test_upsample_is_bilinear_and_keeps_constants() -> None:
    assert torch.equal(upsample(torch.full((2, 4, 6), 3.0), 16), torch.full((2, 16, 16), 3.0))
    ramp = torch.arange(4.0).view(1, 1, 4).expand(1, 4, 4)
    up = upsample(ramp, 8)[0, 0]
    assert up[0].item() == 0.0 and up[-1].item() == 3.0 and bool((up.diff() >= 0).all())


def test_image_score_is_mean_of_top_percent_or_max() -> None:
    m = torch.zeros(1, 100, 100)
    m.view(-1)[:100] = torch.arange(1.0, 101.0)  # 100 pixels = exactly the top 1%
    m.view(-1)[100:200] = 0.5
    assert image_scores(m, "top_mean", 0.01).item() == pytest.approx(50.5)
    assert image_scores(m, "max").item() == 100.0
    assert image_scores(m, "top_mean", 0.015).item() == pytest.approx((5050 + 50 * 0.5) / 150)
    tiny = torch.tensor([[[0.1, 0.9]]])
    assert image_scores(tiny, "top_mean", 0.01).item() == pytest.approx(0.9)  # at least one pixel
    with pytest.raises(ValueError):
        ScoreConfig(image_score="mean")
