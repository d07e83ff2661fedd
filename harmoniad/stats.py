"""Uncertainty and significance for benchmark metrics: bootstrap intervals, DeLong, paired
bootstrap, mean +- sd over seeds, Friedman test with the Nemenyi critical difference.

Why here and not in :mod:`harmoniad.metrics`: that module computes one exact number from one
test set; this one says how much that number would move under another draw of test images,
and whether two methods differ by more than that. Point estimates always come from
:mod:`harmoniad.metrics` (exact); this module adds intervals and tests.

Resampling is stratified and image-based: normal and defective images are resampled with
replacement separately (their counts stay fixed), so every resample has both classes, and
an image's pixels always move together (pixels of one image are not independent).

Image AUROC is exact in every resample: a resample is a vector of per-image counts, and the
Mann-Whitney statistic of a weighted sample needs only the counts summed per distinct score.

Pixel AUROC and AUPRO are binned, because an exact metric per resample would sort tens of
millions of pixels a thousand times. Binning (:class:`PixelHistograms`): scores go to a
uniform fine grid of 65,536 cells between the smallest and largest score, then to at most
``bins`` (default 1,024) coarse bins whose boundaries are fine-grid boundaries placed at
quantiles of the normal pixels (whole range, and again within the top ``fpr_limit`` where
AUPRO is integrated), of the anomalous pixels and of the anomalous pixels weighted by
1 / region size (PRO). Each image keeps three histograms (normal pixels, anomalous pixels,
PRO weight) and its region count, so a resample's histograms are one matrix product of its
counts with the per-image histograms and each metric is a cumulative sum.

Error of the binning against the exact metric, per resample: bin assignment is monotone in
the score, so the binned ROC/PRO curve is the exact curve (one vertex per distinct score)
restricted to the vertices at bin boundaries, joined by chords. Between two consecutive
vertices the exact curve is monotone, so it stays in the box the chord spans, and

- ``|binned AUROC - exact AUROC| <= 1/2 * sum_k P_pos[k] * P_neg[k]`` (pairs tied in a bin),
- ``|binned AUPRO - exact AUPRO| <= sum_k dFPR_k * dPRO_k / fpr_limit`` over the segments
  below ``fpr_limit`` (widths clipped at it).

Both bounds are computed for every resample and returned (``max_error``); with the default
binning they are about 1e-3 or less on continuous maps. They count pairs tied at one score as
possible error although the exact metric treats them alike, so on coarsely quantized maps
(a few levels) they are loose (~0.1) while the error itself stays small (``tests/unit/test_stats.py`` checks the
bound against the exact metric and the vectorised code against a slow loop on the same bins).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats as sps

from harmoniad.metrics import MetricError, _anomalous_pixels, _image_inputs, _pixel_inputs

__all__ = [
    "Interval", "PixelHistograms", "PixelResamples", "DeLongResult", "PairedResult",
    "FriedmanResult", "resample_counts", "image_auroc_resamples", "pixel_histograms",
    "pixel_resamples", "binned_pixel_metrics", "interval", "mean_interval", "delong_test", "paired_pixel_bootstrap",
    "mean_sd", "friedman_nemenyi", "nemenyi_cd", "cd_cliques",
]

N_RESAMPLES = 1000
LEVEL = 0.95
FINE_CELLS = 65536
# Resamples drawn per block: bounds the (block, images) temporaries to ~2^22 entries.
_BLOCK_ENTRIES = 1 << 22


@dataclass(frozen=True)
class Interval:
    """A point estimate with its percentile bootstrap interval."""

    estimate: float
    low: float
    high: float
    level: float = LEVEL
    n_resamples: int = N_RESAMPLES

    def as_list(self) -> list[float]:
        return [self.low, self.high]


# ----------------------------------------------------------------------------- resampling


def _block_size(n: int) -> int:
    return max(1, _BLOCK_ENTRIES // max(n, 1))


def _strata_members(strata: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(strata == s) for s in np.unique(strata)]


def _count_blocks(strata: np.ndarray, n_resamples: int, seed: int | np.random.Generator
                  ) -> Iterator[np.ndarray]:
    """Blocks of (resamples, items) counts: each stratum resampled with replacement to its
    own size. The block size depends on the item count only, so equal inputs and seed give
    equal draws whatever the caller does with them."""
    if n_resamples < 1:
        raise ValueError(f"n_resamples must be >= 1, got {n_resamples}")
    rng = np.random.default_rng(seed)
    members = _strata_members(strata)
    n = len(strata)
    block = _block_size(n)
    for first in range(0, n_resamples, block):
        rows = min(block, n_resamples - first)
        flat = np.concatenate([idx[rng.integers(0, len(idx), size=(rows, len(idx)))]
                               for idx in members], axis=1)
        flat += (np.arange(rows) * n)[:, None]
        yield np.bincount(flat.ravel(), minlength=rows * n).reshape(rows, n)


def resample_counts(strata: object, n_resamples: int = N_RESAMPLES,
                    seed: int | np.random.Generator = 0) -> np.ndarray:
    """(n_resamples, n) int counts of a stratified bootstrap: row b says how often each item
    is drawn in resample b; within each stratum (equal ``strata`` values) the counts sum to
    the stratum's size. The same draws the resampling functions below make for this seed."""
    strata_arr = np.asarray(strata)
    if strata_arr.ndim != 1 or strata_arr.size == 0:
        raise ValueError(f"strata must be a non-empty 1-D array, got shape {strata_arr.shape}")
    return np.concatenate(list(_count_blocks(strata_arr, n_resamples, seed)))


