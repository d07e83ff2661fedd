"""ResultStore: round trips, atomic status, concurrent writers, stale runs, errors."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harmoniad.store import (
    METRIC_COLUMNS,
    ResultStore,
    RunDataMissing,
    RunNotFound,
    RunStateError,
)

R = 16  # evaluation resolution in these tests


def fake_category(category: str, n: int = 5, seed: int = 0) -> dict:
    """Arguments for add_category: a small table, maps and masks."""
    rng = np.random.default_rng(seed)
    labels = np.array([0, 1] * (n // 2) + [1] * (n % 2), dtype=np.int8)
    images = pd.DataFrame(
        {
            "image_path": [f"/data/{category}/test/{i:03d}.png" for i in range(n)],
            "mask_path": [f"/data/{category}/gt/{i:03d}_mask.png" if l else None for i, l in enumerate(labels)],
            "category": category,
            "defect": ["crack" if l else "good" for l in labels],
            "label": labels,
            "score": rng.random(n).astype(np.float32),
        }
    )
    masks = np.zeros((n, R, R), dtype=bool)
    masks[labels == 1, 3:9, 4:7] = True
    maps = {
        "anomaly": rng.random((n, R, R)).astype(np.float32),
        "high": (rng.random((n, R, R)) * 1e-4).astype(np.float32),
        "low": (rng.random((n, R, R)) * 3e5).astype(np.float32),  # beyond float16's range
    }
    metrics = {m: float(rng.random()) for m in METRIC_COLUMNS}
    return {"metrics": metrics, "images": images, "maps": maps, "masks": masks, "seconds": 1.5}


def new_run(store: ResultStore, categories=("a", "b"), method="m", dataset="synthetic", **kw) -> str:
    return store.create_run(
        method=method,
        dataset=dataset,
        root="/data",
        categories=list(categories),
        resolution=R,
        method_config={"k": 3, "path": Path("/x")},
        backbone=kw.pop("backbone", {"model": "harmoniad-tiny", "weights": "random"}),
        **kw,
    )


@pytest.fixture
def store(tmp_path: Path) -> ResultStore:
    return ResultStore(tmp_path / "runs")


def test_round_trip_tables_and_maps(store: ResultStore, tmp_path: Path) -> None:
    run = new_run(store, request={"seed": 0})
    a, b = fake_category("a", 5, seed=1), fake_category("b", 4, seed=2)
    store.add_category(run, "a", **a)
    store.add_category(run, "b", **b)
    store.finish_run(run)

    info = store.get_run(run)
    assert info.status == "complete" and info.complete and info.finished
    assert info.categories == ("a", "b") and info.random_weights
    assert info.method_config == {"k": 3, "path": "/x"} and info.request == {"seed": 0}
    assert info.code_version and info.pid == os.getpid()

    # A second store object on the same path (as the dashboard would open) sees the same tables.
    again = ResultStore(tmp_path / "runs")
    images = again.load_images(run)
    expected = pd.concat([a["images"], b["images"]], ignore_index=True)
    expected.insert(0, "index", np.arange(9, dtype=np.int64))
    expected = expected[["index", "category", "image_path", "mask_path", "defect", "label", "score"]]
    expected["score"] = expected["score"].astype(np.float64)  # float32 scores are stored exactly as float64
    pd.testing.assert_frame_equal(images, expected)
    pd.testing.assert_frame_equal(images, again.load_images(run))

    metrics = again.load_metrics(run)
    assert list(metrics["category"]) == ["a", "b"] and set(metrics["kind"]) == {"measured"}
    for m in METRIC_COLUMNS:
        assert metrics[m].tolist() == pytest.approx([a["metrics"][m], b["metrics"][m]], abs=0)
    assert metrics["n_images"].tolist() == [5, 4] and metrics["seconds"].tolist() == [1.5, 1.5]

    for index, (src, local) in enumerate([(a, i) for i in range(5)] + [(b, i) for i in range(4)]):
        maps = again.load_maps(run, index)
        assert set(maps) == {"anomaly", "high", "low", "mask"}
        np.testing.assert_array_equal(maps["mask"], src["masks"][local])
        for name in ("anomaly", "high", "low"):
            assert maps[name].dtype == np.float32 and maps[name].shape == (R, R)
            # float16 precision whatever the scale (tiny and beyond-float16 maps alike)
            np.testing.assert_allclose(maps[name], src["maps"][name][local], rtol=1e-3, atol=0)
    with pytest.raises(IndexError, match="no stored image with index 9"):
        again.load_maps(run, 9)


def test_uint8_maps_are_close_within_range(tmp_path: Path) -> None:
    store = ResultStore(tmp_path, map_precision="uint8")
    run = new_run(store, categories=["a"])
    a = fake_category("a", 3)
    a["maps"]["anomaly"][0] = 7.0  # a constant map
    store.add_category(run, "a", **a)
    for i in range(3):
        got = store.load_maps(run, i)
        for name, stack in a["maps"].items():
            span = float(stack[i].max() - stack[i].min())
            np.testing.assert_allclose(got[name], stack[i], atol=span / 255 + 1e-6 * abs(stack[i]).max())


def test_nested_metrics_nan_and_failed_category(store: ResultStore) -> None:
    run = new_run(store, categories=["a", "b", "c"])
    a = fake_category("a", 3)
    a["metrics"] = {"image": {"auroc": 0.5, "ap": 0.25, "f1_max": float("nan")}, "pixel": {"aupro": 1.0}}
    store.add_category(run, "a", **a)
    store.fail_category(run, "b", "ValueError('boom')")
    with pytest.raises(RunStateError, match=r"\['c'\] were neither added nor failed"):
        store.finish_run(run)
    store.add_category(run, "c", **fake_category("c", 2))
    store.finish_run(run)
    metrics = store.load_metrics(run)
    assert list(metrics["status"]) == ["ok", "failed", "ok"]
    row = metrics.iloc[0]
    assert (row["image_auroc"], row["image_ap"], row["pixel_aupro"]) == (0.5, 0.25, 1.0)
    assert np.isnan(row["image_f1_max"]) and np.isnan(row["pixel_auroc"])
    assert metrics.iloc[1]["error"] == "ValueError('boom')" and pd.isna(metrics.iloc[1]["n_images"])
    # images of the failed category are absent, indices stay unique
    images = store.load_images(run)
    assert list(images["category"]) == ["a"] * 3 + ["c"] * 2 and images["index"].is_unique
    runs = store.list_runs()
    assert (runs.loc[0, "n_ok"], runs.loc[0, "n_failed"]) == (2, 1)


def test_category_without_maps(store: ResultStore) -> None:
    run = new_run(store, categories=["a"])
    store.add_category(run, "a", **{**fake_category("a", 2), "maps": None, "masks": None})
    assert store.load_maps(run, 1) == {}
    assert len(store.load_images(run)) == 2


def test_re_adding_a_category_replaces_it_and_removes_old_files(store: ResultStore) -> None:
    run = new_run(store, categories=["a"])
    store.fail_category(run, "a", "first try failed")
    store.add_category(run, "a", **fake_category("a", 3, seed=1))
    second = fake_category("a", 4, seed=2)
    store.add_category(run, "a", **second)
    assert len(store.load_images(run)) == 4
    files = sorted(p.name for p in (store.root / run).rglob("*") if p.is_file())
    assert len(files) == 2, files  # one parquet + one maps file, the first pair deleted


def test_rejects_bad_input(store: ResultStore) -> None:
    run = new_run(store, categories=["a"])
    good = fake_category("a", 3)
    with pytest.raises(ValueError, match="not one of its categories"):
        store.add_category(run, "zzz", **good)
    with pytest.raises(ValueError, match="unknown metric name"):
        store.add_category(run, "a", **{**good, "metrics": {"image_aurc": 0.5}})
    with pytest.raises(ValueError, match="fraction in \\[0, 1\\]"):
        store.add_category(run, "a", **{**good, "metrics": {"image_auroc": 97.5}})
    with pytest.raises(ValueError, match="map 'anomaly' has shape"):
        store.add_category(run, "a", **{**good, "maps": {"anomaly": np.zeros((3, 8, 8))}})
    with pytest.raises(ValueError, match="lacks column"):
        store.add_category(run, "a", **{**good, "images": good["images"].drop(columns="score")})
    with pytest.raises(ValueError, match="rows of other categories"):
        store.add_category(run, "a", **{**good, "images": good["images"].assign(category="b")})
    assert store.load_images(run).empty  # nothing half-written
    assert not list((store.root / run).rglob("*.maps"))


def test_finished_run_cannot_be_written(store: ResultStore) -> None:
    run = new_run(store, categories=["a"])
    store.fail_run(run, "fit failed")
    info = store.get_run(run)
    assert info.status == "failed" and info.error == "fit failed" and not info.interrupted
    with pytest.raises(RunStateError, match="is failed, not running"):
        store.add_category(run, "a", **fake_category("a"))
    with pytest.raises(RunStateError):
        store.finish_run(run)


def test_status_observer_sees_each_transition_after_it_is_committed(tmp_path: Path) -> None:
    seen: list[tuple[str, str, str]] = []
    store = ResultStore(tmp_path / "runs", on_status=lambda run_id, status: seen.append(
        (run_id, status, ResultStore(tmp_path / "runs").get_run(run_id).status)))
    done = new_run(store, categories=["a"])
    store.add_category(done, "a", **fake_category("a"))
    store.finish_run(done)
    failed = new_run(store, categories=["a"])
    store.fail_run(failed, "fit failed")
    with pytest.raises(RunStateError):
        store.finish_run(failed)  # refused: no notification
    all_failed = new_run(store, categories=["a"])
    store.fail_category(all_failed, "a", "unreadable tree")
    store.finish_run(all_failed)  # every category failed: the run closes as failed, and says so
    # (run, reported status, status another reader sees at that moment): already committed.
    assert seen == [(done, "running", "running"), (done, "complete", "complete"),
                    (failed, "running", "running"), (failed, "failed", "failed"),
                    (all_failed, "running", "running"), (all_failed, "failed", "failed")]


def _killed_writer(root: str, conn) -> None:
    store = ResultStore(root)
    run = new_run(store, categories=["a", "b"])
    store.add_category(run, "a", **fake_category("a"))
    conn.send(run)  # synchronous, unlike a Queue's feeder thread
    os._exit(1)  # killed before category b and finish_run


def _mp():
    """spawn: a forked child could inherit a lock held by pyarrow's thread pool and hang."""
    return mp.get_context("spawn")


