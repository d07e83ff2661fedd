"""Operating-point rules: fitted on held-out normals, target FPR on test normals, oracle; fallbacks said."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from harmoniad.operating import FITTED, ORACLE, TARGET_FPR, Fitted, counts, decision, fitted_thresholds, outcome

ROWS = pd.DataFrame({"label": [0, 0, 0, 0, 1, 1, 1], "score": [0.1, 0.2, 0.3, 0.9, 0.25, 0.8, 0.95]})


def test_fitted_uses_the_stored_threshold_and_no_test_label() -> None:
    dec = decision(FITTED, ROWS, fitted=Fitted(0.5, 40, 0.01))
    assert dec.threshold == 0.5 and dec.rule == FITTED and not dec.uses_test_labels
    assert "40 held-out normal training images" in dec.how and "1%" in dec.how
    c = counts(ROWS, dec)
    assert (c["tp"], c["fp"], c["fn"], c["tn"]) == (2, 1, 1, 3)


def test_fitted_falls_back_to_the_oracle_visibly() -> None:
    dec = decision(FITTED, ROWS, fitted=None)
    assert dec.rule == ORACLE and dec.uses_test_labels and "oracle" in dec.how
    assert dec.threshold == decision(ORACLE, ROWS).threshold


def test_oracle_is_the_f1_max_and_uses_test_labels() -> None:
    dec = decision(ORACLE, ROWS)
    f1 = []
    for t in np.unique(ROWS["score"]):
        c = counts(ROWS, decision(FITTED, ROWS, fitted=Fitted(float(t) - 1e-9, None, None)))
        f1.append(2 * c["tp"] / (2 * c["tp"] + c["fp"] + c["fn"]))
    c = counts(ROWS, dec)
    assert 2 * c["tp"] / (2 * c["tp"] + c["fp"] + c["fn"]) == pytest.approx(max(f1))
    assert dec.uses_test_labels and "oracle" in dec.how


@pytest.mark.parametrize("target,flagged_normals", [(0.0, 0), (0.25, 1), (0.5, 2)])
def test_target_fpr_flags_at_most_that_share_of_normal_test_images(target: float, flagged_normals: int) -> None:
    dec = decision(TARGET_FPR, ROWS, target_fpr=target)
    assert counts(ROWS, dec)["fp"] == flagged_normals
    assert dec.uses_test_labels and "uses test labels" in dec.how


def test_one_class_category_has_no_oracle_and_flags_nothing() -> None:
    rows = ROWS[ROWS["label"] == 0]
    dec = decision(ORACLE, rows)
    assert dec.threshold is None and not dec.flags(rows["score"]).any()
    with pytest.raises(ValueError, match="unknown threshold rule"):
        decision("f1", ROWS)


def test_fitted_thresholds_read_the_stored_fpr_rule_only() -> None:
    stored = pd.DataFrame({"category": ["a", "a", "b", "c"], "rule": ["fpr", "oracle", "max", "fpr"],
                           "value": [0.4, 0.6, 0.7, np.nan], "target_fpr": [0.01, None, None, 0.01],
                           "n_normals": [20, None, 20, 20]})
    fitted = fitted_thresholds(stored)
    assert list(fitted) == ["a"] and fitted["a"] == Fitted(0.4, 20, 0.01)


def test_outcome_names() -> None:
    assert [outcome(1, True), outcome(1, False), outcome(0, True), outcome(0, False)] == ["TP", "FN", "FP", "TN"]
