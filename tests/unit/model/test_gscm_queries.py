"""GSCM with position queries: a position's output never reads its own token (nor those near it)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harmoniad.model import HarmoniAD, ModelConfig
from harmoniad.model.gscm import GSCM, linear_attention

SMALL = dict(hidden_dim=16, fsam_heads=2, gscm_heads=2, fsam_window=4, fsam_depth=1, gscm_depth=2,
             gscm_queries="positions")


def _bands(b: int = 2, n: int = 42, c: int = 8, layers: int = 2, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, n, c, generator=gen) for _ in range(layers)]


@pytest.mark.parametrize("exclude", [0, 1, 2])
def test_low_output_at_a_position_ignores_the_inputs_within_the_excluded_radius(exclude: int) -> None:
    """Change every layer's input at one position: the low branch's output there (and within the radius) stays."""
    grid, (py, px) = (6, 7), (2, 3)
    model = HarmoniAD(ModelConfig(**SMALL, gscm_exclude=exclude), 8, 2).eval()
    bands = _bands()
    base = model.gscm_branch(bands, grid)
    changed_bands = [t.clone() for t in bands]
    for t in changed_bands:
        t[:, py * grid[1] + px] += 5.0 * torch.randn(8)
    changed = model.gscm_branch(changed_bands, grid)
    moved = torch.stack([(a - b).abs().amax(dim=-1) for a, b in zip(changed, base)]).amax(dim=0) > 1e-5
    moved = moved.reshape(2, *grid)
    ys, xs = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    near = (torch.maximum((ys - py).abs(), (xs - px).abs()) <= exclude).expand(2, -1, -1)
    assert not moved[near].any()
    assert moved[~near].all()  # every other position reads the change


def test_token_queries_do_read_their_own_token() -> None:
    """The default self-attention GSCM has the copy path the position queries remove (the test above can fail)."""
    grid = (6, 7)
    model = HarmoniAD(ModelConfig(**{**SMALL, "gscm_queries": "tokens"}), 8, 2).eval()
    bands = _bands()
    changed_bands = [t.clone() for t in bands]
    for t in changed_bands:
        t[:, 17] += 5.0
    assert (model.gscm_branch(changed_bands, grid)[0][:, 17] - model.gscm_branch(bands, grid)[0][:, 17]).abs().max() > 1e-4


@pytest.mark.parametrize("exclude", [-1, 0, 1, 2])
def test_linear_attention_exclusion_matches_an_explicit_masked_sum(exclude: int) -> None:
    gen = torch.Generator().manual_seed(1)
    grid = (6, 7)
    q, k, v = (torch.randn(2, 3, 42, 4, generator=gen) for _ in range(3))
    out = linear_attention(q, k, v, exclude=exclude, grid=grid)
    ys, xs = torch.meshgrid(torch.arange(6), torch.arange(7), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dist = torch.maximum((ys[:, None] - ys[None]).abs(), (xs[:, None] - xs[None]).abs())
    weights = torch.einsum("bhnd,bhmd->bhnm", F.elu(q) + 1, F.elu(k) + 1) * (dist > exclude)
    expected = torch.einsum("bhnm,bhme->bhne", weights, v) / (weights.sum(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


def test_a_window_that_covers_the_grid_leaves_nothing_to_read() -> None:
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    assert linear_attention(q, k, v, exclude=3, grid=(2, 3)).abs().max() == 0


@pytest.mark.parametrize("grid", [(16, 16), (5, 7), (24, 24)])
def test_position_tables_are_resampled_to_any_grid(grid: tuple[int, int]) -> None:
    gscm = GSCM(16, depth=2, heads=2, queries="positions", table=16).eval()
    x = torch.randn(3, grid[0] * grid[1], 16)
    y = gscm(x, grid)
    assert y.shape == x.shape and torch.isfinite(y).all()


def test_position_queries_get_no_bottleneck_noise_fsam_does() -> None:
    """In training the low branch's output does not depend on the noise draw (no copy path to break); that of
    FSAM with token queries (which reads its own token) does."""
    model = HarmoniAD(ModelConfig(**SMALL, fsam_queries="tokens", bottleneck_dropout=0.2), 8, 2).train()
    feats = [torch.randn(2, 8, 6, 7) for _ in range(2)]
    a = model(feats, torch.Generator().manual_seed(0))
    b = model(feats, torch.Generator().manual_seed(1))
    torch.testing.assert_close(a.recon_low[0], b.recon_low[0])
    assert (a.recon_high[0] - b.recon_high[0]).abs().max() > 1e-4


@pytest.mark.parametrize("field, value", [("gscm_queries", "pixels"), ("gscm_exclude", -1), ("gscm_pos_table", 0), ("gscm_pos_gain", 0.0)])
def test_query_settings_are_validated(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{**SMALL, field: value})