def interval(samples: np.ndarray, estimate: float, level: float = LEVEL) -> Interval:
    """Percentile interval of bootstrap ``samples`` around the (exact) ``estimate``."""
    samples = np.asarray(samples, dtype=np.float64)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    low, high = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return Interval(float(estimate), float(low), float(high), level, len(samples))


def mean_interval(samples: Sequence[np.ndarray], estimates: Sequence[float],
                  level: float = LEVEL) -> Interval:
    """Interval of the mean over categories: categories are resampled independently, so the
    b-th resample of the mean is the mean of every category's b-th resample."""
    if len(samples) == 0 or len(samples) != len(estimates):
        raise ValueError(f"need one sample array per estimate, got {len(samples)} and "
                         f"{len(estimates)}")
    lengths = {len(s) for s in samples}
    if len(lengths) != 1:
        raise ValueError(f"every category needs the same number of resamples, got {sorted(lengths)}")
    return interval(np.mean(np.stack(samples), axis=0), float(np.mean(estimates)), level)


# ----------------------------------------------------------------------------- image AUROC


def image_auroc_resamples(labels: object, scores: object, n_resamples: int = N_RESAMPLES,
                          seed: int | np.random.Generator = 0) -> np.ndarray:
    """Exact image AUROC of each stratified bootstrap resample, shape (n_resamples,).

    Resample b is the multiset given by ``resample_counts(labels, n_resamples, seed)[b]``;
    its AUROC is the Mann-Whitney statistic with ties counted half, in integers.
    """
    labels_arr, scores_arr = _image_inputs(labels, scores)
    order = np.argsort(scores_arr, kind="stable")
    values, positive = scores_arr[order], labels_arr[order]
    starts = np.flatnonzero(np.append(True, values[1:] != values[:-1]))
    n_pos = int(positive.sum())
    n_neg = len(values) - n_pos
    out = []
    for counts in _count_blocks(labels_arr.astype(np.int8), n_resamples, seed):
        counts = counts[:, order]
        w_pos = np.add.reduceat(counts * positive, starts, axis=1)
        w_neg = np.add.reduceat(counts * ~positive, starts, axis=1)
        below = np.cumsum(w_neg, axis=1) - w_neg
        out.append(np.sum(w_pos * (2 * below + w_neg), axis=1) / (2 * n_pos * n_neg))
    return np.concatenate(out)


# ----------------------------------------------------------------------------- pixel metrics


@dataclass(frozen=True)
class PixelHistograms:
    """Per-image binned pixel scores of one category (see the module docstring).

    ``neg``/``pos``/``pro``: (images, bins) normal-pixel counts, anomalous-pixel counts and
    PRO weights (1 / region size per anomalous pixel); ``regions``: regions per image;
    ``defective``: images with an anomalous pixel (the resampling strata). ``lo``, ``scale``
    and ``lut`` map a score to its bin (:meth:`bin_of`).
    """

    neg: np.ndarray
    pos: np.ndarray
    pro: np.ndarray
    regions: np.ndarray
    defective: np.ndarray
    lo: float
    scale: float
    lut: np.ndarray
    fpr_limit: float
    work_dtype: type = np.float64

    def bin_of(self, maps: np.ndarray) -> np.ndarray:
        """The bin index of every score (monotone non-decreasing in the score)."""
        return self.lut[_fine_cells(np.asarray(maps), self.lo, self.scale, self.work_dtype)]

    @property
    def bins(self) -> int:
        return self.neg.shape[1]


