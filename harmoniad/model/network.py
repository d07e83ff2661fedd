"""HarmoniAD: frequency split, FSAM and GSCM branches, fusion, noisy bottleneck, reconstruction.

docs/design.md#method. The input is the list of frozen encoder maps ``F_l``
(B x C x h x w, one per chosen backbone block). Data flow:

1. split every ``F_l`` into ``F_low_l + F_high_l`` (``harmoniad.model.frequency``);
2. per branch, project every layer (LayerNorm + Linear, C -> D) and average the layers
   into one token map; light dropout on it (``input_dropout``) keeps the branch from
   copying its input;
3. FSAM on the high tokens, GSCM on the low tokens;
4. fusion: a gated sum ``g * Wh(high) + (1 - g) * Wl(low)``, ``g`` per position and
   channel; then the noisy bottleneck (``bottleneck_dropout``, training only) and a small
   global decoder (``decoder_depth`` context blocks) that has to fill in what was dropped;
5. per-layer heads (D -> C) reconstruct every ``F_l`` from the decoder output (``R_l``);
   band reconstructions of ``F_high_l`` and ``F_low_l`` come from where
   ``high_source`` / ``low_source`` say (below).

Maps, averaged over layers: the anomaly map is ``1 - cos(R, F)`` per position; the two
branch maps compare the band reconstructions with ``F_high`` and ``F_low``.

Band sources (``high_source``, ``low_source``): a band reconstruction is

- ``"split"`` (default for the high band): the frequency split of the main reconstruction
  ``R`` itself, so the map shows the anomaly map's own error in that band; no parameters;
- ``"decoder"`` (default for the low band): a band head on the decoder output (after the
  noisy bottleneck and the context decoder, so it sees the fused context);
- ``"branch_decoder"``: per band, a noisy bottleneck and ``branch_decoder_depth`` context
  blocks of its own on that branch's output, then heads;
- ``"branch"``: heads straight on each branch's output (the first design).

Band distance (``high_distance``, ``low_distance``): ``"cos"`` is ``1 - cos(R_band,
F_band)``; ``"relative"`` is ``0.5 * |R_band - F_band / |F||^2`` with the band
reconstruction in units of ``|F|``, the same normalised error as ``1 - cos`` restricted to
one band. The high band is zero-mean over the image, so its norm swings from position to
position and a plain cosine there mostly measures noise where the band is weak (measured:
near chance or inverted, whatever the source); the low band carries the mean feature,
where the cosine is well conditioned and measured better than the relative distance. Hence
the defaults: relative for the high band, cosine for the low band. The branch losses use
the same distances as the maps. ``benchmarks/bench_branch_maps.py`` measures every
combination; on its dev set the sources differ little once the distance is right, and the
default pair had the best worst-category low map.

Ablations are config values: ``split=False`` feeds the unsplit ``F`` to the branches and
has no band reconstructions, losses or maps; ``branches="high"`` / ``"low"`` keeps one
branch, whose output then goes to the bottleneck alone (no gate) and whose band map is the
only one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from harmoniad.model.frequency import FrequencySplit
from harmoniad.model.fsam import FSAM
from harmoniad.model.gscm import GSCM, ContextBlock
from harmoniad.model.layers import map_to_tokens, noisy_dropout

Branches = Literal["both", "high", "low"]
BandSource = Literal["split", "decoder", "branch_decoder", "branch"]
BandDistance = Literal["relative", "cos"]


@dataclass(frozen=True)
class ModelConfig:
    """Every design choice of the HarmoniAD heads, so the dashboard can ablate any of them.

    Defaults are sized for CPU: the heads cost well under a quarter of a ViT-B/16 forward.
    """

    hidden_dim: int = 256
    # Frequency split (docs/design.md#frequency-split).
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
    # Branch maps (step 6): where each band's reconstruction comes from, and how its map
    # compares it with F_high / F_low (see the module docstring; measured choices).
    high_source: BandSource = "split"
    low_source: BandSource = "decoder"
    high_distance: BandDistance = "relative"
    low_distance: BandDistance = "cos"
    branch_decoder_depth: int = 1  # context blocks of a "branch_decoder" band head
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
        for name in ("high_source", "low_source"):
            if getattr(self, name) not in ("split", "decoder", "branch_decoder", "branch"):
                raise ValueError(
                    f"{name} must be 'split', 'decoder', 'branch_decoder' or 'branch', got {getattr(self, name)!r}"
                )
        for name in ("high_distance", "low_distance"):
            if getattr(self, name) not in ("relative", "cos"):
                raise ValueError(f"{name} must be 'relative' or 'cos', got {getattr(self, name)!r}")
        if self.branch_decoder_depth < 0:
            raise ValueError(f"branch_decoder_depth must be >= 0, got {self.branch_decoder_depth}")
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
    under autocast). A band reconstruction compared by the ``"relative"`` distance
    (``high_distance``/``low_distance``) is in units of ``|F|`` per position: it estimates
    ``F_band / |F|``, not ``F_band``.
    """

    grid: tuple[int, int]
    recon: list[torch.Tensor]
    target: list[torch.Tensor]
    recon_high: list[torch.Tensor] | None = None
    target_high: list[torch.Tensor] | None = None
    recon_low: list[torch.Tensor] | None = None
    target_low: list[torch.Tensor] | None = None
    high_distance: BandDistance = "cos"
    low_distance: BandDistance = "cos"


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


