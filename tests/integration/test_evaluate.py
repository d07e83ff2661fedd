"""The evaluation engine end to end: every method, the store round trip, failure isolation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harmoniad.backbone import TINY_BACKBONE
from harmoniad.data import load_dataset, make_synthetic
from harmoniad.evaluate import EvalRequest, category_metrics, evaluate, masks_at
from harmoniad.methods import METHODS
from harmoniad.maps import Prediction
from harmoniad.metrics import image_metrics, pixel_metrics
from harmoniad.runtime.progress import silent
from harmoniad.store import ResultStore

CATEGORIES = ("weave", "flange")
#: Small heads and short training keep four HarmoniAD variants fast on a CPU.
FAST = {"model": {"hidden_dim": 32}, "train": {"epochs": 2, "batch_size": 8}}
FAST_OPTIONS = {name: FAST for name, spec in METHODS.items() if spec.kind in ("harmoniad", "ablation")}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("syn"), n_train=4, n_test=4, size=64, categories=list(CATEGORIES))


@pytest.fixture(scope="module")
def all_runs(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[ResultStore, list[str], Path]:
    cache = tmp_path_factory.mktemp("cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("HARMONIAD_CACHE", str(cache))
    try:
        request = EvalRequest("synthetic", str(dataset), tuple(METHODS), backbone=TINY_BACKBONE, resolution=64,
                              options=FAST_OPTIONS)
        store = ResultStore(cache / "runs")
        ids = evaluate(request, store, progress=silent)
    finally:
        mp.undo()
    return store, ids, cache


def test_every_method_completes_with_metrics_for_every_category(all_runs) -> None:
    store, ids, _ = all_runs
    assert len(ids) == len(METHODS)
    for run_id in ids:
        info = store.get_run(run_id)
        assert info.status == "complete", (info.method, info.error)
        metrics = store.load_metrics(run_id)
        assert sorted(metrics["category"]) == sorted(CATEGORIES)
        assert (metrics["status"] == "ok").all(), metrics[["category", "error"]]
        assert metrics[["image_auroc", "pixel_auroc", "pixel_aupro"]].notna().all().all()
        images = store.load_images(run_id)
        assert len(images) == 8 and set(images["label"]) == {0, 1}
        assert info.random_weights == (METHODS[info.method].name != "freqfilter")


def test_runs_show_what_harmoniad_fitted_and_the_checkpoint_scores_with_it(all_runs, capsys) -> None:
    from harmoniad.cli import main
    from harmoniad.store.details import run_json
    from harmoniad.train import load_checkpoint, read_checkpoint_info

    store, ids, _ = all_runs
    by_method = {store.get_run(r).method: run_json(store, r) for r in ids}
    assert main(["runs", "--store", str(store.root), "show", by_method["harmoniad"]["run_id"]]) == 0
    assert "fusion of the z-scored maps: anomaly map " in capsys.readouterr().out
    fitted = by_method["harmoniad"]["fitted"]
    model, _ = load_checkpoint(fitted["checkpoint"])
    fusion = fitted["fusion"]
    assert tuple(fusion["map"]) == model.mix and tuple(fusion["score"]) == model.score_mix
    learning = read_checkpoint_info(fitted["checkpoint"]).result["fusion"]
    assert fusion["learning"] == learning and tuple(learning["map"]["mix"]) == model.mix
    assert by_method["harmoniad_nosplit"]["fitted"]["fusion"]["learning"] is not None  # both branches: weights
    low = by_method["harmoniad_low"]["fitted"]
    assert low["checkpoint"] != fitted["checkpoint"] and low["fusion"] is None  # one branch: its own map
    assert by_method["freqfilter"]["fitted"] == {}


def test_stored_metrics_match_a_recomputation_from_stored_scores_and_maps(all_runs, dataset: Path) -> None:
    store, ids, _ = all_runs
    run_id = ids[0]  # harmoniad: has branch maps
    images = store.load_images(run_id)
    metrics = store.load_metrics(run_id).set_index("category")
    for category, group in images.groupby("category"):
        scores = group["score"].to_numpy()
        expected = image_metrics(group["label"].to_numpy(), scores)
        assert metrics.loc[category, "image_auroc"] == pytest.approx(expected["auroc"])
        maps = [store.load_maps(run_id, i) for i in group["index"]]
        assert {"anomaly", "high", "low", "mask"} <= set(maps[0])
        pixel = pixel_metrics(np.stack([m["mask"] for m in maps]), np.stack([m["anomaly"] for m in maps]))
        # Maps are stored as float16: the recomputation agrees to that precision.
        assert metrics.loc[category, "pixel_auroc"] == pytest.approx(pixel["auroc"], abs=2e-3)


def test_reload_from_a_new_store_object_gives_identical_tables(all_runs) -> None:
    store, ids, cache = all_runs
    again = ResultStore(cache / "runs")
    for run_id in ids:
        pd.testing.assert_frame_equal(store.load_images(run_id), again.load_images(run_id))
        pd.testing.assert_frame_equal(store.load_metrics(run_id), again.load_metrics(run_id))


def test_a_failing_category_is_recorded_and_the_others_go_on(dataset: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from harmoniad.methods.freqfilter import FrequencyFilter

    original = FrequencyFilter.predict

    def flaky(self, test, ctx) -> Prediction:  # type: ignore[no-untyped-def]
        if test[0].category == "flange":
            raise RuntimeError("disk on fire")
        return original(self, test, ctx)

    monkeypatch.setattr(FrequencyFilter, "predict", flaky)
    store = ResultStore(tmp_path / "runs")
    [run_id] = evaluate(EvalRequest("synthetic", str(dataset), ("freqfilter",), resolution=64), store, silent)
    assert store.get_run(run_id).status == "complete"
    metrics = store.load_metrics(run_id).set_index("category")
    assert metrics.loc["weave", "status"] == "ok"
    assert metrics.loc["flange", "status"] == "failed"
    assert "disk on fire" in metrics.loc["flange", "error"]


def test_a_failing_fit_fails_that_run_only(dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from harmoniad.methods.freqfilter import FrequencyFilter
    from harmoniad.methods.patchcore import PatchCore

    def broken(self, train, ctx) -> None:  # type: ignore[no-untyped-def]
        raise RuntimeError("out of memory")

    monkeypatch.setattr(PatchCore, "fit", broken)
    monkeypatch.setenv("HARMONIAD_CACHE", str(tmp_path / "cache"))
    store = ResultStore(tmp_path / "runs")
    ids = evaluate(EvalRequest("synthetic", str(dataset), ("patchcore", "freqfilter"), resolution=64), store, silent)
    assert [store.get_run(i).status for i in ids] == ["failed", "complete"]
    assert "out of memory" in (store.get_run(ids[0]).error or "")
    assert FrequencyFilter.name == store.get_run(ids[1]).method


@pytest.mark.parametrize(
    "request_kwargs, needle",
    [
        ({"methods": ("nope",)}, "unknown method"),
        ({"methods": ("patchcore",), "options": {"patchcore": {"coreset": 0.1}}}, "unknown PatchCoreConfig keys"),
        ({"methods": ("harmoniad",), "options": {"harmoniad": {"model": {"split": "yes"}}}}, "ModelConfig.split"),
    ],
)
def test_bad_requests_are_refused_before_any_work(dataset: Path, tmp_path: Path, request_kwargs, needle) -> None:
    store = ResultStore(tmp_path / "runs")
    with pytest.raises(ValueError, match=needle):
        evaluate(EvalRequest("synthetic", str(dataset), **request_kwargs), store, silent)
    assert store.list_runs().empty


def test_masks_at_resizes_ground_truth_and_zero_fills_normals(dataset: Path) -> None:
    samples = load_dataset("synthetic", dataset, ["weave"])
    assert samples
    masks = masks_at(samples, 32)
    assert masks.shape == (len(samples), 32, 32) and masks.dtype == bool
    for sample, mask in zip(samples, masks):
        assert mask.any() == (sample.label == 1)


def test_category_metrics_are_nan_when_undefined() -> None:
    pred = Prediction(scores=np.array([0.1, 0.2], np.float32), maps=np.random.rand(2, 8, 8).astype(np.float32))
    metrics = category_metrics(np.array([0, 0]), pred, np.zeros((2, 8, 8), bool))
    assert all(np.isnan(v) for v in metrics.values())
    assert set(metrics) == {f"image_{k}" for k in ("auroc", "ap", "f1_max")} | {
        f"pixel_{k}" for k in ("auroc", "ap", "f1_max", "aupro")}


def test_cancel_marks_the_run_failed_keeps_finished_categories_and_stops(dataset: Path, tmp_path: Path) -> None:
    from harmoniad.runtime.progress import Cancelled, ProgressEvent

    def cancel_after_first_category(event: ProgressEvent) -> None:
        if event.task == "evaluate" and event.info.get("category"):
            raise Cancelled()

    store = ResultStore(tmp_path / "runs")
    request = EvalRequest("synthetic", str(dataset), ("freqfilter", "patchcore"), resolution=64)
    with pytest.raises(Cancelled):
        evaluate(request, store, cancel_after_first_category)
    runs = store.list_runs()
    assert list(runs["method"]) == ["freqfilter"]  # the second method never started
    info = store.get_run(runs["id"][0])
    assert info.status == "failed" and info.error.startswith("cancelled")
    assert list(store.load_metrics(info.id)["category"]) == ["flange"]
