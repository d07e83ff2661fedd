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

#: The top-level ``pages/`` folder (beside ``dashboard/``, not inside it, so Streamlit's
#: automatic ``pages/`` discovery never kicks in; ``st.navigation`` is the only router).
PAGES_DIR = Path(__file__).resolve().parent.parent / "pages"
DEFAULT_PAGE = "overview"


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
    PageDef("overview", "Overview", ":material/leaderboard:", "overview.py"),
    PageDef("run", "Run", ":material/play_circle:", "run.py"),
    PageDef("compare", "Compare", ":material/bar_chart:", "compare.py"),
    PageDef("inspect", "Inspect", ":material/image_search:", "inspect.py"),
    PageDef("failures", "Failure cases", ":material/report:", "failures.py"),
    PageDef("export", "Export", ":material/download:", "export.py"),
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
    run_id = st.session_state.get("run_id") or st.query_params.get("run")
    return {"run": str(run_id)} if run_id else {}


def switch_to(name: str) -> NoReturn:
    """Go to page ``name`` now, keeping the selected run in the URL."""
    st.switch_page(page(name), query_params=_run_query())
    raise AssertionError("unreachable: st.switch_page stops the script")  # pragma: no cover


def link(name: str, label: str | None = None, *, icon: str | None = None) -> None:
    """A link to page ``name`` (keeps the selected run in the URL)."""
    p = page_def(name)
    st.page_link(page(name), label=label or p.title, icon=icon or p.icon, query_params=_run_query())
