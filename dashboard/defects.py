"""Results per defect type (table with counts + chart), shown on Overview and Compare.

Clicking a row remembers the defect type app-wide (``nav.DEFECT_KEY``); Failure cases and
Inspect then filter by it.
"""

from __future__ import annotations

import pandas as pd
import streamlit as st

from dashboard import nav, state, thresholds
from harmoniad import charts
from harmoniad.store import RunInfo


def table(series: dict[str, tuple[RunInfo, pd.DataFrame]], rule: str, target_fpr: float) -> pd.DataFrame:
    """:func:`harmoniad.charts.defect_table` of several runs at the chosen operating point."""
    cuts = {}
    for label, (info, images) in series.items():
        metrics = state.run_metrics(info).set_index("category")
        for category, rows in images.groupby("category", sort=False):
            fitted = thresholds.fitted_value(metrics.loc[category] if category in metrics.index else None)
            cuts[(label, str(category))] = thresholds.decision(rule, rows, fitted=fitted, target_fpr=target_fpr).threshold
    return charts.defect_table({label: images for label, (_, images) in series.items()}, cuts)


def section(series: dict[str, tuple[RunInfo, pd.DataFrame]], colours: dict[str, str], *, key: str) -> None:
    """Operating-point picker, the clickable per-defect table and its chart."""
    rule, target_fpr = thresholds.rule_picker(key_suffix=f"_{key}")
    result = table(series, rule, target_fpr)
    if result.empty:
        st.info("No defective test images in these runs.")
        return
    _clickable(result, key=f"{key}_defects")
    st.plotly_chart(charts.defect_bars(result, colours=colours), key=f"{key}_defect_bars")
    st.caption("Image AUROC of each defect type's images against the category's normal images (threshold-free), "
               f"and how many are detected at the chosen operating point ({thresholds.RULES[rule]}). Counts in "
               "brackets are defective images; few images give wide uncertainty.")


def _clickable(result: pd.DataFrame, *, key: str) -> None:
    rows = result.reset_index(drop=True)

    def pick() -> None:
        chosen = st.session_state[key].selection.rows
        if chosen:
            row = rows.iloc[chosen[0]]
            state.select_defect(str(row["category"]), str(row["defect"]))

    st.dataframe(rows, hide_index=True, width="stretch", on_select=pick, selection_mode="single-row", key=key,
                 column_config={"image AUROC (%)": st.column_config.NumberColumn(format="%.1f"),
                                "detected (%)": st.column_config.NumberColumn(format="%.0f")})
    chosen = st.session_state.get(nav.DEFECT_KEY)
    if chosen:
        c1, c2, c3 = st.columns([3, 1, 1], vertical_alignment="center")
        c1.caption(f"Defect type **{chosen[1]}** ({chosen[0]}) chosen: Failure cases and Inspect show it.")
        with c2:
            nav.link(nav.FAILURES)
        with c3:
            nav.link(nav.INSPECT)
    else:
        st.caption("Click a row to filter Failure cases and Inspect by that defect type.")
