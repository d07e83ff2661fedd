"""Where HarmoniAD keeps what it can reload: one place, overridable by environment."""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]  # harmoniad/runtime/paths.py -> the checkout


def cache_dir() -> Path:
    """The cache root: ``$HARMONIAD_CACHE`` if set, else ``<repo>/cache``."""
    return Path(os.environ.get("HARMONIAD_CACHE", REPO_ROOT / "cache")).expanduser()


def store_dir() -> Path:
    """The run store: ``$HARMONIAD_STORE`` if set, else ``<cache>/runs``; the CLI and the
    dashboard both default to it, so they always see the same runs."""
    store = os.environ.get("HARMONIAD_STORE")
    return Path(store).expanduser() if store else cache_dir() / "runs"
