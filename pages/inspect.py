"""Inspect page: one image with its ground truth, anomaly map and frequency-branch maps.

The selected image lives in ``state.selected_image()`` (a run-wide image index), so the
Failure cases page can open an image here. Only the shown image's maps are read, plus a
small fixed sample of the category's maps (once, cached) to pick the default pixel
threshold and a colour scale shared by the category.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import nav, state, thresholds
from harmoniad import charts
from harmoniad.data import DatasetError, read_image
from harmoniad.store import RunDataMissing, RunInfo, RunNotFound
from harmoniad.train.fusion import describe_fusion
from harmoniad.visualize import heatmap_rgb

#: Maps sampled per category for the default threshold and colour scale.
SAMPLE_DEFECTIVE = 16
SAMPLE_NORMAL = 8
#: (run id, image index, image path) of the image last shown, to keep the same file across runs.
SHOWN_KEY = nav.INSPECT_SHOWN_KEY
CATEGORY_KEY = "inspect_category"
IMAGE_KEY = "inspect_image"
FILTER_KEY = "inspect_filter"
FILTERS = {"all": "all images", "defective": "defective only", "normal": "normal only",
           "FP": "false alarms at the threshold", "FN": "missed defects at the threshold"}
ALL_DEFECTS = "all defect types"
BRANCHES = (
    ("anomaly", "Anomaly map", "the branch maps standardised and fused"),
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
    quantiles = {name: charts.score_quantiles([m[name] for m in maps if name in m]) for name in ranges}
    anomaly = np.stack([m["anomaly"] for m in maps])
    masks = np.stack([m.get("mask", np.zeros(m["anomaly"].shape, bool)) for m in maps])
    threshold = charts.f1_max_threshold(masks.ravel(), anomaly.ravel())
    n_def = int(masks.reshape(len(masks), -1).any(axis=1).sum())
    if threshold is not None:
        how = (f"oracle (uses test labels): the threshold that maximises pixel F1 against the ground truth "
               f"of {len(indices)} sampled images of this category ({n_def} with defects)")
    else:
        threshold = float(np.percentile(anomaly[np.isfinite(anomaly)], 99))
        how = "the 99th percentile of this category's sampled maps (no defect pixels to fit a pixel-F1 threshold)"
    return {"ranges": ranges, "quantiles": quantiles, "threshold": float(threshold), "how": how}


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


def _filtered(table: pd.DataFrame, category: str, how: str, defect: str = ALL_DEFECTS) -> pd.DataFrame:
    """The images in the current list: category, then label or outcome, then defect type."""
    rows = table[table["category"] == category]
    if how == "defective":
        rows = rows[rows["label"] == 1]
    elif how == "normal":
        rows = rows[rows["label"] == 0]
    elif how in ("FP", "FN"):
        rows = rows[rows["outcome"] == how]
    if defect != ALL_DEFECTS:
        rows = rows[rows["defect"] == defect]
    return rows


def _current_list(table: pd.DataFrame) -> pd.DataFrame:
    return _filtered(table, st.session_state[CATEGORY_KEY], st.session_state.get(FILTER_KEY, "all"),
                     st.session_state.get(DEFECT_WIDGET, ALL_DEFECTS))


def _on_category(table: pd.DataFrame) -> None:
    st.session_state[DEFECT_WIDGET] = ALL_DEFECTS
    st.session_state[nav.DEFECT_KEY] = None
    rows = _current_list(table)
    category = st.session_state[CATEGORY_KEY]
    state.select_image(int(rows["index"].iloc[0]) if len(rows) else _default_image(table, category))


def _on_filter(table: pd.DataFrame) -> None:
    defect = st.session_state.get(DEFECT_WIDGET, ALL_DEFECTS)
    st.session_state[nav.DEFECT_KEY] = None if defect == ALL_DEFECTS else (st.session_state[CATEGORY_KEY], defect)
    rows = _current_list(table)
    if len(rows) and state.selected_image() not in set(rows["index"]):
        state.select_image(int(rows["index"].iloc[0]))


def _on_image() -> None:
    state.select_image(st.session_state[IMAGE_KEY])


def _step(options: list[int], delta: int) -> None:
    current = state.selected_image()
    position = options.index(current) if current in options else 0
    state.select_image(options[(position + delta) % len(options)])


DEFECT_WIDGET = "inspect_defect"


def _apply_defect_filter(table: pd.DataFrame) -> None:
    """A defect type clicked on Overview/Compare (``nav.DEFECT_KEY``): show that category and defect."""
    chosen = st.session_state.get(nav.DEFECT_KEY)
    if not chosen:
        return
    category, defect = chosen
    rows = table[(table["category"] == category) & (table["defect"] == defect)]
    if rows.empty:
        return
    if st.session_state.get(DEFECT_WIDGET) != defect or state.selected_image() not in set(rows["index"]):
        st.session_state[DEFECT_WIDGET] = defect
        st.session_state[FILTER_KEY] = "all"
        state.select_image(int(rows["index"].iloc[0]))


def _choose_image(table: pd.DataFrame, selected: int) -> int:
    """Category, filter, defect type and image widgets, kept in sync with the app-wide selected image."""
    row = table.loc[selected]
    categories = list(dict.fromkeys(table["category"]))
    st.session_state[CATEGORY_KEY] = row["category"]
    how = st.session_state.get(FILTER_KEY, "all")
    if how not in FILTERS or len(_filtered(table, row["category"], how)[lambda r: r["index"] == selected]) == 0:
        st.session_state[FILTER_KEY] = "all"
    defects = [ALL_DEFECTS, *sorted(table.loc[table["category"] == row["category"], "defect"].unique())]
    if st.session_state.get(DEFECT_WIDGET) not in defects or (
            st.session_state.get(DEFECT_WIDGET) != ALL_DEFECTS and st.session_state[DEFECT_WIDGET] != row["defect"]):
        st.session_state[DEFECT_WIDGET] = ALL_DEFECTS
    c1, c2, c3 = st.columns(3, vertical_alignment="bottom")
    c4, c5, c6 = st.columns([6, 1, 1], vertical_alignment="bottom")
    category = c1.selectbox("Category", categories, key=CATEGORY_KEY, on_change=_on_category, args=(table,))
    how = c2.selectbox("Show", list(FILTERS), format_func=FILTERS.__getitem__, key=FILTER_KEY,
                       on_change=_on_filter, args=(table,))
    defect = c3.selectbox("Defect type", defects, key=DEFECT_WIDGET, on_change=_on_filter, args=(table,))
    rows = _filtered(table, category, how, defect)
    options = [int(i) for i in rows["index"]]
    if selected not in options:
        options = [selected, *options]
    names = {int(r.index): f"{charts.short_path(r.image_path)} · {r.defect} · score {r.score:.4g}"
             for r in table.loc[options, ["index", "image_path", "defect", "score"]].itertuples(index=False)}
    st.session_state[IMAGE_KEY] = selected
    c4.selectbox(f"Image ({len(rows)} in this list)", options, format_func=names.__getitem__, key=IMAGE_KEY,
                 on_change=_on_image)
    c5.button("Prev", key="inspect_prev", icon=":material/chevron_left:", on_click=_step, args=(options, -1),
              help="Previous image in the current list", width="stretch")
    c6.button("Next", key="inspect_next", icon=":material/chevron_right:", on_click=_step, args=(options, 1),
              help="Next image in the current list", width="stretch")
    return selected


def _with_outcomes(info: RunInfo, images: pd.DataFrame, rule: str, target_fpr: float) -> pd.DataFrame:
    """The run's images with ``outcome`` (TP/FP/FN/TN, or "" without a threshold) at the chosen rule."""
    out = images.copy()
    out["outcome"] = ""
    for category, rows in images.groupby("category", sort=False):
        dec = _decision(info, rows, str(category), rule, target_fpr)
        if dec.threshold is None:
            continue
        flags = dec.flags(rows["score"].to_numpy(dtype=float))
        out.loc[rows.index, "outcome"] = [thresholds.outcome(int(l), bool(f)) for l, f in zip(rows["label"], flags)]
    return out


