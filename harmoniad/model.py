"""HarmoniAD: frequency split, FSAM and GSCM branches, fusion, noisy bottleneck, reconstruction.

DESIGN section 2, steps 2-8. The input is the list of frozen encoder maps ``F_l``
(B x C x h x w, one per chosen backbone block). Data flow:

1. split every ``F_l`` into ``F_low_l + F_high_l`` (``harmoniad.frequency``);
2. per branch, project every layer (LayerNorm + Linear, C -> D) and average the layers
   into one token map; light dropout on it (``input_dropout``) keeps the branch from
   copying its input;
3. FSAM on the high tokens, GSCM on the low tokens;
4. fusion: a gated sum ``g * Wh(high) + (1 - g) * Wl(low)``, ``g`` per position and
   channel; then the noisy bottleneck (``bottleneck_dropout``, training only) and a small
   global decoder (``decoder_depth`` context blocks) that has to fill in what was dropped;
5. per-layer heads (D -> C) reconstruct every ``F_l`` from the decoder output; per-branch
   heads reconstruct ``F_high_l`` from the FSAM output and ``F_low_l`` from the GSCM output.

Maps are ``1 - cos`` per position, averaged over layers: the anomaly map against ``F``,
and the two branch maps against ``F_high`` / ``F_low``.

Ablations are config values: ``split=False`` feeds the unsplit ``F`` to the branches and
has no branch heads, losses or maps; ``branches="high"`` / ``"low"`` keeps one branch, whose
output then goes to the bottleneck alone (no gate) and whose branch map is the only one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from harmoniad.frequency import FrequencySplit
from harmoniad.fsam import FSAM
from harmoniad.gscm import GSCM, ContextBlock
from harmoniad.layers import map_to_tokens, noisy_dropout

Branches = Literal["both", "high", "low"]


@dataclass(frozen=True)
class ModelConfig:
    """Every design choice of the HarmoniAD heads, so the dashboard can ablate any of them.

    Defaults are sized for CPU: the heads cost well under a quarter of a ViT-B/16 forward.
    """

    hidden_dim: int = 256
    # Frequency split (DESIGN step 2).
    split: bool = True
    cutoff: float = 0.25
    soft_edge: float = 0.0
    learnable_cutoff: bool = False
    branches: Branches = "both"
    # FSAM, high branch (step 3).
    fsam_depth: int = 1
    fsam_heads: int = 4
    fsam_window: int = 7
    fsam_kernel: int = 3
    fsam_gate_reduction: int = 4
    # GSCM, low branch (step 4).
    gscm_depth: int = 1
    gscm_heads: int = 4
    gscm_pos_conv: bool = True
    mlp_ratio: float = 2.0
    # Fusion, noisy bottleneck, decoder (step 5).
    input_dropout: float = 0.1
    bottleneck_dropout: float = 0.2
    decoder_depth: int = 1
    decoder_heads: int = 4
    # Loss (step 8).
    hard_mining_fraction: float = 1.0
    high_loss_weight: float = 0.5
    low_loss_weight: float = 0.5

    def __post_init__(self) -> None:
        if self.branches not in ("both", "high", "low"):
            raise ValueError(f"branches must be 'both', 'high' or 'low', got {self.branches!r}")
        for name in ("hidden_dim", "fsam_depth", "fsam_heads", "fsam_window", "fsam_kernel", "gscm_depth",
                     "gscm_heads", "decoder_heads", "fsam_gate_reduction"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.decoder_depth < 0:
            raise ValueError(f"decoder_depth must be >= 0, got {self.decoder_depth}")
        for name in ("input_dropout", "bottleneck_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 < self.hard_mining_fraction <= 1.0:
            raise ValueError(f"hard_mining_fraction must be in (0, 1], got {self.hard_mining_fraction}")
        if self.cutoff < 0 or self.soft_edge < 0 or self.mlp_ratio <= 0:
            raise ValueError("cutoff and soft_edge must be >= 0 and mlp_ratio > 0")
        if self.high_loss_weight < 0 or self.low_loss_weight < 0:
            raise ValueError("branch loss weights must be >= 0")
        if self.learnable_cutoff and (not self.split or self.soft_edge <= 0):
            raise ValueError("learnable_cutoff needs split=True and soft_edge > 0")

    @property
    def has_high(self) -> bool:
        return self.branches in ("both", "high")

    @property
    def has_low(self) -> bool:
        return self.branches in ("both", "low")


@dataclass
class ModelOutput:
    """Reconstructions and their targets per layer, in token layout ``B x (h*w) x C`` on ``grid``.

    Tokens (row-major over the grid) are the layout every head works in; ``layers.tokens_to_map``
    gives the ``B x C x h x w`` view. Branch entries are None where the branch (or the split)
    is switched off. Targets are float32; reconstructions are in the compute dtype (bf16
    under autocast).
    """

    grid: tuple[int, int]
    recon: list[torch.Tensor]
    target: list[torch.Tensor]
    recon_high: list[torch.Tensor] | None = None
    target_high: list[torch.Tensor] | None = None
    recon_low: list[torch.Tensor] | None = None
    target_low: list[torch.Tensor] | None = None


@dataclass
class GridMaps:
    """``(B, h, w)`` float32 maps at grid resolution; branch maps None when absent."""

    anomaly: torch.Tensor
    high: torch.Tensor | None
    low: torch.Tensor | None


@dataclass
class Losses:
    """The training loss and its parts (parts detached, for logging)."""

    total: torch.Tensor
    recon: float
    high: float | None
    low: float | None


def cosine_distance(recon: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``1 - cos`` over the last (channel) dimension, in float32: ``(B, N, C) -> (B, N)``.

    Written out rather than ``F.cosine_similarity``, which materialises both normalised
    inputs and is several times slower on token tensors this size.
    """
    recon, target = recon.float(), target.float()
    dot = (recon * target).sum(dim=-1)
    norms = torch.linalg.vector_norm(recon, dim=-1) * torch.linalg.vector_norm(target, dim=-1)
    return 1.0 - dot / norms.clamp_min(eps)