def _join(procs: list, timeout_s: float = 60) -> list:
    """Join daemon processes; kill any that hang so the test fails instead of blocking."""
    for p in procs:
        p.join(timeout_s)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in procs]


def test_killed_run_never_shows_complete(store: ResultStore) -> None:
    ctx = _mp()
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_killed_writer, args=(str(store.root), send), daemon=True)
    proc.start()
    assert _join([proc]) == [1] and receive.poll(1)
    run = receive.recv()
    raw = store.list_runs(check_stale=False)
    assert raw.loc[0, "status"] == "running"  # as the writer left it
    runs = store.list_runs()
    assert runs.loc[0, "id"] == run and runs.loc[0, "status"] == "failed"
    info = store.get_run(run)
    assert info.interrupted and "ended before the run finished" in info.error
    assert list(store.load_metrics(run)["category"]) == ["a"]  # what was stored stays loadable
    assert store.list_runs(status="complete").empty


def test_live_running_run_is_not_reaped(store: ResultStore) -> None:
    run = new_run(store)
    assert store.reap_interrupted() == []
    assert store.get_run(run).status == "running"
    with pytest.raises(RunStateError, match="still running"):
        store.delete_run(run)
    store.delete_run(run, force=True)
    with pytest.raises(RunNotFound):
        store.get_run(run)


