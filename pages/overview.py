"""Overview page: every stored run, a leaderboard and the published numbers beside it.

The leaderboard takes the newest complete run of each method on one dataset and shows one
metric per category (and the mean) in percent. Published figures (``harmoniad.store.published``)
are shown in their own table, each row labelled "published" with its source, and beside the
measured means only for the same benchmark: numbers measured on the synthetic dataset are
never lined up against papers.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import bootstrap, defects, jobs, nav, state
from harmoniad import charts
from harmoniad.store.published import published_results, side_by_side
from harmoniad.store import METRIC_COLUMNS, RunNotFound, RunStateError

PUBLISHED_DATASETS = {"mvtec": "MVTec AD", "visa": "VisA", "btad": "BTAD"}
FLASH_KEY = "_overview_flash"


def _runs_table(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs as people read them (labels, counts, flags), newest first."""
    backbone = [
        "-" if not isinstance(b, dict) else f"{b.get('model')} ({b.get('weights')})" for b in runs["backbone"]
    ]
    return pd.DataFrame(
        {
            "Started": runs["created"].astype(str).str[:16].str.replace("T", " "),
            "Method": [charts.method_label(m) for m in runs["method"]],
            "Dataset": runs["dataset"],
            "Status": runs["status"],
            "Categories done": [
                f"{ok}/{len(c)}" + (f", {bad} failed" if bad else "")
                for ok, bad, c in zip(runs["n_ok"], runs["n_failed"], runs["categories"])
            ],
            "Random weights": runs["random_weights"],
            "Backbone": backbone,
            "Resolution": runs["resolution"],
            "Error": [(e or "").splitlines()[0][:160] if e else "" for e in runs["error"]],
            "Run id": runs["id"],
        }
    )


def _percent_text(value: float) -> str:
    return "–" if pd.isna(value) else f"{value * 100.0:.1f}"


def _fit_height(rows: int, *, most: int = 20) -> int | str:
    """A table height showing up to ``most`` rows without an inner scroll bar."""
    return 38 + 35 * rows if rows <= most else "auto"


def _runs_section(runs: pd.DataFrame) -> None:
    st.subheader("Runs")
    st.caption("Every evaluation stored in the results store. Click a row to make it the selected run.")
    c1, c2, c3, c4 = st.columns(4)
    datasets = c1.multiselect("Dataset", sorted(runs["dataset"].unique()), key="ov_f_dataset",
                              placeholder="all datasets")
    methods = c2.multiselect("Method", sorted(runs["method"].unique()), format_func=charts.method_label,
                             key="ov_f_method", placeholder="all methods")
    statuses = c3.multiselect("Status", ["complete", "running", "failed"], key="ov_f_status",
                              placeholder="any status")
    weights = c4.selectbox("Backbone weights", ["any", "pretrained only", "random only"], key="ov_f_weights")
    shown = runs
    if datasets:
        shown = shown[shown["dataset"].isin(datasets)]
    if methods:
        shown = shown[shown["method"].isin(methods)]
    if statuses:
        shown = shown[shown["status"].isin(statuses)]
    if weights != "any":
        shown = shown[shown["random_weights"] == (weights == "random only")]
    if shown.empty:
        st.info("No run matches these filters.")
        return
    ids = list(shown["id"])
    openable = set(shown.loc[(shown["status"] == "complete") | (shown["n_ok"] > 0), "id"])

    def on_pick() -> None:
        rows = st.session_state["ov_runs_table"].selection.rows
        if rows and ids[rows[0]] in openable:
            state.select_run(ids[rows[0]])
        elif rows:
            st.session_state[FLASH_KEY] = ("info", "That run stored no results, so it cannot be opened.")

    st.dataframe(
        _runs_table(shown),
        hide_index=True,
        width="stretch",
        on_select=on_pick,
        selection_mode="single-row",
        key="ov_runs_table",
        column_config={
            "Random weights": st.column_config.CheckboxColumn(
                help="Backbone with random weights: the numbers only show that the pipeline works."),
            "Categories done": st.column_config.TextColumn(help="Categories stored / categories asked."),
        },
    )
    st.caption(f"{len(shown)} of {len(runs)} runs shown.")


