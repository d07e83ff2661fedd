"""Image-level operating points: three rules for the threshold a decision is made with.

All through :mod:`harmoniad.thresholds` (one decision rule everywhere: an image is flagged
when ``score > threshold``):

- ``fitted``: the threshold the evaluation fitted on held-out *normal training* images at its
  target false-positive rate and stored with the run (``ResultStore.load_thresholds``, rule
  ``fpr``). No test label is used, so it is what a line would deploy: the default.
- ``target_fpr``: the threshold at which at most the chosen fraction of normal images is
  flagged, set on the test set's normal images (so it uses test labels, and says so).
- ``oracle``: the F1-max threshold on the test labels, labelled as the oracle it is.

Per run and category a rule gives a :class:`Decision`: the threshold, where it came from and
whether it used test labels. A rule that cannot be applied (``fitted`` on a run that stored no
fitted threshold) falls back to the oracle, visibly. The dashboard and the HTML report share it.
"""

from __future__ import annotations

import math
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
    TARGET_FPR: "target false-positive rate on test normals (uses test labels)",
    ORACLE: "oracle F1-max (uses test labels)",
}
#: The stored rule (``ResultStore.load_thresholds``) that ``fitted`` uses.
STORED_FITTED_RULE = "fpr"


@dataclass(frozen=True)
class Fitted:
    """A threshold fitted on held-out normal training images, as the run stored it."""

    value: float
    n_normals: int | None
    target_fpr: float | None

    def describe(self) -> str:
        n = "" if not self.n_normals else f"{self.n_normals} " if self.n_normals > 1 else "1 "
        images = "image" if self.n_normals == 1 else "images"
        fpr = f" at a target false-positive rate of {self.target_fpr:.0%}" if self.target_fpr is not None else ""
        return f"fitted on {n}held-out normal training {images}{fpr} (no test label used)"


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


def fitted_thresholds(stored: pd.DataFrame) -> dict[str, Fitted]:
    """``category -> Fitted`` from ``ResultStore.load_thresholds`` (empty for runs stored
    without held-out normals, e.g. methods or runs from before thresholds were fitted)."""
    out = {}
    for _, row in stored[stored["rule"] == STORED_FITTED_RULE].iterrows():
        if row["value"] is None or (isinstance(row["value"], float) and math.isnan(row["value"])):
            continue
        n = row.get("n_normals")
        target = row.get("target_fpr")
        out[str(row["category"])] = Fitted(float(row["value"]), None if pd.isna(n) else int(n),
                                           None if target is None or pd.isna(target) else float(target))
    return out


def decision(rule: str, rows: pd.DataFrame, *, fitted: Fitted | None = None,
             target_fpr: float = DEFAULT_TARGET_FPR) -> Decision:
    """The operating point of ``rule`` for one category's per-image ``rows`` (``label``, ``score``)."""
    if rule not in RULES:
        raise ValueError(f"unknown threshold rule {rule!r}; expected one of {list(RULES)}")
    labels = rows["label"].to_numpy()
    scores = rows["score"].to_numpy(dtype=np.float64)
    if rule == FITTED:
        if fitted is not None:
            return Decision(fitted.value, FITTED, fitted.describe(), False)
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
