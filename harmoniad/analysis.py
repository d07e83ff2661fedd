"""One category's full report: metrics, per-defect-type results, bootstrap intervals and
operating points, from its per-image scores, maps and ground truth.

Why apart from :mod:`harmoniad.evaluate`: this is pure computation on arrays (no methods,
no store), so it is tested on its own and reused wherever scores are at hand. Exact metrics
come from :mod:`harmoniad.metrics`, intervals and tests from :mod:`harmoniad.stats`,
thresholds from :mod:`harmoniad.thresholds`.

Pixel metrics use the normal images and the defective images that have a mask; a category
whose defective images have no mask has no pixel metrics (NaN in ``metrics``, ``None`` in
``details``: not available, never 0).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harmoniad import stats
from harmoniad.metrics import image_metrics, pixel_metrics, pixel_metrics_of_subsets
from harmoniad.thresholds import ORACLE_LABEL, fit_thresholds, operating_point, oracle_threshold

IMAGE_KEYS = ("auroc", "ap", "f1_max")
PIXEL_KEYS = ("auroc", "ap", "f1_max", "aupro")
#: Metrics that get bootstrap intervals, as named in ``details["intervals"]``.
INTERVAL_METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")


@dataclass
class CategoryReport:
    """``metrics``: flat store metrics (NaN when undefined); ``details``: JSON-safe extras
    (defects, intervals, thresholds, counts); ``resamples``: bootstrap samples per metric,
    kept for the interval of the mean over categories."""

    metrics: dict[str, float]
    details: dict[str, Any]
    resamples: dict[str, np.ndarray] = field(default_factory=dict)


def category_seed(seed: int, category: str) -> np.random.SeedSequence:
    """The bootstrap seed of one category: equal for every method (paired resamples), and
    independent between categories."""
    return np.random.SeedSequence([int(seed), zlib.crc32(category.encode("utf-8"))])


def _num(value: float | None) -> float | None:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def image_part(labels: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    if 0 < labels.sum() < len(labels):
        return {f"image_{k}": float(v) for k, v in image_metrics(labels, scores).items()}
    return {f"image_{k}": float("nan") for k in IMAGE_KEYS}


def pixel_part(masks: np.ndarray, maps: np.ndarray) -> dict[str, float]:
    if masks.any() and not masks.all():
        return {f"pixel_{k}": float(v) for k, v in pixel_metrics(masks, maps).items()}
    return {f"pixel_{k}": float("nan") for k in PIXEL_KEYS}


def _pixel_parts(masks: np.ndarray, maps: np.ndarray,
                 subsets: Mapping[str | None, np.ndarray]) -> dict[str | None, dict[str, float]]:
    """:func:`pixel_part` of each subset of images, sharing one sort of every pixel; NaN
    metrics for a subset whose pixels are all normal or all anomalous."""
    n = len(masks)
    flat = masks.reshape(n, -1)
    any_pos, all_pos = flat.any(axis=1), flat.all(axis=1)
    defined = {k: rows for k, rows in subsets.items() if any_pos[rows].any() and not all_pos[rows].all()}
    out: dict[str | None, dict[str, float]] = {k: {f"pixel_{m}": float("nan") for m in PIXEL_KEYS} for k in subsets}
    if defined:
        for k, values in pixel_metrics_of_subsets(masks, maps, defined).items():
            out[k] = {f"pixel_{m}": float(v) for m, v in values.items()}
    return out


def _pixel_bootstrap(masks: np.ndarray, maps: np.ndarray, rows: np.ndarray, n_resamples: int,
                     rng: np.random.Generator) -> stats.PixelResamples:
    """Binned pixel AUROC and AUPRO of ``n_resamples`` bootstrap resamples of the images with
    pixel ground truth (``rows``)."""
    take = slice(None) if rows.all() else rows  # a slice does not copy the maps
    return stats.pixel_resamples(stats.pixel_histograms(masks[take], maps[take]), n_resamples, rng)


def category_report(
    labels: Sequence[int],
    scores: Sequence[float],
    defects: Sequence[str],
    has_mask: Sequence[bool],
    masks: np.ndarray | None,
    maps: np.ndarray | None,
    *,
    normal_scores: Sequence[float] | None = None,
    target_fpr: float = 0.01,
    n_resamples: int = stats.N_RESAMPLES,
    seed: int | np.random.SeedSequence = 0,
) -> CategoryReport:
    """Metrics and details of one category's test set.

    ``labels``/``scores``/``defects``/``has_mask``: per test image; ``masks``/``maps``:
    (N, R, R) or None (no maps). ``normal_scores``: the held-out training normals' scores,
    for the thresholds (None: no normal-only thresholds). ``n_resamples`` 0 skips intervals.
    """
    labels_arr = np.asarray(labels, dtype=np.int8)
    scores_arr = np.asarray(scores, dtype=np.float64)
    defects_arr = np.asarray(defects, dtype=object)
    masked = np.asarray(has_mask, dtype=bool)
    normal = labels_arr == 0
    pixel_rows = normal | masked  # images with pixel ground truth
    with_maps = masks is not None and maps is not None
    n_masked = int((masked & ~normal).sum())
    defect_types = sorted({str(d) for d, lab in zip(defects_arr, labels_arr) if lab == 1})
    of_type = {d: (defects_arr == d) & (labels_arr == 1) for d in defect_types}
    # Pixel subsets: all images with ground truth, and per defect type the normal images
    # plus that type's masked ones; computed together so each pixel is sorted once.
    subsets: dict[str | None, np.ndarray] = {}
    if with_maps and n_masked:
        subsets[None] = pixel_rows
        subsets.update({d: normal | (rows & masked) for d, rows in of_type.items() if (rows & masked).any()})
    seq = seed if isinstance(seed, np.random.SeedSequence) else np.random.SeedSequence(int(seed))
    image_seed, pixel_seed = seq.spawn(2)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # The pixel bootstrap in parallel with the exact pixel metrics (both numpy work that
        # releases the GIL): a run's last category is recorded while nothing else runs, so
        # its record time is the run's tail. Its outcome is read only where the pixel
        # metrics are defined.
        bootstrap = (pool.submit(_pixel_bootstrap, masks, maps, pixel_rows, n_resamples,
                                 np.random.default_rng(pixel_seed)) if subsets and n_resamples > 0 else None)
        pixel = _pixel_parts(masks, maps, subsets) if subsets else {}
    metrics = image_part(labels_arr, scores_arr)
    metrics.update(pixel.get(None) or {f"pixel_{k}": float("nan") for k in PIXEL_KEYS})

    defect_rows = []
    for defect in defect_types:
        rows = normal | of_type[defect]
        row: dict[str, Any] = {"defect": defect, "n": int(of_type[defect].sum()),
                               "n_masked": int((of_type[defect] & masked).sum()),
                               "image_auroc": None, "pixel_auroc": None, "aupro": None}
        if normal.any():
            row["image_auroc"] = _num(image_part(labels_arr[rows], scores_arr[rows])["image_auroc"])
        if defect in pixel:
            row["pixel_auroc"], row["aupro"] = _num(pixel[defect]["pixel_auroc"]), _num(pixel[defect]["pixel_aupro"])
        defect_rows.append(row)

    details: dict[str, Any] = {
        "n_images": int(len(labels_arr)),
        "n_normal": int(normal.sum()),
        "n_defective": int((~normal).sum()),
        "n_masked": n_masked,
        "n_pixel_images": int(pixel_rows.sum()) if n_masked else 0,
        "defects": defect_rows,
    }
    resamples: dict[str, np.ndarray] = {}
    intervals: dict[str, Any] = {}
    if n_resamples > 0:
        if not math.isnan(metrics["image_auroc"]):
            resamples["image_auroc"] = stats.image_auroc_resamples(
                labels_arr, scores_arr, n_resamples, np.random.default_rng(image_seed))
        if not math.isnan(metrics["pixel_auroc"]) and bootstrap is not None:
            pixel = bootstrap.result()
            resamples["pixel_auroc"], resamples["pixel_aupro"] = pixel.auroc, pixel.aupro
            intervals["max_binning_error"] = pixel.max_error
        for name, samples in resamples.items():
            intervals[name] = stats.interval(samples, metrics[name]).as_list()
        intervals.update(n_resamples=int(n_resamples), level=stats.LEVEL)
    details["intervals"] = intervals
    details["thresholds"] = _thresholds(labels_arr, scores_arr, normal_scores, target_fpr)
    return CategoryReport(metrics, details, resamples)


def _thresholds(labels: np.ndarray, scores: np.ndarray, normal_scores: Sequence[float] | None,
                target_fpr: float) -> dict[str, Any]:
    """Normal-only thresholds (when held-out normals were scored) and the test-label oracle,
    each with its operating point on the test set."""
    out: dict[str, Any] = {}
    if normal_scores is not None and len(normal_scores):
        for rule, fitted in fit_thresholds(normal_scores, target_fpr).items():
            out[rule] = {**fitted, "test": operating_point(labels, scores, fitted["value"])}
    if 0 < labels.sum() < len(labels):
        value = oracle_threshold(labels, scores)
        out["oracle"] = {"value": value, "rule": "f1_max", "label": ORACLE_LABEL,
                         "test": operating_point(labels, scores, value)}
    return out


def mean_intervals(reports: Mapping[str, CategoryReport]) -> dict[str, Any]:
    """Intervals of the mean over categories for each metric every report has resamples of
    (categories are resampled independently; see :func:`harmoniad.stats.mean_interval`)."""
    out: dict[str, Any] = {}
    for name in INTERVAL_METRICS:
        having = [r for r in reports.values() if name in r.resamples]
        if not having:
            continue
        ci = stats.mean_interval([r.resamples[name] for r in having], [r.metrics[name] for r in having])
        out[name] = {"estimate": ci.estimate, "interval": ci.as_list(), "n_categories": len(having)}
    return out
