"""Compare page: methods side by side on one dataset.

Per-category bars for any metric, results per defect type, image ROC/PR curves and pixel
ROC/PRO curves, HarmoniAD minus a chosen baseline, statistics (bootstrap intervals, paired
tests, a critical-difference diagram) and HarmoniAD's ablations. Metrics come from the run
index; image curves and statistics from the per-image tables; pixel curves from the stored
maps of one category at a time.
"""

from __future__ import annotations

import math

import pandas as pd
import streamlit as st

from dashboard import defects, nav, state
from harmoniad import charts
from harmoniad.methods import METHODS
from harmoniad.store import METRIC_COLUMNS, RunDataMissing, RunInfo, RunNotFound

ABLATION_METHODS = ("harmoniad", *(name for name, spec in METHODS.items() if spec.kind == "ablation"))


def _no_runs() -> None:
    st.info("No complete runs yet. Start one on the **Run** page (the synthetic demo needs no download).")
    nav.link(nav.RUN, "Go to the Run page")


def _infos(ids: list[str]) -> dict[str, RunInfo]:
    store = state.get_store()
    out = {}
    for run_id in ids:
        try:
            out[run_id] = store.get_run(run_id)
        except RunNotFound:
            continue  # deleted between listing and reading: just leave it out
    return out


def _default_dataset(runs: pd.DataFrame) -> str:
    selected = state.selected_run_id()
    match = runs[runs["id"] == selected]
    return str(match["dataset"].iloc[0]) if len(match) else str(runs["dataset"].iloc[0])


def _pick_runs(runs: pd.DataFrame) -> tuple[str, list[str]]:
    datasets = sorted(runs["dataset"].unique())
    if "compare_dataset" not in st.session_state or st.session_state["compare_dataset"] not in datasets:
        st.session_state["compare_dataset"] = _default_dataset(runs)
    left, right = st.columns([1, 3])
    dataset = left.selectbox("Dataset", datasets, key="compare_dataset")
    pool = runs[runs["dataset"] == dataset]
    labels = charts.series_labels(pool)
    created = dict(zip(pool["id"], pool["created"].astype(str).str[:16].str.replace("T", " ")))
    random = dict(zip(pool["id"], pool["random_weights"]))

    def describe(run_id: str) -> str:
        flag = " · random weights" if random[run_id] else ""
        label = labels[run_id]
        return label + flag if "(" in label else f"{label} · {created[run_id]}{flag}"

    chosen = right.multiselect(
        "Runs to compare", list(pool["id"]), default=charts.latest_runs(pool), format_func=describe,
        key=f"compare_runs_{dataset}", help="Default: the newest complete run of each method on this dataset.",
    )
    return dataset, chosen


def _failed_categories(metrics: dict[str, pd.DataFrame], labels: dict[str, str]) -> None:
    for run_id, frame in metrics.items():
        failed = frame[frame["status"] == "failed"]
        for _, row in failed.iterrows():
            first = str(row["error"] or "").strip().splitlines()
            st.warning(f"{labels[run_id]}: category **{row['category']}** failed"
                       + (f" ({first[0][:200]})" if first else "") + "; it is left out of the means.")


def _bars_section(table: pd.DataFrame, colours: dict[str, str]) -> str:
    st.subheader("Per-category metrics")
    metric = st.columns([1, 2])[0].selectbox(
        "Metric", list(METRIC_COLUMNS), format_func=charts.METRIC_LABELS.__getitem__, key="compare_metric")
    st.plotly_chart(charts.category_bars(table, metric, colours=colours), key="compare_bars")
    st.caption(charts.METRIC_HELP[metric] + " Bars are in percent; 'mean' averages the categories that ran.")
    with st.expander("Table (percent)"):
        pivot = table.pivot(index="series", columns="category", values=metric)
        pivot = pivot.reindex(index=list(dict.fromkeys(table["series"])),
                              columns=list(dict.fromkeys(table["category"])))
        st.dataframe(pivot, column_config=_percent_columns(pivot.columns))
    return metric


def _tables(infos: dict[str, RunInfo], labels: dict[str, str]) -> dict[str, pd.DataFrame]:
    tables: dict[str, pd.DataFrame] = {}
    for run_id, info in infos.items():
        images = state.readable_run_images(info, labels[run_id])
        if images is not None:
            tables[run_id] = images
    return tables


