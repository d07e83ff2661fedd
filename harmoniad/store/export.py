"""Runs leaving the store: files a team can share (CSV tables and the run record as JSON)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd

from harmoniad.runtime.atomic import atomic_write_text
from harmoniad.store.runs import ResultStore
from harmoniad.store.schema import METRIC_COLUMNS


def export_csv(store: ResultStore, run_id: str, directory: str | os.PathLike[str]) -> list[Path]:
    """Write ``<run_id>_metrics.csv`` (categories + a mean row), ``<run_id>_images.csv`` and
    ``<run_id>_run.json`` into ``directory``; return their paths."""
    out = Path(directory)
    info = store.get_run(run_id)
    metrics = store.load_metrics(run_id)
    ok = metrics[metrics["status"] == "ok"]
    mean = {c: None for c in metrics.columns}
    mean.update(kind="measured", run_id=run_id, category="mean", status="mean")
    mean.update({m: ok[m].mean() for m in METRIC_COLUMNS})
    mean.update(n_images=int(ok["n_images"].sum()), seconds=float(metrics["seconds"].sum()))
    with_mean = pd.concat([metrics, pd.DataFrame([mean], columns=metrics.columns)], ignore_index=True)
    paths = [out / f"{run_id}_metrics.csv", out / f"{run_id}_images.csv", out / f"{run_id}_run.json"]
    atomic_write_text(paths[0], with_mean.to_csv(index=False))
    atomic_write_text(paths[1], store.load_images(run_id).to_csv(index=False))
    atomic_write_text(paths[2], json.dumps(info.__dict__, indent=2, default=str) + "\n")
    return paths
