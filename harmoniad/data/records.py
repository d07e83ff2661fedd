"""Typed records the dataset readers return, and the one error they raise."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "test")
GOOD = "good"


class DatasetError(ValueError):
    """A dataset tree, image or mask is not what the reader expected.

    The message always names the offending path (or value) and what was expected, so a
    user with a malformed tree can fix it without reading the reader's code.
    """


@dataclass(frozen=True)
class Sample:
    """One image of a dataset, with its ground truth.

    ``mask_path`` is None for normal images, and for anomalous images without a mask
    (image-level-only datasets, or ``allow_missing_masks``): those count for image metrics only. ``defect`` is
    ``"good"`` exactly when ``label`` is 0, so a sample can never disagree with itself.
    """

    image_path: Path
    mask_path: Path | None
    category: str
    defect: str
    label: int
    split: str

    def __post_init__(self) -> None:
        if self.label not in (0, 1):
            raise DatasetError(f"{self.image_path}: label must be 0 or 1, got {self.label!r}")
        if self.split not in SPLITS:
            raise DatasetError(f"{self.image_path}: split must be one of {SPLITS}, got {self.split!r}")
        if (self.label == 0) != (self.defect == GOOD):
            raise DatasetError(
                f"{self.image_path}: defect {self.defect!r} contradicts label {self.label} "
                f"(defect is {GOOD!r} exactly for label 0)"
            )
        if self.label == 0 and self.mask_path is not None:
            raise DatasetError(f"{self.image_path}: a normal image carries no mask, got {self.mask_path}")
