"""Tests of harmoniad.charts: numbers against scikit-learn or hand counts, figures by their data."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score, precision_recall_curve, roc_auc_score, roc_curve

from harmoniad import charts
from harmoniad.store import METRIC_COLUMNS


def _metrics(values: dict[str, float], status: dict[str, str] | None = None) -> pd.DataFrame:
    """A load_metrics-like frame: image_auroc = the given value, other metrics = value / 2."""
    rows = []
    for category, v in values.items():
        row = {"category": category, "status": (status or {}).get(category, "ok")}
        row.update({m: (v if m == "image_auroc" else v / 2) for m in METRIC_COLUMNS})
        if row["status"] == "failed":
            row.update({m: np.nan for m in METRIC_COLUMNS})
        rows.append(row)
    return pd.DataFrame(rows)


def _runs(rows: list[tuple[str, str, str, str, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["id", "method", "dataset", "status", "created"])


# ----------------------------------------------------------------------------- run choice


def test_latest_runs_picks_newest_complete_run_per_method_in_registry_order() -> None:
    runs = _runs([
        ("p2", "patchcore", "mvtec", "complete", "2026-01-03"),
        ("h3", "harmoniad", "mvtec", "failed", "2026-01-04"),
        ("h2", "harmoniad", "mvtec", "complete", "2026-01-02"),
        ("p1", "patchcore", "mvtec", "complete", "2026-01-01"),
        ("h1", "harmoniad", "mvtec", "complete", "2026-01-01"),
        ("hv", "harmoniad", "visa", "complete", "2026-01-05"),
        ("lo", "harmoniad_low", "mvtec", "complete", "2026-01-01"),
    ])
    assert charts.latest_runs(runs, "mvtec") == ["h2", "lo", "p2"]
    assert charts.latest_runs(runs, "mvtec", methods=["patchcore"]) == ["p2"]
    assert charts.latest_runs(runs, "visa") == ["hv"]
    assert charts.latest_runs(runs.iloc[0:0], "mvtec") == []


def test_series_labels_use_registry_labels_and_disambiguate_repeats() -> None:
    runs = _runs([
        ("a", "harmoniad", "d", "complete", "2026-01-01T10:00:00"),
        ("b", "harmoniad", "d", "complete", "2026-01-02T11:30:00"),
        ("c", "patchcore", "d", "complete", "2026-01-01T09:00:00"),
        ("x", "my_method", "d", "complete", "2026-01-01T09:00:00"),
    ])
    labels = charts.series_labels(runs)
    assert labels["c"] == "PatchCore"
    assert labels["x"] == "my_method"
    assert labels["a"] == "HarmoniAD (2026-01-01 10:00)"
    assert labels["b"] == "HarmoniAD (2026-01-02 11:30)"


# ----------------------------------------------------------------------------- metrics


def test_comparison_table_is_percent_with_a_mean_over_ok_categories() -> None:
    table = charts.comparison_table(
        {"r1": _metrics({"a": 0.9, "b": 0.7, "c": 0.5}, {"c": "failed"})}, {"r1": "HarmoniAD"}
    )
    assert list(table["category"]) == ["a", "b", "c", charts.MEAN_LABEL]
    assert table["series"].unique().tolist() == ["HarmoniAD"]
    assert table.loc[0, "image_auroc"] == pytest.approx(90.0)
    assert math.isnan(table.loc[2, "image_auroc"])
    assert table.loc[3, "image_auroc"] == pytest.approx(80.0)  # the failed category is left out
    assert table.loc[3, "pixel_ap"] == pytest.approx(40.0)


def test_category_bars_have_one_trace_per_series_and_a_mean_group() -> None:
    table = charts.comparison_table(
        {"r1": _metrics({"a": 0.9, "b": 0.7}), "r2": _metrics({"a": 0.6, "b": 0.8})},
        {"r1": "HarmoniAD", "r2": "PatchCore"},
    )
    fig = charts.category_bars(table, "image_auroc")
    assert [t.name for t in fig.data] == ["HarmoniAD", "PatchCore"]
    assert list(fig.data[0].x) == ["a", "b", "mean"]
    np.testing.assert_allclose(fig.data[1].y, [60.0, 80.0, 70.0])
    with pytest.raises(ValueError, match="unknown metric"):
        charts.category_bars(table, "accuracy")


def test_difference_is_positive_where_harmoniad_is_better() -> None:
    table = charts.comparison_table(
        {"h": _metrics({"a": 0.9, "b": 0.6, "c": 0.8}), "p": _metrics({"a": 0.7, "b": 0.8})},
        {"h": "HarmoniAD", "p": "PatchCore"},
    )
    diff = charts.difference_table(table, "image_auroc", "h", "p")
    assert list(diff["category"]) == ["a", "b", "c", "mean"]
    np.testing.assert_allclose(diff["difference"].iloc[:2], [20.0, -20.0])
    assert math.isnan(diff["difference"].iloc[2])  # c is missing from the baseline
    assert diff["difference"].iloc[3] == pytest.approx(0.0)  # mean over shared categories a, b
    fig = charts.difference_bars(diff, "image_auroc", "HarmoniAD", "PatchCore")
    colours = list(fig.data[0].marker.color)
    assert colours[0] == charts.POSITIVE_COLOUR and colours[1] == charts.NEGATIVE_COLOUR
    assert "HarmoniAD minus PatchCore" in fig.layout.title.text
    # swapping the runs flips every sign
    swapped = charts.difference_table(table, "image_auroc", "p", "h")
    np.testing.assert_allclose(swapped["difference"].iloc[:2], [-20.0, 20.0])


def test_mean_differences_cover_every_metric_and_baseline() -> None:
    table = charts.comparison_table(
        {"h": _metrics({"a": 0.9, "b": 0.6}), "p": _metrics({"a": 0.7, "b": 0.8}), "w": _metrics({"a": 0.5, "b": 0.5})},
        {"h": "HarmoniAD", "p": "PatchCore", "w": "WinCLIP"},
    )
    means = charts.mean_differences(table, "h", {"p": "PatchCore", "w": "WinCLIP"})
    assert list(means.index) == ["PatchCore", "WinCLIP"]
    assert means.loc["PatchCore", "Image AUROC"] == pytest.approx(0.0)
    assert means.loc["WinCLIP", "Image AUROC"] == pytest.approx(25.0)
    assert means.loc["WinCLIP", "Pixel AP"] == pytest.approx(12.5)


# ----------------------------------------------------------------------------- curves


def _scores(seed: int = 0, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = (rng.random(n) < 0.4).astype(int)
    labels[:2] = [0, 1]
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounding makes ties
    return labels, scores


def test_curves_match_sklearn() -> None:
    labels, scores = _scores()
    rows = pd.DataFrame({"label": labels, "score": scores})
    roc, pr, skipped = charts.curve_figures({"HarmoniAD": rows})
    assert skipped == {}
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(roc.data[0].x, fpr)
    np.testing.assert_allclose(roc.data[0].y, tpr)
    assert f"({roc_auc_score(labels, scores) * 100:.1f})" in roc.data[0].name
    precision, recall, _ = precision_recall_curve(labels, scores, drop_intermediate=False)
    # sklearn lists thresholds ascending and ends with (recall 0, precision 1): compare as point sets
    ours = set(zip(np.round(pr.data[0].x, 9), np.round(pr.data[0].y, 9)))
    theirs = set(zip(np.round(recall, 9), np.round(precision, 9)))
    assert ours == theirs


def test_curves_skip_a_category_with_one_class() -> None:
    rows = pd.DataFrame({"label": [0, 0, 0], "score": [0.1, 0.2, 0.3]})
    roc, pr, skipped = charts.curve_figures({"PatchCore": rows})
    assert list(skipped) == ["PatchCore"]
    assert [t.name for t in roc.data] == ["chance"]
    assert len(pr.data) == 0


def test_f1_max_threshold_is_the_best_f1_threshold() -> None:
    labels, scores = _scores(seed=3)
    t = charts.f1_max_threshold(labels, scores)
    best = max(f1_score(labels, scores >= c) for c in np.unique(scores))
    assert f1_score(labels, scores >= t) == pytest.approx(best)
    assert charts.f1_max_threshold([0, 0], [0.1, 0.2]) is None


def test_f1_max_threshold_prefers_fewer_flags_on_ties() -> None:
    # flagging {0.9} or all four both give F1 = 2/3: the higher threshold wins
    labels = np.array([1, 0, 0, 1])
    scores = np.array([0.9, 0.8, 0.7, 0.6])
    assert f1_score(labels, scores >= 0.9) == pytest.approx(f1_score(labels, scores >= 0.6))
    assert charts.f1_max_threshold(labels, scores) == pytest.approx(0.9)


# ----------------------------------------------------------------------------- one image


def test_score_histogram_splits_normal_and_defective_and_marks_the_image() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    fig = charts.score_histogram(scores, labels, marked=0.8, threshold=0.5)
    normal, defective = fig.data
    np.testing.assert_allclose(normal.x, [0.1, 0.2, 0.3])
    np.testing.assert_allclose(defective.x, [0.8, 0.9])
    assert normal.name == "normal (3)" and defective.name == "defective (2)"
    lines = {round(s.x0, 6) for s in fig.layout.shapes}
    assert lines == {0.8, 0.5}


def test_confusion_counts_on_a_hand_made_mask() -> None:
    mask = np.zeros((4, 5), dtype=bool)
    mask[1:3, 1:4] = True  # 6 defect pixels
    predicted = np.zeros((4, 5), dtype=bool)
    predicted[2, 2:5] = True  # (2,2), (2,3) hit; (2,4) false alarm
    predicted[0, 0] = True  # false alarm
    counts = charts.confusion_counts(mask, predicted)
    assert (counts["tp"], counts["fp"], counts["fn"], counts["tn"]) == (2, 2, 4, 12)
    assert counts["iou"] == pytest.approx(2 / 8)
    assert counts["precision"] == pytest.approx(0.5)
    assert counts["recall"] == pytest.approx(2 / 6)
    empty = charts.confusion_counts(np.zeros((2, 2), bool), np.zeros((2, 2), bool))
    assert empty["tn"] == 4 and math.isnan(empty["iou"])
    with pytest.raises(ValueError, match="differs"):
        charts.confusion_counts(mask, predicted[:3])


def test_draw_outline_paints_only_the_border_of_the_region() -> None:
    image = np.zeros((12, 12, 3), dtype=np.uint8)
    mask = np.zeros((12, 12), dtype=bool)
    mask[2:10, 2:10] = True
    out = charts.draw_outline(image, mask, colour=(0, 255, 0))
    painted = (out == [0, 255, 0]).all(axis=2)
    assert painted[2, 2:10].all() and painted[2:10, 2].all() and painted[9, 5]
    assert not painted[~mask].any()  # never outside the region
    assert not painted[5, 5]  # interior untouched
    assert image.sum() == 0  # input not modified
    with pytest.raises(ValueError, match="differs"):
        charts.draw_outline(image, mask[:5])


def test_paint_mask_blends_only_masked_pixels() -> None:
    image = np.full((2, 2, 3), 100, dtype=np.uint8)
    mask = np.array([[True, False], [False, False]])
    out = charts.paint_mask(image, mask, colour=(200, 0, 0), alpha=0.5)
    assert out[0, 0].tolist() == [150, 50, 50]
    assert out[1, 1].tolist() == [100, 100, 100]


def test_map_range_and_resizing() -> None:
    a = np.array([[0.0, np.nan], [2.0, 1.0]], dtype=np.float32)
    assert charts.map_range([a, np.array([[5.0]])]) == (0.0, 5.0)
    assert charts.map_range([np.full((2, 2), np.nan)]) == (0.0, 1.0)
    assert charts.map_range([np.ones((2, 2))]) == (1.0, 2.0)
    assert charts.fit_map(np.ones((8, 8)), 16).shape == (16, 16)
    assert charts.fit_image(np.zeros((10, 20, 3), np.uint8), 8).shape == (8, 8, 3)


# ----------------------------------------------------------------------------- failure cases


def test_misclassified_lists_only_errors_at_the_threshold_most_wrong_first() -> None:
    images = pd.DataFrame({
        "index": np.arange(9),
        "label": [0, 0, 0, 0, 1, 1, 1, 1, 1],
        "score": [0.1, 0.7, 0.6, 0.9, 0.9, 0.3, 0.6, 0.5, 0.55],
    })
    fps, fns = charts.misclassified(images, threshold=0.55)
    assert list(fps["index"]) == [3, 1, 2]  # normal and score > 0.55, farthest above first
    assert list(fps["rank"]) == [1, 2, 3]
    np.testing.assert_allclose(fps["margin"], [0.35, 0.15, 0.05])
    assert list(fns["index"]) == [5, 7, 8]  # defective and score <= 0.55 (0.55 itself is not flagged)
    fps, fns = charts.misclassified(images, threshold=1.0)
    assert fps.empty and len(fns) == 5


# ----------------------------------------------------------------------------- maps, defects, statistics


def test_map_figure_colours_the_given_range_and_outlines_the_ground_truth() -> None:
    values = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    mask = np.zeros((64, 64), bool)
    mask[10:20, 10:20] = True
    base = np.zeros((64, 64, 3), np.uint8)
    fig = charts.map_figure(values, base=base, lo=0.2, hi=0.7, opacity=0.4, mask=mask, title="m")
    kinds = [t.type for t in fig.data]
    assert kinds == ["image", "heatmap", "contour"]
    heat = fig.data[1]
    assert (heat.zmin, heat.zmax, heat.opacity) == (0.2, 0.7, 0.4) and heat.colorbar.orientation == "h"
    assert fig.data[2].contours.start == fig.data[2].contours.end == 0.5
    no_defect = charts.map_figure(values, base=None, lo=0.0, hi=1.0, opacity=0.4, mask=np.zeros_like(mask), title="m")
    assert [t.type for t in no_defect.data] == ["heatmap"] and no_defect.data[0].opacity == 1.0


def test_pixel_curves_figure_marks_the_aupro_limit() -> None:
    rng = np.random.default_rng(0)
    masks = np.zeros((3, 16, 16), bool)
    masks[1, 4:8, 4:8] = True
    maps = rng.random((3, 16, 16)).astype(np.float32) + masks
    roc, pro, skipped = charts.pixel_curve_figures({"A": (masks, maps), "B": (np.zeros_like(masks), maps)})
    assert list(skipped) == ["B"]
    assert [t.name.split(" (")[0] for t in roc.data] == ["A", "chance"]
    assert max(pro.data[0].x) <= charts.FPR_LIMIT * 1.15
    assert any(s.x0 == s.x1 == charts.FPR_LIMIT for s in pro.layout.shapes)


def test_defect_table_uses_stored_metrics_and_counts_detections_at_the_threshold() -> None:
    defects = pd.DataFrame({"category": ["c", "c"], "defect": ["crack", "dent"], "n": [2, 1], "n_masked": [2, 1],
                            "image_auroc": [0.75, 1.0], "pixel_auroc": [0.9, np.nan], "aupro": [0.5, 0.4]})
    images = pd.DataFrame({"category": "c", "defect": ["good", "good", "crack", "crack", "dent"],
                           "label": [0, 0, 1, 1, 1], "score": [0.1, 0.5, 0.4, 0.9, 0.6]})
    table = charts.defect_table({"A": (defects, images)}, {("A", "c"): 0.45})
    assert list(table["defect"]) == ["crack", "dent"]
    assert list(table["image AUROC (%)"]) == [75.0, 100.0] and np.isnan(table["pixel AUROC (%)"].iloc[1])
    assert list(table["detected"]) == [1, 1] and list(table["detected (%)"]) == [50.0, 100.0]
    assert charts.defect_table({"A": (defects, images)})["detected"].isna().all()  # no threshold: not counted
    fig = charts.defect_bars(table)
    assert fig.data[0].orientation == "h" and list(fig.data[0].y) == ["c / crack (2)", "c / dent (1)"]


def test_significance_stars_follow_the_p_values() -> None:
    tests = pd.DataFrame({"category": ["a", "b"], "n_images": [10, 10], "image_auroc_diff": [0.2, -0.05],
                          "delong_p": [0.01, 0.4]})
    fig = charts.significance_bars(tests, "A", "B")
    assert list(fig.data[0].text) == ["★ +20.0", "-5.0"]


def test_cd_diagram_from_the_stores_friedman_result() -> None:
    result = {"methods": ["harmoniad (r1)", "patchcore (r2)", "freqfilter (r3)"], "p_value": 0.02,
              "average_ranks": {"harmoniad (r1)": 1.0, "patchcore (r2)": 3.0, "freqfilter (r3)": 2.0},
              "critical_difference": 1.66, "n_categories": 4, "cliques": [["freqfilter (r3)", "patchcore (r2)"]]}
    ranks = charts.relabel_ranks(result, ["A", "B", "C"])
    assert ranks["average_ranks"] == [1.0, 3.0, 2.0] and ranks["cliques"] == [["C", "B"]] and ranks["n_datasets"] == 4
    fig = charts.cd_diagram(ranks)
    texts = [a.text for a in fig.layout.annotations]
    assert "A (1.00)" in texts and "CD = 1.66" in texts
    bars = [t for t in fig.data if t.line.width == 5]  # the clique bar spans C..B
    assert len(bars) == 1 and list(bars[0].x) == [2.0, 3.0]


def test_every_chart_puts_its_legend_below_the_plot() -> None:
    table = charts.comparison_table({"r1": pd.DataFrame({"category": ["a"], "status": ["ok"],
                                                         **{m: [0.5] for m in charts.METRIC_COLUMNS}})}, {"r1": "A"})
    fig = charts.category_bars(table, "image_auroc")
    assert fig.layout.legend.yref == "container" and fig.layout.legend.y == 0 and fig.layout.title.x == 0


def test_percentiles_put_every_method_on_one_scale() -> None:
    rng = np.random.default_rng(0)
    small, large = rng.random((4, 8, 8)), rng.random((4, 8, 8)) * 1000 + 50  # different units, same ranks
    q_small, q_large = charts.score_quantiles(list(small)), charts.score_quantiles(list(large))
    # A map of each method with the same ranks gets the same percentiles, whatever its units.
    np.testing.assert_allclose(charts.to_percentiles(small[0], q_small),
                               charts.to_percentiles(small[0] * 1000 + 50, charts.score_quantiles(list(small * 1000 + 50))),
                               atol=1e-3)
    assert q_large[0] >= 50
    p = charts.to_percentiles(np.array([-1.0, np.median(small), 2.0]), q_small)
    assert p[0] == 0.0 and p[2] == 100.0 and abs(p[1] - 50.0) < 1.0
    constant = charts.score_quantiles([np.ones((4, 4))])
    assert list(charts.to_percentiles(np.array([0.5, 1.0]), constant)) == [0.0, 100.0]


def test_series_labels_are_unique_even_for_runs_started_in_the_same_minute() -> None:
    import pandas as pd

    from harmoniad.charts import series_labels

    runs = pd.DataFrame({"id": ["aaaaaaaa1", "bbbbbbbb2", "cccccccc3"], "method": ["patchcore"] * 2 + ["winclip"],
                         "created": ["2026-12-02T10:00:05", "2026-12-02T10:00:40", "2026-12-02T09:00:00"]})
    labels = series_labels(runs)
    assert len(set(labels.values())) == 3
    assert "[" not in labels["cccccccc3"]  # a label that is unique already stays as it was
