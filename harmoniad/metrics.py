"""Exact image- and pixel-level anomaly detection metrics (docs/design.md#evaluation-protocol).

Every curve here is exact: one point per distinct score, equal scores grouped into one
threshold (ties are handled as scikit-learn handles them), no threshold grid. All metrics come
from one sort of the normal scores: between two consecutive distinct anomalous scores only the
false positives change, so every curve is determined by, for each distinct anomalous score t,
the number of anomalous scores >= t (and their region weights, for PRO) and the numbers of
normal scores >= t and > t (two binary searches in the sorted normal scores):

- AUROC: the trapezoid ROC area equals the Mann-Whitney statistic, each anomalous score
  counting the normal scores below it plus half of those equal to it (exact, in integers);
- AP: sum over thresholds of recall increase times precision; recall only rises at anomalous
  scores, so only those thresholds contribute (scikit-learn's ``average_precision_score``);
- F1-max: for a given recall the F1 is highest at the anomalous score itself;
- AUPRO: PRO is flat between anomalous scores, so the PRO curve is the polyline through
  (FPR(> t), PRO before t) and (FPR(>= t), PRO after t) for each distinct anomalous score t,
  which is the all-thresholds curve with collinear points merged.

Normal scores below every anomalous score only matter by their count and are not sorted.
Maps in float32 (or float16, bool, 8/16-bit integers, which float32 holds exactly) are
evaluated in float32; other dtypes in float64. Peak memory is the inputs plus about 4 bytes per
normal pixel (float32).

Degenerate input raises :class:`MetricError` (a ``ValueError``) naming the problem; nothing
here returns NaN. Callers that want NaN for an undefined metric (a category without defective
images) check first, as ``harmoniad.evaluate`` does.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import NamedTuple

import numpy as np
from scipy import ndimage

__all__ = ["MetricError", "image_metrics", "image_curves", "pixel_metrics", "pixel_metrics_of_subsets",
           "pixel_curves", "aupro"]

# Images labelled and scanned per step: bounds the per-step temporaries.
_IMAGE_BATCH = 64
# 8-connectivity in each image and none across images, for labelling an (N, H, W) stack at once.
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = True


class MetricError(ValueError):
    """A metric is undefined for this input, or the input is malformed."""


def _trapezoid_to(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Area under the polyline (x non-decreasing, from 0, ending at or past ``limit``) up to
    ``limit``, the last segment interpolated linearly."""
    inside = int(np.searchsorted(x, limit, side="right"))  # points with x <= limit
    area = float(np.dot(np.diff(x[:inside]), y[1:inside] + y[: inside - 1])) / 2.0
    if inside < len(x):  # the segment (inside - 1 -> inside) crosses the limit
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += (limit - x0) * (y0 + y_lim) / 2.0
    return float(area)


