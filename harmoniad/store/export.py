"""Runs leaving the store: files a team can share (CSV tables and the run record as JSON).

``export_csv`` writes the per-category metrics (with 95% intervals, mask and skip counts and
one-line failure reasons; a metric that is not available is an empty cell, never 0), the
per-image scores and the run record; ``export_details_csv`` adds the per-defect-type results,
the thresholds with their operating points, and the skipped files; ``export_json`` writes
``runs show --json``'s view as a file.

Every exported file states the weights the numbers came from (:func:`weights_statement`): the
pretrained tag, the weight file's hash, or "random weights: not a result", so a number from a
random-weights demo never leaves looking like a real result. CSV tables carry it in a
``weights`` column on every row, JSON as ``weights_statement``; the HTML report
(:mod:`harmoniad.report`) states it too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from harmoniad.runtime.atomic import atomic_write_text
from harmoniad.store.details import _reason
from harmoniad.store.runs import ResultStore
from harmoniad.store.schema import METRIC_COLUMNS, RunInfo

CI_METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")
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


def _metrics_with_intervals(store: ResultStore, run_id: str) -> pd.DataFrame:
    metrics = store.load_metrics(run_id)
    ok = metrics[metrics["status"] == "ok"]
    mean = {c: None for c in metrics.columns}
    mean.update(kind="measured", run_id=run_id, category="mean", status="mean")
    mean.update({m: ok[m].mean() for m in METRIC_COLUMNS})
    mean.update(n_images=int(ok["n_images"].sum()), seconds=float(metrics["seconds"].sum()))
    table = pd.concat([metrics, pd.DataFrame([mean], columns=metrics.columns)], ignore_index=True)
    table["reason"] = [_reason(e) for e in table["error"]]
    intervals = store.load_intervals(run_id)
    for metric in CI_METRICS:
        ci = intervals[intervals["metric"] == metric].set_index("category")
        table[f"{metric}_ci_low"] = [ci["low"].get(c) for c in table["category"]]
        table[f"{metric}_ci_high"] = [ci["high"].get(c) for c in table["category"]]
    details = store.load_details(run_id)
    skipped = store.load_skipped(run_id)
    table["n_masked"] = pd.array([details.get(c, {}).get("n_masked") for c in table["category"]], dtype="Int64")
    table["n_skipped"] = [int(((skipped["split"] == "test") & (skipped["category"] == c)).sum())
                          for c in table["category"]]
    table["dataset"] = store.get_run(run_id).dataset
    return table


def export_csv(store: ResultStore, run_id: str, directory: str | os.PathLike[str]) -> list[Path]:
    """Write ``<run_id>_metrics.csv`` (categories + a mean row, with intervals),
    ``<run_id>_images.csv`` and ``<run_id>_run.json`` into ``directory``; return their paths."""
    out = Path(directory)
    info = store.get_run(run_id)
    paths = [out / f"{run_id}_metrics.csv", out / f"{run_id}_images.csv", out / f"{run_id}_run.json"]
    statement = {WEIGHTS_COLUMN: weights_statement(info)}
    atomic_write_text(paths[0], _metrics_with_intervals(store, run_id).assign(**statement).to_csv(index=False))
    atomic_write_text(paths[1], store.load_images(run_id).assign(**statement).to_csv(index=False))
    atomic_write_text(paths[2], json.dumps(run_record(info), indent=2, default=str) + "\n")
    return paths


def export_details_csv(store: ResultStore, run_id: str, directory: str | os.PathLike[str]) -> list[Path]:
    """Write ``<run_id>_defects.csv``, ``<run_id>_thresholds.csv`` (labelled rules with
    precision, recall, FPR and confusion counts) and ``<run_id>_skipped.csv``; return them."""
    out = Path(directory)
    info = store.get_run(run_id)
    dataset = info.dataset
    tables = {
        "defects": store.load_defects(run_id),
        "thresholds": store.load_thresholds(run_id),
        "skipped": store.load_skipped(run_id),
    }
    paths = []
    for name, table in tables.items():
        path = out / f"{run_id}_{name}.csv"
        atomic_write_text(path, table.assign(run_id=run_id, dataset=dataset,
                                             **{WEIGHTS_COLUMN: weights_statement(info)}).to_csv(index=False))
        paths.append(path)
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