# ----------------------------------------------------------------------------- display

SCALES = {
    "shared": "shared by all maps: percentile of the method's pixel scores in this category",
    "own": "per map: raw scores, each map's own range",
}
PER_ROW = {2: "2 per row", 3: "3 per row", 4: "4 per row"}


@dataclass(frozen=True)
class Panel:
    """One map to draw: whose it is, which map, its values and the range its colours span."""

    title: str
    values: np.ndarray  # what is coloured: percentiles (shared scale) or raw scores (per map)
    lo: float
    hi: float
    note: str
    raw: np.ndarray | None = None  # raw scores for hovering when ``values`` are percentiles


def _peers(info: RunInfo) -> list[RunInfo]:
    """The runs shown side by side: the newest complete run of each method on this run's dataset
    (the selected run stands in for its own method), in registry order."""
    runs = state.list_runs(status="complete")
    ids = charts.latest_runs(runs[runs["method"] != info.method], dataset=info.dataset)
    store = state.get_store()
    order = {name: i for i, name in enumerate(charts.METHOD_COLOURS)}
    peers = [info]
    for run_id in ids:
        try:
            peers.append(store.get_run(run_id))
        except RunNotFound:
            continue
    return sorted(peers, key=lambda p: order.get(p.method, len(order)))


def _peer_row(peer: RunInfo, path: str) -> tuple[pd.DataFrame, pd.Series] | None:
    """(the peer run's images of this category, the row of this image file) or None."""
    try:
        images = state.run_images(peer)
    except RunDataMissing:
        return None
    hit = images[images["image_path"] == path]
    if hit.empty:
        return None
    row = hit.iloc[0]
    return images[images["category"] == row["category"]], row


