"""Readiness for real weights: the ViT-L-14-336 architecture, built with random weights (no download),
gives the layer names and token shapes HarmoniAD expects, and the default heads run on them."""

from __future__ import annotations

import torch

from harmoniad.backbone import Backbone, BackboneConfig
from harmoniad.backbone.encoder import resolve_spec
from harmoniad.model import HarmoniAD, ModelConfig

REAL = BackboneConfig(model="ViT-L-14-336", weights="random", image_size=336)


def test_config_derived_shapes_of_vit_l_14_336() -> None:
    spec = resolve_spec(REAL)
    assert (spec.width, spec.depth, spec.patch_size) == (1024, 24, 14)
    assert spec.layers == (6, 12, 18, 24)
    assert spec.feature_shapes == [(1024, 24, 24)] * 4


def test_vit_l_14_336_random_weights_through_backbone_and_default_heads() -> None:
    """The real tower (about 300M parameters, 2.5 GB, one 336 x 336 image: seconds on CPU)."""
    backbone = Backbone(REAL, device="cpu")
    blocks = backbone.model.visual.transformer.resblocks
    assert len(blocks) == 24
    names = {name for name, _ in backbone.model.visual.named_modules()}
    assert {f"transformer.resblocks.{i - 1}" for i in backbone.layers} <= names
    with torch.inference_mode():
        feats = backbone.extract(torch.randn(1, 3, 336, 336, generator=torch.Generator().manual_seed(0)))
    assert [tuple(f.shape) for f in feats] == [(1, 1024, 24, 24)] * 4
    assert all(torch.isfinite(f).all() for f in feats)
    model = HarmoniAD(ModelConfig(), backbone.embed_dim, backbone.num_layers).eval()
    model.fit_normalisation([feats])
    with torch.inference_mode():
        out = model(feats)
        maps = model.output_maps(out)
    assert [tuple(r.shape) for r in out.recon_high] == [(1, 576, 1024)] * 4
    assert [tuple(r.shape) for r in out.recon_low] == [(1, 576, 1024)] * 4
    assert maps.anomaly.shape == maps.high.shape == maps.low.shape == (1, 24, 24)
    assert torch.isfinite(maps.anomaly).all()
