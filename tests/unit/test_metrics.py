"""harmoniad.metrics against independent computations: scikit-learn for AUROC/AP/F1-max and a
threshold-by-threshold loop for AUPRO."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import (average_precision_score, precision_recall_curve, roc_auc_score,
                             roc_curve)

from harmoniad import metrics
from harmoniad.metrics import MetricError, aupro, image_curves, image_metrics, pixel_metrics


def random_case(seed: int, n: int = 5, size: int = 18, levels: int | None = None,
                dtype: type = np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Masks with several blobs per defective image (one image normal), noisy maps that are
    higher on the blobs, centred on 0 so both signs occur; ``levels`` quantizes (ties)."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.random((n, size, size)), sigma=(0, 1.2, 1.2))
    masks = smooth > np.quantile(smooth, 0.8, axis=(1, 2), keepdims=True)
    masks[0] = False
    maps = rng.normal(size=masks.shape) + 1.5 * masks
    if levels is not None:
        maps = np.round(maps * levels / 4) / levels
    return masks, maps.astype(dtype)


def reference_aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float) -> float:
    """PRO curve evaluated at every distinct threshold, one region and one threshold at a time."""
    regions = []
    for i, mask in enumerate(masks):
        labels, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions += [(i, labels == r) for r in range(1, count + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        flagged = maps >= t
        fprs.append((flagged & normal).sum() / normal.sum())
        pros.append(np.mean([flagged[i][r].sum() / r.sum() for i, r in regions]))
    fprs_arr, pros_arr = np.array(fprs), np.array(pros)
    j = int(np.argmax(fprs_arr >= fpr_limit))  # first point at or past the limit
    y_lim = pros_arr[j - 1] + (pros_arr[j] - pros_arr[j - 1]) * (
        (fpr_limit - fprs_arr[j - 1]) / (fprs_arr[j] - fprs_arr[j - 1]))
    x = np.append(fprs_arr[:j], fpr_limit)
    y = np.append(pros_arr[:j], y_lim)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2) / fpr_limit)


def sklearn_pixel(masks: np.ndarray, maps: np.ndarray) -> dict[str, float]:
    y, s = masks.ravel(), maps.ravel().astype(np.float64)
    precision, recall, _ = precision_recall_curve(y, s)
    with np.errstate(invalid="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    return {"auroc": roc_auc_score(y, s), "ap": average_precision_score(y, s), "f1_max": f1.max()}


@pytest.mark.parametrize("seed,levels,dtype", [
    (0, None, np.float32), (1, 8, np.float32), (2, None, np.float64), (3, 6, np.float64),
    (4, 3, np.float16),
])
def test_pixel_metrics_match_sklearn_and_reference(seed, levels, dtype):
    masks, maps = random_case(seed, levels=levels, dtype=dtype)
    got = pixel_metrics(masks, maps)
    want = sklearn_pixel(masks, maps)
    for key in ("auroc", "ap", "f1_max"):
        assert got[key] == pytest.approx(want[key], abs=1e-9), key
    assert got["aupro"] == pytest.approx(reference_aupro(masks, maps, 0.3), abs=1e-9)
    assert 0.5 < got["auroc"] < 1 and 0 < got["aupro"] < 1  # a non-trivial case
    assert all(type(v) is float for v in got.values())


@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 0.5, 1.0])
def test_aupro_at_other_limits_with_ties(fpr_limit):
    masks, maps = random_case(5, n=4, levels=5)
    assert aupro(masks, maps, fpr_limit) == pytest.approx(
        reference_aupro(masks, maps, fpr_limit), abs=1e-9)


@pytest.mark.parametrize("seed,levels", [(0, None), (1, 6)])
def test_pixel_curves_are_the_curves_the_metrics_integrate(seed, levels):
    masks, maps = random_case(seed, levels=levels)
    c = metrics.pixel_curves(masks, maps)
    # ROC: its area is the pixel AUROC (ties included); TPR at each vertex is exact.
    assert np.trapezoid(c["tpr"], c["fpr"]) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    t = np.sort(np.unique(maps[masks]))[len(np.unique(maps[masks])) // 2]
    flagged = maps >= t
    point = ((flagged & ~masks).sum() / (~masks).sum(), (flagged & masks).sum() / masks.sum())
    assert any(np.isclose(f, point[0]) and np.isclose(r, point[1]) for f, r in zip(c["fpr"], c["tpr"]))
    assert np.all(np.diff(c["tpr"]) >= 0) and c["tpr"][-1] == 1.0
    # PRO: integrating it to the limit gives the reference AUPRO.
    assert metrics._trapezoid_to(c["pro_fpr"], c["pro"], 0.3) / 0.3 == pytest.approx(
        reference_aupro(masks, maps, 0.3), abs=1e-9)
    assert c["aupro"] == pytest.approx(reference_aupro(masks, maps, 0.3), abs=1e-9)
    assert c["auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
    for x in (c["fpr"], c["pro_fpr"]):
        assert x[0] == 0.0 and x[-1] == 1.0 and np.all(np.diff(x) >= 0)


def test_image_batches_give_the_same_numbers(monkeypatch):
    masks, maps = random_case(6, n=6, levels=4)
    whole = pixel_metrics(masks, maps)
    monkeypatch.setattr(metrics, "_IMAGE_BATCH", 2)
    for dtype in (np.float32, np.float64):
        chunked = pixel_metrics(masks, maps.astype(dtype))
        assert chunked == pytest.approx(whole, abs=1e-12)
    assert whole["aupro"] == pytest.approx(reference_aupro(masks, maps, 0.3), abs=1e-9)


def test_float32_fast_path_equals_float64_path():
    masks, maps = random_case(7, levels=10)
    assert pixel_metrics(masks, maps) == pytest.approx(
        pixel_metrics(masks, maps.astype(np.float64)), abs=1e-12)


def test_integer_bool_and_01_inputs():
    masks, maps = random_case(8, levels=3)
    quantized = np.round(maps * 3).astype(np.int16)
    want = pixel_metrics(masks, quantized.astype(np.float32))
    assert pixel_metrics(masks.astype(np.uint8), quantized) == pytest.approx(want)
    assert pixel_metrics(masks, quantized.astype(np.int64)) == pytest.approx(want)
    assert pixel_metrics(masks, masks)["auroc"] == 1.0


def test_perfect_maps_give_one():
    masks, _ = random_case(9)
    rng = np.random.default_rng(0)
    for maps in (masks.astype(np.float32), masks + 0.5 * rng.random(masks.shape)):
        assert pixel_metrics(masks, maps) == pytest.approx(
            {"auroc": 1.0, "ap": 1.0, "f1_max": 1.0, "aupro": 1.0})
    assert image_metrics([0, 1, 1, 0], [0.1, 0.9, 0.8, 0.2]) == pytest.approx(
        {"auroc": 1.0, "ap": 1.0, "f1_max": 1.0})


def test_constant_map_values():
    masks, _ = random_case(10)
    got = pixel_metrics(masks, np.full(masks.shape, 0.7, dtype=np.float32))
    prevalence = masks.mean()
    assert got["auroc"] == 0.5
    assert got["ap"] == pytest.approx(prevalence)
    assert got["f1_max"] == pytest.approx(2 * prevalence / (1 + prevalence))
    assert got["aupro"] == pytest.approx(0.15)  # PRO = FPR along one segment: 0.3 * 0.3 / 2 / 0.3


def test_negative_zero_ties_with_positive_zero():
    masks = np.zeros((1, 2, 2), dtype=bool)
    masks[0, 0, 0] = True
    maps = np.array([[[0.0, -0.0], [1.0, -1.0]]], dtype=np.float32)
    got = pixel_metrics(masks, maps)
    assert got["auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()))
    # the anomalous 0.0 beats -1, ties -0.0 and loses to 1: (1 + 0.5 + 0) / 3, not 2/3
    assert got["auroc"] == pytest.approx(0.5)


def test_regions_are_8_connected_within_an_image_only():
    # Image 0: a diagonal pair (one region of 2 with 8-connectivity, two with 4) plus a pixel.
    masks = np.zeros((2, 6, 6), dtype=bool)
    masks[0, 0, 0] = masks[0, 1, 1] = masks[0, 4, 4] = True
    maps = np.zeros(masks.shape, dtype=np.float32)
    maps[0, 0, 0] = 1.0
    # PRO at the top threshold = mean(1/2, 0) = 1/4 (4-connectivity would give 1/3).
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx((0.25 + 1) / 2)
    # Same pixels in consecutive images are separate regions: sizes 1 and 2, not one of 3.
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 0, 0] = masks[1, 0, 0] = masks[1, 0, 1] = True
    maps = np.zeros(masks.shape, dtype=np.float32)
    maps[0, 0, 0] = 1.0
    assert aupro(masks, maps, fpr_limit=1.0) == pytest.approx((0.5 + 1) / 2)


@pytest.mark.parametrize("seed,ties", [(0, False), (1, True), (2, True)])
def test_image_metrics_and_curves_match_sklearn(seed, ties):
    rng = np.random.default_rng(seed)
    labels = rng.random(60) < 0.4
    scores = rng.normal(size=60) + labels
    if ties:
        scores = np.round(scores * 2) / 2
    got = image_metrics(labels.astype(int), scores)
    assert got["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert got["ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
    precision, recall, _ = precision_recall_curve(labels, scores)
    with np.errstate(invalid="ignore"):
        f1 = np.nan_to_num(2 * precision * recall / (precision + recall))
    assert got["f1_max"] == pytest.approx(f1.max(), abs=1e-12)
    curves = image_curves(labels, scores)
    fpr, tpr, thresholds = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(curves["fpr"], fpr)
    np.testing.assert_allclose(curves["tpr"], tpr)
    np.testing.assert_allclose(curves["thresholds"][1:], thresholds[1:])
    assert curves["f1"].max() == pytest.approx(got["f1_max"])


def _raises(match: str, fn, *args, **kwargs) -> None:
    with pytest.raises(MetricError, match=match):
        fn(*args, **kwargs)


def test_degenerate_pixel_inputs_raise():
    masks, maps = random_case(11, n=3, size=8)
    _raises(r"masks \(3, 8, 8\) and maps \(3, 8, 9\)", pixel_metrics, masks, np.zeros((3, 8, 9)))
    _raises(r"\(N, H, W\)", pixel_metrics, masks[0], maps[0])
    _raises(r"\(N, H, W\)", pixel_metrics, masks[:0], maps[:0])
    _raises(r"0 anomalous", pixel_metrics, np.zeros_like(masks), maps)
    _raises(r"0 normal", aupro, np.ones_like(masks), maps)
    _raises(r"found values \[255\]", pixel_metrics, masks.astype(np.uint8) * 255, maps)
    _raises(r"real numbers", pixel_metrics, masks, maps.astype(np.complex64))
    _raises(r"fpr_limit", pixel_metrics, masks, maps, fpr_limit=0.0)
    _raises(r"fpr_limit", pixel_metrics, masks, maps, fpr_limit=1.5)
    for bad in (np.nan, np.inf, -np.inf):
        for dtype in (np.float32, np.float64):
            broken = maps.astype(dtype)
            broken[2, 3, 3] = bad
            _raises(r"NaN or inf \(images \[2\]\)", pixel_metrics, masks, broken)


def test_degenerate_image_inputs_raise():
    _raises(r"one class only \(0 anomalous, 3 normal\)", image_metrics, [0, 0, 0], [1, 2, 3])
    _raises(r"one class only", image_curves, [1, 1], [1, 2])
    _raises(r"shapes \(3,\) and \(2,\)", image_metrics, [0, 1, 1], [1, 2])
    _raises(r"NaN or inf at indices \[1\]", image_metrics, [0, 1], [0.5, np.nan])
    _raises(r"found values \[2\]", image_metrics, [0, 2], [0.5, 0.7])


@pytest.mark.parametrize("seed,levels", [(0, None), (1, 4)])
def test_subsets_equal_pixel_metrics_of_each_subset_alone(seed, levels):
    masks, maps = random_case(seed, n=9, levels=levels)
    rng = np.random.default_rng(seed + 10)
    # Overlapping subsets, an image in none of them, and the whole set.
    subsets = {"all": np.ones(9, dtype=bool), "first": np.arange(9) < 5,
               "mixed": rng.random(9) < 0.6, "last": np.arange(9) >= 3}
    subsets["mixed"][[0, 8]] = [True, False]  # a normal image in, one defective image out
    got = metrics.pixel_metrics_of_subsets(masks, maps, subsets)
    assert list(got) == list(subsets)
    for name, rows in subsets.items():
        want = pixel_metrics(masks[rows], maps[rows])
        assert got[name]["auroc"] == want["auroc"], name  # integer arithmetic: identical
        for key in ("ap", "f1_max", "aupro"):
            assert got[name][key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), (name, key)


def test_subsets_differ_when_their_images_differ():
    # Guards against a subset silently counting every group: two subsets, different answers.
    masks, maps = random_case(5, n=6)
    maps[3:] = -maps[3:]  # the last images' maps point the wrong way
    got = metrics.pixel_metrics_of_subsets(masks, maps, {"good": np.arange(6) < 3, "bad": np.arange(6) != 1})
    assert got["good"]["auroc"] > 0.8 > got["bad"]["auroc"]


def test_a_subset_with_one_class_is_named():
    masks, maps = random_case(6, n=4)
    with pytest.raises(MetricError, match="subset 'normal only'"):
        metrics.pixel_metrics_of_subsets(masks, maps, {"normal only": np.array([True, False, False, False])})