def _leaderboard(metrics: pd.DataFrame, metric: str, running: set[str] | frozenset[str] = frozenset()) -> pd.DataFrame:
    """Method x category table of ``metric`` in percent, plus the mean over stored categories
    (runs in ``running`` are marked: their mean covers the categories stored so far)."""
    ok = metrics[metrics["status"] == "ok"]
    rows = []
    for run_id, part in metrics.groupby("run_id", sort=False):
        good = ok[ok["run_id"] == run_id]
        first = part.iloc[0]
        row: dict[str, object] = {
            "Method": charts.method_label(str(first["method"])) + (" (running)" if run_id in running else ""),
            "Random weights": bool(first["random_weights"]),
        }
        for _, cat in part.iterrows():
            row[str(cat["category"])] = cat[metric] * 100.0 if cat["status"] == "ok" else float("nan")
        row["Mean"] = good[metric].mean() * 100.0 if len(good) else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def _leaderboard_section(runs: pd.DataFrame) -> str | None:
    """Draw the leaderboard; return the dataset it shows (None when there is nothing complete)."""
    st.subheader("Leaderboard")
    # Runs still going show the categories they have stored: results appear as they land.
    complete = runs[(runs["status"] == "complete") | ((runs["status"] == "running") & (runs["n_ok"] > 0))]
    if complete.empty:
        st.info("No results yet: the leaderboard fills in as each method finishes a category.")
        return None
    datasets = sorted(complete["dataset"].unique())
    selected = state.selected_run_id()
    match = complete[complete["id"] == selected]
    default = str(match["dataset"].iloc[0]) if len(match) else datasets[0]
    if st.session_state.get("ov_dataset") not in datasets:
        st.session_state["ov_dataset"] = default
    c1, c2 = st.columns([1, 2])
    dataset = c1.selectbox("Dataset", datasets, key="ov_dataset")
    metric = c2.selectbox("Metric", list(METRIC_COLUMNS), format_func=charts.METRIC_LABELS.__getitem__,
                          key="ov_metric")
    ids = charts.latest_runs(complete.assign(status="complete"), dataset=dataset)
    running = set(complete.loc[complete["status"] == "running", "id"])
    metrics = state.get_store().metrics_table(dataset=dataset, status=("complete", "running"))
    metrics = metrics[metrics["run_id"].isin(ids)]
    if metrics.empty:
        st.info(f"The complete runs on {dataset} stored no category.")
        return dataset
    order = {run_id: i for i, run_id in enumerate(ids)}
    metrics = metrics.assign(_o=metrics["run_id"].map(order)).sort_values("_o", kind="stable").drop(columns="_o")
    table = _leaderboard(metrics, metric, running)
    value_columns = [c for c in table.columns if c not in ("Method", "Random weights")]
    styled = table.style.format("{:.1f}", subset=value_columns, na_rep="–").highlight_max(
        subset=value_columns, axis=0, props="font-weight: bold; background-color: rgba(46, 125, 50, 0.15)"
    )
    st.dataframe(styled, hide_index=True, width="stretch",
                 column_config={"Random weights": st.column_config.CheckboxColumn()})
    st.caption(
        f"{charts.METRIC_HELP[metric]} Values in percent; each row is the newest complete run of a method on "
        f"**{dataset}**; **Mean** is over the categories it scored; None = undefined or failed; best per "
        "column highlighted."
    )
    return dataset


def _defects_section(runs: pd.DataFrame, dataset: str) -> None:
    st.subheader("Per defect type")
    st.caption(f"The leaderboard's runs on **{dataset}**, per defect type.")
    usable = runs[(runs["status"] == "complete") | (runs["n_ok"] > 0)].assign(status="complete")
    store = state.get_store()
    series = {}
    chosen = usable[usable["id"].isin(charts.latest_runs(usable, dataset=dataset))]
    labels = charts.series_labels(chosen)
    for run_id in charts.latest_runs(usable, dataset=dataset):
        try:
            info = store.get_run(run_id)
        except RunNotFound:
            continue
        images = state.readable_run_images(info, labels[run_id])
        if images is not None and len(images):
            series[labels[run_id]] = (info, images)
    if series:
        defects.section(series, charts.series_colours(chosen), key="overview")


def _measured_means(runs: pd.DataFrame, dataset: str) -> pd.DataFrame:
    board = state.get_store().leaderboard(dataset=dataset)
    board = board[board["run_id"].isin(charts.latest_runs(runs, dataset=dataset))]
    return board.assign(method=[charts.method_label(m) for m in board["method"]], setting="unified (this project)",
                        source=["measured here, run " + r + (" (random weights)" if rw else "")
                                for r, rw in zip(board["run_id"], board["random_weights"])])