def _count_at_least(neg_sorted: Sequence[np.ndarray], thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normal scores >= and > each threshold, summed over several ascending arrays."""
    n_ge = np.zeros(len(thresholds), dtype=np.int64)
    n_gt = np.zeros(len(thresholds), dtype=np.int64)
    for part in neg_sorted:
        n_ge += len(part) - np.searchsorted(part, thresholds, side="left")
        n_gt += len(part) - np.searchsorted(part, thresholds, side="right")
    return n_ge, n_gt


def _curve_metrics(neg_sorted: np.ndarray | Sequence[np.ndarray], n_neg: int, pos: np.ndarray,
                   weights: np.ndarray | None = None, n_regions: int = 0,
                   fpr_limit: float = 0.3) -> dict[str, float]:
    """AUROC, AP, F1-max (and AUPRO when region ``weights`` are given) from ranks.

    ``neg_sorted``: ascending normal scores, all those >= min(pos), as one array or several
    (parts of the normal set sorted apart, counted together); the other
    ``n_neg - len(neg_sorted)`` normal scores are below every anomalous one. ``pos``: the
    anomalous scores; ``weights``: 1 / size of each one's region (summing to ``n_regions``).
    """
    parts = [neg_sorted] if isinstance(neg_sorted, np.ndarray) else list(neg_sorted)
    n_pos = len(pos)
    order = np.argsort(pos)[::-1]
    pos_desc = pos[order]
    ends = np.flatnonzero(np.append(pos_desc[:-1] != pos_desc[1:], True))
    thresholds = pos_desc[ends]  # distinct anomalous scores, descending
    tp = ends + 1  # anomalous scores >= threshold
    count = np.diff(tp, prepend=0)  # anomalous scores == threshold
    n_ge, n_gt = _count_at_least(parts, thresholds)
    twice_wins = 2 * (n_neg - n_ge) + (n_ge - n_gt)  # per anomalous score: below + half ties
    result = {
        "auroc": int(np.dot(count, twice_wins)) / (2 * n_pos * n_neg),
        "ap": float(np.dot(count, tp / (tp + n_ge))) / n_pos,
        "f1_max": float(np.max(2.0 * tp / (tp + n_ge + n_pos))),
    }
    if weights is not None:
        fpr, pro_curve = _pro_curve(weights[order], ends, n_regions, n_ge, n_gt, n_neg)
        result["aupro"] = _trapezoid_to(fpr, pro_curve, fpr_limit) / fpr_limit
    return result


def _pro_curve(weights_desc: np.ndarray, ends: np.ndarray, n_regions: int, n_ge: np.ndarray,
               n_gt: np.ndarray, n_neg: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact PRO curve (FPR, PRO) through (FPR(> t), PRO before t) and (FPR(>= t), PRO
    after t) for each distinct anomalous score t, from (0, 0) to FPR 1."""
    pro = np.cumsum(weights_desc)[ends] / n_regions
    fpr = np.empty(2 * len(ends) + 2)
    fpr[0], fpr[1:-1:2], fpr[2:-1:2], fpr[-1] = 0.0, n_gt / n_neg, n_ge / n_neg, 1.0
    pro_curve = np.empty_like(fpr)  # flat before each threshold, rising across it
    pro_curve[0], pro_curve[1], pro_curve[3:-1:2] = 0.0, 0.0, pro[:-1]
    pro_curve[2:-1:2], pro_curve[-1] = pro, pro[-1]
    return fpr, pro_curve


def _check_real(values: np.ndarray, what: str) -> None:
    if values.dtype.kind not in "biuf":
        raise MetricError(f"{what} must be real numbers, got dtype {values.dtype}")


def _as_binary(values: np.ndarray, what: str) -> np.ndarray:
    """The 0/1 array as bool; anything else (e.g. a 0/255 mask) is refused, not guessed."""
    if values.dtype == bool:
        return values
    _check_real(values, what)
    is01 = (values == 0) | (values == 1)
    if not is01.all():
        bad = np.unique(values[~is01])[:5]
        raise MetricError(f"{what} must be 0/1 or bool, found values {bad.tolist()}"
                          " (binarize first, e.g. mask > 0)")
    return values != 0


def _class_counts(labels: np.ndarray, what: str) -> tuple[int, int]:
    n_pos = int(np.count_nonzero(labels))
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise MetricError(f"{what}: metrics are undefined with one class only "
                          f"({n_pos} anomalous, {n_neg} normal)")
    return n_pos, n_neg


# ----------------------------------------------------------------------------- image level


def _image_inputs(labels: object, scores: object) -> tuple[np.ndarray, np.ndarray]:
    labels_arr, scores_arr = np.asarray(labels), np.asarray(scores)
    if labels_arr.ndim != 1 or labels_arr.shape != scores_arr.shape:
        raise MetricError(f"labels and scores must be 1-D of equal length, got shapes "
                          f"{labels_arr.shape} and {scores_arr.shape}")
    labels_arr = _as_binary(labels_arr, "labels")
    _check_real(scores_arr, "scores")
    scores_arr = scores_arr.astype(np.float64)
    if not np.isfinite(scores_arr).all():
        raise MetricError(f"scores contain NaN or inf at indices "
                          f"{np.flatnonzero(~np.isfinite(scores_arr))[:5].tolist()}")
    _class_counts(labels_arr, "image labels")
    return labels_arr, scores_arr


def image_metrics(labels: object, scores: object) -> dict[str, float]:
    """Image AUROC, AP and F1-max (max over the precision-recall curve).

    ``labels``: (N,) 0/1 or bool, 1 = anomalous; ``scores``: (N,) finite reals, higher = more
    anomalous. Both classes must be present. AUROC and AP equal scikit-learn's
    ``roc_auc_score`` and ``average_precision_score``.
    """
    labels_arr, scores_arr = _image_inputs(labels, scores)
    negatives = np.sort(scores_arr[~labels_arr])
    return _curve_metrics(negatives, len(negatives), scores_arr[labels_arr])


def image_curves(labels: object, scores: object) -> dict[str, np.ndarray]:
    """ROC and precision-recall points for plotting, one per distinct score (descending).

    Returns ``thresholds``, ``fpr``, ``tpr``, ``precision``, ``recall``, ``f1``, all of equal
    length; the first point (threshold +inf: nothing flagged) is ``fpr = tpr = recall = 0``,
    ``precision = 1``, ``f1 = 0``.
    """
    labels_arr, scores_arr = _image_inputs(labels, scores)
    n_pos, n_neg = _class_counts(labels_arr, "image labels")
    order = np.argsort(scores_arr)[::-1]
    values = scores_arr[order]
    ends = np.flatnonzero(np.append(values[:-1] != values[1:], True))
    tp = np.concatenate(([0], np.cumsum(labels_arr[order], dtype=np.int64)[ends]))
    fp = np.concatenate(([0], ends + 1)) - tp
    precision = np.divide(tp, tp + fp, out=np.ones(len(tp)), where=tp + fp > 0)
    return {
        "thresholds": np.concatenate(([np.inf], values[ends])),
        "fpr": fp / n_neg,
        "tpr": tp / n_pos,
        "precision": precision,
        "recall": tp / n_pos,
        "f1": 2.0 * tp / (tp + fp + n_pos),
    }


# ----------------------------------------------------------------------------- pixel level


def _pixel_inputs(masks: object, maps: object, fpr_limit: float) -> tuple[np.ndarray, np.ndarray]:
    masks_arr, maps_arr = np.asarray(masks), np.asarray(maps)
    if masks_arr.shape != maps_arr.shape:
        raise MetricError(f"masks and maps must have the same shape, got masks {masks_arr.shape} "
                          f"and maps {maps_arr.shape}")
    if masks_arr.ndim != 3 or masks_arr.size == 0:
        raise MetricError(f"masks and maps must be non-empty (N, H, W) arrays, got shape "
                          f"{masks_arr.shape}")
    if not 0.0 < fpr_limit <= 1.0:
        raise MetricError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    _check_real(maps_arr, "maps")
    return _as_binary(masks_arr, "masks"), maps_arr


def _anomalous_pixels(masks: np.ndarray, maps: np.ndarray, dtype: type
                      ) -> tuple[np.ndarray, np.ndarray, int]:
    """Scores of the anomalous pixels, each one's weight 1 / (size of its 8-connected region),
    and the number of regions; checks every map for NaN and inf on the way."""
    scores, weights, n_regions = [], [], 0
    for first in range(0, len(maps), _IMAGE_BATCH):
        batch_maps = maps[first : first + _IMAGE_BATCH]
        batch_masks = masks[first : first + _IMAGE_BATCH]
        if batch_maps.dtype.kind == "f":
            finite = np.isfinite(batch_maps).reshape(len(batch_maps), -1).all(axis=1)
            if not finite.all():
                bad = (np.flatnonzero(~finite)[:5] + first).tolist()
                raise MetricError(f"maps contain NaN or inf (images {bad})")
        labels, count = ndimage.label(batch_masks, structure=_STRUCTURE)
        region = labels[batch_masks]  # 1..count, same order as the scores below
        weights.append(1.0 / np.bincount(region)[region])
        scores.append(batch_maps[batch_masks].astype(dtype, copy=False))
        n_regions += count
    return np.concatenate(scores), np.concatenate(weights), n_regions


def _normal_scores_from(masks: np.ndarray, maps: np.ndarray, lowest: np.generic, n_neg: int,
                        dtype: type) -> np.ndarray:
    """Normal scores >= ``lowest`` (the others only count), in one buffer of at most n_neg."""
    buffer = np.empty(n_neg, dtype=dtype)  # pages past the filled part are never touched
    filled = 0
    for first in range(0, len(maps), _IMAGE_BATCH):
        batch_maps = maps[first : first + _IMAGE_BATCH]
        keep = batch_maps >= lowest
        keep &= ~masks[first : first + _IMAGE_BATCH]
        values = batch_maps[keep]
        buffer[filled : filled + len(values)] = values
        filled += len(values)
    return buffer[:filled]


def pixel_metrics(masks: object, maps: object, fpr_limit: float = 0.3) -> dict[str, float]:
    """Pixel AUROC, AP, F1-max and AUPRO (up to ``fpr_limit``) over all pixels of all images.

    ``masks``: (N, H, W) bool (or 0/1), True = anomalous; ``maps``: (N, H, W) finite real
    scores at the same resolution (resize before calling; nothing is resized here). Needs at
    least one anomalous and one normal pixel. AUROC/AP equal scikit-learn's on the flattened
    pixels; AUPRO is described in :func:`aupro`.
    """
    negatives, n_neg, pos, weights, n_regions = _pixel_scores(masks, maps, fpr_limit)
    return _curve_metrics(negatives, n_neg, pos, weights, n_regions, float(fpr_limit))


class _Group(NamedTuple):
    """Images that belong to the same subsets: their pixels' counts, anomalous scores and regions."""

    pattern: np.ndarray  # (subsets,) bool: which subsets hold these images
    n_neg: int
    pos: np.ndarray
    weights: np.ndarray
    n_regions: int
    masks: np.ndarray
    maps: np.ndarray


def pixel_metrics_of_subsets(
    masks: object, maps: object, subsets: Mapping[Hashable, object], fpr_limit: float = 0.3
) -> dict[Hashable, dict[str, float]]:
    """:func:`pixel_metrics` of several subsets of the images, each pixel sorted once.

    ``subsets``: name -> (N,) bool selecting images; the result for a name equals
    ``pixel_metrics(masks[rows], maps[rows])``. Why: a category's report needs its pixel
    metrics over all images and again per defect type, each over the normal images plus
    that type's; sorting the shared normal pixels once per subset would sort them 1 + types
    times. Here images are grouped by which subsets they belong to, each group's scores are
    gathered and sorted once, and a subset counts over its groups. Each subset needs an
    anomalous and a normal pixel (:class:`MetricError` names the subset otherwise).
    """
    masks_arr, maps_arr = _pixel_inputs(masks, maps, fpr_limit)
    n = len(maps_arr)
    names = list(subsets)
    member = np.zeros((len(names), n), dtype=bool)
    for k, name in enumerate(names):
        rows = np.asarray(subsets[name])
        if rows.shape != (n,) or rows.dtype != bool:
            raise MetricError(f"subset {name!r} must be a ({n},) bool array, got {rows.dtype} {rows.shape}")
        member[k] = rows
    dtype = np.float32 if np.can_cast(maps_arr.dtype, np.float32, "safe") else np.float64
    # Groups: images with the same membership pattern (unused images form no group).
    patterns, group_of = np.unique(member.T, axis=0, return_inverse=True)
    groups: list[_Group] = []
    for g, pattern in enumerate(patterns):
        if not pattern.any():
            continue
        rows = np.flatnonzero(group_of.ravel() == g)
        g_masks, g_maps = masks_arr[rows], maps_arr[rows]
        n_pos = int(np.count_nonzero(g_masks))
        if n_pos:
            pos, weights, n_regions = _anomalous_pixels(g_masks, g_maps, dtype)
        else:
            pos, weights, n_regions = np.empty(0, dtype), np.empty(0), 0
        groups.append(_Group(pattern, g_masks.size - n_pos, pos, weights, n_regions, g_masks, g_maps))
    lowest = min((grp.pos.min() for grp in groups if len(grp.pos)), default=None)
    sorted_neg = []
    for grp in groups:  # each group's normal scores >= the lowest anomalous one, sorted once
        neg = (_normal_scores_from(grp.masks, grp.maps, lowest, grp.n_neg, dtype) if lowest is not None
               else np.empty(0, dtype))
        neg.sort()
        sorted_neg.append(neg)
    result: dict[Hashable, dict[str, float]] = {}
    for k, name in enumerate(names):
        mine = [i for i, grp in enumerate(groups) if grp.pattern[k]]
        n_neg = sum(groups[i].n_neg for i in mine)
        n_pos = sum(len(groups[i].pos) for i in mine)
        if n_pos == 0 or n_neg == 0:
            raise MetricError(f"subset {name!r}: metrics are undefined with one class only "
                              f"({n_pos} anomalous, {n_neg} normal pixels)")
        result[name] = _curve_metrics(
            [sorted_neg[i] for i in mine], n_neg,
            np.concatenate([groups[i].pos for i in mine]), np.concatenate([groups[i].weights for i in mine]),
            sum(groups[i].n_regions for i in mine), float(fpr_limit))
    return result


def _pixel_scores(
    masks: object, maps: object, fpr_limit: float
) -> tuple[np.ndarray, int, np.ndarray, np.ndarray, int]:
    """Checked inputs -> sorted normal-pixel scores, their count, anomalous scores, region weights, regions."""
    masks_arr, maps_arr = _pixel_inputs(masks, maps, fpr_limit)
    _, n_neg = _class_counts(masks_arr, "pixel masks")
    dtype = np.float32 if np.can_cast(maps_arr.dtype, np.float32, "safe") else np.float64
    pos, weights, n_regions = _anomalous_pixels(masks_arr, maps_arr, dtype)
    negatives = _normal_scores_from(masks_arr, maps_arr, pos.min(), n_neg, dtype)
    negatives.sort()
    return negatives, n_neg, pos, weights, n_regions


def aupro(masks: object, maps: object, fpr_limit: float = 0.3) -> float:
    """Exact area under the per-region-overlap curve up to ``fpr_limit``, divided by it.

    As MVTec AD's official evaluation defines it: regions are the 8-connected components of
    each ground-truth mask; at a threshold t, PRO is the mean over all regions (of all images)
    of the fraction of the region's pixels with score >= t, and FPR is the fraction of all
    normal pixels (of all images) with score >= t. The curve has one point per distinct score,
    starts at (0, 0), is integrated by trapezoids, and is interpolated linearly at
    ``fpr_limit``. Inputs and errors as :func:`pixel_metrics` (which returns this too).
    """
    return pixel_metrics(masks, maps, fpr_limit)["aupro"]


def pixel_curves(masks: object, maps: object, fpr_limit: float = 0.3) -> dict[str, np.ndarray | float]:
    """Pixel ROC and PRO curves for plotting, exact (the points the metrics integrate).

    Returns ``fpr`` and ``tpr`` (ROC: two points per distinct anomalous-pixel score, normal
    pixels tied with it counted before and after, from (0, 0) to (1, 1); its trapezoid area is
    the pixel AUROC) and ``pro_fpr`` and ``pro`` (the PRO curve of :func:`aupro`, to FPR 1; AUPRO
    integrates it up to ``fpr_limit``), and the two areas ``auroc`` and ``aupro`` (equal to
    :func:`pixel_metrics`'). Inputs and errors as :func:`pixel_metrics`.
    """
    negatives, n_neg, pos, weights, n_regions = _pixel_scores(masks, maps, fpr_limit)
    order = np.argsort(pos)[::-1]
    pos_desc = pos[order]
    ends = np.flatnonzero(np.append(pos_desc[:-1] != pos_desc[1:], True))
    n_ge = len(negatives) - np.searchsorted(negatives, pos_desc[ends], side="left")
    n_gt = len(negatives) - np.searchsorted(negatives, pos_desc[ends], side="right")
    pro_fpr, pro = _pro_curve(weights[order], ends, n_regions, n_ge, n_gt, n_neg)
    # ROC is the same construction with every pixel its own unit-weight "region": TPR.
    fpr, tpr = _pro_curve(np.ones(len(pos)), ends, len(pos), n_ge, n_gt, n_neg)
    return {"fpr": fpr, "tpr": tpr, "pro_fpr": pro_fpr, "pro": pro,
            "auroc": float(np.dot(np.diff(fpr), tpr[1:] + tpr[:-1]) / 2.0),
            "aupro": _trapezoid_to(pro_fpr, pro, fpr_limit) / fpr_limit}
