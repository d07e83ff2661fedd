"""Load: a store with 50 runs and a 5,000-image run stays correct, and memory stays bounded
because maps are read per image. Wall times are in benchmarks/bench_robustness_load.py."""

from __future__ import annotations

import builtins
import tracemalloc

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

from harmoniad.store import ResultStore

R = 16  # small maps keep writing 5,000 images fast; the per-image bound does not depend on R
N_IMAGES = 5_000
N_CATEGORIES = 10
N_SMALL_RUNS = 49


def _category(rng: np.random.Generator, category: str, n: int) -> dict:
    labels = (np.arange(n) % 3 == 0).astype(np.int8)
    masks = np.zeros((n, R, R), dtype=bool)
    masks[labels == 1, 4:9, 5:11] = True
    return {
        "metrics": {"image_auroc": float(rng.random()), "pixel_auroc": float(rng.random())},
        "images": pd.DataFrame(
            {
                "image_path": [f"/datasets/{category}/test/{i:05d}.png" for i in range(n)],
                "label": labels,
                "score": rng.random(n),
            }
        ),
        "maps": {name: rng.random((n, R, R), dtype=np.float32) for name in ("anomaly", "high", "low")},
        "masks": masks,
    }


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[ResultStore, str]:
    """49 small runs and one run of 5,000 images in 10 categories, three maps and a mask each."""
    store = ResultStore(tmp_path_factory.mktemp("load") / "runs")
    rng = np.random.default_rng(0)
    for k in range(N_SMALL_RUNS):
        run = store.create_run(
            method=f"m{k % 5}", dataset="synthetic", root="/d", categories=["a"], resolution=R, code_version="test"
        )
        store.add_category(run, "a", **_category(rng, "a", 4))
        store.finish_run(run)
    cats = [f"cat{i}" for i in range(N_CATEGORIES)]
    big = store.create_run(
        method="harmoniad", dataset="mvtec", root="/d", categories=cats, resolution=R, code_version="test"
    )
    for cat in cats:
        store.add_category(big, cat, **_category(rng, cat, N_IMAGES // N_CATEGORIES))
    store.finish_run(big)
    return store, big


def test_fifty_runs_list_and_filter_correctly(big_store: tuple[ResultStore, str]) -> None:
    store, big = big_store
    runs = store.list_runs()
    assert len(runs) == N_SMALL_RUNS + 1 and set(runs["status"]) == {"complete"}
    assert runs["id"].is_unique and runs.loc[runs["id"] == big, "n_ok"].item() == N_CATEGORIES
    assert len(store.list_runs(method="m1")) == 10
    assert len(store.leaderboard()) == N_SMALL_RUNS + 1


def test_loading_the_big_runs_tables_reads_no_maps(
    big_store: tuple[ResultStore, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, big = big_store
    opened: list[str] = []
    real_open = builtins.open

    def spy(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy)
    tracemalloc.start()
    arrow_before = pa.total_allocated_bytes()
    try:
        images = store.load_images(big)
        metrics = store.load_metrics(big)
        info = store.get_run(big)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(images) == N_IMAGES and list(images["index"]) == list(range(N_IMAGES))
    assert len(metrics) == N_CATEGORIES and info.complete
    assert not [f for f in opened if f.endswith(".maps")]  # tables only: no map file is touched
    all_maps = N_IMAGES * 3 * R * R * 4
    # The tables of 5,000 images (paths, labels, scores) take well under 2 MB, whatever R is.
    assert peak < 2_000_000, f"loading the tables peaked at {peak / 1e6:.1f} MB"
    assert pa.total_allocated_bytes() - arrow_before < 2_000_000
    assert all_maps > 15_000_000  # the maps that were *not* loaded


def test_one_images_maps_are_read_alone(big_store: tuple[ResultStore, str], monkeypatch: pytest.MonkeyPatch) -> None:
    store, big = big_store
    index = N_IMAGES - 7  # in the last category's file
    read_bytes = 0
    real_open = builtins.open

    class Counting:
        def __init__(self, fh) -> None:  # type: ignore[no-untyped-def]
            self._fh = fh

        def read(self, *args):  # type: ignore[no-untyped-def]
            nonlocal read_bytes
            data = self._fh.read(*args)
            read_bytes += len(data)
            return data

        def __getattr__(self, name):  # type: ignore[no-untyped-def]
            return getattr(self._fh, name)

        def __enter__(self):  # type: ignore[no-untyped-def]
            return self

        def __exit__(self, *exc) -> None:  # type: ignore[no-untyped-def]
            self._fh.close()

    def spy(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        fh = real_open(file, *args, **kwargs)
        return Counting(fh) if str(file).endswith(".maps") else fh

    monkeypatch.setattr(builtins, "open", spy)
    tracemalloc.start()
    try:
        maps = store.load_maps(big, index)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert set(maps) == {"anomaly", "high", "low", "mask"} and maps["anomaly"].shape == (R, R)
    maps_file = next((store.root / big / "maps").glob("cat9-*.maps"))
    one_image = 3 * R * R * 2 + R * R // 8 + 3 * 16  # float16 codes + packed mask + parameters
    assert read_bytes < 4 * one_image + 1024, f"read {read_bytes} of a {maps_file.stat().st_size}-byte file"
    assert peak < 100_000 + 20 * one_image
    assert maps_file.stat().st_size > 50 * read_bytes  # the rest of the category was not read
