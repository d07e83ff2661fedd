"""Failure cases page: the false positives and false negatives of a run at the chosen operating point.

The operating point is the app-wide threshold rule (:mod:`dashboard.thresholds`: fitted on
normal images by default, a target false-positive rate, or the oracle F1-max labelled as
such). Per category the page counts both kinds of error and lists them most wrong first (by
how far the score is on the wrong side of the threshold); each card opens in Inspect.
Thumbnails read only the shown images (and their anomaly maps).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from dashboard import nav, state, thresholds
from harmoniad import charts
from harmoniad.data import DatasetError, read_image
from harmoniad.store import RunDataMissing, RunInfo
from harmoniad.visualize import heatmap_rgb, overlay

THUMB = 160
PER_ROW = 4


@st.cache_data(show_spinner=False, max_entries=512)
def _thumbnail(path: str, size: int) -> np.ndarray:
    """The image at thumbnail size (raises DatasetError when it cannot be read)."""
    return charts.fit_image(read_image(path), size)


def _open_in_inspect(info: RunInfo, image_index: int) -> None:
    state.select_run(info.id)
    state.select_image(image_index)
    st.session_state.pop(nav.INSPECT_SHOWN_KEY, None)
    nav.switch_to(nav.INSPECT)


def _maps(info: RunInfo, rows: pd.DataFrame) -> dict[int, dict]:
    """Maps of the shown images only (cached per image); missing ones are left out.

    When the run's maps cannot be read at all, says so once and returns what was read.
    """
    out = {}
    for index in rows["index"]:
        try:
            out[int(index)] = state.image_maps(info, int(index))
        except IndexError:
            continue
        except RunDataMissing as exc:
            st.error(f"This run's maps cannot be read, so the thumbnails show the images only: {exc}. "
                     f"{state.MISSING_FILES_HELP}")
            break
    return out


def _picture(row: pd.Series, maps: dict | None, scale: tuple[float, float] | None,
             with_map: bool) -> tuple[np.ndarray | None, str]:
    """The thumbnail to show and a note saying what is missing (empty when nothing is)."""
    try:
        base = _thumbnail(str(row["image_path"]), THUMB)
    except DatasetError:
        base = None
    if base is not None and (not with_map or maps is None):
        return base, ""
    if not with_map:
        return None, "image file missing"
    if maps is None:
        return None, "image file and maps missing"
    lo, hi = scale or (None, None)
    values = charts.fit_map(maps["anomaly"], THUMB)
    picture = overlay(base, values, 0.5, lo, hi) if base is not None else heatmap_rgb(values, lo, hi)
    if "mask" in maps and maps["mask"].any():
        picture = charts.draw_outline(picture, charts.fit_map(maps["mask"].astype(np.float32), THUMB) > 0.5)
    return picture, "" if base is not None else "image file missing: anomaly map only"


def _gallery(info: RunInfo, rows: pd.DataFrame, kind: str, maps: dict[int, dict],
             scale: tuple[float, float] | None, with_map: bool) -> None:
    if rows.empty:
        st.success("None at this threshold.", icon=":material/check_circle:")
        return
    side = "above" if kind == "FP" else "at or below"
    for start in range(0, len(rows), PER_ROW):
        columns: list[DeltaGenerator] = st.columns(PER_ROW)
        for column, (_, row) in zip(columns, rows.iloc[start:start + PER_ROW].iterrows()):
            index = int(row["index"])
            picture, note = _picture(row, maps.get(index), scale, with_map)
            with column.container(border=True):
                if picture is not None:
                    st.image(picture, width="stretch")
                st.markdown(f"**#{int(row['rank'])}** · score **{row['score']:.4g}** · {row['margin']:.3g} {side} "
                            "the threshold")
                st.caption(f"{charts.short_path(row['image_path'])} · {row['defect']}"
                           + (f" · {note}" if note else ""))
                if st.button("Open in Inspect", key=f"failures_open_{index}", icon=":material/image_search:"):
                    _open_in_inspect(info, index)


ALL_DEFECTS = "all defect types"


def _defect_choice(rows: pd.DataFrame, category: str) -> str:
    """A defect-type filter, preset by a click on a defect type on Overview or Compare."""
    defects = [ALL_DEFECTS, *sorted(rows.loc[rows["label"] == 1, "defect"].unique())]
    chosen = st.session_state.get(nav.DEFECT_KEY)
    if chosen and chosen[0] == category and chosen[1] in defects:
        st.session_state["failures_defect"] = chosen[1]
    if st.session_state.get("failures_defect") not in defects:
        st.session_state["failures_defect"] = ALL_DEFECTS

    def keep() -> None:
        value = st.session_state["failures_defect"]
        st.session_state[nav.DEFECT_KEY] = None if value == ALL_DEFECTS else (category, value)

    return str(st.selectbox("Defect type", defects, key="failures_defect", on_change=keep,
                            help="Only false negatives have a defect type; false positives are normal images."))


def _on_category() -> None:
    st.session_state[nav.DEFECT_KEY] = None


def main() -> None:
    st.title("Failure cases")
    st.caption("The images a detector gets wrong at the chosen operating point: **false positives** (normal images "
               "flagged as defective, i.e. false alarms) and **false negatives** (defective images passed as normal, "
               "i.e. missed defects), most wrong first. Click one to inspect its maps.")
    picked = state.pick_run_with_images("failures_run")
    if picked is None:
        return
    info, images = picked
    rule, target_fpr = thresholds.rule_picker(key_suffix="_failures")
    categories = list(dict.fromkeys(images["category"]))
    chosen = st.session_state.get(nav.DEFECT_KEY)
    if chosen and chosen[0] in categories:
        st.session_state["failures_category"] = chosen[0]
    c1, c2, c3, c4 = st.columns(4, vertical_alignment="bottom")
    category = c1.selectbox("Category", categories, key="failures_category", on_change=_on_category)
    rows = images[images["category"] == category]
    with c2:
        defect = _defect_choice(rows, category)
    k = c3.slider("Cards per list", 2, 32, 8, step=2, key="failures_k")
    with_map = c4.toggle("Overlay the anomaly map", value=True, key="failures_map",
                         help="Shows where the detector looked; the cyan outline is the ground truth.")
    dec = thresholds.decision(rule, rows, fitted=state.fitted_thresholds(info).get(str(category)),
                              target_fpr=target_fpr)
    if dec.threshold is None:
        st.info(f"No image threshold for this category: {dec.how}.")
        return
    counts = thresholds.counts(rows, dec)
    fps, fns = charts.misclassified(rows, dec.threshold)
    if defect != ALL_DEFECTS:
        fns = fns[fns["defect"] == defect]
    n_normal, n_defective = counts["fp"] + counts["tn"], counts["tp"] + counts["fn"]
    with st.container(key="failures_counts"):
        m = st.columns(4)
        m[0].metric("False positives", f"{counts['fp']} of {n_normal}", help="Normal images flagged as defective.")
        m[1].metric("False negatives", f"{counts['fn']} of {n_defective}", help="Defective images passed as normal.")
        m[2].metric("Threshold", f"{dec.threshold:.4g}", help="An image is flagged when its score is above it.")
        rates = [counts["fpr"], counts["recall"]]
        m[3].metric("FPR / recall", " / ".join("n/a" if v is None else f"{v:.0%}" for v in rates))
    st.caption(f"Threshold {dec.threshold:.4g}: {dec.how}.")
    if dec.uses_test_labels:
        st.caption(":orange[This operating point was chosen with the test labels, so the error counts are "
                   "optimistic: a deployed detector would do no better.]")
    maps: dict[int, dict] = {}
    scale = None
    fps, fns = fps.head(k), fns.head(k)
    if with_map:
        loaded = _maps(info, pd.concat([fps, fns]))
        maps = {index: m for index, m in loaded.items() if m.get("anomaly") is not None}
        if loaded and not maps:
            st.warning("This run stored no anomaly maps, only image scores: there is nothing to overlay.")
        elif maps:
            scale = charts.map_range([m["anomaly"] for m in maps.values()])
            st.caption("Anomaly maps share one colour scale across both lists (dark = normal, bright = "
                       "anomalous); the cyan outline is the ground truth.")
    st.subheader(f"False positives (false alarms): {counts['fp']}, showing {len(fps)}")
    _gallery(info, fps, "FP", maps, scale, with_map)
    title = f"False negatives (missed defects): {counts['fn']}" + (f", {defect} only" if defect != ALL_DEFECTS else "")
    st.subheader(f"{title}, showing {len(fns)}")
    _gallery(info, fns, "FN", maps, scale, with_map)


main()
