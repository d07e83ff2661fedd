"""Published figures from papers and benchmark repositories, kept apart from measured runs.

The table ships as package data (``harmoniad/resources/published_results.csv``) with one
row per method x setting x dataset and the source of every figure. The CSV holds
percentages as published; :func:`published_results` converts them to fractions in [0, 1],
the unit of every measured table (``harmoniad.store``), and renames the columns to the
store's :data:`~harmoniad.store.METRIC_COLUMNS` so both line up. Display code converts
either to percent with :func:`as_percent`.

Every published frame has ``kind == "published"`` and every measured one ``kind ==
"measured"``; :func:`side_by_side` refuses to stack frames whose labels are wrong, so a
published figure is never shown as if this project had measured it.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from importlib import resources

import numpy as np
import pandas as pd

from harmoniad.store.schema import METRIC_COLUMNS

RESOURCE = "resources/published_results.csv"
#: CSV column -> store metric column.
CSV_METRICS = {
    "i_auroc": "image_auroc",
    "i_ap": "image_ap",
    "i_f1max": "image_f1_max",
    "p_auroc": "pixel_auroc",
    "p_ap": "pixel_ap",
    "p_f1max": "pixel_f1_max",
    "aupro": "pixel_aupro",
}
_CSV_COLUMNS = ["method", "setting", "dataset", "backbone", "resolution", *CSV_METRICS, "source"]
#: Columns of :func:`published_results`, in order.
PUBLISHED_COLUMNS = ["kind", "method", "setting", "dataset", "backbone", "resolution", *METRIC_COLUMNS, "source"]


class PublishedDataError(ValueError):
    """The shipped published-results table does not have the expected shape."""


def published_results(
    *,
    dataset: str | Iterable[str] | None = None,
    setting: str | Iterable[str] | None = None,
) -> pd.DataFrame:
    """The published figures as fractions in [0, 1], labelled ``kind == "published"``.

    ``source`` says where each row comes from; empty cells (figures a source did not
    report) are NaN. Filter with ``dataset`` (``mvtec``, ``visa``, ``btad``) and
    ``setting`` (``unified``, ``zero-shot``, ``one-class``).
    """
    text = resources.files("harmoniad").joinpath(RESOURCE).read_text(encoding="utf-8")
    table = parse_published(text, where=f"harmoniad/{RESOURCE}")
    for column, value in (("dataset", dataset), ("setting", setting)):
        if value is not None:
            wanted = [value] if isinstance(value, str) else list(value)
            table = table[table[column].isin(wanted)]
    return table.reset_index(drop=True)


def parse_published(text: str, *, where: str = "published results") -> pd.DataFrame:
    """Parse and validate a published-results CSV (percent) into the fraction table."""
    text_columns = ("method", "setting", "dataset", "backbone", "source")
    raw = pd.read_csv(io.StringIO(text), dtype={c: "string" for c in text_columns})
    if list(raw.columns) != _CSV_COLUMNS:
        raise PublishedDataError(f"{where}: columns {list(raw.columns)}, expected {_CSV_COLUMNS}")
    for column in ("method", "setting", "dataset", "source"):
        empty = raw.index[raw[column].isna()].tolist()
        if empty:
            raise PublishedDataError(f"{where}: column {column!r} is empty on data row(s) {[i + 1 for i in empty]}")
    out = pd.DataFrame({"kind": "published"}, index=raw.index)
    for column in ("method", "setting", "dataset", "backbone"):
        out[column] = raw[column].astype(object).where(raw[column].notna(), None)
    out["resolution"] = pd.to_numeric(raw["resolution"], errors="raise").astype("Int64")
    for csv_name, name in CSV_METRICS.items():
        values = pd.to_numeric(raw[csv_name], errors="coerce")
        bad = raw.index[(raw[csv_name].notna() & values.isna()) | (values < 0) | (values > 100)].tolist()
        if bad:
            raise PublishedDataError(
                f"{where}: column {csv_name!r} must be a percentage in [0, 100]; bad data row(s) {[i + 1 for i in bad]}"
            )
        out[name] = values.astype("float64") / 100.0
    out["source"] = raw["source"].astype(object)
    return out[PUBLISHED_COLUMNS]


def as_percent(table: pd.DataFrame) -> pd.DataFrame:
    """A copy with the metric columns in percent (what the dashboard shows)."""
    out = table.copy()
    for column in METRIC_COLUMNS:
        if column in out.columns:
            out[column] = np.round(out[column].astype("float64") * 100.0, 6)
    return out


def side_by_side(measured: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """Stack measured and published rows for one leaderboard, each keeping its ``kind``.

    Refuses frames without a ``kind`` column or with the wrong label, so the two are
    never mixed up.
    """
    for frame, expected, name in ((measured, "measured", "measured"), (published, "published", "published")):
        if "kind" not in frame.columns:
            raise ValueError(f"the {name} table has no 'kind' column")
        labels = set(frame["kind"].fillna("<missing>").astype(str))
        wrong = sorted(labels - {expected})
        if wrong:
            raise ValueError(f"the {name} table has rows labelled {wrong}; expected only kind == {expected!r}")
    frames = [f for f in (measured, published) if len(f)]
    if not frames:
        return pd.DataFrame(columns=list(dict.fromkeys([*measured.columns, *published.columns])))
    return pd.concat(frames, ignore_index=True, sort=False)
