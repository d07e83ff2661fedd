"""Export page: the selected run's per-category metrics and per-image scores as CSV, and a chart.

The CSV files are exactly what ``ResultStore.export_csv`` (and so the CLI) writes. Charts are
plotly figures: the chart's own toolbar saves a PNG in the browser (no server-side renderer
needed); a standalone HTML file (interactive, works offline) is offered too. Server-side PNG
needs the optional ``kaleido`` package and is used only when it is installed.
"""

from __future__ import annotations

import importlib.util
import tempfile

import plotly.graph_objects as go
import streamlit as st

from dashboard import nav, state
from harmoniad import charts
from harmoniad.report import render_report
from harmoniad.store.export import WEIGHTS_COLUMN, weights_statement
from harmoniad.store import METRIC_COLUMNS, RunDataMissing, RunInfo


@st.cache_data(show_spinner=False, max_entries=16)
def _export_files(store_path: str, run_id: str, updated: str) -> dict[str, bytes]:
    """``{"metrics", "images", "run"} -> bytes`` as ``export_csv`` writes them (cached per run update)."""
    with tempfile.TemporaryDirectory(prefix="harmoniad-export-") as tmp:
        metrics, images, run = state.get_store().export_csv(run_id, tmp)
        return {"metrics": metrics.read_bytes(), "images": images.read_bytes(), "run": run.read_bytes()}


@st.cache_data(show_spinner="Writing the report...", max_entries=8)
def _report(store_path: str, run_ids: tuple[str, ...], updated: tuple[str, ...]) -> bytes:
    """The HTML report of ``run_ids`` (cached per run update), as ``harmoniad runs export --format html`` writes it."""
    return render_report(state.get_store(), list(run_ids)).encode()


def _report_section(info: RunInfo) -> None:
    st.subheader("Report")
    st.caption("One self-contained HTML file (works offline): runs and their weights, per-category metrics, charts, "
               "bootstrap intervals, per-defect results, paired tests, and the worst false positives and false "
               "negatives with their maps. The same file as `python -m harmoniad runs export RUN_ID --format html`.")
    runs = state.list_runs(status="complete")
    peers = charts.latest_runs(runs[runs["method"] != info.method], dataset=info.dataset)
    labels = charts.series_labels(runs[runs["id"].isin([info.id, *peers])])
    scope = st.radio("Report on", ["this run", "comparison"], horizontal=True, key="export_report_scope",
                     format_func=lambda k: "this run" if k == "this run" else
                     f"this run and the newest run of every other method on {info.dataset} ({len(peers)} more)")
    ids = (info.id,) if scope == "this run" else (info.id, *peers)
    store = state.get_store()
    try:
        data = _report(str(state.store_path()), ids, tuple(store.get_run(r).updated for r in ids))
    except RunDataMissing as exc:
        st.error(f"The report cannot be written: {exc}. {state.MISSING_FILES_HELP}")
        return
    name = info.id if len(ids) == 1 else f"comparison-{info.id}-{len(ids)}runs"
    st.download_button("Download the HTML report", data, file_name=f"{name}.html", mime="text/html",
                       key="export_report", icon=":material/summarize:",
                       help=", ".join(labels.get(r, r) for r in ids))


def _metrics_csv(info: RunInfo) -> bytes:
    """Per-category metrics (from the index) when the per-image files are gone."""
    metrics = state.run_metrics(info).assign(**{WEIGHTS_COLUMN: weights_statement(info)})
    return metrics.to_csv(index=False).encode()


def _kaleido_available() -> bool:
    return importlib.util.find_spec("kaleido") is not None


