"""Per-image and per-category tables of a run: metrics frames and parquet files of scores."""

from __future__ import annotations

import math
import os
import sqlite3
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from harmoniad.runtime.atomic import atomic_write_bytes
from harmoniad.store.schema import METRIC_COLUMNS, RunInfo, backbone_label


def metrics_frame(
    rows: Sequence[sqlite3.Row], infos: Mapping[str, RunInfo], *, with_run_columns: bool = False
) -> pd.DataFrame:
    """Category rows -> DataFrame in each run's category order, floats for metrics."""
    run_columns = ["method", "dataset", "backbone", "random_weights", "resolution", "created"]
    if not with_run_columns:
        run_columns = []
    base = ["kind", "run_id", *run_columns, "category", "status", "error", *METRIC_COLUMNS, "n_images", "seconds"]
    records = []
    for row in rows:
        run_id = row["run_id"] if "run_id" in row.keys() else next(iter(infos))
        info = infos[run_id]
        record = {"kind": "measured", "run_id": run_id, **{k: row[k] for k in row.keys() if k != "run_id"}}
        if with_run_columns:
            record.update(
                method=info.method,
                dataset=info.dataset,
                backbone=backbone_label(info.backbone),
                random_weights=info.random_weights,
                resolution=info.resolution,
                created=info.created,
            )
        records.append(record)
    df = pd.DataFrame.from_records(records, columns=base)
    order = {(rid, c): i for rid, info in infos.items() for i, c in enumerate(info.categories)}
    if len(df):
        df = (
            df.assign(_o=[order.get((r, c), 1 << 30) for r, c in zip(df["run_id"], df["category"])])
            .sort_values(["_o"] if not with_run_columns else ["created", "run_id", "_o"], ascending=True, kind="stable")
            .drop(columns="_o")
            .reset_index(drop=True)
        )
    return df.astype({**{m: "float64" for m in METRIC_COLUMNS}, "seconds": "float64", "n_images": "Int64"})


def flatten_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        if key in ("image", "pixel") and isinstance(value, Mapping):
            for sub, v in value.items():
                flat[f"{key}_{sub}"] = v
        else:
            flat[key] = value
    unknown = sorted(set(flat) - set(METRIC_COLUMNS))
    if unknown:
        raise ValueError(f"unknown metric name(s) {unknown}; expected some of {list(METRIC_COLUMNS)}")
    out = {}
    for key, value in flat.items():
        if value is None:
            continue
        try:
            number = float(value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"metric {key} must be a number, got {value!r}") from exc
        if not math.isnan(number) and not 0.0 <= number <= 1.0:
            raise ValueError(f"metric {key} must be a fraction in [0, 1] (not percent), got {number}")
        out[key] = None if math.isnan(number) else number
    return out


def images_table(images: pd.DataFrame, category: str) -> pa.Table:
    """Validate and normalise a category's per-image DataFrame into the stored schema."""
    if not isinstance(images, pd.DataFrame):
        raise TypeError(f"images must be a pandas DataFrame, got {type(images).__name__}")
    missing = [c for c in ("image_path", "label", "score") if c not in images.columns]
    if missing:
        raise ValueError(f"images table lacks column(s) {missing}; it has {list(images.columns)}")
    if "index" in images.columns:
        raise ValueError("images table must not have an 'index' column: the store assigns it")
    if "category" in images.columns:
        others = sorted({str(c) for c in images["category"]} - {category})
        if others:
            raise ValueError(f"images table for category {category!r} has rows of other categories {others}")
    n = len(images)

    def strings(column: str, nullable: bool) -> pa.Array:
        if column not in images.columns:
            return pa.nulls(n, pa.string())
        values = [None if _is_null(v) else _text(v) for v in images[column]]
        if not nullable and any(v is None for v in values):
            raise ValueError(f"images column {column!r} has missing values")
        return pa.array(values, pa.string())

    labels = images["label"].to_numpy()
    if not np.isin(labels, (0, 1)).all():
        raise ValueError(f"images column 'label' must be 0/1, got values {sorted(set(labels.tolist()))[:10]}")
    scores = images["score"].to_numpy(dtype=np.float64)
    columns = {
        "category": pa.array([category] * n, pa.string()),
        "image_path": strings("image_path", nullable=False),
        "mask_path": strings("mask_path", nullable=True),
        "defect": strings("defect", nullable=True),
        "label": pa.array(labels.astype(np.int8)),
        "score": pa.array(scores),
    }
    extras = [c for c in images.columns if c not in columns]
    table = pa.table(columns)
    if extras:
        extra_table = pa.Table.from_pandas(images[extras], preserve_index=False)
        for name in extras:
            table = table.append_column(str(name), extra_table.column(str(name)))
    return table


def empty_images_frame() -> pd.DataFrame:
    schema = pa.schema(
        [
            ("index", pa.int64()),
            ("category", pa.string()),
            ("image_path", pa.string()),
            ("mask_path", pa.string()),
            ("defect", pa.string()),
            ("label", pa.int8()),
            ("score", pa.float64()),
        ]
    )
    return schema.empty_table().to_pandas()


def _text(value: Any) -> str:
    return os.fspath(value) if isinstance(value, os.PathLike) else str(value)


def _is_null(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA


def write_parquet(table: pa.Table, path: Path) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


