"""Learning the fusion weights on normal data only (docs/design.md#fusion-weights).

Which branch to trust depends on the product: on a texture such as MVTec's grid the high
band of a normal image is hard to predict and the high map is close to chance, while on
objects with thin defects it is the better map. No defect may be looked at, so the weights
are chosen on **pseudo-defects made from training normals**: a patch of an image's own
feature tokens is copied to another place in the same image (feature-space CutPaste: a
misplaced part of that very product, a rectangle or a one-token-wide line). Each candidate
``a z_high + b z_joint + c z_low`` (weights on a simplex grid, step 0.1) is scored twice:

- the **anomaly map's** weights by pixel AUROC + AUPRO of the pasted regions;
- the weights of the map the **image score** comes from by image AUROC, pasted images
  against the same images unpasted (what finds a region best is not always what ranks
  images best: on grid the low map outlines defects well and ranks images badly).

The best candidate replaces the fixed weights only when it scores ``fusion_margin`` better:
pseudo-defects are not real ones, and when they cannot tell the candidates apart the fixed,
documented weights stay.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import product
from typing import Any

import numpy as np
import torch

from harmoniad.backbone.sources import FeatureSource
from harmoniad.maps import image_scores
from harmoniad.model import HarmoniAD
from harmoniad.model.network import mix_maps
from harmoniad.runtime.progress import Progress, ProgressFn

Mix = tuple[float, float, float]
STEP = 10  # the simplex grid's resolution: weights in tenths


@dataclass(frozen=True)
class WeightChoice:
    """One set of weights: chosen or kept, with the criterion's value for it and for the fixed ones."""

    mix: Mix  # weights of (z_high, z_joint, z_low)
    learned: bool  # False: the fixed weights were kept
    value: float | None  # None: not measured (see FusionChoice.note)
    fixed_value: float | None


@dataclass(frozen=True)
class FusionChoice:
    """What :func:`learn_fusion` chose and why (kept with the checkpoint's training result)."""

    map: WeightChoice  # criterion: pixel AUROC + AUPRO of the pasted regions
    score: WeightChoice  # criterion: image AUROC, pasted images against the same images unpasted
    images: int  # training images that received a pseudo-defect
    margin: float
    note: str = ""  # why the fixed weights were kept without a comparison, if they were

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def describe_fusion(mix: Sequence[float], score_mix: Sequence[float], learning: Mapping[str, Any] | None) -> str:
    """One line for people: how the anomaly map and the image score weigh the z-scored branch maps, and why.

    ``learning`` is :meth:`FusionChoice.to_dict` (None: ``fusion_weights="fixed"``), e.g.
    ``anomaly map 0.2 joint + 0.8 low; image score 0.9 joint + 0.1 low (learned on pseudo-defects)``.
    """

    def weighted(weights: Sequence[float]) -> str:
        return " + ".join(f"{w:g} {name}" for w, name in zip(weights, ("high", "joint", "low")) if w)

    if learning is None:
        how = "fixed weights"
    elif learning["map"]["learned"] or learning["score"]["learned"]:
        how = "learned on pseudo-defects"
    else:
        how = "fixed weights: pseudo-defects found none clearly better"
    text = f"anomaly map {weighted(mix)}"
    if list(score_mix) != list(mix):
        text += f"; image score {weighted(score_mix)}"
    return f"{text} ({how})"


def candidate_mixes() -> list[Mix]:
    """Every ``(a, b, c)`` with ``a + b + c = 1`` in steps of 0.1."""
    return [(a / STEP, b / STEP, (STEP - a - b) / STEP) for a, b in product(range(STEP + 1), repeat=2) if a + b <= STEP]


