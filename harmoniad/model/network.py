"""HarmoniAD: per-layer target normalisation, frequency split, band-supervised FSAM and GSCM, fusion.

docs/design.md#method. The input is the list of frozen encoder maps ``F_l``
(B x C x h x w, one per chosen backbone block, ``l = 1..L``). Data flow:

1. **normalise** every layer per channel with statistics of the training normals
   (``X_l = (F_l - mu_l) / sigma_l``; ``mu``, ``sigma`` are buffers fitted once before
   training by :meth:`HarmoniAD.fit_normalisation` and stored in the checkpoint). CLIP
   block outputs have a few channels hundreds of times larger than the rest; after this no
   channel dominates a squared error or a cosine;
2. **split** every ``X_l = X_low_l + X_high_l`` (``harmoniad.model.frequency``, low-pass below
   ``cutoff``);
3. per branch, **project** each layer's band (Linear, C -> D; with ``fsam_input="whole"`` FSAM
   reads the whole ``X_l`` instead, its band with the low band as context), average over layers, and make
   the input **noisy** in training only (Dinomaly's noisy bottleneck): Gaussian feature noise
   of std ``feature_noise`` on the normalised band, whole tokens dropped with probability
   ``token_dropout``, then element dropout ``bottleneck_dropout``. A branch therefore has to
   rebuild a token from its normal context instead of copying it, which is what makes an
   anomalous token come back "normal" at test time;
4. **FSAM** (windowed attention, edge convolution, channel gate; ``fsam_depth`` blocks) on the
   high tokens and **GSCM** (global linear attention; ``gscm_depth`` blocks) on the low tokens
   are the two decoders; per-layer heads (D -> C) give ``R_high_l`` and ``R_low_l``. By
   default GSCM decodes each position from a query that knows only the position and reads
   the other tokens (``gscm_queries="positions"``): it never reads the token it rebuilds,
   so its input is left clean. FSAM does the same inside its windows (``fsam_queries=
   "positions"``, the default; docs/design.md#fsam), so by default neither input gets the
   noise of step 3: it is for ``fsam_queries="tokens"``, where FSAM reads its own token.

Losses (docs/design.md#losses), each branch against its own band and, with
``joint_loss_weight`` > 0 (0 by default), the two outputs together against the whole feature
(what the joint map scores), weights in the config::

    L = w_high * mean_l D(R_high_l, X_high_l) + w_low * mean_l D(R_low_l, X_low_l)
        + w_joint * mean_l D(R_high_l + R_low_l, X_high_l + X_low_l)

with ``D`` the per-position distance ``distance`` (:func:`position_distance`): ``"mse"``,
the mean over channels of the squared error of normalised features (every channel has unit
variance, so none dominates); ``"group_cos"``, ``1 - cos`` averaged over ``cos_groups``
channel groups (Dinomaly's loose cosine). Only the hardest ``hard_mining_fraction`` (0.25) of
the positions of each layer in a batch enter the mean (hard-point mining): the easy normal
positions stop pulling the decoders, which then fit the hard ones (edges, texture) and leave
fewer false alarms there.

Maps (docs/design.md#anomaly-and-branch-maps), at grid resolution, averaged over layers::

    high map   M_h = mean_l D(R_high_l, X_high_l)        low map  M_l = mean_l D(R_low_l, X_low_l)
    joint map  M_j = mean_l 1 - cos(R_high_l + R_low_l, X_l)
    anomaly    A   = a z_h + b z_j + c z_l,   z = (M - mean_{i in kNN} m_i) / mean_{i in kNN} (Q_i - m_i)

``fusion="reference"`` (default): ``m_i`` and ``Q_i`` are the median and ``fusion_quantile``
quantile of the map of training normal ``i``, and ``kNN`` the ``fusion_neighbours`` training
normals nearest to the image by the log medians of its maps, measured after training
(:meth:`HarmoniAD.calibrate`; buffers in the checkpoint): the fusion is learned on normal
data only, and each map is scaled like the training images of its kind (no category
label). The pooled fusions (``"joint"``, ``"mean"``, ``"max"``) use one median ``m`` and
quantile ``Q`` over all training positions, ``z = (M - m) / (Q - m)``; ``"mean"`` uses ``z_l``
instead of ``z_j``, ``"max"`` is ``max(z_h, z_l)``. ``w = fusion_high_weight``.

The weights ``(a, b, c)`` (``"reference"`` and ``"joint"``): ``fusion_weights="fixed"`` is
``(w, 1 - w, 0)``; ``"learned"`` (default) chooses them after calibration on pseudo-defects
pasted into training normals (:mod:`harmoniad.train.fusion`; buffer ``fusion_mix``), and a
second set for the map the image score is taken from (``fusion_score_mix``; ``GridMaps.score``
when it differs).

Ablations are config values: ``split=False`` feeds both branches the whole normalised
features and makes both reconstruct them; ``branches="high"`` / ``"low"`` keeps one branch,
whose standardised map is then the anomaly map.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from harmoniad.model.frequency import FrequencySplit
from harmoniad.model.fsam import FSAM, FsamQueries
from harmoniad.model.gscm import GSCM, GscmQueries
from harmoniad.model.layers import map_to_tokens, noisy_dropout, sincos_positions

Branches = Literal["both", "high", "low"]
FsamInput = Literal["high", "whole"]
Distance = Literal["mse", "group_cos"]
Fusion = Literal["reference", "joint", "mean", "max"]
FusionWeights = Literal["fixed", "learned"]
FusionLocation = Literal["references", "image"]
BANDS = ("high", "low")
MAPS = ("high", "low", "joint")  # the maps the fusion standardises


@dataclass(frozen=True)
class ModelConfig:
    """Every design choice of the HarmoniAD heads, so the dashboard can ablate any of them.

    Defaults are sized for CPU: the heads cost well under a quarter of a ViT-B/16 forward.
    The noise, cutoff, distance and fusion defaults were chosen on the synthetic dev seeds
    (``benchmarks/bench_branch_maps.py --seed 1``; see the README's method section).
    """

    hidden_dim: int = 256
    # Target normalisation (docs/design.md#target-normalisation).
    normalize: bool = True
    # Frequency split (docs/design.md#frequency-split).
    split: bool = True
    cutoff: float = 0.5
    soft_edge: float = 0.0
    learnable_cutoff: bool = False
    branches: Branches = "both"
    # Noisy bottleneck, training only (docs/design.md#branch-inputs-and-the-noisy-bottleneck); used by
    # fsam_queries="tokens" only (position queries never read their own token).
    feature_noise: float = 0.5
    token_dropout: float = 0.5
    bottleneck_dropout: float = 0.1
    # Absolute position code on the branch inputs: where a part should be (missing / displaced parts).
    pos_embed: bool = False
    # FSAM, high branch (docs/design.md#fsam).
    fsam_depth: int = 2
    fsam_heads: int = 4
    fsam_window: int = 7
    fsam_kernel: int = 3
    fsam_gate_reduction: int = 4
    # "positions": FSAM decodes each position from a learned position query that reads its window's
    # tokens with its own token left out (attention diagonal masked, edge convolution's centre tap zeroed).
    fsam_queries: FsamQueries = "positions"
    # What FSAM reads: "high", the high band it rebuilds, or "whole", the whole normalised feature
    # (the high band with its low band as context). Either way it rebuilds, and is scored on, the
    # high band (docs/design.md#fsam-input).
    fsam_input: FsamInput = "high"
    # GSCM, low branch (docs/design.md#gscm).
    gscm_depth: int = 2
    gscm_heads: int = 4
    gscm_pos_conv: bool = True  # gscm_queries="tokens" only
    # "positions": every position is decoded from a query that knows only the position and reads
    # the image's tokens with its own token (and those within ``gscm_exclude`` grid steps) left out;
    # position embeddings learned on a ``gscm_pos_table`` square grid, resampled to the feature grid.
    gscm_queries: GscmQueries = "positions"
    gscm_pos_table: int = 16
    gscm_exclude: int = 0
    gscm_pos_gain: float = 100.0  # step multiplier of the position tables (stored / gain, used * gain)
    mlp_ratio: float = 2.0
    # Loss and maps (docs/design.md#losses, docs/design.md#anomaly-and-branch-maps).
    distance: Distance = "mse"
    cos_groups: int = 4
    # Only the hardest quarter of positions per layer enters the loss (docs/design.md#losses).
    hard_mining_fraction: float = 0.25
    high_loss_weight: float = 1.0
    low_loss_weight: float = 1.0
    # The two outputs summed against the two bands summed (the whole feature; with the split off,
    # twice it): trains what the joint map scores. Off by default (docs/design.md#joint-loss).
    joint_loss_weight: float = 0.0
    fusion: Fusion = "reference"
    fusion_quantile: float = 0.99
    fusion_high_weight: float = 0.45
    # fusion="reference": each map's scale from the ``fusion_neighbours`` training images whose maps
    # look most alike (at most ``fusion_references`` training images kept in the checkpoint).
    fusion_neighbours: int = 10
    fusion_references: int = 512
    # Where z = 0: the references' mean median ("references") or the image's own median ("image").
    fusion_location: FusionLocation = "references"
    # fusion="reference"/"joint": the weights of z_high, z_joint and z_low, for the anomaly map and for
    # the image score. "fixed": (w, 1 - w, 0) with w = fusion_high_weight; "learned": chosen after
    # training on pseudo-defects pasted into training normals (harmoniad.train.fusion), each kept at
    # the fixed ones unless another scores ``fusion_margin`` better.
    fusion_weights: FusionWeights = "learned"
    fusion_pseudo_images: int = 128
    fusion_margin: float = 0.01

    def __post_init__(self) -> None:
        if self.branches not in ("both", "high", "low"):
            raise ValueError(f"branches must be 'both', 'high' or 'low', got {self.branches!r}")
        for name in ("hidden_dim", "fsam_depth", "fsam_heads", "fsam_window", "fsam_kernel", "gscm_depth",
                     "gscm_heads", "fsam_gate_reduction", "cos_groups", "gscm_pos_table", "fusion_neighbours",
                     "fusion_references", "fusion_pseudo_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.fsam_input not in ("high", "whole"):
            raise ValueError(f"fsam_input must be 'high' or 'whole', got {self.fsam_input!r}")
        if self.fsam_queries not in ("tokens", "positions"):
            raise ValueError(f"fsam_queries must be 'tokens' or 'positions', got {self.fsam_queries!r}")
        if self.gscm_queries not in ("tokens", "positions"):
            raise ValueError(f"gscm_queries must be 'tokens' or 'positions', got {self.gscm_queries!r}")
        if self.gscm_exclude < 0:
            raise ValueError(f"gscm_exclude must be >= 0, got {self.gscm_exclude}")
        if self.gscm_pos_gain <= 0:
            raise ValueError(f"gscm_pos_gain must be > 0, got {self.gscm_pos_gain}")
        if self.distance not in ("mse", "group_cos"):
            raise ValueError(f"distance must be 'mse' or 'group_cos', got {self.distance!r}")
        if self.fusion_location not in ("references", "image"):
            raise ValueError(f"fusion_location must be 'references' or 'image', got {self.fusion_location!r}")
        if self.fusion not in ("reference", "joint", "mean", "max"):
            raise ValueError(f"fusion must be 'reference', 'joint', 'mean' or 'max', got {self.fusion!r}")
        if self.fusion_weights not in ("fixed", "learned"):
            raise ValueError(f"fusion_weights must be 'fixed' or 'learned', got {self.fusion_weights!r}")
        if self.fusion_margin < 0:
            raise ValueError(f"fusion_margin must be >= 0, got {self.fusion_margin}")
        for name in ("token_dropout", "bottleneck_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.fusion_high_weight <= 1.0:
            raise ValueError(f"fusion_high_weight must be in [0, 1], got {self.fusion_high_weight}")
        if not 0.5 < self.fusion_quantile < 1.0:
            raise ValueError(f"fusion_quantile must be in (0.5, 1), got {self.fusion_quantile}")
        if self.feature_noise < 0:
            raise ValueError(f"feature_noise must be >= 0, got {self.feature_noise}")
        if not 0.0 < self.hard_mining_fraction <= 1.0:
            raise ValueError(f"hard_mining_fraction must be in (0, 1], got {self.hard_mining_fraction}")
        if self.cutoff < 0 or self.soft_edge < 0 or self.mlp_ratio <= 0:
            raise ValueError("cutoff and soft_edge must be >= 0 and mlp_ratio > 0")
        if self.high_loss_weight < 0 or self.low_loss_weight < 0 or self.joint_loss_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got high {self.high_loss_weight}, low {self.low_loss_weight}, "
                             f"joint {self.joint_loss_weight}")
        if self.learnable_cutoff and (not self.split or self.soft_edge <= 0):
            raise ValueError("learnable_cutoff needs split=True and soft_edge > 0")

    @property
    def has_high(self) -> bool:
        return self.branches in ("both", "high")

    @property
    def has_low(self) -> bool:
        return self.branches in ("both", "low")

    @property
    def mixes_maps(self) -> bool:
        """Whether the anomaly map is a weighted sum of z_high, z_joint and z_low (both branches, a linear fusion)."""
        return self.branches == "both" and self.fusion in ("reference", "joint")

    @property
    def fixed_mix(self) -> tuple[float, float, float]:
        """The fixed fusion's weights of (z_high, z_joint, z_low)."""
        w = self.fusion_high_weight
        return (w, 1.0 - w, 0.0)


@dataclass
class ModelOutput:
    """Band reconstructions and their targets per layer, in token layout ``B x (h*w) x C`` on ``grid``.

    ``target`` is the normalised input ``X_l``; ``target_high``/``target_low`` its bands (both
    equal to ``target`` when the split is off). Entries of an absent branch are None.
    Targets are float32; reconstructions are in the compute dtype (bf16 under autocast).
    """

    grid: tuple[int, int]
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
    #: The map the image score is taken from when it is not ``anomaly`` (its own fusion weights).
    score: torch.Tensor | None = None


@dataclass
class Losses:
    """The training loss and its parts (parts detached, for logging)."""

    total: torch.Tensor
    high: float | None
    low: float | None
    joint: float | None = None


def position_distance(recon: torch.Tensor, target: torch.Tensor, kind: Distance = "mse", groups: int = 4,
                      eps: float = 1e-6) -> torch.Tensor:
    """Per-position distance over the channel dimension, in float32: ``(B, N, C) -> (B, N)``.

    ``"mse"``: mean squared error over channels. ``"group_cos"``: ``1 - cos`` inside each of
    ``groups`` contiguous channel groups, averaged over groups (a channel group with a large
    error cannot hide behind the rest, and no single channel sets the direction).
    """
    recon, target = recon.float(), target.float()
    if kind == "mse":
        return (recon - target).pow(2).mean(dim=-1)
    c = target.shape[-1]
    g = max(1, min(groups, c))
    size = c // g
    r = recon[..., : g * size].unflatten(-1, (g, size))
    t = target[..., : g * size].unflatten(-1, (g, size))
    dot = (r * t).sum(dim=-1)
    norms = torch.linalg.vector_norm(r, dim=-1) * torch.linalg.vector_norm(t, dim=-1)
    return (1.0 - dot / norms.clamp_min(eps)).mean(dim=-1)


def cosine_distance(recon: torch.Tensor, target: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``1 - cos`` over the channel dimension, in float32: ``(B, N, C) -> (B, N)``."""
    recon, target = recon.float(), target.float()
    dot = (recon * target).sum(dim=-1)
    norms = torch.linalg.vector_norm(recon, dim=-1) * torch.linalg.vector_norm(target, dim=-1)
    return 1.0 - dot / norms.clamp_min(eps)


def band_loss(recons: list[torch.Tensor], targets: list[torch.Tensor], kind: Distance, groups: int,
              fraction: float) -> torch.Tensor:
    """Mean over layers of the distance averaged over the hardest ``fraction`` of positions."""
    total = recons[0].new_zeros((), dtype=torch.float32)
    for recon, target in zip(recons, targets):
        dist = position_distance(recon, target, kind, groups).flatten()
        if fraction < 1.0:
            dist = dist.topk(max(1, math.ceil(fraction * dist.numel()))).values
        total = total + dist.mean()
    return total / len(recons)


def token_noise(x: torch.Tensor, std: float, token_p: float, training: bool,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Training-only input corruption: Gaussian noise of ``std``, then whole tokens zeroed with prob ``token_p``.

    ``x`` is ``(B, N, C)``. Dropping whole tokens (not single elements) is what denies a
    decoder the shortcut of copying a position's own value; the feature noise makes the
    copy of the kept tokens inexact, so the decoder learns to pull them to the normal
    population.
    """
    if not training or (std <= 0 and token_p <= 0):
        return x
    if std > 0:
        x = x + std * torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
    if token_p > 0:
        keep = torch.empty(x.shape[:2], device=x.device, dtype=x.dtype).bernoulli_(1.0 - token_p, generator=generator)
        x = x * keep.unsqueeze(-1)
    return x


class Normaliser(nn.Module):
    """Per-layer, per-channel ``(F - mu) / sigma`` with buffers fitted on training normals."""

    def __init__(self, in_dim: int, num_layers: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(num_layers, in_dim))
        self.register_buffer("std", torch.ones(num_layers, in_dim))

    def forward(self, tokens: torch.Tensor, layer: int) -> torch.Tensor:
        return (tokens.float() - self.mean[layer]) / self.std[layer]

    @torch.no_grad()
    def fit(self, batches: Iterable[list[torch.Tensor]], eps: float = 1e-6) -> None:
        """Mean and std over every position of every image of ``batches`` (per-layer ``B x C x h x w``)."""
        total = sq = None
        count = 0
        for feats in batches:
            tokens = torch.stack([map_to_tokens(f).double().flatten(0, 1) for f in feats])  # L x (B*N) x C
            s, q = tokens.sum(dim=1), tokens.pow(2).sum(dim=1)
            total, sq = (s, q) if total is None else (total + s, sq + q)
            count += tokens.shape[1]
        if total is None or count == 0:
            raise ValueError("Normaliser.fit: no training features")
        mean = total / count
        var = (sq / count - mean.pow(2)).clamp_min(0.0)
        self.mean.copy_(mean.float())
        self.std.copy_(var.sqrt().clamp_min(eps).float())


class Branch(nn.Module):
    """One band's decoder: per-layer projection, noisy bottleneck, FSAM or GSCM blocks, per-layer heads.

    ``noisy=False`` skips the bottleneck noise (GSCM with position queries: no output reads
    its own token, so there is no copy path for the noise to break).
    """

    def __init__(self, core: nn.Module, cfg: ModelConfig, in_dim: int, num_layers: int, noisy: bool = True) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.cfg = cfg
        self.noisy = noisy
        self.inputs = nn.ModuleList(nn.Linear(in_dim, d) for _ in range(num_layers))
        self.core = core
        self.pos_scale = nn.Parameter(torch.ones(())) if cfg.pos_embed else None
        self.norm = nn.LayerNorm(d)
        self.heads = nn.ModuleList(nn.Linear(d, in_dim) for _ in range(num_layers))

    def forward(self, bands: list[torch.Tensor], grid: tuple[int, int],
                generator: torch.Generator | None = None) -> list[torch.Tensor]:
        cfg = self.cfg
        noise = self.training and self.noisy
        noisy = [token_noise(b, cfg.feature_noise, cfg.token_dropout, noise, generator) for b in bands]
        x = sum(proj(b) for proj, b in zip(self.inputs, noisy)) / len(noisy)
        x = noisy_dropout(x, cfg.bottleneck_dropout, noise, generator)
        if cfg.pos_embed:
            x = x + self.pos_scale * sincos_positions(grid, x.shape[-1], x.device).to(x.dtype)
        x = self.norm(self.core(x, grid))
        return [head(x) for head in self.heads]


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
        self.normaliser = Normaliser(in_dim, num_layers)
        self.splitter = FrequencySplit(cfg.cutoff, cfg.soft_edge, cfg.learnable_cutoff) if cfg.split else None
        self.fsam_branch = (
            Branch(FSAM(d, cfg.fsam_depth, cfg.fsam_heads, cfg.fsam_window, cfg.fsam_kernel, cfg.fsam_gate_reduction,
                        cfg.mlp_ratio, cfg.fsam_queries, cfg.gscm_pos_table, cfg.gscm_pos_gain),
                   cfg, in_dim, num_layers, noisy=cfg.fsam_queries == "tokens")
            if cfg.has_high else None
        )
        self.gscm_branch = (
            Branch(GSCM(d, cfg.gscm_depth, cfg.gscm_heads, cfg.mlp_ratio, cfg.gscm_pos_conv, cfg.gscm_queries,
                        cfg.gscm_pos_table, cfg.gscm_exclude,
                        cfg.gscm_pos_gain), cfg, in_dim, num_layers,
                   noisy=cfg.gscm_queries == "tokens")
            if cfg.has_low else None
        )
        # Location and scale of each map on the training normals, pooled (set by ``calibrate``).
        self.register_buffer("map_mean", torch.zeros(len(MAPS)))
        self.register_buffer("map_std", torch.ones(len(MAPS)))
        if cfg.fusion == "reference":
            # Per kept training image and map: log of its median (where it sits among the references)
            # and its own scale, quantile minus median; ``ref_count`` rows are filled by ``calibrate``.
            self.register_buffer("ref_desc", torch.zeros(cfg.fusion_references, len(MAPS)))
            self.register_buffer("ref_scale", torch.ones(cfg.fusion_references, len(MAPS)))
            self.register_buffer("ref_count", torch.zeros((), dtype=torch.long))
        if cfg.mixes_maps and cfg.fusion_weights == "learned":
            # Weights of (z_high, z_joint, z_low) in the anomaly map and in the map the image score is
            # taken from; the fixed ones until ``harmoniad.train.fusion`` learns them.
            self.register_buffer("fusion_mix", torch.tensor(cfg.fixed_mix))
            self.register_buffer("fusion_score_mix", torch.tensor(cfg.fixed_mix))

    @property
    def fsam(self) -> nn.Module | None:
        return None if self.fsam_branch is None else self.fsam_branch.core

    @property
    def gscm(self) -> nn.Module | None:
        return None if self.gscm_branch is None else self.gscm_branch.core

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

    def normalised_tokens(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        """``X_l``: per-layer ``B x N x C`` float32 tokens, normalised when ``cfg.normalize``."""
        tokens = [map_to_tokens(f).float() for f in feats]
        if not self.cfg.normalize:
            return [t.contiguous() for t in tokens]
        return [self.normaliser(t, i) for i, t in enumerate(tokens)]

    def forward(self, feats: list[torch.Tensor], generator: torch.Generator | None = None) -> ModelOutput:
        """Reconstruct the high band with FSAM and the low band with GSCM.

        GSCM reads the low band, FSAM the high band (or, ``fsam_input="whole"``, the whole feature).

        ``generator`` drives the training noise (for exactly resumable runs); None uses the
        global RNG.
        """
        grid = self._check_feats(feats)
        target = self.normalised_tokens(feats)
        if self.splitter is not None:
            lows, highs = zip(*(self.splitter(t, grid) for t in target))
            target_low, target_high = list(lows), list(highs)
        else:
            target_low = target_high = target
        out = ModelOutput(grid=grid, target=target)
        if self.fsam_branch is not None:
            fsam_reads = target if self.cfg.fsam_input == "whole" else target_high
            out.recon_high = self.fsam_branch(fsam_reads, grid, generator)
            out.target_high = target_high
        if self.gscm_branch is not None:
            out.recon_low = self.gscm_branch(target_low, grid, generator)
            out.target_low = target_low
        return out

    # -- loss and maps ---------------------------------------------------------------------

    def loss(self, out: ModelOutput) -> Losses:
        """``w_high * L_high + w_low * L_low + w_joint * L_joint`` (see the module docstring).

        Each branch against its own band, and (both branches present) their sum against the
        sum of the bands: the joint map compares that sum with the whole feature, so it is
        trained for what it shows rather than left a by-product of the two band fits.
        """
        cfg = self.cfg
        total = out.target[0].new_zeros((), dtype=torch.float32)
        parts: dict[str, float | None] = {"high": None, "low": None}
        for band, weight in (("high", cfg.high_loss_weight), ("low", cfg.low_loss_weight)):
            recon, target = getattr(out, f"recon_{band}"), getattr(out, f"target_{band}")
            if recon is None:
                continue
            term = band_loss(recon, target, cfg.distance, cfg.cos_groups, cfg.hard_mining_fraction)
            total = total + weight * term
            parts[band] = float(term.detach())
        joint = None
        if out.recon_high is not None and out.recon_low is not None and cfg.joint_loss_weight > 0:
            sums = [rh.float() + rl.float() for rh, rl in zip(out.recon_high, out.recon_low)]
            whole = [th + tl for th, tl in zip(out.target_high, out.target_low)]
            term = band_loss(sums, whole, cfg.distance, cfg.cos_groups, cfg.hard_mining_fraction)
            total = total + cfg.joint_loss_weight * term
            joint = float(term.detach())
        return Losses(total=total, high=parts["high"], low=parts["low"], joint=joint)

    def branch_maps(self, out: ModelOutput) -> dict[str, torch.Tensor]:
        """The raw ``(B, h, w)`` maps: ``high``/``low`` for the branches present, ``joint`` when both are.

        ``joint`` compares the two branches' outputs put back together with the whole
        normalised feature: ``1 - cos(R_high + R_low, X)`` per position, averaged over layers.
        """
        maps = {}
        for band in BANDS:
            recon, target = getattr(out, f"recon_{band}"), getattr(out, f"target_{band}")
            if recon is not None:
                dist = sum(position_distance(r, t, self.cfg.distance, self.cfg.cos_groups)
                           for r, t in zip(recon, target)) / len(recon)
                maps[band] = dist.reshape(-1, *out.grid)
        if out.recon_high is not None and out.recon_low is not None:
            joint = sum(cosine_distance(rh.float() + rl.float(), x)
                        for rh, rl, x in zip(out.recon_high, out.recon_low, out.target)) / len(out.target)
            maps["joint"] = joint.reshape(-1, *out.grid)
        return maps

    def standardise(self, maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each map as ``z``, standardised by the training normals' statistics.

        ``fusion="reference"`` standardises each map of an image against the training images
        that resemble it (:meth:`reference_z`); the other fusions use the pooled statistics.
        Before :meth:`calibrate` a reference model falls back to the pooled ones.
        """
        if self.cfg.fusion == "reference" and int(self.ref_count) > 0:
            return self.reference_z(maps)
        return {name: (maps[name] - self.map_mean[i]) / self.map_std[i] for i, name in enumerate(MAPS) if name in maps}

    @property
    def mix(self) -> tuple[float, float, float]:
        """The weights of (z_high, z_joint, z_low) in the anomaly map: learned, or the fixed ones."""
        return self._weights("fusion_mix")

    @property
    def score_mix(self) -> tuple[float, float, float]:
        """The weights of (z_high, z_joint, z_low) in the map the image score is taken from."""
        return self._weights("fusion_score_mix")

    def _weights(self, buffer: str) -> tuple[float, float, float]:
        learned = getattr(self, buffer, None)
        if learned is None:
            return self.cfg.fixed_mix
        high, joint, low = (round(float(v), 6) for v in learned)  # float32 buffer: 0.45 back as 0.45
        return high, joint, low

    def fuse(self, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        """The anomaly map from the raw maps: :meth:`standardise`, then :meth:`fuse_z`."""
        return self.fuse_z(self.standardise(maps))

    def fuse_z(self, z: dict[str, torch.Tensor]) -> torch.Tensor:
        """The anomaly map from the standardised maps, by ``cfg.fusion``."""
        if "joint" not in z:  # one branch: its own map
            return next(iter(z.values()))
        if self.cfg.fusion in ("joint", "reference"):
            return mix_maps(z, self.mix)
        if self.cfg.fusion == "max":
            return torch.maximum(z["high"], z["low"])
        w = self.cfg.fusion_high_weight
        return w * z["high"] + (1.0 - w) * z["low"]

    def reference_z(self, maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``z = (M - location) / mean scale of the image's nearest references``, per map.

        An image's references are the ``fusion_neighbours`` kept training normals nearest to
        it by the log medians of its maps (Euclidean): images of the same kind of object,
        without a category label. A category's maps can be several times wider than
        another's (the high map on a texture against that on an object), so one pooled
        scale weighs the branches differently in every category; the neighbours' scale
        puts each map on its own category's footing. The location is the references' mean
        median (``fusion_location="references"``) or the image's own median (``"image"``: a
        defect covers a minority of positions; but a large defect then lowers its own
        image's map, and with it the image score).
        """
        names = [name for name in MAPS if name in maps]
        cols = [MAPS.index(name) for name in names]
        med = {name: torch.quantile(maps[name].flatten(1).float(), 0.5, dim=1) for name in names}  # (B,) each
        desc = torch.stack([med[name] for name in names], dim=1).clamp_min(1e-12).log()  # (B, maps)
        count = int(self.ref_count)
        refs = self.ref_desc[:count, cols].to(desc.device)
        k = min(self.cfg.fusion_neighbours, count)
        nearest = torch.cdist(desc, refs).topk(k, dim=1, largest=False).indices  # (B, k)
        scale = self.ref_scale[:count, cols].to(desc.device)[nearest].mean(dim=1)  # (B, maps)
        if self.cfg.fusion_location == "image":
            loc = desc.exp()
        else:
            loc = refs.exp()[nearest].mean(dim=1)
        return {name: (maps[name] - loc[:, j].view(-1, 1, 1)) / scale[:, j].view(-1, 1, 1)
                for j, name in enumerate(names)}

    def output_maps(self, out: ModelOutput) -> GridMaps:
        """Grid-resolution maps: branch distances to their bands and their fusion.

        With learned weights the image score may come from the same maps fused with weights
        of its own (``score``; docs/design.md#fusion-weights).
        """
        maps = self.branch_maps(out)
        z = self.standardise(maps)
        score = None
        if self.cfg.mixes_maps and self.score_mix != self.mix:
            score = mix_maps(z, self.score_mix)
        return GridMaps(anomaly=self.fuse_z(z), high=maps.get("high"), low=maps.get("low"), score=score)

    def maps(self, feats: list[torch.Tensor]) -> GridMaps:
        """``forward`` then ``output_maps``; call under ``eval()`` and ``torch.inference_mode()`` to score."""
        return self.output_maps(self(feats))

    # -- statistics of the training normals -----------------------------------------------

    def fit_normalisation(self, batches: Iterable[list[torch.Tensor]]) -> None:
        """Fit the per-layer target normalisation on training features (before training)."""
        self.normaliser.fit(batches)

    @torch.no_grad()
    def calibrate(self, batches: Iterable[list[torch.Tensor]], max_values: int = 2_000_000) -> None:
        """Measure each branch map on training normals (after training): the fusion's statistics.

        Pooled over all positions (every fusion but ``"reference"``): ``(M - median) / (q -
        median)`` with ``q`` the ``cfg.fusion_quantile`` quantile of the normal positions, a
        robust location and a scale set by the normal map's upper tail, where false positives
        come from (a standard deviation under-weights a heavy tail). At most ``max_values``
        positions per map are kept (an evenly strided subset beyond that).

        Per image (``fusion="reference"``): the log median of each map and its own scale,
        quantile minus median over the image's positions, for at most
        ``cfg.fusion_references`` images (an evenly strided subset beyond that).
        """
        was_training = self.training
        self.eval()
        values: dict[str, list[torch.Tensor]] = {name: [] for name in MAPS}
        per_image: dict[str, list[torch.Tensor]] = {name: [] for name in MAPS}  # (B, 2): median, scale
        for feats in batches:
            for name, m in self.branch_maps(self(feats)).items():
                flat = m.float().flatten(1)
                values[name].append(flat.flatten().cpu())
                med, top = torch.quantile(flat, flat.new_tensor([0.5, self.cfg.fusion_quantile]), dim=1)
                per_image[name].append(torch.stack([med, (top - med).clamp_min(1e-6)], dim=1).cpu())
        self.train(was_training)
        for i, name in enumerate(MAPS):
            if not values[name]:
                continue
            v = torch.cat(values[name])
            if v.numel() > max_values:
                v = v[:: math.ceil(v.numel() / max_values)]
            loc = v.median()
            scale = (torch.quantile(v, self.cfg.fusion_quantile) - loc).clamp_min(1e-6)
            self.map_mean[i] = loc
            self.map_std[i] = scale
        if self.cfg.fusion == "reference":
            self._keep_references(per_image)

    def _keep_references(self, per_image: dict[str, list[torch.Tensor]]) -> None:
        """Fill ``ref_desc`` / ``ref_scale`` with at most ``fusion_references`` evenly strided training images."""
        stats = {name: torch.cat(rows) for name, rows in per_image.items() if rows}
        if not stats:
            raise ValueError("HarmoniAD.calibrate: no training maps to calibrate the fusion on")
        n = next(iter(stats.values())).shape[0]
        keep = torch.arange(n)
        if n > self.cfg.fusion_references:
            keep = torch.linspace(0, n - 1, self.cfg.fusion_references).round().long()
        self.ref_desc.zero_()
        self.ref_scale.fill_(1.0)
        for name, st in stats.items():
            i = MAPS.index(name)
            self.ref_desc[: len(keep), i] = st[keep, 0].clamp_min(1e-12).log().to(self.ref_desc.device)
            self.ref_scale[: len(keep), i] = st[keep, 1].to(self.ref_scale.device)
        self.ref_count.fill_(len(keep))


def mix_maps(z: dict[str, torch.Tensor], mix: Sequence[float]) -> torch.Tensor:
    """``a z_high + b z_joint + c z_low`` for ``mix = (a, b, c)``; a zero weight skips its map."""
    total = None
    for name, weight in zip(("high", "joint", "low"), mix):
        if weight:
            term = weight * z[name]
            total = term if total is None else total + term
    return total if total is not None else torch.zeros_like(z["high"])


def parameter_counts(model: HarmoniAD) -> dict[str, int]:
    """Trainable parameters of FSAM, GSCM and the whole model (for reports and the benchmark)."""

    def count(module: nn.Module | None) -> int:
        return 0 if module is None else sum(p.numel() for p in module.parameters() if p.requires_grad)

    return {"fsam": count(model.fsam), "gscm": count(model.gscm), "total": count(model)}
