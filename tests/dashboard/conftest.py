"""Fixtures for dashboard tests: an empty store and a store holding a small real run.

The run is produced by the real evaluation path (tiny random backbone, small synthetic
dataset), once per test session, so pages are tested against what users will see.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from harmoniad.backbone import TINY_BACKBONE
from harmoniad.data import make_synthetic
from harmoniad.evaluate import EvalRequest, evaluate
from harmoniad.progress import silent
from harmoniad.store import ResultStore

DEMO_TEST_METHODS = ("harmoniad", "patchcore", "freqfilter")
#: Small heads and short training: the pages need a real run, not a good one.
FAST_OPTIONS = {"harmoniad": {"model": {"hidden_dim": 32}, "train": {"epochs": 3, "batch_size": 6}}}


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder with a small synthetic dataset and one complete run per method."""
    cache = tmp_path_factory.mktemp("dashboard-cache")
    old = os.environ.get("HARMONIAD_CACHE")
    os.environ["HARMONIAD_CACHE"] = str(cache)
    try:
        root = make_synthetic(cache / "datasets" / "synthetic", n_train=6, n_test=6, size=64,
                              categories=["weave", "flange"])
        request = EvalRequest(dataset="synthetic", root=str(root), methods=DEMO_TEST_METHODS,
                              backbone=TINY_BACKBONE, resolution=64, options=FAST_OPTIONS)
        evaluate(request, ResultStore(cache / "runs"), progress=silent)
    finally:
        if old is None:
            os.environ.pop("HARMONIAD_CACHE", None)
        else:
            os.environ["HARMONIAD_CACHE"] = old
    return cache


@pytest.fixture
def demo_store(demo_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ResultStore]:
    """A private copy of the demo cache (tests may delete files), wired into the dashboard."""
    cache = tmp_path / "cache"
    shutil.copytree(demo_cache, cache)
    monkeypatch.setenv("HARMONIAD_CACHE", str(cache))
    monkeypatch.setenv("HARMONIAD_STORE", str(cache / "runs"))
    yield ResultStore(cache / "runs")


@pytest.fixture
def empty_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ResultStore:
    """An empty cache; the app must not start the demo on its own in tests (see HARMONIAD_NO_DEMO)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("HARMONIAD_CACHE", str(cache))
    monkeypatch.setenv("HARMONIAD_STORE", str(cache / "runs"))
    monkeypatch.setenv("HARMONIAD_NO_DEMO", "1")
    return ResultStore(cache / "runs")
