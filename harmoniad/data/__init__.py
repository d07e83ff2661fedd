"""Benchmark and synthetic datasets as validated lists of samples, and image/mask reading.

Public API: :class:`Sample`, :class:`DatasetError`, :func:`load_dataset`,
:func:`list_categories`, :func:`read_image`, :func:`read_mask`, :func:`make_synthetic`,
:func:`ensure_synthetic`, :data:`SYNTHETIC_CATEGORIES`, :data:`DATASETS`.
"""

from harmoniad.data.io import MAX_PIXELS, image_size, read_image, read_mask
from harmoniad.data.readers import DATASETS, DatasetSpec, ReadOptions, list_categories, load_dataset
from harmoniad.data.records import DatasetError, Sample
from harmoniad.data.synthetic import (
    DEFECT_KINDS,
    SYNTHETIC_CATEGORIES,
    SYNTHETIC_CATEGORY_KINDS,
    SYNTHETIC_DEFECTS,
    ensure_synthetic,
    make_synthetic,
    render_sample,
    synthetic_is_complete,
)

__all__ = [
    "DATASETS",
    "DEFECT_KINDS",
    "MAX_PIXELS",
    "SYNTHETIC_CATEGORIES",
    "SYNTHETIC_CATEGORY_KINDS",
    "SYNTHETIC_DEFECTS",
    "DatasetError",
    "DatasetSpec",
    "ReadOptions",
    "Sample",
    "ensure_synthetic",
    "image_size",
    "list_categories",
    "load_dataset",
    "make_synthetic",
    "read_image",
    "read_mask",
    "render_sample",
    "synthetic_is_complete",
]
