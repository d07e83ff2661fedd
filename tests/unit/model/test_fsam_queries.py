"""FSAM with position queries: a position's output does not read its own token (window attention and edge conv)."""

from __future__ import annotations

import pytest
import torch

from harmoniad.model import HarmoniAD, ModelConfig

# split=False: the branch input at a position is that position's token itself (a band filter
# would spread a change at one position over its neighbours' band values).
SMALL = dict(hidden_dim=16, fsam_heads=2, gscm_heads=2, fsam_window=4, fsam_depth=2, gscm_depth=1, split=False)
GRID = (6, 7)


def _own_and_neighbour_change(queries: str) -> tuple[float, float]:
    """How far FSAM's output moves at a position, and at its direct neighbours, when that position's token changes."""
    torch.manual_seed(0)
    model = HarmoniAD(ModelConfig(**SMALL, fsam_queries=queries), 8, 2).eval()
    gen = torch.Generator().manual_seed(1)
    bands = [torch.randn(2, GRID[0] * GRID[1], 8, generator=gen) for _ in range(2)]
    py, px = 2, 3
    changed = [t.clone() for t in bands]
    for t in changed:
        t[:, py * GRID[1] + px] += 5.0 * torch.randn(8, generator=gen)
    with torch.no_grad():
        moved = torch.stack([(a - b).abs().amax(dim=-1) for a, b in
                             zip(model.fsam_branch(changed, GRID), model.fsam_branch(bands, GRID))]).amax(dim=0)
    moved = moved.reshape(2, *GRID)
    neighbours = torch.stack([moved[:, py + dy, px + dx] for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1))])
    return float(moved[:, py, px].max()), float(neighbours.min())


def test_position_queries_do_not_read_their_own_token() -> None:
    """Only the channel gate's mean over all positions carries the own token (1/N of it): a tiny change."""
    own, neighbour = _own_and_neighbour_change("positions")
    assert neighbour > 0.1  # the neighbours read the changed token (window attention and edge conv)
    assert own < 0.05 * neighbour


def test_token_fsam_reads_its_own_token() -> None:
    """The default FSAM has the copy path the position queries remove (the test above can fail)."""
    own, neighbour = _own_and_neighbour_change("tokens")
    assert own > 0.5 * neighbour


def test_position_query_fsam_gets_no_bottleneck_noise() -> None:
    """No copy path to break: in training the high branch's output does not depend on the noise draw."""
    model = HarmoniAD(ModelConfig(**SMALL, fsam_queries="positions"), 8, 2).train()
    bands = [torch.randn(2, GRID[0] * GRID[1], 8) for _ in range(2)]
    a = model.fsam_branch(bands, GRID, torch.Generator().manual_seed(0))[0]
    b = model.fsam_branch(bands, GRID, torch.Generator().manual_seed(1))[0]
    torch.testing.assert_close(a, b)


def test_fsam_queries_is_validated() -> None:
    with pytest.raises(ValueError, match="fsam_queries"):
        ModelConfig(fsam_queries="pixels")  # type: ignore[arg-type]
