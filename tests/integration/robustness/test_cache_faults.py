"""Cache faults: a damaged feature file, checkpoint or store index is detected and reported,
then recomputed or refused; nothing good is lost."""

from __future__ import annotations

import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

from harmoniad.backbone import TINY_BACKBONE
from harmoniad.runtime.serialization import ConfigError
from harmoniad.evaluate import EvalRequest, evaluate
from harmoniad.backbone.cache import FeatureCache
from harmoniad.model import ModelConfig
from harmoniad.runtime.paths import REPO_ROOT
from harmoniad.runtime.progress import Cancelled, ProgressEvent, silent
from harmoniad.store import ResultStore
from harmoniad.train import CONFIG_FILE, MODEL_FILE, STATE_FILE, CheckpointError, TrainConfig, load_checkpoint, train
from harmoniad.backbone.sources import TensorSource

# ------------------------------------------------------------------ feature cache


def test_a_cut_feature_file_is_recomputed_and_the_good_ones_are_kept(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("HARMONIAD_CACHE", str(tmp_path / "cache"))
    store = ResultStore(tmp_path / "runs")
    request = EvalRequest(
        "synthetic", str(dataset), ("patchcore",), categories=("weave",), backbone=TINY_BACKBONE, resolution=32
    )
    [first] = evaluate(request, store, silent)
    files = sorted((tmp_path / "cache" / "features").rglob("*.safetensors"))
    assert len(files) > 4
    victim, others = files[0], files[1:]
    before = {f: (f.read_bytes(), f.stat().st_mtime_ns) for f in others}
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])

    with caplog.at_level(logging.WARNING, logger="harmoniad.backbone.cache"):
        [second] = evaluate(request, store, silent)
    assert any(victim.name in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    assert store.get_run(second).status == "complete"
    pd.testing.assert_frame_equal(store.load_images(first), store.load_images(second))
    assert (
        victim.stat().st_size > 0
        and FeatureCache(TINY_BACKBONE, tmp_path / "cache" / "features").ensure(
            [s for s in store.load_images(second)["image_path"]]
        )
        == 0
    )  # repaired on disk
    for f, (data, mtime) in before.items():  # the sound files were neither rewritten nor touched
        assert f.read_bytes() == data and f.stat().st_mtime_ns == mtime


# ------------------------------------------------------------------ checkpoints

MODEL = ModelConfig(hidden_dim=16, fsam_heads=2, gscm_heads=2, decoder_heads=2, fsam_window=4)
TRAIN = TrainConfig(epochs=1, max_steps=4, batch_size=4, checkpoint_every=2, amp=False)


def _feats() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(8, 16, 6, 6, generator=gen) for _ in range(2)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(TensorSource(_feats()), None, MODEL, TRAIN, tmp_path_factory.mktemp("ckpt") / "run")


def _edit_config(ckpt: Path, edit) -> None:  # type: ignore[no-untyped-def]
    record = json.loads((ckpt / CONFIG_FILE).read_text())
    edit(record)
    (ckpt / CONFIG_FILE).write_text(json.dumps(record))


def test_a_weight_of_the_wrong_shape_is_refused_naming_it(ckpt: Path) -> None:
    state = load_file(str(ckpt / MODEL_FILE))
    name = min(k for k, v in state.items() if v.ndim == 2)
    state[name] = torch.zeros(state[name].shape[0] + 1, state[name].shape[1])
    save_file(state, str(ckpt / MODEL_FILE))
    with pytest.raises(CheckpointError, match=rf"{MODEL_FILE}: weights do not match .*wrong shapes.*{name}"):
        load_checkpoint(ckpt)


def test_a_cut_weights_file_is_refused_naming_it(ckpt: Path) -> None:
    data = (ckpt / MODEL_FILE).read_bytes()
    (ckpt / MODEL_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{MODEL_FILE}: unreadable safetensors file"):
        load_checkpoint(ckpt)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda r: r.update(in_dim=32), "weights do not match"),
        (lambda r: r["model"].update(hidden_dim=24), "weights do not match"),
        (lambda r: r["model"].update(branches="high"), "weights do not match"),
        (lambda r: r.update(num_layers=3), "weights do not match"),
    ],
    ids=["in_dim", "hidden_dim", "branches", "num_layers"],
)
def test_a_config_that_does_not_describe_the_weights_is_refused(ckpt: Path, edit, match) -> None:
    _edit_config(ckpt, edit)
    with pytest.raises((CheckpointError, ConfigError), match=match):
        load_checkpoint(ckpt)


def test_training_refuses_to_overwrite_a_finished_checkpoint_of_other_settings(ckpt: Path) -> None:
    before = {n: (ckpt / n).read_bytes() for n in (MODEL_FILE, CONFIG_FILE)}
    other = TrainConfig(epochs=1, max_steps=6, batch_size=4, amp=False)
    with pytest.raises(CheckpointError, match="finished checkpoint with different settings"):
        train(TensorSource(_feats()), None, MODEL, other, ckpt)
    assert {n: (ckpt / n).read_bytes() for n in before} == before  # nothing lost


