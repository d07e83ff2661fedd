"""harmoniad.thresholds: normal-only thresholds keep their promised FPR on the normals they
were fitted on, the oracle reaches F1-max, and operating points count by hand."""

from __future__ import annotations

import numpy as np
import pytest

from harmoniad import metrics, thresholds
from harmoniad.thresholds import fit_thresholds, fpr_threshold, max_threshold, operating_point


@pytest.mark.parametrize("n,target,allowed", [(100, 0.01, 1), (50, 0.01, 0), (200, 0.1, 20),
                                              (7, 0.0, 0), (1000, 0.05, 50)])
def test_fpr_threshold_flags_at_most_the_target_share(n, target, allowed):
    scores = np.random.default_rng(n).normal(size=n)
    t = fpr_threshold(scores, target)
    assert np.count_nonzero(scores > t) == allowed  # distinct scores: exactly floor(target*n)
    assert t in scores


def test_fpr_threshold_with_ties_never_exceeds_the_target():
    scores = np.array([0.1] * 5 + [0.5] * 5 + [0.9] * 10)
    t = fpr_threshold(scores, 0.3)  # 6 may be exceeded; the top 10 tie, so none are
    assert t == 0.9 and np.count_nonzero(scores > t) == 0
    assert fpr_threshold(scores, 0.5) == 0.5 and np.count_nonzero(scores > 0.5) == 10


def test_max_threshold_and_fit_record_how():
    scores = [0.2, 0.9, 0.4]
    assert max_threshold(scores) == 0.9
    fitted = fit_thresholds(scores, 0.01)
    assert fitted["max"] == {"value": 0.9, "rule": "max", "n_normals": 3}
    assert fitted["fpr"] == {"value": 0.9, "rule": "quantile", "target_fpr": 0.01, "n_normals": 3}
    with pytest.raises(ValueError, match="at least one held-out normal"):
        fit_thresholds([])
    with pytest.raises(ValueError, match=r"NaN or inf at indices \[1\]"):
        max_threshold([0.1, float("nan")])
    with pytest.raises(ValueError, match="target_fpr"):
        fpr_threshold([0.1], 1.0)


def test_operating_point_counts():
    labels = [0, 0, 0, 1, 1, 1, 1]
    scores = [0.1, 0.6, 0.3, 0.7, 0.5, 0.2, 0.9]
    got = operating_point(labels, scores, 0.5)  # flagged: 0.6, 0.7, 0.9 (0.5 is not > 0.5)
    assert got == {"threshold": 0.5, "tp": 2, "fp": 1, "tn": 2, "fn": 2,
                   "precision": 2 / 3, "recall": 0.5, "fpr": 1 / 3}
    nothing = operating_point(labels, scores, 1.0)
    assert nothing["precision"] is None and nothing["recall"] == 0.0 and nothing["fp"] == 0
    assert operating_point([0, 0], [0.1, 0.2], 0.0)["recall"] is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_oracle_threshold_reaches_f1_max(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(80) < 0.4
    scores = np.round(rng.normal(size=80) + labels, 1)  # ties
    t = thresholds.oracle_threshold(labels, scores)
    point = operating_point(labels, scores, t)
    f1 = 2 * point["tp"] / (2 * point["tp"] + point["fp"] + point["fn"])
    assert f1 == pytest.approx(metrics.image_metrics(labels, scores)["f1_max"])
    assert thresholds.ORACLE_LABEL == "oracle (uses test labels)"
