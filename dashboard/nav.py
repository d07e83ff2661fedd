"""The dashboard's pages as data, so any page can link or switch to another by name.

``app.py`` registers :func:`all_pages` with ``st.navigation``. A page that wants to send the
user elsewhere calls :func:`switch_to` (or :func:`link` for a clickable link). Both rebuild
the same ``st.Page`` (same file, same ``url_path``) that was registered, which is what
``st.switch_page`` checks, and both keep the selected run in the URL (``?run=<id>``),
because ``st.switch_page`` otherwise clears every query parameter.

Page URLs: Overview is the default page (``/``); the others are ``/<name>``
(``/run``, ``/compare``, ``/inspect``, ``/failures``, ``/export``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import streamlit as st

# Page names (also their URL paths), in menu order. Pages link to each other by these.
OVERVIEW = "overview"
RUN = "run"
COMPARE = "compare"
INSPECT = "inspect"
FAILURES = "failures"
EXPORT = "export"

# Keys shared by several modules: the URL query and ``st.session_state``.
#: URL query parameter holding the selected run id (``?run=<id>``).
RUN_QUERY = "run"
#: Session key of the app-wide selected run id.
RUN_KEY = "run_id"
#: Session key of the app-wide selected image (a run-wide image index).
IMAGE_KEY = "image_index"
#: Session key of Inspect's memory of the image it last showed (run id, image index, path);
#: Failure cases clears it so Inspect opens exactly the clicked image.
INSPECT_SHOWN_KEY = "inspect_shown"
#: Session key of the defect type chosen on Overview/Compare; Inspect and Failure cases filter by it.
DEFECT_KEY = "defect_filter"
#: Session key of the chosen image-threshold rule (see ``dashboard.thresholds``).
THRESHOLD_RULE_KEY = "threshold_rule"
#: Session key of the target false-positive rate of the "target FPR" threshold rule.
TARGET_FPR_KEY = "threshold_target_fpr"

#: The top-level ``pages/`` folder (beside ``dashboard/``, not inside it, so Streamlit's
#: automatic ``pages/`` discovery never kicks in; ``st.navigation`` is the only router).
PAGES_DIR = Path(__file__).resolve().parent.parent / "pages"
DEFAULT_PAGE = OVERVIEW


@dataclass(frozen=True)
class PageDef:
    """One page: its name (also its URL path), title, icon and file in ``pages/``."""

    name: str
    title: str
    icon: str
    file: str

    @property
    def path(self) -> Path:
        return PAGES_DIR / self.file

    @property
    def url(self) -> str:
        """The path part of the page's URL as ``st.navigation`` assigns it (``""`` for Overview)."""
        return "" if self.name == DEFAULT_PAGE else self.name


PAGES: tuple[PageDef, ...] = (
    PageDef(OVERVIEW, "Overview", ":material/leaderboard:", "overview.py"),
    PageDef(RUN, "Run", ":material/play_circle:", "run.py"),
    PageDef(COMPARE, "Compare", ":material/bar_chart:", "compare.py"),
    PageDef(INSPECT, "Inspect", ":material/image_search:", "inspect.py"),
    PageDef(FAILURES, "Failure cases", ":material/report:", "failures.py"),
    PageDef(EXPORT, "Export", ":material/download:", "export.py"),
)
_BY_NAME = {p.name: p for p in PAGES}


def page_def(name: str) -> PageDef:
    """The definition of page ``name``; a clear error for a typo."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown dashboard page {name!r}; expected one of {list(_BY_NAME)}") from None


def page(name: str) -> st.Page:
    """The ``st.Page`` of ``name``, identical to the one registered with ``st.navigation``."""
    p = page_def(name)
    return st.Page(p.path, title=p.title, icon=p.icon, url_path=p.name, default=p.name == DEFAULT_PAGE)


def all_pages() -> list[st.Page]:
    """Every page, in menu order (the first is the default)."""
    return [page(p.name) for p in PAGES]


def _run_query() -> dict[str, str]:
    run_id = st.session_state.get(RUN_KEY) or st.query_params.get(RUN_QUERY)
    return {RUN_QUERY: str(run_id)} if run_id else {}


def switch_to(name: str) -> NoReturn:
    """Go to page ``name`` now, keeping the selected run in the URL."""
    st.switch_page(page(name), query_params=_run_query())
    raise AssertionError("unreachable: st.switch_page stops the script")  # pragma: no cover


def link(name: str, label: str | None = None, *, icon: str | None = None) -> None:
    """A link to page ``name`` (keeps the selected run in the URL)."""
    p = page_def(name)
    st.page_link(page(name), label=label or p.title, icon=icon or p.icon, query_params=_run_query())
