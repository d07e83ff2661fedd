"""Shared dashboard state: the store, the selected run, cached loads and the honesty banner.

Every page imports this module instead of re-implementing these pieces. The selected run
lives in ``st.session_state`` and in the URL query (``?run=<id>``), so a link or a failure
case opens the same run and image in another page.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from dashboard import nav
from harmoniad.runtime.paths import store_dir
from harmoniad.store import ResultStore, RunDataMissing, RunInfo, RunNotFound

RUN_KEY = nav.RUN_KEY
IMAGE_KEY = nav.IMAGE_KEY
#: What to do when a run's files are gone (shown by every page that reads them).
MISSING_FILES_HELP = ("Its files were deleted or moved. Delete the run on the Overview page and evaluate again, "
                      "or restore the store folder.")


def store_path() -> Path:
    """The run store folder: ``$HARMONIAD_STORE`` or ``<cache>/runs``."""
    return store_dir()


@st.cache_resource(show_spinner=False)
def _store(path: str) -> ResultStore:
    return ResultStore(Path(path))


def get_store() -> ResultStore:
    """One ResultStore per store folder, shared by all sessions (it is safe to share)."""
    return _store(str(store_path()))


@st.cache_data(show_spinner=False, max_entries=64)
def load_metrics(path: str, run_id: str, updated: str) -> pd.DataFrame:
    """Per-category metrics of a run; ``updated`` keys the cache so a growing run reloads."""
    return _store(path).load_metrics(run_id)


@st.cache_data(show_spinner=False, max_entries=16)
def load_images(path: str, run_id: str, updated: str) -> pd.DataFrame:
    """Per-image table of a run, cached by run id and last update."""
    return _store(path).load_images(run_id)


@st.cache_data(show_spinner=False, max_entries=256)
def load_maps(path: str, run_id: str, image_index: int) -> dict:
    """One image's maps (loaded lazily, per image)."""
    return _store(path).load_maps(run_id, image_index)


def run_metrics(info: RunInfo) -> pd.DataFrame:
    return load_metrics(str(store_path()), info.id, info.updated)


def run_images(info: RunInfo) -> pd.DataFrame:
    return load_images(str(store_path()), info.id, info.updated)


def readable_run_images(info: RunInfo, label: str | None = None) -> pd.DataFrame | None:
    """The run's per-image table, or None after showing the standard error when its files are gone.

    ``label`` names the run in the message, for pages that show several runs at once.
    """
    try:
        return run_images(info)
    except RunDataMissing as exc:
        if label is None:
            st.error(f"This run's per-image results cannot be read: {exc}. {MISSING_FILES_HELP}")
        else:
            st.error(f"**{label}**: the per-image scores cannot be read ({exc}). {MISSING_FILES_HELP}")
        return None


def image_maps(info: RunInfo, image_index: int) -> dict:
    return load_maps(str(store_path()), info.id, int(image_index))


def list_runs(**filters: object) -> pd.DataFrame:
    """All runs, newest first (not cached: it is one fast SQLite query and must be fresh)."""
    return get_store().list_runs(**filters)  # type: ignore[arg-type]


def selected_run_id() -> str | None:
    """The run chosen anywhere in the app (session first, then the URL)."""
    run_id = st.session_state.get(RUN_KEY) or st.query_params.get(nav.RUN_QUERY)
    return str(run_id) if run_id else None


def select_run(run_id: str | None) -> None:
    st.session_state[RUN_KEY] = run_id
    if run_id:
        st.query_params[nav.RUN_QUERY] = run_id
    elif nav.RUN_QUERY in st.query_params:
        del st.query_params[nav.RUN_QUERY]


def select_image(image_index: int | None) -> None:
    """Remember an image (e.g. a clicked failure case) for the Inspect page."""
    st.session_state[IMAGE_KEY] = image_index


def selected_image() -> int | None:
    value = st.session_state.get(IMAGE_KEY)
    return None if value is None else int(value)


def run_label(row: pd.Series | RunInfo) -> str:
    """``harmoniad · synthetic · 2026-11-29 01:38 · complete`` for pickers."""
    get = row.get if isinstance(row, pd.Series) else lambda k, d=None: getattr(row, k, d)
    created = str(get("created", ""))[:16].replace("T", " ")
    flag = " · random weights" if get("random_weights", False) else ""
    status = get("status")
    if status == "running" and isinstance(row, pd.Series):
        status = f"running, {row.get('n_ok', 0)}/{len(row.get('categories', ()))} categories"
    return f"{get('method')} · {get('dataset')} · {created} · {status}{flag}"


def run_picker(
    label: str = "Run", *, status: str | tuple[str, ...] | None = ("complete", "running"), key: str = "run_picker"
) -> RunInfo | None:
    """A selectbox over stored runs that keeps the app-wide selection; None if there are none.

    Several pickers (the sidebar's, a page's) stay in step: each shows the app-wide run, and
    a change in any of them becomes the app-wide run (in a callback, before the next run of
    the script, so no other picker can overwrite it with its stale value). Runs that stored
    no category (e.g. failed at once, or just started) are left out: there is nothing to show
    for them; a running run appears with its first stored category (results as they land).
    """
    runs = list_runs(status=status) if status else list_runs()
    if not runs.empty:
        runs = runs[(runs["status"] == "complete") | (runs["n_ok"] > 0)]
    if runs.empty:
        from dashboard import jobs  # late: jobs imports the evaluation stack

        if jobs.board().running(store_path()):
            st.info("Work is running: its first results appear here as soon as a category is scored.",
                    icon=":material/hourglass_top:")
        else:
            st.info("No runs yet. Start one on the **Run** page (the synthetic demo needs no download).")
        return None
    ids = list(runs["id"])
    current = selected_run_id()
    if current not in ids:
        # Nothing chosen yet: the newest HarmoniAD run (the product), else the newest run.
        harmoniad = runs[runs["method"] == "harmoniad"]
        current = str(harmoniad["id"].iloc[0]) if len(harmoniad) else ids[0]
    if st.session_state.get(key) != current:
        st.session_state[key] = current
    labels = {row["id"]: run_label(row) for _, row in runs.iterrows()}
    run_id = st.selectbox(label, ids, format_func=labels.__getitem__, key=key,
                          on_change=lambda: select_run(st.session_state[key]))
    if run_id != selected_run_id():
        select_run(run_id)
    return get_store().get_run(run_id)


