"""The operating point the analysis pages decide with, chosen once for the whole app.

The rules and the decisions are :mod:`harmoniad.operating` (shared with the HTML report); this
module adds the Streamlit picker whose choice every page reads.
"""

from __future__ import annotations

import streamlit as st

from dashboard import nav
from harmoniad.operating import (  # noqa: F401 - re-exported for the pages
    FITTED,
    ORACLE,
    RULES,
    TARGET_FPR,
    Decision,
    counts,
    decision,
    Fitted,
    fitted_thresholds,
    outcome,
)
from harmoniad.thresholds import DEFAULT_TARGET_FPR


# ----------------------------------------------------------------------------- the app-wide choice


def rule_picker(container: st.delta_generator.DeltaGenerator | None = None, *, key_suffix: str = "") -> tuple[str, float]:
    """Radio for the rule (and a target-FPR number input), kept app-wide in ``st.session_state``."""
    box = container or st
    rule_key, fpr_key = f"{nav.THRESHOLD_RULE_KEY}{key_suffix}", f"{nav.TARGET_FPR_KEY}{key_suffix}"
    # Widgets own their keys; mirror the app-wide value in and out so every page agrees.
    st.session_state.setdefault(nav.THRESHOLD_RULE_KEY + "_value", FITTED)
    st.session_state.setdefault(nav.TARGET_FPR_KEY + "_value", DEFAULT_TARGET_FPR * 100)
    st.session_state[rule_key] = st.session_state[nav.THRESHOLD_RULE_KEY + "_value"]
    st.session_state[fpr_key] = st.session_state[nav.TARGET_FPR_KEY + "_value"]

    def keep() -> None:
        st.session_state[nav.THRESHOLD_RULE_KEY + "_value"] = st.session_state[rule_key]
        st.session_state[nav.TARGET_FPR_KEY + "_value"] = st.session_state[fpr_key]

    c1, c2 = box.columns([3, 1], vertical_alignment="bottom")
    rule = c1.radio("Operating point (image threshold)", list(RULES), format_func=RULES.__getitem__, key=rule_key,
                    horizontal=True, on_change=keep,
                    help="Fitted on normal images: what a line would deploy. Target FPR: flag at most this share "
                         "of normal images. Oracle: best F1 on the test labels, for reference only.")
    fpr = c2.number_input("Target FPR (%)", min_value=0.0, max_value=50.0, step=1.0, key=fpr_key, on_change=keep,
                          disabled=rule != TARGET_FPR, help="Used by the target-FPR rule.")
    return str(rule), float(fpr) / 100.0
