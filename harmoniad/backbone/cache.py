"""On-disk cache of frozen-backbone features, shared by training, scoring and every baseline.

The backbone is frozen, so an image's features depend only on the backbone (model, weights,
input size, blocks: its key) and the image's bytes. Each image gets one fp16 safetensors file
``<root>/<backbone key>/<sha[:2]>/<sha>.safetensors`` (``sha`` = sha256 of the image file),
written atomically (rename, no fsync: a damaged file is recomputed anyway) by a background
writer while the next batch is computed, so an interrupted extraction resumes where it
stopped. A file that is unreadable, truncated or of the wrong shape is recomputed. Loading
needs no weights when everything is cached: the backbone is built only for misses.

Disk: at ViT-L-14-336 a cached image costs ~4.5 MiB, so a full MVTec + VisA + BTAD sweep
needs ~75 GB. Before extracting, :meth:`FeatureCache.ensure` estimates the size and refuses
(:class:`CacheSpaceError`) when the disk would keep less than ``min_free_gib`` free. The cache
is opt-in on a GPU, where features are computed on the fly instead.
"""

from __future__ import annotations

import logging
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from harmoniad.runtime.atomic import atomic_write_bytes
from harmoniad.backbone.encoder import (
    Backbone,
    BackboneConfig,
    BackboneSpec,
    memo_file_sha256,
    resolve_spec,
)
from harmoniad.data import read_image
from harmoniad.runtime.distributed import active as distributed_active
from harmoniad.runtime.distributed import all_reduce_sum, is_main, raise_if_any_failed, shard
from harmoniad.data.loading import batch_len, decoded_batches, default_workers
from harmoniad.runtime.device import AdaptiveBatch
from harmoniad.runtime.paths import cache_dir
from harmoniad.runtime.progress import Progress, ProgressFn, silent

log = logging.getLogger(__name__)

#: Bumped when the file layout changes; files of another format are recomputed.
FORMAT_VERSION = "1"
_FP16_MAX = 65504.0

PathLike = str | os.PathLike[str]
_Sink = Callable[[str, list[torch.Tensor]], None]

#: Free disk space (GiB) a cache extraction must leave on the cache's filesystem.
DEFAULT_MIN_FREE_GIB = 5.0
#: safetensors header and metadata per file (measured: well under 1 KiB), rounded up.
_FILE_OVERHEAD = 4096


