"""The run index's shape: SQLite schema, run records, statuses, errors and row codecs.

Metric units: every metric is a fraction in [0, 1]; an undefined metric (NaN) is stored as
NULL and comes back as NaN.

Version 3 adds ``category_details`` (per-defect results, intervals, thresholds of a category,
JSON) and ``run_details`` (run-level results such as the intervals of the mean, JSON); an
older index gets the new tables in place, its runs simply have no details.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Any

import numpy as np

from harmoniad import __version__
from harmoniad.runtime.paths import REPO_ROOT

SCHEMA_VERSION = 3
#: Run statuses. A run killed mid-way is ``failed`` with an error starting ``interrupted:``.
RUN_STATUSES = ("running", "complete", "failed")
CATEGORY_STATUSES = ("ok", "failed")
#: Per-category metric columns (fractions in [0, 1]), docs/design.md#metrics.
METRIC_COLUMNS = (
    "image_auroc",
    "image_ap",
    "image_f1_max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1_max",
    "pixel_aupro",
)
#: Leading columns of :meth:`ResultStore.load_images`; extra columns given by the caller follow.
IMAGE_COLUMNS = ("index", "category", "image_path", "mask_path", "defect", "label", "score")
INTERRUPTED = "interrupted: "

class StoreError(Exception):
    """Base class of results-store errors."""


class RunNotFound(StoreError, LookupError):
    """No run with that id in the index."""


class RunStateError(StoreError):
    """The run is not in a state that allows this (e.g. writing to a finished run)."""


class RunDataMissing(StoreError, FileNotFoundError):
    """A run's bulk file (per-image table or maps) is missing or unreadable."""


@dataclass(frozen=True)
class RunInfo:
    """One row of the run index, decoded."""

    id: str
    created: str
    updated: str
    finished: str | None
    method: str
    method_config: dict[str, Any]
    dataset: str
    root: str
    categories: tuple[str, ...]
    backbone: dict[str, Any] | None
    random_weights: bool
    resolution: int
    code_version: str
    request: dict[str, Any] | None
    status: str
    error: str | None
    pid: int | None
    hostname: str | None

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def interrupted(self) -> bool:
        """True if the run was found abandoned by a process that died."""
        return self.status == "failed" and (self.error or "").startswith(INTERRUPTED)


RUN_FIELDS = tuple(f.name for f in fields(RunInfo))

SCHEMA = f"""
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    finished TEXT,
    method TEXT NOT NULL,
    method_config TEXT NOT NULL,
    dataset TEXT NOT NULL,
    root TEXT NOT NULL,
    categories TEXT NOT NULL,
    backbone TEXT,
    random_weights INTEGER NOT NULL,
    resolution INTEGER NOT NULL,
    code_version TEXT NOT NULL,
    request TEXT,
    status TEXT NOT NULL CHECK (status IN {RUN_STATUSES}),
    error TEXT,
    pid INTEGER,
    pid_start TEXT,
    hostname TEXT
);
CREATE INDEX IF NOT EXISTS runs_method ON runs (method);
CREATE INDEX IF NOT EXISTS runs_dataset ON runs (dataset);
CREATE INDEX IF NOT EXISTS runs_created ON runs (created);
CREATE TABLE IF NOT EXISTS category_metrics (
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    category TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN {CATEGORY_STATUSES}),
    error TEXT,
    {", ".join(f"{m} REAL" for m in METRIC_COLUMNS)},
    n_images INTEGER,
    seconds REAL,
    index_start INTEGER,
    images_file TEXT,
    maps_file TEXT,
    recorded TEXT NOT NULL,
    PRIMARY KEY (run_id, category)
);
CREATE TABLE IF NOT EXISTS skipped_files (
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    split TEXT NOT NULL,
    category TEXT NOT NULL,
    path TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (run_id, split, path)
);
CREATE TABLE IF NOT EXISTS category_details (
    run_id TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    category TEXT NOT NULL,
    details TEXT NOT NULL,
    PRIMARY KEY (run_id, category)
);
CREATE TABLE IF NOT EXISTS run_details (
    run_id TEXT PRIMARY KEY REFERENCES runs (id) ON DELETE CASCADE,
    details TEXT NOT NULL
);
"""


def detect_code_version() -> str:
    """``git:<commit>[-dirty]`` of the source checkout if there is one, else the package version."""
    if (REPO_ROOT / ".git").exists():
        try:
            out = subprocess.run(
                ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty", "--abbrev=40"],
                capture_output=True,
                text=True,
                timeout=10,
                check=True,
            ).stdout.strip()
            if out:
                return f"git:{out}"
        except (OSError, subprocess.SubprocessError):
            pass
    return f"harmoniad {__version__}"


@contextlib.contextmanager
def immediate_transaction(con: sqlite3.Connection) -> Iterator[None]:
    """One ``BEGIN IMMEDIATE`` transaction (the write lock taken at once): committed, or rolled back on any error."""
    con.execute("BEGIN IMMEDIATE")
    try:
        yield
        con.execute("COMMIT")
    except BaseException:
        if con.in_transaction:
            con.execute("ROLLBACK")
        raise


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def to_json(value: Any, what: str) -> str:
    def default(obj: Any) -> Any:
        if isinstance(obj, os.PathLike):
            return os.fspath(obj)
        if isinstance(obj, np.generic):
            return obj.item()
        if isinstance(obj, np.ndarray):
            return obj.tolist()
        if isinstance(obj, (set, frozenset)):
            return sorted(obj)
        raise TypeError(f"{what}: {type(obj).__name__} value {obj!r} is not JSON-serialisable")

    try:
        return json.dumps(value, default=default, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be JSON-serialisable: {exc}") from exc


def is_random(provenance: Mapping[str, Any] | None) -> bool:
    """Whether a backbone provenance dict says the weights are random."""
    if not provenance:
        return False
    for key in ("random_weights", "random"):
        if provenance.get(key) is True:
            return True
    return any(str(provenance.get(key, "")).lower() == "random" for key in ("weights", "pretrained", "source", "kind"))


def decode_run(row: sqlite3.Row) -> RunInfo:
    return RunInfo(
        id=row["id"],
        created=row["created"],
        updated=row["updated"],
        finished=row["finished"],
        method=row["method"],
        method_config=json.loads(row["method_config"]),
        dataset=row["dataset"],
        root=row["root"],
        categories=tuple(json.loads(row["categories"])),
        backbone=None if row["backbone"] is None else json.loads(row["backbone"]),
        random_weights=bool(row["random_weights"]),
        resolution=int(row["resolution"]),
        code_version=row["code_version"],
        request=None if row["request"] is None else json.loads(row["request"]),
        status=row["status"],
        error=row["error"],
        pid=row["pid"],
        hostname=row["hostname"],
    )


def backbone_label(provenance: dict[str, Any] | None) -> str | None:
    """A short human label for a provenance dict (``model (weights)``)."""
    if provenance is None:
        return None
    model = provenance.get("model") or provenance.get("name")
    weights = provenance.get("weights") or provenance.get("pretrained")
    if weights == "file" and provenance.get("weights_sha256"):
        weights = f"file sha256:{str(provenance['weights_sha256'])[:12]}"
    if model and weights:
        return f"{model} ({weights})"
    return str(model or weights or json.dumps(provenance, sort_keys=True))


