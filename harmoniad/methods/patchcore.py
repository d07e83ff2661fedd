"""PatchCore baseline (Roth et al., CVPR 2022) on the shared, cached CLIP patch features.

A memory bank of normal patch embeddings, thinned by greedy k-center coreset selection,
scores a test patch by its distance to the nearest bank entry. It is the strongest simple
baseline on MVTec and, run on the very same frozen features as HarmoniAD, it tells how
much the reconstruction model adds. Two modes: one bank per category (the paper's
setting) and one bank for all categories (the unified multi-class setting of docs/design.md#setting,
where a bank cannot know which category an image is from).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from harmoniad.runtime.serialization import to_dict
from harmoniad.data import Sample
from harmoniad.backbone.cache import FeatureCache
from harmoniad.backbone.sources import source_for
from harmoniad.maps import resize_and_blur
from harmoniad.methods.base import Context, Method, single_category
from harmoniad.maps import Prediction
from harmoniad.runtime.progress import Progress, ProgressFn

_ALL = "*"  # bank key of the multi-class bank

# Elements of one distance block (query chunk x bank): 2**25 float32 = 128 MiB.
_DISTANCE_BLOCK = 1 << 25


@dataclass(frozen=True)
class PatchCoreConfig:
    """PatchCore settings; the defaults follow the paper where it applies to ViT features."""

    layers: tuple[int, ...] | None = None  # indices into the cached layers; None = the middle two
    neighbourhood: int = 3  # local average pooling window (patch neighbourhood aggregation)
    embed_dim: int = 1024  # concatenated layers are average-pooled over channels to at most this
    coreset_fraction: float = 0.1  # bank keeps exactly ceil(fraction * patches)
    projection_dim: int = 128  # sparse random projection used only to pick the coreset
    per_category: bool = True  # False: one bank for all categories (multi-class)
    map_sigma: float = 4.0
    batch_size: int = 32  # images per feature load, bounds memory on large datasets

    def __post_init__(self) -> None:
        if not 0 < self.coreset_fraction <= 1:
            raise ValueError(f"PatchCoreConfig.coreset_fraction must be in (0, 1], got {self.coreset_fraction}")
        if self.neighbourhood < 1 or self.neighbourhood % 2 == 0:
            raise ValueError(f"PatchCoreConfig.neighbourhood must be a positive odd size, got {self.neighbourhood}")
        for name in ("embed_dim", "projection_dim", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"PatchCoreConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.layers is not None and not self.layers:
            raise ValueError("PatchCoreConfig.layers must name at least one layer (or be None)")


def coreset_size(n: int, fraction: float) -> int:
    """How many of ``n`` patches the coreset keeps: ``ceil(fraction * n)``, at least 1."""
    return min(n, max(1, math.ceil(fraction * n)))


def sparse_random_projection(
    in_dim: int, out_dim: int, generator: torch.Generator, density: float | None = None
) -> torch.Tensor:
    """An ``in_dim x out_dim`` sparse random projection (Li et al. 2006), as PatchCore uses.

    Entries are ``+-sqrt(1 / (density * out_dim))`` with probability ``density / 2`` each,
    else 0; pairwise distances are preserved in expectation (Johnson-Lindenstrauss).
    """
    density = density if density is not None else 1.0 / math.sqrt(in_dim)
    draw = torch.rand(in_dim, out_dim, generator=generator)
    signs = torch.where(torch.rand(in_dim, out_dim, generator=generator) < 0.5, -1.0, 1.0)
    return torch.where(draw < density, signs, torch.zeros(())) / math.sqrt(density * out_dim)


def greedy_coreset(
    features: torch.Tensor,
    fraction: float,
    *,
    projection_dim: int = 128,
    seed: int = 0,
    progress: ProgressFn | None = None,
) -> torch.Tensor:
    """Indices of ``ceil(fraction * N)`` distinct rows of ``features`` (N x D), greedy k-center.

    Starting from a seeded random row, repeatedly add the row farthest from everything
    chosen so far, so the subset covers the feature space with the smallest radius the
    greedy 2-approximation gives. Distances are computed after a sparse random projection
    to ``projection_dim`` dimensions (when D is larger) for speed.
    """
    n = features.shape[0]
    k = coreset_size(n, fraction)
    if k >= n:
        return torch.arange(n, device=features.device)
    generator = torch.Generator().manual_seed(seed)
    z = features.float()
    if z.shape[1] > projection_dim:
        z = z @ sparse_random_projection(z.shape[1], projection_dim, generator).to(z.device)
    sq_norms = (z * z).sum(dim=1)

    def sq_dist_to(i: int | torch.Tensor) -> torch.Tensor:
        # |z - z_i|^2 as one matrix-vector product: reads z once per step, allocates N floats.
        return (sq_norms - 2.0 * (z @ z[i]) + sq_norms[i]).clamp_min_(0.0)

    selected = torch.empty(k, dtype=torch.long, device=z.device)
    first = int(torch.randint(n, (1,), generator=generator))
    selected[0] = first
    min_dist = sq_dist_to(first)
    min_dist[first] = -1.0  # chosen rows are never chosen again, even among duplicates
    report = Progress("coreset", k, progress, start=1) if progress is not None else None
    reported = 1
    for i in range(1, k):
        idx = torch.argmax(min_dist)
        selected[i] = idx
        # min(-1, d) keeps chosen rows at -1, so only the new one needs marking.
        torch.minimum(min_dist, sq_dist_to(idx), out=min_dist)
        min_dist[idx] = -1.0
        if report is not None and ((i + 1) % 1024 == 0 or i == k - 1):
            report.update(i + 1 - reported)
            reported = i + 1
    return selected


def nearest_distances(queries: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    """Euclidean distance of each query row (Q x D) to its nearest bank row (M x D), chunked.

    The nearest row is found with the fast matrix-product form of ``cdist``; its distance is
    then recomputed directly, since that form loses precision to cancellation (a query that
    is in the bank would otherwise come out at ~1e-2 instead of 0).
    """
    chunk = max(1, _DISTANCE_BLOCK // max(1, bank.shape[0]))
    out = torch.empty(queries.shape[0], dtype=torch.float32, device=queries.device)
    bank = bank.float()
    for start in range(0, queries.shape[0], chunk):
        q = queries[start : start + chunk].float()
        nearest = torch.cdist(q, bank).argmin(dim=1)
        out[start : start + chunk] = (q - bank[nearest]).norm(dim=1)
    return out


def middle_layers(num_layers: int) -> tuple[int, ...]:
    """The two middle layer indices (one if there is a single layer): mid-level features
    carry the local structure PatchCore relies on, deep ones are too semantic."""
    if num_layers < 1:
        raise ValueError("no feature layers available")
    first = (num_layers - 1) // 2
    return tuple(sorted({first, min(first + 1, num_layers - 1)}))


class PatchCore(Method):
    """Memory bank of normal patches, greedy coreset, nearest-neighbour distance map."""

    name = "patchcore"
    uses_backbone: ClassVar[bool] = True

    def __init__(self, config: PatchCoreConfig | None = None) -> None:
        self.cfg = config or PatchCoreConfig()
        self._banks: dict[str, torch.Tensor] = {}
        self._fitted_backbone: Any = None
        self._cache: FeatureCache | None = None
        self._cache_for: tuple[Any, ...] | None = None

    def config(self) -> dict[str, Any]:
        return to_dict(self.cfg)

    @property
    def banks(self) -> dict[str, torch.Tensor]:
        """The fitted memory banks, keyed by category (``"*"`` for the multi-class bank)."""
        return dict(self._banks)

    def fit(self, train: list[Sample], ctx: Context) -> None:
        normal = [s for s in train if s.label == 0]
        if not normal:
            raise ValueError(f"{self.name}.fit: no normal (label 0) training samples given")
        groups: dict[str, list[Sample]] = defaultdict(list)
        for sample in normal:
            groups[sample.category if self.cfg.per_category else _ALL].append(sample)
        cache = self._feature_cache(ctx)
        banks: dict[str, torch.Tensor] = {}
        for key, samples in sorted(groups.items()):
            patches = self._embed(cache, [s.image_path for s in samples], ctx)
            patches = patches.reshape(-1, patches.shape[-1])
            idx = greedy_coreset(
                patches,
                self.cfg.coreset_fraction,
                projection_dim=self.cfg.projection_dim,
                seed=ctx.seed,
                progress=ctx.progress,
            )
            banks[key] = patches[idx].contiguous()
        self._banks = banks
        self._fitted_backbone = ctx.backbone

    def predict(self, test: list[Sample], ctx: Context) -> Prediction:
        category = single_category(test, self.name)
        if not self._banks:
            raise RuntimeError(f"{self.name}.predict called before fit")
        if ctx.backbone != self._fitted_backbone:
            raise ValueError(
                f"{self.name} was fitted with backbone {self._fitted_backbone}, asked to use {ctx.backbone}"
            )
        key = category if self.cfg.per_category else _ALL
        if key not in self._banks:
            raise RuntimeError(
                f"{self.name} has no memory bank for category {category!r}; fitted on {sorted(self._banks)}"
            )
        bank = self._banks[key]
        patches = self._embed(self._feature_cache(ctx), [s.image_path for s in test], ctx)
        n, h, w, d = patches.shape
        grid = nearest_distances(patches.reshape(-1, d), bank).reshape(n, h, w)
        scores = grid.flatten(1).max(dim=1).values.cpu().numpy()
        maps = resize_and_blur(grid, ctx.resolution, self.cfg.map_sigma)
        return Prediction(scores=scores, maps=maps.cpu().numpy())

    def _feature_cache(self, ctx: Context) -> FeatureCache:
        """The shared on-disk feature cache for ``ctx.backbone``, kept across calls so the
        backbone is built at most once (only if some features are missing)."""
        if ctx.backbone is None:
            raise ValueError(f"{self.name} needs a backbone: Context.backbone is None")
        root = None if ctx.cache_root is None else Path(ctx.cache_root) / "features"
        key = (ctx.backbone, root, str(ctx.device))
        if self._cache is None or self._cache_for != key:
            self._cache = FeatureCache(ctx.backbone, root=root, device=ctx.device)
            self._cache_for = key
        return self._cache

    def _embed(self, cache: FeatureCache, paths: Sequence[Path], ctx: Context) -> torch.Tensor:
        """``(N, h, w, D)`` locally aggregated patch embeddings of the images, in batches."""
        source = source_for(cache, paths, ctx.progress)
        return torch.cat([embed_patches(maps, self.cfg, device=ctx.device) for maps in source.batches(self.cfg.batch_size)])


def embed_patches(maps: Sequence[torch.Tensor], cfg: PatchCoreConfig, device: torch.device) -> torch.Tensor:
    """Per-layer ``N x C x h x w`` maps -> ``N x h x w x D`` PatchCore patch embeddings.

    Each chosen layer is averaged over a local ``neighbourhood`` window (a patch sees its
    neighbours, which makes the embedding robust to small misalignment), the layers are
    concatenated, and channels are average-pooled down to ``embed_dim`` when wider.
    """
    layers = cfg.layers if cfg.layers is not None else middle_layers(len(maps))
    bad = [i for i in layers if not -len(maps) <= i < len(maps)]
    if bad:
        raise ValueError(f"PatchCore layers {bad} out of range: the features have {len(maps)} layers")
    size = tuple(maps[layers[0]].shape[-2:])
    chosen = []
    for i in layers:
        x = maps[i].to(device=device, dtype=torch.float32)
        x = F.avg_pool2d(x, cfg.neighbourhood, stride=1, padding=cfg.neighbourhood // 2, count_include_pad=False)
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        chosen.append(x)
    x = torch.cat(chosen, dim=1).permute(0, 2, 3, 1)  # N x h x w x C
    n, h, w, c = x.shape
    if c > cfg.embed_dim:
        x = F.adaptive_avg_pool1d(x.reshape(-1, 1, c), cfg.embed_dim).reshape(n, h, w, cfg.embed_dim)
    return x.contiguous()


class MulticlassPatchCore(PatchCore):
    """PatchCore with one memory bank for all categories (unified multi-class setting)."""

    name = "patchcore_multiclass"

    def __init__(self, config: PatchCoreConfig | None = None) -> None:
        config = config or PatchCoreConfig(per_category=False)
        if config.per_category:
            raise ValueError("MulticlassPatchCore needs PatchCoreConfig(per_category=False)")
        super().__init__(config)
