"""FSAM's windows tile any grid with full windows: no padding, no mask, so SDPA may use a fused kernel."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from harmoniad.model import fsam
from harmoniad.model.fsam import WindowAttention, window_indices


def _reference(attn: WindowAttention, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Position by position: softmax attention over the tokens of its own full window, written out."""
    h, w = grid
    win_h, win_w = min(attn.window, h), min(attn.window, w)
    b, n, d = x.shape
    hd = d // attn.heads
    q, k, v = attn.qkv(x).reshape(b, n, 3, attn.heads, hd).unbind(2)
    out = torch.empty(b, n, attn.heads, hd)
    for y in range(h):
        for xx in range(w):
            # Own window: the (y // win)-th, or the one flush with the edge past the last full one.
            y0 = min((y // win_h) * win_h, h - win_h)
            x0 = min((xx // win_w) * win_w, w - win_w)
            members = [r * w + c for r in range(y0, y0 + win_h) for c in range(x0, x0 + win_w)]
            p = y * w + xx
            logits = torch.einsum("bhd,bmhd->bhm", q[:, p], k[:, members]) / hd**0.5
            out[:, p] = torch.einsum("bhm,bmhd->bhd", logits.softmax(-1), v[:, members])
    return attn.proj(out.reshape(b, n, d))


@pytest.mark.parametrize("grid, window", [((6, 6), 3), ((5, 7), 3), ((24, 24), 7), ((3, 2), 4), ((1, 9), 4)])
def test_windowed_attention_equals_the_written_out_reference(grid, window):
    torch.manual_seed(0)
    attn = WindowAttention(8, heads=2, window=window).eval()
    x = torch.randn(2, grid[0] * grid[1], 8)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, grid), _reference(attn, x, grid), atol=1e-5, rtol=1e-4)


def test_every_token_is_read_back_from_exactly_one_window_slot_that_holds_it():
    for grid, window in [((24, 24), 7), ((5, 7), 3), ((8, 8), 4), ((13, 6), 5)]:
        gather, scatter = window_indices(grid, window, torch.device("cpu"))
        n = grid[0] * grid[1]
        assert scatter.shape == (n,) and torch.equal(gather.reshape(-1)[scatter], torch.arange(n))
        assert gather.shape[1] == min(window, grid[0]) * min(window, grid[1])  # full windows only


def test_sdpa_gets_full_windows_and_no_mask_so_a_fused_kernel_applies(monkeypatch):
    """24 x 24 grid, 7 x 7 windows (ViT-L-14-336 with the default FSAM): 16 tiles of 49 tokens, no mask."""
    calls = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((tuple(q.shape), args, kwargs))
        return sdpa(q, k, v, *args, **kwargs)

    attn = WindowAttention(16, heads=2, window=7).eval()
    x = torch.randn(3, 24 * 24, 16)
    monkeypatch.setattr(fsam.F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        attn(x, (24, 24))
    assert calls == [((3 * 16, 2, 49, 8), (), {})]
    monkeypatch.undo()
    with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # the fused kernel alone is enough
        assert torch.isfinite(attn(x, (24, 24))).all()