def _published_section(runs: pd.DataFrame, dataset: str | None) -> None:
    st.subheader("Published results")
    st.caption(
        "Figures reported by papers and benchmark repositories, **not measured by this project**. "
        "Each row names its source."
    )
    if dataset in PUBLISHED_DATASETS:
        shown_ds = dataset
    else:
        if dataset is not None:
            st.info(
                f"Nothing is published for the **{dataset}** dataset, so no measured run is lined up against "
                "papers here. Choose a benchmark to see what papers report on it."
            )
        shown_ds = st.selectbox("Benchmark", list(PUBLISHED_DATASETS), format_func=PUBLISHED_DATASETS.__getitem__,
                                key="ov_published_ds")
    published = published_results(dataset=shown_ds)
    measured = _measured_means(runs, shown_ds) if dataset == shown_ds else published.iloc[:0].assign(kind="measured")
    both = side_by_side(measured[[c for c in published.columns if c in measured.columns]], published)
    table = pd.DataFrame(
        {
            "Kind": ["published" if k == "published" else "measured here" for k in both["kind"]],
            "Method": both["method"],
            "Setting": both["setting"],
            "Backbone": both["backbone"].fillna(""),
            "Resolution": both["resolution"],
            # Text, not numbers: st.dataframe shows missing numbers as "None", which reads as a value.
            **{charts.METRIC_LABELS[m]: [_percent_text(v) for v in both[m].astype("float64")] for m in METRIC_COLUMNS},
            "Source": both["source"],
        }
    )

    def shade(row: pd.Series) -> list[str]:
        style = ("color: #616161; background-color: #eeeeee; font-style: italic" if row["Kind"] == "published"
                 else "font-weight: bold; background-color: #e3f2fd")
        return [style] * len(row)

    styled = table.style.apply(shade, axis=1)
    st.dataframe(styled, hide_index=True, width="stretch", height=_fit_height(len(table)))
    measured_note = (
        " Measured rows (bold, blue, Kind = measured here) are the mean over categories of this project's newest run of each method."
        if len(measured) else ""
    )
    st.caption(f"{PUBLISHED_DATASETS[shown_ds]}: {len(published)} published rows (grey, italic, Kind = published), "
               f"in percent; – = not reported.{measured_note}")


def _delete_section(runs: pd.DataFrame) -> None:
    with st.expander("Delete a run", icon=":material/delete:"):
        st.caption("Removes the run from the index and deletes its files. This cannot be undone.")
        labels = {row["id"]: state.run_label(row) for _, row in runs.iterrows()}
        run_id = st.selectbox("Run to delete", list(labels), format_func=labels.__getitem__, key="ov_delete_run")
        sure = st.checkbox("Yes, delete this run and its files", key="ov_delete_sure")
        st.button("Delete run", type="primary", disabled=not sure, key="ov_delete_go", icon=":material/delete:",
                  on_click=_delete, args=(run_id, labels[run_id]))


def _delete(run_id: str, label: str) -> None:
    """Button callback: delete, then report on the next script run (and untick the confirmation)."""
    st.session_state["ov_delete_sure"] = False
    try:
        state.get_store().delete_run(run_id)
    except RunStateError as exc:
        st.session_state[FLASH_KEY] = ("error", f"Not deleted: {exc}. Cancel it first (Run page) or let it finish.")
        return
    except RunNotFound:
        pass  # deleted meanwhile (another tab): the goal is reached
    if state.selected_run_id() == run_id:
        state.select_run(None)
    st.session_state[FLASH_KEY] = ("success", f"Deleted run {label}.")


def main() -> None:
    st.title("Overview")
    st.caption("All evaluation runs, a method x category leaderboard, and published numbers for reference.")
    flash = st.session_state.pop(FLASH_KEY, None)
    if flash:
        kind, text = flash
        getattr(st, kind)(text)
    runs = state.list_runs()
    demo = jobs.board().get(bootstrap.demo_job_id(state.store_path()))
    if demo is not None and demo.running:
        st.info("**The offline demo is running.** Each method's results appear below as soon as its first category "
                "is scored; the fastest methods go first.", icon=":material/hourglass_top:")
    if runs.empty:
        if jobs.board().running(state.store_path()):
            if demo is None or not demo.running:
                st.info("An evaluation is running: results appear here as soon as the first category is stored.",
                        icon=":material/hourglass_top:")
            return
        st.info("No runs in the results store yet. Start an evaluation on the **Run** page, or run the offline "
                "demo (synthetic data, tiny random-weights backbone, no download).")
        bootstrap.demo_button(state.get_store(), key="ov_demo")
        nav.link(nav.RUN, "Go to the Run page")
        return
    state.weights_banner(runs[(runs["status"] == "complete") | (runs["n_ok"] > 0)])
    _runs_section(runs)
    dataset = _leaderboard_section(runs)
    if dataset is not None:
        _defects_section(runs, dataset)
    _published_section(runs, dataset)
    _delete_section(runs)


main()
