"""Evaluation with several writer threads (what a GPU machine uses): every category recorded, the same numbers."""

from __future__ import annotations

import numpy as np

import harmoniad.evaluate as evaluate_mod
from harmoniad.backbone import TINY_BACKBONE
from harmoniad.data import make_synthetic
from harmoniad.evaluate import EvalRequest, evaluate
from harmoniad.runtime.progress import silent
from harmoniad.store import ResultStore


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
