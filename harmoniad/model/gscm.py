"""GSCM, the global structural context module of the low-frequency branch.

docs/design.md#gscm: on ``F_low`` it relates every position to every other one, so
that the semantics of a part (its colour, its presence, its place) are judged in the
context of the whole image; stains, colour shifts and missing or displaced parts are
global anomalies. Attention is *linear* (kernelised, ``elu + 1`` feature map): cost grows
linearly with the number of positions, and a linear attention cannot focus sharply on a
single token (the argument of Dinomaly).

Two decoders (``queries``):

- ``"positions"`` (the default of ``ModelConfig``): every position is decoded from a query
  that knows only the position (a learned embedding) and reads the image's tokens with
  its own token left out, so the output there cannot copy the input there. A missing part
  looks like background that is normal elsewhere; what the rest of the image says belongs
  at that place differs from it.
- ``"tokens"``: self-attention blocks on the (noisy) tokens, with a depthwise convolution
  before attention for position ("conditional position encoding").
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from harmoniad.model.layers import DepthwiseConv, Mlp, map_to_tokens, position_table


def _window_sums(k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int],
                 radius: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position, the keys and values of its ``(2r+1)^2`` grid neighbourhood (zeros off the grid).

    ``k``, ``v``: ``B x heads x N x d`` -> ``B x heads x N x W x d`` with ``W = (2r+1)^2``.
    """
    b, h, n, d = k.shape
    size = 2 * radius + 1

    def unfold(t: torch.Tensor) -> torch.Tensor:
        t = t.permute(0, 1, 3, 2).reshape(b * h, d, *grid)
        t = F.unfold(t, size, padding=radius)  # (B*heads) x (d*W) x N
        return t.reshape(b, h, d, size * size, n).permute(0, 1, 4, 3, 2)

    return unfold(k), unfold(v)


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """``elu(x) + 1``, the positive feature map of linear attention, as ``max(x, 0) + exp(min(x, 0))``.

    The same function and gradient; written with ``exp`` because ATen's CPU ``elu`` runs a
    scalar ``expm1`` per element (about 8x slower than ``exp``, and the largest single op
    of GSCM on a CPU).
    """
    return x.clamp_min(0.0) + x.clamp_max(0.0).exp()


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float = 1e-6,
                     exclude: int = -1, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Kernelised attention on ``B x heads x N x d`` tensors, in float32: ``phi(q)^T KV / phi(q)^T sum phi(k)``.

    ``exclude = r >= 0`` removes, from the sums that query ``n`` reads, the keys and values
    of every position within ``r`` grid steps of ``n`` (Chebyshev distance on ``grid``;
    ``r = 0``: ``n``'s own, ``KV - phi(k_n) v_n^T``). Linear attention allows this for the
    cost of a ``(2r+1)^2`` window: the window's share is subtracted from the global sums.
    """
    q, k, v = q.float(), k.float(), v.float()
    q, k = elu_plus_one(q), elu_plus_one(k)
    with torch.autocast(device_type=q.device.type, enabled=False):
        kv = torch.einsum("bhnd,bhne->bhde", k, v)
        out = torch.einsum("bhnd,bhde->bhne", q, kv)
        norm = torch.einsum("bhnd,bhd->bhn", q, k.sum(dim=2))
        if exclude == 0:
            own = (q * k).sum(dim=-1)
            out = out - own.unsqueeze(-1) * v
            norm = norm - own
        elif exclude > 0:
            if grid is None:
                raise ValueError("excluding a neighbourhood needs the grid")
            kw, vw = _window_sums(k, v, grid, exclude)
            near = torch.einsum("bhnd,bhnwd->bhnw", q, kw)
            out = out - torch.einsum("bhnw,bhnwe->bhne", near, vw)
            total, norm = norm, norm - near.sum(dim=-1)
            # Nothing left to read (the window covers the grid): what remains is rounding, read nothing.
            norm = torch.where(norm > 1e-5 * total, norm, torch.full_like(norm, float("inf")))
    return out / (norm.unsqueeze(-1) + eps)


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
        out = linear_attention(*qkv.unbind(0), eps=self.eps)
        return self.proj(out.transpose(1, 2).reshape(b, n, d).to(x.dtype))


class ContextAttention(nn.Module):
    """Linear attention of position queries over the image's tokens, each query blind to its own token."""

    def __init__(self, dim: int, heads: int, exclude: int = 0, eps: float = 1e-6) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"GSCM hidden dim {dim} must be divisible by its {heads} heads")
        self.heads = heads
        self.exclude = exclude
        self.eps = eps
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        b, n, d = context.shape
        q = self.q(query).reshape(query.shape[0], n, self.heads, d // self.heads).transpose(1, 2)
        k, v = self.kv(context).reshape(b, n, 2, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        out = linear_attention(q.expand(b, -1, -1, -1), k, v, eps=self.eps, exclude=self.exclude, grid=grid)
        return self.proj(out.transpose(1, 2).reshape(b, n, d).to(context.dtype))


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


class QueryBlock(nn.Module):
    """``q + context_attn(norm(q), norm(tokens))``, then ``q + mlp(norm(q))``; the tokens are read, never changed."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, exclude: int) -> None:
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_c = nn.LayerNorm(dim)
        self.attn = ContextAttention(dim, heads, exclude)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_ratio)

    def forward(self, q: torch.Tensor, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        q = q + self.attn(self.norm_q(q), self.norm_c(tokens), grid)
        return q + self.mlp(self.norm2(q))


GscmQueries = Literal["tokens", "positions"]


class GSCM(nn.Module):
    """A stack of ``depth`` global context blocks on ``(B, h*w, D)`` low-frequency tokens.

    ``queries="tokens"``: self-attention blocks, each token updated from all tokens (itself
    included). ``queries="positions"`` (docs/design.md#gscm): the output at a position is
    decoded from a query that knows only the position and reads the image's tokens by linear attention that leaves that
    position's own token out, block after block; the tokens themselves are never mixed.
    Queries and tokens get learned position embeddings (a ``table x table`` grid resampled
    to the feature grid), so what belongs at each place is a free parameter per place. Each
    entry is trained by one place per image only, so the tables learn with a ``gain``
    times larger step (reparametrised: stored divided by ``gain``, multiplied back).
    """

    def __init__(self, dim: int, depth: int = 1, heads: int = 4, mlp_ratio: float = 2.0, pos_conv: bool = True,
                 queries: GscmQueries = "tokens", table: int = 16, exclude: int = 0, gain: float = 1.0) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"GSCM depth must be >= 1, got {depth}")
        if queries not in ("tokens", "positions"):
            raise ValueError(f"GSCM queries must be 'tokens' or 'positions', got {queries!r}")
        self.queries = queries
        if queries == "tokens":
            self.blocks = nn.ModuleList(ContextBlock(dim, heads, mlp_ratio, pos_conv) for _ in range(depth))
        else:
            if table < 1 or gain <= 0:
                raise ValueError(f"GSCM position table needs size >= 1 and gain > 0, got {table}, {gain}")
            # Learned position embeddings on a table x table grid, resampled to the feature grid.
            # Stored divided by ``gain`` and multiplied back: under Adam, ``gain`` times the step.
            self.gain = gain
            self.query_pos = nn.Parameter(0.02 * torch.randn(1, dim, table, table) / gain)
            self.token_pos = nn.Parameter(0.02 * torch.randn(1, dim, table, table) / gain)
            self.blocks = nn.ModuleList(QueryBlock(dim, heads, mlp_ratio, exclude) for _ in range(depth))

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        if self.queries == "tokens":
            for block in self.blocks:
                x = block(x, grid)
            return x
        tokens = x + self.gain * position_table(self.token_pos, grid).to(x.dtype)  # so a query can read its region
        q = self.gain * position_table(self.query_pos, grid).to(x.dtype)
        for block in self.blocks:
            q = block(q, tokens, grid)
        return q  # B x N x D: the first block's attention gave the queries the batch dimension