def _write_runs(root: str, tag: str, n_categories: int, barrier) -> None:
    store = ResultStore(root)
    barrier.wait(60)
    cats = [f"{tag}{i}" for i in range(n_categories)]
    for k in range(3):
        run = new_run(store, categories=cats, method=tag)
        for i, cat in enumerate(cats):
            store.add_category(run, cat, **fake_category(cat, 3 + i, seed=k))
        store.finish_run(run)


def test_two_processes_write_at_once(tmp_path: Path) -> None:
    root = str(tmp_path / "runs")  # fresh: both processes also create the schema at once
    ctx = _mp()
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_write_runs, args=(root, tag, 4, barrier), daemon=True) for tag in ("p", "q")]
    for p in procs:
        p.start()
    assert _join(procs) == [0, 0]
    store = ResultStore(root)
    with sqlite3.connect(store.db_path) as con:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    runs = store.list_runs()
    assert len(runs) == 6 and set(runs["status"]) == {"complete"}
    assert sorted(runs["method"].value_counts().tolist()) == [3, 3]
    for run in runs["id"]:
        images = store.load_images(run)
        assert len(images) == 3 + 4 + 5 + 6 and list(images["index"]) == list(range(18))
        last = store.load_maps(run, 17)
        assert last["anomaly"].shape == (R, R)


