"""Shapes, dtypes and ablation switches of FSAM, GSCM and the HarmoniAD model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harmoniad.config import ConfigError, from_dict, to_dict
from harmoniad.fsam import FSAM, WindowAttention
from harmoniad.gscm import GSCM, LinearAttention
from harmoniad.layers import tokens_to_map
from harmoniad.model import HarmoniAD, ModelConfig, parameter_counts


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread is fastest, and spinning OpenMP threads stall on a busy 2-core box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SMALL = dict(hidden_dim=16, fsam_heads=2, gscm_heads=2, decoder_heads=2, fsam_window=4)


def _feats(b: int = 2, c: int = 24, h: int = 6, w: int = 9, layers: int = 3, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, h, w, generator=gen) for _ in range(layers)]


@pytest.mark.parametrize("grid", [(8, 8), (6, 9), (3, 2), (1, 1)])
def test_fsam_keeps_token_shape_on_any_grid(grid: tuple[int, int]) -> None:
    fsam = FSAM(16, depth=2, heads=2, window=4)
    x = torch.randn(3, grid[0] * grid[1], 16)
    y = fsam(x, grid)
    assert y.shape == x.shape and y.dtype == torch.float32 and torch.isfinite(y).all()


def test_window_attention_is_local_and_padding_is_masked() -> None:
    """A change in one window never reaches another window; padded positions are ignored."""
    attn = WindowAttention(8, heads=2, window=3).eval()
    grid = (5, 7)  # padded to 6 x 9
    x = torch.randn(1, 35, 8)
    y = attn(x, grid)
    x2 = x.clone()
    x2[0, 0] += 10.0 * torch.randn(8)  # position (0, 0), window (0, 0) covers rows 0-2, cols 0-2
    y2 = attn(x2, grid)
    changed = (y2 - y).abs().amax(dim=-1).reshape(5, 7) > 1e-6
    assert changed[:3, :3].any() and not changed[3:].any() and not changed[:, 3:].any()


def test_gscm_is_global_and_keeps_shape() -> None:
    gscm = GSCM(16, depth=1, heads=2, pos_conv=False).eval()
    x = torch.randn(2, 30, 16)
    y = gscm(x, (5, 6))
    assert y.shape == x.shape and y.dtype == torch.float32
    x2 = x.clone()
    x2[:, 0] += 5.0 * torch.randn(16)
    assert ((gscm(x2, (5, 6)) - y)[:, -1].abs() > 1e-6).any()  # the far corner sees the change


def test_linear_attention_matches_explicit_formula() -> None:
    attn = LinearAttention(8, heads=1)
    x = torch.randn(1, 10, 8)
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    q, k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    weights = q @ k.transpose(1, 2)
    ref = attn.proj((weights / weights.sum(dim=-1, keepdim=True)) @ v)
    torch.testing.assert_close(attn(x), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "flags, has_high, has_low",
    [
        ({}, True, True),
        ({"split": False}, False, False),
        ({"branches": "high"}, True, False),
        ({"branches": "low"}, False, True),
        ({"split": False, "branches": "low"}, False, False),
        ({"soft_edge": 0.3, "learnable_cutoff": True}, True, True),
    ],
)
def test_model_outputs_and_ablation_flags(flags: dict, has_high: bool, has_low: bool) -> None:
    cfg = ModelConfig(**SMALL, **flags)
    model = HarmoniAD(cfg, in_dim=24, num_layers=3)
    feats = _feats()
    out = model(feats)
    assert out.grid == (6, 9) and len(out.recon) == 3
    assert all(r.shape == (2, 54, 24) and r.dtype == torch.float32 for r in out.recon)
    torch.testing.assert_close(tokens_to_map(out.target[1], out.grid), feats[1])
    assert (out.recon_high is not None) == has_high and (out.recon_low is not None) == has_low
    if has_high and has_low:
        torch.testing.assert_close(out.target_high[0] + out.target_low[0], out.target[0], atol=1e-5, rtol=0)
    losses = model.loss(out)
    assert losses.total.ndim == 0 and torch.isfinite(losses.total)
    assert (losses.high is not None) == has_high and (losses.low is not None) == has_low
    losses.total.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    with torch.no_grad():
        maps = model.eval().maps(feats)
    assert maps.anomaly.shape == (2, 6, 9) and maps.anomaly.dtype == torch.float32
    assert (maps.high is not None) == has_high and (maps.low is not None) == has_low
    assert float(maps.anomaly.min()) >= 0.0 and float(maps.anomaly.max()) <= 2.0


def test_branch_modules_exist_only_when_used() -> None:
    both = parameter_counts(HarmoniAD(ModelConfig(**SMALL), 24, 3))
    high = parameter_counts(HarmoniAD(ModelConfig(**SMALL, branches="high"), 24, 3))
    low = parameter_counts(HarmoniAD(ModelConfig(**SMALL, branches="low"), 24, 3))
    assert high["gscm"] == 0 and low["fsam"] == 0 and both["fsam"] > 0 and both["gscm"] > 0
    assert both["total"] > high["total"] and both["total"] > low["total"]


def test_eval_is_deterministic_and_dropout_only_in_training() -> None:
    model = HarmoniAD(ModelConfig(**SMALL), 24, 3)
    feats = _feats()
    model.eval()
    a, b = model.maps(feats).anomaly, model.maps(feats).anomaly
    assert torch.equal(a, b)
    model.train()
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    assert torch.equal(model(feats, generator=g1).recon[0], model(feats, generator=g2).recon[0])
    assert not torch.equal(model(feats, generator=torch.Generator().manual_seed(2)).recon[0], a)


def test_hard_mining_uses_the_hardest_positions() -> None:
    cfg = ModelConfig(**SMALL, hard_mining_fraction=0.1, high_loss_weight=0.0, low_loss_weight=0.0)
    model = HarmoniAD(cfg, 24, 3).eval()
    plain = HarmoniAD(ModelConfig(**SMALL, high_loss_weight=0.0, low_loss_weight=0.0), 24, 3).eval()
    plain.load_state_dict(model.state_dict())
    feats = _feats()
    out = model(feats)
    assert model.loss(out).recon > plain.loss(out).recon


def test_wrong_inputs_are_refused_with_the_expected_shape() -> None:
    model = HarmoniAD(ModelConfig(**SMALL), 24, 3)
    with pytest.raises(ValueError, match="3 layers"):
        model(_feats(layers=2))
    with pytest.raises(ValueError, match="B x 24 x"):
        model(_feats(c=16))


def test_config_round_trip_and_validation() -> None:
    cfg = ModelConfig(**SMALL, branches="low", split=False)
    assert from_dict(ModelConfig, to_dict(cfg)) == cfg
    with pytest.raises(ConfigError):
        from_dict(ModelConfig, {**to_dict(cfg), "branches": "middle"})
    with pytest.raises(ValueError, match="learnable_cutoff"):
        ModelConfig(learnable_cutoff=True)
    with pytest.raises(ValueError, match="hard_mining_fraction"):
        ModelConfig(hard_mining_fraction=0.0)


def test_model_on_tiny_backbone_features() -> None:
    from harmoniad.backbone import TINY_BACKBONE, Backbone

    backbone = Backbone(TINY_BACKBONE, device="cpu")
    images = [np.random.default_rng(i).integers(0, 255, (40, 50, 3), dtype=np.uint8) for i in range(2)]
    feats = backbone.extract(backbone.preprocess(images))
    model = HarmoniAD(ModelConfig(**SMALL), backbone.embed_dim, backbone.num_layers).eval()
    with torch.inference_mode():
        maps = model.maps(feats)
    assert maps.anomaly.shape == (2, *backbone.grid) and maps.high is not None and maps.low is not None
