"""What starting decode worker processes once a call costs, and what reusing them saves.

On CUDA, scoring decodes images in DataLoader worker processes
(``harmoniad.data.loading.decoded_batches(processes=True)``). An evaluation makes two such
calls a category (its test images, its held-out normals); started and stopped every call,
the workers cost their start-up each time while the GPU waits.
``reuse_decode_workers()`` (which ``evaluate()`` and ``bench_end_to_end.py`` use) starts
them once. Three ways to decode the same images, category by category, decode only:

- ``one stream``: all images in one call (the floor: what the backbone-only path does);
- ``a call a category``: fresh workers every call;
- ``reused``: a call a category inside ``reuse_decode_workers()``.

    python benchmarks/bench_decode_workers.py                      # 2 workers, 600 images of 128 px
    python benchmarks/bench_decode_workers.py --workers 15 --image-size 1024 --images 2000

The last line is one JSON object: seconds of each way (best of ``--repeats``) and the cost a
category over one stream, in ms.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench_end_to_end import make_images  # the end-to-end benchmark's MVTec-like images, beside this script

from harmoniad.data.loading import decoded_batches, reuse_decode_workers


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--per-category", type=int, default=30, help="images a category (default 30)")
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-decode-") as tmp:
        samples = make_images(Path(tmp), args.images, args.image_size, args.per_category)
        paths = [s.image_path for s in samples]
        categories: dict[str, list[Path]] = {}
        for s in samples:
            categories.setdefault(s.category, []).append(s.image_path)

        def decode(files: list[Path]) -> None:
            for _ in decoded_batches(files, args.batch, workers=args.workers, processes=True):
                pass

        def per_category() -> None:
            for files in categories.values():
                decode(files)

        def reused() -> None:
            with reuse_decode_workers():
                per_category()

        ways: dict[str, Callable[[], None]] = {"one stream": lambda: decode(paths), "a call a category": per_category,
                                                "reused": reused}
        best = {name: float("inf") for name in ways}
        for way in ways.values():  # warm-up: page cache, imports in the workers
            way()
        for _ in range(args.repeats):
            for name, way in ways.items():
                t = time.perf_counter()
                way()
                best[name] = min(best[name], time.perf_counter() - t)

    k = len(categories)
    print(f"{args.images} images of {args.image_size} px in {k} categories, {args.workers} decode workers, "
          f"batch {args.batch}, best of {args.repeats}:")
    for name, seconds in best.items():
        extra = (seconds - best["one stream"]) / k * 1e3
        print(f"  {name:18s} {seconds:6.2f} s  ({extra:+5.0f} ms a category over one stream)")
    print(json.dumps({
        "images": args.images, "categories": k, "workers": args.workers, "image_size": args.image_size,
        "one_stream_s": round(best["one stream"], 3), "per_category_s": round(best["a call a category"], 3),
        "reused_s": round(best["reused"], 3),
        "per_category_ms": round((best["a call a category"] - best["one stream"]) / k * 1e3, 1),
        "reused_ms": round((best["reused"] - best["one stream"]) / k * 1e3, 1),
    }))


if __name__ == "__main__":
    main()