def test_threads_share_one_store(store: ResultStore) -> None:
    errors: list[BaseException] = []

    def work(tag: str) -> None:
        try:
            run = new_run(store, categories=[tag], method=tag)
            store.add_category(run, tag, **fake_category(tag))
            store.finish_run(run)
            store.list_runs()
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(f"t{i}",), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not any(t.is_alive() for t in threads)
    assert len(store.list_runs(status="complete")) == 4


def test_delete_removes_index_rows_and_files(store: ResultStore) -> None:
    keep, drop = new_run(store, categories=["a"]), new_run(store, categories=["a"])
    for run in (keep, drop):
        store.add_category(run, "a", **fake_category("a"))
        store.finish_run(run)
    store.delete_run(drop)
    assert list(store.list_runs()["id"]) == [keep]
    assert not (store.root / drop).exists() and (store.root / keep).exists()
    with sqlite3.connect(store.db_path) as con:
        assert con.execute("SELECT COUNT(*) FROM category_metrics WHERE run_id = ?", (drop,)).fetchone()[0] == 0
    for call in (store.get_run, store.load_metrics, store.load_images, lambda r: store.load_maps(r, 0)):
        with pytest.raises(RunNotFound, match=drop):
            call(drop)


def test_missing_files_raise_a_clear_error(store: ResultStore) -> None:
    run = new_run(store, categories=["a"])
    store.add_category(run, "a", **fake_category("a"))
    store.finish_run(run)
    (maps_file,) = (store.root / run).rglob("*.maps")
    maps_file.write_bytes(maps_file.read_bytes()[:-100])  # truncated
    with pytest.raises(RunDataMissing, match=r"maps file .*\.maps is corrupt or incomplete"):
        store.load_maps(run, 0)
    maps_file.unlink()
    with pytest.raises(RunDataMissing, match=r"maps file .*\.maps is missing"):
        store.load_maps(run, 0)
    assert len(store.load_images(run)) == 5  # the table is still there
    for parquet in (store.root / run).rglob("*.parquet"):
        parquet.unlink()
    with pytest.raises(RunDataMissing, match=r"per-image table of category 'a' is missing: .*\.parquet"):
        store.load_images(run)
    assert isinstance(RunDataMissing("x"), FileNotFoundError)


def test_list_filters(store: ResultStore) -> None:
    ids = {}
    for method, dataset, backbone in [
        ("patchcore", "mvtec", {"model": "ViT-L-14-336", "weights": "openai"}),
        ("patchcore", "visa", {"model": "ViT-L-14-336", "weights": "random"}),
        ("harmoniad", "mvtec", {"model": "ViT-L-14-336", "weights": "openai"}),
        ("freqfilter", "mvtec", None),
    ]:
        run = new_run(store, categories=["a"], method=method, dataset=dataset, backbone=backbone)
        ids[(method, dataset)] = run
    store.add_category(ids[("harmoniad", "mvtec")], "a", **fake_category("a"))
    store.finish_run(ids[("harmoniad", "mvtec")])
    store.fail_run(ids[("patchcore", "visa")], "x")

    def got(**kw) -> set:
        return set(store.list_runs(**kw)["id"])

    assert got() == set(ids.values())
    assert got(method="patchcore") == {ids[("patchcore", "mvtec")], ids[("patchcore", "visa")]}
    both = {ids[("harmoniad", "mvtec")], ids[("freqfilter", "mvtec")]}
    assert got(method=["harmoniad", "freqfilter"], dataset="mvtec") == both
    assert got(status="complete") == {ids[("harmoniad", "mvtec")]}
    assert got(status=["failed", "running"]) == set(ids.values()) - {ids[("harmoniad", "mvtec")]}
    assert got(random_weights=True) == {ids[("patchcore", "visa")]}
    assert len(store.list_runs(limit=2)) == 2
    runs = store.list_runs()
    assert list(runs["created"]) == sorted(runs["created"], reverse=True)
    assert store.get_run(ids[("freqfilter", "mvtec")]).backbone is None
    with pytest.raises(ValueError, match="unknown run status"):
        store.list_runs(status="done")


