"""Shared fixtures of the fault-matrix tests: a small clean synthetic dataset, a damageable checkpoint copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harmoniad.data import make_synthetic
from harmoniad.runtime.progress import silent
from harmoniad.train import CONFIG_FILE, MODEL_FILE


@pytest.fixture(scope="session")
def clean_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset (MVTec layout), generated once; copy it before damaging it."""
    root = tmp_path_factory.mktemp("clean") / "syn"
    return make_synthetic(root, n_train=4, n_test=4, size=64, categories=["weave", "flange"], progress=silent)


@pytest.fixture
def dataset(clean_dataset: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`clean_dataset`, free to damage."""
    return Path(shutil.copytree(clean_dataset, tmp_path / "syn", symlinks=True))


@pytest.fixture
def ckpt(checkpoint: Path, tmp_path: Path) -> Path:
    """A private copy (weights + config) of the test module's ``checkpoint`` fixture, free to damage."""
    out = tmp_path / "ckpt"
    out.mkdir()
    for name in (MODEL_FILE, CONFIG_FILE):
        (out / name).write_bytes((checkpoint / name).read_bytes())
    return out
