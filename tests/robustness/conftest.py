"""Shared fixtures of the fault-matrix tests: one thread, a small clean synthetic dataset."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from harmoniad.data import make_synthetic
from harmoniad.progress import silent


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """Tiny tensors on a busy 2-core box: one torch thread is the fastest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def clean_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset (MVTec layout), generated once; copy it before damaging it."""
    root = tmp_path_factory.mktemp("clean") / "syn"
    return make_synthetic(root, n_train=4, n_test=4, size=64, categories=["weave", "flange"], progress=silent)


@pytest.fixture
def dataset(clean_dataset: Path, tmp_path: Path) -> Path:
    """A private copy of :func:`clean_dataset`, free to damage."""
    return Path(shutil.copytree(clean_dataset, tmp_path / "syn", symlinks=True))
