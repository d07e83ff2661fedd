"""Where features come from: one abstraction for every producer of backbone feature maps.

A :class:`FeatureSource` stands for the features of a fixed, ordered list of images and
hands out per-layer ``N x C x h x w`` maps: by index (``load``, what training's shuffled
batches need) or in order (``batches``, what scoring needs, where a producer can work
ahead). Training, scoring and the baselines all read one:

- :class:`TensorSource`: in-memory tensors (tests, tiny backbones);
- :class:`CacheSource`: the on-disk feature cache (CPUs; many methods and ablations over
  the same images pay for the backbone once);
- :class:`BackboneSource`: a live backbone, nothing written (images seen once; on a GPU the
  backbone is faster than reading a cache back). Decoding runs ahead in workers;
- any source's :meth:`~IndexedSource.subset` (e.g. this process's shard under torchrun).

:func:`source_for` turns a feature provider (a ``FeatureCache`` or a ``Backbone``) and image
paths into the matching source: the one place that tells them apart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from harmoniad.backbone.encoder import Backbone, BackboneConfig
from harmoniad.runtime.progress import ProgressFn

if TYPE_CHECKING:
    from harmoniad.backbone.cache import FeatureCache


@runtime_checkable
class FeatureSource(Protocol):
    """Features of N images: ``load(indices)`` -> per layer ``B x C x h x w``.

    A source may also offer ``batches(batch_size)``, the features in order, when it can work
    ahead (:class:`BackboneSource` decodes the next images meanwhile); :func:`in_order` uses it.
    """

    def __len__(self) -> int: ...

    def load(self, indices: Sequence[int]) -> list[torch.Tensor]: ...

    def describe(self) -> dict[str, Any]: ...


def paths_digest(paths: Sequence[str | Path]) -> str:
    """A short hash of a set of image paths (order-independent), naming a training set."""
    # surrogateescape: a file name that is not UTF-8 hashes by its bytes instead of failing.
    names = "\n".join(sorted(str(p) for p in paths)).encode("utf-8", "surrogateescape")
    return hashlib.sha256(names).hexdigest()[:16]


def in_order(source: FeatureSource, batch_size: int) -> Iterator[list[torch.Tensor]]:
    """The features of images ``0..N-1`` of ``source`` in order, ``batch_size`` at a time."""
    own = getattr(source, "batches", None)
    if own is not None:
        yield from own(batch_size)
        return
    yield from IndexedSource.batches(source, batch_size)  # type: ignore[arg-type]


class IndexedSource:
    """Shared behaviour: in-order batches through ``load`` and index subsets."""

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, indices: Sequence[int]) -> list[torch.Tensor]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"images": len(self)}

    def batches(self, batch_size: int) -> Iterator[list[torch.Tensor]]:
        """Features of images ``0..N-1`` in order, ``batch_size`` at a time."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, len(self), batch_size):
            yield self.load(range(start, min(len(self), start + batch_size)))

    def subset(self, indices: Sequence[int]) -> SubsetSource:
        """The same features restricted to ``indices`` (in that order), e.g. one rank's shard."""
        return SubsetSource(self, indices)


class SubsetSource(IndexedSource):
    """A view of another source on some of its indices."""

    def __init__(self, parent: IndexedSource, indices: Sequence[int]) -> None:
        n = len(parent)
        bad = [i for i in indices if not 0 <= i < n]
        if bad:
            raise IndexError(f"SubsetSource: indices {bad[:5]} out of range for a source of {n} images")
        self.parent = parent
        self.indices = [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, indices: Sequence[int]) -> list[torch.Tensor]:
        return self.parent.load([self.indices[i] for i in indices])

    def describe(self) -> dict[str, Any]:
        return {**self.parent.describe(), "images": len(self)}


class TensorSource(IndexedSource):
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


class CacheSource(IndexedSource):
    """Features of image files read through :class:`harmoniad.backbone.cache.FeatureCache`, one batch at a time."""

    def __init__(self, cache: FeatureCache, paths: Sequence[Path], description: dict[str, Any] | None = None) -> None:
        if not paths:
            raise ValueError("CacheSource: no images")
        self.cache = cache
        self.paths = [Path(p) for p in paths]
        self._description = dict(description or {})

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, indices: Sequence[int]) -> list[torch.Tensor]:
        return self.cache.load([self.paths[i] for i in indices])

    def describe(self) -> dict[str, Any]:
        return {"images": len(self), "paths_sha256": paths_digest(self.paths), **self._description}


