"""The contract every method (HarmoniAD, its ablations, baselines) fulfils for evaluation.

One evaluation path serves all methods: ``fit`` once on the normal training samples of
every chosen category (a method that wants one model per category groups them by
``Sample.category`` itself), then ``predict`` the test samples of one category at a time.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from harmoniad.backbone import BackboneConfig
from harmoniad.data import Sample
from harmoniad.maps import Prediction
from harmoniad.runtime.progress import ProgressFn, silent


def single_category(test: list[Sample], who: str) -> str:
    """The one category of ``test``; ``ValueError`` (naming ``who``) if it is empty or mixes categories.

    ``predict`` is called one category at a time, so every method checks this the same way.
    """
    if not test:
        raise ValueError(f"{who}.predict: no test samples given")
    categories = {s.category for s in test}
    if len(categories) != 1:
        raise ValueError(f"{who}.predict expects samples of one category, got {sorted(categories)}")
    return categories.pop()


@dataclass
class Context:
    """What a method may use while fitting and predicting.

    ``backbone`` is None for methods that use no backbone; methods obtain features through
    :class:`harmoniad.backbone.cache.FeatureCache` so that all methods share the same cached
    features. ``cache_root`` None means :func:`harmoniad.runtime.paths.cache_dir`.
    """

    resolution: int = 256
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backbone: BackboneConfig | None = None
    cache_root: Path | None = None
    seed: int = 0
    progress: ProgressFn = silent


class Method(ABC):
    """A detector that can be fitted on normal images and score test images."""

    #: The registry name; a class may serve several (HarmoniAD and its ablations set it per instance).
    name: str
    #: True if the method reads CLIP backbone features (for provenance and the dashboard).
    uses_backbone: ClassVar[bool] = True

    @abstractmethod
    def fit(self, train: list[Sample], ctx: Context) -> None:
        """Learn from normal samples of all chosen categories (may be a no-op)."""

    @abstractmethod
    def predict(self, test: list[Sample], ctx: Context) -> Prediction:
        """Score test samples (all of one category) into scores and maps."""

    def config(self) -> dict[str, Any]:
        """JSON-safe settings recorded with every run."""
        return {}

    def fitted(self) -> dict[str, Any]:
        """JSON-safe facts learned by :meth:`fit` that a user should see with the run (empty: none)."""
        return {}
