"""Results-store speed and size: list 100 runs, load a 2,000-image run, one image's maps.

    python benchmarks/bench_store.py [--images 2000] [--categories 10] [--resolution 256]

Maps are realistic in smoothness (a 24x24 patch grid upsampled bilinearly and blurred
with sigma 4, as anomaly maps are), so the compressed sizes are representative. Writes go
to a temporary directory unless ``--root`` is given.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

HERE = Path(__file__).resolve().parent

from timing import timed  # the benchmarks' shared timing helper

from harmoniad.store import METRIC_COLUMNS, ResultStore


def smooth_maps(rng: np.random.Generator, n: int, resolution: int, grid: int = 24) -> np.ndarray:
    """(n, R, R) float32 maps shaped like patch-level anomaly maps."""
    coarse = torch.from_numpy(rng.random((n, 1, grid, grid), dtype=np.float32))
    fine = F.interpolate(coarse, size=(resolution, resolution), mode="bilinear", align_corners=False)[:, 0].numpy()
    return gaussian_filter(fine, sigma=(0, 4, 4)).astype(np.float32)


def category_args(rng: np.random.Generator, category: str, n: int, resolution: int) -> dict:
    labels = (np.arange(n) % 3 == 0).astype(np.int8)
    images = pd.DataFrame(
        {
            "image_path": [f"/datasets/mvtec/{category}/test/defect/{i:04d}.png" for i in range(n)],
            "mask_path": [
                f"/datasets/mvtec/{category}/ground_truth/defect/{i:04d}_mask.png" if l else None
                for i, l in enumerate(labels)
            ],
            "category": category,
            "defect": ["defect" if l else "good" for l in labels],
            "label": labels,
            "score": rng.random(n).astype(np.float32),
        }
    )
    masks = np.zeros((n, resolution, resolution), dtype=bool)
    r = resolution
    masks[labels == 1, r // 3 : r // 2, r // 4 : r // 3] = True
    maps = {name: smooth_maps(rng, n, resolution) for name in ("anomaly", "high", "low")}
    return {
        "metrics": {m: float(rng.random()) for m in METRIC_COLUMNS},
        "images": images,
        "maps": maps,
        "masks": masks,
        "seconds": 1.0,
    }


def directory_bytes(path: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern) if p.is_file())


def bench_listing(root: Path, n_runs: int) -> None:
    store = ResultStore(root / "listing")
    rng = np.random.default_rng(0)
    cats = [f"cat{i}" for i in range(15)]
    t0 = time.perf_counter()
    for k in range(n_runs):
        run = store.create_run(
            method=f"method{k % 6}", dataset="mvtec", root="/datasets/mvtec", categories=cats, resolution=8,
            method_config={"k": k}, backbone={"model": "ViT-L-14-336", "weights": "random"},
        )  # fmt: skip
        for cat in cats:
            store.add_category(run, cat, **category_args(rng, cat, 2, 8))
        store.finish_run(run)
    print(f"setup: {n_runs} runs x {len(cats)} categories written in {time.perf_counter() - t0:.1f} s")
    med, worst = timed(lambda: store.list_runs(), 20)
    print(f"list_runs() of {n_runs} runs:            median {med * 1e3:7.1f} ms  max {worst * 1e3:7.1f} ms")
    med, worst = timed(lambda: store.list_runs(method="method1", status="complete"), 20)
    print(f"list_runs(method=..., status=...):      median {med * 1e3:7.1f} ms  max {worst * 1e3:7.1f} ms")
    med, worst = timed(lambda: store.leaderboard(), 5)
    print(f"leaderboard() over {n_runs} runs:          median {med * 1e3:7.1f} ms  max {worst * 1e3:7.1f} ms")


def bench_big_run(root: Path, n_images: int, n_categories: int, resolution: int, precision: str) -> None:
    store = ResultStore(root / f"big-{precision}", map_precision=precision)  # type: ignore[arg-type]
    rng = np.random.default_rng(1)
    cats = [f"cat{i}" for i in range(n_categories)]
    per = [n_images // n_categories + (i < n_images % n_categories) for i in range(n_categories)]
    run = store.create_run(
        method="harmoniad", dataset="mvtec", root="/datasets/mvtec", categories=cats, resolution=resolution
    )
    write_s = 0.0
    for cat, n in zip(cats, per):
        args = category_args(rng, cat, n, resolution)
        t0 = time.perf_counter()
        store.add_category(run, cat, **args)
        write_s += time.perf_counter() - t0
    store.finish_run(run)
    run_dir = store.root / run
    maps_b, table_b = directory_bytes(run_dir, "*.maps"), directory_bytes(run_dir, "*.parquet")

    print(
        f"\n[{precision} maps] one run: {n_images} images in {n_categories} categories, "
        f"3 maps + mask at {resolution}x{resolution}"
    )
    print(f"write (add_category, all categories):   {write_s:7.2f} s  ({write_s / n_images * 1e3:.1f} ms/image)")
    med, worst = timed(lambda: store.load_images(run), 10)
    print(f"load_images ({n_images} rows):              median {med * 1e3:7.1f} ms  max {worst * 1e3:7.1f} ms")
    med, worst = timed(lambda: store.load_metrics(run), 10)
    print(f"load_metrics ({n_categories} rows):               median {med * 1e3:7.1f} ms  max {worst * 1e3:7.1f} ms")
    both = timed(lambda: (store.load_images(run), store.load_metrics(run), store.get_run(run)), 10)
    print(f"run's tables together (+get_run):       median {both[0] * 1e3:7.1f} ms  max {both[1] * 1e3:7.1f} ms")
    picks = iter(rng.integers(0, n_images, size=50).tolist())
    med, worst = timed(lambda: store.load_maps(run, next(picks)), 50)
    print(f"load_maps (one image, random):          median {med * 1e3:7.1f} ms  max {worst * 1e3:7.1f} ms")
    print(
        f"on disk: {(maps_b + table_b) / n_images / 1024:.1f} KiB/image "
        f"(maps+mask {maps_b / n_images / 1024:.1f} KiB, table {table_b / n_images:.0f} B); "
        f"run total {(maps_b + table_b) / 2**20:.1f} MiB; "
        f"raw float32 maps would be {3 * resolution**2 * 4 / 1024:.0f} KiB/image"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--categories", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--precision", choices=["float16", "uint8", "both"], default="both")
    parser.add_argument("--root", type=Path, default=None, help="where to write (default: a temporary directory)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="bench_store_") as tmp:
        root = args.root or Path(tmp)
        bench_listing(root, args.runs)
        for precision in (["float16", "uint8"] if args.precision == "both" else [args.precision]):
            bench_big_run(root, args.images, args.categories, args.resolution, precision)


if __name__ == "__main__":
    main()
