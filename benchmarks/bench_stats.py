"""Bootstrap confidence intervals of one 1,000-image category on one core.

Default data: 1,000 images (600 normal, 400 defective) of 256x256 maps, the shape evaluation
uses, with blob masks and smooth maps (the generator of bench_metrics.py). Printed: seconds
for the image AUROC resamples (exact), for binning the pixel scores per image (once per
category and method) and for the pixel AUROC + AUPRO resamples, their total (target < 2 s for
1,000 resamples), the exact point estimates from harmoniad.metrics, the intervals and the
largest binning error bound over the resamples.

    OMP_NUM_THREADS=1 python benchmarks/bench_stats.py [--n 1000] [--size 256] [--resamples 1000]

BLAS is limited to one thread below, before numpy is imported.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from harmoniad import metrics, stats  # noqa: E402


def make_data(n: int, size: int, defective: float, seed: int = 0
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Labels, image scores, blob masks on the defective images and smooth float32 maps."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) >= round(n * (1 - defective))
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    maps = np.empty((n, size, size), dtype=np.float32)
    cell = max(size // 16, 1)
    for i in np.flatnonzero(labels):
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, size, 2)
            ry, rx = rng.uniform(1.5, size / 8, 2)
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    for i in range(n):
        low = rng.normal(size=(size // cell, size // cell)).astype(np.float32)
        signal = ndimage.gaussian_filter(masks[i].astype(np.float32), 3)
        maps[i] = ndimage.zoom(low, cell, order=1) + 0.5 * rng.normal(size=(size, size)) + 3 * signal
    scores = maps.reshape(n, -1).max(axis=1)
    return labels, scores, masks, maps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--bins", type=int, default=1024)
    args = parser.parse_args()
    t0 = time.perf_counter()
    labels, scores, masks, maps = make_data(args.n, args.size, 0.4)
    print(f"{args.n} images of {args.size}x{args.size} ({int(labels.sum())} defective, "
          f"{maps.size / 1e6:.1f} M pixels), generated in {time.perf_counter() - t0:.1f} s")

    t0, c0 = time.perf_counter(), time.process_time()
    image = stats.image_auroc_resamples(labels, scores, args.resamples, seed=0)
    t_image = time.perf_counter() - t0
    t0 = time.perf_counter()
    hist = stats.pixel_histograms(masks, maps, bins=args.bins)
    t_hist = time.perf_counter() - t0
    t0 = time.perf_counter()
    pixel = stats.pixel_resamples(hist, args.resamples, seed=0)
    t_pixel = time.perf_counter() - t0
    total, cpu_total = t_image + t_hist + t_pixel, time.process_time() - c0

    exact_image = metrics.image_metrics(labels, scores)["auroc"]
    t0 = time.perf_counter()
    exact_pixel = metrics.pixel_metrics(masks, maps)
    t_exact = time.perf_counter() - t0
    print(f"image AUROC, {args.resamples} exact resamples:        {t_image:6.2f} s")
    print(f"pixel scores binned per image ({hist.bins} bins):    {t_hist:6.2f} s")
    print(f"pixel AUROC + AUPRO, {args.resamples} resamples:      {t_pixel:6.2f} s")
    print(f"total bootstrap CIs of the category:             {total:6.2f} s wall, {cpu_total:.2f} s CPU "
          "(target < 2 s; CPU time is steadier on a shared machine)")
    print(f"(one exact pixel_metrics call, for scale:        {t_exact:6.2f} s)")
    for name, samples, exact in (("image AUROC", image, exact_image),
                                 ("pixel AUROC", pixel.auroc, exact_pixel["auroc"]),
                                 ("AUPRO", pixel.aupro, exact_pixel["aupro"])):
        ci = stats.interval(samples, exact)
        print(f"{name:<12} {exact:.4f}  95% CI [{ci.low:.4f}, {ci.high:.4f}]")
    print(f"largest binning error bound over resamples: {pixel.max_error}")


if __name__ == "__main__":
    main()
