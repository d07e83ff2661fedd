"""AppTest tests of the analysis pages (Compare, Inspect, Failure cases) through dashboard/app.py.

Each page must render without an exception on an empty store, on the demo store and on a
run whose files were deleted, and the main interactions must work: pick a run, change the
category, move the threshold, open a failure case in Inspect.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from streamlit.testing.v1 import AppTest

from dashboard import nav
from harmoniad.store import ResultStore
from tests.paths import APP as _APP

APP = str(_APP)
PAGES = ("compare", "inspect", "failures")
BANNER = "Random backbone weights"
COUNTS = ("True positives", "False positives", "False negatives", "True negatives")


def _open(page: str, run_id: str | None = None) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    if run_id is not None:
        at.session_state[nav.RUN_KEY] = run_id
    at.run()
    at.switch_page(f"../pages/{page}.py").run()
    return at


def _no_exception(at: AppTest, page: str) -> None:
    assert not at.exception, f"{page}: {[e.message for e in at.exception]}"


def _run_ids(store: ResultStore) -> dict[str, str]:
    runs = store.list_runs(status="complete")
    return dict(zip(runs["method"], runs["id"]))


def _captions(at: AppTest) -> list[str]:
    return [c for image in at.get("image") for c in image.captions]


def _array(value: object) -> np.ndarray:
    """A plotly JSON array: a list, or plotly's typed-array form ``{"dtype", "bdata"}``."""
    if isinstance(value, dict):
        return np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
    return np.asarray(value, dtype=float)


def _chart(at: AppTest, key_part: str) -> dict:
    charts = [c for c in at.get("plotly_chart") if key_part in c.proto.id]
    assert charts, f"no plotly chart with id containing {key_part!r}"
    return json.loads(charts[0].proto.spec)


def test_pages_on_an_empty_store_point_to_the_run_page(empty_store: ResultStore) -> None:
    for page in PAGES:
        at = _open(page)
        _no_exception(at, page)
        assert not at.error, page
        assert any("Run" in info.value for info in at.info), f"{page}: no hint to the Run page"


def test_pages_on_the_demo_store(demo_store: ResultStore) -> None:
    ids = _run_ids(demo_store)
    for page in PAGES:
        at = _open(page, ids["harmoniad"])
        _no_exception(at, page)
        assert not at.error, f"{page}: {[e.value for e in at.error]}"
        assert any(BANNER in w.value for w in at.warning), f"{page}: no random-weights banner"

    at = _open("compare", ids["harmoniad"])
    assert [s.value for s in at.subheader] == [
        "Per-category metrics", "Per defect type", "ROC, precision-recall and PRO curves", "HarmoniAD minus baseline",
        "Statistics", "Ablations"]
    assert sorted(at.multiselect[0].value) == sorted(ids.values())  # newest run of each method
    names = {"HarmoniAD", "PatchCore", "Frequency filter"}
    for key in ("compare_roc", "compare_pixel_roc"):
        assert {t["name"].split(" (")[0] for t in _chart(at, key)["data"]} == {*names, "chance"}, key
    pro = _chart(at, "compare_pro")
    assert {t["name"].split(" (")[0] for t in pro["data"]} == names
    assert any(shape.get("x0") == 0.3 and shape.get("x1") == 0.3 for shape in pro["layout"]["shapes"])  # the limit
    assert all(max(_array(t["x"])) <= 0.3 * 1.15 + 1e-9 for t in pro["data"])
    intervals = _chart(at, "compare_intervals")
    assert all("error_y" in t for t in intervals["data"])
    assert _chart(at, "compare_cd")["layout"]["title"]["text"].startswith("Critical-difference diagram")

    at = _open("inspect", ids["harmoniad"])
    titles = _map_titles(at)
    assert titles == ["HarmoniAD", "HarmoniAD: high-frequency map", "HarmoniAD: low-frequency map", "PatchCore",
                      "Frequency filter"], titles
    assert "Predicted" in " | ".join(_captions(at))
    assert {m.label for m in at.metric} >= {*COUNTS, "IoU"}
    # HarmoniAD's anomaly map says how it weighs its branch maps, as the run recorded them
    fusion = demo_store.load_run_details(ids["harmoniad"])["fitted"]["fusion"]
    weights = " + ".join(f"{w:g} {n}" for w, n in zip(fusion["map"], ("high", "joint", "low")) if w)
    notes = [m.value for m in at.markdown if "anomaly map " in m.value]
    assert len(notes) == 1 and f"anomaly map {weights}" in notes[0], notes

    at = _open("failures", ids["harmoniad"])
    assert {m.label for m in at.metric} >= {"False positives", "False negatives", "Threshold"}
    assert [s.value.split(":")[0] for s in at.subheader] == ["False positives (false alarms)",
                                                              "False negatives (missed defects)"]


