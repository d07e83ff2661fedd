"""Inspect page: one image with its ground truth, anomaly map and frequency-branch maps.

The selected image lives in ``state.selected_image()`` (a run-wide image index), so the
Failure cases page can open an image here. Only the shown image's maps are read, plus a
small fixed sample of the category's maps (once, cached) to pick the default pixel
threshold and a colour scale shared by the category.
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

#: Maps sampled per category for the default threshold and colour scale.
SAMPLE_DEFECTIVE = 16
SAMPLE_NORMAL = 8
#: (run id, image index, image path) of the image last shown, to keep the same file across runs.
SHOWN_KEY = nav.INSPECT_SHOWN_KEY
CATEGORY_KEY = "inspect_category"
IMAGE_KEY = "inspect_image"
FILTER_KEY = "inspect_filter"
FILTERS = {"all": "all images", "defective": "defective only", "normal": "normal only"}
BRANCHES = (
    ("anomaly", "Anomaly map", "the fused map the image score comes from"),
    ("high", "High-frequency map", "reconstruction error in the fine-structure band (FSAM branch)"),
    ("low", "Low-frequency map", "reconstruction error in the smooth, global band (GSCM branch)"),
)


@st.cache_data(show_spinner=False, max_entries=128)
def _image_at(path: str, size: int) -> np.ndarray:
    """The source image at the maps' resolution (raises DatasetError when it cannot be read)."""
    return charts.fit_image(read_image(path), size)


def _sample(rows: pd.DataFrame) -> tuple[int, ...]:
    """Evenly spaced defective and normal images of one category (deterministic)."""

    def spaced(values: np.ndarray, k: int) -> list[int]:
        if not len(values):
            return []
        picks = np.linspace(0, len(values) - 1, min(k, len(values))).round().astype(int)
        return [int(values[i]) for i in np.unique(picks)]

    defective = rows.loc[rows["label"] == 1, "index"].to_numpy()
    normal = rows.loc[rows["label"] == 0, "index"].to_numpy()
    return tuple(sorted(spaced(defective, SAMPLE_DEFECTIVE) + spaced(normal, SAMPLE_NORMAL)))


@st.cache_data(show_spinner="Reading a sample of this category's maps...", max_entries=64)
def _category_scale(run_id: str, updated: str, indices: tuple[int, ...]) -> dict:
    """Default pixel threshold and per-map colour ranges of a category, from sampled maps.

    The sample is read straight from the store, not through the per-image map cache: this
    result is cached already, and the sample would only crowd out the images people view.
    """
    store = state.get_store()
    maps = [store.load_maps(run_id, i) for i in indices]
    ranges = {name: charts.map_range([m[name] for m in maps if name in m]) for name, _, _ in BRANCHES
              if any(name in m for m in maps)}
    anomaly = np.stack([m["anomaly"] for m in maps])
    masks = np.stack([m.get("mask", np.zeros(m["anomaly"].shape, bool)) for m in maps])
    threshold = charts.f1_max_threshold(masks.ravel(), anomaly.ravel())
    n_def = int(masks.reshape(len(masks), -1).any(axis=1).sum())
    if threshold is not None:
        how = (f"the threshold that maximises pixel F1 over {len(indices)} sampled images of this category "
               f"({n_def} with defects)")
    else:
        threshold = float(np.percentile(anomaly[np.isfinite(anomaly)], 99))
        how = "the 99th percentile of this category's sampled maps (no defect pixels to fit a pixel-F1 threshold)"
    return {"ranges": ranges, "threshold": float(threshold), "how": how}


# ----------------------------------------------------------------------------- selection


def _default_image(table: pd.DataFrame, category: str | None = None) -> int:
    rows = table if category is None else table[table["category"] == category]
    defective = rows[rows["label"] == 1]
    return int((defective if len(defective) else rows)["index"].iloc[0])


def _current_image(info: RunInfo, table: pd.DataFrame) -> int:
    """The image to show: the selected one, the same file after a run change, or a default."""
    selected = state.selected_image()
    shown = st.session_state.get(SHOWN_KEY)
    if shown and shown[0] != info.id and selected == shown[1]:
        # The run changed on this page: keep looking at the same file if this run has it.
        same = table.index[table["image_path"] == shown[2]]
        if len(same):
            selected = int(same[0])
    if selected is None or selected not in table.index:
        selected = _default_image(table)
    state.select_image(selected)
    return selected


def _filtered(table: pd.DataFrame, category: str, how: str) -> pd.DataFrame:
    rows = table[table["category"] == category]
    if how == "defective":
        rows = rows[rows["label"] == 1]
    elif how == "normal":
        rows = rows[rows["label"] == 0]
    return rows


def _on_category(table: pd.DataFrame) -> None:
    category = st.session_state[CATEGORY_KEY]
    rows = _filtered(table, category, st.session_state.get(FILTER_KEY, "all"))
    state.select_image(int(rows["index"].iloc[0]) if len(rows) else _default_image(table, category))


