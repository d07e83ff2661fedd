"""On-disk cache of frozen-backbone features, shared by training, scoring and every baseline.

The backbone is frozen, so an image's features depend only on the backbone (model, weights,
input size, blocks: its key) and the image's bytes. Each image gets one fp16 safetensors file
``<root>/<backbone key>/<sha[:2]>/<sha>.safetensors`` (``sha`` = sha256 of the image file),
written atomically right after its batch is computed, so an interrupted extraction resumes
where it stopped. A file that is unreadable, truncated or of the wrong shape is recomputed.
Loading needs no weights when everything is cached: the backbone is built only for misses.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save as safetensors_save

from harmoniad.atomic import atomic_write_bytes
from harmoniad.backbone import Backbone, BackboneConfig, BackboneSpec, file_sha256, resolve_spec
from harmoniad.data import read_image
from harmoniad.paths import cache_dir
from harmoniad.progress import Progress, ProgressFn

log = logging.getLogger(__name__)

#: Bumped when the file layout changes; files of another format are recomputed.
FORMAT_VERSION = "1"
_FP16_MAX = 65504.0

PathLike = str | os.PathLike[str]
_Sink = Callable[[str, list[torch.Tensor]], None]


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
        # Image decoding overlaps the forward pass; leave most cores to torch.
        self.workers = workers or max(1, min(4, (os.cpu_count() or 2) // 2))
        self._shapes = self.spec.feature_shapes
        self._digests: dict[tuple[str, int, int], str] = {}

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

    def feature_file(self, image_path: PathLike) -> Path:
        """The feature file of ``image_path`` (whether or not it exists yet)."""
        return self._file(self._digest(Path(image_path)))

    # -- work --------------------------------------------------------------------------------
    def ensure(self, paths: Sequence[PathLike], progress: ProgressFn | None = None) -> int:
        """Extract the features of ``paths`` that are missing or damaged; returns how many.

        Cheap when everything is cached (file headers are checked, tensors are not read).
        """
        todo = [(d, p) for d, p in self._unique(paths).items() if not self._check(d, read=False)[0]]
        self._extract(todo, progress, sink=None)
        return len(todo)

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
        """sha256 of the image bytes, remembered per (path, size, mtime) for this cache."""
        try:
            st = path.stat()
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no such image file") from None
        memo = (str(path.resolve()), st.st_size, st.st_mtime_ns)
        digest = self._digests.get(memo)
        if digest is None:
            digest = self._digests[memo] = file_sha256(path)
        return digest

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
        atomic_write_bytes(self._file(digest), data)

    def _extract(self, todo: list[tuple[str, Path]], progress: ProgressFn | None, sink: _Sink | None) -> None:
        """Compute and store features batch by batch, reading the next batch's images meanwhile."""
        if not todo:
            return
        backbone = self.backbone
        batches = [todo[i : i + self.batch_size] for i in range(0, len(todo), self.batch_size)]
        tracker = Progress(f"extract features ({self.key})", total=len(todo), callback=progress)
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            pending: list[Future[Any]] = [pool.submit(read_image, p) for _, p in batches[0]]
            try:
                for k, batch in enumerate(batches):
                    images = [f.result() for f in pending]
                    nxt = batches[k + 1] if k + 1 < len(batches) else []
                    pending = [pool.submit(read_image, p) for _, p in nxt]
                    feats = backbone.extract(backbone.preprocess(images))
                    feats = [f.clamp_(-_FP16_MAX, _FP16_MAX).to("cpu", torch.float16) for f in feats]
                    for j, (digest, _) in enumerate(batch):
                        per_image = [f[j].clone() for f in feats]
                        self._write(digest, per_image)
                        if sink is not None:
                            sink(digest, per_image)
                    tracker.update(len(batch))
            finally:
                for f in pending:
                    f.cancel()


__all__ = ["FORMAT_VERSION", "FeatureCache"]
