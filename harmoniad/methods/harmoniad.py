"""HarmoniAD (and its ablations) as an evaluation method: train once on all categories, then score.

The checkpoint directory is named by a hash of everything that determines the weights
(backbone, model and training configs, training images), so a repeated run reuses the
trained heads and an interrupted training resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar

from harmoniad.config import to_dict
from harmoniad.data import Sample
from harmoniad.inference import ScoreConfig, Scorer
from harmoniad.methods.base import Context, Method, Prediction
from harmoniad.model import ModelConfig
from harmoniad.paths import cache_dir
from harmoniad.train import TrainConfig, train


class HarmoniADMethod(Method):
    """The frequency-guided dual-branch detector, trained jointly on all chosen categories."""

    name: ClassVar[str] = "harmoniad"

    def __init__(
        self,
        model: ModelConfig | None = None,
        training: TrainConfig | None = None,
        scoring: ScoreConfig | None = None,
        *,
        name: str = "harmoniad",
    ) -> None:
        self.model_cfg = model or ModelConfig()
        self.train_cfg = training or TrainConfig()
        self.score_cfg = scoring or ScoreConfig()
        self.run_name = name
        self.checkpoint: Path | None = None
        self._scorer: Scorer | None = None

    def config(self) -> dict[str, Any]:
        return {
            "model": to_dict(self.model_cfg),
            "train": to_dict(self.train_cfg),
            "score": to_dict(self.score_cfg),
            "checkpoint": None if self.checkpoint is None else str(self.checkpoint),
        }

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
        return root / "checkpoints" / f"{self.run_name}-{digest}"

    def fit(self, train_samples: list[Sample], ctx: Context) -> None:
        if ctx.backbone is None:
            raise ValueError("HarmoniAD needs a backbone config in the evaluation context")
        normal = [s for s in train_samples if s.label == 0]
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