def _layer_loss(recons: list[torch.Tensor], targets: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """Mean over layers of the cosine distance, averaged over the hardest ``fraction`` of positions."""
    total = recons[0].new_zeros((), dtype=torch.float32)
    for recon, target in zip(recons, targets):
        dist = cosine_distance(recon, target).flatten()
        if fraction < 1.0:
            k = max(1, math.ceil(fraction * dist.numel()))
            dist = dist.topk(k).values
        total = total + dist.mean()
    return total / len(recons)


class LayerInput(nn.Module):
    """LayerNorm + Linear from one backbone layer's channels to the hidden width.

    The norm matters: CLIP block outputs have a few channels with huge magnitudes.
    """

    def __init__(self, in_dim: int, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(tokens))


class GatedFusion(nn.Module):
    """``g * Wh(high) + (1 - g) * Wl(low)`` with ``g = sigmoid(Wg [high; low])`` per channel."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj_high = nn.Linear(dim, dim)
        self.proj_low = nn.Linear(dim, dim)
        self.gate = nn.Linear(2 * dim, dim)

    def forward(self, high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(torch.cat([high, low], dim=-1)))
        return g * self.proj_high(high) + (1.0 - g) * self.proj_low(low)


def _heads(dim: int, in_dim: int, num_layers: int) -> nn.ModuleList:
    return nn.ModuleList(nn.Linear(dim, in_dim) for _ in range(num_layers))


class HarmoniAD(nn.Module):
    """The trainable part of HarmoniAD on top of a frozen backbone with ``num_layers`` maps of ``in_dim`` channels."""

    def __init__(self, cfg: ModelConfig, in_dim: int, num_layers: int) -> None:
        super().__init__()
        if in_dim < 1 or num_layers < 1:
            raise ValueError(f"HarmoniAD needs in_dim >= 1 and num_layers >= 1, got {in_dim}, {num_layers}")
        self.cfg = cfg
        self.in_dim = in_dim
        self.num_layers = num_layers
        d = cfg.hidden_dim
        self.splitter = (
            FrequencySplit(cfg.cutoff, cfg.soft_edge, cfg.learnable_cutoff) if cfg.split else None
        )
        self.inputs_high = nn.ModuleList(LayerInput(in_dim, d) for _ in range(num_layers)) if cfg.has_high else None
        self.inputs_low = nn.ModuleList(LayerInput(in_dim, d) for _ in range(num_layers)) if cfg.has_low else None
        self.fsam = (
            FSAM(d, cfg.fsam_depth, cfg.fsam_heads, cfg.fsam_window, cfg.fsam_kernel, cfg.fsam_gate_reduction,
                 cfg.mlp_ratio)
            if cfg.has_high
            else None
        )
        self.gscm = GSCM(d, cfg.gscm_depth, cfg.gscm_heads, cfg.mlp_ratio, cfg.gscm_pos_conv) if cfg.has_low else None
        self.fusion = GatedFusion(d) if cfg.branches == "both" else None
        self.decoder = nn.ModuleList(
            ContextBlock(d, cfg.decoder_heads, cfg.mlp_ratio, cfg.gscm_pos_conv) for _ in range(cfg.decoder_depth)
        )
        self.norm_out = nn.LayerNorm(d)
        self.heads = _heads(d, in_dim, num_layers)
        branch_heads = cfg.split
        self.norm_high = nn.LayerNorm(d) if branch_heads and cfg.has_high else None
        self.heads_high = _heads(d, in_dim, num_layers) if branch_heads and cfg.has_high else None
        self.norm_low = nn.LayerNorm(d) if branch_heads and cfg.has_low else None
        self.heads_low = _heads(d, in_dim, num_layers) if branch_heads and cfg.has_low else None

    # -- forward -------------------------------------------------------------------------

    def _check_feats(self, feats: list[torch.Tensor]) -> tuple[int, int]:
        if len(feats) != self.num_layers:
            raise ValueError(f"HarmoniAD was built for {self.num_layers} layers, got {len(feats)} feature maps")
        grid = tuple(feats[0].shape[-2:])
        batch = feats[0].shape[0]
        for i, f in enumerate(feats):
            if f.ndim != 4 or f.shape[0] != batch or f.shape[1] != self.in_dim or tuple(f.shape[-2:]) != grid:
                raise ValueError(
                    f"feature map {i} has shape {tuple(f.shape)}; expected B x {self.in_dim} x {grid[0]} x {grid[1]}"
                )
        return grid  # type: ignore[return-value]

    def _branch_input(
        self, projections: nn.ModuleList, layers: list[torch.Tensor], generator: torch.Generator | None
    ) -> torch.Tensor:
        tokens = sum(proj(t) for proj, t in zip(projections, layers)) / len(layers)
        return noisy_dropout(tokens, self.cfg.input_dropout, self.training, generator)

    def forward(self, feats: list[torch.Tensor], generator: torch.Generator | None = None) -> ModelOutput:
        """Reconstruct the encoder maps ``feats`` (and their frequency parts).

        ``generator`` drives the dropout masks in training (for exactly resumable runs);
        None uses the global RNG.
        """
        grid = self._check_feats(feats)
        cfg = self.cfg
        target = [map_to_tokens(f).float().contiguous() for f in feats]
        if self.splitter is not None:
            lows, highs = zip(*(self.splitter(t, grid) for t in target))
            target_low, target_high = list(lows), list(highs)
        else:
            target_low = target_high = target

        high = low = None
        if self.fsam is not None:
            high = self.fsam(self._branch_input(self.inputs_high, target_high, generator), grid)
        if self.gscm is not None:
            low = self.gscm(self._branch_input(self.inputs_low, target_low, generator), grid)

        if self.fusion is not None:
            fused = self.fusion(high, low)
        else:
            fused = high if high is not None else low
        z = noisy_dropout(fused, cfg.bottleneck_dropout, self.training, generator)
        for block in self.decoder:
            z = block(z, grid)
        z = self.norm_out(z)

        out = ModelOutput(grid=grid, recon=[head(z) for head in self.heads], target=target)
        if self.heads_high is not None:
            zh = self.norm_high(high)
            out.recon_high = [head(zh) for head in self.heads_high]
            out.target_high = target_high
        if self.heads_low is not None:
            zl = self.norm_low(low)
            out.recon_low = [head(zl) for head in self.heads_low]
            out.target_low = target_low
        return out

    # -- loss and maps ---------------------------------------------------------------------

    def loss(self, out: ModelOutput) -> Losses:
        """Cosine reconstruction loss per layer plus the weighted branch losses (step 8)."""
        frac = self.cfg.hard_mining_fraction
        total = recon = _layer_loss(out.recon, out.target, frac)
        high = low = None
        if out.recon_high is not None and out.target_high is not None:
            high_t = _layer_loss(out.recon_high, out.target_high, frac)
            total = total + self.cfg.high_loss_weight * high_t
            high = float(high_t.detach())
        if out.recon_low is not None and out.target_low is not None:
            low_t = _layer_loss(out.recon_low, out.target_low, frac)
            total = total + self.cfg.low_loss_weight * low_t
            low = float(low_t.detach())
        return Losses(total=total, recon=float(recon.detach()), high=high, low=low)

    @staticmethod
    def output_maps(out: ModelOutput) -> GridMaps:
        """Grid-resolution maps: ``1 - cos`` per position, averaged over layers (step 6)."""

        def mean_distance(recons: list[torch.Tensor] | None, targets: list[torch.Tensor] | None) -> torch.Tensor | None:
            if recons is None or targets is None:
                return None
            dist = sum(cosine_distance(r, t) for r, t in zip(recons, targets)) / len(recons)
            return dist.reshape(-1, *out.grid)

        anomaly = mean_distance(out.recon, out.target)
        assert anomaly is not None
        return GridMaps(
            anomaly=anomaly,
            high=mean_distance(out.recon_high, out.target_high),
            low=mean_distance(out.recon_low, out.target_low),
        )

    def maps(self, feats: list[torch.Tensor]) -> GridMaps:
        """``forward`` then ``output_maps``; call under ``eval()`` and ``torch.inference_mode()`` to score."""
        return self.output_maps(self(feats))


def parameter_counts(model: HarmoniAD) -> dict[str, int]:
    """Trainable parameters of FSAM, GSCM and the whole model (for reports and the benchmark)."""

    def count(module: nn.Module | None) -> int:
        return 0 if module is None else sum(p.numel() for p in module.parameters() if p.requires_grad)

    return {"fsam": count(model.fsam), "gscm": count(model.gscm), "total": count(model)}
