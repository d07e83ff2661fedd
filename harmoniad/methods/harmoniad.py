"""HarmoniAD (and its ablations) as an evaluation method: train once on all categories, then score.

:class:`Scorer` ties a trained model to its features: a
:class:`~harmoniad.backbone.cache.FeatureCache` (images scored many times, evaluation) or a
:class:`~harmoniad.backbone.Backbone` (images seen once, the CLI's folder scoring, the
benchmark); :func:`harmoniad.maps.finalize_maps` turns its grid maps into final maps.

The checkpoint directory is named by a hash of everything that determines the weights
(backbone, model and training configs, training images), so a repeated run reuses the
trained heads and an interrupted training resumes where it stopped.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from harmoniad.backbone import Backbone, BackboneConfig
from harmoniad.backbone.cache import FeatureCache
from harmoniad.backbone.sources import FeatureSource, in_order, source_for
from harmoniad.data import Sample
from harmoniad.maps import FinalMaps, HostPrediction, Prediction, ScoreConfig, finalize_maps
from harmoniad.methods.base import Context, Method
from harmoniad.model import HarmoniAD, ModelConfig
from harmoniad.runtime.device import AdaptiveBatch, autocast, batch_size_for, cast_for_inference, maybe_compile, resolve_device
from harmoniad.runtime.paths import cache_dir
from harmoniad.runtime.progress import Progress, ProgressFn
from harmoniad.runtime.serialization import to_dict
from harmoniad.train import CheckpointInfo, TrainConfig, load_checkpoint, train


class Scorer:
    """Scores images with a trained model through a feature cache or a live backbone.

    ``features`` is a :class:`FeatureCache` (cached features, extracted on a miss) or a
    :class:`Backbone` (features computed on the fly, nothing written), or None to score
    precomputed features only (:meth:`score_features`).
    """

    def __init__(
        self,
        model: HarmoniAD,
        features: FeatureCache | Backbone | None = None,
        cfg: ScoreConfig = ScoreConfig(),
        *,
        device: str | torch.device = "auto",
        batch_size: int | None = None,
    ) -> None:
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"Scorer.batch_size must be >= 1, got {batch_size}")
        self.device = resolve_device(device)
        self.model = model.to(self.device).eval()
        self.features = features
        self.cfg = cfg
        #: Images per batch: given, or from the GPU's free memory (64-256 on an H200; 16 on the CPU).
        self.batch_size = batch_size or self._default_batch_size(features)
        # On CUDA the forward pass runs a bf16 copy of the heads (cast once, not on every call).
        net = cast_for_inference(copy.deepcopy(self.model), self.device) if self.device.type == "cuda" else self.model
        #: What the forward pass runs through: the model (bf16 copy on CUDA), or its ``torch.compile`` wrapper.
        self.net = maybe_compile(net, cfg.compile)
        #: The checkpoint's settings when built by :meth:`from_checkpoint`.
        self.info: CheckpointInfo | None = None
        if features is not None:
            self._check_shapes(features)

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        cfg: ScoreConfig = ScoreConfig(),
        *,
        device: str | torch.device = "auto",
        use_cache: bool | None = None,
        cache_root: Path | None = None,
        batch_size: int | None = None,
        backbone: BackboneConfig | None = None,
    ) -> Scorer:
        """Load a checkpoint and attach the backbone it was trained on (or ``backbone``).

        ``use_cache`` None: the feature cache on a CPU (the backbone is the slow part there),
        features computed on the fly on a GPU (faster than reading a cache back, and a full
        ViT-L cache of MVTec + VisA + BTAD would not fit a GPU machine's disk).
        """
        dev = resolve_device(device)
        model, info = load_checkpoint(path, device=dev)
        bcfg = backbone or info.backbone
        if use_cache is None:
            use_cache = dev.type != "cuda"
        features: FeatureCache | Backbone | None = None
        if bcfg is not None:
            if use_cache:
                features = FeatureCache(bcfg, root=cache_root, batch_size=batch_size or 16, device=dev)
            else:
                features = Backbone(bcfg, dev)
        scorer = cls(model, features, cfg, device=dev, batch_size=batch_size)
        scorer.info = info
        return scorer

    def _default_batch_size(self, features: FeatureCache | Backbone | None) -> int:
        if features is None:
            return 16
        shapes = features.feature_shapes
        # ~128 bytes of activations per feature value through backbone, heads and maps: generous,
        # and an overestimate only costs speed (an underestimate is caught by the OOM halving).
        per_image = 128 * sum(c * h * w for c, h, w in shapes)
        return batch_size_for(self.device, per_image, default=16, minimum=8, maximum=256)

    def _check_shapes(self, features: FeatureCache | Backbone) -> None:
        shapes = features.feature_shapes
        want = self.model.in_dim, self.model.num_layers
        if len(shapes) != want[1] or any(s[0] != want[0] for s in shapes):
            raise ValueError(
                f"backbone features are {len(shapes)} layers of shape {shapes[0] if shapes else None}, but the "
                f"model was trained on {want[1]} layers of {want[0]} channels; use the checkpoint's backbone config"
            )

    # -- entry points -------------------------------------------------------------------------
    def score_features(self, feats: Sequence[torch.Tensor]) -> FinalMaps:
        """Per-layer ``B x C x h x w`` features -> final maps and scores (tensors on the device)."""
        with torch.inference_mode():
            x = [f.to(self.device, non_blocking=True) for f in feats]
            with autocast(self.device):
                out = self.net(x)
            return finalize_maps(self.model.output_maps(out), self.cfg)

    def score_tensor(self, images: torch.Tensor) -> FinalMaps:
        """Preprocessed ``B x 3 x S x S`` images -> final maps (backbone, split, branches, maps, smoothing)."""
        return self.score_features(self._backbone().extract(images))

    def score_images(self, images: Sequence[np.ndarray], progress: ProgressFn | None = None) -> Prediction:
        """``H x W x 3`` uint8 RGB arrays -> :class:`~harmoniad.methods.base.Prediction`."""
        backbone = self._backbone()
        meter = Progress("score", len(images), progress)
        host = HostPrediction(len(images))
        for start in range(0, len(images), self.batch_size):
            batch = images[start : start + self.batch_size]
            host.add(self.score_tensor(backbone.preprocess(list(batch))))
            meter.update(len(batch))
        return host.result()

    def score_source(self, source: FeatureSource, progress: ProgressFn | None = None) -> Prediction:
        """Every image of ``source``, in order -> Prediction (maps moved to the host per batch)."""
        meter = Progress("score", len(source), progress)
        host = HostPrediction(len(source))  # maps leave the device batch by batch
        heads = AdaptiveBatch(self.batch_size)  # the heads' share halves itself on CUDA out-of-memory
        for feats in in_order(source, self.batch_size):
            n = int(feats[0].shape[0])
            heads.run(n, lambda a, b, f=feats: host.add(self.score_features([x[a:b] for x in f])))
            meter.update(n)
        return host.result()

    def score_paths(self, paths: Sequence[str | Path], progress: ProgressFn | None = None) -> Prediction:
        """Image files -> Prediction, in ``paths`` order, a batch at a time."""
        if not paths:
            raise ValueError("Scorer.score_paths: no images to score")
        if self.features is None:
            raise ValueError("Scorer has no backbone or feature cache; use score_features")
        # A cache extracts every missing feature first, in full batches and with its own progress.
        return self.score_source(source_for(self.features, paths, progress), progress)

    def score_samples(self, samples: Sequence[Any], progress: ProgressFn | None = None) -> Prediction:
        """``Sample`` records -> Prediction, in order."""
        return self.score_paths([s.image_path for s in samples], progress)

    def _backbone(self) -> Backbone:
        if isinstance(self.features, Backbone):
            return self.features
        if isinstance(self.features, FeatureCache):
            return self.features.backbone
        raise ValueError("Scorer has no backbone; build it with a Backbone or a FeatureCache")


class HarmoniADMethod(Method):
    """The frequency-guided dual-branch detector, trained jointly on all chosen categories."""

    name = "harmoniad"

    def __init__(
        self,
        model: ModelConfig | None = None,
        training: TrainConfig | None = None,
        scoring: ScoreConfig | None = None,
        *,
        name: str = "harmoniad",
        seed_from_context: bool = True,
    ) -> None:
        self.model_cfg = model or ModelConfig()
        self.train_cfg = training or TrainConfig()
        self.score_cfg = scoring or ScoreConfig()
        self.name = name  # an ablation's own name, in progress, runs and checkpoint folders
        #: Train with the evaluation's seed (``Context.seed``) unless the options fixed one, so
        #: runs that differ only in seed differ in initialisation, batch order and noise too.
        self.seed_from_context = seed_from_context
        self.checkpoint: Path | None = None
        self._scorer: Scorer | None = None

    def config(self) -> dict[str, Any]:
        return {
            "model": to_dict(self.model_cfg),
            "train": to_dict(self.train_cfg),
            "score": to_dict(self.score_cfg),
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
        }

    def fitted(self) -> dict[str, Any]:
        """The checkpoint and the fusion weights of (z_high, z_joint, z_low) it scores with, and how they were chosen."""
        if self._scorer is None or self.checkpoint is None:
            return {}
        model = self._scorer.model
        fusion = None
        if model.cfg.mixes_maps:  # one branch, or a max fusion: no weights
            info = self._scorer.info
            fusion = {"map": list(model.mix), "score": list(model.score_mix),
                      "learning": None if info is None else (info.result or {}).get("fusion")}
        return {"checkpoint": str(self.checkpoint), "fusion": fusion}

    def checkpoint_dir(self, train_samples: list[Sample], ctx: Context) -> Path:
        """Where the weights for exactly these settings and training images live."""
        identity = {
            "backbone": to_dict(ctx.backbone),
            "model": to_dict(self.model_cfg),
            "train": to_dict(self.train_cfg),
            "images": sorted(str(s.image_path) for s in train_samples),
        }
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        root = Path(ctx.cache_root) if ctx.cache_root is not None else cache_dir()
        return root / "checkpoints" / f"{self.name}-{digest}"

    def fit(self, train_samples: list[Sample], ctx: Context) -> None:
        if ctx.backbone is None:
            raise ValueError("HarmoniAD needs a backbone config in the evaluation context")
        normal = [s for s in train_samples if s.label == 0]
        if self.seed_from_context:
            self.train_cfg = replace(self.train_cfg, seed=ctx.seed)
        out = self.checkpoint_dir(normal, ctx)
        feature_root = None if ctx.cache_root is None else Path(ctx.cache_root) / "features"
        train(
            normal,
            ctx.backbone,
            self.model_cfg,
            self.train_cfg,
            out,
            progress=ctx.progress,
            cache_root=feature_root,
            device=ctx.device,
        )
        self.checkpoint = out
        score_cfg = ScoreConfig(**{**to_dict(self.score_cfg), "resolution": ctx.resolution})
        self._scorer = Scorer.from_checkpoint(out, score_cfg, device=ctx.device, cache_root=feature_root)

    def predict(self, test: list[Sample], ctx: Context) -> Prediction:
        if self._scorer is None:
            raise RuntimeError("HarmoniAD.predict called before fit")
        return self._scorer.score_samples(test, progress=ctx.progress)
