"""FSAM, the fine-grained structural attention module of the high-frequency branch.

DESIGN section 2, step 3: on ``F_high`` it sharpens textures and edges, which is where
small structural defects (scratches, cracks, pin holes) live. Each block has three parts,
chosen for that job:

- windowed self-attention: each position attends to its neighbours in a local window, so
  it compares a texture patch with the patches around it (and stays linear in the grid
  size);
- a depthwise-convolution edge path: a learned local filter per channel, the cheapest
  operator that responds to edges and also gives the block its sense of position;
- a channel gate (squeeze-and-excitation): picks, per image, the channels that carry
  structure, from the pooled statistics of the two local paths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from harmoniad.model.layers import DepthwiseConv, Mlp


class WindowAttention(nn.Module):
    """Multi-head self-attention inside non-overlapping ``window x window`` tiles.

    Grids that are not a multiple of the window are zero-padded and the padded keys are
    masked out, so any grid size works; a window larger than the grid shrinks to it.
    """

    def __init__(self, dim: int, heads: int, window: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"FSAM hidden dim {dim} must be divisible by its {heads} heads")
        if window < 1:
            raise ValueError(f"FSAM window must be >= 1, got {window}")
        self.heads = heads
        self.window = window
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, n, d = x.shape
        h, w = grid
        wh, ww = min(self.window, h), min(self.window, w)
        ph, pw = (-h) % wh, (-w) % ww
        x = x.reshape(b, h, w, d)
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
        hp, wp = h + ph, w + pw
        nh, nw = hp // wh, wp // ww
        # (B, nh, wh, nw, ww, D) -> (B * nh * nw, wh * ww, D)
        tiles = x.reshape(b, nh, wh, nw, ww, d).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, wh * ww, d)
        qkv = self.qkv(tiles).reshape(tiles.shape[0], wh * ww, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        mask = None
        if ph or pw:
            valid = torch.zeros(hp, wp, dtype=torch.bool, device=x.device)
            valid[:h, :w] = True
            valid = valid.reshape(nh, wh, nw, ww).permute(0, 2, 1, 3).reshape(nh * nw, 1, 1, wh * ww)
            mask = valid.repeat(b, 1, 1, 1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, nh, nw, wh, ww, d).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, d)
        out = out[:, :h, :w].reshape(b, n, d)
        return self.proj(out)


class ChannelGate(nn.Module):
    """Squeeze-and-excitation: per-image channel weights in (0, 1) from pooled tokens."""

    def __init__(self, dim: int, reduction: int) -> None:
        super().__init__()
        hidden = max(1, dim // max(1, reduction))
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.mean(dim=1, keepdim=True)
        return torch.sigmoid(self.fc2(F.gelu(self.fc1(pooled))))


class FSAMBlock(nn.Module):
    """``x + gate(l) * l`` with ``l = window_attn(n) + edge(n)``, then ``x + mlp(norm(x))``."""

    def __init__(self, dim: int, heads: int, window: int, kernel: int, gate_reduction: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.edge_conv = DepthwiseConv(dim, kernel)
        self.edge_proj = nn.Linear(dim, dim)
        self.gate = ChannelGate(dim, gate_reduction)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        y = self.norm1(x)
        local = self.attn(y, grid) + self.edge_proj(F.gelu(self.edge_conv(y, grid)))
        x = x + self.gate(local) * local
        return x + self.mlp(self.norm2(x))


class FSAM(nn.Module):
    """A stack of ``depth`` FSAM blocks on ``(B, h*w, D)`` tokens of the high-frequency part."""

    def __init__(
        self,
        dim: int,
        depth: int = 1,
        heads: int = 4,
        window: int = 7,
        kernel: int = 3,
        gate_reduction: int = 4,
        mlp_ratio: float = 2.0,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"FSAM depth must be >= 1, got {depth}")
        self.blocks = nn.ModuleList(
            FSAMBlock(dim, heads, window, kernel, gate_reduction, mlp_ratio) for _ in range(depth)
        )

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, grid)
        return x
