"""Load: a store holding 50 runs, two of them of 5,000 images; times and memory of what users do.

    python benchmarks/bench_robustness_load.py [--images 5000] [--runs 50] [--resolution 256]
                                               [--dashboard] [--keep DIR]

Store figures: listing and filtering runs, the leaderboard, loading the big run's tables
(per-image table, metrics, run info; target: well under a second) and one image's maps
(read alone: maps load lazily), each with its peak memory (Python heap by tracemalloc plus
Arrow's pool) next to what all of the run's maps would take decoded. ``--dashboard`` also
renders the Overview, Compare, Inspect and Failure pages on that store through Streamlit's
AppTest (target: under 1 s each after the first load). The big runs come from
``bench_analysis_pages.build_store`` (one HarmoniAD run with three maps, one PatchCore
run); the other runs are small complete runs of assorted methods.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent

import bench_analysis_pages  # the dashboard benchmark's store builder and page driver
from timing import timed

from harmoniad.store import METRIC_COLUMNS, ResultStore


def add_small_runs(store: ResultStore, n: int, resolution: int) -> None:
    """``n`` complete runs of 15 categories x 4 images, as many past evaluations would leave."""
    rng = np.random.default_rng(1)
    cats = [f"cat{i:02d}" for i in range(15)]
    for k in range(n):
        run = store.create_run(
            method=("patchcore", "winclip", "freqfilter", "harmoniad_low")[k % 4],
            dataset=("mvtec", "visa")[k % 2],
            root="/datasets",
            categories=cats,
            resolution=resolution,
            backbone={"model": "ViT-L-14-336", "weights": "openai"},
            code_version="bench",
        )
        for cat in cats:
            images = pd.DataFrame(
                {
                    "image_path": [f"/datasets/{cat}/{i}.png" for i in range(4)],
                    "label": [0, 1, 0, 1],
                    "score": rng.random(4),
                }
            )
            store.add_category(run, cat, metrics={m: float(rng.random()) for m in METRIC_COLUMNS}, images=images)
        store.finish_run(run)


def peak_memory(fn: Callable[[], object]) -> tuple[int, int]:
    """(Python heap peak, Arrow pool growth) in bytes while ``fn`` runs."""
    arrow = pa.total_allocated_bytes()
    tracemalloc.start()
    try:
        result = fn()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    grown = pa.total_allocated_bytes() - arrow
    del result
    return peak, grown


def bench_store(store: ResultStore, resolution: int) -> None:
    runs = store.list_runs()
    big = runs.loc[runs["method"] == "harmoniad"].iloc[0]["id"]
    n_images = len(store.load_images(big))
    print(f"store: {len(runs)} runs; the big run {big}: {n_images} images, 3 maps + mask at {resolution}px\n")
    rows = [
        ("list_runs()", lambda: store.list_runs(), 20),
        ("list_runs(method=, status=)", lambda: store.list_runs(method="patchcore", status="complete"), 20),
        ("leaderboard()", lambda: store.leaderboard(), 5),
        ("big run: load_images", lambda: store.load_images(big), 10),
        (
            "big run: tables (images+metrics+get_run)",
            lambda: (store.load_images(big), store.load_metrics(big), store.get_run(big)),
            10,
        ),
    ]
    for name, fn, repeats in rows:
        med, worst = timed(fn, repeats)
        print(f"{name:42s} median {med * 1e3:7.1f} ms   max {worst * 1e3:7.1f} ms")
    picks = iter(np.random.default_rng(0).integers(0, n_images, size=50).tolist())
    med, worst = timed(lambda: store.load_maps(big, next(picks)), 50)
    print(f"{'big run: load_maps (one image, random)':42s} median {med * 1e3:7.1f} ms   max {worst * 1e3:7.1f} ms")

    all_maps = n_images * 3 * resolution * resolution * 4
    tables_py, tables_arrow = peak_memory(lambda: (store.load_images(big), store.load_metrics(big)))
    one_py, one_arrow = peak_memory(lambda: store.load_maps(big, n_images // 2))
    print(
        f"\npeak memory, big run's tables:   {tables_py / 2**20:7.2f} MiB heap + {tables_arrow / 2**20:.2f} MiB arrow"
    )
    print(f"peak memory, one image's maps:   {one_py / 2**20:7.2f} MiB heap + {one_arrow / 2**20:.2f} MiB arrow")
    print(f"all of the run's maps, decoded:  {all_maps / 2**20:7.0f} MiB (never loaded at once)")
    print(f"process max RSS so far:          {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:7.0f} MiB")


def bench_dashboard(root: Path) -> None:
    """Page render times through AppTest (Overview here; Compare/Inspect/Failures by the page benchmark)."""
    import os

    from streamlit.testing.v1 import AppTest

    os.environ.update(HARMONIAD_STORE=str(root / "runs"), HARMONIAD_CACHE=str(root), HARMONIAD_NO_DEMO="1")
    at = AppTest.from_file(str(REPO / "dashboard" / "app.py"), default_timeout=300)
    times = {"overview: first render": [timed(at.run, 1)[0]]}
    times["overview: rerun"] = [timed(at.run, 1)[0] for _ in range(3)]
    if at.exception:
        raise RuntimeError(f"overview: {at.exception[0].message}")
    times.update(bench_analysis_pages.measure(root))
    print()
    for name, values in times.items():
        print(f"{name:42s} median {statistics.median(values):6.3f} s  (n={len(values)}, max {max(values):.3f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000, help="images in each of the two big runs")
    parser.add_argument("--runs", type=int, default=50, help="runs in the store, the two big ones included")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--dashboard", action="store_true", help="also time the dashboard pages")
    parser.add_argument("--keep", type=Path, help="build the store here (reused if it exists)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        root = args.keep or Path(tmp)
        if not (root / "runs" / "index.sqlite").exists():
            t0 = time.perf_counter()
            store = bench_analysis_pages.build_store(root, args.images, args.resolution)
            add_small_runs(store, max(0, args.runs - 2), args.resolution)
            print(f"built the store in {time.perf_counter() - t0:.1f} s")
        bench_store(ResultStore(root / "runs"), args.resolution)
        if args.dashboard:
            bench_dashboard(root)


if __name__ == "__main__":
    main()
