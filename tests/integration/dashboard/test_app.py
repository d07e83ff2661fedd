"""AppTest of the app shell (navigation, sidebar, first-start demo) and the Overview, Run and Export pages."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from dashboard import bootstrap, nav
from harmoniad.evaluate import EvalRequest
from harmoniad.runtime.progress import Progress, ProgressFn
from harmoniad.store import ResultStore
from tests.paths import APP as _APP

APP = _APP
MY_PAGES = ("run", "export")  # Overview is the default page


def _app() -> AppTest:
    return AppTest.from_file(str(APP), default_timeout=60)


def _page(at: AppTest, name: str) -> AppTest:
    return at.switch_page(f"../pages/{name}.py").run()


def _texts(elements: object) -> str:
    return "\n".join(str(e.value) for e in elements)  # type: ignore[attr-defined]


def _run_id(store: ResultStore, method: str) -> str:
    runs = store.list_runs(method=method, status="complete")
    return str(runs["id"].iloc[0])


def _wait_until(at: AppTest, done: Callable[[AppTest], bool], timeout_s: float = 90) -> AppTest:
    """Rerun the app (as the page's polling would) until ``done`` or the timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        at.run()
        if done(at):
            return at
        time.sleep(0.5)
    raise AssertionError(f"timed out; page shows: {_texts(at.markdown)} {_texts(at.error)} {_texts(at.success)}")


# ---------------------------------------------------------------------- empty store
def test_empty_store_pages_render_and_no_demo_starts(empty_store: ResultStore) -> None:
    at = _app().run()
    assert not at.exception
    assert "No runs in the results store yet" in _texts(at.info)
    assert any(b.label.startswith("Run the offline demo") for b in at.button)
    assert not at.get("progress"), "HARMONIAD_NO_DEMO is set: the demo must not start"
    assert str(empty_store.root) in _texts(at.sidebar.caption)
    for name in MY_PAGES:
        _page(at, name)
        assert not at.exception, name
    assert "No run selected" in _texts(at.info)
    assert empty_store.list_runs().empty


# ---------------------------------------------------------------------- demo store
def test_overview_lists_runs_leaderboard_and_published(demo_store: ResultStore) -> None:
    at = _app().run()
    assert not at.exception
    assert "Random backbone weights" in _texts(at.warning)
    runs, board, published = at.dataframe[0].value, at.dataframe[1].value, at.dataframe[-1].value
    assert len(runs) == 3 and runs["Random weights"].any()
    assert set(board["Method"]) == {"HarmoniAD", "PatchCore", "Frequency filter"}
    assert {"weave", "flange", "Mean"} <= set(board.columns)
    assert board[["weave", "flange", "Mean"]].stack().between(0, 100).all()  # percent
    assert set(published["Kind"]) == {"published"} and published["Source"].notna().all()
    assert "Nothing is published for the **synthetic** dataset" in _texts(at.info)

    at.multiselect(key="ov_f_method").set_value(["patchcore"]).run()
    assert len(at.dataframe[0].value) == 1 and "1 of 3 runs shown" in _texts(at.caption)
    at.selectbox(key="ov_metric").set_value("pixel_aupro").run()
    assert not at.exception and "Pixel AUPRO" in _texts(at.caption)


def test_published_numbers_sit_beside_measured_ones_on_the_same_benchmark(empty_store: ResultStore) -> None:
    _tiny_run(empty_store, dataset="mvtec")
    at = _app().run()
    assert not at.exception
    table = at.dataframe[-1].value
    measured = table[table["Kind"] == "measured here"]
    assert list(measured["Method"]) == ["Frequency filter"] and measured["Image AUROC"].iloc[0] == "100.0"
    assert measured["Source"].iloc[0].startswith("measured here, run ")
    published = table[table["Kind"] == "published"]
    assert len(published) > 5 and published["Source"].str.len().gt(0).all()
    assert "–" in set(published["Image AP"])  # not reported: a dash, never a number


def test_leaderboard_mean_matches_the_store(demo_store: ResultStore) -> None:
    at = _app().run()
    board = at.dataframe[1].value.set_index("Method")
    metrics = demo_store.load_metrics(_run_id(demo_store, "patchcore"))
    expected = metrics.loc[metrics["status"] == "ok", "image_auroc"].mean() * 100
    assert board.loc["PatchCore", "Mean"] == pytest.approx(expected)


def test_sidebar_selection_is_shared_by_every_picker(demo_store: ResultStore) -> None:
    at = _app().run()
    harmoniad = _run_id(demo_store, "harmoniad")
    assert at.selectbox(key="sidebar_run").value == harmoniad  # the default: the newest HarmoniAD run
    patchcore = _run_id(demo_store, "patchcore")
    at.selectbox(key="sidebar_run").set_value(patchcore).run()
    assert at.session_state[nav.RUN_KEY] == patchcore
    _page(at, "run")
    assert not at.exception
    assert at.selectbox(key="run_cached_picker").value == patchcore
    freq = _run_id(demo_store, "freqfilter")
    at.selectbox(key="run_cached_picker").set_value(freq).run()
    assert at.selectbox(key="sidebar_run").value == freq
    _page(at, "export")
    assert "Frequency filter" in _texts(at.markdown)


def test_export_offers_csv_and_chart(demo_store: ResultStore) -> None:
    at = _page(_app().run(), "export")
    assert not at.exception
    labels = [b.label for b in at.get("download_button")]
    assert labels[:3] == ["Per-category metrics (CSV)", "Per-image scores (CSV)", "Run record (JSON)"]
    assert "Download chart as HTML" in labels
    assert "kaleido" in _texts(at.info)
    at.radio(key="export_chart").set_value("ROC curve of one category").run()
    assert not at.exception and at.get("plotly_chart")


def test_deleted_run_files_give_a_clear_message(demo_store: ResultStore) -> None:
    run_id = _run_id(demo_store, "harmoniad")
    shutil.rmtree(demo_store.root / run_id)
    at = _app().run()
    assert not at.exception
    for name in MY_PAGES:
        _page(at, name)
        assert not at.exception, name
    assert "files are missing" in _texts(at.error)  # Export of the (default) HarmoniAD run
    assert at.get("download_button")[0].label == "Per-category metrics (CSV)"


def test_delete_a_run_needs_confirmation(demo_store: ResultStore) -> None:
    run_id = _run_id(demo_store, "patchcore")
    at = _app().run()
    at.selectbox(key="ov_delete_run").set_value(run_id).run()
    assert at.button(key="ov_delete_go").proto.disabled
    at.checkbox(key="ov_delete_sure").check().run()
    at.button(key="ov_delete_go").click().run()
    assert not at.exception
    assert "Deleted run" in _texts(at.success)
    assert run_id not in set(demo_store.list_runs()["id"])
    assert not (demo_store.root / run_id).exists()
    assert len(at.dataframe[0].value) == 2


# ---------------------------------------------------------------------- Run page
def test_run_page_shows_the_readers_error_for_a_bad_root(demo_store: ResultStore, tmp_path: Path) -> None:
    at = _page(_app().run(), "run")
    assert "Found 2 categories: flange, weave" in _texts(at.success)  # the synthetic default
    at.selectbox(key="run_dataset").set_value("mvtec").run()
    at.text_input(key="run_root_mvtec").input(str(tmp_path)).run()
    assert not at.exception
    assert f"{tmp_path}: no known mvtec layout" in _texts(at.error)
    assert at.button(key="run_start").proto.disabled
    synthetic_root = demo_store.root.parent / "datasets" / "synthetic"  # MVTec layout
    at.text_input(key="run_root_mvtec").input(str(synthetic_root)).run()
    assert "Found 2 categories" in _texts(at.success) and not at.error
    at.text_input(key="run_root_mvtec").input(str(tmp_path / "nope")).run()
    assert "does not exist" in _texts(at.error)


def test_run_page_starts_an_evaluation_and_selects_its_run(demo_store: ResultStore) -> None:
    before = set(demo_store.list_runs()["id"])
    at = _page(_app().run(), "run")
    at.multiselect(key="run_methods").set_value(["freqfilter"]).run()
    at.number_input(key="run_resolution").set_value(64).run()
    assert not at.button(key="run_start").proto.disabled
    at.button(key="run_start").click().run()
    assert not at.exception
    _wait_until(at, lambda a: "finished" in _texts(a.success))
    new = set(demo_store.list_runs()["id"]) - before
    assert len(new) == 1
    (run_id,) = new
    info = demo_store.get_run(run_id)
    assert info.complete and info.method == "freqfilter" and info.resolution == 64
    assert at.session_state[nav.RUN_KEY] == run_id


def test_run_page_cancel_stops_the_evaluation(demo_store: ResultStore) -> None:
    before = set(demo_store.list_runs()["id"])
    at = _page(_app().run(), "run")
    at.multiselect(key="run_methods").set_value(["harmoniad", "freqfilter"]).run()
    at.number_input(key="run_resolution").set_value(64).run()
    at.button(key="run_start").click().run()
    at.button(key="cancel-run").click().run()  # the Cancel button of the job's progress panel
    assert not at.exception
    _wait_until(at, lambda a: "was cancelled" in _texts(a.warning))
    new = demo_store.list_runs()
    new = new[~new["id"].isin(before)]
    assert list(new["method"]) == ["harmoniad"], "the evaluation went on after the cancel"
    assert (new["status"] == "failed").all()  # closed, never left 'running'
    assert at.button(key="run_start").proto.disabled is False


# ---------------------------------------------------------------------- first start
def _tiny_run(store: ResultStore, dataset: str = "synthetic") -> str:
    run_id = store.create_run(method="freqfilter", dataset=dataset, root="/x", categories=["a"], resolution=8)
    images = pd.DataFrame({"image_path": ["a.png", "b.png"], "label": [0, 1], "score": [0.2, 0.8]})
    store.add_category(run_id, "a", metrics={"image_auroc": 1.0}, images=images)
    store.finish_run(run_id)
    return run_id


def test_first_start_runs_the_demo_once(empty_store: ResultStore, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HARMONIAD_NO_DEMO")
    release, calls = threading.Event(), []

    def fake_demo(store: ResultStore, progress: ProgressFn) -> list[str]:
        calls.append(store.root)
        tracker = Progress("evaluate", 2, progress, min_interval_s=0)
        tracker.update()
        assert release.wait(60)
        run_id = _tiny_run(store)
        tracker.update()
        return [run_id]

    monkeypatch.setattr(bootstrap, "run_demo", fake_demo)
    monkeypatch.setattr(bootstrap, "ensure_synthetic", lambda progress=None: tmp_path)
    monkeypatch.setattr(bootstrap, "demo_request", lambda: EvalRequest(
        dataset="synthetic", root=str(tmp_path), methods=("freqfilter",), categories=("a",)))
    first = _app().run()
    assert not first.exception
    assert "First start: running the offline demo" in _texts(first.info)
    assert "The offline demo is running" in _texts(first.info)  # the Overview says so ...
    assert "No runs in the results store yet" not in _texts(first.info)  # ... not "no runs"
    assert first.get("progress")
    reload = _app().run()  # a page reload is a new session
    assert "First start" in _texts(reload.info)
    assert len(calls) == 1
    other = _tiny_run(empty_store, dataset="other")  # a run the user is looking at meanwhile
    first.session_state[nav.RUN_KEY] = other
    release.set()
    # The sidebar follows a finished run at the top of the script, the job panel reports it
    # further down: when the job ends between the two, the next rerun (the page's polling) follows.
    _wait_until(first, lambda a: "finished" in _texts(a.success) and a.session_state[nav.RUN_KEY] != other)
    runs = empty_store.list_runs()
    assert len(runs) == 2
    # The sidebar follows the run the demo just finished.
    demo_run = str(runs.loc[runs["id"] != other, "id"].iloc[0])
    assert first.session_state[nav.RUN_KEY] == demo_run
    assert first.selectbox(key="sidebar_run").value == demo_run
    empty_store.delete_run(other)
    assert (empty_store.root / bootstrap.MARKER).exists()
    empty_store.delete_run(str(empty_store.list_runs()["id"].iloc[0]))
    again = _app().run()  # the store is empty again, but the demo already ran: no restart
    assert not again.exception and "First start" not in _texts(again.info)
    assert len(calls) == 1


def test_a_running_run_shows_each_category_as_it_lands(empty_store: ResultStore) -> None:
    run_id = empty_store.create_run(method="freqfilter", dataset="synthetic", root="/x", categories=["a", "b"],
                                    resolution=8)
    images = pd.DataFrame({"image_path": ["a.png", "b.png"], "label": [0, 1], "score": [0.2, 0.8]})
    empty_store.add_category(run_id, "a", metrics={"image_auroc": 1.0}, images=images)  # "b" still to come
    at = _app().run()
    assert not at.exception
    board = at.dataframe[1].value
    assert list(board["Method"]) == ["Frequency filter (running)"] and board["a"].iloc[0] == 100.0
    assert "running, 1/2 categories" in at.selectbox(key="sidebar_run").format_func(run_id)
