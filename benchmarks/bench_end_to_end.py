"""Scoring at the speed of the backbone? The whole path from image files to the result store.

Two pipelines over the same image files, timed one after the other (``--repeats`` rounds,
interleaved, the best round of each counts):

- ``backbone``: files on disk -> decode (workers, pinned memory on CUDA) -> resize and
  normalise -> backbone forward; the features are dropped. This is the floor.
- ``end to end``: files on disk -> decode -> backbone -> HarmoniAD (frequency split, FSAM,
  GSCM, fusion, reconstruction) -> maps (upsampling, smoothing, image scores, moved to the
  host per batch) -> metrics (exact image and pixel metrics, as evaluation computes them)
  -> result store (per-category tables, compressed per-image maps), the metrics and store
  writes on the background writer, the way evaluation runs them.

Images are MVTec-like: ``--image-size`` square PNGs (default 1024, the size of most MVTec AD
categories; 512 with ``--quick``, to fit in two minutes on two cores), half of them anomalous with a ground-truth mask, grouped in categories of
``--per-category`` test images (MVTec's are 42-167). Up to 20 distinct images are drawn; the
rest are hard links to them (each file is still read and decoded). Weights are random (nothing
is downloaded; speed does not depend on them). The heads are HarmoniAD's defaults, except
with ``--quick``: the tiny backbone is 64 channels wide, so the heads get ``hidden_dim=64``
(the default 256 is sized for ViT-B/L and would be 4x wider than the tiny backbone).

Memory: peak host RSS of this process (sampled every 20 ms during the timed pipelines) and,
on CUDA, peak device memory. It must not grow with the number of images: compare
``--images 500`` with ``--images 2000``.

    python benchmarks/bench_end_to_end.py --quick                       # tiny backbone, 200 images, CPU
    python benchmarks/bench_end_to_end.py --quick --images 2000         # memory flat in the image count?
    python benchmarks/bench_end_to_end.py --device cuda --model ViT-L-14-336 --images 4000   # one H200

Reading the ratio on a CPU: the backbone path already keeps every core busy, so the heads
(~5 ms of CPU an image with the tiny backbone, about half its forward) and the writer's work
(exact pixel metrics, bootstrap and compressed map writes, ~9 ms of CPU an image at 256 px)
cannot hide behind it, and the ratio measures them (``score_s``/``record_s`` say where the
time went; docs/design.md#cost-of-the-scoring-path has the breakdown). The "CPU an image"
line (``cpu_ms_per_image``, ``backbone_cpu_ms_per_image``: process CPU time of each
pipeline, all threads and decode workers) says how much more work the end-to-end path
does: where both pipelines keep the cores busy, the ratio cannot fall much below that CPU
ratio, whatever the overlap. On a GPU machine the writer has idle cores to itself (several
writer threads there).

The last line is one JSON object: images, images_per_s, backbone_images_per_s, ratio
(end-to-end time / backbone time, target <= 1.25 on CPU, <= 1.2 on an H200), peak_rss_mib,
peak_device_mib and the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from harmoniad.backbone import TINY_BACKBONE, Backbone, BackboneConfig
from harmoniad.data import Sample
from harmoniad.data.loading import decoded_batches, default_workers, reuse_decode_workers
from harmoniad.maps import ScoreConfig
from harmoniad.methods.harmoniad import Scorer
from harmoniad.model import HarmoniAD, ModelConfig
from harmoniad.runtime.background import BackgroundWriter, writer_workers
from harmoniad.runtime.device import batch_size_for, resolve_device
from harmoniad.runtime.heap import keep_freed_memory
from harmoniad.runtime.progress import silent
from harmoniad.store import ResultStore

#: Distinct images drawn; the rest of the files are hard links to them.
UNIQUE = 20


# -- data ----------------------------------------------------------------------------------------


def make_images(root: Path, n: int, size: int, per_category: int, seed: int = 0) -> list[Sample]:
    """``n`` test samples in categories of ``per_category``; every other one anomalous with a mask."""
    rng = np.random.default_rng(seed)
    pool = root / "pool"
    pool.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size] / size
    made: list[tuple[Path, Path | None]] = []
    for i in range(min(n, UNIQUE)):
        # A smooth textured surface (compresses like a photo, not like noise) ...
        fx, fy, phase = rng.uniform(4, 24), rng.uniform(4, 24), rng.uniform(0, 6.28)
        base = 0.5 + 0.25 * np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
        img = base[..., None] * rng.uniform(120, 230, 3) + rng.normal(0, 6, (size, size, 3))
        mask_path = None
        if i % 2:
            # ... with a defect: a dark blob, and its mask.
            cy, cx, r = rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8), rng.uniform(0.03, 0.1)
            blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            img[blob] *= 0.4
            mask_path = pool / f"{i:04d}_mask.png"
            Image.fromarray((blob * 255).astype(np.uint8)).save(mask_path, compress_level=1)
        path = pool / f"{i:04d}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, compress_level=1)
        made.append((path, mask_path))
    samples = []
    for i in range(n):
        src, mask = made[i % len(made)]
        category = f"cat{i // per_category:03d}"
        path = root / category / f"{i:05d}.png"
        path.parent.mkdir(exist_ok=True)
        if not path.exists():
            try:
                os.link(src, path)
            except OSError:
                path.write_bytes(src.read_bytes())
        samples.append(Sample(image_path=path, mask_path=mask, category=category,
                              defect="good" if mask is None else "blob", label=int(mask is not None), split="test"))
    return samples


# -- measuring -----------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@contextmanager
def peak_rss(result: dict[str, int]) -> Iterator[None]:
    """Sample this process's resident memory every 20 ms; ``result["peak"]`` is the maximum."""
    stop = threading.Event()
    result["peak"] = _rss_bytes()

    def sample() -> None:
        while not stop.wait(0.02):
            result["peak"] = max(result["peak"], _rss_bytes())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        result["peak"] = max(result["peak"], _rss_bytes())


