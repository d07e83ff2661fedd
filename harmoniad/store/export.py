"""Runs leaving the store: files a team can share (CSV tables and the run record as JSON).

Every exported file states the weights the numbers came from (:func:`weights_statement`):
the pretrained tag, the weight file's hash, or "random weights: not a result", so a number
from a random-weights demo can never leave looking like a real result. The HTML report
(:mod:`harmoniad.report`) states it too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from harmoniad.runtime.atomic import atomic_write_text
from harmoniad.store.runs import ResultStore
from harmoniad.store.schema import METRIC_COLUMNS, RunInfo

RANDOM_WEIGHTS_STATEMENT = "random weights: not a result"
#: Column added to every exported CSV table, holding :func:`weights_statement` on every row.
WEIGHTS_COLUMN = "weights"


def weights_statement(info: RunInfo) -> str:
    """What the run's numbers rest on, in one line: a pretrained tag, a weight-file hash, random
    weights ("not a result"), or no learned backbone at all (a pixel-space method)."""
    backbone: dict[str, Any] = info.backbone or {}
    if info.random_weights or backbone.get("random") or backbone.get("weights") == "random":
        return RANDOM_WEIGHTS_STATEMENT
    if not backbone:
        return "no backbone weights (pixel-space method)"
    model = backbone.get("model", "?")
    if backbone.get("weights_sha256"):
        tag = f", tag {backbone['tag']}" if backbone.get("tag") else ""
        return f"{model} weights file sha256 {backbone['weights_sha256']}{tag}"
    return f"{model} pretrained tag {backbone.get('weights', '?')}"


def run_record(info: RunInfo) -> dict[str, Any]:
    """The run as a JSON-ready dict, with its weights statement."""
    return {"weights_statement": weights_statement(info), **info.__dict__}


def export_csv(store: ResultStore, run_id: str, directory: str | os.PathLike[str]) -> list[Path]:
    """Write ``<run_id>_metrics.csv`` (categories + a mean row), ``<run_id>_images.csv`` and
    ``<run_id>_run.json`` into ``directory``; return their paths. Both tables carry a
    ``weights`` column and the JSON a ``weights_statement``."""
    out = Path(directory)
    info = store.get_run(run_id)
    statement = weights_statement(info)
    metrics = store.load_metrics(run_id)
    ok = metrics[metrics["status"] == "ok"]
    mean = {c: None for c in metrics.columns}
    mean.update(kind="measured", run_id=run_id, category="mean", status="mean")
    mean.update({m: ok[m].mean() for m in METRIC_COLUMNS})
    mean.update(n_images=int(ok["n_images"].sum()), seconds=float(metrics["seconds"].sum()))
    with_mean = pd.concat([metrics, pd.DataFrame([mean], columns=metrics.columns)], ignore_index=True)
    paths = [out / f"{run_id}_metrics.csv", out / f"{run_id}_images.csv", out / f"{run_id}_run.json"]
    atomic_write_text(paths[0], with_mean.assign(**{WEIGHTS_COLUMN: statement}).to_csv(index=False))
    atomic_write_text(paths[1], store.load_images(run_id).assign(**{WEIGHTS_COLUMN: statement}).to_csv(index=False))
    atomic_write_text(paths[2], json.dumps(run_record(info), indent=2, default=str) + "\n")
    return paths


def export_json(store: ResultStore, run_id: str, directory: str | os.PathLike[str]) -> Path:
    """Write ``<run_id>.json``: ``runs show --json``'s view of the run (results, intervals,
    defects, thresholds) with the weights statement and backbone provenance."""
    info = store.get_run(run_id)
    record = {"weights_statement": weights_statement(info), "backbone": info.backbone,
              "random_weights": info.random_weights, **store.run_json(run_id)}
    path = Path(directory) / f"{run_id}.json"
    atomic_write_text(path, json.dumps(record, indent=2, default=str) + "\n")
    return path