def _fine_cells(values: np.ndarray, lo: float, scale: float, dtype: type) -> np.ndarray:
    """Fine-grid cell of every score: floor((score - lo) * scale), clipped. Subtraction and
    multiplication by a positive number are monotone in floating point, so the cell never
    decreases as the score grows (the grid may be slightly uneven, which does not matter)."""
    fine = np.subtract(values, dtype(lo), dtype=dtype)
    fine *= dtype(scale)
    np.clip(fine, 0, FINE_CELLS - 1, out=fine)
    return fine.astype(np.int32)


def _quantile_cells(hist: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """Fine-grid boundaries (1..cells-1) at which the cumulative mass of ``hist`` passes
    each quantile."""
    cum = np.cumsum(hist, dtype=np.float64)
    if cum[-1] <= 0:
        return np.empty(0, dtype=np.int64)
    cells = np.searchsorted(cum / cum[-1], quantiles, side="left") + 1
    return cells[(cells > 0) & (cells < len(hist))]


def pixel_histograms(masks: object, maps: object, bins: int = 1024,
                     fpr_limit: float = 0.3) -> PixelHistograms:
    """Bin one category's pixel scores per image, for :func:`pixel_resamples`.

    ``masks``/``maps`` as :func:`harmoniad.metrics.pixel_metrics` (same checks). Cost: two
    passes of vectorised arithmetic over the maps plus the region labelling; memory: three
    (images, bins) float64 arrays.
    """
    if bins < 4:
        raise ValueError(f"bins must be >= 4, got {bins}")
    masks_arr, maps_arr = _pixel_inputs(masks, maps, fpr_limit)
    dtype = np.float32 if np.can_cast(maps_arr.dtype, np.float32, "safe") else np.float64
    n = len(maps_arr)
    pos_scores, weights, _ = _anomalous_pixels(masks_arr, maps_arr, dtype)  # checks finiteness
    if len(pos_scores) == 0 or masks_arr.all():
        raise MetricError("pixel masks: metrics are undefined with one class only")
    per_image = masks_arr.reshape(n, -1).sum(axis=1)
    image_of_pos = np.repeat(np.arange(n), per_image)
    lo, hi = float(maps_arr.min()), float(maps_arr.max())
    scale = FINE_CELLS / (hi - lo) if hi > lo else 0.0

    def fine_of(values: np.ndarray) -> np.ndarray:
        return _fine_cells(values, lo, scale, dtype)

    # Choose the coarse boundaries on the fine grid: normal pixels from a strided subsample.
    neg_fine = np.zeros(FINE_CELLS, dtype=np.int64)
    stride = max(1, n * maps_arr[0].size // 4_000_000)
    for first in range(0, n, 64):
        sub_maps = maps_arr[first : first + 64].reshape(-1)[::stride]
        sub_masks = masks_arr[first : first + 64].reshape(-1)[::stride]
        neg_fine += np.bincount(fine_of(sub_maps[~sub_masks]), minlength=FINE_CELLS)
    pos_fine_idx = fine_of(pos_scores)
    quarter = np.linspace(0, 1, bins // 4 + 1)[1:-1]
    boundaries = np.unique(np.concatenate([
        _quantile_cells(neg_fine, quarter),
        _quantile_cells(neg_fine, 1 - fpr_limit + fpr_limit * quarter),
        _quantile_cells(np.bincount(pos_fine_idx, minlength=FINE_CELLS), quarter),
        _quantile_cells(np.bincount(pos_fine_idx, weights, minlength=FINE_CELLS), quarter),
    ]))
    lut = np.searchsorted(boundaries, np.arange(FINE_CELLS), side="right").astype(np.int32)
    n_bins = len(boundaries) + 1

    pos_index = lut[pos_fine_idx] + image_of_pos * n_bins
    pos = np.bincount(pos_index, minlength=n * n_bins).reshape(n, n_bins).astype(np.float64)
    pro = np.bincount(pos_index, weights, minlength=n * n_bins).reshape(n, n_bins)
    # Every pixel binned, then the anomalous ones taken away: no boolean gather of the maps.
    neg = np.empty((n, n_bins))
    for first in range(0, n, 64):
        batch_maps = maps_arr[first : first + 64]
        rows = len(batch_maps)
        index = lut[fine_of(batch_maps)]
        index += (np.arange(rows, dtype=np.int32) * n_bins)[:, None, None]
        neg[first : first + rows] = np.bincount(index.ravel(), minlength=rows * n_bins
                                                ).reshape(rows, n_bins)
    neg -= pos
    regions = np.rint(np.bincount(image_of_pos, weights, minlength=n))
    return PixelHistograms(neg=neg, pos=pos, pro=pro, regions=regions, defective=per_image > 0,
                           lo=lo, scale=scale, lut=lut, fpr_limit=float(fpr_limit),
                           work_dtype=dtype)


@dataclass(frozen=True)
class PixelResamples:
    """Binned pixel AUROC and AUPRO of each resample, with each one's error bound."""

    auroc: np.ndarray
    aupro: np.ndarray
    auroc_bound: np.ndarray
    aupro_bound: np.ndarray

    @property
    def max_error(self) -> dict[str, float]:
        return {"pixel_auroc": float(self.auroc_bound.max()),
                "aupro": float(self.aupro_bound.max())}


def _binned_metrics(h_neg: np.ndarray, h_pos: np.ndarray, h_pro: np.ndarray,
                    regions: np.ndarray, fpr_limit: float) -> tuple[np.ndarray, ...]:
    """AUROC, AUPRO and their bounds from (resamples, bins) histograms (ascending bins)."""
    n_neg = h_neg.sum(axis=1)
    n_pos = h_pos.sum(axis=1)
    below = np.cumsum(h_neg, axis=1) - h_neg
    auroc = np.sum(h_pos * (below + 0.5 * h_neg), axis=1) / (n_pos * n_neg)
    auroc_bound = 0.5 * np.sum(h_pos * h_neg, axis=1) / (n_pos * n_neg)
    # Curve from the highest bin down: (FPR, PRO) after flagging bins >= k, from (0, 0).
    rows = len(h_neg)
    x = np.concatenate([np.zeros((rows, 1)), np.cumsum(h_neg[:, ::-1], axis=1) / n_neg[:, None]],
                       axis=1)
    y = np.concatenate([np.zeros((rows, 1)), np.cumsum(h_pro[:, ::-1], axis=1) / regions[:, None]],
                       axis=1)
    x0, x1, y0, y1 = x[:, :-1], x[:, 1:], y[:, :-1], y[:, 1:]
    xc0, xc1 = np.minimum(x0, fpr_limit), np.minimum(x1, fpr_limit)
    width = xc1 - xc0
    slope = np.divide(y1 - y0, x1 - x0, out=np.zeros_like(y0), where=x1 > x0)
    y_end = y0 + slope * (xc1 - x0)
    aupro = np.sum(width * (y0 + y_end), axis=1) / 2 / fpr_limit
    aupro_bound = np.sum(width * (y1 - y0), axis=1) / fpr_limit
    return auroc, aupro, auroc_bound, aupro_bound


def _resample_blocks(hist: PixelHistograms, counts: np.ndarray) -> tuple[np.ndarray, ...]:
    weights = counts.astype(np.float64)
    defective = hist.defective
    return _binned_metrics(weights @ hist.neg, weights[:, defective] @ hist.pos[defective],
                           weights[:, defective] @ hist.pro[defective],
                           weights @ hist.regions, hist.fpr_limit)


def pixel_resamples(hist: PixelHistograms, n_resamples: int = N_RESAMPLES,
                    seed: int | np.random.Generator = 0) -> PixelResamples:
    """Binned pixel AUROC and AUPRO of each image-stratified bootstrap resample (the draws
    of ``resample_counts(hist.defective, n_resamples, seed)``)."""
    parts = [_resample_blocks(hist, c)
             for c in _count_blocks(hist.defective.astype(np.int8), n_resamples, seed)]
    return PixelResamples(*(np.concatenate(p) for p in zip(*parts)))


def binned_pixel_metrics(hist: PixelHistograms) -> PixelResamples:
    """The binned metrics of the category itself (every image once), with their bounds."""
    return PixelResamples(*_resample_blocks(hist, np.ones((1, len(hist.neg)), dtype=np.int64)))


# ----------------------------------------------------------------------------- paired tests


@dataclass(frozen=True)
class DeLongResult:
    """DeLong's test of two correlated AUROCs (a - b)."""

    auroc_a: float
    auroc_b: float
    difference: float
    se: float
    z: float
    p_value: float


def _structural_components(pos: np.ndarray, neg: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """AUROC and DeLong's placement values V10 (per anomalous) and V01 (per normal), by
    midranks in O(n log n)."""
    m, n = len(pos), len(neg)
    rank_all = sps.rankdata(np.concatenate([pos, neg]))
    rank_pos, rank_neg = sps.rankdata(pos), sps.rankdata(neg)
    v10 = (rank_all[:m] - rank_pos) / n  # normals below each anomalous score (ties half)
    v01 = 1.0 - (rank_all[m:] - rank_neg) / m  # anomalous scores above each normal one
    return float(v10.mean()), v10, v01


def delong_test(labels: object, scores_a: object, scores_b: object) -> DeLongResult:
    """Two-sided DeLong test that two methods' image AUROCs on the same images are equal.

    DeLong, DeLong & Clarke-Pearson (1988), with the midrank computation of Sun & Xu (2014).
    When the difference has zero variance (e.g. both methods separate the classes
    perfectly), ``z`` is 0 and p is 1 for equal AUROCs, otherwise ``z`` is +-inf and p is 0.
    """
    labels_arr, a = _image_inputs(labels, scores_a)
    labels_b, b = _image_inputs(labels, scores_b)
    auc_a, v10_a, v01_a = _structural_components(a[labels_arr], a[~labels_arr])
    auc_b, v10_b, v01_b = _structural_components(b[labels_b], b[~labels_b])
    m, n = len(v10_a), len(v01_a)
    s10 = np.cov(np.stack([v10_a, v10_b])) if m > 1 else np.zeros((2, 2))
    s01 = np.cov(np.stack([v01_a, v01_b])) if n > 1 else np.zeros((2, 2))
    cov = s10 / m + s01 / n
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    diff = auc_a - auc_b
    if var <= 1e-15:
        z = 0.0 if abs(diff) < 1e-12 else float(np.copysign(np.inf, diff))
        p = 1.0 if z == 0.0 else 0.0
        return DeLongResult(auc_a, auc_b, diff, 0.0, z, p)
    se = float(np.sqrt(var))
    z = diff / se
    return DeLongResult(auc_a, auc_b, diff, se, float(z), float(2 * sps.norm.sf(abs(z))))


@dataclass(frozen=True)
class PairedResult:
    """Paired bootstrap of a metric difference (a - b) on the same images."""

    metric: str
    difference: float
    low: float
    high: float
    p_value: float
    n_resamples: int
    max_error: float


def _paired(metric: str, diff: float, samples: np.ndarray, level: float, bound: float
            ) -> PairedResult:
    low, high = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    b = len(samples)
    # Two-sided: twice the smaller tail beyond 0, with the +1 correction (never exactly 0).
    tail = min(np.count_nonzero(samples <= 0), np.count_nonzero(samples >= 0))
    p = min(1.0, 2 * (tail + 1) / (b + 1))
    return PairedResult(metric, float(diff), float(low), float(high), float(p), b, bound)


def paired_pixel_bootstrap(hist_a: PixelHistograms, hist_b: PixelHistograms,
                           n_resamples: int = N_RESAMPLES, seed: int | np.random.Generator = 0,
                           level: float = LEVEL) -> dict[str, PairedResult]:
    """Paired bootstrap of pixel AUROC and AUPRO differences between two methods' maps of
    the same images: every resample draws the same images for both methods.

    The difference and interval are of the binned metrics; ``max_error`` bounds how far a
    binned difference can be from the exact one (the sum of both methods' bounds).
    """
    if (len(hist_a.neg) != len(hist_b.neg) or not np.array_equal(hist_a.defective, hist_b.defective)
            or not np.array_equal(hist_a.regions, hist_b.regions)):
        raise ValueError("paired bootstrap needs the same images and masks for both methods")
    full_a, full_b = binned_pixel_metrics(hist_a), binned_pixel_metrics(hist_b)
    parts = []
    for counts in _count_blocks(hist_a.defective.astype(np.int8), n_resamples, seed):
        ra, rb = _resample_blocks(hist_a, counts), _resample_blocks(hist_b, counts)
        parts.append((ra[0] - rb[0], ra[1] - rb[1], ra[2] + rb[2], ra[3] + rb[3]))
    auroc_d, aupro_d, auroc_bound, aupro_bound = (np.concatenate(p) for p in zip(*parts))
    return {
        "pixel_auroc": _paired("pixel_auroc", float(full_a.auroc[0] - full_b.auroc[0]), auroc_d,
                               level, float(auroc_bound.max())),
        "aupro": _paired("aupro", float(full_a.aupro[0] - full_b.aupro[0]), aupro_d, level,
                         float(aupro_bound.max())),
    }


# ----------------------------------------------------------------------------- across runs


def mean_sd(values: Sequence[float]) -> tuple[float, float | None, int]:
    """Mean, sample standard deviation (ddof 1; None for fewer than two values) and count of
    finite values: the spread of a metric over runs that differ only in seed."""
    arr = np.asarray([v for v in values if v is not None], dtype=np.float64)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        raise ValueError("mean_sd: no finite values")
    return float(arr.mean()), (float(arr.std(ddof=1)) if arr.size > 1 else None), int(arr.size)


@dataclass(frozen=True)
class FriedmanResult:
    """Friedman test over datasets (rows) and methods (columns), with Nemenyi's CD."""

    statistic: float
    p_value: float
    average_ranks: np.ndarray  # rank 1 = best
    critical_difference: float
    n_datasets: int
    cliques: list[tuple[int, ...]]  # methods (column indices) not significantly different


def nemenyi_cd(k: int, n_datasets: int, alpha: float = 0.05) -> float:
    """Nemenyi critical difference of average ranks (Demsar 2006): q_alpha * sqrt(k(k+1)/6N),
    q_alpha the studentized range quantile at infinite df divided by sqrt(2)."""
    if k < 2 or n_datasets < 1:
        raise ValueError(f"need k >= 2 methods and >= 1 dataset, got k={k}, N={n_datasets}")
    q = sps.studentized_range.ppf(1 - alpha, k, np.inf) / np.sqrt(2)
    return float(q * np.sqrt(k * (k + 1) / (6.0 * n_datasets)))


def cd_cliques(average_ranks: np.ndarray, cd: float) -> list[tuple[int, ...]]:
    """Maximal groups of methods whose average ranks all lie within ``cd`` of each other
    (the bars of a critical-difference diagram), methods as column indices, best first."""
    order = np.argsort(average_ranks, kind="stable")
    ranks = np.asarray(average_ranks, dtype=np.float64)[order]
    groups: list[tuple[int, ...]] = []
    last_end = 0
    for i in range(len(order)):
        # The group starting at i ends before j; a group ending no later than the previous
        # one lies inside it (j never decreases with i), so it is not maximal.
        j = int(np.searchsorted(ranks, ranks[i] + cd, side="right"))
        if j - i > 1 and j > last_end:
            groups.append(tuple(int(m) for m in order[i:j]))
            last_end = j
    return groups


def friedman_nemenyi(scores: object, alpha: float = 0.05,
                     higher_is_better: bool = True) -> FriedmanResult:
    """Friedman's test that k >= 3 methods perform alike over N datasets (rows with a NaN
    are left out), the average ranks (ties averaged) and Nemenyi's critical difference."""
    arr = np.asarray(scores, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] < 3:
        raise ValueError(f"scores must be (datasets, methods >= 3), got shape {arr.shape}")
    arr = arr[np.isfinite(arr).all(axis=1)]
    if len(arr) < 2:
        raise ValueError(f"need at least 2 datasets with a score for every method, got {len(arr)}")
    ranks = sps.rankdata(-arr if higher_is_better else arr, axis=1)
    average = ranks.mean(axis=0)
    result = sps.friedmanchisquare(*arr.T)
    cd = nemenyi_cd(arr.shape[1], len(arr), alpha)
    stat, p = float(result.statistic), float(result.pvalue)
    if not np.isfinite(stat):  # every dataset ranks the methods identically with ties only
        stat, p = 0.0, 1.0
    return FriedmanResult(stat, p, average, cd, len(arr), cd_cliques(average, cd))