def _decision(peer: RunInfo, rows: pd.DataFrame, category: str, rule: str, target_fpr: float) -> thresholds.Decision:
    fitted = state.fitted_thresholds(peer).get(category)
    return thresholds.decision(rule, rows, fitted=fitted, target_fpr=target_fpr)


OUTCOME_TEXT = {"TP": ":green[defect caught]", "TN": ":green[normal, passed]", "FP": ":red[**false alarm**]",
                "FN": ":red[**missed defect**]"}


def _side_by_side(info: RunInfo, row: pd.Series, base: np.ndarray | None, rule: str, target_fpr: float) -> None:
    """Every stored method's anomaly map of this image (and HarmoniAD's branch maps) in a grid."""
    st.subheader("All methods on this image")
    peers = _peers(info)
    labels = {p.id: charts.method_label(p.method) for p in peers}
    c1, c2, c3, c4 = st.columns([3, 3, 2, 2], vertical_alignment="bottom")
    chosen = c1.multiselect("Methods", [p.id for p in peers], default=[p.id for p in peers],
                            format_func=labels.__getitem__, key="inspect_methods",
                            help="The newest complete run of each method on this dataset.")
    scale = c2.radio("Colour scale", list(SCALES), format_func=SCALES.__getitem__, key="inspect_scale",
                     help="Shared: every map on one 0-100 scale, the percentile of each pixel's score among the "
                          "method's pixel scores over this category, so methods that score in different units compare "
                          "and a normal image looks calm. Per map: raw scores stretched over each map's own range "
                          "(most contrast within one map).")
    opacity = c3.slider("Map opacity", 0.0, 1.0, 0.6, 0.05, key="inspect_opacity",
                        help="0 shows the image only, 1 the map only.")
    per_row = c4.selectbox("Layout", list(PER_ROW), format_func=PER_ROW.__getitem__, key="inspect_per_row")
    path = str(row["image_path"])
    panels: list[tuple[Panel, str]] = []
    summary = []
    mask: np.ndarray | None = None
    for peer in [p for p in peers if p.id in chosen]:
        found = _peer_row(peer, path)
        if found is None:
            summary.append({"Method": labels[peer.id], "Score": None, "Threshold": None, "Decision": "image not in this run"})
            continue
        rows, prow = found
        dec = _decision(peer, rows, str(prow["category"]), rule, target_fpr)
        flagged = bool(dec.flags([float(prow["score"])])[0])
        result = thresholds.outcome(int(prow["label"]), flagged) if dec.threshold is not None else None
        summary.append({"Method": labels[peer.id] + (" (random weights)" if peer.random_weights else ""),
                        "Score": float(prow["score"]), "Threshold": dec.threshold,
                        "Decision": ("anomalous" if flagged else "normal") if result else "no threshold",
                        "Outcome": result or "", "Threshold from": dec.how})
        try:
            maps = state.image_maps(peer, int(prow["index"]))
        except (RunDataMissing, IndexError):
            continue
        if mask is None and "mask" in maps:
            mask = maps["mask"]
        shared = scale == "shared" and "anomaly" in maps
        sample = _category_scale(peer.id, peer.updated, _sample(rows)) if shared else None
        verdict = OUTCOME_TEXT.get(result or "", "no threshold")
        for name, title, _ in BRANCHES:
            if name not in maps:
                continue
            raw = maps[name]
            heading = labels[peer.id] if name == "anomaly" else f"{labels[peer.id]}: {title.lower()}"
            note = (f"score {float(prow['score']):.4g} · {verdict}{_fusion_note(peer)}" if name == "anomaly"
                    else "frequency-branch map")
            if sample is not None and name in sample["quantiles"]:
                values = charts.to_percentiles(raw, sample["quantiles"][name])
                panels.append((Panel(heading, values, 0.0, 100.0, note, raw), peer.id))
            else:
                lo, hi = charts.map_range([raw])
                panels.append((Panel(heading, raw, lo, hi, note), peer.id))
    if not panels:
        st.info("No stored maps for this image in the chosen runs.")
    else:
        with st.container(key="inspect_maps"):
            for start in range(0, len(panels), per_row):
                columns = st.columns(per_row)
                for column, (panel, run_id) in zip(columns, panels[start:start + per_row]):
                    with column:
                        fig = charts.map_figure(panel.values, base=base, lo=panel.lo, hi=panel.hi, opacity=opacity,
                                                mask=mask, title=panel.title, raw=panel.raw,
                                                colourbar_title="percentile" if panel.raw is not None else "score")
                        st.plotly_chart(fig, key=f"inspect_map_{len([p for p in panels[:start]])}_{panel.title}",
                                        config={"displaylogo": False, "scrollZoom": True})
                        st.markdown(panel.note)
    st.caption("Maps use the inferno colour scale (dark = normal, bright = anomalous); the cyan line is the ground "
               "truth. Drag on a map to zoom, double-click to reset; hover for a pixel's raw score. "
               + ("Shared scale: 0-100 = the pixel's percentile among the method's pixel scores over this category "
                  "(from a fixed sample of its images). " if scale == "shared" else
                  "Per-map scale: each colour bar spans that map's own raw scores. ")
               + f"Decisions are at the operating point chosen above ({thresholds.RULES[rule]}).")
    table = pd.DataFrame(summary)
    st.dataframe(table, hide_index=True, width="stretch",
                 column_config={"Score": st.column_config.NumberColumn(format="%.4g"),
                                "Threshold": st.column_config.NumberColumn(format="%.4g")})


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
               caption="Predicted anomalous pixels (red) and ground truth (cyan outline)", width="stretch")
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


