"""Failure cases page: per category, the normal images scored highest and the defective ones lowest.

Those are the images a detector gets most wrong: false alarms and misses. Each opens in
Inspect with one click. Thumbnails read only the shown images (and their anomaly maps).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from dashboard import charts, nav, state
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


def _verdict(kind: str, failed: object) -> str:
    if pd.isna(failed):
        return ""
    if kind == "alarm":
        return ":red[**false alarm**]" if failed else ":green[passed (below threshold)]"
    return ":red[**missed**]" if failed else ":green[caught (at or above threshold)]"


def _gallery(info: RunInfo, rows: pd.DataFrame, kind: str, maps: dict[int, dict],
             scale: tuple[float, float] | None, with_map: bool) -> None:
    if rows.empty:
        st.info(f"No {'normal' if kind == 'alarm' else 'defective'} images in this category.")
        return
    for start in range(0, len(rows), PER_ROW):
        columns: list[DeltaGenerator] = st.columns(PER_ROW)
        for column, (_, row) in zip(columns, rows.iloc[start:start + PER_ROW].iterrows()):
            index = int(row["index"])
            picture, note = _picture(row, maps.get(index), scale, with_map)
            with column.container(border=True):
                if picture is not None:
                    st.image(picture, width="stretch")
                verdict = _verdict(kind, row["failed"])
                st.markdown(f"**#{int(row['rank'])}** · score **{row['score']:.4g}**"
                            + (f" · {verdict}" if verdict else ""))
                st.caption(f"{charts.short_path(row['image_path'])} · {row['defect']}"
                           + (f" · {note}" if note else ""))
                if st.button("Open in Inspect", key=f"failures_open_{index}", icon=":material/image_search:"):
                    _open_in_inspect(info, index)


def main() -> None:
    st.title("Failure cases")
    st.caption("Per category, the normal images the detector scores highest (false alarms) and the defective "
               "images it scores lowest (misses). Click one to inspect its maps.")
    picked = state.pick_run_with_images("failures_run")
    if picked is None:
        return
    info, images = picked
    categories = list(dict.fromkeys(images["category"]))
    c1, c2, c3 = st.columns([2, 2, 2], vertical_alignment="bottom")
    category = c1.selectbox("Category", categories, key="failures_category")
    k = c2.slider("Images per gallery", 2, 16, 8, step=2, key="failures_k")
    with_map = c3.toggle("Overlay the anomaly map", value=True, key="failures_map",
                         help="Shows where the detector looked; the green outline is the ground truth.")
    rows = images[images["category"] == category]
    threshold = charts.f1_max_threshold(rows["label"].to_numpy(), rows["score"].to_numpy())
    alarms, misses = charts.failure_cases(rows, k, threshold)
    n_normal = int((rows["label"] == 0).sum())
    n_defective = int((rows["label"] == 1).sum())
    if threshold is None:
        st.info("This category has only normal or only defective test images, so no image threshold can be fitted; "
                "the galleries are ranked by score only.")
    else:
        n_alarms = int((rows.loc[rows["label"] == 0, "score"] >= threshold).sum())
        n_misses = int((rows.loc[rows["label"] == 1, "score"] < threshold).sum())
        st.markdown(f"Image threshold **{threshold:.4g}**: the score that maximises image F1 on this category "
                    f"(the F1-max operating point). At it, **{n_alarms}** of {n_normal} normal images are false "
                    f"alarms and **{n_misses}** of {n_defective} defective images are missed.")
        st.caption("The threshold is fitted on the test images themselves, so it is the most favourable single "
                   "threshold; a deployed detector would do no better. Images on the correct side of it are "
                   "still listed, marked green: they are the closest calls.")
    maps: dict[int, dict] = {}
    scale = None
    if with_map:
        loaded = _maps(info, pd.concat([alarms, misses]))
        maps = {index: m for index, m in loaded.items() if m.get("anomaly") is not None}
        if loaded and not maps:
            st.warning("This run stored no anomaly maps, only image scores: there is nothing to overlay.")
        elif maps:
            scale = charts.map_range([m["anomaly"] for m in maps.values()])
            st.caption("Anomaly maps share one colour scale across both galleries (dark = normal, bright = "
                       "anomalous); the green outline is the ground truth.")
    st.subheader(f"False alarms: highest-scoring normal images ({len(alarms)} of {n_normal})")
    _gallery(info, alarms, "alarm", maps, scale, with_map)
    st.subheader(f"Misses: lowest-scoring defective images ({len(misses)} of {n_defective})")
    _gallery(info, misses, "miss", maps, scale, with_map)


main()
