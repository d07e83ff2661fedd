"""Issue 12 from the outside, through ``python -m harmoniad``: an image-level-only folder set,
a zero-byte defective image, a method whose weights cannot be loaded, partial masks, and a
``runs show --json`` whose per-defect results and intervals agree with an independent
computation from the stored per-image scores."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from harmoniad import stats
from harmoniad.analysis import category_seed
from harmoniad.cli import main
from harmoniad.data import make_synthetic
from harmoniad.store import ResultStore
from harmoniad.thresholds import save_checkpoint_thresholds
from harmoniad.train import read_checkpoint_info

TINY = ["--model", "harmoniad-tiny", "--weights", "random", "--image-size", "128", "--device", "cpu"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("syn"), n_train=10, n_test=16, size=64, categories=["grain", "weave"])


@pytest.fixture
def folder(synthetic: Path, tmp_path: Path) -> Path:
    """A copy of the synthetic set as a plain folder dataset (ground truth included)."""
    root = tmp_path / "plant-a"
    shutil.copytree(synthetic, root)
    (root / "synthetic.json").unlink()
    return root


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HARMONIAD_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def evaluate(root: Path, store: Path, *extra: str, methods: tuple[str, ...] = ("freqfilter",)) -> int:
    return main(["evaluate", "--dataset", "folder", "--root", str(root), "--methods", *methods,
                 "--resolution", "32", "--store", str(store), "--device", "cpu", *extra])


def show_json(store: Path, run_id: str, capsys: pytest.CaptureFixture[str]) -> dict:
    capsys.readouterr()
    assert main(["runs", "--store", str(store), "show", run_id, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def run_ids(out: str) -> list[str]:
    return [line.split()[0] for line in out.splitlines() if line[:8].isdigit() and "-" in line.split()[0]]


def test_image_level_only_folder_completes_with_null_pixel_metrics(folder: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    for gt in folder.glob("*/ground_truth"):
        shutil.rmtree(gt)
    store = tmp_path / "runs"
    assert evaluate(folder, store, "--name", "line-3") == 0
    [run_id] = run_ids(capsys.readouterr().out)
    view = show_json(store, run_id, capsys)
    assert view["status"] == "complete" and view["dataset"] == "folder:line-3" and view["skipped"] == []
    assert [r["category"] for r in view["results"]] == ["grain", "weave"]
    images = ResultStore(store).load_images(run_id)
    for result in view["results"]:
        m = result["metrics"]
        assert result["status"] == "ok" and result["reason"] is None
        assert m["pixel_auroc"] is None and m["aupro"] is None and m["pixel_auroc_ci"] is None
        part = images[images["category"] == result["category"]]
        labels, scores = part["label"].to_numpy(), part["score"].to_numpy()
        assert m["image_auroc"] == pytest.approx(roc_auc_score(labels, scores))
        # per defect type: its images against all normals, by scikit-learn
        normal = labels == 0
        assert sum(d["n"] for d in result["defects"]) == int(labels.sum())
        for d in result["defects"]:
            keep = normal | (part["defect"].to_numpy() == d["defect"])
            assert d["image_auroc"] == pytest.approx(roc_auc_score(labels[keep], scores[keep]))
            assert d["pixel_auroc"] is None
        # the interval: exactly harmoniad.stats with the category's seed ...
        low, high = m["image_auroc_ci"]
        image_seed = category_seed(0, result["category"]).spawn(2)[0]
        again = stats.image_auroc_resamples(labels, scores, 1000, np.random.default_rng(image_seed))
        assert [low, high] == stats.interval(again, 0).as_list()
        # ... and close to a naive stratified bootstrap with scikit-learn and another seed
        rng = np.random.default_rng(123)
        pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
        naive = []
        for _ in range(1000):
            idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
            naive.append(roc_auc_score(labels[idx], scores[idx]))
        assert np.quantile(naive, 0.025) == pytest.approx(low, abs=0.06)
        assert np.quantile(naive, 0.975) == pytest.approx(high, abs=0.06)
    assert view["mean"]["image_auroc_ci"][0] <= view["mean"]["image_auroc"] <= view["mean"]["image_auroc_ci"][1]
    # the human view says "n/a", never 0, for the missing pixel metrics
    assert main(["runs", "--store", str(store), "show", run_id]) == 0
    assert "n/a" in capsys.readouterr().out


def test_a_zero_byte_defective_image_is_skipped_and_listed(folder: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    defect_dir = next(d for d in sorted((folder / "grain" / "test").iterdir()) if d.name != "good")
    broken = sorted(defect_dir.iterdir())[0]
    broken.write_bytes(b"")
    store = tmp_path / "runs"
    assert evaluate(folder, store) == 0
    [run_id] = run_ids(capsys.readouterr().out)
    view = show_json(store, run_id, capsys)
    assert view["status"] == "complete"
    assert [(s["path"], s["split"]) for s in view["skipped"]] == [(str(broken), "test")]
    assert "not a readable image" in view["skipped"][0]["reason"]
    grain = next(r for r in view["results"] if r["category"] == "grain")
    assert grain["status"] == "ok" and grain["n_skipped"] == 1 and grain["n_images"] == 15
    assert isinstance(grain["metrics"]["pixel_auroc"], float) and len(grain["metrics"]["aupro_ci"]) == 2
    # exports carry the skipped file, the intervals and the per-defect rows
    out = tmp_path / "export"
    assert main(["runs", "--store", str(store), "export", run_id, "--out", str(out)]) == 0
    skipped = list(csv.DictReader(open(out / f"{run_id}_skipped.csv")))
    assert [r["path"] for r in skipped] == [str(broken)]
    metrics = {r["category"]: r for r in csv.DictReader(open(out / f"{run_id}_metrics.csv"))}
    assert float(metrics["grain"]["image_auroc_ci_low"]) == pytest.approx(grain["metrics"]["image_auroc_ci"][0])
    assert metrics["grain"]["n_skipped"] == "1" and metrics["grain"]["dataset"] == "folder:plant-a"
    defects = list(csv.DictReader(open(out / f"{run_id}_defects.csv")))
    assert len(defects) == sum(len(r["defects"]) for r in view["results"])


def test_a_method_whose_weights_cannot_load_exits_1_with_the_reason(folder: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere.safetensors"
    code = evaluate(folder, tmp_path / "runs", "--model", "harmoniad-tiny", "--weights", str(missing),
                    "--image-size", "128", methods=("harmoniad", "freqfilter"))
    captured = capsys.readouterr()
    assert code == 1
    assert f"harmoniad failed: cannot load the backbone weights: weights file '{missing}'" in captured.err
    assert "harmoniad failed on every category" in captured.err
    harmoniad_run, freqfilter_run = run_ids(captured.out)
    failed = show_json(tmp_path / "runs", harmoniad_run, capsys)
    assert failed["status"] == "failed" and "cannot load the backbone weights" in failed["error"]
    assert [(r["category"], r["status"]) for r in failed["results"]] == [("grain", "failed"), ("weave", "failed")]
    assert all(str(missing) in r["reason"] and r["metrics"]["image_auroc"] is None for r in failed["results"])
    assert show_json(tmp_path / "runs", freqfilter_run, capsys)["status"] == "complete"


def test_partial_masks_need_the_flag_and_then_count(folder: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    mask = sorted((folder / "weave" / "ground_truth").rglob("*_mask.png"))[0]
    mask.unlink()
    # a malformed category is a named error: refused alone (the other completes) ...
    assert evaluate(folder, tmp_path / "runs") == 0
    err = capsys.readouterr().err
    assert f"freqfilter failed on weave: {mask.parent.parent.parent / 'test' / mask.parent.name}" in err
    assert "defective image has no mask" in err and "--allow-missing-masks" in err
    # ... and when it is all there is, the request is bad input
    assert evaluate(folder, tmp_path / "runs", "--categories", "weave") == 2
    assert "defective image has no mask" in capsys.readouterr().err
    assert evaluate(folder, tmp_path / "runs", "--allow-missing-masks") == 0
    [run_id] = run_ids(capsys.readouterr().out)
    view = show_json(tmp_path / "runs", run_id, capsys)
    weave = next(r for r in view["results"] if r["category"] == "weave")
    images = ResultStore(tmp_path / "runs").load_images(run_id)
    n_defective = int(images[(images["category"] == "weave")]["label"].sum())
    assert weave["n_masked"] == n_defective - 1 and isinstance(weave["metrics"]["pixel_auroc"], float)


def test_score_skips_bad_files_and_applies_the_stored_threshold(synthetic: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "ckpt"
    assert main(["train", "--dataset", "synthetic", "--root", str(synthetic), "--categories", "grain",
                 "--epochs", "1", "--batch-size", "4", "--hidden-dim", "16", "--fsam-input", "whole",
                 "--joint-loss-weight", "0.5",
                 "--out", str(ckpt), *TINY]) == 0
    info = read_checkpoint_info(ckpt).model
    assert info.fsam_input == "whole" and info.joint_loss_weight == 0.5
    images = tmp_path / "incoming"
    shutil.copytree(synthetic / "grain" / "test" / "good", images)
    (images / "zero.png").write_bytes(b"")
    out = tmp_path / "scored"
    score = ["score", "--checkpoint", str(ckpt), "--images", str(images), "--out", str(out),
             "--resolution", "32", "--device", "cpu"]
    assert main(score) == 0  # no thresholds stored yet: scores only
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["status"] for r in rows].count("skipped") == 1
    assert next(r for r in rows if r["status"] == "skipped")["image"].endswith("zero.png")
    assert all(r["anomalous"] == "" for r in rows)
    scores = sorted(float(r["score"]) for r in rows if r["status"] == "scored")
    cut = (scores[1] + scores[2]) / 2
    save_checkpoint_thresholds(ckpt, {"grain": {"fpr": {"value": cut, "rule": "quantile", "target_fpr": 0.01,
                                                        "n_normals": 5}}},
                               {"resolution": 32, "image_score": "top_mean", "sigma": 4.0, "top_fraction": 0.01})
    assert main(score) == 0
    rows = [r for r in csv.DictReader(open(out / "scores.csv")) if r["status"] == "scored"]
    assert all((r["anomalous"] == "True") == (float(r["score"]) > cut) for r in rows)
    assert sum(r["anomalous"] == "True" for r in rows) == len(rows) - 2
    assert "held-out normal images of 'grain'" in capsys.readouterr().out
    # fitted for another resolution: scored, but no decisions, and the reason is said
    assert main([*score[:-4], "--resolution", "64", "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert "not applied" in err and "scoring settings resolution=32" in err
    assert all(r["anomalous"] == "" for r in csv.DictReader(open(out / "scores.csv")))
    for path in images.iterdir():  # nothing scorable: non-zero
        path.write_bytes(b"")
    assert main(score) == 1