def _curves_section(infos: dict[str, RunInfo], tables: dict[str, pd.DataFrame], labels: dict[str, str],
                    colours: dict[str, str]) -> None:
    st.subheader("ROC, precision-recall and PRO curves")
    st.caption("Image curves from each image's score and label; pixel curves from the stored maps. Top-left (ROC) "
               "and top-right (PR) are better; the dotted line is guessing.")
    categories = list(dict.fromkeys(c for t in tables.values() for c in t["category"].unique()))
    if not categories:
        st.info("No per-image scores to draw curves from.")
        return
    category = st.columns([1, 2])[0].selectbox("Category", categories, key="compare_curve_category")
    series = {labels[rid]: t[t["category"] == category] for rid, t in tables.items()}
    series = {label: rows for label, rows in series.items() if len(rows)}
    roc, pr, skipped = charts.curve_figures(series, colours)
    left, right = st.columns(2)
    left.plotly_chart(roc, key="compare_roc")
    right.plotly_chart(pr, key="compare_pr")
    for label, why in skipped.items():
        st.caption(f"No image curve for {label}: {why}")
    pixel: dict[str, tuple] = {}
    for run_id, table in tables.items():
        rows = table[table["category"] == category]
        if rows.empty:
            continue
        try:
            pixel[labels[run_id]] = state.category_maps(infos[run_id], list(rows["index"]))
        except (KeyError, RunDataMissing):
            st.caption(f"No pixel curves for {labels[run_id]}: its maps are not stored or cannot be read.")
    if pixel:
        proc, pro, skipped = charts.pixel_curve_figures(pixel, colours)
        left, right = st.columns(2)
        left.plotly_chart(proc, key="compare_pixel_roc")
        right.plotly_chart(pro, key="compare_pro")
        st.caption(f"Pixel level over every pixel of the category's test images. The PRO curve is the mean overlap "
                   f"with each ground-truth region; AUPRO integrates it up to FPR {charts.FPR_LIMIT:g} (dashed line).")
        for label, why in skipped.items():
            st.caption(f"No pixel curve for {label}: {why}")


def _difference_section(table: pd.DataFrame, metric: str, infos: dict[str, RunInfo], labels: dict[str, str]) -> None:
    st.subheader("HarmoniAD minus baseline")
    ids = list(infos)
    if len(ids) < 2:
        st.info("Choose at least two runs above to see differences.")
        return
    rank = {"harmoniad": 0, "ablation": 1, "baseline": 2}
    targets = sorted(ids, key=lambda rid: rank[charts.method_kind(infos[rid].method)])  # HarmoniAD first
    left, right = st.columns(2)
    target = left.selectbox("HarmoniAD run", targets, format_func=labels.__getitem__, key="compare_target")
    others = [rid for rid in ids if rid != target]
    baselines = [rid for rid in others if charts.method_kind(infos[rid].method) == "baseline"] or others
    baseline = right.selectbox("Baseline", [*baselines, *[r for r in others if r not in baselines]],
                               format_func=labels.__getitem__, key="compare_baseline")
    diff = charts.difference_table(table, metric, target, baseline)
    st.plotly_chart(charts.difference_bars(diff, metric, labels[target], labels[baseline]), key="compare_diff")
    mean = diff["difference"].iloc[-1]
    verdict = "n/a" if math.isnan(mean) else f"{mean:+.1f} points on average"
    st.caption(f"{charts.METRIC_LABELS[metric]}, percentage points. Green: {labels[target]} is better; red: worse "
               f"({verdict}).")
    with st.expander(f"Mean difference against every other run, all metrics ({labels[target]} minus row)"):
        table_all = charts.mean_differences(table, target, {rid: labels[rid] for rid in others})
        st.dataframe(table_all.style.format("{:+.1f}", na_rep="n/a").map(_sign_colour))


def _defects_section(infos: dict[str, RunInfo], tables: dict[str, pd.DataFrame], labels: dict[str, str],
                     colours: dict[str, str]) -> None:
    st.subheader("Per defect type")
    defects.section({labels[rid]: (infos[rid], t) for rid, t in tables.items()}, colours, key="compare")


STAT_METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")


