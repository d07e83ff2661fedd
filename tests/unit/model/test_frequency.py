"""The frequency split's identities (issue 3): exact sum, both extremes, any grid, gradients."""

from __future__ import annotations

import math

import pytest
import torch

from harmoniad.model.frequency import (
    CORNER_RADIUS,
    FrequencySplit,
    frequency_split,
    low_pass_mask,
    low_pass_operator,
    radius_grid,
)


def _feats(h: int = 8, w: int = 8, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 5, h, w, generator=gen) * 3.0 + 1.0


@pytest.mark.parametrize("soft_edge", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("cutoff", [0.0, 0.05, 0.25, 0.5, 0.9, 1.0, 1.3, 1.5, 3.0])
@pytest.mark.parametrize("grid", [(8, 8), (7, 12), (1, 5), (13, 6)])
def test_parts_sum_back_to_input(cutoff: float, soft_edge: float, grid: tuple[int, int]) -> None:
    x = _feats(*grid)
    low, high = frequency_split(x, cutoff, soft_edge)
    assert low.shape == high.shape == x.shape and low.dtype == high.dtype == torch.float32
    torch.testing.assert_close(low + high, x, atol=1e-5, rtol=0)


def test_low_part_matches_centred_full_spectrum_reference() -> None:
    """The rfft shortcut equals masking the fftshift-ed full spectrum (the textbook definition)."""
    x = _feats(9, 12)
    for cutoff, soft in [(0.25, 0.0), (0.6, 0.2), (1.2, 0.05)]:
        spec = torch.fft.fftshift(torch.fft.fft2(x, norm="ortho"), dim=(-2, -1))
        masked = spec * low_pass_mask(9, 12, cutoff, soft, centred=True)
        ref = torch.fft.ifft2(torch.fft.ifftshift(masked, dim=(-2, -1)), norm="ortho")
        assert ref.imag.abs().max() < 1e-5  # the mask is Hermitian-symmetric
        low, _ = frequency_split(x, cutoff, soft)
        torch.testing.assert_close(low, ref.real, atol=1e-5, rtol=0)


@pytest.mark.parametrize("soft_edge", [0.0, 0.2])
def test_cutoff_zero_puts_everything_in_high_part(soft_edge: float) -> None:
    x = _feats(6, 10)
    low, high = frequency_split(x, 0.0, soft_edge)
    assert torch.count_nonzero(low) == 0  # not even the DC term
    torch.testing.assert_close(high, x, atol=0, rtol=0)


@pytest.mark.parametrize("soft_edge", [0.0, 0.2])
@pytest.mark.parametrize("grid", [(8, 8), (7, 10)])
def test_cutoff_past_corner_puts_everything_in_low_part(soft_edge: float, grid: tuple[int, int]) -> None:
    x = _feats(*grid)
    cutoff = CORNER_RADIUS + soft_edge + 1e-3
    assert bool((low_pass_mask(*grid, cutoff, soft_edge) == 1).all())
    low, high = frequency_split(x, cutoff, soft_edge)
    torch.testing.assert_close(low, x, atol=1e-5, rtol=0)
    assert high.abs().max() < 1e-5


def test_small_cutoff_keeps_exactly_the_mean() -> None:
    """Only the DC bin lies inside a tiny cutoff: the low part is the per-channel spatial mean."""
    x = _feats(6, 9)
    low, high = frequency_split(x, 1e-3)
    torch.testing.assert_close(low, x.mean(dim=(-2, -1), keepdim=True).expand_as(x), atol=1e-5, rtol=0)
    torch.testing.assert_close(high.mean(dim=(-2, -1)), torch.zeros(2, 5), atol=1e-5, rtol=0)


def test_radius_is_normalised_per_axis_on_non_square_grids() -> None:
    r = radius_grid(4, 8, centred=False)
    # Nyquist on each axis is radius 1, whatever the axis length.
    assert r[2, 0].item() == pytest.approx(1.0) and r[0, 4].item() == pytest.approx(1.0)
    assert r.max().item() == pytest.approx(math.sqrt(2.0))
    centred = radius_grid(4, 8)
    assert centred[2, 4].item() == 0.0  # DC in the middle after fftshift
    # A cutoff of 0.6 keeps |fy| < 0.6 (one bin each side on 4 rows) and |fx| < 0.6 (two bins each side on 8).
    mask = low_pass_mask(4, 8, 0.6)
    assert mask[:, 4].tolist() == [0.0, 1.0, 1.0, 1.0] and mask[2].tolist() == [0, 0, 1, 1, 1, 1, 1, 0]


def test_soft_edge_ramp_is_monotone_between_zero_and_one() -> None:
    mask = low_pass_mask(32, 32, 0.5, 0.3, centred=False)
    r = radius_grid(32, 32, centred=False)
    assert bool((mask[r <= 0.2] == 1).all()) and bool((mask[r >= 0.5] == 0).all())
    inside = (r > 0.2) & (r < 0.5)
    assert bool(((mask[inside] > 0) & (mask[inside] < 1)).all())
    order = torch.argsort(r.flatten())
    assert bool((mask.flatten()[order].diff() <= 1e-7).all())


def test_learnable_cutoff_gets_a_gradient_and_stays_in_range() -> None:
    split = FrequencySplit(cutoff=0.4, soft_edge=0.3, learnable=True)
    assert split.cutoff().item() == pytest.approx(0.4, abs=1e-5)
    x = _feats(12, 12).flatten(2).transpose(1, 2)
    low, high = split(x, (12, 12))
    (low.pow(2).sum() - high.pow(2).sum()).backward()
    grad = split.cutoff_logit.grad
    assert grad is not None and grad.abs().item() > 0
    with torch.no_grad():
        split.cutoff_logit.fill_(50.0)
    assert split.cutoff().item() <= CORNER_RADIUS + 0.3 + 1e-6


def test_fixed_split_has_no_parameters_and_learnable_needs_soft_edge() -> None:
    assert list(FrequencySplit(0.25).parameters()) == []
    with pytest.raises(ValueError, match="soft_edge > 0"):
        FrequencySplit(0.25, soft_edge=0.0, learnable=True)
    with pytest.raises(ValueError, match="cutoff"):
        frequency_split(_feats(), -0.1)
    with pytest.raises(ValueError, match="B x C x h x w"):
        frequency_split(torch.zeros(3, 4, 4), 0.25)


@pytest.mark.parametrize("cutoff, soft_edge", [(0.0, 0.0), (0.25, 0.0), (0.6, 0.2), (1.0, 0.05), (2.0, 0.0)])
@pytest.mark.parametrize("grid", [(6, 6), (5, 8)])
def test_token_split_matches_the_fft_split(cutoff: float, soft_edge: float, grid: tuple[int, int]) -> None:
    """The module's matrix form (token layout) gives the FFT route's numbers."""
    x = _feats(*grid)
    low, high = frequency_split(x, cutoff, soft_edge)
    tokens = x.flatten(2).transpose(1, 2)
    split = FrequencySplit(cutoff, soft_edge)
    t_low, t_high = split(tokens, grid)
    torch.testing.assert_close(t_low, low.flatten(2).transpose(1, 2), atol=1e-5, rtol=0)
    torch.testing.assert_close(t_low + t_high, tokens, atol=1e-5, rtol=0)
    assert split.operator(grid, torch.device("cpu")) is split.operator(grid, torch.device("cpu"))  # cached
    if soft_edge == 0:  # a hard low-pass filter is a projection
        operator = low_pass_operator(*grid, cutoff)
        torch.testing.assert_close(operator @ operator, operator, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="tokens"):
        split(tokens, (grid[0] + 1, grid[1]))
