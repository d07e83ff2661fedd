"""harmoniad.analysis: per-defect results, masks that exist only for some images, intervals
and thresholds of one category, checked against scikit-learn and harmoniad.metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from harmoniad import stats
from harmoniad.analysis import category_report, category_seed, mean_intervals
from harmoniad.metrics import pixel_metrics


def case(seed: int = 0, size: int = 16):
    """12 normals, 6 'scratch' and 4 'dent' images; dents score lower (harder)."""
    rng = np.random.default_rng(seed)
    defects = ["good"] * 12 + ["scratch"] * 6 + ["dent"] * 4
    labels = np.array([d != "good" for d in defects], dtype=int)
    scores = rng.normal(size=len(defects)) + 3.0 * (np.array(defects) == "scratch") + 0.3 * (np.array(defects) == "dent")
    masks = np.zeros((len(defects), size, size), dtype=bool)
    for i in np.flatnonzero(labels):
        y, x = rng.integers(2, size - 6, 2)
        masks[i, y : y + 4, x : x + 4] = True
    maps = (rng.normal(size=masks.shape) + 1.5 * masks).astype(np.float32)
    return labels, scores, defects, masks, maps


def test_per_defect_results_are_each_type_against_all_normals():
    labels, scores, defects, masks, maps = case()
    report = category_report(labels, scores, defects, labels == 1, masks, maps, n_resamples=0)
    rows = {r["defect"]: r for r in report.details["defects"]}
    assert sorted(rows) == ["dent", "scratch"]
    normal = labels == 0
    for defect, row in rows.items():
        of_type = np.array(defects) == defect
        keep = normal | of_type
        assert row["n"] == of_type.sum() == row["n_masked"]
        assert row["image_auroc"] == pytest.approx(roc_auc_score(labels[keep], scores[keep]))
        assert row["pixel_auroc"] == pytest.approx(pixel_metrics(masks[keep], maps[keep])["auroc"])
        assert row["aupro"] == pytest.approx(pixel_metrics(masks[keep], maps[keep])["aupro"])
    assert rows["scratch"]["image_auroc"] > rows["dent"]["image_auroc"]
    assert report.metrics["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
    assert report.details["intervals"] == {} and report.resamples == {}


def test_without_masks_pixel_metrics_are_not_available_never_zero():
    labels, scores, defects, masks, maps = case(1)
    no_masks = np.zeros_like(labels, dtype=bool)
    report = category_report(labels, scores, defects, no_masks, np.zeros_like(masks), maps, n_resamples=50)
    assert all(math.isnan(report.metrics[k]) for k in report.metrics if k.startswith("pixel_"))
    assert not math.isnan(report.metrics["image_auroc"])
    assert all(r["pixel_auroc"] is None and r["aupro"] is None for r in report.details["defects"])
    assert report.details["n_masked"] == 0 and report.details["n_pixel_images"] == 0
    assert set(report.resamples) == {"image_auroc"}
    assert "pixel_auroc" not in report.details["intervals"]


def test_pixel_metrics_use_only_the_images_that_have_masks():
    labels, scores, defects, masks, maps = case(2)
    has_mask = labels == 1
    has_mask[[12, 13, 18]] = False  # two scratches and a dent without masks
    given = masks.copy()
    given[~has_mask] = False
    report = category_report(labels, scores, defects, has_mask, given, maps, n_resamples=0)
    rows = (labels == 0) | has_mask
    assert report.metrics["pixel_auroc"] == pytest.approx(pixel_metrics(masks[rows], maps[rows])["auroc"])
    assert report.details["n_masked"] == 7 and report.details["n_pixel_images"] == 19
    assert {r["defect"]: r["n_masked"] for r in report.details["defects"]} == {"dent": 3, "scratch": 4}
    # image metrics still use every image
    assert report.metrics["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))


def test_intervals_are_the_seeded_bootstrap_of_harmoniad_stats():
    labels, scores, defects, masks, maps = case(3)
    seed = category_seed(7, "grain")
    report = category_report(labels, scores, defects, labels == 1, masks, maps, n_resamples=300, seed=seed)
    image_seed, pixel_seed = np.random.SeedSequence(seed.entropy, spawn_key=seed.spawn_key).spawn(2)
    again = stats.image_auroc_resamples(labels, scores, 300, np.random.default_rng(image_seed))
    np.testing.assert_array_equal(report.resamples["image_auroc"], again)
    iv = report.details["intervals"]
    assert iv["image_auroc"] == stats.interval(again, 0).as_list()
    for name in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        low, high = iv[name]
        assert low <= report.metrics[name] + 1e-3 and report.metrics[name] - 1e-3 <= high
    assert iv["n_resamples"] == 300 and iv["max_binning_error"]["pixel_auroc"] < 1e-2
    # the same category seed gives the same intervals for another method: paired resamples
    other = category_report(labels, scores + 1, defects, labels == 1, masks, maps, n_resamples=300,
                            seed=category_seed(7, "grain"))
    assert other.details["intervals"]["image_auroc"] == iv["image_auroc"]
    mean = mean_intervals({"a": report, "b": other})
    assert mean["image_auroc"]["estimate"] == pytest.approx(report.metrics["image_auroc"])
    assert mean["image_auroc"]["n_categories"] == 2


def test_thresholds_come_from_held_out_normals_and_the_oracle_is_labelled():
    labels, scores, defects, masks, maps = case(4)
    held = np.random.default_rng(9).normal(size=40)
    report = category_report(labels, scores, defects, labels == 1, masks, maps, normal_scores=held,
                             target_fpr=0.05, n_resamples=0)
    th = report.details["thresholds"]
    assert th["max"]["value"] == pytest.approx(held.max())
    assert np.count_nonzero(held > th["fpr"]["value"]) == 2  # floor(0.05 * 40)
    assert th["fpr"]["target_fpr"] == 0.05 and th["fpr"]["n_normals"] == 40
    flagged = scores > th["max"]["value"]
    point = th["max"]["test"]
    assert point["tp"] == np.sum(flagged & (labels == 1)) and point["fp"] == np.sum(flagged & (labels == 0))
    assert point["tp"] + point["fn"] == 10 and point["fp"] + point["tn"] == 12
    assert th["oracle"]["label"] == "oracle (uses test labels)"
    no_normals = category_report(labels, scores, defects, labels == 1, masks, maps, n_resamples=0)
    assert set(no_normals.details["thresholds"]) == {"oracle"}
