"""HarmoniAD dashboard entry point: ``streamlit run dashboard/app.py`` (from the repo root).

Builds the page menu with ``st.navigation`` over the top-level ``pages/`` folder
(``dashboard/nav.py``), draws the sidebar shared by every page (store location, the
app-wide run picker, work in progress), starts the offline demo on a first start
(``dashboard/bootstrap.py``) and runs the chosen page.
"""

from __future__ import annotations

import streamlit as st

from dashboard import bootstrap, jobs, nav, state
from harmoniad.store import StoreError


FOLLOWED_KEY = "_followed_runs"


def _follow_finished_runs() -> None:
    """Select a run that a job (the demo, an evaluation) has just finished, so the sidebar and
    every page move to the newest results instead of staying on an older run."""
    closed = [r for job in jobs.board().all(state.store_path()) for r in job.snapshot().closed_runs]
    if FOLLOWED_KEY not in st.session_state:
        # A new session (reload, new tab, shared link) keeps the run it asked for: only runs
        # that finish from now on are followed, not those that ended before it started.
        st.session_state[FOLLOWED_KEY] = set(closed)
        return
    seen: set[str] = st.session_state[FOLLOWED_KEY]
    finished = [r for r in closed if r not in seen]
    if not finished:
        return
    seen.update(finished)
    complete = state.list_runs(status="complete")
    newest = [r for r in finished if r in set(complete["id"])]
    if newest:
        state.select_run(newest[-1])


def _sidebar() -> None:
    _follow_finished_runs()
    with st.sidebar:
        st.markdown("### HarmoniAD")
        st.caption("Frequency-guided anomaly detection on frozen CLIP features.")
        state.run_picker("Selected run", key="sidebar_run")
        st.caption("The selected run is used by every page.")
        running = jobs.board().running(state.store_path())
        if running:
            st.caption(f":material/hourglass_top: {len(running)} job(s) running: "
                       + ", ".join(j.title for j in running))
        st.divider()
        st.caption(f"Results store: `{state.store_path()}`")


def main() -> None:
    st.set_page_config(page_title="HarmoniAD", page_icon=":material/graphic_eq:", layout="wide")
    page = st.navigation(nav.all_pages())
    try:
        store = state.get_store()
    except (StoreError, OSError) as exc:
        st.error(f"The results store at `{state.store_path()}` cannot be opened: {exc}. "
                 "Set HARMONIAD_STORE (or HARMONIAD_CACHE) to a writable folder.")
        st.stop()
    _sidebar()
    bootstrap.demo_panel(store)
    page.run()


main()