def _cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its ended children (decode workers on CUDA)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- the two pipelines ---------------------------------------------------------------------------


def backbone_only(backbone: Backbone, paths: Sequence[Path], batch: int, workers: int) -> float:
    """Seconds for files -> decode -> preprocess -> backbone, features dropped."""
    device = backbone.device
    on_cuda = device.type == "cuda"
    _sync(device)
    start = time.perf_counter()
    for images in decoded_batches(paths, batch, workers=workers, processes=on_cuda, pin_memory=on_cuda):
        backbone.extract(backbone.preprocess(images))
    _sync(device)
    return time.perf_counter() - start


def end_to_end(scorer: Scorer, samples: Sequence[Sample], store: ResultStore, resolution: int,
               busy: dict[str, float]) -> float:
    """Seconds for files -> ... -> store, category by category, recording on the background writer.

    ``busy`` accumulates the seconds spent scoring (decode to host maps) and recording
    (metrics and store writes, on the writer), to show where the time goes.
    """
    from harmoniad.evaluate import record_category

    def record(*args: object, **kwargs: object) -> None:
        t = time.perf_counter()
        record_category(*args, **kwargs)  # type: ignore[arg-type]
        busy["record"] = busy.get("record", 0.0) + time.perf_counter() - t

    by_category: dict[str, list[Sample]] = {}
    for s in samples:
        by_category.setdefault(s.category, []).append(s)
    run_id = store.create_run(method="harmoniad", dataset="bench", root="bench", categories=sorted(by_category),
                              resolution=resolution)
    _sync(scorer.device)
    start = time.perf_counter()
    # As evaluate(): decode workers (CUDA) start once, not once a category.
    with reuse_decode_workers(), BackgroundWriter(workers=writer_workers(scorer.device)) as writer:
        for category, listed in by_category.items():
            t0 = time.perf_counter()
            pred = scorer.score_samples(listed, progress=silent)
            busy["score"] = busy.get("score", 0.0) + time.perf_counter() - t0
            writer.submit(record, store, run_id, category, listed, pred, t0=t0)
    store.finish_run(run_id)
    return time.perf_counter() - start


