"""GSCM, the global structural context module of the low-frequency branch.

docs/design.md#gscm: on ``F_low`` it relates every position to every other one, so
that the semantics of a part (its colour, its presence, its place) are judged in the
context of the whole image; stains, colour shifts and missing or displaced parts are
global anomalies. Attention is *linear* (kernelised, ``elu + 1`` feature map): cost grows
linearly with the number of positions, and a linear attention cannot focus sharply on a
single token, which also keeps the reconstruction from copying its input (the argument of
Dinomaly). A depthwise convolution before attention gives the tokens their position
("conditional position encoding"), so any grid size works without a position table.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from harmoniad.model.layers import DepthwiseConv, Mlp


class LinearAttention(nn.Module):
    """Global multi-head linear attention over all ``N`` tokens, O(N D^2).

    The kernel sums run in float32 (they add up ``N`` positive terms, too coarse in bf16).
    """

    def __init__(self, dim: int, heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"GSCM hidden dim {dim} must be divisible by its {heads} heads")
        self.heads = heads
        self.eps = eps
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = (t.float() for t in qkv.unbind(0))
        q, k = F.elu(q) + 1.0, F.elu(k) + 1.0
        with torch.autocast(device_type=x.device.type, enabled=False):
            kv = torch.einsum("bhnd,bhne->bhde", k, v)
            norm = torch.einsum("bhnd,bhd->bhn", q, k.sum(dim=2)).unsqueeze(-1) + self.eps
            out = torch.einsum("bhnd,bhde->bhne", q, kv) / norm
        out = out.transpose(1, 2).reshape(b, n, d).to(x.dtype)
        return self.proj(out)


class ContextBlock(nn.Module):
    """Position conv, then ``x + linear_attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, pos_conv: bool) -> None:
        super().__init__()
        self.pos = DepthwiseConv(dim, 3) if pos_conv else None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = LinearAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.pos is not None:
            x = x + self.pos(x, grid)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GSCM(nn.Module):
    """A stack of ``depth`` global context blocks on ``(B, h*w, D)`` low-frequency tokens."""

    def __init__(self, dim: int, depth: int = 1, heads: int = 4, mlp_ratio: float = 2.0, pos_conv: bool = True) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"GSCM depth must be >= 1, got {depth}")
        self.blocks = nn.ModuleList(ContextBlock(dim, heads, mlp_ratio, pos_conv) for _ in range(depth))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, grid)
        return x


ContextMask = Literal["off", "checker", "grid"]


def context_masks(grid: tuple[int, int], mode: ContextMask, block: int = 1,
                  shift: tuple[int, int] = (0, 0), device: torch.device | str = "cpu") -> torch.Tensor:
    """``(K, h*w)`` boolean masks of the tokens hidden in each of ``K`` complementary passes.

    Every token is hidden in exactly one pass, so the GSCM output kept for a token is always
    computed without that token's own input (docs/design.md#context-only-reconstruction).
    The grid is cut into ``block x block`` cells (offset by ``shift``); ``"checker"`` hides
    alternate cells in ``K = 2`` passes, ``"grid"`` one cell of every 2 x 2 group of cells
    in ``K = 4`` passes (each hidden cell is surrounded by visible ones).
    """
    if mode not in ("checker", "grid"):
        raise ValueError(f"context mask must be 'checker' or 'grid', got {mode!r}")
    if block < 1:
        raise ValueError(f"context mask block must be >= 1, got {block}")
    h, w = grid
    cy = torch.div(torch.arange(h, device=device) + shift[0], block, rounding_mode="floor") % 2
    cx = torch.div(torch.arange(w, device=device) + shift[1], block, rounding_mode="floor") % 2
    if mode == "checker":
        cell = (cy[:, None] + cx[None, :]) % 2
    else:
        cell = 2 * cy[:, None] + cx[None, :]
    passes = 2 if mode == "checker" else 4
    return cell.flatten()[None, :] == torch.arange(passes, device=device)[:, None]