def _statistics_section(infos: dict[str, RunInfo], labels: dict[str, str], colours: dict[str, str]) -> None:
    st.subheader("Statistics")
    metric = st.columns([1, 2])[0].selectbox("Interval metric", STAT_METRICS,
                                             format_func=charts.METRIC_LABELS.__getitem__, key="compare_stat_metric")
    intervals = {labels[rid]: charts.interval_table(state.run_intervals(info), metric) for rid, info in infos.items()}
    missing = [label for label, t in intervals.items() if t.empty]
    intervals = {label: t for label, t in intervals.items() if len(t)}
    if intervals:
        st.plotly_chart(charts.interval_bars(intervals, colours, metric), key="compare_intervals")
        st.caption("Error bars: 95% stratified bootstrap intervals stored with each run (test images resampled, "
                   "normal and defective separately; 'mean' resamples every category together). Few test images "
                   "give wide intervals.")
    if missing:
        st.caption(f"No stored intervals for {', '.join(missing)} (evaluated without bootstrap resamples, or no "
                   "defective images).")
    ids = list(infos)
    tests = None
    if len(ids) >= 2:
        left, right = st.columns(2)
        a = left.selectbox("Method A", ids, format_func=labels.__getitem__, key="compare_stat_a")
        b = right.selectbox("Method B", [r for r in ids if r != a], format_func=labels.__getitem__, key="compare_stat_b")
        try:
            tests = state.paired_test(infos[a], infos[b])
        except RunDataMissing as exc:
            st.error(f"The paired test needs both runs' per-image scores: {exc}. {state.MISSING_FILES_HELP}")
            tests = None
    if len(ids) >= 2 and tests is not None:
        st.plotly_chart(charts.significance_bars(tests, labels[a], labels[b]), key="compare_significance")
        n_sig = int((tests["delong_p"] < charts.ALPHA).sum()) if "delong_p" in tests else 0
        st.caption(f"★ marks categories where DeLong's paired test on the images both runs scored finds the image "
                   f"AUROCs different at the 5% level ({n_sig} of {len(tests)}); no multiple-testing correction.")
    ranks = None
    if len(ids) >= 3:
        try:
            ranks = charts.relabel_ranks(state.get_store().friedman(ids, metric), [labels[r] for r in ids])
        except ValueError:  # fewer than two categories every run scored
            ranks = None
    if ranks is not None:
        st.plotly_chart(charts.cd_diagram(ranks, colours), key="compare_cd")
        st.caption(f"Average rank of {charts.METRIC_LABELS[metric]} over {ranks['n_datasets']} categories (Friedman "
                   "test, Nemenyi critical difference at 5%). Methods joined by a black bar are not significantly "
                   "different.")
    elif len(ids) >= 3:
        st.caption("No critical-difference diagram: it needs at least two categories scored by every method.")
    else:
        st.caption("A critical-difference diagram appears when three or more runs are compared.")


def _percent_columns(columns: object) -> dict:
    return {str(c): st.column_config.NumberColumn(format="%.1f") for c in columns}


def _sign_colour(value: float) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == 0:
        return ""
    return f"color: {charts.POSITIVE_COLOUR}" if value > 0 else f"color: {charts.NEGATIVE_COLOUR}"


def _ablations_section(runs: pd.DataFrame, ids: list[str], metric: str) -> None:
    st.subheader("Ablations")
    st.caption("What each part of HarmoniAD contributes: the same model with one design choice removed "
               "(newest complete run of each on this dataset).")
    present = {info.method: info for info in _infos(ids).values()}
    for name in ABLATION_METHODS:
        spec = METHODS[name]
        mark = "" if name in present else " *(no run yet)*"
        st.markdown(f"- **{spec.label}**{mark}: {spec.description}")
    if not any(charts.method_kind(m) == "ablation" for m in present):
        st.info("No ablation runs on this dataset yet. Start HarmoniAD w/o split, high only and low only "
                "from the Run page to fill this section.")
        return
    metrics = {info.id: state.run_metrics(info) for info in present.values()}
    shown = runs[runs["id"].isin(ids)]
    table = charts.comparison_table(metrics, charts.series_labels(shown))
    st.plotly_chart(charts.category_bars(table, metric, title=f"Ablations: {charts.METRIC_LABELS[metric]}",
                                         colours=charts.series_colours(shown)), key="compare_ablation_bars")
    means = table[table["category"] == charts.MEAN_LABEL].set_index("series")[list(METRIC_COLUMNS)]
    means.columns = [charts.METRIC_LABELS[m] for m in METRIC_COLUMNS]
    st.dataframe(means, column_config=_percent_columns(means.columns))
    st.caption("Means over categories, percent.")


def main() -> None:
    st.title("Compare methods")
    st.caption("Measured results of several runs on the same dataset, per category.")
    runs = state.list_runs(status="complete")
    if runs.empty:
        _no_runs()
        return
    dataset, chosen = _pick_runs(runs)
    pool = runs[runs["dataset"] == dataset]
    ablation_ids = charts.latest_runs(pool, methods=ABLATION_METHODS)
    shown = pool[pool["id"].isin([*chosen, *ablation_ids])]
    state.weights_banner(shown)
    infos = _infos(chosen)
    if not infos:
        st.info("Choose one or more runs to compare.")
    else:
        chosen_runs = pool[pool["id"].isin(list(infos))]
        labels = charts.series_labels(chosen_runs)
        colours = charts.series_colours(chosen_runs)
        metrics = {rid: state.run_metrics(info) for rid, info in infos.items()}
        table = charts.comparison_table(metrics, labels)
        _failed_categories(metrics, labels)
        metric = _bars_section(table, colours)
        tables = _tables(infos, labels)
        _defects_section(infos, tables, labels, colours)
        _curves_section(infos, tables, labels, colours)
        _difference_section(table, metric, infos, labels)
        _statistics_section(infos, labels, colours)
    _ablations_section(pool, ablation_ids, st.session_state.get("compare_metric", METRIC_COLUMNS[0]))


main()