def test_leaderboard_means_ok_categories(store: ResultStore) -> None:
    run = new_run(store, categories=["a", "b", "c"], backbone={"model": "tiny", "weights": "random"})
    a, b = fake_category("a", 3, seed=1), fake_category("b", 3, seed=2)
    a["metrics"]["pixel_aupro"] = float("nan")
    store.add_category(run, "a", **a)
    store.add_category(run, "b", **b)
    store.fail_category(run, "c", "boom")
    store.finish_run(run)
    new_run(store)  # running: not on the leaderboard
    board = store.leaderboard()
    assert len(board) == 1 and board.loc[0, "kind"] == "measured" and board.loc[0, "backbone"] == "tiny (random)"
    assert board.loc[0, "image_auroc"] == pytest.approx((a["metrics"]["image_auroc"] + b["metrics"]["image_auroc"]) / 2)
    assert board.loc[0, "pixel_aupro"] == pytest.approx(b["metrics"]["pixel_aupro"])  # NaN skipped
    assert (board.loc[0, "n_categories"], board.loc[0, "n_failed"]) == (2, 1)
    table = store.metrics_table()
    assert list(table["category"]) == ["a", "b", "c"] and set(table["method"]) == {"m"}


def test_export_csv(store: ResultStore, tmp_path: Path) -> None:
    run = new_run(store, categories=["a", "b"])
    store.add_category(run, "a", **fake_category("a", 3, seed=1))
    store.add_category(run, "b", **fake_category("b", 3, seed=2))
    store.finish_run(run)
    metrics_csv, images_csv, run_json = store.export_csv(run, tmp_path / "export")
    metrics = pd.read_csv(metrics_csv)
    assert list(metrics["category"]) == ["a", "b", "mean"]
    assert metrics.iloc[2]["image_auroc"] == pytest.approx(metrics.iloc[:2]["image_auroc"].mean())
    assert len(pd.read_csv(images_csv)) == 6 and run in run_json.read_text()
    # Random backbone weights: every exported file says the numbers are not a result.
    for table in (metrics, pd.read_csv(images_csv)):
        assert set(table["weights"]) == {"random weights: not a result"}
    assert json.loads(run_json.read_text())["weights_statement"] == "random weights: not a result"


@pytest.mark.parametrize("backbone,random,expected", [
    ({"model": "ViT-B-16", "weights": "openai", "random": False}, None, "ViT-B-16 pretrained tag openai"),
    ({"model": "ViT-B-16", "weights": "file", "weights_sha256": "ab12", "random": False}, None,
     "ViT-B-16 weights file sha256 ab12"),
    ({"model": "harmoniad-tiny", "weights": "random", "random": True}, None, "random weights: not a result"),
    ({"model": "ViT-B-16", "weights": "openai"}, True, "random weights: not a result"),
    (None, None, "no backbone weights (pixel-space method)"),
])
def test_weights_statement(store: ResultStore, backbone, random, expected) -> None:
    from harmoniad.store.export import weights_statement

    run = new_run(store, categories=["a"], backbone=backbone, random_weights=random)
    assert weights_statement(store.get_run(run)) == expected


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    ResultStore(tmp_path)
    with sqlite3.connect(tmp_path / "index.sqlite") as con:
        con.execute("PRAGMA user_version = 99")
    with pytest.raises(Exception, match="schema version 99 is newer"):
        ResultStore(tmp_path)


def test_default_location_follows_harmoniad_store_then_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARMONIAD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HARMONIAD_STORE", raising=False)
    assert ResultStore().root == tmp_path / "cache" / "runs"
    monkeypatch.setenv("HARMONIAD_STORE", str(tmp_path / "elsewhere"))
    assert ResultStore().root == tmp_path / "elsewhere"
