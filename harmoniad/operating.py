"""Image-level operating points: three rules for the threshold a decision is made with.

All through :mod:`harmoniad.thresholds` (one decision rule everywhere: an image is flagged
when ``score > threshold``):

- ``fitted``: the threshold the evaluation fitted on held-out *normal training* images and
  stored with the run. No test label is used, so it is what a line would deploy: the default.
- ``target_fpr``: the threshold at which at most the chosen fraction of normal images is
  flagged, set on the test set's normal images (so it uses test labels, and says so).
- ``oracle``: the F1-max threshold on the test labels, labelled as the oracle it is.

Per run and category a rule gives a :class:`Decision`: the threshold, where it came from and
whether it used test labels. A rule that cannot be applied (``fitted`` on a run that stored no
fitted threshold) falls back to the oracle, visibly. The dashboard and the HTML report share it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from harmoniad.metrics import MetricError
from harmoniad.thresholds import DEFAULT_TARGET_FPR, decide, fpr_threshold, operating_point, oracle_threshold

FITTED = "fitted"
TARGET_FPR = "target_fpr"
ORACLE = "oracle"
RULES: dict[str, str] = {
    FITTED: "fitted on normal images (default)",
    TARGET_FPR: "target false-positive rate",
    ORACLE: "oracle F1-max (uses test labels)",
}
#: Columns of a run's per-category metrics that may hold a threshold fitted on normal images.
FITTED_COLUMNS = ("threshold_fitted", "threshold", "fitted_threshold")


@dataclass(frozen=True)
class Decision:
    """One category's operating point under a rule."""

    threshold: float | None  # None: no threshold (only one class and nothing fitted)
    rule: str  # the rule actually applied (after a fallback)
    how: str  # one line: where the threshold comes from
    uses_test_labels: bool

    def flags(self, scores: object) -> np.ndarray:
        """True where an image is flagged anomalous."""
        if self.threshold is None:
            return np.zeros(np.asarray(scores).shape, dtype=bool)
        return decide(scores, self.threshold)


def fitted_value(metrics_row: Mapping[str, object] | pd.Series | None) -> float | None:
    """The stored threshold fitted on normal images in a per-category metrics row, if any."""
    if metrics_row is None:
        return None
    for column in FITTED_COLUMNS:
        value = metrics_row.get(column) if hasattr(metrics_row, "get") else None
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            return float(value)  # type: ignore[arg-type]
    return None


def decision(rule: str, rows: pd.DataFrame, *, fitted: float | None = None,
             target_fpr: float = DEFAULT_TARGET_FPR) -> Decision:
    """The operating point of ``rule`` for one category's per-image ``rows`` (``label``, ``score``)."""
    if rule not in RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; expected one of {list(RULES)}")
    labels = rows["label"].to_numpy()
    scores = rows["score"].to_numpy(dtype=np.float64)
    if rule == FITTED:
        if fitted is not None:
            return Decision(fitted, FITTED, "fitted on held-out normal training images (no test label used)", False)
        fallback = decision(ORACLE, rows)
        return Decision(fallback.threshold, ORACLE, "this run stored no threshold fitted on normal images, so the "
                        "oracle F1-max threshold is used instead (it uses test labels)", True)
    if rule == TARGET_FPR:
        normals = scores[labels == 0]
        if not len(normals):
            return Decision(None, TARGET_FPR, "no normal test image to set a false-positive rate on", True)
        value = fpr_threshold(normals, target_fpr)
        return Decision(value, TARGET_FPR, f"at most {target_fpr:.0%} of this category's normal test images "
                        "flagged (chosen on the test set's normal images: uses test labels)", True)
    try:
        value = oracle_threshold(labels, scores)
    except MetricError:
        return Decision(None, ORACLE, "only one class in this category: no F1-max threshold", True)
    return Decision(value, ORACLE, "the score that maximises image F1 on the test labels (an oracle: the most "
                    "favourable single threshold, not a deployable one)", True)


def outcome(label: int, flagged: bool) -> str:
    """``TP``, ``FP``, ``FN`` or ``TN`` of one image."""
    return ("TP" if flagged else "FN") if label == 1 else ("FP" if flagged else "TN")


def counts(rows: pd.DataFrame, dec: Decision) -> dict[str, float | int | None]:
    """Confusion counts, precision, recall and FPR of one category at ``dec``."""
    if dec.threshold is None:
        return {"threshold": None, "tp": 0, "fp": 0, "tn": int((rows["label"] == 0).sum()),
                "fn": int((rows["label"] == 1).sum()), "precision": None, "recall": None, "fpr": None}
    return operating_point(rows["label"].to_numpy(), rows["score"].to_numpy(dtype=np.float64), dec.threshold)
