"""Anomaly maps as colour images: one colormap and one overlay for the CLI and the dashboard."""

from __future__ import annotations

import numpy as np
from PIL import Image

# Anchor colours of matplotlib's "inferno" (perceptually uniform, prints well in greyscale),
# interpolated linearly into a 256-entry lookup table, so no plotting library is needed here.
_INFERNO_ANCHORS = np.array(
    [
        [0, 0, 4], [31, 12, 72], [85, 15, 109], [136, 34, 106], [186, 54, 85],
        [227, 89, 51], [249, 140, 10], [249, 201, 50], [252, 255, 164],
    ],
    dtype=np.float32,
)
_LUT = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_INFERNO_ANCHORS)), _INFERNO_ANCHORS[:, c]) for c in range(3)],
    axis=1,
).round().astype(np.uint8)


def normalize(values: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Scale to [0, 1] between ``vmin`` and ``vmax`` (default: the map's own range)."""
    values = np.asarray(values, dtype=np.float32)
    lo = float(np.nanmin(values)) if vmin is None else float(vmin)
    hi = float(np.nanmax(values)) if vmax is None else float(vmax)
    if not hi > lo:
        return np.zeros_like(values)
    return np.clip((values - lo) / (hi - lo), 0.0, 1.0)


def heatmap_rgb(values: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """A 2-D map -> ``H x W x 3`` uint8 RGB through the inferno colormap."""
    if values.ndim != 2:
        raise ValueError(f"heatmap_rgb expects a 2-D map, got shape {values.shape}")
    index = (normalize(values, vmin, vmax) * 255).round().astype(np.uint8)
    return _LUT[index]


def overlay(image: np.ndarray, values: np.ndarray, alpha: float = 0.5, vmin: float | None = None,
            vmax: float | None = None) -> np.ndarray:
    """Blend the heatmap of ``values`` over ``image`` (resized to the map's size) with opacity ``alpha``."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    h, w = values.shape
    base = np.asarray(Image.fromarray(image).convert("RGB").resize((w, h), Image.BILINEAR), dtype=np.float32)
    heat = heatmap_rgb(values, vmin, vmax).astype(np.float32)
    return (base * (1.0 - alpha) + heat * alpha).round().astype(np.uint8)


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """The one-pixel boundary of a boolean mask (for drawing ground truth over an image)."""
    mask = mask.astype(bool)
    interior = mask.copy()
    interior[1:, :] &= mask[:-1, :]
    interior[:-1, :] &= mask[1:, :]
    interior[:, 1:] &= mask[:, :-1]
    interior[:, :-1] &= mask[:, 1:]
    return mask & ~interior