def _chart(info: RunInfo) -> tuple[go.Figure, str] | None:
    kind = st.radio("Chart", ["Per-category bars", "ROC curve of one category"], horizontal=True, key="export_chart")
    if kind == "Per-category bars":
        metric = st.selectbox("Metric", list(METRIC_COLUMNS), format_func=charts.METRIC_LABELS.__getitem__,
                              key="export_metric")
        table = charts.comparison_table({info.id: state.run_metrics(info)}, {info.id: charts.method_label(info.method)})
        return charts.category_bars(table, metric), f"{info.id}_{metric}_bars"
    images = state.readable_run_images(info)
    if images is None:
        return None
    if images.empty:
        st.info("This run stored no per-image scores.")
        return None
    category = st.selectbox("Category", sorted(images["category"].unique()), key="export_category")
    rows = images[images["category"] == category]
    roc, _, skipped = charts.curve_figures({charts.method_label(info.method): rows})
    for label, why in skipped.items():
        st.warning(f"{label}: no ROC curve for {category} ({why}).")
    return roc, f"{info.id}_{category}_roc"


def _chart_section(info: RunInfo) -> None:
    st.subheader("Chart")
    made = _chart(info)
    if made is None:
        return
    fig, name = made
    st.plotly_chart(fig, width="stretch", key="export_fig", config={
        "displayModeBar": True,
        "toImageButtonOptions": {"format": "png", "filename": name, "scale": 2},
    })
    html = fig.to_html(include_plotlyjs=True, full_html=True).replace(
        "<body>", f"<body><p>Weights: {weights_statement(info)}</p>", 1).encode()
    c1, c2 = st.columns(2)
    c1.download_button("Download chart as HTML", html, file_name=f"{name}.html", mime="text/html",
                       key="export_html", icon=":material/html:",
                       help="A standalone interactive page (works offline, about 5 MB).")
    if _kaleido_available():
        try:
            png = fig.to_image(format="png", scale=2)
        except Exception as exc:  # noqa: BLE001 - kaleido needs a browser; say why instead of failing the page
            c2.info(f"Server-side PNG export failed ({type(exc).__name__}: {exc}); use the chart's camera icon.")
        else:
            c2.download_button("Download chart as PNG", png, file_name=f"{name}.png", mime="image/png",
                               key="export_png", icon=":material/image:")
    else:
        c2.info("**PNG:** use the camera icon in the chart's toolbar (top right of the chart); it saves a PNG "
                "in your browser. Server-side PNG export would need the optional `kaleido` package, which is "
                "not installed.", icon=":material/photo_camera:")


def main() -> None:
    st.title("Export")
    st.caption("Download the selected run's results as CSV, and charts as PNG or HTML.")
    info = state.current_run()
    if info is None:
        st.info("No run selected. Pick one in the sidebar, or start one on the Run page.")
        nav.link(nav.RUN, "Go to the Run page")
        return
    state.weights_banner(info)
    st.markdown(f"Run **{charts.method_label(info.method)}** on **{info.dataset}** · `{info.id}` · {info.status}")

    st.subheader("Tables")
    c1, c2, c3 = st.columns(3)
    try:
        files = _export_files(str(state.store_path()), info.id, info.updated)
    except RunDataMissing as exc:
        st.error(f"This run's per-image files are missing: {exc}. {state.MISSING_FILES_HELP} Its per-category "
                 "metrics live in the index and can still be exported.")
        c1.download_button("Per-category metrics (CSV)", _metrics_csv(info), file_name=f"{info.id}_metrics.csv",
                           mime="text/csv", key="export_metrics_only", icon=":material/table:")
    else:
        c1.download_button("Per-category metrics (CSV)", files["metrics"], file_name=f"{info.id}_metrics.csv",
                           mime="text/csv", key="export_metrics", icon=":material/table:")
        c2.download_button("Per-image scores (CSV)", files["images"], file_name=f"{info.id}_images.csv",
                           mime="text/csv", key="export_images", icon=":material/table_rows:")
        c3.download_button("Run record (JSON)", files["run"], file_name=f"{info.id}_run.json",
                           mime="application/json", key="export_run", icon=":material/data_object:")
    st.caption(f"Every file states the weights: **{weights_statement(info)}**. "
               "Metrics: one row per category plus a mean row, values as fractions in [0, 1]. "
               "Scores: one row per test image (path, category, defect, label 1 = defective, anomaly score). "
               "Run record: configuration, backbone provenance and code version.")
    _report_section(info)
    _chart_section(info)


main()
