"""Scoring with a trained HarmoniAD model: anomaly map, branch maps and image score (DESIGN steps 6-7).

:func:`finalize_maps` is the one definition of "grid maps -> final maps and scores"
(bilinear upsampling to the stated resolution, Gaussian smoothing with sigma in output
pixels, image score = mean of the top 1% of the map or its max); evaluation, the CLI and
the benchmark all go through it. It is plain torch, so it runs where the maps already are
(GPU or CPU) and hands numpy arrays back only at the end.

:class:`Scorer` ties a model to its features: a :class:`~harmoniad.features.FeatureCache`
(images scored many times, evaluation) or a :class:`~harmoniad.backbone.Backbone` (images
seen once, the CLI's folder scoring, the benchmark).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from harmoniad.backbone import Backbone, BackboneConfig
from harmoniad.device import autocast, resolve_device
from harmoniad.fastpath import AdaptiveBatch, batch_len, decoded_batches, default_workers, maybe_compile
from harmoniad.features import FeatureCache
from harmoniad.model import GridMaps, HarmoniAD
from harmoniad.progress import Progress, ProgressFn, silent
from harmoniad.train import CheckpointInfo, load_checkpoint

if TYPE_CHECKING:
    from harmoniad.methods.base import Prediction


@dataclass(frozen=True)
class ScoreConfig:
    """How grid maps become final maps and image scores."""

    resolution: int = 256
    sigma: float = 4.0
    image_score: Literal["top_mean", "max"] = "top_mean"
    top_fraction: float = 0.01
    #: ``torch.compile`` the heads (pays off when scoring many batches on a GPU; same maps).
    compile: bool = False

    def __post_init__(self) -> None:
        if self.resolution < 1:
            raise ValueError(f"ScoreConfig.resolution must be >= 1, got {self.resolution}")
        if self.sigma < 0:
            raise ValueError(f"ScoreConfig.sigma must be >= 0, got {self.sigma}")
        if self.image_score not in ("top_mean", "max"):
            raise ValueError(f"ScoreConfig.image_score must be 'top_mean' or 'max', got {self.image_score!r}")
        if not 0.0 < self.top_fraction <= 1.0:
            raise ValueError(f"ScoreConfig.top_fraction must be in (0, 1], got {self.top_fraction}")


@dataclass
class FinalMaps:
    """Final maps ``(B, R, R)`` and image scores ``(B,)`` as float32 tensors on the compute device."""

    scores: torch.Tensor
    anomaly: torch.Tensor
    high: torch.Tensor | None
    low: torch.Tensor | None

    def numpy(self) -> dict[str, np.ndarray | None]:
        def arr(t: torch.Tensor | None) -> np.ndarray | None:
            return None if t is None else t.detach().float().cpu().numpy()

        return {"scores": arr(self.scores), "maps": arr(self.anomaly), "high_maps": arr(self.high),
                "low_maps": arr(self.low)}


# -- the pure post-processing ------------------------------------------------------------------


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, *, device: torch.device | None = None) -> torch.Tensor:
    """Normalised 1-D Gaussian of radius ``ceil(truncate * sigma)`` (scipy's convention)."""
    if sigma <= 0:
        raise ValueError(f"Gaussian sigma must be > 0, got {sigma}")
    radius = max(1, int(math.ceil(truncate * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    return kernel / kernel.sum()


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian smoothing of ``(N, H, W)`` maps, float32, on their device.

    Borders are reflected (``mode="mirror"`` in scipy terms), so a uniform map stays
    uniform; when the kernel radius reaches the map size, reflection is impossible and
    borders are replicated instead. ``sigma == 0`` returns the maps unchanged.
    """
    if maps.ndim != 3:
        raise ValueError(f"gaussian_blur expects (N, H, W) maps, got shape {tuple(maps.shape)}")
    if sigma == 0:
        return maps
    kernel = gaussian_kernel1d(sigma, device=maps.device)
    radius = kernel.numel() // 2
    mode = "reflect" if radius < min(maps.shape[-2:]) else "replicate"
    x = maps.float().unsqueeze(1)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode=mode), kernel.view(1, 1, 1, -1))
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode=mode), kernel.view(1, 1, -1, 1))
    return x.squeeze(1)


def upsample(maps: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinear ``(N, h, w) -> (N, R, R)`` (``align_corners=False``: pixel centres line up)."""
    if tuple(maps.shape[-2:]) == (resolution, resolution):
        return maps.float()
    return F.interpolate(maps.float().unsqueeze(1), size=(resolution, resolution), mode="bilinear",
                         align_corners=False).squeeze(1)


def _axis_operator(n: int, resolution: int, sigma: float, device: torch.device) -> torch.Tensor:
    """``(R, n)`` matrix of 1-D linear resize to ``R`` followed by the 1-D Gaussian of :func:`gaussian_blur`."""
    basis = torch.eye(n, device=device).unsqueeze(1)  # n unit signals of length n
    if n != resolution:
        basis = F.interpolate(basis, size=resolution, mode="linear", align_corners=False)
    if sigma > 0:
        kernel = gaussian_kernel1d(sigma, device=device)
        radius = kernel.numel() // 2
        mode = "reflect" if radius < resolution else "replicate"
        basis = F.conv1d(F.pad(basis, (radius, radius), mode=mode), kernel.view(1, 1, -1))
    return basis.squeeze(1).T


def resize_and_blur(maps: torch.Tensor, resolution: int, sigma: float) -> torch.Tensor:
    """``gaussian_blur(upsample(maps, resolution), sigma)`` computed as two small matrix products.

    Bilinear resizing, border padding and the Gaussian are all linear and separable, so the
    whole chain is ``A @ map @ B.T`` with ``A``, ``B`` of shape ``(R, h)``, ``(R, w)``: the
    same numbers (to float rounding) at a fraction of the cost of a 33-tap convolution on
    ``R x R`` maps.
    """
    if maps.ndim != 3:
        raise ValueError(f"resize_and_blur expects (N, h, w) maps, got shape {tuple(maps.shape)}")
    h, w = maps.shape[-2:]
    rows = _axis_operator(h, resolution, sigma, maps.device)
    cols = rows if w == h else _axis_operator(w, resolution, sigma, maps.device)
    return torch.matmul(torch.matmul(rows, maps.float()), cols.T)


def image_scores(maps: torch.Tensor, mode: str = "top_mean", fraction: float = 0.01) -> torch.Tensor:
    """``(N, H, W)`` maps -> ``(N,)`` scores: mean of the top ``fraction`` of pixels (at least one), or the max."""
    flat = maps.flatten(1)
    if mode == "max":
        return flat.amax(dim=1)
    if mode != "top_mean":
        raise ValueError(f"image score mode must be 'top_mean' or 'max', got {mode!r}")
    k = max(1, math.ceil(fraction * flat.shape[1]))
    return flat.topk(k, dim=1).values.mean(dim=1)


def finalize_maps(grid: GridMaps, cfg: ScoreConfig = ScoreConfig()) -> FinalMaps:
    """Grid-resolution maps -> final maps at ``cfg.resolution`` and image scores.

    Bilinear upsampling then Gaussian smoothing (:func:`resize_and_blur`); the image score
    is taken from the final anomaly map. All maps that exist are processed in one batch.
    """
    parts = [m for m in (grid.anomaly, grid.high, grid.low) if m is not None]
    b = grid.anomaly.shape[0]
    final = resize_and_blur(torch.cat(parts), cfg.resolution, cfg.sigma)
    chunks = iter(final.split(b))
    anomaly = next(chunks)
    high = next(chunks) if grid.high is not None else None
    low = next(chunks) if grid.low is not None else None
    return FinalMaps(image_scores(anomaly, cfg.image_score, cfg.top_fraction), anomaly, high, low)


# -- scorer ---------------------------------------------------------------------------------


def _prediction(parts: list[FinalMaps]) -> Prediction:
    # Imported here: harmoniad.methods imports its methods, one of which imports this module.
    from harmoniad.methods.base import Prediction

    arrays = [p.numpy() for p in parts]

    def cat(name: str) -> np.ndarray | None:
        values = [a[name] for a in arrays]
        return None if values[0] is None else np.concatenate(values).astype(np.float32, copy=False)

    return Prediction(scores=cat("scores"), maps=cat("maps"), high_maps=cat("high_maps"), low_maps=cat("low_maps"))


class Scorer:
    """Scores images with a trained model through a feature cache or a live backbone.

    ``features`` is a :class:`FeatureCache` (cached features, extracted on a miss) or a
    :class:`Backbone` (features computed on the fly, nothing written), or None to score
    precomputed features only (:meth:`score_features`).
    """

    def __init__(
        self,
        model: HarmoniAD,
        features: FeatureCache | Backbone | None = None,
        cfg: ScoreConfig = ScoreConfig(),
        *,
        device: str | torch.device = "auto",
        batch_size: int = 16,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"Scorer.batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.features = features
        self.cfg = cfg
        self.batch_size = batch_size
        #: What the forward pass runs through: the model, or its ``torch.compile`` wrapper (``cfg.compile``).
        self.net = maybe_compile(self.model, cfg.compile)
        # Images per forward pass of a live backbone; halves itself on CUDA out-of-memory.
        self._chunks = AdaptiveBatch(batch_size)
        #: The checkpoint's settings when built by :meth:`from_checkpoint`.
        self.info: CheckpointInfo | None = None
        if features is not None:
            self._check_shapes(features)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        cfg: ScoreConfig = ScoreConfig(),
        *,
        device: str | torch.device = "auto",
        use_cache: bool = True,
        cache_root: Path | None = None,
        batch_size: int = 16,
        backbone: BackboneConfig | None = None,
    ) -> Scorer:
        """Load a checkpoint and attach the backbone it was trained on (or ``backbone``)."""
        dev = resolve_device(device)
        model, info = load_checkpoint(path, device=dev)
        bcfg = backbone or info.backbone
        features: FeatureCache | Backbone | None = None
        if bcfg is not None:
            if use_cache:
                features = FeatureCache(bcfg, root=cache_root, batch_size=batch_size, device=dev)
            else:
                features = Backbone(bcfg, dev)
        scorer = cls(model, features, cfg, device=dev, batch_size=batch_size)
        scorer.info = info
        return scorer

    def _check_shapes(self, features: FeatureCache | Backbone) -> None:
        if isinstance(features, FeatureCache):
            shapes = features.feature_shapes
        else:
            shapes = [(features.embed_dim, *features.grid)] * features.num_layers
        want = self.model.in_dim, self.model.num_layers
        if len(shapes) != want[1] or any(s[0] != want[0] for s in shapes):
            raise ValueError(
                f"backbone features are {len(shapes)} layers of shape {shapes[0] if shapes else None}, but the "
                f"model was trained on {want[1]} layers of {want[0]} channels; use the checkpoint's backbone config"
            )

    # -- entry points -------------------------------------------------------------------------
    def score_features(self, feats: Sequence[torch.Tensor]) -> FinalMaps:
        """Per-layer ``B x C x h x w`` features -> final maps and scores (tensors on the device)."""
        with torch.inference_mode():
            x = [f.to(self.device, non_blocking=True) for f in feats]
            with autocast(self.device):
                out = self.net(x)
            return finalize_maps(self.model.output_maps(out), self.cfg)

    def score_tensor(self, images: torch.Tensor) -> FinalMaps:
        """Preprocessed ``B x 3 x S x S`` images -> final maps (backbone, split, branches, maps, smoothing)."""
        return self.score_features(self._backbone().extract(images))

    def score_images(self, images: Sequence[np.ndarray], progress: ProgressFn | None = None) -> Prediction:
        """``H x W x 3`` uint8 RGB arrays -> :class:`~harmoniad.methods.base.Prediction`."""
        backbone = self._backbone()
        meter = Progress("score", len(images), progress)
        parts = []
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            parts.append(self.score_tensor(backbone.preprocess(list(batch))))
            meter.update(len(batch))
        return _prediction(parts)

    def score_paths(self, paths: Sequence[str | Path], progress: ProgressFn | None = None) -> Prediction:
        """Image files -> Prediction, in ``paths`` order, a batch at a time."""
        if not paths:
            raise ValueError("Scorer.score_paths: no images to score")
        if self.features is None:
            raise ValueError("Scorer has no backbone or feature cache; use score_features")
        if isinstance(self.features, FeatureCache):
            # Extract every missing feature first, in full batches and with its own progress.
            self.features.ensure(paths, progress=progress)
        meter = Progress("score", len(paths), progress)
        parts = []
        if isinstance(self.features, FeatureCache):
            for start in range(0, len(paths), self.batch_size):
                batch = [Path(p) for p in paths[start : start + self.batch_size]]
                parts.append(self.score_features(self.features.load(batch, progress=silent)))
                meter.update(len(batch))
            return _prediction(parts)
        # A live backbone: images decoded ahead (worker processes + pinned memory on CUDA).
        backbone = self.features
        on_cuda = self.device.type == "cuda"
        for images in decoded_batches(
            paths, self.batch_size, workers=default_workers(self.device), processes=on_cuda, pin_memory=on_cuda
        ):
            n = batch_len(images)
            parts.extend(self._chunks.run(n, lambda a, b, x=images: self.score_tensor(backbone.preprocess(x[a:b]))))
            meter.update(n)
        return _prediction(parts)

    def score_samples(self, samples: Sequence[Any], progress: ProgressFn | None = None) -> Prediction:
        """``Sample`` records -> Prediction, in order."""
        return self.score_paths([s.image_path for s in samples], progress)

    def _backbone(self) -> Backbone:
        if isinstance(self.features, Backbone):
            return self.features
        if isinstance(self.features, FeatureCache):
            return self.features.backbone
        raise ValueError("Scorer has no backbone; build it with a Backbone or a FeatureCache")