def _on_filter(table: pd.DataFrame) -> None:
    rows = _filtered(table, st.session_state[CATEGORY_KEY], st.session_state[FILTER_KEY])
    if len(rows) and state.selected_image() not in set(rows["index"]):
        state.select_image(int(rows["index"].iloc[0]))


def _on_image() -> None:
    state.select_image(st.session_state[IMAGE_KEY])


def _step(options: list[int], delta: int) -> None:
    current = state.selected_image()
    position = options.index(current) if current in options else 0
    state.select_image(options[(position + delta) % len(options)])


def _choose_image(table: pd.DataFrame, selected: int) -> int:
    """Category, filter and image widgets, kept in sync with the app-wide selected image."""
    row = table.loc[selected]
    categories = list(dict.fromkeys(table["category"]))
    st.session_state[CATEGORY_KEY] = row["category"]
    if FILTER_KEY not in st.session_state or (
        st.session_state[FILTER_KEY] != "all" and (row["label"] == 1) != (st.session_state[FILTER_KEY] == "defective")
    ):
        st.session_state[FILTER_KEY] = "all"
    c1, c2, c3, c4 = st.columns([2, 2, 5, 1], vertical_alignment="bottom")
    category = c1.selectbox("Category", categories, key=CATEGORY_KEY, on_change=_on_category, args=(table,))
    how = c2.selectbox("Show", list(FILTERS), format_func=FILTERS.__getitem__, key=FILTER_KEY,
                       on_change=_on_filter, args=(table,))
    rows = _filtered(table, category, how)
    options = [int(i) for i in rows["index"]]
    names = {int(r.index): f"{charts.short_path(r.image_path)} · score {r.score:.4g}"
             for r in rows[["index", "image_path", "defect", "score"]].itertuples(index=False)}
    st.session_state[IMAGE_KEY] = selected
    c3.selectbox(f"Image ({len(options)} in this list)", options, format_func=names.__getitem__, key=IMAGE_KEY,
                 on_change=_on_image)
    with c4:
        b1, b2 = st.columns(2)
        b1.button("◀", key="inspect_prev", on_click=_step, args=(options, -1), help="Previous image in the list")
        b2.button("▶", key="inspect_next", on_click=_step, args=(options, 1), help="Next image in the list")
    return selected


# ----------------------------------------------------------------------------- display


def _verdict(row: pd.Series, rows: pd.DataFrame, threshold: float | None) -> str:
    rank = int((rows["score"] > row["score"]).sum()) + 1
    text = (f"**{charts.short_path(row['image_path'])}** · {row['category']} · defect: {row['defect']} · "
            f"{'defective' if row['label'] == 1 else 'normal'} · score **{row['score']:.4g}** "
            f"(rank {rank} of {len(rows)} in this category, highest first)")
    if threshold is None:
        return text
    flagged = row["score"] >= threshold
    outcomes = {(True, True): ":green[correct (flagged)]", (False, False): ":green[correct (passed)]",
                (False, True): ":red[**false alarm**]", (True, False): ":red[**miss**]"}
    outcome = outcomes[(bool(row["label"] == 1), bool(flagged))]
    return text + f" · at the category's F1-max image threshold {threshold:.4g}: {outcome}"


def _panel(column: DeltaGenerator, picture: np.ndarray, caption: str) -> None:
    column.image(picture, caption=caption, width="stretch")


def _maps_section(info: RunInfo, maps: dict, mask: np.ndarray, base: np.ndarray | None, scale: dict) -> None:
    c1, c2, c3 = st.columns([2, 2, 3], vertical_alignment="bottom")
    opacity = c1.slider("Map opacity", 0.0, 1.0, 0.5, 0.05, key="inspect_opacity",
                        help="0 shows the image only, 1 the map only.")
    own_range = c2.toggle("Scale each map to its own range", key="inspect_own_range",
                          help="Off: one colour scale per category, so a normal image looks calm. "
                               "On: maximum contrast within this image.")
    outline = c3.toggle("Outline the ground truth on the maps", value=True, key="inspect_outline")
    canvas = base if base is not None else np.full((*mask.shape, 3), 40, dtype=np.uint8)
    columns = st.columns(2 + len(BRANCHES))
    _panel(columns[0], canvas, "Image" if base is not None else "Image file missing")
    _panel(columns[1], charts.draw_outline(canvas, mask), "Ground truth (green outline)"
           + ("" if mask.any() else ": no defect"))
    for column, (name, title, what) in zip(columns[2:], BRANCHES):
        if name not in maps:
            column.markdown(f"**{title}**")
            column.info(f"Not stored for this run: {charts.method_label(info.method)} has no "
                        f"{'frequency branches' if name != 'anomaly' else 'anomaly map'}"
                        f"{'' if name == 'anomaly' else ' (only HarmoniAD and its branch ablations do)'}.")
            continue
        lo, hi = (None, None) if own_range else scale["ranges"].get(name, (None, None))
        values = maps[name]
        picture = overlay(base, values, opacity, lo, hi) if base is not None else heatmap_rgb(values, lo, hi)
        if outline:
            picture = charts.draw_outline(picture, mask)
        _panel(column, picture, f"{title}: {what}")
    st.caption("Maps use the inferno colour scale (dark = normal, bright = anomalous), at the run's "
               f"{info.resolution}x{info.resolution} evaluation resolution.")


