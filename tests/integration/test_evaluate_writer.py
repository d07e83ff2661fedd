"""Evaluation the way a GPU machine runs it: several writer threads (every category recorded,
the same numbers) and decode worker processes started once for the whole request."""

from __future__ import annotations

import numpy as np

import harmoniad.evaluate as evaluate_mod
from harmoniad.backbone import TINY_BACKBONE
from harmoniad.data import make_synthetic
from harmoniad.data.loading import decoded_batches
from harmoniad.evaluate import EvalRequest, evaluate
from harmoniad.methods.freqfilter import FrequencyFilter
from harmoniad.runtime.progress import silent
from harmoniad.store import ResultStore
from tests.fixtures.decoding import decoder_pids, pid_image


def test_parallel_writers_record_the_same_results_as_one(tmp_path, monkeypatch):
    monkeypatch.setenv("HARMONIAD_CACHE", str(tmp_path / "cache"))
    root = make_synthetic(tmp_path / "data", categories=("weave", "flange", "grain"), n_train=4, n_test=4, size=64)
    request = EvalRequest(dataset="synthetic", root=str(root), methods=("freqfilter",), backbone=TINY_BACKBONE,
                          resolution=32, device="cpu", n_resamples=50)
    one, three = ResultStore(tmp_path / "one"), ResultStore(tmp_path / "three")
    (id1,) = evaluate(request, one, progress=silent)
    monkeypatch.setattr(evaluate_mod, "writer_workers", lambda device: 3)
    (id3,) = evaluate(request, three, progress=silent)
    assert three.get_run(id3).status == "complete"
    m1 = one.load_metrics(id1).set_index("category").sort_index()
    m3 = three.load_metrics(id3).set_index("category").sort_index()
    assert list(m3.index) == ["flange", "grain", "weave"] and list(m3["status"]) == ["ok"] * 3
    numeric = [c for c in m1.columns if c.startswith(("image_", "pixel_"))]
    np.testing.assert_allclose(m3[numeric].to_numpy(float), m1[numeric].to_numpy(float))
    i1, i3 = one.load_images(id1), three.load_images(id3)
    assert sorted(i1["image_path"]) == sorted(i3["image_path"])


def test_decode_worker_processes_start_once_for_the_whole_evaluation(tmp_path, monkeypatch):
    # On CUDA scoring decodes in worker processes; on this CPU a method that decodes the same
    # way stands in. Every predict call (each category's test images and held-out normals)
    # must be served by the same workers.
    monkeypatch.setenv("HARMONIAD_CACHE", str(tmp_path / "cache"))
    root = make_synthetic(tmp_path / "data", categories=("weave", "flange"), n_train=6, n_test=4, size=32)
    seen: list[set[tuple[int, ...]]] = []
    predict = FrequencyFilter.predict

    def decoding_predict(self, test, ctx):  # type: ignore[no-untyped-def]
        seen.append(decoder_pids(decoded_batches([s.image_path for s in test], 4, workers=2, processes=True,
                                                 reader=pid_image)))
        return predict(self, test, ctx)

    monkeypatch.setattr(FrequencyFilter, "predict", decoding_predict)
    request = EvalRequest(dataset="synthetic", root=str(root), methods=("freqfilter",), resolution=32, device="cpu",
                          n_resamples=0, threshold_holdout=0.5)
    (run_id,) = evaluate(request, ResultStore(tmp_path / "runs"), progress=silent)
    assert ResultStore(tmp_path / "runs").get_run(run_id).status == "complete"
    assert len(seen) == 4  # two categories, test images and held-out normals of each
    assert len(seen[0]) == 2 and all(pids == seen[0] for pids in seen)


def test_ground_truth_masks_are_read_while_the_category_is_scored(tmp_path, monkeypatch):
    # Reading a category's masks (~3 ms a 1024 px MVTec mask) must not wait for its scoring to end,
    # nor the scoring for it: predict waits (at most 10 s) until the masks are being read.
    import threading

    monkeypatch.setenv("HARMONIAD_CACHE", str(tmp_path / "cache"))
    root = make_synthetic(tmp_path / "data", categories=("weave", "flange"), n_train=4, n_test=4, size=32)
    reading, overlapped = threading.Event(), []
    masks_at, predict = evaluate_mod.masks_at, FrequencyFilter.predict

    def watched_masks_at(samples, resolution):  # type: ignore[no-untyped-def]
        reading.set()
        return masks_at(samples, resolution)

    def waiting_predict(self, test, ctx):  # type: ignore[no-untyped-def]
        if any(s.label for s in test):  # a test set (held-out normals have no masks to read)
            overlapped.append(reading.wait(timeout=10))
            reading.clear()
        return predict(self, test, ctx)

    monkeypatch.setattr(evaluate_mod, "masks_at", watched_masks_at)
    monkeypatch.setattr(FrequencyFilter, "predict", waiting_predict)
    request = EvalRequest(dataset="synthetic", root=str(root), methods=("freqfilter",), resolution=32, device="cpu",
                          n_resamples=0)
    (run_id,) = evaluate(request, ResultStore(tmp_path / "runs"), progress=silent)
    store = ResultStore(tmp_path / "runs")
    assert store.get_run(run_id).status == "complete"
    assert overlapped == [True, True]
    assert list(store.load_metrics(run_id)["status"]) == ["ok", "ok"]