# -- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny backbone, 200 images (unless --images), CPU-sized")
    ap.add_argument("--images", type=int, default=None, help="test images (default 200 with --quick, else 2000)")
    ap.add_argument("--per-category", type=int, default=100, help="test images per category (default 100)")
    ap.add_argument("--image-size", type=int, default=None, help="side of the square PNGs (default 1024, --quick 512)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, auto (default auto)")
    ap.add_argument("--model", default="ViT-L-14-336", help="open_clip ViT (ignored with --quick)")
    ap.add_argument("--batch", type=int, default=None, help="images per batch (default: from free memory on CUDA, 32 on CPU)")
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default: harmoniad's choice)")
    ap.add_argument("--resolution", type=int, default=256, help="final map resolution (default 256)")
    ap.add_argument("--repeats", type=int, default=None, help="rounds of both pipelines; the best counts (default 2, --quick 3)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    ap.add_argument("--data", type=Path, default=None, help="where to write the images (default: a temp folder)")
    args = ap.parse_args(argv)

    n = args.images or (200 if args.quick else 2000)
    args.image_size = args.image_size or (512 if args.quick else 1024)
    args.repeats = args.repeats or (3 if args.quick else 2)
    device = resolve_device(args.device)
    heap = keep_freed_memory()  # as evaluate() does; both pipelines run under it
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        cfg = TINY_BACKBONE
    else:
        import open_clip

        size = int((open_clip.get_model_config(args.model) or {}).get("vision_cfg", {}).get("image_size", 224))
        cfg = BackboneConfig(model=args.model, weights="random", image_size=size)
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        root = args.data or Path(tmp)
        t0 = time.perf_counter()
        samples = make_images(root / "images", n, args.image_size, args.per_category)
        made_s = time.perf_counter() - t0
        backbone = Backbone(cfg, device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            heads = ModelConfig(hidden_dim=64) if args.quick else ModelConfig()
            model = HarmoniAD(heads, backbone.embed_dim, backbone.num_layers)
        # Activations per image, generously: the tapped layers' tokens in fp32, times the heads' fan-out.
        per_image = 64 * sum(c * h * w for c, h, w in backbone.spec.feature_shapes) * 4
        batch = args.batch or batch_size_for(device, per_image, default=32, minimum=64, maximum=256)
        workers = args.workers or default_workers(device)
        scorer = Scorer(model, backbone, ScoreConfig(resolution=args.resolution), device=device, batch_size=batch)
        store = ResultStore(root / "runs")
        # Warm-up (kernel choice, lazy init, page cache): one batch through both, the record
        # included (its first call imports and sets up the table, map and bootstrap writers:
        # once a process, not once an image).
        warm = samples[: min(len(samples), batch)]
        backbone_only(backbone, [s.image_path for s in warm], batch, workers)
        end_to_end(scorer, warm, ResultStore(root / "warm-up"), args.resolution, {})

        rss: dict[str, int] = {}
        times: dict[str, list[float]] = {"backbone": [], "end_to_end": []}
        cpu: dict[str, float] = {"backbone": 0.0, "end_to_end": 0.0}  # CPU seconds, all rounds
        busy: dict[str, float] = {}
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with peak_rss(rss):
            for _ in range(args.repeats):
                c0 = _cpu_seconds()
                times["backbone"].append(backbone_only(backbone, [s.image_path for s in samples], batch, workers))
                c1 = _cpu_seconds()
                times["end_to_end"].append(end_to_end(scorer, samples, store, args.resolution, busy))
                cpu["backbone"] += c1 - c0
                cpu["end_to_end"] += _cpu_seconds() - c1
        peak_dev = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None

    t_bb, t_e2e = min(times["backbone"]), min(times["end_to_end"])
    ratio = t_e2e / t_bb
    name = "harmoniad-tiny (random)" if args.quick else f"{args.model} (random)"
    precision = "bf16" if device.type == "cuda" else "fp32"
    print(f"device {device} ({precision}), threads {torch.get_num_threads()}, backbone {name} @ {cfg.image_size}, "
          f"batch {batch}, decode workers {workers}, {n} images of {args.image_size}px in categories of "
          f"{args.per_category} (made in {made_s:.1f} s), maps {args.resolution}px, best of {args.repeats}, "
          f"freed memory kept for reuse: {'yes' if heap else 'no'}")
    print(f"  backbone only : {n / t_bb:9.1f} images/s  ({', '.join(f'{t:.2f}' for t in times['backbone'])} s)")
    print(f"  end to end    : {n / t_e2e:9.1f} images/s  ({', '.join(f'{t:.2f}' for t in times['end_to_end'])} s)")
    rounds = len(times["end_to_end"])
    cpu_ms = {k: 1e3 * v / (rounds * n) for k, v in cpu.items()}  # CPU an image, mean of the rounds
    busy_cores = {k: cpu[k] / sum(times[k]) for k in cpu}
    print(f"    of which scoring (decode -> host maps) {busy.get('score', 0) / rounds:.2f} s and, on the writer, "
          f"metrics + store {busy.get('record', 0) / rounds:.2f} s per round")
    print(f"    CPU an image: backbone only {cpu_ms['backbone']:.1f} ms, end to end {cpu_ms['end_to_end']:.1f} ms "
          f"({cpu_ms['end_to_end'] / cpu_ms['backbone']:.2f}x); cores busy {busy_cores['backbone']:.2f} and "
          f"{busy_cores['end_to_end']:.2f} of {os.cpu_count()}")
    target = 1.2 if device.type == "cuda" else 1.25
    print(f"  ratio end-to-end / backbone = {ratio:.3f} (target <= {target}: {'met' if ratio <= target else 'NOT met'})")
    print(f"  peak host RSS {rss['peak'] / 2**20:.0f} MiB" +
          (f", peak device memory {peak_dev:.0f} MiB" if peak_dev is not None else ", no device memory (CPU)"))
    if device.type == "cuda" and not args.quick:
        rate = n / t_e2e
        print(f"  target >= 1000 images/s end to end on one H200: {'met' if rate >= 1000 else 'NOT met'} "
              f"({torch.cuda.get_device_name(device)})")
    print(json.dumps({
        "images": n, "images_per_s": round(n / t_e2e, 2), "backbone_images_per_s": round(n / t_bb, 2),
        "ratio": round(ratio, 4), "peak_rss_mib": round(rss["peak"] / 2**20, 1),
        "peak_device_mib": None if peak_dev is None else round(peak_dev, 1), "device": str(device),
        "backbone": name, "batch": batch, "workers": workers, "image_size": args.image_size,
        "per_category": args.per_category, "resolution": args.resolution, "keeps_freed_memory": heap,
        "score_s": round(busy.get("score", 0) / rounds, 3), "record_s": round(busy.get("record", 0) / rounds, 3),
        "cpu_ms_per_image": round(cpu_ms["end_to_end"], 2), "backbone_cpu_ms_per_image": round(cpu_ms["backbone"], 2),
    }))


if __name__ == "__main__":
    main()