class CacheSpaceError(ValueError):
    """Caching these features would fill the disk (the message gives the sizes and the ways out)."""


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem that holds ``path`` (or its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


class FeatureCache:
    """Backbone features of image files, computed once and kept on disk.

    ``backbone`` is a :class:`BackboneConfig` (the :class:`Backbone` is built lazily, on
    ``device``, only if some features are missing) or an already built :class:`Backbone`.
    """

    def __init__(
        self,
        backbone: BackboneConfig | Backbone,
        root: PathLike | None = None,
        batch_size: int = 16,
        device: str | torch.device = "auto",
        *,
        allow_download: bool | None = None,
        workers: int | None = None,
        min_free_gib: float = DEFAULT_MIN_FREE_GIB,
    ) -> None:
        if isinstance(backbone, Backbone):
            self._backbone: Backbone | None = backbone
            self.spec: BackboneSpec = backbone.spec
        elif isinstance(backbone, BackboneConfig):
            self._backbone = None
            self.spec = resolve_spec(backbone)
        else:
            raise TypeError(f"FeatureCache needs a BackboneConfig or a Backbone, got {type(backbone).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"FeatureCache.batch_size must be a positive integer, got {batch_size!r}")
        self.root = Path(root) if root is not None else cache_dir() / "features"
        self.batch_size = batch_size
        self.device = device
        self.allow_download = allow_download
        # Image decoding overlaps the forward pass: worker processes on CUDA, a few threads on
        # the CPU (None: chosen for the backbone's device when it is built).
        self.workers = workers
        self.min_free_gib = float(min_free_gib)
        # Starts at batch_size and halves on CUDA out-of-memory (the smaller size then sticks).
        self._chunks = AdaptiveBatch(batch_size)
        self._shapes = self.spec.feature_shapes

    # -- facts -------------------------------------------------------------------------------
    @property
    def config(self) -> BackboneConfig:
        return self.spec.config

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def directory(self) -> Path:
        """Where this backbone's feature files live."""
        return self.root / self.key

    @property
    def feature_shapes(self) -> list[tuple[int, int, int]]:
        """``(C, h, w)`` per tapped block."""
        return list(self._shapes)

    @property
    def backbone(self) -> Backbone:
        """The backbone, built on first use (loads weights; may raise BackboneWeightsError)."""
        if self._backbone is None:
            backbone = Backbone(self.spec.config, self.device, allow_download=self.allow_download)
            if backbone.key != self.key:
                raise RuntimeError(
                    f"backbone key changed from {self.key!r} to {backbone.key!r} while the cache was open "
                    "(did HARMONIAD_CLIP_WEIGHTS or the weights file change?); create a new FeatureCache"
                )
            self._backbone = backbone
        return self._backbone

    def provenance(self) -> dict[str, Any]:
        record = self._backbone.provenance() if self._backbone is not None else self.spec.provenance()
        record["feature_dir"] = str(self.directory)
        return record

    @property
    def bytes_per_image(self) -> int:
        """Disk size of one image's feature file (fp16 maps plus header)."""
        return sum(2 * c * h * w for c, h, w in self._shapes) + _FILE_OVERHEAD

    def check_space(self, n_images: int) -> None:
        """Refuse (:class:`CacheSpaceError`) if ``n_images`` more files would leave too little free disk."""
        if n_images <= 0:
            return
        need = n_images * self.bytes_per_image
        free = free_bytes(self.root)
        margin = int(self.min_free_gib * (1 << 30))
        if free - need < margin:
            gib = 1 << 30
            raise CacheSpaceError(
                f"feature cache {self.directory}: caching {n_images} images of {self.key} needs "
                f"~{need / gib:.1f} GiB ({self.bytes_per_image / (1 << 20):.2f} MiB each) but {free / gib:.1f} GiB "
                f"are free and {self.min_free_gib:g} GiB must stay free; free some space, set HARMONIAD_CACHE "
                "to a larger disk, or compute features on the fly instead of caching them (the default on a GPU)"
            )

    def feature_file(self, image_path: PathLike) -> Path:
        """The feature file of ``image_path`` (whether or not it exists yet)."""
        return self._file(self._digest(Path(image_path)))

    # -- work --------------------------------------------------------------------------------
    def ensure(
        self, paths: Sequence[PathLike], progress: ProgressFn | None = None, *, distributed: bool = False
    ) -> int:
        """Extract the features of ``paths`` that are missing or damaged; returns how many.

        Cheap when everything is cached (file headers are checked, tensors are not read).

        ``distributed=True`` makes this a collective call in a ``torchrun`` job: every rank
        must call it with the same ``paths``; each extracts its shard of them (split by
        image, before looking at the disk, so the split agrees on all ranks), then all wait
        for each other, so every rank then finds the whole set on the (shared) cache
        filesystem. The count returned is the total over ranks; only rank 0 reports
        progress. If a rank fails, every rank raises. In a single process it is ignored.
        """
        unique = list(self._unique(paths).items())
        if not (distributed and distributed_active()):
            todo = [(d, p) for d, p in unique if not self._check(d, read=False)[0]]
            self._extract(todo, progress, sink=None)
            return len(todo)
        todo = [(d, p) for d, p in shard(unique) if not self._check(d, read=False)[0]]
        error: BaseException | None = None
        try:
            self._extract(todo, progress if is_main() else silent, sink=None)
        except Exception as exc:  # noqa: BLE001 - reported to every rank below, then re-raised
            error = exc
        raise_if_any_failed(error, "feature extraction")  # also the barrier: every shard is on disk
        return int(all_reduce_sum([len(todo)]).item())

    def load(self, paths: Sequence[PathLike], progress: ProgressFn | None = None) -> list[torch.Tensor]:
        """Per tapped block, a float32 ``N x C x h x w`` tensor of the images in ``paths`` order.

        Missing or damaged features are extracted first; the values are the fp16-rounded
        cached ones whether they were just computed or read back.
        """
        path_list = [Path(p) for p in paths]
        digests = [self._digest(p) for p in path_list]
        rows: dict[str, list[int]] = {}
        for i, d in enumerate(digests):
            rows.setdefault(d, []).append(i)
        out = [torch.empty((len(path_list), *shape), dtype=torch.float32) for shape in self._shapes]

        def fill(digest: str, tensors: list[torch.Tensor]) -> None:
            for layer, t in zip(out, tensors):
                for i in rows[digest]:
                    layer[i].copy_(t)

        todo = []
        for d, idx in rows.items():
            ok, tensors = self._check(d, read=True)
            if ok:
                fill(d, tensors)
            else:
                todo.append((d, path_list[idx[0]]))
        self._extract(todo, progress, sink=fill)
        return out

    # -- internals ---------------------------------------------------------------------------
    def _file(self, digest: str) -> Path:
        return self.directory / digest[:2] / f"{digest}.safetensors"

    def _digest(self, path: Path) -> str:
        """sha256 of the image bytes, remembered process-wide per (path, size, mtime).

        The memo (:func:`memo_file_sha256`) is shared by all caches, not kept per instance:
        an evaluation builds many FeatureCache objects over the same images, and the hash
        does not depend on the backbone.
        """
        try:
            return memo_file_sha256(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such image file") from None

    def _unique(self, paths: Sequence[PathLike]) -> dict[str, Path]:
        unique: dict[str, Path] = {}
        for p in paths:
            path = Path(p)
            unique.setdefault(self._digest(path), path)
        return unique

    def _check(self, digest: str, *, read: bool) -> tuple[bool, list[torch.Tensor]]:
        """Is the feature file present and sound? With ``read``, also return its tensors."""
        file = self._file(digest)
        if not file.is_file():
            return False, []
        names = [f"layer{i}" for i in range(len(self._shapes))]
        try:
            with safe_open(str(file), framework="pt") as fh:
                meta = fh.metadata() or {}
                if meta.get("format") != FORMAT_VERSION or meta.get("backbone_key") != self.key:
                    raise ValueError(f"metadata {meta} does not match format {FORMAT_VERSION}/{self.key}")
                if sorted(fh.keys()) != sorted(names):
                    raise ValueError(f"tensors {sorted(fh.keys())}, expected {names}")
                for name, shape in zip(names, self._shapes):
                    sl = fh.get_slice(name)
                    if tuple(sl.get_shape()) != shape or sl.get_dtype() != "F16":
                        raise ValueError(f"{name} is {sl.get_dtype()} {sl.get_shape()}, expected F16 {shape}")
                tensors = [fh.get_tensor(name) for name in names] if read else []
            if read and not all(torch.isfinite(t).all() for t in tensors):
                raise ValueError("non-finite values")
        except Exception as exc:  # noqa: BLE001 - any damage means: recompute
            log.warning("feature file %s is damaged (%s); recomputing it", file, exc)
            return False, []
        return True, tensors

    def _write(self, digest: str, tensors: list[torch.Tensor]) -> None:
        data = safetensors_save(
            {f"layer{i}": t for i, t in enumerate(tensors)},
            metadata={
                "format": FORMAT_VERSION,
                "backbone_key": self.key,
                "image_sha256": digest,
                "layers": ",".join(map(str, self.spec.layers)),
            },
        )
        atomic_write_bytes(self._file(digest), data, durable=False)

    def _extract(self, todo: list[tuple[str, Path]], progress: ProgressFn | None, sink: _Sink | None) -> None:
        """Compute and store features batch by batch while the next batches' images are decoded.

        Checks the disk space first (:meth:`check_space`). On CUDA, images are decoded by
        DataLoader worker processes into pinned memory and a batch that does not fit on the
        GPU is split (:class:`~harmoniad.runtime.device.AdaptiveBatch`). A batch's files are
        written by one background thread while the next batch is computed (at most two
        batches wait to be written, which bounds the memory); a write error stops the run.
        """
        if not todo:
            return
        self.check_space(len(todo))
        backbone = self.backbone
        on_cuda = backbone.device.type == "cuda"
        tracker = Progress(f"extract features ({self.key})", total=len(todo), callback=progress)
        images = decoded_batches(
            [p for _, p in todo],
            self.batch_size,
            workers=self.workers or default_workers(backbone.device),
            processes=on_cuda,
            pin_memory=on_cuda,
            reader=read_image,
        )
        done = 0
        pending: list[Future[None]] = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="feature-cache-writer") as writer:
            try:
                for batch in images:
                    n = batch_len(batch)
                    for part in self._chunks.run(n, lambda a, b, x=batch: self._features(backbone, x[a:b])):
                        files = [(todo[done + j][0], per_image) for j, per_image in enumerate(part)]
                        done += len(part)
                        pending.append(writer.submit(self._write_many, files))
                        if sink is not None:
                            for digest, per_image in files:
                                sink(digest, per_image)
                    while len(pending) > 2 or (pending and pending[0].done()):
                        pending.pop(0).result()  # re-raises a write error here
                    tracker.update(n)
                for job in pending:
                    job.result()
            finally:
                for job in pending:
                    job.cancel()

    def _write_many(self, files: list[tuple[str, list[torch.Tensor]]]) -> None:
        for digest, tensors in files:
            self._write(digest, tensors)

    @staticmethod
    def _features(backbone: Backbone, images: Any) -> list[list[torch.Tensor]]:
        """Per image of a decoded batch, its per-layer fp16 CPU feature maps."""
        feats = backbone.extract(backbone.preprocess(images))
        feats = [f.clamp_(-_FP16_MAX, _FP16_MAX).to("cpu", torch.float16) for f in feats]
        return [[f[j].clone() for f in feats] for j in range(feats[0].shape[0])]


__all__ = ["DEFAULT_MIN_FREE_GIB", "FORMAT_VERSION", "CacheSpaceError", "FeatureCache", "free_bytes"]
