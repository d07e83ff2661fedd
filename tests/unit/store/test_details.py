"""Store: per-category details (defects, intervals, thresholds) round-trip into tables and
``runs show --json``; all-failed runs are failed; two stored runs compare with DeLong and a
paired bootstrap that equal harmoniad.stats on the same data."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from harmoniad import stats
from harmoniad.analysis import category_report, category_seed, mean_intervals
from harmoniad.store import ResultStore
from tests.unit.store.test_store import R, fake_category, new_run


def add_with_report(store: ResultStore, run_id: str, category: str, seed: int, shift: float = 0.0,
                    **kw) -> dict:
    args = fake_category(category, n=12, seed=seed)
    images = args["images"]
    images["score"] = images["score"] + shift * images["label"]
    labels = images["label"].to_numpy()
    report = category_report(labels, images["score"].to_numpy(), list(images["defect"]), labels == 1,
                             args["masks"], args["maps"]["anomaly"], normal_scores=[0.1, 0.5, 0.9],
                             n_resamples=200, seed=category_seed(0, category), **kw)
    store.add_category(run_id, category, metrics=report.metrics, images=images, maps=args["maps"],
                       masks=args["masks"], details=report.details)
    return {"report": report, **args}


def test_details_round_trip_into_tables_and_json(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    run = new_run(store, categories=("a", "b", "c"))
    a = add_with_report(store, run, "a", 0, shift=0.5)
    b = add_with_report(store, run, "b", 1)
    store.fail_category(run, "c", "ValueError('bad masks')\nTraceback (most recent call last): ...",
                        skipped=[("/data/c/x.png", "/data/c/x.png: not a readable image")])
    store.set_run_details(run, {"mean_intervals": mean_intervals({"a": a["report"], "b": b["report"]}),
                                "n_resamples": 200})
    store.finish_run(run)
    assert store.get_run(run).status == "complete"

    defects = store.load_defects(run)
    assert list(defects["category"]) == ["a", "b"] and (defects["defect"] == "crack").all()
    assert defects.loc[0, "image_auroc"] == pytest.approx(a["report"].details["defects"][0]["image_auroc"])
    intervals = store.load_intervals(run)
    assert set(intervals["category"]) == {"a", "b", "mean"}
    row = intervals[(intervals["category"] == "a") & (intervals["metric"] == "image_auroc")].iloc[0]
    assert [row["low"], row["high"]] == a["report"].details["intervals"]["image_auroc"]
    thresholds = store.load_thresholds(run)
    assert set(thresholds["rule"]) == {"fpr", "max", "oracle"}
    assert "oracle (uses test labels)" in set(thresholds["label"])
    assert (thresholds["tp"] + thresholds["fn"] == 6).all()

    view = store.run_json(run)
    json.dumps(view)  # JSON-safe
    assert view["status"] == "complete" and view["dataset"] == "synthetic"
    assert view["skipped"] == [{"path": "/data/c/x.png", "reason": "/data/c/x.png: not a readable image",
                                "split": "test", "category": "c"}]
    by_cat = {r["category"]: r for r in view["results"]}
    assert by_cat["c"]["status"] == "failed" and by_cat["c"]["reason"] == "ValueError('bad masks')"
    assert by_cat["c"]["metrics"]["image_auroc"] is None and by_cat["c"]["defects"] == []
    m = by_cat["a"]["metrics"]
    assert set(m) >= {"image_auroc", "image_auroc_ci", "pixel_auroc", "aupro"}
    assert m["image_auroc_ci"] == a["report"].details["intervals"]["image_auroc"]
    assert by_cat["a"]["defects"][0]["n"] == 6 and by_cat["a"]["status"] == "ok"
    assert view["mean"]["image_auroc_ci"] == intervals[(intervals["category"] == "mean")
                                                       & (intervals["metric"] == "image_auroc")][["low", "high"]].values[0].tolist()


def test_a_run_whose_every_category_failed_is_failed(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    run = new_run(store)
    store.fail_category(run, "a", "RuntimeError('x')\ntrace")
    store.fail_category(run, "b", "RuntimeError('y')")
    store.finish_run(run)
    info = store.get_run(run)
    assert info.status == "failed" and info.error == "every category failed; a: RuntimeError('x')"


def test_replacing_or_failing_a_category_replaces_its_details(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    run = new_run(store)
    add_with_report(store, run, "a", 0)
    assert set(store.load_details(run)) == {"a"}
    store.fail_category(run, "a", "later failure")
    assert store.load_details(run) == {} and store.load_defects(run).empty


def test_a_version_2_index_gets_the_detail_tables(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    run = new_run(store)
    with sqlite3.connect(store.db_path) as con:
        con.execute("DROP TABLE category_details")
        con.execute("DROP TABLE run_details")
        con.execute("PRAGMA user_version = 2")
    store = ResultStore(tmp_path)
    add_with_report(store, run, "a", 0)
    assert store.load_run_details(run) == {} and set(store.load_details(run)) == {"a"}


def test_paired_test_of_two_stored_runs_equals_harmoniad_stats(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    run_a, run_b = new_run(store, categories=("a",)), new_run(store, categories=("a",), method="n")
    a = add_with_report(store, run_a, "a", 0, shift=0.8)
    b = add_with_report(store, run_b, "a", 0)
    got = store.paired_test(run_a, run_b, pixel=True, n_resamples=100, seed=3).set_index("category")
    labels = a["images"]["label"].to_numpy()
    want = stats.delong_test(labels, a["images"]["score"].to_numpy(), b["images"]["score"].to_numpy())
    assert got.loc["a", "delong_p"] == pytest.approx(want.p_value)
    assert got.loc["a", "image_auroc_diff"] == pytest.approx(want.difference) and want.difference > 0
    # the same maps in both runs: every paired pixel difference is 0
    assert got.loc["a", "pixel_auroc_diff"] == 0 and got.loc["a", "aupro_p"] == 1.0


def test_seed_summary_and_friedman_over_stored_runs(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    seeds = []
    for seed in (0, 1, 2):
        run = new_run(store, categories=("a", "b"), request={"dataset": "synthetic", "seed": seed})
        for category in ("a", "b"):
            args = fake_category(category, seed=seed + 10 * (category == "b"))
            store.add_category(run, category, **args)
        store.finish_run(run)
        seeds.append(run)
    summary = store.seed_summary(seeds).set_index(["category", "metric"])
    values = [store.load_metrics(r).set_index("category").loc["a", "image_auroc"] for r in seeds]
    assert summary.loc[("a", "image_auroc"), "mean"] == pytest.approx(np.mean(values))
    assert summary.loc[("a", "image_auroc"), "sd"] == pytest.approx(np.std(values, ddof=1))
    assert summary.loc[("mean", "image_auroc"), "n"] == 3
    other = new_run(store, categories=("a", "b"), request={"dataset": "synthetic", "seed": 0, "resolution": 64})
    with pytest.raises(ValueError, match="differ only in the seed"):
        store.seed_summary([seeds[0], other])
    result = store.friedman(seeds, "image_auroc")
    assert result["n_categories"] == 2 and len(result["average_ranks"]) == 3
    assert sorted(result["average_ranks"].values()) == pytest.approx(sorted(
        stats.friedman_nemenyi(np.array([[store.load_metrics(r).set_index("category").loc[c, "image_auroc"]
                                           for r in seeds] for c in ("a", "b")])).average_ranks))