def pick_run_with_images(key: str) -> tuple[RunInfo, pd.DataFrame] | None:
    """The top of a page about one run's images: a run picker, the random-weights banner, its per-image table.

    None (after showing why: no runs, the run's files gone, or no stored images) when there is
    nothing to show, so the page just returns.
    """
    info = run_picker("Run", key=key)
    if info is None:
        nav.link(nav.RUN, "Go to the Run page")
        return None
    weights_banner(info)
    images = readable_run_images(info)
    if images is None:
        return None
    if images.empty:
        st.info("This run has no stored images (all its categories failed). Pick another run.")
        return None
    return info, images


def current_run() -> RunInfo | None:
    """The app-wide selected run, or None (nothing selected, or it was deleted meanwhile)."""
    run_id = selected_run_id()
    if not run_id:
        return None
    try:
        return get_store().get_run(run_id)
    except RunNotFound:
        return None


def weights_banner(infos: RunInfo | list[RunInfo] | pd.DataFrame) -> None:
    """Say plainly when results come from random backbone weights (they say nothing about a method)."""
    if isinstance(infos, RunInfo):
        random = infos.random_weights
    elif isinstance(infos, pd.DataFrame):
        random = bool(infos.get("random_weights", pd.Series(dtype=bool)).any())
    else:
        random = any(i.random_weights for i in infos)
    if random:
        st.warning(
            "**Random backbone weights.** These results come from an untrained CLIP backbone "
            "(offline demo or test setting). They check that the pipeline works; they say nothing "
            "about how well a method detects anomalies. Provide pretrained weights for real numbers.",
            icon=":material/warning:",
        )


@st.cache_data(show_spinner="Reading this category's maps...", max_entries=32)
def load_category_maps(path: str, run_id: str, updated: str, indices: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """(masks, anomaly maps) of the given images, stacked (for pixel curves); read straight from
    the store, not through the per-image cache, so a whole category does not crowd it out."""
    store = _store(path)
    maps = [store.load_maps(run_id, i) for i in indices]
    anomaly = np.stack([m["anomaly"] for m in maps])
    masks = np.stack([m.get("mask", np.zeros(m["anomaly"].shape, bool)) for m in maps])
    return masks, anomaly


def category_maps(info: RunInfo, indices: list[int]) -> tuple[np.ndarray, np.ndarray]:
    return load_category_maps(str(store_path()), info.id, info.updated, tuple(int(i) for i in indices))


def select_defect(category: str | None, defect: str | None) -> None:
    """Remember a defect type (clicked on Overview or Compare) for Failure cases and Inspect."""
    st.session_state[nav.DEFECT_KEY] = (category, defect) if category and defect else None


@st.cache_data(show_spinner=False, max_entries=64)
def load_thresholds(path: str, run_id: str, updated: str) -> pd.DataFrame:
    return _store(path).load_thresholds(run_id)


@st.cache_data(show_spinner=False, max_entries=64)
def load_run_details(path: str, run_id: str, updated: str) -> dict:
    return _store(path).load_run_details(run_id)


def fusion_weights(info: RunInfo) -> dict | None:
    """HarmoniAD's fusion weights for the run (``{"map", "score", "learning"}``), None for other methods."""
    fitted = load_run_details(str(store_path()), info.id, info.updated).get("fitted") or {}
    return fitted.get("fusion")


def fitted_thresholds(info: RunInfo) -> dict:
    """``category -> harmoniad.operating.Fitted``: the thresholds the run fitted on held-out normals."""
    from harmoniad.operating import fitted_thresholds as from_table

    return from_table(load_thresholds(str(store_path()), info.id, info.updated))


@st.cache_data(show_spinner=False, max_entries=64)
def load_defects(path: str, run_id: str, updated: str) -> pd.DataFrame:
    return _store(path).load_defects(run_id)


def run_defects(info: RunInfo) -> pd.DataFrame:
    """Per-defect-type results the evaluation stored (``ResultStore.load_defects``)."""
    return load_defects(str(store_path()), info.id, info.updated)


@st.cache_data(show_spinner=False, max_entries=64)
def load_intervals(path: str, run_id: str, updated: str) -> pd.DataFrame:
    return _store(path).load_intervals(run_id)


def run_intervals(info: RunInfo) -> pd.DataFrame:
    """Bootstrap intervals the evaluation stored (``ResultStore.load_intervals``)."""
    return load_intervals(str(store_path()), info.id, info.updated)


@st.cache_data(show_spinner="Running the paired tests...", max_entries=64)
def load_paired_test(path: str, run_a: str, updated_a: str, run_b: str, updated_b: str) -> pd.DataFrame:
    return _store(path).paired_test(run_a, run_b)


def paired_test(a: RunInfo, b: RunInfo) -> pd.DataFrame:
    """DeLong's test per category of two runs on the images they share (``ResultStore.paired_test``)."""
    return load_paired_test(str(store_path()), a.id, a.updated, b.id, b.updated)
