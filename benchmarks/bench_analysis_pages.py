"""Render times of the Compare, Inspect and Failure pages on a large stored run.

Builds a synthetic store (no model involved): one HarmoniAD run with anomaly, high and low
maps and one baseline run with anomaly maps only, each of ``--images`` test images at
``--resolution`` over four categories, then renders the pages through Streamlit's AppTest
and prints the time of the first render (cold caches) and of later renders and
interactions (warm caches). Target (docs/design.md#dashboard): under 1 s after the first load.

    python benchmarks/bench_analysis_pages.py [--images 2000] [--resolution 256] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

REPO = Path(__file__).resolve().parent.parent

from harmoniad.store import METRIC_COLUMNS, ResultStore

CATEGORIES = ("alpha", "beta", "gamma", "delta")


def _smooth_maps(rng: np.random.Generator, n: int, resolution: int) -> np.ndarray:
    """Smooth random maps (coarse noise upsampled), float16 to keep memory low."""
    coarse = rng.random((n, 8, 8), dtype=np.float32)
    factor = resolution // 8
    return np.kron(coarse, np.ones((1, factor, factor), dtype=np.float32)).astype(np.float16)


def build_store(root: Path, n_images: int, resolution: int, seed: int = 0) -> ResultStore:
    """A store with a HarmoniAD run and a PatchCore run of ``n_images`` images each."""
    rng = np.random.default_rng(seed)
    image_dir = root / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(16):  # a few real files, shared by all rows, so Inspect can read them
        path = image_dir / f"img{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8)).save(path)
        files.append(str(path))
    store = ResultStore(root / "runs")
    per_category = n_images // len(CATEGORIES)
    for method, branches in (("patchcore", ("anomaly",)), ("harmoniad", ("anomaly", "high", "low"))):
        run_id = store.create_run(method=method, dataset="synthetic", root=str(root), categories=CATEGORIES,
                                  resolution=resolution, backbone={"model": "ViT-tiny", "weights": "random"})
        for category in CATEGORIES:
            labels = (rng.random(per_category) < 0.4).astype(np.int8)
            masks = np.zeros((per_category, resolution, resolution), dtype=bool)
            for i in np.flatnonzero(labels):
                y, x = rng.integers(0, resolution - 32, 2)
                masks[i, y:y + 24, x:x + 24] = True
            maps = {name: _smooth_maps(rng, per_category, resolution) for name in branches}
            maps["anomaly"] = (maps["anomaly"].astype(np.float32) + masks * 0.5).astype(np.float16)
            peaks = maps["anomaly"].reshape(per_category, -1).astype(np.float32).max(axis=1)
            scores = peaks + rng.normal(0, 0.1, per_category)
            images = pd.DataFrame({
                "image_path": [files[i % len(files)] for i in range(per_category)],
                "defect": np.where(labels == 1, "scratch", "good"),
                "label": labels,
                "score": scores,
            })
            metrics = {m: float(rng.uniform(0.5, 1.0)) for m in METRIC_COLUMNS}
            store.add_category(run_id, category, metrics=metrics, images=images, maps=maps, masks=masks)
            del maps, masks
        store.finish_run(run_id)
    return store


def _timed(action) -> float:  # noqa: ANN001 - a zero-argument callable
    t0 = time.perf_counter()
    action()
    return time.perf_counter() - t0


def measure(store_root: Path, repeats: int = 3) -> dict[str, list[float]]:
    """Render times (seconds) per page and interaction, through AppTest."""
    from streamlit.testing.v1 import AppTest

    os.environ["HARMONIAD_STORE"] = str(store_root / "runs")
    os.environ["HARMONIAD_CACHE"] = str(store_root)
    os.environ["HARMONIAD_NO_DEMO"] = "1"
    at = AppTest.from_file(str(REPO / "dashboard" / "app.py"), default_timeout=300)
    at.run()
    times: dict[str, list[float]] = {}

    def record(name: str, action) -> None:  # noqa: ANN001
        times.setdefault(name, []).append(_timed(action))
        if at.exception:
            raise RuntimeError(f"{name}: {at.exception[0].message}")

    for page in ("compare", "inspect", "failures"):
        at.switch_page(f"../pages/{page}.py")
        record(f"{page}: first render", at.run)
        for _ in range(repeats):
            record(f"{page}: rerun", at.run)
    at.switch_page("../pages/inspect.py").run()
    for _ in range(repeats):
        record("inspect: next image", lambda: at.button(key="inspect_next").click().run())
        key = next(s.key for s in at.slider if s.key and s.key.startswith("inspect_threshold"))
        slider = at.slider(key=key)
        record("inspect: move threshold", lambda: slider.set_value((slider.min + slider.max) / 2).run())
    categories = at.selectbox(key="inspect_category").options
    pick = lambda key, value: lambda: at.selectbox(key=key).select(value).run()  # noqa: E731
    record("inspect: other category (first time)", pick("inspect_category", categories[1]))
    record("inspect: back to category (cached)", pick("inspect_category", categories[0]))
    at.switch_page("../pages/compare.py").run()
    record("compare: change metric", pick("compare_metric", "pixel_aupro"))
    options = at.selectbox(key="compare_curve_category").options
    record("compare: change curve category", pick("compare_curve_category", options[1]))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--keep", type=Path, help="build the store here (reused if it exists) instead of a temp dir")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        if not (root / "runs" / "index.sqlite").exists():
            t = _timed(lambda: build_store(root, args.images, args.resolution))
            print(f"built a store of 2 runs x {args.images} images at {args.resolution}px in {t:.1f} s")
        for name, values in measure(root).items():
            print(f"{name:40s} median {statistics.median(values):6.3f} s  (n={len(values)}, max {max(values):.3f})")


if __name__ == "__main__":
    main()
