"""From model outputs to what evaluation reads: final maps, image scores, the Prediction record.

:func:`finalize_maps` is the one definition of "grid maps -> final maps and scores"
(bilinear upsampling to the stated resolution, Gaussian smoothing with sigma in output
pixels, image score = mean of the top 1% of the map or its max); evaluation, the CLI and
the benchmark all go through it. It is plain torch, so it runs where the maps already are
(GPU or CPU) and hands numpy arrays back only at the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from harmoniad.model import GridMaps


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


@dataclass
class Prediction:
    """Scores and maps for N test images, maps at the evaluation resolution.

    ``high_maps``/``low_maps`` are the frequency-branch maps; methods without branches
    leave them None.
    """

    scores: np.ndarray  # (N,) float32, higher = more anomalous
    maps: np.ndarray  # (N, R, R) float32
    high_maps: np.ndarray | None = None
    low_maps: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.scores)
        for name in ("maps", "high_maps", "low_maps"):
            value = getattr(self, name)
            if value is not None and (value.ndim != 3 or value.shape[0] != n):
                raise ValueError(f"Prediction.{name} must be (N={n}, H, W), got {value.shape}")



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
    is taken from the final anomaly map, or from ``grid.score`` processed the same way when
    the model gives one. All maps that exist are processed in one batch.
    """
    parts = [m for m in (grid.anomaly, grid.high, grid.low, grid.score) if m is not None]
    b = grid.anomaly.shape[0]
    final = resize_and_blur(torch.cat(parts), cfg.resolution, cfg.sigma)
    chunks = iter(final.split(b))
    anomaly = next(chunks)
    high = next(chunks) if grid.high is not None else None
    low = next(chunks) if grid.low is not None else None
    scored = next(chunks) if grid.score is not None else anomaly
    return FinalMaps(image_scores(scored, cfg.image_score, cfg.top_fraction), anomaly, high, low)


class HostPrediction:
    """Per-batch final maps gathered on the host as they come, so the device holds one batch at a time.

    On CUDA each batch is copied into pinned host memory asynchronously and read one batch
    later (after its copy event), so the copy overlaps the next batch's compute; on the CPU
    the arrays are taken as they are. With ``total`` (the number of images to come) each
    batch is copied straight into arrays of the final size, so the maps are not gathered a
    second time at the end (a category's maps are hundreds of MB at 256 px).
    :meth:`result` gives the :class:`Prediction`.
    """

    def __init__(self, total: int | None = None) -> None:
        self._total = total
        self._arrays: list[dict[str, np.ndarray | None]] = []
        self._out: dict[str, np.ndarray | None] | None = None  # with ``total``: the final arrays
        self._filled = 0
        self._pending: tuple[FinalMaps, torch.cuda.Event] | None = None

    def add(self, final: FinalMaps) -> None:
        """Take one batch's maps (on any device); its device memory can be reused right after."""
        self._flush()
        if final.scores.device.type != "cuda":
            self._keep(final.numpy())
            return

        def pinned(t: torch.Tensor | None) -> torch.Tensor | None:
            if t is None:
                return None
            host = torch.empty(t.shape, dtype=torch.float32, pin_memory=True)
            host.copy_(t.detach(), non_blocking=True)
            return host

        host = FinalMaps(pinned(final.scores), pinned(final.anomaly), pinned(final.high), pinned(final.low))
        event = torch.cuda.Event()
        # On the maps' own device's stream (not the current device's), which did the copies.
        event.record(torch.cuda.current_stream(final.scores.device))
        self._pending = (host, event)

    def _flush(self) -> None:
        if self._pending is not None:
            host, event = self._pending
            event.synchronize()
            self._keep(host.numpy())
            self._pending = None

    def _keep(self, arrays: dict[str, np.ndarray | None]) -> None:
        if self._total is None:
            self._arrays.append(arrays)
            return
        n = len(arrays["scores"])
        if self._filled + n > self._total:
            raise ValueError(f"HostPrediction: more than the {self._total} images announced")
        if self._out is None:
            self._out = {k: None if a is None else np.empty((self._total, *a.shape[1:]), np.float32)
                         for k, a in arrays.items()}
        for k, a in arrays.items():
            if (a is None) != (self._out[k] is None):
                raise ValueError(f"HostPrediction: map {k!r} is in some batches and not in others")
            if a is not None:
                self._out[k][self._filled : self._filled + n] = a
        self._filled += n

    def result(self) -> Prediction:
        """Everything added so far, in order, as one host-side :class:`Prediction`."""
        self._flush()
        if self._total is not None:
            if self._out is None or self._filled != self._total:
                raise ValueError(f"HostPrediction.result: {self._filled} of {self._total} images were added")
            return Prediction(scores=self._out["scores"], maps=self._out["maps"],
                              high_maps=self._out["high_maps"], low_maps=self._out["low_maps"])
        if not self._arrays:
            raise ValueError("HostPrediction.result: no batches were added")
        return _concatenate(self._arrays)


def prediction_from(parts: Sequence[FinalMaps]) -> Prediction:
    """One host-side :class:`Prediction` from per-batch final maps, in order."""
    return _concatenate([p.numpy() for p in parts])


def _concatenate(arrays: Sequence[dict[str, np.ndarray | None]]) -> Prediction:
    def cat(name: str) -> np.ndarray | None:
        values = [a[name] for a in arrays]
        return None if values[0] is None else np.concatenate(values).astype(np.float32, copy=False)

    return Prediction(scores=cat("scores"), maps=cat("maps"), high_maps=cat("high_maps"), low_maps=cat("low_maps"))