def _threshold_section(info: RunInfo, category: str, maps: dict, mask: np.ndarray, base: np.ndarray | None,
                       scale: dict) -> None:
    st.subheader("Threshold")
    anomaly = maps["anomaly"]
    # One fixed range per category (a slider whose bounds move would reset): the sampled maps' range.
    lo, hi = scale["ranges"]["anomaly"]
    key = f"inspect_threshold_{info.id}_{category}"
    if key not in st.session_state:
        st.session_state[key] = float(min(max(scale["threshold"], lo), hi))
    threshold = st.slider("Pixel threshold on the anomaly map", float(lo), float(hi), step=float((hi - lo) / 200),
                          format="%.4g", key=key, help="Pixels at or above it are predicted anomalous.")
    st.caption(f"Default: {scale['threshold']:.4g}, {scale['how']}.")
    predicted = anomaly >= threshold
    counts = charts.confusion_counts(mask, predicted)
    canvas = base if base is not None else heatmap_rgb(anomaly)
    left, right = st.columns([1, 2])
    left.image(charts.draw_outline(charts.paint_mask(canvas, predicted), mask),
               caption="Predicted anomalous pixels (red) and ground truth (green outline)", width="stretch")
    with right:
        cols = st.columns(3)
        cols[0].metric("True positives", f"{counts['tp']:,}", help="Defect pixels predicted anomalous.")
        cols[1].metric("False positives", f"{counts['fp']:,}", help="Normal pixels predicted anomalous.")
        cols[2].metric("False negatives", f"{counts['fn']:,}", help="Defect pixels missed.")
        cols = st.columns(3)
        cols[0].metric("True negatives", f"{counts['tn']:,}", help="Normal pixels predicted normal.")
        cols[1].metric("IoU", "n/a" if np.isnan(counts["iou"]) else f"{counts['iou'] * 100:.1f}%",
                       help="Overlap of prediction and ground truth: TP / (TP + FP + FN).")
        cols[2].metric("Pixels flagged", f"{predicted.mean() * 100:.2f}%")
        st.caption(f"Pixel counts at {anomaly.shape[0]}x{anomaly.shape[1]}. IoU is n/a when neither the "
                   "ground truth nor the prediction has any anomalous pixel (a correct normal image).")


def main() -> None:
    st.title("Inspect an image")
    st.caption("One test image with its ground truth, anomaly map and the two frequency-branch maps.")
    picked = state.pick_run_with_images("inspect_run")
    if picked is None:
        return
    info, images = picked
    table = images.set_index("index", drop=False)
    selected = _choose_image(table, _current_image(info, table))
    row = table.loc[selected]
    st.session_state[SHOWN_KEY] = (info.id, selected, str(row["image_path"]))
    rows = table[table["category"] == row["category"]]
    image_threshold = charts.f1_max_threshold(rows["label"].to_numpy(), rows["score"].to_numpy())
    st.markdown(_verdict(row, rows, image_threshold))

    base = None
    try:
        base = _image_at(str(row["image_path"]), info.resolution)
    except DatasetError as exc:
        st.warning(f"The image file is missing or unreadable, so the maps are shown without it: {exc}")
    maps: dict | None = None
    try:
        maps = state.image_maps(info, selected)
        if "anomaly" not in maps:
            st.warning("This run stored no anomaly maps, only image scores: there is nothing to overlay.")
            maps = None
        else:
            scale = _category_scale(info.id, info.updated, _sample(rows))
    except RunDataMissing as exc:
        st.error(f"This run's maps cannot be read: {exc}. {state.MISSING_FILES_HELP}")
        maps = None
    if maps is not None:
        mask = maps.get("mask")
        if mask is None:
            mask = np.zeros(maps["anomaly"].shape, dtype=bool)
        _maps_section(info, maps, mask, base, scale)
        _threshold_section(info, str(row["category"]), maps, mask, base, scale)

    st.subheader("Score against the category")
    st.plotly_chart(charts.score_histogram(rows["score"].to_numpy(), rows["label"].to_numpy(),
                                           marked=float(row["score"]), threshold=image_threshold),
                    key="inspect_histogram")
    st.caption("Image scores of every test image in this category, normal (blue) and defective (red). The black "
               "line is this image; the dashed line is the threshold that maximises image F1.")


main()
