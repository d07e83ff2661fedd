"""Shapes, dtypes and ablation switches of FSAM, GSCM and the HarmoniAD model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from harmoniad.runtime.serialization import ConfigError, from_dict, to_dict
from harmoniad.model.fsam import FSAM, WindowAttention
from harmoniad.model.gscm import GSCM, LinearAttention
from harmoniad.model.frequency import FrequencySplit
from harmoniad.model.layers import map_to_tokens, tokens_to_map
from harmoniad.model import HarmoniAD, ModelConfig, ModelOutput, parameter_counts, split_reconstruction


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
        ({"high_source": "split", "low_source": "split"}, True, True),
        ({"high_source": "split", "low_source": "split", "low_distance": "relative", "soft_edge": 0.3, "learnable_cutoff": True}, True, True),
        ({"high_source": "branch_decoder", "low_source": "branch_decoder"}, True, True),
        ({"high_source": "branch", "low_source": "branch", "high_distance": "cos"}, True, True),
        ({"high_source": "decoder", "low_source": "decoder", "low_distance": "relative"}, True, True),
        ({"high_source": "split", "low_source": "split", "branches": "high"}, True, False),
        ({"high_source": "branch_decoder", "low_source": "branch_decoder", "branches": "low"}, False, True),
        ({"high_source": "split", "low_source": "split", "split": False}, False, False),
        ({"high_source": "split", "low_source": "decoder"}, True, True),
        ({"high_source": "branch", "low_source": "split", "branches": "low"}, False, True),
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


def test_band_heads_per_band_source() -> None:
    """"split" reads the main reconstruction (no band heads); "branch_decoder" adds a decoder per band."""

    def band_params(source: str, **flags: object) -> int:
        model = HarmoniAD(ModelConfig(**SMALL, high_source=source, low_source=source, **flags), 24, 3)  # type: ignore[arg-type]
        return sum(p.numel() for p in model.band_heads.parameters())

    assert band_params("split") == 0 and band_params("decoder", split=False) == 0
    assert band_params("decoder") == band_params("branch") > 0
    assert band_params("branch_decoder") > band_params("decoder")
    assert band_params("branch_decoder", branches="high") * 2 == band_params("branch_decoder")
    mixed = HarmoniAD(ModelConfig(**SMALL, high_source="split", low_source="decoder"), 24, 3)
    assert list(mixed.band_heads) == ["low"]


@pytest.mark.parametrize("design, reads_decoder", [("decoder", True), ("branch", False), ("branch_decoder", False)])
def test_band_heads_read_the_decoder_or_their_branch(design: str, reads_decoder: bool) -> None:
    """"decoder" band heads see the shared decoder's context; the others only their own branch."""
    model = HarmoniAD(ModelConfig(**SMALL, high_source=design, low_source=design), 24, 3).eval()  # type: ignore[arg-type]
    feats = _feats()
    with torch.no_grad():
        before = model(feats)
        for param in model.decoder.parameters():
            param.add_(0.5 * torch.randn_like(param))
        after = model(feats)
    assert not torch.allclose(before.recon[0], after.recon[0])
    for band in ("recon_high", "recon_low"):
        changed = not torch.allclose(getattr(before, band)[0], getattr(after, band)[0])
        assert changed == reads_decoder


def _oracle_maps(target_map: torch.Tensor, recon_map: torch.Tensor, **distances: str):
    """Branch maps of the ``"split"`` source for a given reconstruction (here a perfect normal one)."""
    grid = tuple(target_map.shape[-2:])
    splitter = FrequencySplit(0.25)
    target, recon = [map_to_tokens(target_map)], [map_to_tokens(recon_map)]
    lows, highs = split_reconstruction(splitter, recon, target, grid, distances["low"], distances["high"])
    t_low, t_high = splitter(target[0], grid)
    out = ModelOutput(grid=grid, recon=recon, target=target, recon_high=highs, target_high=[t_high],
                      recon_low=lows, target_low=[t_low], high_distance=distances["high"],
                      low_distance=distances["low"])
    return HarmoniAD.output_maps(out)


def _smooth_normal(c: int = 16, h: int = 8, w: int = 8) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base, a, b = (torch.randn(c, 1, 1, generator=gen) * s for s in (2.0, 1.0, 1.0))
    return (base + a * torch.sin(3 * xx) + b * torch.cos(2 * yy))[None]


def test_branch_maps_respond_in_the_matching_band() -> None:
    """Against a perfect normal reconstruction: a one-position spike (structural) lights the high map
    at that position only; a shift of the whole image (semantic) lights the low map, not the high one."""
    normal = _smooth_normal()
    clean = _oracle_maps(normal, normal, high="relative", low="cos")
    assert float(clean.high.abs().max()) < 1e-5 and float(clean.low.abs().max()) < 1e-5

    spike = normal.clone()
    spike[0, :, 3, 5] += 3.0 * torch.randn(16, generator=torch.Generator().manual_seed(1))
    maps = _oracle_maps(spike, normal, high="relative", low="cos")
    assert int(maps.high.flatten().argmax()) == 3 * 8 + 5
    second = float(maps.high.flatten().topk(2).values[1])
    assert float(maps.high[0, 3, 5]) > 0.1 > 100 * max(second, float(maps.low.max()))

    shifted = normal + 2.0 * torch.randn(1, 16, 1, 1, generator=torch.Generator().manual_seed(2))
    maps = _oracle_maps(shifted, normal, high="relative", low="cos")
    assert float(maps.low.mean()) > 0.1 > 10 * float(maps.high.mean())


def test_relative_split_maps_reduce_to_the_anomaly_map() -> None:
    """With one band covering the whole spectrum, its relative map is exactly ``1 - cos``."""
    feats = [f + 1.0 for f in _feats()]
    for cutoff, band in ((2.0, "low"), (0.0, "high")):
        cfg = ModelConfig(**SMALL, high_source="split", low_source="split", cutoff=cutoff, high_distance="relative",
                          low_distance="relative")
        with torch.no_grad():
            maps = HarmoniAD(cfg, 24, 3).eval().maps(feats)
        torch.testing.assert_close(getattr(maps, band), maps.anomaly, atol=1e-5, rtol=1e-5)


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
    maps_cfg = ModelConfig(**SMALL, high_source="branch_decoder", low_source="decoder", high_distance="cos",
                           low_distance="relative")
    assert from_dict(ModelConfig, to_dict(maps_cfg)) == maps_cfg
    with pytest.raises(ConfigError, match="low_source"):
        from_dict(ModelConfig, {**to_dict(cfg), "low_source": "fused"})
    with pytest.raises(ValueError, match="high_distance"):
        ModelConfig(high_distance="l2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="branch_decoder_depth"):
        ModelConfig(branch_decoder_depth=-1)
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
