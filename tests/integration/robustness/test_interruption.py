"""Interruption: training and evaluation killed mid-way (SIGKILL, no chance to clean up) resume
from the last saved point and end with the same result as an uninterrupted run."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from harmoniad.backbone import TINY_BACKBONE
from harmoniad.data import load_dataset, make_synthetic
from harmoniad.evaluate import EvalRequest, evaluate
from harmoniad.model import ModelConfig
from harmoniad.runtime.paths import REPO_ROOT
from harmoniad.runtime.progress import Cancelled, ProgressEvent, silent
from harmoniad.store import ResultStore
from harmoniad.train import CONFIG_FILE, MODEL_FILE, STATE_FILE, TrainConfig, train

CATEGORIES = ["weave", "flange", "grain"]
BACKBONE_ARGS = ["--model", "harmoniad-tiny", "--weights", "random", "--image-size", "128"]
TRAIN_ARGS = ["--hidden-dim", "16", "--epochs", "6", "--batch-size", "4", "--checkpoint-every", "2", "--device", "cpu"]
TOTAL_STEPS = 6 * 3  # 12 training images in batches of 4


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("interrupt") / "syn"
    return make_synthetic(root, n_train=3, n_test=4, size=64, categories=CATEGORIES, progress=silent)


def _env(cache: Path) -> dict[str, str]:
    # One thread: identical arithmetic in every process, and no spinning on a busy box.
    return {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HARMONIAD_CACHE": str(cache), "OMP_NUM_THREADS": "1"}


def _harmoniad(args: list[str], cache: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "harmoniad", *args],
        env=_env(cache),
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def _kill_when(proc: subprocess.Popen[str], ready: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """SIGKILL ``proc`` as soon as ``ready()`` holds; fail if it ends or times out first."""
    deadline = time.monotonic() + timeout_s
    try:
        while not ready():
            if proc.poll() is not None:
                pytest.fail(f"finished before it could be killed (rc {proc.returncode}): {proc.stderr.read()[-2000:]}")  # type: ignore[union-attr]
            if time.monotonic() > deadline:
                pytest.fail("the kill point was never reached")
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.communicate(timeout=30)


def _finish(proc: subprocess.Popen[str]) -> str:
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    return err


def test_training_killed_mid_way_resumes_to_the_same_weights(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache, out = tmp_path / "cache", tmp_path / "ckpt"
    args = ["train", "--dataset", "synthetic", "--root", str(data), *BACKBONE_ARGS, *TRAIN_ARGS, "--out", str(out)]

    killed = _harmoniad(args, cache)
    _kill_when(killed, lambda: (out / STATE_FILE).is_file())
    assert killed.returncode == -signal.SIGKILL
    assert not (out / CONFIG_FILE).exists()  # no final checkpoint: it really stopped mid-way

    log = _finish(_harmoniad(args, cache))
    first = int(re.search(rf"train (\d+)/{TOTAL_STEPS}", log).group(1))  # type: ignore[union-attr]
    assert 2 < first < TOTAL_STEPS  # continued from the saved state, not from step 1
    assert (out / CONFIG_FILE).is_file() and not (out / STATE_FILE).exists()

    # The same training, uninterrupted, in this process (features come from the same cache).
    monkeypatch.setenv("HARMONIAD_CACHE", str(cache))
    samples = load_dataset("synthetic", data, split="train")
    reference = train(
        samples,
        TINY_BACKBONE,
        ModelConfig(hidden_dim=16),
        TrainConfig(epochs=6, batch_size=4, checkpoint_every=2),
        tmp_path / "reference",
        device="cpu",
    )
    a, b = load_file(str(reference / MODEL_FILE)), load_file(str(out / MODEL_FILE))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from an uninterrupted run"


def _stored_categories(store_root: Path) -> int:
    try:
        with sqlite3.connect(f"file:{store_root / 'index.sqlite'}?mode=ro", uri=True, timeout=1) as con:
            return con.execute("SELECT COUNT(*) FROM category_metrics WHERE status = 'ok'").fetchone()[0]
    except sqlite3.Error:
        return 0  # not created yet


def test_evaluation_killed_mid_way_keeps_its_categories_and_never_shows_complete(data: Path, tmp_path: Path) -> None:
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    args = [
        "evaluate",
        "--dataset",
        "synthetic",
        "--root",
        str(data),
        *BACKBONE_ARGS,
        "--methods",
        "patchcore",
        "--resolution",
        "32",
        "--store",
        str(runs),
        "--device",
        "cpu",
    ]

    killed = _harmoniad(args, cache)
    _kill_when(killed, lambda: _stored_categories(runs) >= 1)
    store = ResultStore(runs)
    [killed_id] = store.list_runs()["id"]
    info = store.get_run(killed_id)
    assert info.status == "failed" and info.interrupted, info
    assert store.list_runs(status="complete").empty
    kept = store.load_metrics(killed_id)
    assert 1 <= len(kept) < len(CATEGORIES) and (kept["status"] == "ok").all()
    kept_images = store.load_images(killed_id)
    assert store.load_maps(killed_id, int(kept_images["index"].iloc[-1]))["anomaly"].shape == (32, 32)

    _finish(_harmoniad(args, cache))
    [rerun_id] = store.list_runs(status="complete")["id"]
    assert sorted(store.load_metrics(rerun_id)["category"]) == sorted(CATEGORIES)
    # What the killed run stored is exactly what the complete rerun computed for those categories.
    again = store.load_metrics(rerun_id).set_index("category").loc[kept["category"]].reset_index()
    cols = ["category", "image_auroc", "pixel_auroc", "pixel_aupro", "n_images"]
    pd.testing.assert_frame_equal(kept[cols].reset_index(drop=True), again[cols])
    rerun_images = store.load_images(rerun_id)
    same = rerun_images[rerun_images["category"].isin(kept["category"])].reset_index(drop=True)
    pd.testing.assert_series_equal(kept_images["score"], same["score"])


def test_a_cancelled_evaluation_is_failed_not_complete_and_keeps_what_it_stored(data: Path, tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "runs")
    seen: list[str] = []

    def cancel_after_first_category(event: ProgressEvent) -> None:
        if event.task == "evaluate" and "category" in event.info:
            seen.append(event.info["category"])
            raise Cancelled("user pressed stop")

    request = EvalRequest("synthetic", str(data), ("freqfilter",), resolution=32)
    with pytest.raises(Cancelled):
        evaluate(request, store, cancel_after_first_category)
    [run_id] = store.list_runs()["id"]
    info = store.get_run(run_id)
    assert info.status == "failed" and "cancelled" in (info.error or "")
    assert list(store.load_metrics(run_id)["category"]) == seen  # the finished category is kept
