"""The frequency filter flags fine structure that normal images of the category lack."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from harmoniad.data import load_dataset, make_synthetic, read_image
from harmoniad.methods.base import Context
from harmoniad.methods.freqfilter import FreqFilterConfig, FrequencyFilter

RES = 64


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synthetic"), seed=0, n_train=6, n_test=6, size=64)


def _scratched(image_path: Path, out: Path) -> Path:
    """A copy of the image with a thin bright diagonal scratch drawn on it."""
    image = Image.fromarray(read_image(image_path))
    w, h = image.size
    ImageDraw.Draw(image).line([(w * 0.2, h * 0.25), (w * 0.8, h * 0.7)], fill=(255, 255, 255), width=1)
    image.save(out)
    return out


def test_scratch_scores_above_clean_images(synthetic: Path, tmp_path: Path) -> None:
    train = load_dataset("synthetic", synthetic, split="train")
    test = load_dataset("synthetic", synthetic, split="test")
    ctx = Context(resolution=RES)
    method = FrequencyFilter()
    method.fit(train, ctx)
    categories = sorted({s.category for s in train})
    assert len(categories) >= 2  # textures and objects alike
    for category in categories:
        clean = [s for s in test if s.category == category and s.label == 0]
        assert len(clean) >= 2
        scratched = [
            replace(s, image_path=_scratched(s.image_path, tmp_path / f"{category}_{i}.png"), defect="scratch", label=1)
            for i, s in enumerate(clean)
        ]
        pred = method.predict(clean + scratched, ctx)

        n = len(clean)
        assert pred.maps.shape == (2 * n, RES, RES) and pred.maps.dtype == np.float32
        assert pred.scores.shape == (2 * n,) and pred.scores.dtype == np.float32
        assert pred.high_maps is None and pred.low_maps is None
        clean_scores, scratch_scores = pred.scores[:n], pred.scores[n:]
        # Every scratched image scores above every clean image of its category.
        assert scratch_scores.min() > clean_scores.max(), category
        # The map rises most on the scratch (the drawn diagonal), not elsewhere.
        diff = pred.maps[n] - pred.maps[0]
        y, x = np.unravel_index(np.argmax(diff), diff.shape)
        assert 0.15 * RES <= x <= 0.85 * RES and 0.2 * RES <= y <= 0.75 * RES, category


def test_deterministic_and_refuses_unfitted_category(synthetic: Path) -> None:
    train = load_dataset("synthetic", synthetic, split="train")
    test = load_dataset("synthetic", synthetic, split="test")
    categories = sorted({s.category for s in train})
    fitted = [s for s in train if s.category == categories[0]]
    ctx = Context(resolution=RES)
    a, b = FrequencyFilter(), FrequencyFilter()
    a.fit(fitted, ctx)
    b.fit(fitted, ctx)
    samples = [s for s in test if s.category == categories[0]]
    np.testing.assert_array_equal(a.predict(samples, ctx).maps, b.predict(samples, ctx).maps)
    other = [s for s in test if s.category == categories[1]]
    with pytest.raises(RuntimeError, match=categories[1]):
        a.predict(other, ctx)
    with pytest.raises(ValueError, match="resolution"):
        a.predict(samples, Context(resolution=RES * 2))


def test_config_is_validated_and_recorded() -> None:
    with pytest.raises(ValueError, match="top_fraction"):
        FreqFilterConfig(top_fraction=0)
    assert FrequencyFilter(FreqFilterConfig(highpass_sigma=1.5)).config()["highpass_sigma"] == 1.5
    assert FrequencyFilter.uses_backbone is False
