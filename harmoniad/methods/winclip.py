"""WinCLIP-style zero-shot baseline (Jeong et al., CVPR 2023): CLIP prompts, no training.

Each patch token, projected into CLIP's joint image-text space, is compared with two
prompt-ensemble embeddings of the category, "normal" and "anomalous"; the softmax over
the two (temperature 100, CLIP's logit scale) gives each patch's anomaly probability.
The image score is the same softmax on the pooled image embedding (WinCLIP's zero-shot
classifier). It shows what the frozen CLIP space knows about defects before any training.
Unlike the paper, windows are the backbone's patches at one scale (no multi-scale window
pooling) and no few-shot reference images are used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch

from harmoniad.backbone import Backbone
from harmoniad.runtime.serialization import to_dict
from harmoniad.data import Sample, read_image
from harmoniad.runtime.device import autocast
from harmoniad.maps import resize_and_blur
from harmoniad.methods.base import Context, Method, single_category
from harmoniad.maps import Prediction
from harmoniad.runtime.progress import Progress

# State words of WinCLIP's compositional prompt ensemble ("{}" is the object name).
NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)
ABNORMAL_STATES: tuple[str, ...] = (
    "damaged {}",
    "broken {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)
# Text templates of WinCLIP (CLIP's ImageNet templates adapted to inspection).
TEMPLATES: tuple[str, ...] = (
    "a cropped photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)


def object_name(category: str) -> str:
    """Category id -> words for a prompt: ``"metal_nut" -> "metal nut"``."""
    return category.replace("_", " ").strip()


def prompts(category: str, states: tuple[str, ...], templates: tuple[str, ...] = TEMPLATES) -> list[str]:
    """Every state x template sentence for the category (the compositional ensemble)."""
    name = object_name(category)
    return [template.format(state.format(name)) for state in states for template in templates]


@dataclass(frozen=True)
class WinCLIPConfig:
    """Zero-shot settings; the prompt lists are the module constants, recorded by count."""

    temperature: float = 100.0  # CLIP's logit scale
    map_sigma: float = 4.0
    # "cls": the image embedding's abnormal probability (WinCLIP's zero-shot classifier);
    # "max": the map's maximum (no second pass through the image tower).
    image_score: Literal["cls", "max"] = "cls"
    batch_size: int = 16

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"WinCLIPConfig.temperature must be > 0, got {self.temperature}")
        if self.image_score not in ("cls", "max"):
            raise ValueError(f"WinCLIPConfig.image_score must be 'cls' or 'max', got {self.image_score!r}")
        if self.batch_size < 1:
            raise ValueError(f"WinCLIPConfig.batch_size must be >= 1, got {self.batch_size}")


class WinCLIP(Method):
    """Patch-to-prompt similarity in CLIP space as the anomaly map; no training."""

    name = "winclip"
    uses_backbone: ClassVar[bool] = True

    def __init__(self, config: WinCLIPConfig | None = None) -> None:
        self.cfg = config or WinCLIPConfig()
        self._backbone: Backbone | None = None
        self._backbone_for: tuple[Any, str] | None = None
        self._text: dict[str, torch.Tensor] = {}

    def config(self) -> dict[str, Any]:
        return {
            **to_dict(self.cfg),
            "normal_states": len(NORMAL_STATES),
            "abnormal_states": len(ABNORMAL_STATES),
            "templates": len(TEMPLATES),
        }

    def fit(self, train: list[Sample], ctx: Context) -> None:
        """Zero-shot: nothing is learned from the training images."""

    def predict(self, test: list[Sample], ctx: Context) -> Prediction:
        category = single_category(test, "WinCLIP")
        backbone = self._get_backbone(ctx)
        text = self.text_embeddings(category, ctx)  # 2 x D: normal, abnormal
        h, w = backbone.grid
        progress = Progress("winclip", len(test), ctx.progress)
        grids, cls_scores = [], []
        for start in range(0, len(test), self.cfg.batch_size):
            batch = test[start : start + self.cfg.batch_size]
            x = backbone.preprocess([read_image(s.image_path) for s in batch])
            tokens = backbone.patch_tokens_projected(x)
            grids.append(self.abnormal_probability(tokens, text).reshape(len(batch), h, w))
            if self.cfg.image_score == "cls":
                cls_scores.append(self.abnormal_probability(_image_embeddings(backbone, x)[:, None], text)[:, 0])
            progress.update(len(batch))
        grid = torch.cat(grids)
        scores = torch.cat(cls_scores) if cls_scores else grid.flatten(1).amax(dim=1)
        maps = resize_and_blur(grid, ctx.resolution, self.cfg.map_sigma)
        return Prediction(scores=scores.float().cpu().numpy(), maps=maps.cpu().numpy())

    def abnormal_probability(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """``B x P x D`` normalised tokens, ``2 x D`` [normal, abnormal] -> ``B x P`` P(abnormal)."""
        logits = self.cfg.temperature * tokens @ text.to(tokens.device, tokens.dtype).T
        return logits.softmax(dim=-1)[..., 1]

    def text_embeddings(self, category: str, ctx: Context) -> torch.Tensor:
        """``2 x D``: the normalised mean embedding of the normal, then the abnormal ensemble."""
        if category not in self._text:
            backbone = self._get_backbone(ctx)
            rows = []
            for states in (NORMAL_STATES, ABNORMAL_STATES):
                emb = backbone.encode_text(prompts(category, states))
                mean = emb.mean(dim=0)
                rows.append(mean / mean.norm().clamp_min(1e-12))
            self._text[category] = torch.stack(rows)
        return self._text[category]

    def _get_backbone(self, ctx: Context) -> Backbone:
        """Build the backbone once per (config, device); it is the expensive part."""
        if ctx.backbone is None:
            raise ValueError("WinCLIP needs a backbone: Context.backbone is None")
        key = (ctx.backbone, str(ctx.device))
        if self._backbone is None or self._backbone_for != key:
            self._backbone = Backbone(ctx.backbone, device=ctx.device)
            self._backbone_for = key
            self._text = {}
        return self._backbone


def _image_embeddings(backbone: Backbone, x: torch.Tensor) -> torch.Tensor:
    """``B x D`` L2-normalised CLIP image embeddings (the pooled class token, projected).

    ``Backbone`` exposes patch tokens only; the pooled embedding comes from open_clip's own
    ``encode_image`` on the same frozen model.
    """
    with torch.inference_mode(), autocast(backbone.device):
        emb = backbone.model.encode_image(x)
    return torch.nn.functional.normalize(emb.float(), dim=-1).clone()
