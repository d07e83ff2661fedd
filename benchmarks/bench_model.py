"""How much HarmoniAD's heads and post-processing add to the frozen backbone (issue 3, "Measure").

Times, in the same run and interleaved (so load changes hit both alike):

- ``backbone``: the backbone forward alone (``Backbone.extract`` on a preprocessed batch);
- ``full``: the whole scoring path, backbone + frequency split + FSAM/GSCM + fusion +
  reconstruction + maps + upsampling + Gaussian smoothing + image scores, ending with the
  numpy arrays on the host (``Scorer.score_tensor``);
- ``heads`` and ``post`` separately on precomputed features, to see where time goes.

Random weights (nothing is downloaded); image decoding and resizing are left out of both.

    python benchmarks/bench_model.py                      # CPU, ViT-B-16 at 224, target full/backbone <= 1.25
    python benchmarks/bench_model.py --device cuda --model ViT-L-14-336 --batch 64   # images/s, bf16
    python benchmarks/bench_model.py --device cuda --model ViT-L-14-336 --batch 64 --compile   # heads compiled

On CUDA it also checks the issue 6 target: at least 1,000 images/s end to end for
ViT-L-14-336 on one H200.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch


from harmoniad.backbone import Backbone, BackboneConfig
from harmoniad.runtime.device import autocast, resolve_device
from harmoniad.maps import ScoreConfig, finalize_maps
from harmoniad.methods.harmoniad import Scorer
from harmoniad.model import HarmoniAD, ModelConfig, parameter_counts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    parser.add_argument("--model", default="ViT-B-16", help="open_clip ViT name (default ViT-B-16)")
    parser.add_argument("--image-size", type=int, default=None, help="input size (default: the model's own)")
    parser.add_argument("--batch", type=int, default=8, help="images per batch (default 8)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions of each path (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed warm-up runs (default 2)")
    parser.add_argument("--resolution", type=int, default=256, help="final map resolution (default 256)")
    parser.add_argument("--hidden-dim", type=int, default=ModelConfig().hidden_dim, help="HarmoniAD hidden width")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the heads (ScoreConfig.compile)")
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if args.image_size is None:
        import open_clip

        vision = (open_clip.get_model_config(args.model) or {}).get("vision_cfg", {})
        args.image_size = int(vision.get("image_size", 224))
    backbone = Backbone(BackboneConfig(model=args.model, weights="random", image_size=args.image_size), device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = HarmoniAD(ModelConfig(hidden_dim=args.hidden_dim), backbone.embed_dim, backbone.num_layers)
    scorer = Scorer(model, backbone, ScoreConfig(resolution=args.resolution, compile=args.compile), device=device, batch_size=args.batch)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen).to(device)
    feats = backbone.extract(x)

    def run_backbone() -> object:
        return backbone.extract(x)

    def run_full() -> object:
        return scorer.score_tensor(x).numpy()

    def run_heads() -> object:
        with torch.inference_mode(), autocast(device):
            return scorer.model.output_maps(scorer.net(feats))

    with torch.inference_mode(), autocast(device):
        grid = scorer.model.output_maps(scorer.net(feats))

    def run_post() -> object:
        with torch.inference_mode():
            return finalize_maps(grid, scorer.cfg).numpy()

    paths = {"backbone": run_backbone, "full": run_full, "heads": run_heads, "post": run_post}
    for _ in range(args.warmup):
        for fn in paths.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(args.repeats):
        for name, fn in paths.items():
            times[name].append(_timed(fn, device))
    med = {name: statistics.median(ts) for name, ts in times.items()}

    counts = parameter_counts(model)
    backbone_params = sum(p.numel() for p in backbone.model.visual.parameters())
    precision = ("bf16 autocast" if device.type == "cuda" else "fp32") + (", heads compiled" if args.compile else "")
    print(f"device {device} ({precision}), threads {torch.get_num_threads()}, model {args.model} @ {args.image_size}, "
          f"grid {backbone.grid[0]}x{backbone.grid[1]}, {backbone.num_layers} layers x {backbone.embed_dim} ch, "
          f"batch {args.batch}, maps {args.resolution}px, median of {args.repeats}")
    for name in ("backbone", "full", "heads", "post"):
        spread = f"[{min(times[name]) * 1e3:.1f} .. {max(times[name]) * 1e3:.1f}]"
        print(f"  {name:<8} {med[name] * 1e3:9.1f} ms/batch {spread:>22}  {args.batch / med[name]:9.1f} images/s")
    ratio = med["full"] / med["backbone"]
    print(f"full / backbone = {ratio:.3f}  (target <= 1.25: {'met' if ratio <= 1.25 else 'NOT met'})")
    # Less noisy on a shared machine: the parts timed separately, each the median of its own runs.
    print(f"1 + (heads + post) / backbone = {1 + (med['heads'] + med['post']) / med['backbone']:.3f}")
    print(f"end to end: {args.batch / med['full']:.1f} images/s")
    if device.type == "cuda":
        rate = args.batch / med["full"]
        print(f"target >= 1000 images/s end to end (ViT-L-14-336 on one H200): {'met' if rate >= 1000 else 'NOT met'} "
              f"on {torch.cuda.get_device_name(device)}")
    print(f"parameters: FSAM {counts['fsam']:,}  GSCM {counts['gscm']:,}  trainable total {counts['total']:,}  "
          f"(frozen image tower {backbone_params:,})")


if __name__ == "__main__":
    main()
