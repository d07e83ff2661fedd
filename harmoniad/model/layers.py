"""Small building blocks shared by the HarmoniAD branches (FSAM, GSCM) and its decoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class Mlp(nn.Module):
    """Token-wise two-layer MLP (Linear -> GELU -> Linear) with hidden width ``ratio * dim``."""

    def __init__(self, dim: int, ratio: float) -> None:
        super().__init__()
        hidden = max(1, int(round(dim * ratio)))
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


def noisy_dropout(
    x: torch.Tensor, p: float, training: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Dropout that can draw from an explicit generator.

    Training passes a per-step generator so that a resumed run draws the same masks as an
    uninterrupted one, without touching (or saving) the global RNG. ``generator=None``
    falls back to ``F.dropout``.
    """
    if not training or p <= 0:
        return x
    if generator is None:
        return F.dropout(x, p, training=True)
    keep = torch.empty(x.shape, device=x.device, dtype=x.dtype).bernoulli_(1.0 - p, generator=generator)
    return x * keep / (1.0 - p)


def tokens_to_map(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(B, N, D)`` tokens -> ``(B, D, h, w)`` map (a view, no copy)."""
    b, n, d = x.shape
    h, w = grid
    if n != h * w:
        raise ValueError(f"{n} tokens do not fill a {h}x{w} grid")
    return x.transpose(1, 2).reshape(b, d, h, w)


def map_to_tokens(x: torch.Tensor) -> torch.Tensor:
    """``(B, D, h, w)`` map -> ``(B, h*w, D)`` tokens (a view, no copy)."""
    return x.flatten(2).transpose(1, 2)


class DepthwiseConv(nn.Module):
    """Depthwise ``k x k`` convolution applied to tokens on their grid (zero padding)."""

    def __init__(self, dim: int, kernel: int) -> None:
        super().__init__()
        if kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"depthwise kernel size must be odd and >= 1, got {kernel}")
        self.conv = nn.Conv2d(dim, dim, kernel, padding=kernel // 2, groups=dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int], skip_centre: bool = False) -> torch.Tensor:
        """``skip_centre``: the kernel's centre tap zeroed, so no output reads its own position."""
        if not skip_centre:
            return map_to_tokens(self.conv(tokens_to_map(x, grid)))
        conv = self.conv
        weight = conv.weight.clone()
        weight[..., conv.kernel_size[0] // 2, conv.kernel_size[1] // 2] = 0
        out = F.conv2d(tokens_to_map(x, grid), weight, conv.bias, padding=conv.padding, groups=conv.groups)
        return map_to_tokens(out)


def position_table(table: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(1, h*w, D)`` embeddings: a ``(1, D, t, t)`` table resampled bilinearly to ``grid`` (as is when it matches)."""
    if tuple(table.shape[-2:]) != tuple(grid):
        table = F.interpolate(table, size=grid, mode="bilinear", align_corners=False)
    return map_to_tokens(table)


def sincos_positions(grid: tuple[int, int], dim: int, device: torch.device) -> torch.Tensor:
    """Fixed 2-D sine-cosine position code ``(h*w, dim)`` of a grid, coordinates scaled to [0, 1].

    Scaled coordinates make the code of an image position independent of the grid size, so a
    model trained at one resolution reads the same code at another; no parameters.
    """
    h, w = grid
    quarter = max(1, dim // 4)
    freqs = math.pi * 2.0 ** torch.arange(quarter, device=device, dtype=torch.float32).clamp_max(8)
    ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
    xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    parts = [f(c.flatten()[:, None] * freqs) for c in (yy, xx) for f in (torch.sin, torch.cos)]
    code = torch.cat(parts, dim=-1)
    return F.pad(code, (0, dim - code.shape[-1])) if code.shape[-1] < dim else code[:, :dim]