def _map_titles(at: AppTest) -> list[str]:
    """Titles of the side-by-side map figures on Inspect, in page order."""
    return [json.loads(c.proto.spec)["layout"]["title"]["text"] for c in at.get("plotly_chart")
            if "inspect_map_" in c.proto.id]


def test_compare_difference_matches_the_stored_metrics(demo_store: ResultStore) -> None:
    ids = _run_ids(demo_store)
    at = _open("compare", ids["harmoniad"])
    at.selectbox(key="compare_baseline").select(ids["patchcore"]).run()
    at.selectbox(key="compare_metric").select("pixel_auroc").run()
    _no_exception(at, "compare")
    h = demo_store.load_metrics(ids["harmoniad"]).set_index("category")["pixel_auroc"]
    p = demo_store.load_metrics(ids["patchcore"]).set_index("category")["pixel_auroc"]
    bars = _chart(at, "compare_diff")["data"][0]
    assert bars["x"] == [*h.index, "mean"]
    expected = ((h - p) * 100).to_numpy()
    np.testing.assert_allclose(_array(bars["y"])[:-1], expected, atol=1e-9)
    colours = bars["marker"]["color"]
    for value, colour in zip(expected, colours):
        assert colour == ("#2e7d32" if value > 0 else "#c62828" if value < 0 else "#9e9e9e")


def test_inspect_run_category_and_threshold(demo_store: ResultStore) -> None:
    ids = _run_ids(demo_store)
    at = _open("inspect", ids["patchcore"])
    _no_exception(at, "inspect")
    # Every method's map of the same image, whichever run is selected; branch maps only for HarmoniAD.
    assert len(_map_titles(at)) == 5 and "HarmoniAD: high-frequency map" in _map_titles(at)

    at.selectbox(key="inspect_run").select(ids["harmoniad"]).run()
    _no_exception(at, "inspect")
    assert at.session_state[nav.RUN_KEY] == ids["harmoniad"]

    category = at.selectbox(key="inspect_category")
    other = [c for c in category.options if c != category.value][0]
    category.select(other).run()
    _no_exception(at, "inspect")
    images = demo_store.load_images(ids["harmoniad"]).set_index("index")
    assert images.loc[at.selectbox(key="inspect_image").value, "category"] == other

    slider = next(s for s in at.slider if s.key.startswith("inspect_threshold"))
    slider.set_value(slider.min).run()
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Pixels flagged"] == "100.00%"
    total = sum(int(metrics[k].replace(",", "")) for k in COUNTS)
    assert total == 64 * 64
    assert metrics["True negatives"] == "0" and metrics["False negatives"] == "0"
    next(s for s in at.slider if s.key.startswith("inspect_threshold")).set_value(slider.max).run()
    assert {m.label: m.value for m in at.metric}["Pixels flagged"] != "100.00%"

    before = at.selectbox(key="inspect_image").value
    at.button(key="inspect_next").click().run()
    assert at.selectbox(key="inspect_image").value != before


def test_a_failure_case_opens_in_inspect(demo_store: ResultStore) -> None:
    ids = _run_ids(demo_store)
    at = _open("failures", ids["patchcore"])
    at.radio(key="threshold_rule_failures").set_value("target_fpr").run()
    at.number_input(key="threshold_target_fpr_failures").set_value(0.0).run()  # no normal image flagged
    category = at.selectbox(key="failures_category")
    for name in category.options:
        at.selectbox(key="failures_category").select(name).run()
        buttons = [b for b in at.button if b.key and b.key.startswith("failures_open_")]
        if buttons:
            break
    assert buttons, "no failure case in any category at FPR 0"
    target = buttons[-1]  # the last false negative: a defective image
    index = int(target.key.rsplit("_", 1)[1])
    target.click().run()
    _no_exception(at, "inspect")
    assert [t.value for t in at.title] == ["Inspect an image"]
    assert at.selectbox(key="inspect_image").value == index
    assert at.selectbox(key="inspect_run").value == ids["patchcore"]
    assert at.selectbox(key="inspect_category").value == name
    # The operating point chosen on Failure cases is the app-wide one: Inspect uses it too.
    assert at.radio(key="threshold_rule_inspect").value == "target_fpr"


