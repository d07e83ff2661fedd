"""The low-rank split (what the model runs) against the dense low-pass matrix (the reference)."""

from __future__ import annotations

import pytest
import torch

from harmoniad.model.frequency import FrequencySplit, low_pass_operator, real_fourier_basis


def _tokens(grid: tuple[int, int], channels: int = 7, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(3, grid[0] * grid[1], channels, generator=gen) * 2.0 + 0.5


@pytest.mark.parametrize("grid", [(6, 6), (5, 8), (1, 5), (7, 12), (24, 24)])
def test_real_fourier_basis_is_orthonormal_and_diagonalises_the_operator(grid):
    basis, radii = real_fourier_basis(*grid)
    n = grid[0] * grid[1]
    assert basis.shape == (n, n) and radii.shape == (n,)
    torch.testing.assert_close(basis.T @ basis, torch.eye(n, dtype=torch.float64), atol=1e-12, rtol=0)
    dense = low_pass_operator(*grid, 0.6, 0.2, dtype=torch.float64)
    torch.testing.assert_close(basis.T @ dense @ basis, torch.diag(torch.diagonal(basis.T @ dense @ basis)),
                               atol=1e-12, rtol=0)


@pytest.mark.parametrize(
    "cutoff, soft_edge, filters_low",
    [(0.0, 0.0, True), (0.25, 0.0, True), (0.6, 0.2, True), (1.0, 0.05, False), (1.3, 0.3, False), (2.0, 0.0, False)],
)
@pytest.mark.parametrize("grid", [(6, 6), (5, 8), (1, 5), (24, 24)])
def test_low_rank_split_equals_the_dense_operator(cutoff, soft_edge, filters_low, grid):
    x = _tokens(grid)
    split = FrequencySplit(cutoff, soft_edge)
    low, high = split(x, grid)
    dense = low_pass_operator(*grid, cutoff, soft_edge, dtype=torch.float64)
    want = (dense @ x.double()).float()
    torch.testing.assert_close(low, want, atol=2e-5, rtol=0)
    torch.testing.assert_close(high, x - want, atol=2e-5, rtol=0)
    chosen, basis, weight = split.factors(grid, torch.device("cpu"))
    if grid != (1, 5):  # on 5 bins both bands can tie
        assert chosen is filters_low
    assert basis.shape[1] == weight.numel() <= grid[0] * grid[1] // 2 + grid[0] * grid[1] % 2 + 4


def test_the_usual_setting_needs_few_columns():
    """ViT-L-14-336's 24 x 24 grid at cutoff 0.25: 25 frequency columns instead of a 576 x 576 matrix."""
    filters_low, basis, weight = FrequencySplit(0.25).factors((24, 24), torch.device("cpu"))
    assert filters_low and basis.shape == (576, 25) and torch.all(weight == 1)


def test_learnable_cutoff_gradient_matches_the_dense_route():
    grid = (12, 12)
    x = _tokens(grid, seed=3)
    fast = FrequencySplit(0.4, 0.3, learnable=True)
    ref = FrequencySplit(0.4, 0.3, learnable=True)
    low, high = fast(x, grid)
    (low.pow(2).sum() - 0.5 * high.pow(2).sum()).backward()
    operator = ref.operator(grid, torch.device("cpu"))
    r_low = torch.matmul(operator, x)
    (r_low.pow(2).sum() - 0.5 * (x - r_low).pow(2).sum()).backward()
    assert ref.cutoff_logit.grad is not None and ref.cutoff_logit.grad.abs() > 0
    torch.testing.assert_close(fast.cutoff_logit.grad, ref.cutoff_logit.grad, rtol=1e-3, atol=1e-6)
