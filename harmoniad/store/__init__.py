"""The result store: every evaluation run, reproducible and quick to reload.

:mod:`.schema` (index schema, run records, errors), :mod:`.runs` (:class:`ResultStore`: run
life cycle and queries), :mod:`.images` (per-image parquet tables), :mod:`.mapfiles` (per-image
map files), :mod:`.export` (files to share), :mod:`.published` (numbers from papers).
"""

from harmoniad.store.runs import ResultStore
from harmoniad.store.schema import (
    CATEGORY_STATUSES,
    IMAGE_COLUMNS,
    METRIC_COLUMNS,
    RUN_STATUSES,
    SCHEMA_VERSION,
    RunDataMissing,
    RunInfo,
    RunNotFound,
    RunStateError,
    StoreError,
    detect_code_version,
)

__all__ = [
    "CATEGORY_STATUSES",
    "IMAGE_COLUMNS",
    "METRIC_COLUMNS",
    "RUN_STATUSES",
    "SCHEMA_VERSION",
    "ResultStore",
    "RunDataMissing",
    "RunInfo",
    "RunNotFound",
    "RunStateError",
    "StoreError",
    "detect_code_version",
]
