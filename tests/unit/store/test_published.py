"""Published figures: shipped table, unit conversion, never mixed with measured runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from harmoniad.store.published import (
    PUBLISHED_COLUMNS,
    PublishedDataError,
    as_percent,
    parse_published,
    published_results,
    side_by_side,
)
from harmoniad.store import METRIC_COLUMNS
from tests.paths import REPO

CSV = REPO / "harmoniad" / "resources" / "published_results.csv"


def test_shipped_table_is_labelled_and_in_fractions() -> None:
    table = published_results()
    raw = pd.read_csv(CSV)
    assert list(table.columns) == PUBLISHED_COLUMNS
    assert len(table) == len(raw) > 0
    assert set(table["kind"]) == {"published"}
    assert table["source"].notna().all() and list(table["source"]) == list(raw["source"])
    values = table[list(METRIC_COLUMNS)].to_numpy(dtype=float)
    assert np.nanmax(values) <= 1.0 and np.nanmin(values) >= 0.0
    # a known row: PatchCore one-class on MVTec, 99.2 image AUROC, AUPRO 94.4 (percent in the CSV)
    row = table[(table["method"] == "PatchCore") & (table["setting"] == "one-class")].iloc[0]
    assert row["image_auroc"] == pytest.approx(0.992) and row["pixel_aupro"] == pytest.approx(0.944)
    assert np.isnan(row["image_ap"])  # not published: NaN, not zero
    assert row["resolution"] == 224


def test_filters() -> None:
    mvtec = published_results(dataset="mvtec")
    assert len(mvtec) and set(mvtec["dataset"]) == {"mvtec"}
    zs = published_results(dataset=["mvtec", "visa"], setting="zero-shot")
    assert len(zs) and set(zs["setting"]) == {"zero-shot"} and set(zs["dataset"]) <= {"mvtec", "visa"}
    assert published_results(dataset="nope").empty


def test_as_percent_round_trips_the_csv() -> None:
    shown = as_percent(published_results())
    raw = pd.read_csv(CSV)
    np.testing.assert_allclose(shown["image_auroc"], raw["i_auroc"], equal_nan=True)
    np.testing.assert_allclose(shown["pixel_aupro"], raw["aupro"], equal_nan=True)


def test_bad_tables_are_refused() -> None:
    header = "method,setting,dataset,backbone,resolution,i_auroc,i_ap,i_f1max,p_auroc,p_ap,p_f1max,aupro,source\n"
    with pytest.raises(PublishedDataError, match="percentage in \\[0, 100\\]; bad data row\\(s\\) \\[1\\]"):
        parse_published(header + "X,unified,mvtec,,256,101,,,,,,,paper\n")
    with pytest.raises(PublishedDataError, match="'source' is empty"):
        parse_published(header + "X,unified,mvtec,,256,99,,,,,,,\n")
    with pytest.raises(PublishedDataError, match="columns"):
        parse_published("method,score\nX,1\n")


def test_side_by_side_keeps_kinds_apart() -> None:
    published = published_results(dataset="mvtec")
    measured = pd.DataFrame({"kind": ["measured"], "method": ["harmoniad"], "dataset": ["mvtec"], "image_auroc": [0.9]})
    both = side_by_side(measured, published)
    assert list(both["kind"].value_counts().sort_index()) == [1, len(published)]
    with pytest.raises(ValueError, match="measured table has rows labelled \\['published'\\]"):
        side_by_side(published, published)
    with pytest.raises(ValueError, match="no 'kind' column"):
        side_by_side(measured.drop(columns="kind"), published)