def relative_band_distance(recon: torch.Tensor, band: torch.Tensor, full: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``0.5 * |recon - band / |full||^2`` over channels, in float32: ``(B, N, C) -> (B, N)``.

    ``recon`` reconstructs the band component in units of the full feature's norm. This is
    the same quantity as ``1 - cos`` (which is ``0.5 * |r/|r| - f/|f||^2``) restricted to one
    frequency band: with the band equal to the whole spectrum and ``recon = r/|r|`` it *is*
    ``1 - cos(r, f)``. Unlike ``1 - cos(recon, band)`` it stays well conditioned where the band
    carries little of the feature's energy (the high band is zero-mean, so its norm swings
    from position to position and a plain cosine there measures mostly noise).
    """
    scale = torch.linalg.vector_norm(full.float(), dim=-1, keepdim=True).clamp_min(eps)
    return 0.5 * (recon.float() - band.float() / scale).pow(2).sum(dim=-1)


def _distances(
    recons: list[torch.Tensor], targets: list[torch.Tensor], fulls: list[torch.Tensor] | None
) -> list[torch.Tensor]:
    """Per-layer ``(B, N)`` distances: ``1 - cos`` (``fulls`` None) or the relative band distance against ``fulls``."""
    if fulls is None:
        return [cosine_distance(r, t) for r, t in zip(recons, targets)]
    return [relative_band_distance(r, t, f) for r, t, f in zip(recons, targets, fulls)]


def _layer_loss(
    recons: list[torch.Tensor], targets: list[torch.Tensor], fraction: float,
    fulls: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean over layers of the distance (see :func:`_distances`), averaged over the hardest ``fraction`` of positions."""
    total = recons[0].new_zeros((), dtype=torch.float32)
    for dist in _distances(recons, targets, fulls):
        dist = dist.flatten()
        if fraction < 1.0:
            k = max(1, math.ceil(fraction * dist.numel()))
            dist = dist.topk(k).values
        total = total + dist.mean()
    return total / len(recons)


def split_reconstruction(
    splitter: FrequencySplit, recons: list[torch.Tensor], targets: list[torch.Tensor], grid: tuple[int, int],
    low_distance: BandDistance | None = "cos", high_distance: BandDistance | None = "cos",
) -> tuple[list[torch.Tensor] | None, list[torch.Tensor] | None]:
    """Per-layer ``(R_low, R_high)`` band parts of the main reconstruction (band source ``"split"``).

    A band compared with ``1 - cos`` gets the plain split of ``R``. A band compared with the
    relative distance gets its part in units of ``|F|`` (what :func:`relative_band_distance`
    compares with ``F_band / |F|``): ``R`` is first rescaled to ``F``'s norm at every position
    (the main loss is a cosine, so ``R``'s own scale means nothing), split, then divided by
    ``|F|``. With a band covering the whole spectrum, the relative distance of that part is
    exactly the anomaly map's ``1 - cos``. A band whose distance is None is not wanted and
    comes back None.
    """
    lows, highs = [], []
    for recon, target in zip(recons, targets):
        r = recon.float()
        low = high = None
        if "cos" in (low_distance, high_distance):
            low, high = splitter(r, grid)
        if "relative" in (low_distance, high_distance):
            t_norm = torch.linalg.vector_norm(target.float(), dim=-1, keepdim=True).clamp_min(1e-6)
            r_norm = torch.linalg.vector_norm(r, dim=-1, keepdim=True).clamp_min(1e-6)
            rel_low, rel_high = splitter(r * (t_norm / r_norm), grid)
            low = rel_low / t_norm if low_distance == "relative" else low
            high = rel_high / t_norm if high_distance == "relative" else high
        lows.append(low)
        highs.append(high)
    return (lows if low_distance else None), (highs if high_distance else None)


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


