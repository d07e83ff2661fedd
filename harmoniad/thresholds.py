"""Decision thresholds on image scores, and what they do on a labelled test set.

Why a module of its own: a line engineer needs a threshold fixed before the test set is
seen. :func:`fit_thresholds` uses normal images only (a held-out slice of the training
normals); :func:`oracle_threshold` picks the F1-max threshold on the test labels and exists
only for comparison, labelled :data:`ORACLE_LABEL` wherever it is shown.

One rule everywhere: an image is flagged anomalous when ``score > threshold``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from harmoniad.metrics import _image_inputs, image_curves
from harmoniad.runtime.atomic import atomic_write_text

__all__ = ["ORACLE_LABEL", "DEFAULT_TARGET_FPR", "THRESHOLDS_FILE", "fpr_threshold", "max_threshold",
           "fit_thresholds", "oracle_threshold", "operating_point", "decide",
           "save_checkpoint_thresholds", "load_checkpoint_thresholds"]

ORACLE_LABEL = "oracle (uses test labels)"
DEFAULT_TARGET_FPR = 0.01
#: Beside a checkpoint's config.json: thresholds fitted for it, per category (a file of its own,
#: so the checkpoint format itself is untouched).
THRESHOLDS_FILE = "thresholds.json"
THRESHOLDS_FORMAT = "harmoniad-thresholds"


def _normal_scores(scores: object) -> np.ndarray:
    arr = np.asarray(scores, dtype=np.float64).ravel()
    if arr.size == 0:
        raise ValueError("need at least one held-out normal score to fit a threshold")
    if not np.isfinite(arr).all():
        raise ValueError(f"normal scores contain NaN or inf at indices "
                         f"{np.flatnonzero(~np.isfinite(arr))[:5].tolist()}")
    return arr


def fpr_threshold(normal_scores: object, target_fpr: float = DEFAULT_TARGET_FPR) -> float:
    """The lowest held-out normal score that at most ``floor(target_fpr * n)`` of the n
    held-out normals exceed: their empirical FPR is at most ``target_fpr`` (with fewer than
    1 / target_fpr normals this is their maximum)."""
    if not 0.0 <= target_fpr < 1.0:
        raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr}")
    arr = np.sort(_normal_scores(normal_scores))
    allowed = math.floor(target_fpr * len(arr) + 1e-9)
    return float(arr[len(arr) - 1 - allowed])


def max_threshold(normal_scores: object) -> float:
    """The largest held-out normal score: no held-out normal image is flagged."""
    return float(np.max(_normal_scores(normal_scores)))


def fit_thresholds(normal_scores: object, target_fpr: float = DEFAULT_TARGET_FPR
                   ) -> dict[str, dict[str, float | int | str]]:
    """Both normal-only thresholds, each with how it was fitted (stored with runs and
    checkpoints): ``{"fpr": {...}, "max": {...}}``."""
    arr = _normal_scores(normal_scores)
    return {
        "fpr": {"value": fpr_threshold(arr, target_fpr), "rule": "quantile",
                "target_fpr": float(target_fpr), "n_normals": int(arr.size)},
        "max": {"value": max_threshold(arr), "rule": "max", "n_normals": int(arr.size)},
    }


def oracle_threshold(labels: object, scores: object) -> float:
    """The F1-max threshold on the test labels (an oracle: never for deployment).

    Flagging ``score >= s*`` at the F1-max score s* is flagging ``score > t`` for t the
    midpoint between s* and the next lower distinct score (or just below s* if none).
    """
    labels_arr, scores_arr = _image_inputs(labels, scores)
    curves = image_curves(labels_arr, scores_arr)
    best = int(np.argmax(curves["f1"][1:])) + 1  # skip the "nothing flagged" point
    chosen = float(curves["thresholds"][best])
    lower = scores_arr[scores_arr < chosen]
    if lower.size == 0:
        return float(np.nextafter(chosen, -np.inf))
    return float((chosen + lower.max()) / 2)


def decide(scores: object, threshold: float) -> np.ndarray:
    """True where an image is flagged anomalous (``score > threshold``)."""
    return np.asarray(scores, dtype=np.float64) > threshold


def operating_point(labels: object, scores: object, threshold: float
                    ) -> dict[str, float | int | None]:
    """Confusion matrix, precision, recall and FPR of ``score > threshold`` on a labelled
    set; a rate whose denominator is 0 is None (undefined, not 0)."""
    labels_arr = np.asarray(labels).astype(bool)
    flagged = decide(scores, threshold)
    if flagged.shape != labels_arr.shape:
        raise ValueError(f"labels and scores differ in shape: {labels_arr.shape} vs {flagged.shape}")
    tp = int(np.count_nonzero(flagged & labels_arr))
    fp = int(np.count_nonzero(flagged & ~labels_arr))
    fn = int(np.count_nonzero(~flagged & labels_arr))
    tn = int(np.count_nonzero(~flagged & ~labels_arr))

    def rate(num: int, den: int) -> float | None:
        return num / den if den else None

    return {"threshold": float(threshold), "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "precision": rate(tp, tp + fp), "recall": rate(tp, tp + fn), "fpr": rate(fp, fp + tn)}


def save_checkpoint_thresholds(directory: Path, thresholds: Mapping[str, Mapping[str, Any]],
                               score: Mapping[str, Any]) -> Path:
    """Merge per-category fitted thresholds (``{category: {"fpr": {...}, "max": {...}}}``)
    into ``directory/thresholds.json`` with the scoring settings they hold for; atomic."""
    path = Path(directory) / THRESHOLDS_FILE
    try:
        old = load_checkpoint_thresholds(directory)
    except ValueError:
        old = None
    categories = dict(old["categories"]) if old and old.get("score") == dict(score) else {}
    categories.update({c: dict(t) for c, t in thresholds.items() if t})
    record = {"format": THRESHOLDS_FORMAT, "score": dict(score), "categories": categories}
    atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def load_checkpoint_thresholds(directory: Path) -> dict[str, Any] | None:
    """The thresholds stored beside a checkpoint, or None when it has none."""
    path = Path(directory) / THRESHOLDS_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable thresholds file ({exc}); delete it or re-run evaluate") from exc
    if not isinstance(record, dict) or record.get("format") != THRESHOLDS_FORMAT \
            or not isinstance(record.get("categories"), dict):
        raise ValueError(f"{path}: not a HarmoniAD thresholds file (expected format {THRESHOLDS_FORMAT!r})")
    return record