def test_a_cut_training_state_is_refused_and_kept_for_inspection(tmp_path: Path) -> None:
    out = tmp_path / "run"

    def stop(event: ProgressEvent) -> None:
        raise Cancelled("stop")  # training saves its state, then stops

    with pytest.raises(Cancelled):
        train(TensorSource(_feats()), None, MODEL, TRAIN, out, progress=stop)
    state = out / STATE_FILE
    data = state.read_bytes()
    state.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{STATE_FILE}: unreadable training state.*delete it"):
        train(TensorSource(_feats()), None, MODEL, TRAIN, out)
    assert state.read_bytes() == data[: len(data) // 2]  # refused, not silently replaced


# ------------------------------------------------------------------ the store index

_KILLED_WRITER = textwrap.dedent(
    """
    import sqlite3, sys, time
    import numpy as np, pandas as pd
    import harmoniad.store.runs as store_mod
    from harmoniad.store import ResultStore

    store = ResultStore(sys.argv[1])
    def category(name, n=4):
        images = pd.DataFrame({"image_path": [f"/d/{name}/{i}.png" for i in range(n)],
                               "label": [0, 1] * (n // 2), "score": np.arange(n, dtype=float)})
        maps = {"anomaly": np.random.default_rng(0).random((n, 8, 8)).astype(np.float32)}
        return dict(metrics={"image_auroc": 0.75}, images=images, maps=maps,
                    masks=np.zeros((n, 8, 8), bool))
    done = store.create_run(method="m", dataset="d", root="/d", categories=["a"], resolution=8, code_version="t")
    store.add_category(done, "a", **category("a"))
    store.finish_run(done)
    run = store.create_run(method="m", dataset="d", root="/d", categories=["a", "b"], resolution=8, code_version="t")
    store.add_category(run, "a", **category("a"))
    real_write_maps = store_mod.write_maps

    def write_maps_then_hang(path, *args, **kwargs):
        real_write_maps(path, *args, **kwargs)  # category b's bulk files are on disk ...
        con = sqlite3.connect(store.db_path, isolation_level=None)
        con.execute("PRAGMA cache_size = 2")  # ... and a big transaction spills into the WAL
        con.execute("BEGIN IMMEDIATE")
        con.execute("UPDATE runs SET status = 'complete' WHERE id = ?", (run,))
        con.execute("CREATE TABLE junk (x BLOB)")
        con.executemany("INSERT INTO junk VALUES (?)", [(bytes(4000),) for _ in range(500)])
        print(run, done, flush=True)
        time.sleep(60)

    store_mod.write_maps = write_maps_then_hang
    store.add_category(run, "b", **category("b"))
    """
)


def test_a_writer_killed_mid_transaction_leaves_a_sound_index(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, str(root)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line, "the writer died before reaching the kill point"
        run, done = line.split()
        wal = root / "index.sqlite-wal"
        assert wal.stat().st_size > 1_000_000  # the uncommitted transaction really reached the WAL
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(10)

    store = ResultStore(root)
    with sqlite3.connect(store.db_path) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert "junk" not in tables  # the uncommitted transaction is gone ...
    info = store.get_run(run)
    assert info.status == "failed" and info.interrupted  # ... so the run never shows complete
    assert list(store.load_metrics(run)["category"]) == ["a"]  # the category stored before is kept
    assert len(store.load_images(run)) == 4 and store.load_maps(run, 3)["anomaly"].shape == (8, 8)
    assert store.get_run(done).status == "complete" and len(store.load_images(done)) == 4
    orphans = sorted(p.name for p in (root / run / "maps").iterdir())
    assert len(orphans) == 2  # b's files are unreferenced leftovers, never shown
    # The index takes new writes at once.
    again = store.create_run(method="m", dataset="d", root="/d", categories=["a"], resolution=8, code_version="t")
    store.fail_category(again, "a", "nothing to see")
    store.finish_run(again)
    info = store.get_run(again)  # its only category failed: the run failed (issue 12)
    assert info.status == "failed" and info.error == "every category failed; a: nothing to see"


def test_a_version_1_index_is_upgraded_in_place(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "runs")
    run = store.create_run(method="m", dataset="d", root="/d", categories=["a"], resolution=8, code_version="t")
    with sqlite3.connect(store.db_path) as con:  # what an index written before skipped files looks like
        con.execute("DROP TABLE skipped_files")
        con.execute("PRAGMA user_version = 1")
    store = ResultStore(tmp_path / "runs")
    assert store.get_run(run).status == "running"
    store.add_skipped(run, [("a", "/d/x.png", "cut short")])
    store.fail_category(run, "a", "boom", skipped=[("/d/y.png", "empty")])
    skipped = store.load_skipped(run)
    assert skipped.values.tolist() == [["train", "a", "/d/x.png", "cut short"], ["test", "a", "/d/y.png", "empty"]]
    assert np.array_equal(store.load_report(run)["categories"]["a"]["n_skipped"], 1)
