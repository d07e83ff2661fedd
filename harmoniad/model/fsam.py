"""FSAM, the fine-grained structural attention module of the high-frequency branch.

docs/design.md#fsam: on ``F_high`` it sharpens textures and edges, which is where
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

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from harmoniad.model.layers import DepthwiseConv, Mlp, position_table


def _window_starts(n: int, window: int) -> list[int]:
    """Starts of full windows covering ``0..n-1``: every ``window`` steps, the last one flush with the end."""
    starts = list(range(0, n - window + 1, window))
    if starts[-1] + window < n:
        starts.append(n - window)
    return starts


def window_indices(grid: tuple[int, int], window: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(gather, scatter)`` token indices of the windows of ``grid``.

    ``gather`` (``windows x window_len``): the row-major token index of each window slot.
    ``scatter`` (``h * w``): for each token, the flat ``window * window_len + slot`` its
    output is read from (its own window: the one it falls in by ``position // window``).
    """
    h, w = grid
    wh, ww = min(window, h), min(window, w)
    rows, cols = _window_starts(h, wh), _window_starts(w, ww)
    r = torch.tensor(rows).view(-1, 1, 1, 1) + torch.arange(wh).view(1, 1, -1, 1)
    c = torch.tensor(cols).view(1, -1, 1, 1) + torch.arange(ww).view(1, 1, 1, -1)
    gather = (r * w + c).reshape(len(rows) * len(cols), wh * ww)
    y, x = torch.arange(h).view(-1, 1), torch.arange(w).view(1, -1)
    jy, jx = (y // wh).clamp(max=len(rows) - 1), (x // ww).clamp(max=len(cols) - 1)
    slot = (y - torch.tensor(rows)[jy]) * ww + (x - torch.tensor(cols)[jx])
    scatter = ((jy * len(cols) + jx) * (wh * ww) + slot).reshape(h * w)
    return gather.to(device), scatter.to(device)


class WindowAttention(nn.Module):
    """Multi-head self-attention inside ``window x window`` tiles of the grid.

    Every tile is full: where the grid is not a multiple of the window, the last tile of a
    row or column is placed flush with the grid's edge (overlapping its neighbour), and each
    position takes its output from its own tile (``position // window``). So there is no
    padding and no attention mask, and ``scaled_dot_product_attention`` can use a fused
    (flash) kernel on a GPU: a 24 x 24 grid with 7 x 7 windows is 16 tiles of 49 tokens
    instead of a padded 28 x 28 grid with a mask. A window larger than the grid shrinks to it.
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
        self._indices: dict[tuple[int, int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor, grid: tuple[int, int], query: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention of ``x``; with ``query``, queries from it, keys and values from ``x``, own slot left out."""
        b, n, d = x.shape
        key = (grid[0], grid[1], str(x.device))
        if key not in self._indices:
            self._indices[key] = window_indices(grid, self.window, x.device)
        gather, scatter = self._indices[key]
        windows, length = gather.shape
        # q, k, v per token first, then tiled: overlapping tiles repeat tokens (a 16 x 16 grid in
        # 7 x 7 windows is 441 tile slots for 256 tokens), the projection need not. Tiling and
        # untiling use index_select, ~5x faster on one CPU thread than advanced indexing (x[:, idx]).
        tiled = gather.reshape(-1)
        if query is None:  # the token FSAM: no mask argument at all, so a fused kernel applies
            qkv = self.qkv(x).index_select(1, tiled).reshape(b * windows, length, 3, self.heads, d // self.heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            out = F.scaled_dot_product_attention(q, k, v)
        else:  # queries from the query stream (the first third of qkv), keys and values of x, own slot masked
            kv = F.linear(x, self.qkv.weight[d:], self.qkv.bias[d:]).index_select(1, tiled)
            k, v = kv.reshape(b * windows, length, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
            q = F.linear(query, self.qkv.weight[:d], self.qkv.bias[:d]).expand(b, -1, -1).index_select(1, tiled)
            q = q.reshape(b * windows, length, self.heads, d // self.heads).transpose(1, 2)
            mask = ~torch.eye(length, dtype=torch.bool, device=x.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.transpose(1, 2).reshape(b, windows * length, d).index_select(1, scatter)
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
    """``x + gate(l) * l`` with ``l = window_attn(n) + edge(n)``, then ``x + mlp(norm(x))``.

    ``blind``: ``x`` is a query stream and ``l`` reads the (never updated) tokens instead, the
    attention with each query's own slot masked and the edge convolution without its centre tap.
    """

    def __init__(self, dim: int, heads: int, window: int, kernel: int, gate_reduction: int, mlp_ratio: float,
                 blind: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, heads, window)
        self.edge_conv = DepthwiseConv(dim, kernel)
        self.edge_proj = nn.Linear(dim, dim)
        self.gate = ChannelGate(dim, gate_reduction)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)
        self.norm_q = nn.LayerNorm(dim) if blind else None

    def forward(self, x: torch.Tensor, grid: tuple[int, int], tokens: torch.Tensor | None = None) -> torch.Tensor:
        """``tokens`` given: ``x`` is a query stream that reads them, never its own position's token."""
        if tokens is None:
            y = self.norm1(x)
            local = self.attn(y, grid) + self.edge_proj(F.gelu(self.edge_conv(y, grid)))
        else:
            y = self.norm1(tokens)
            edge = self.edge_conv(y, grid, skip_centre=True)
            local = self.attn(y, grid, self.norm_q(x)) + self.edge_proj(F.gelu(edge))
        x = x + self.gate(local) * local
        return x + self.mlp(self.norm2(x))


FsamQueries = Literal["tokens", "positions"]


class FSAM(nn.Module):
    """A stack of ``depth`` FSAM blocks on ``(B, h*w, D)`` tokens of the high-frequency part.

    ``queries="tokens"``: each block updates the tokens (a position reads its own token).
    ``queries="positions"`` (docs/design.md#fsam): as GSCM's position queries, but local: the
    output at a position is a query stream started from a learned position table that reads
    its window's tokens with its own slot masked and an edge convolution without its centre
    tap; the tokens are never updated, so no position reads its own token (except through
    the channel gate's mean over all positions, 1/N of it). A decoder that reads its own
    (noisy) high-band token learns to pass fine defects through; one that cannot must say
    what the texture around it implies.
    """

    def __init__(
        self,
        dim: int,
        depth: int = 1,
        heads: int = 4,
        window: int = 7,
        kernel: int = 3,
        gate_reduction: int = 4,
        mlp_ratio: float = 2.0,
        queries: FsamQueries = "tokens",
        table: int = 16,
        gain: float = 100.0,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"FSAM depth must be >= 1, got {depth}")
        if queries not in ("tokens", "positions"):
            raise ValueError(f"FSAM queries must be 'tokens' or 'positions', got {queries!r}")
        blind = queries == "positions"
        self.blind = blind
        self.blocks = nn.ModuleList(
            FSAMBlock(dim, heads, window, kernel, gate_reduction, mlp_ratio, blind) for _ in range(depth)
        )
        if blind:
            # As GSCM's position queries: learned tables, stored / gain (gain times the step under Adam).
            self.gain = gain
            self.query_pos = nn.Parameter(0.02 * torch.randn(1, dim, table, table) / gain)
            self.token_pos = nn.Parameter(0.02 * torch.randn(1, dim, table, table) / gain)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if not self.blind:
            for block in self.blocks:
                x = block(x, grid)
            return x
        tokens = x + self.gain * position_table(self.token_pos, grid).to(x.dtype)
        q = (self.gain * position_table(self.query_pos, grid).to(x.dtype)).expand(x.shape[0], -1, -1)
        for block in self.blocks:
            q = block(q, grid, tokens)
        return q