class BackboneSource(IndexedSource):
    """Features computed on the fly by a live backbone; nothing is written to disk.

    ``load`` (training's shuffled batches) decodes its images in a pool of threads (PIL
    decodes without the GIL; one thread took ~33 ms a 1024 px PNG, so a 16-image training
    step on a GPU waited half a second for it); ``batches`` (scoring, in order) decodes the next
    images in workers while the current batch runs (worker processes and pinned memory on
    CUDA, threads on the CPU) and halves the forward chunk after a CUDA out-of-memory error.
    """

    def __init__(self, backbone: Backbone, paths: Sequence[str | Path], description: dict[str, Any] | None = None) -> None:
        if not paths:
            raise ValueError("BackboneSource: no images")
        self.backbone = backbone
        self.paths = [Path(p) for p in paths]
        self._description = dict(description or {})

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, indices: Sequence[int]) -> list[torch.Tensor]:
        from harmoniad.data import io
        from harmoniad.data.loading import decoded_batches, default_workers

        paths = [self.paths[i] for i in indices]
        decoded = list(decoded_batches(paths, max(1, len(paths)), workers=default_workers(self.backbone.device),
                                       processes=False, reader=io.read_image))
        images = decoded[0] if decoded else []  # no indices: preprocess says so
        # extract() runs under inference mode itself and returns ordinary tensors (training reads them).
        return self.backbone.extract(self.backbone.preprocess(images))

    def batches(self, batch_size: int) -> Iterator[list[torch.Tensor]]:
        from harmoniad.data.loading import batch_len, decoded_batches, default_workers
        from harmoniad.runtime.device import AdaptiveBatch

        device = self.backbone.device
        on_cuda = device.type == "cuda"
        chunks = AdaptiveBatch(batch_size)
        for images in decoded_batches(
            self.paths, batch_size, workers=default_workers(device), processes=on_cuda, pin_memory=on_cuda
        ):
            def forward(a: int, b: int, x: Any = images) -> list[torch.Tensor]:
                return self.backbone.extract(self.backbone.preprocess(x[a:b]))

            yield from chunks.run(batch_len(images), forward)

    def describe(self) -> dict[str, Any]:
        # No backbone key here: the checkpoint records the backbone config itself, and a model
        # trained on live features must have the same identity as one trained from the cache.
        return {"images": len(self), **self._description}


def source_for(
    provider: FeatureCache | Backbone, paths: Sequence[str | Path], progress: ProgressFn | None = None
) -> CacheSource | BackboneSource:
    """The source of ``paths``' features from ``provider``; a cache extracts what it lacks first."""
    from harmoniad.backbone.cache import FeatureCache

    if isinstance(provider, Backbone):
        return BackboneSource(provider, paths)
    if isinstance(provider, FeatureCache):
        provider.ensure(list(paths), progress=progress)
        return CacheSource(provider, [Path(p) for p in paths])
    raise TypeError(f"source_for: expected a FeatureCache or a Backbone, got {type(provider).__name__}")


def source_from_samples(
    samples: Sequence[Any],
    backbone: BackboneConfig,
    *,
    cache_root: Path | None = None,
    device: str | torch.device = "auto",
    progress: ProgressFn | None = None,
    online: bool | None = None,
) -> CacheSource | BackboneSource:
    """The features of normal training samples: cached (extracted or found) or computed on the fly.

    ``online`` None chooses by device: on a GPU the backbone runs on the fly for every batch
    (one epoch of MVTec's 3,629 training images takes seconds there, and a ViT-L feature
    cache of a whole sweep would not fit a GPU machine's disk); on a CPU the features are
    cached once, since many epochs and methods re-read them.
    """
    from harmoniad.backbone.cache import FeatureCache
    from harmoniad.runtime.device import resolve_device

    if not samples:
        raise ValueError("train: no training samples")
    anomalous = [s.image_path for s in samples if s.label != 0]
    if anomalous:
        raise ValueError(
            f"train: HarmoniAD trains on normal images only, got {len(anomalous)} anomalous samples "
            f"(first: {anomalous[0]})"
        )
    dev = resolve_device(device)
    paths = [s.image_path for s in samples]
    categories = sorted({s.category for s in samples})
    if online if online is not None else dev.type == "cuda":
        # The same description as the cached source: a checkpoint's identity does not depend on where
        # its features came from.
        return BackboneSource(Backbone(backbone, dev), paths,
                              {"paths_sha256": paths_digest(paths), "categories": categories})
    cache = FeatureCache(backbone, root=cache_root, device=dev)
    # Collective under torchrun (every rank trains on the same samples): each extracts a share.
    cache.ensure(paths, progress=progress, distributed=True)
    return CacheSource(cache, paths, {"categories": categories})