def _verdict(row: pd.Series, rows: pd.DataFrame, dec: thresholds.Decision) -> str:
    rank = int((rows["score"] > row["score"]).sum()) + 1
    text = (f"**{charts.short_path(row['image_path'])}** · {row['category']} · defect: {row['defect']} · "
            f"{'defective' if row['label'] == 1 else 'normal'} · score **{row['score']:.4g}** "
            f"(rank {rank} of {len(rows)} in this category, highest first)")
    if dec.threshold is None:
        return text + f" · no image threshold ({dec.how})"
    return (text + f" · at threshold {dec.threshold:.4g} ({thresholds.RULES[dec.rule]}): "
            + OUTCOME_TEXT[thresholds.outcome(int(row["label"]), bool(dec.flags([float(row["score"])])[0]))])


def _fusion_note(info: RunInfo) -> str:
    """How a HarmoniAD run's anomaly map and image score weigh its z-scored branch maps ('' for other runs)."""
    fusion = state.fusion_weights(info)
    if not fusion:
        return ""
    return "  \n" + describe_fusion(fusion["map"], fusion["score"], fusion.get("learning"))


def main() -> None:
    st.title("Inspect an image")
    st.caption("One test image with every method's anomaly map side by side, HarmoniAD's two frequency-branch "
               "maps, and each method's decision at the chosen operating point.")
    picked = state.pick_run_with_images("inspect_run")
    if picked is None:
        return
    info, images = picked
    rule, target_fpr = thresholds.rule_picker(key_suffix="_inspect")
    table = _with_outcomes(info, images, rule, target_fpr).set_index("index", drop=False)
    _apply_defect_filter(table)
    selected = _choose_image(table, _current_image(info, table))
    row = table.loc[selected]
    st.session_state[SHOWN_KEY] = (info.id, selected, str(row["image_path"]))
    rows = table[table["category"] == row["category"]]
    dec = _decision(info, rows, str(row["category"]), rule, target_fpr)
    st.markdown(_verdict(row, rows, dec))
    st.caption(f"Threshold: {dec.how}.")

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
        _side_by_side(info, row, base, rule, target_fpr)
        _threshold_section(info, str(row["category"]), maps, mask, base, scale)

    st.subheader("Score against the category")
    st.plotly_chart(charts.score_histogram(rows["score"].to_numpy(), rows["label"].to_numpy(),
                                           marked=float(row["score"]), threshold=dec.threshold,
                                           threshold_label=f"threshold ({dec.rule})"),
                    key="inspect_histogram")
    st.caption("Image scores of every test image in this category, normal (blue) and defective (red). The black "
               "line is this image; the dashed line is the chosen threshold.")


main()
