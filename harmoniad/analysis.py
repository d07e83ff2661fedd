"""Intervals and tests for stored runs, from their per-image tables (``ResultStore.load_images``).

Why a module: the dashboard's Compare page and the HTML report (:mod:`harmoniad.report`) show
the same intervals and tests; the statistics themselves are :mod:`harmoniad.stats` and every
point estimate is :mod:`harmoniad.metrics` (exact). Everything here is image level (image
AUROC), because the per-image table is all it needs: it stays fast on large runs.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from harmoniad.metrics import MetricError, image_metrics
from harmoniad.stats import (
    LEVEL,
    N_RESAMPLES,
    delong_test,
    friedman_nemenyi,
    image_auroc_resamples,
    interval,
    mean_interval,
)

ALPHA = 1.0 - LEVEL  # significance level of the paired tests, matching the intervals
MEAN = "mean"


def auroc_intervals(images: pd.DataFrame, n_resamples: int = N_RESAMPLES, seed: int = 0) -> pd.DataFrame:
    """Image AUROC with its stratified bootstrap interval per category and for the mean.

    Columns ``category``, ``estimate``, ``low``, ``high`` (fractions); categories where the
    AUROC is undefined (one class only) are left out, and the mean is over the others.
    """
    rows, samples, estimates = [], [], []
    for category, part in images.groupby("category", sort=False):
        labels, scores = part["label"].to_numpy(), part["score"].to_numpy(dtype=np.float64)
        try:
            estimate = image_metrics(labels, scores)["auroc"]
        except MetricError:
            continue
        resamples = image_auroc_resamples(labels, scores, n_resamples, seed)
        ci = interval(resamples, estimate)
        rows.append({"category": str(category), "estimate": ci.estimate, "low": ci.low, "high": ci.high})
        samples.append(resamples)
        estimates.append(estimate)
    if samples:
        ci = mean_interval(samples, estimates)
        rows.append({"category": MEAN, "estimate": ci.estimate, "low": ci.low, "high": ci.high})
    return pd.DataFrame(rows, columns=["category", "estimate", "low", "high"])


def paired_auroc_tests(a: pd.DataFrame, b: pd.DataFrame, alpha: float = ALPHA) -> pd.DataFrame:
    """DeLong's paired test of image AUROC (a - b) per category, on the images both runs scored.

    Images are matched by file path (the same test set); columns ``category``, ``n_images``,
    ``difference``, ``p_value``, ``significant`` (p < ``alpha``).
    """
    rows = []
    merged = a[["image_path", "category", "label", "score"]].merge(
        b[["image_path", "score"]], on="image_path", suffixes=("_a", "_b"))
    for category, part in merged.groupby("category", sort=False):
        try:
            result = delong_test(part["label"].to_numpy(), part["score_a"].to_numpy(dtype=np.float64),
                                 part["score_b"].to_numpy(dtype=np.float64))
        except MetricError:
            continue
        rows.append({"category": str(category), "n_images": len(part), "difference": result.difference,
                     "p_value": result.p_value, "significant": bool(result.p_value < alpha)})
    return pd.DataFrame(rows, columns=["category", "n_images", "difference", "p_value", "significant"])


def ranks_over_categories(per_category: Mapping[str, Mapping[str, float]], alpha: float = ALPHA) -> dict | None:
    """Friedman test and Nemenyi critical difference of >= 3 methods over categories.

    ``per_category`` maps a method label to ``{category: metric}``. Returns the methods, their
    average ranks (1 = best), the critical difference, the groups not significantly different
    and the p-value; None when there are fewer than 3 methods or 2 shared categories.
    """
    labels = list(per_category)
    if len(labels) < 3:
        return None
    categories = sorted(set.intersection(*(set(v) for v in per_category.values())))
    scores = np.array([[per_category[m][c] for m in labels] for c in categories], dtype=np.float64)
    try:
        result = friedman_nemenyi(scores, alpha)
    except ValueError:
        return None
    return {"methods": labels, "average_ranks": [float(r) for r in result.average_ranks],
            "critical_difference": result.critical_difference, "n_datasets": result.n_datasets,
            "cliques": [[labels[i] for i in clique] for clique in result.cliques], "p_value": result.p_value}
