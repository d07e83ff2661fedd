"""Suite-wide settings: one torch thread (tiny models run faster without thread contention)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_torch_thread() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)

#: Fixtures of the dashboard tests (unit, integration and browser): a demo store, an empty store.
pytest_plugins = ["tests.fixtures.dashboard"]
