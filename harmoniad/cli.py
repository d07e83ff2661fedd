"""Command line: ``python -m harmoniad {extract,train,score,evaluate,runs} --help``.

Each subcommand is a thin layer over the package API; errors about the user's input
(a bad dataset tree, missing weights, a bad checkpoint) print one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from harmoniad.backbone import BackboneConfig


def _backbone_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backbone")
    group.add_argument("--model", default="ViT-L-14-336", help="open_clip model name, or 'harmoniad-tiny' (default: %(default)s)")
    group.add_argument("--weights", default="openai",
                       help="open_clip pretrained tag, a local weights file, or 'random' (default: %(default)s)")
    group.add_argument("--image-size", type=int, default=336, help="input size in pixels (default: %(default)s)")
    group.add_argument("--layers", type=int, nargs="+", default=None,
                       help="1-based blocks to tap (default: 4 evenly spaced)")
    group.add_argument("--device", default="auto", help="'auto', 'cpu', 'cuda', 'cuda:1', ... (default: %(default)s)")


def _dataset_args(parser: argparse.ArgumentParser) -> None:
    from harmoniad.data import DATASETS

    parser.add_argument("--dataset", required=True, choices=sorted(DATASETS), help="dataset reader")
    parser.add_argument("--root", required=True, type=Path, help="dataset root folder")
    parser.add_argument("--categories", nargs="+", default=None, help="categories (default: all)")


def _backbone_config(args: argparse.Namespace) -> BackboneConfig:
    layers = None if args.layers is None else tuple(args.layers)
    return BackboneConfig(model=args.model, weights=args.weights, image_size=args.image_size, layers=layers)


def cmd_extract(args: argparse.Namespace) -> int:
    from harmoniad.runtime import distributed
    from harmoniad.data import load_dataset
    from harmoniad.backbone.cache import FeatureCache

    splits = ["train", "test"] if args.split == "all" else [args.split]
    samples = [s for split in splits for s in load_dataset(args.dataset, args.root, args.categories, split=split)]
    cache = FeatureCache(_backbone_config(args), batch_size=args.batch_size, device=distributed.device(args.device))
    # Under torchrun each rank extracts its share of the images (a no-op split otherwise).
    done = cache.ensure([s.image_path for s in samples], distributed=True)
    if distributed.is_main():
        print(f"{len(samples)} images, {done} extracted, {len(samples) - done} already cached in {cache.directory}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from harmoniad.runtime import distributed
    from harmoniad.data import load_dataset
    from harmoniad.model import ModelConfig
    from harmoniad.runtime.paths import cache_dir
    from harmoniad.data.screening import Screen
    from harmoniad.train import TrainConfig, train

    samples = load_dataset(args.dataset, args.root, args.categories, split="train")
    sizes = {} if args.hidden_dim is None else {"hidden_dim": args.hidden_dim}
    model_cfg = ModelConfig(split=not args.no_split, branches=args.branches, cutoff=args.cutoff, **sizes)
    train_cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                            checkpoint_every=args.checkpoint_every)
    out = args.out or cache_dir() / "checkpoints" / f"{args.dataset}-{args.model}"
    # Unreadable training images are left out and listed; torchrun ranks agree on them up front.
    screen = Screen(decode=distributed.active())
    path, _ = screen.run(
        lambda kept: train(kept, _backbone_config(args), model_cfg, train_cfg, out, device=args.device), samples
    )
    if distributed.is_main():
        for skipped in screen.skipped(samples):
            print(f"skipped: {skipped.reason}", file=sys.stderr)
        print(f"checkpoint: {path}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    import numpy as np
    import pandas as pd
    from PIL import Image

    from harmoniad.runtime.atomic import atomic_path
    from harmoniad.data.readers import IMAGE_EXTENSIONS as IMAGE_SUFFIXES
    from harmoniad.maps import ScoreConfig
    from harmoniad.methods.harmoniad import Scorer
    from harmoniad.visualize import heatmap_rgb

    images = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if args.images.is_dir() else [args.images]
    if not images:
        raise ValueError(f"{args.images}: no images found (expected files ending in {sorted(IMAGE_SUFFIXES)})")
    cfg = ScoreConfig(resolution=args.resolution, image_score=args.image_score)
    scorer = Scorer.from_checkpoint(args.checkpoint, cfg, device=args.device, use_cache=False, batch_size=args.batch_size)
    pred = scorer.score_paths(images)
    args.out.mkdir(parents=True, exist_ok=True)
    # One colour scale for the whole folder, so heatmaps are comparable between images.
    vmax = float(np.percentile(pred.maps, 99.9))
    rows = []
    for i, path in enumerate(images):
        rel = path.relative_to(args.images) if args.images.is_dir() else Path(path.name)
        stem = "__".join(rel.with_suffix("").parts)
        for name, maps in (("anomaly", pred.maps), ("high", pred.high_maps), ("low", pred.low_maps)):
            if maps is None:
                continue
            with atomic_path(args.out / f"{stem}_{name}.png") as tmp:
                Image.fromarray(heatmap_rgb(maps[i], vmin=0.0, vmax=vmax)).save(tmp, format="PNG")
        rows.append({"image": str(path), "score": float(pred.scores[i])})
    with atomic_path(args.out / "scores.csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    print(f"scored {len(images)} images -> {args.out / 'scores.csv'} and heatmaps in {args.out}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from harmoniad.runtime import distributed
    from harmoniad.evaluate import EvalRequest, evaluate
    from harmoniad.store import ResultStore

    request = EvalRequest(
        dataset=args.dataset,
        root=str(args.root),
        methods=tuple(args.methods),
        categories=None if args.categories is None else tuple(args.categories),
        backbone=_backbone_config(args),
        resolution=args.resolution,
        seed=args.seed,
        device=args.device,
    )
    if not distributed.is_main():  # under torchrun: compute a share, rank 0 writes and prints
        evaluate(request)
        return 0
    store = ResultStore(args.store)
    for run_id in evaluate(request, store):
        info = store.get_run(run_id)
        print(f"{run_id}  {info.method:<22} {info.status}")
        _print_metrics(store, run_id)
    return 0


def _print_metrics(store: object, run_id: str) -> None:
    import pandas as pd

    metrics: pd.DataFrame = store.load_metrics(run_id)  # type: ignore[attr-defined]
    if metrics.empty:
        return
    cols = ["category", "status", "image_auroc", "pixel_auroc", "pixel_aupro"]
    with pd.option_context("display.width", 160, "display.float_format", "{:.3f}".format):
        print(metrics[[c for c in cols if c in metrics]].to_string(index=False))
    skipped: pd.DataFrame = store.load_skipped(run_id)  # type: ignore[attr-defined]
    if len(skipped):
        print(f"{len(skipped)} unusable file(s) left out of this run:")
        for split, reason in list(zip(skipped["split"], skipped["reason"]))[:20]:
            print(f"  [{split}] {reason}")
        if len(skipped) > 20:
            print(f"  ... and {len(skipped) - 20} more (store.load_skipped({run_id!r}))")


def cmd_runs(args: argparse.Namespace) -> int:
    import pandas as pd

    from harmoniad.store import ResultStore

    store = ResultStore(args.store)
    if args.action == "list":
        runs = store.list_runs(method=args.method, dataset=args.dataset, status=args.status)
        cols = ["id", "method", "dataset", "status", "random_weights", "created"]
        with pd.option_context("display.width", 200, "display.max_colwidth", 40):
            print("no runs" if runs.empty else runs[[c for c in cols if c in runs]].to_string(index=False))
    elif args.action == "show":
        info = store.get_run(args.run_id)
        print(f"{info.id}: {info.method} on {info.dataset} ({info.root}), {info.status}")
        if info.error:
            print(f"error: {info.error}")
        _print_metrics(store, info.id)
    elif args.action == "export":
        args.out.mkdir(parents=True, exist_ok=True)
        if args.format == "html":
            from harmoniad.report import write_report

            name = args.run_ids[0] if len(args.run_ids) == 1 else f"comparison-{args.run_ids[0]}-{len(args.run_ids)}runs"
            print(write_report(store, args.run_ids, args.out / f"{name}.html"))
            return 0
        from harmoniad.store.export import export_json

        for run_id in args.run_ids:
            for path in (store.export_csv(run_id, args.out) if args.format == "csv"
                         else [export_json(store, run_id, args.out)]):
                print(path)
    elif args.action == "delete":
        store.delete_run(args.run_id, force=args.force)
        print(f"deleted {args.run_id}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from harmoniad.methods import DEFAULT_METHODS, METHODS

    parser = argparse.ArgumentParser(prog="python -m harmoniad", description="HarmoniAD: cache features, train, score images, evaluate methods, manage runs.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("extract", help="cache backbone features of a dataset")
    _dataset_args(p)
    _backbone_args(p)
    p.add_argument("--split", choices=["train", "test", "all"], default="all")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("train", help="train one HarmoniAD model on all chosen categories")
    _dataset_args(p)
    _backbone_args(p)
    p.add_argument("--out", type=Path, default=None, help="checkpoint directory (default: cache/checkpoints/...)")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-split", action="store_true", help="ablation: no frequency split")
    p.add_argument("--branches", choices=["both", "high", "low"], default="both")
    p.add_argument("--cutoff", type=float, default=0.25, help="low-pass radius as a fraction of Nyquist")
    p.add_argument("--hidden-dim", type=int, default=None, help="width of the heads (default: ModelConfig's)")
    p.add_argument("--checkpoint-every", type=int, default=200,
                   help="save the training state every N steps; a killed run resumes from it (default: %(default)s)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("score", help="score a folder of images with a checkpoint; writes heatmap PNGs and scores.csv")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--images", required=True, type=Path, help="an image file or a folder (searched recursively)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--image-score", choices=["top_mean", "max"], default="top_mean")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("evaluate", help="evaluate methods on a dataset and store the runs")
    _dataset_args(p)
    _backbone_args(p)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=sorted(METHODS))
    p.add_argument("--resolution", type=int, default=256, help="evaluation resolution (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--store", type=Path, default=None, help="run store folder (default: $HARMONIAD_STORE or cache/runs)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("runs", help="list, show, export or delete stored runs")
    p.add_argument("--store", type=Path, default=None, help="run store folder (default: $HARMONIAD_STORE or cache/runs)")
    rs = p.add_subparsers(dest="action", required=True)
    q = rs.add_parser("list", help="stored runs, newest first")
    q.add_argument("--method")
    q.add_argument("--dataset")
    q.add_argument("--status", choices=["running", "complete", "failed"])
    q = rs.add_parser("show", help="one run: status, per-category metrics, skipped files")
    q.add_argument("run_id")
    q = rs.add_parser("export", help="write a run's results as CSV tables, JSON, or a self-contained HTML report")
    q.add_argument("run_ids", nargs="+", metavar="RUN_ID",
                   help="the run(s); with --format html, several runs make one comparison report")
    q.add_argument("--format", choices=["csv", "html", "json"], default="csv",
                   help="csv: metrics, per-image scores and the run record; json: record and metrics in one file; "
                        "html: report with tables, charts, intervals, per-defect results and worst failures "
                        "(needs plotly: pip install 'harmoniad[dashboard]')")
    q.add_argument("--out", type=Path, default=Path("."))
    q = rs.add_parser("delete", help="remove a run and its files")
    q.add_argument("run_id")
    q.add_argument("--force", action="store_true", help="delete even if the run looks alive")
    p.set_defaults(func=cmd_runs)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from harmoniad.runtime import distributed

    args = build_parser().parse_args(argv)
    try:
        # Joins the process group when started by torchrun; a plain process runs alone.
        with distributed.session():
            return args.func(args)
    except (ValueError, LookupError, FileNotFoundError) as exc:
        # Input problems (DatasetError, BackboneWeightsError, ConfigError, ...) are one clear line.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; cached features, training state and finished categories are kept", file=sys.stderr)
        return 130