class BandHead(nn.Module):
    """Reconstructs one frequency component (``F_high_l`` or ``F_low_l``) of every layer from hidden tokens.

    With ``context_depth > 0`` (or ``dropout > 0``) it is a small decoder of its own: a noisy
    bottleneck (dropout, training only) then ``context_depth`` global context blocks, so it
    must rebuild dropped tokens from their context instead of copying its input.
    """

    def __init__(
        self, dim: int, in_dim: int, num_layers: int, *, context_depth: int = 0, dropout: float = 0.0,
        heads: int = 4, mlp_ratio: float = 2.0, pos_conv: bool = True,
    ) -> None:
        super().__init__()
        self.dropout = dropout
        self.blocks = nn.ModuleList(ContextBlock(dim, heads, mlp_ratio, pos_conv) for _ in range(context_depth))
        self.norm = nn.LayerNorm(dim)
        self.heads = _heads(dim, in_dim, num_layers)

    def forward(
        self, tokens: torch.Tensor, grid: tuple[int, int], generator: torch.Generator | None = None
    ) -> list[torch.Tensor]:
        x = noisy_dropout(tokens, self.dropout, self.training, generator)
        for block in self.blocks:
            x = block(x, grid)
        x = self.norm(x)
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
        # Band heads behind the two frequency maps; a "split" band needs none (it splits ``recon``).
        self.band_heads = nn.ModuleDict()
        for band, present, source in (("high", cfg.has_high, cfg.high_source), ("low", cfg.has_low, cfg.low_source)):
            if cfg.split and present and source != "split":
                own_decoder = source == "branch_decoder"
                self.band_heads[band] = BandHead(
                    d, in_dim, num_layers,
                    context_depth=cfg.branch_decoder_depth if own_decoder else 0,
                    dropout=cfg.bottleneck_dropout if own_decoder else 0.0,
                    heads=cfg.decoder_heads, mlp_ratio=cfg.mlp_ratio, pos_conv=cfg.gscm_pos_conv,
                )

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
        z_out = self.norm_out(z)

        out = ModelOutput(grid=grid, recon=[head(z_out) for head in self.heads], target=target)
        if self.splitter is None:
            return out
        out.high_distance, out.low_distance = cfg.high_distance, cfg.low_distance
        split_high = cfg.has_high and cfg.high_source == "split"
        split_low = cfg.has_low and cfg.low_source == "split"
        recon_low = recon_high = None
        if split_high or split_low:
            recon_low, recon_high = split_reconstruction(
                self.splitter, out.recon, target, grid,
                cfg.low_distance if split_low else None, cfg.high_distance if split_high else None,
            )
        # A "decoder" head reads the decoder's context; the others read their own branch.
        if "high" in self.band_heads:
            recon_high = self.band_heads["high"](z if cfg.high_source == "decoder" else high, grid, generator)
        if "low" in self.band_heads:
            recon_low = self.band_heads["low"](z if cfg.low_source == "decoder" else low, grid, generator)
        if cfg.has_high:
            out.recon_high, out.target_high = recon_high, target_high
        if cfg.has_low:
            out.recon_low, out.target_low = recon_low, target_low
        return out

    # -- loss and maps ---------------------------------------------------------------------

    def loss(self, out: ModelOutput) -> Losses:
        """Cosine reconstruction loss per layer plus the weighted branch losses (step 8).

        Each branch loss uses the distance its map uses (``high_distance``/``low_distance``),
        so the band reconstructions are trained for exactly what the dashboard shows.
        """
        frac = self.cfg.hard_mining_fraction
        total = recon = _layer_loss(out.recon, out.target, frac)
        high = low = None
        if out.recon_high is not None and out.target_high is not None:
            fulls = out.target if out.high_distance == "relative" else None
            high_t = _layer_loss(out.recon_high, out.target_high, frac, fulls)
            total = total + self.cfg.high_loss_weight * high_t
            high = float(high_t.detach())
        if out.recon_low is not None and out.target_low is not None:
            fulls = out.target if out.low_distance == "relative" else None
            low_t = _layer_loss(out.recon_low, out.target_low, frac, fulls)
            total = total + self.cfg.low_loss_weight * low_t
            low = float(low_t.detach())
        return Losses(total=total, recon=float(recon.detach()), high=high, low=low)

    @staticmethod
    def output_maps(out: ModelOutput) -> GridMaps:
        """Grid-resolution maps, averaged over layers (step 6).

        The anomaly map is ``1 - cos(R, F)``; the branch maps compare the band reconstructions
        with ``F_high`` / ``F_low`` by ``out.high_distance`` / ``out.low_distance``.
        """

        def mean_distance(
            recons: list[torch.Tensor] | None, targets: list[torch.Tensor] | None, distance: BandDistance = "cos"
        ) -> torch.Tensor | None:
            if recons is None or targets is None:
                return None
            fulls = out.target if distance == "relative" else None
            dist = sum(_distances(recons, targets, fulls)) / len(recons)
            return dist.reshape(-1, *out.grid)

        anomaly = mean_distance(out.recon, out.target)
        assert anomaly is not None
        return GridMaps(
            anomaly=anomaly,
            high=mean_distance(out.recon_high, out.target_high, out.high_distance),
            low=mean_distance(out.recon_low, out.target_low, out.low_distance),
        )

    def maps(self, feats: list[torch.Tensor]) -> GridMaps:
        """``forward`` then ``output_maps``; call under ``eval()`` and ``torch.inference_mode()`` to score."""
        return self.output_maps(self(feats))


def parameter_counts(model: HarmoniAD) -> dict[str, int]:
    """Trainable parameters of FSAM, GSCM and the whole model (for reports and the benchmark)."""

    def count(module: nn.Module | None) -> int:
        return 0 if module is None else sum(p.numel() for p in module.parameters() if p.requires_grad)

    return {"fsam": count(model.fsam), "gscm": count(model.gscm), "total": count(model)}
