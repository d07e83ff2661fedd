"""Where features come from: one protocol for every producer of backbone feature maps.

A :class:`FeatureSource` hands out per-layer ``N x C x h x w`` feature maps for a batch of
indices. Training reads one, and so does scoring: in-memory tensors (tests, tiny
backbones), the on-disk feature cache (CPUs, many ablations over the same images).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from harmoniad.backbone.encoder import BackboneConfig
from harmoniad.runtime.progress import ProgressFn


@runtime_checkable
class FeatureSource(Protocol):
    """Training features, loaded a batch at a time: ``load(indices)`` -> per layer ``N x C x h x w``."""

    def __len__(self) -> int: ...

    def load(self, indices: Sequence[int]) -> list[torch.Tensor]: ...

    def describe(self) -> dict[str, Any]: ...


class TensorSource:
    """In-memory features (tests, tiny backbones): a list of per-layer ``N x C x h x w`` tensors."""

    def __init__(self, feats: Sequence[torch.Tensor], description: dict[str, Any] | None = None) -> None:
        if not feats or any(f.ndim != 4 or f.shape[0] != feats[0].shape[0] for f in feats):
            raise ValueError("TensorSource needs per-layer N x C x h x w tensors with the same N")
        self.feats = list(feats)
        self._description = dict(description or {})

    def __len__(self) -> int:
        return int(self.feats[0].shape[0])

    def load(self, indices: Sequence[int]) -> list[torch.Tensor]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return [f[idx].float() for f in self.feats]

    def describe(self) -> dict[str, Any]:
        return {"images": len(self), **self._description}


class CacheSource:
    """Features of image files read through :class:`harmoniad.backbone.cache.FeatureCache`, one batch at a time."""

    def __init__(self, cache: Any, paths: Sequence[Path], description: dict[str, Any] | None = None) -> None:
        if not paths:
            raise ValueError("CacheSource: no training images")
        self.cache = cache
        self.paths = [Path(p) for p in paths]
        self._description = dict(description or {})

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, indices: Sequence[int]) -> list[torch.Tensor]:
        return self.cache.load([self.paths[i] for i in indices])

    def describe(self) -> dict[str, Any]:
        # surrogateescape: a file name that is not UTF-8 hashes by its bytes instead of failing.
        names = "\n".join(sorted(str(p) for p in self.paths)).encode("utf-8", "surrogateescape")
        digest = hashlib.sha256(names).hexdigest()[:16]
        return {"images": len(self), "paths_sha256": digest, **self._description}


def source_from_samples(
    samples: Sequence[Any],
    backbone: BackboneConfig,
    *,
    cache_root: Path | None = None,
    device: str | torch.device = "auto",
    progress: ProgressFn | None = None,
) -> CacheSource:
    """Extract (or find) the cached features of normal training samples and wrap them."""
    from harmoniad.backbone.cache import FeatureCache

    if not samples:
        raise ValueError("train: no training samples")
    anomalous = [s.image_path for s in samples if s.label != 0]
    if anomalous:
        raise ValueError(
            f"train: HarmoniAD trains on normal images only, got {len(anomalous)} anomalous samples "
            f"(first: {anomalous[0]})"
        )
    cache = FeatureCache(backbone, root=cache_root, device=device)
    paths = [s.image_path for s in samples]
    # Collective under torchrun (every rank trains on the same samples): each extracts a share.
    cache.ensure(paths, progress=progress, distributed=True)
    categories = sorted({s.category for s in samples})
    return CacheSource(cache, paths, {"categories": categories})
