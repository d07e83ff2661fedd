"""Weights cast to bf16 once for inference: what CUDA runs, emulated on the CPU with CPU bf16 autocast."""

from __future__ import annotations

import torch

from harmoniad.backbone import TINY_BACKBONE, Backbone
from harmoniad.model import HarmoniAD, ModelConfig
from harmoniad.runtime.device import bf16_weights, cast_for_inference

SMALL = ModelConfig(hidden_dim=32, fsam_heads=2, gscm_heads=2, fsam_window=4)


def test_bf16_weights_casts_everything_but_norms_and_scalars_and_freezes():
    torch.manual_seed(0)
    model = HarmoniAD(ModelConfig(hidden_dim=32, fsam_heads=2, gscm_heads=2, fsam_window=4, learnable_cutoff=True, soft_edge=0.05), 64, 2)
    cutoffs = {n: p.detach().clone() for n, p in model.named_parameters() if p.ndim == 0}
    assert cutoffs  # the learnable cutoff is a scalar parameter
    bf16_weights(model)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            keep = isinstance(module, (torch.nn.LayerNorm, torch.nn.GroupNorm)) or p.ndim == 0
            assert p.dtype == (torch.float32 if keep else torch.bfloat16), (type(module).__name__, name)
            assert not p.requires_grad
    for name, p in model.named_parameters():
        if name in cutoffs:
            assert torch.equal(p, cutoffs[name])  # not rounded: the split is unchanged


def test_cpu_keeps_fp32_weights_untouched():
    model = HarmoniAD(SMALL, 64, 2)
    assert cast_for_inference(model, torch.device("cpu")) is model
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_backbone_and_heads_with_bf16_weights_under_autocast_match_fp32():
    """The CUDA scoring path (bf16 weights + bf16 autocast) runs and stays close to fp32."""
    torch.manual_seed(0)
    backbone = Backbone(TINY_BACKBONE, "cpu")
    model = HarmoniAD(SMALL, backbone.embed_dim, backbone.num_layers).eval()
    x = torch.randn(2, 3, 128, 128)
    layers = [i - 1 for i in backbone.layers]

    def run(bb: Backbone, heads: HarmoniAD, dtype: torch.dtype | None) -> tuple[list[torch.Tensor], torch.Tensor]:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            feats = bb.model.visual.forward_intermediates(
                x, indices=layers, stop_early=True, intermediates_only=True, output_fmt="NCHW"
            )["image_intermediates"]
            feats = [f.float() for f in feats]
            return feats, heads.output_maps(heads(feats)).anomaly.float()

    ref_feats, ref_map = run(backbone, model, None)
    bf16_weights(backbone.model)
    feats, anomaly = run(backbone, bf16_weights(model), torch.bfloat16)
    for f, r in zip(feats, ref_feats):
        assert float((f - r).abs().max() / r.abs().max()) < 0.05
    assert anomaly.shape == ref_map.shape and torch.isfinite(anomaly).all()
    assert float((anomaly - ref_map).abs().max() / ref_map.abs().max()) < 0.05
