"""harmoniad.runtime.paths: the checkout root, so the default cache is <checkout>/cache."""

from __future__ import annotations

from harmoniad.runtime import paths
from tests.paths import REPO


def test_repo_root_is_the_checkout_and_the_default_cache_lies_in_it(monkeypatch) -> None:
    assert paths.REPO_ROOT == REPO and (paths.REPO_ROOT / "pyproject.toml").is_file()
    monkeypatch.delenv("HARMONIAD_CACHE", raising=False)
    monkeypatch.delenv("HARMONIAD_STORE", raising=False)
    assert paths.cache_dir() == REPO / "cache" and paths.store_dir() == REPO / "cache" / "runs"