@pytest.mark.parametrize("deleted", ["run folder", "maps"])
def test_pages_when_run_files_were_deleted(demo_store: ResultStore, deleted: str) -> None:
    ids = _run_ids(demo_store)
    folder = demo_store.root / ids["harmoniad"]
    shutil.rmtree(folder if deleted == "run folder" else folder / "maps")
    for page in PAGES:
        at = _open(page, ids["harmoniad"])
        _no_exception(at, page)
        errors = [e.value for e in at.error]
        if page == "compare" and deleted == "maps":
            assert not errors  # Compare never reads maps
        else:
            assert errors and all("Delete the run" in e for e in errors), f"{page}: {errors}"
    if deleted == "maps":  # scores are intact: Inspect still shows the histogram
        charts = _open("inspect", ids["harmoniad"]).get("plotly_chart")
        assert any(c.proto.id.endswith("inspect_histogram") for c in charts)


def _run_with_missing_images(store: ResultStore, folder: Path) -> str:
    """A small complete HarmoniAD-like run whose image files are then deleted."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    paths = []
    for i in range(4):
        paths.append(folder / f"{i}.png")
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(paths[-1])
    labels = np.array([0, 0, 1, 1])
    masks = np.zeros((4, 16, 16), dtype=bool)
    masks[2:, 4:8, 4:8] = True
    run_id = store.create_run(method="harmoniad", dataset="folder", root=str(folder), categories=["part"],
                              resolution=16, backbone={"model": "tiny", "weights": "random"})
    maps = {name: rng.random((4, 16, 16)).astype(np.float32) for name in ("anomaly", "high", "low")}
    images = pd.DataFrame({"image_path": [str(p) for p in paths], "label": labels, "score": [0.1, 0.6, 0.5, 0.9],
                           "defect": ["good", "good", "dent", "dent"]})
    store.add_category(run_id, "part", metrics={"image_auroc": 0.75}, images=images, maps=maps, masks=masks)
    store.finish_run(run_id)
    shutil.rmtree(folder)
    return run_id


def test_missing_image_files_still_show_the_maps(demo_store: ResultStore, tmp_path: Path) -> None:
    run_id = _run_with_missing_images(demo_store, tmp_path / "images")
    at = _open("inspect", run_id)
    _no_exception(at, "inspect")
    assert any("image file is missing" in w.value for w in at.warning)
    assert _map_titles(at)[:3] == ["HarmoniAD", "HarmoniAD: high-frequency map", "HarmoniAD: low-frequency map"]
    at = _open("failures", run_id)
    _no_exception(at, "failures")
    assert any("image file missing" in c.value for c in at.caption)


def test_a_chosen_defect_type_filters_failure_cases_and_inspect(demo_store: ResultStore) -> None:
    ids = _run_ids(demo_store)
    images = demo_store.load_images(ids["harmoniad"])
    defective = images[images["label"] == 1].iloc[-1]
    chosen = (str(defective["category"]), str(defective["defect"]))
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state[nav.RUN_KEY] = ids["harmoniad"]
    at.session_state[nav.DEFECT_KEY] = chosen  # what clicking a row of the per-defect table sets
    at.run()
    at.switch_page("../pages/failures.py").run()
    _no_exception(at, "failures")
    assert at.selectbox(key="failures_category").value == chosen[0]
    assert at.selectbox(key="failures_defect").value == chosen[1]
    assert all(chosen[1] in c.value for c in at.caption if c.value.startswith(f"{chosen[1]}/"))
    at.switch_page("../pages/inspect.py").run()
    _no_exception(at, "inspect")
    assert at.selectbox(key="inspect_defect").value == chosen[1]
    shown = images.set_index("index").loc[at.selectbox(key="inspect_image").value]
    assert (shown["category"], shown["defect"]) == chosen
    # The per-defect table on Compare and Overview sets that key when a row is clicked.
    at.switch_page("../pages/compare.py").run()
    assert any(d.proto.id.endswith("compare_defects") or "compare_defects" in d.proto.id for d in at.dataframe)
