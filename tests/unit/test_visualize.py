from __future__ import annotations

import numpy as np
import pytest

from harmoniad.visualize import heatmap_rgb, mask_outline, normalize, overlay


def test_heatmap_is_monotone_in_brightness() -> None:
    rgb = heatmap_rgb(np.linspace(0, 1, 256, dtype=np.float32).reshape(1, -1))
    brightness = rgb[0].astype(float) @ np.array([0.299, 0.587, 0.114])
    assert rgb.dtype == np.uint8 and rgb.shape == (1, 256, 3)
    assert np.all(np.diff(brightness) > -1.0)  # allow rounding wobble only
    assert brightness[-1] > brightness[0] + 200


def test_normalize_constant_map_is_zero_and_respects_limits() -> None:
    assert np.all(normalize(np.full((3, 3), 7.0)) == 0)
    out = normalize(np.array([0.0, 5.0, 10.0]), vmin=0, vmax=5)
    assert out.tolist() == [0.0, 1.0, 1.0]


def test_overlay_resizes_image_and_blends() -> None:
    image = np.full((40, 60, 3), 255, dtype=np.uint8)
    values = np.zeros((20, 20), dtype=np.float32)
    assert overlay(image, values, alpha=0.0).min() == 255
    assert overlay(image, values, alpha=1.0).shape == (20, 20, 3)
    with pytest.raises(ValueError, match="alpha"):
        overlay(image, values, alpha=2.0)


def test_mask_outline_is_the_boundary() -> None:
    mask = np.zeros((7, 7), dtype=bool)
    mask[2:5, 2:5] = True
    outline = mask_outline(mask)
    assert outline.sum() == 8 and not outline[3, 3]
