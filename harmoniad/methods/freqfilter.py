"""Frequency-filter baseline ("structure only"): pixel high-pass residual vs normal statistics.

It answers how far plain image structure gets without any learned features: fine defects
(scratches, cracks, holes) raise the high-frequency energy where normal images have little.
Per category, the residual ``|gray - blur(gray)|`` of the normal training images gives a
per-position mean and standard deviation (both spatially smoothed, so a few images are
enough and textures with random phase still get stable statistics); a test image's map is
its z-score against them, smoothed like every other method's map.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from harmoniad.runtime.serialization import to_dict
from harmoniad.data import Sample, read_image
from harmoniad.maps import gaussian_blur, image_scores
from harmoniad.methods.base import Context, Method, single_category
from harmoniad.maps import Prediction
from harmoniad.runtime.progress import Progress

_GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32) / 255.0  # ITU-R BT.601 luma, to [0, 1]


@dataclass(frozen=True)
class FreqFilterConfig:
    """Settings of the frequency filter; sigmas are in pixels at the evaluation resolution."""

    highpass_sigma: float = 2.0  # blur subtracted from the image: frequencies above ~1/(2*pi*sigma) remain
    stats_sigma: float = 4.0  # spatial smoothing of the normal mean/std maps
    map_sigma: float = 4.0  # smoothing of the output map (as HarmoniAD's)
    std_floor: float = 0.1  # std never below this fraction of its mean over the image (flat regions)
    two_sided: bool = True  # a missing texture (residual below normal) is anomalous too
    top_fraction: float = 0.01  # image score = mean of the top 1% of the map

    def __post_init__(self) -> None:
        for name in ("highpass_sigma", "stats_sigma", "map_sigma"):
            if getattr(self, name) < 0:
                raise ValueError(f"FreqFilterConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.highpass_sigma == 0:
            raise ValueError("FreqFilterConfig.highpass_sigma must be > 0 (0 would leave no residual)")
        if not 0 < self.std_floor:
            raise ValueError(f"FreqFilterConfig.std_floor must be > 0, got {self.std_floor}")
        if not 0 < self.top_fraction <= 1:
            raise ValueError(f"FreqFilterConfig.top_fraction must be in (0, 1], got {self.top_fraction}")


@dataclass(frozen=True)
class _Stats:
    """Normal residual statistics of one category, ``(R, R)`` each."""

    mean: torch.Tensor
    std: torch.Tensor


class FrequencyFilter(Method):
    """High-pass residual z-scored against per-category normal statistics; no backbone."""

    name = "freqfilter"
    uses_backbone: ClassVar[bool] = False

    def __init__(self, config: FreqFilterConfig | None = None) -> None:
        self.cfg = config or FreqFilterConfig()
        self._stats: dict[str, _Stats] = {}
        self._resolution: int | None = None

    def config(self) -> dict[str, Any]:
        return to_dict(self.cfg)

    def fit(self, train: list[Sample], ctx: Context) -> None:
        by_category: dict[str, list[Sample]] = defaultdict(list)
        for sample in train:
            if sample.label == 0:
                by_category[sample.category].append(sample)
        if not by_category:
            raise ValueError("FrequencyFilter.fit: no normal (label 0) training samples given")
        progress = Progress("freqfilter fit", len(by_category), ctx.progress)
        stats: dict[str, _Stats] = {}
        for category, samples in sorted(by_category.items()):
            residuals = self._residuals(samples, ctx.resolution)
            stats[category] = self._statistics(residuals)
            progress.update(1, category=category)
        self._stats = stats
        self._resolution = ctx.resolution

    def predict(self, test: list[Sample], ctx: Context) -> Prediction:
        category = single_category(test, "FrequencyFilter")
        if category not in self._stats:
            raise RuntimeError(
                f"FrequencyFilter has no statistics for category {category!r}; "
                f"fitted on {sorted(self._stats) or 'nothing (call fit first)'}"
            )
        if ctx.resolution != self._resolution:
            raise ValueError(
                f"FrequencyFilter was fitted at resolution {self._resolution}, asked to predict at {ctx.resolution}"
            )
        stats = self._stats[category]
        residuals = self._residuals(test, ctx.resolution)
        z = (residuals - stats.mean) / stats.std
        z = z.abs() if self.cfg.two_sided else z.clamp(min=0)
        maps = gaussian_blur(z, self.cfg.map_sigma)
        scores = image_scores(maps, "top_mean", self.cfg.top_fraction)
        return Prediction(scores=scores.numpy(), maps=maps.numpy())

    def _residuals(self, samples: list[Sample], resolution: int) -> torch.Tensor:
        """``(N, R, R)`` high-pass residual magnitudes of the samples' grayscale images."""
        gray = torch.stack([_gray_at(s, resolution) for s in samples])
        return (gray - gaussian_blur(gray, self.cfg.highpass_sigma)).abs()

    def _statistics(self, residuals: torch.Tensor) -> _Stats:
        sigma = self.cfg.stats_sigma
        mean = gaussian_blur(residuals.mean(dim=0, keepdim=True), sigma)
        var = gaussian_blur(((residuals - mean) ** 2).mean(dim=0, keepdim=True), sigma)
        std = var.sqrt()
        std = std.clamp(min=max(float(std.mean()) * self.cfg.std_floor, 1e-6))
        return _Stats(mean=mean[0], std=std[0])


def _gray_at(sample: Sample, resolution: int) -> torch.Tensor:
    """The sample's image as ``(R, R)`` grayscale in [0, 1], resized with antialiasing."""
    rgb = read_image(sample.image_path)
    gray = torch.from_numpy(rgb.reshape(-1, 3).astype(np.float32) @ _GRAY_WEIGHTS).reshape(rgb.shape[:2])
    if tuple(gray.shape) != (resolution, resolution):
        gray = F.interpolate(
            gray[None, None], size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False
        )[0, 0]
    return gray
