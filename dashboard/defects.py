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


def table(series: dict[str, tuple[RunInfo, pd.DataFrame]], rule: str, target_fpr: float) -> tuple[pd.DataFrame, set[str]]:
    """:func:`harmoniad.charts.defect_table` of several runs at the chosen operating point, and
    the rules actually applied (``fitted`` falls back to the oracle where nothing was fitted)."""
    cuts, applied = {}, set()
    for label, (info, images) in series.items():
        fitted = state.fitted_thresholds(info)
        for category, rows in images.groupby("category", sort=False):
            dec = thresholds.decision(rule, rows, fitted=fitted.get(str(category)), target_fpr=target_fpr)
            cuts[(label, str(category))] = dec.threshold
            applied.add(dec.rule)
    stored = {label: (state.run_defects(info), images) for label, (info, images) in series.items()}
    return charts.defect_table(stored, cuts), applied


def section(series: dict[str, tuple[RunInfo, pd.DataFrame]], colours: dict[str, str], *, key: str) -> None:
    """Operating-point picker, the clickable per-defect table and its chart."""
    rule, target_fpr = thresholds.rule_picker(key_suffix=f"_{key}")
    result, applied = table(series, rule, target_fpr)
    if result.empty:
        st.info("No defective test images in these runs.")
        return
    _clickable(result, key=f"{key}_defects")
    st.plotly_chart(charts.defect_bars(result, colours=colours), key=f"{key}_defect_bars")
    used = ", ".join(thresholds.RULES[r] for r in sorted(applied))
    st.caption("Image AUROC of each defect type's images against the category's normal images (threshold-free, as "
               f"the evaluation stored it), and how many are detected at the operating point ({used}). Counts in "
               "brackets are defective images; few images give wide uncertainty.")
    if rule == thresholds.FITTED and thresholds.ORACLE in applied:
        st.caption(":orange[Some runs stored no threshold fitted on normal images; the oracle F1-max threshold "
                   "(uses test labels) is used for them.]")


def _clickable(result: pd.DataFrame, *, key: str) -> None:
    rows = result.reset_index(drop=True)

    def pick() -> None:
        chosen = st.session_state[key].selection.rows
        if chosen:
            row = rows.iloc[chosen[0]]
            state.select_defect(str(row["category"]), str(row["defect"]))

    st.dataframe(rows, hide_index=True, width="stretch", on_select=pick, selection_mode="single-row", key=key,
                 column_config={**{c: st.column_config.NumberColumn(format="%.1f")
                                   for c in ("image AUROC (%)", "pixel AUROC (%)", "AUPRO (%)")},
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