def paste_pseudo_defects(feats: list[torch.Tensor], generator: torch.Generator) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Copy a patch of each image's tokens to another place in the same image, in every layer.

    Even images get a rectangle (sides 1/8 to 1/3 of the grid), odd ones a one-token-wide
    line (1/4 to 1/2 of the grid long). Returns the changed features and the ``B x h x w``
    mask of the pasted positions.
    """
    b, _, h, w = feats[0].shape
    out = [f.clone() for f in feats]
    mask = torch.zeros(b, h, w, dtype=torch.bool)

    def randint(lo: int, hi: int) -> int:  # lo <= x < hi
        return int(torch.randint(lo, max(hi, lo + 1), (1,), generator=generator))

    for i in range(b):
        if i % 2:
            length = randint(max(2, h // 4), max(3, h // 2 + 1))
            ph, pw = (1, min(length, w)) if randint(0, 2) else (min(length, h), 1)
        else:
            ph, pw = randint(max(1, h // 8), max(2, h // 3 + 1)), randint(max(1, w // 8), max(2, w // 3 + 1))
        sy, sx = randint(0, h - ph + 1), randint(0, w - pw + 1)
        ty, tx = randint(0, h - ph + 1), randint(0, w - pw + 1)
        for f, g in zip(out, feats):
            f[i, :, ty : ty + ph, tx : tx + pw] = g[i, :, sy : sy + ph, sx : sx + pw]
        mask[i, ty : ty + ph, tx : tx + pw] = True
    return out, mask


def pixel_criterion(z: dict[str, torch.Tensor], masks: np.ndarray) -> Callable[[Mix], float]:
    """Pixel AUROC + AUPRO of the fused map against ``masks`` (grid resolution)."""
    from harmoniad.metrics import pixel_metrics  # a later stage (metrics): its exact AUPRO is the one definition

    def value(mix: Mix) -> float:
        result = pixel_metrics(masks, mix_maps(z, mix).float().cpu().numpy())
        return float(result["auroc"] + result["aupro"])

    return value


def image_criterion(z_pasted: dict[str, torch.Tensor], z_clean: dict[str, torch.Tensor]) -> Callable[[Mix], float]:
    """Image AUROC of the fused map's image score (mean of its top 1%), pasted images against clean ones."""
    from harmoniad.metrics import image_metrics  # a later stage (metrics)

    labels = np.r_[np.zeros(len(z_clean["high"])), np.ones(len(z_pasted["high"]))]

    def value(mix: Mix) -> float:
        scores = torch.cat([image_scores(mix_maps(z, mix).float()) for z in (z_clean, z_pasted)])
        return float(image_metrics(labels, scores.cpu().numpy())["auroc"])

    return value


def choose_mix(criterion: Callable[[Mix], float], fixed: Mix, margin: float) -> WeightChoice:
    """The best candidate by ``criterion`` if it beats ``fixed`` by more than ``margin``, else ``fixed``."""
    fixed_value = criterion(fixed)
    best, best_value = fixed, fixed_value
    for mix in candidate_mixes():
        value = criterion(mix)
        if value > best_value + 1e-9:
            best, best_value = mix, value
    if best_value - fixed_value <= margin:
        return WeightChoice(fixed, False, fixed_value, fixed_value)
    return WeightChoice(best, True, best_value, fixed_value)


@torch.no_grad()
def learn_fusion(model: HarmoniAD, source: FeatureSource, *, batch_size: int, device: torch.device,
                 seed: int, progress: ProgressFn | None = None) -> FusionChoice | None:
    """Choose ``model``'s fusion weights on pseudo-defects in training normals; None when it has none to learn.

    Call after :meth:`HarmoniAD.calibrate` (the maps are standardised as at test time). Uses
    at most ``cfg.fusion_pseudo_images`` training images, evenly strided. On a grid too
    small to leave normal positions around a paste the fixed weights stay (and the choice says so).
    """
    cfg = model.cfg
    if not hasattr(model, "fusion_mix"):
        return None
    n = len(source)
    picks = torch.linspace(0, n - 1, min(n, cfg.fusion_pseudo_images)).round().long().unique().tolist()
    generator = torch.Generator().manual_seed(seed)
    meter = Progress("fusion weights", len(picks), progress)
    was_training = model.training
    model.eval()
    pasted_z: list[dict[str, torch.Tensor]] = []
    clean_z: list[dict[str, torch.Tensor]] = []
    masks: list[torch.Tensor] = []

    def z_of(feats: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        z = model.standardise(model.branch_maps(model([f.to(device) for f in feats])))
        return {k: v.float().cpu() for k, v in z.items()}

    for start in range(0, len(picks), batch_size):
        feats = [f.float() for f in source.load(picks[start : start + batch_size])]
        pasted, mask = paste_pseudo_defects(feats, generator)
        pasted_z.append(z_of(pasted))
        clean_z.append(z_of(feats))
        masks.append(mask)
        meter.update(len(mask))
    model.train(was_training)
    z_pasted = {k: torch.cat([part[k] for part in pasted_z]) for k in pasted_z[0]}
    z_clean = {k: torch.cat([part[k] for part in clean_z]) for k in clean_z[0]}
    fixed = cfg.fixed_mix
    mask = torch.cat(masks).numpy()
    if mask.all():
        kept = WeightChoice(fixed, False, None, None)
        choice = FusionChoice(kept, kept, len(picks), cfg.fusion_margin,
                              note=f"the {mask.shape[1]} x {mask.shape[2]} grid leaves no normal position around a paste")
    else:
        choice = FusionChoice(
            map=choose_mix(pixel_criterion(z_pasted, mask), fixed, cfg.fusion_margin),
            score=choose_mix(image_criterion(z_pasted, z_clean), fixed, cfg.fusion_margin),
            images=len(picks),
            margin=cfg.fusion_margin,
        )
    model.fusion_mix.copy_(torch.tensor(choice.map.mix, dtype=model.fusion_mix.dtype))
    model.fusion_score_mix.copy_(torch.tensor(choice.score.mix, dtype=model.fusion_score_mix.dtype))
    return choice
