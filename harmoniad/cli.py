"""Command line: ``python -m harmoniad {extract,train,score,evaluate,runs} --help``.

Each subcommand is a thin layer over the package API; errors about the user's input
(a bad dataset tree, missing weights, a bad checkpoint) print one clear line and exit 2.
``evaluate`` prints every failed method/category with its one-line reason on stderr and
exits 1 when some method failed on every category; ``score`` exits 1 only when no image
could be scored.
"""

from __future__ import annotations

import argparse
import sqlite3
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
    group = parser.add_argument_group("reading")
    group.add_argument("--masks", choices=["auto", "none"], default="auto",
                       help="'auto': pixel ground truth from ground_truth/ when the tree has it; "
                            "'none': image-level metrics only (default: %(default)s)")
    group.add_argument("--allow-missing-masks", action="store_true",
                       help="accept defective images without a mask (pixel metrics use those with one)")
    group.add_argument("--normal-dir", default=None,
                       help="folder dataset: name of the normal images' folder (default: good)")
    group.add_argument("--test-normals", type=float, default=0.2,
                       help="flat folder layout <root>/<category>/{good,<defect>...}: share of the normal "
                            "images held back (seeded) as test normals (default: %(default)s)")


def _read_options(args: argparse.Namespace, seed: int = 0) -> object:
    from harmoniad.data import ReadOptions

    return ReadOptions(masks=args.masks, allow_missing_masks=args.allow_missing_masks,
                       normal_dir=args.normal_dir, test_normals=args.test_normals, seed=seed)


def _backbone_config(args: argparse.Namespace) -> BackboneConfig:
    layers = None if args.layers is None else tuple(args.layers)
    return BackboneConfig(model=args.model, weights=args.weights, image_size=args.image_size, layers=layers)


def cmd_extract(args: argparse.Namespace) -> int:
    from harmoniad.runtime import distributed
    from harmoniad.data import load_dataset
    from harmoniad.backbone.cache import FeatureCache

    splits = ["train", "test"] if args.split == "all" else [args.split]
    options = _read_options(args)
    samples = [s for split in splits
               for s in load_dataset(args.dataset, args.root, args.categories, split=split, options=options)]
    cache = FeatureCache(_backbone_config(args), batch_size=args.batch_size, device=distributed.device(args.device))
    # Under torchrun each rank extracts its share of the images (a no-op split otherwise).
    done = cache.ensure([s.image_path for s in samples], distributed=True)
    if distributed.is_main():
        print(f"{len(samples)} images, {done} extracted, {len(samples) - done} already cached in {cache.directory}")
    return 0


def _model_choice_args(parser: argparse.ArgumentParser) -> None:
    """The HarmoniAD design choices left open for real weights (docs/design.md#fsam-input, #joint-loss)."""
    parser.add_argument("--fsam-input", choices=["high", "whole"], default=None,
                        help="HarmoniAD: what FSAM reads while it rebuilds the high band: the high band, or the "
                             "whole feature (the low band as context) (default: ModelConfig's; "
                             "docs/design.md#fsam-input)")
    parser.add_argument("--joint-loss-weight", type=float, default=None, metavar="W",
                        help="HarmoniAD: weight of the loss term for the two branches' outputs summed against the "
                             "whole feature (default: ModelConfig's, 0; docs/design.md#joint-loss)")


def _model_choices(args: argparse.Namespace) -> dict[str, object]:
    """The ``ModelConfig`` fields given by :func:`_model_choice_args`' flags."""
    given = {"fsam_input": args.fsam_input, "joint_loss_weight": args.joint_loss_weight}
    return {k: v for k, v in given.items() if v is not None}


def cmd_train(args: argparse.Namespace) -> int:
    from harmoniad.runtime import distributed
    from harmoniad.data import load_dataset
    from harmoniad.model import ModelConfig
    from harmoniad.runtime.paths import cache_dir
    from harmoniad.data.screening import Screen
    from harmoniad.train import TrainConfig, train

    samples = load_dataset(args.dataset, args.root, args.categories, split="train",
                           options=_read_options(args, args.seed))
    sizes = {} if args.hidden_dim is None else {"hidden_dim": args.hidden_dim}
    if args.cutoff is not None:
        sizes["cutoff"] = args.cutoff
    sizes.update(_model_choices(args))
    model_cfg = ModelConfig(split=not args.no_split, branches=args.branches, fusion_weights=args.fusion_weights,
                            **sizes)
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
        print(_fusion_summary(path))
    return 0


def _fusion_summary(checkpoint: Path) -> str:
    """One line: how the checkpoint weighs its branch maps, and whether training learned the weights."""
    from harmoniad.train import read_checkpoint_info
    from harmoniad.train.fusion import describe_fusion

    info = read_checkpoint_info(checkpoint)  # the config's record; no need to load the weights
    cfg = info.model
    if not cfg.mixes_maps:
        return "fusion: one branch (its own map)" if cfg.branches != "both" else f"fusion: {cfg.fusion}"
    learning = info.result.get("fusion")
    mix, score_mix = (cfg.fixed_mix, cfg.fixed_mix) if learning is None else \
        (learning["map"]["mix"], learning["score"]["mix"])
    return "fusion of the z-scored maps: " + describe_fusion(mix, score_mix, learning)


def _score_threshold(args: argparse.Namespace, score_settings: dict) -> tuple[float | None, str]:
    """The threshold ``score`` applies and where it comes from (None: no decisions, the
    reason in the second item: scoring never fails for want of a threshold)."""
    from harmoniad.thresholds import THRESHOLDS_FILE, load_checkpoint_thresholds

    if args.threshold_value is not None:
        return float(args.threshold_value), "given on the command line"
    if args.threshold == "none":
        return None, "none asked"
    stored = load_checkpoint_thresholds(args.checkpoint)
    if stored is None:
        return None, f"none stored ({args.checkpoint / THRESHOLDS_FILE} missing: run evaluate with this checkpoint)"
    differ = sorted(k for k, v in stored["score"].items()
                    if k != "compile" and k in score_settings and score_settings[k] != v)
    if differ:
        return None, (
            f"not applied: {args.checkpoint / THRESHOLDS_FILE} was fitted with scoring settings "
            + ", ".join(f"{k}={stored['score'][k]!r}" for k in differ)
            + " but this run uses " + ", ".join(f"{k}={score_settings[k]!r}" for k in differ)
            + "; use the same settings or --threshold-value"
        )
    categories = stored["categories"]
    category = args.category
    if category is None:
        if len(categories) != 1:
            return None, (f"not applied: {args.checkpoint / THRESHOLDS_FILE} holds thresholds of categories "
                          f"{sorted(categories)}; pick one with --category")
        category = next(iter(categories))
    if category not in categories or args.threshold not in categories[category]:
        return None, (f"not applied: {args.checkpoint / THRESHOLDS_FILE} has no {args.threshold!r} threshold "
                      f"for category {category!r}; stored: { {c: sorted(t) for c, t in categories.items()} }")
    chosen = categories[category][args.threshold]
    how = (f"target FPR {chosen.get('target_fpr')}" if args.threshold == "fpr" else "max")
    return float(chosen["value"]), (f"fitted on {chosen.get('n_normals')} held-out normal images of "
                                    f"{category!r} ({how})")


def cmd_score(args: argparse.Namespace) -> int:
    import numpy as np
    import pandas as pd
    from PIL import Image

    from harmoniad.data import DatasetError, Sample
    from harmoniad.data.readers import IMAGE_EXTENSIONS as IMAGE_SUFFIXES
    from harmoniad.data.screening import Screen
    from harmoniad.maps import ScoreConfig
    from harmoniad.methods.harmoniad import Scorer
    from harmoniad.runtime.atomic import atomic_path
    from harmoniad.runtime.serialization import to_dict
    from harmoniad.visualize import heatmap_rgb

    images = sorted(p for p in args.images.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if args.images.is_dir() else [args.images]
    if not images:
        raise ValueError(f"{args.images}: no images found (expected files ending in {sorted(IMAGE_SUFFIXES)})")
    cfg = ScoreConfig(resolution=args.resolution, image_score=args.image_score)
    threshold, source = _score_threshold(args, to_dict(cfg))
    scorer = Scorer.from_checkpoint(args.checkpoint, cfg, device=args.device, use_cache=False, batch_size=args.batch_size)
    # An unreadable image is left out and listed (CSV and stderr); only "nothing scored" fails.
    samples = [Sample(p, None, "score", "good", 0, "test") for p in images]
    screen = Screen()
    try:
        pred, kept = screen.run(lambda usable: scorer.score_paths([s.image_path for s in usable]), samples)
    except DatasetError as exc:
        pred, kept = None, []
        print(f"error: nothing could be scored: {exc}", file=sys.stderr)
    skipped = {s.path: s.reason for s in screen.skipped(samples)}
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    scored = {s.image_path: i for i, s in enumerate(kept)}
    if pred is not None:
        # One colour scale for the whole folder, so heatmaps are comparable between images.
        vmax = float(np.percentile(pred.maps, 99.9))
    for path in images:
        i = scored.get(path)
        if i is None:
            reason = next((r for p, r in skipped.items() if p == str(path) or r.startswith(str(path))), "skipped")
            rows.append({"image": str(path), "status": "skipped", "score": None, "threshold": threshold,
                         "anomalous": None, "reason": reason})
            print(f"skipped: {reason}", file=sys.stderr)
            continue
        rel = path.relative_to(args.images) if args.images.is_dir() else Path(path.name)
        stem = "__".join(rel.with_suffix("").parts)
        for name, maps in (("anomaly", pred.maps), ("high", pred.high_maps), ("low", pred.low_maps)):
            if maps is None:
                continue
            with atomic_path(args.out / f"{stem}_{name}.png") as tmp:
                Image.fromarray(heatmap_rgb(maps[i], vmin=0.0, vmax=vmax)).save(tmp, format="PNG")
        score = float(pred.scores[i])
        rows.append({"image": str(path), "status": "scored", "score": score, "threshold": threshold,
                     "anomalous": None if threshold is None else bool(score > threshold), "reason": None})
    table = pd.DataFrame(rows, columns=["image", "status", "score", "threshold", "anomalous", "reason"])
    with atomic_path(args.out / "scores.csv") as tmp:
        table.to_csv(tmp, index=False)
    n_scored = int((table["status"] == "scored").sum())
    flagged = "" if threshold is None else f", {int(table['anomalous'].fillna(False).astype(bool).sum())} flagged anomalous"
    print(f"scored {n_scored} of {len(images)} images{flagged} -> {args.out / 'scores.csv'} and heatmaps in {args.out}")
    print(f"threshold: {'none' if threshold is None else f'{threshold:.6g}'} ({source})",
          file=sys.stderr if source.startswith("not applied") else sys.stdout)
    return 0 if n_scored else 1


def _harmoniad_options(args: argparse.Namespace) -> dict[str, dict]:
    """``--fsam-input`` and ``--joint-loss-weight`` as model options of every HarmoniAD method and
    ablation asked for."""
    from harmoniad.methods import METHODS

    choices = _model_choices(args)
    if not choices:
        return {}
    return {name: {"model": dict(choices)} for name in args.methods if METHODS[name].kind in ("harmoniad", "ablation")}


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
        name=args.name,
        masks=args.masks,
        allow_missing_masks=args.allow_missing_masks,
        normal_dir=args.normal_dir,
        test_normals=args.test_normals,
        threshold_holdout=args.threshold_holdout,
        target_fpr=args.target_fpr,
        n_resamples=args.resamples,
        options=_harmoniad_options(args),
    )
    if not distributed.is_main():  # under torchrun: compute a share, rank 0 writes and prints
        evaluate(request)
        return 0
    store = ResultStore(args.store)
    failed_everywhere = []
    for run_id in evaluate(request, store):
        info = store.get_run(run_id)
        print(f"{run_id}  {info.method:<22} {info.status}  ({info.dataset})")
        _print_metrics(store, run_id)
        if _report_failures(store, run_id):
            failed_everywhere.append(info.method)
    if failed_everywhere:
        print(f"error: {', '.join(failed_everywhere)} failed on every category", file=sys.stderr)
        return 1
    return 0


def _one_line(error: object) -> str:
    lines = [line for line in str(error or "").strip().splitlines() if line.strip()]
    return lines[0] if lines else "no reason recorded"


def _report_failures(store: object, run_id: str) -> bool:
    """Print the run's failures on stderr, one line each; True if it failed on every category."""
    info = store.get_run(run_id)  # type: ignore[attr-defined]
    metrics = store.load_metrics(run_id)  # type: ignore[attr-defined]
    failed = metrics[metrics["status"] == "failed"]
    for category, error in zip(failed["category"], failed["error"]):
        print(f"{info.method} failed on {category}: {_one_line(error)}", file=sys.stderr)
    if info.status == "failed":
        print(f"{info.method} failed: {_one_line(info.error)}", file=sys.stderr)
    ok = int((metrics["status"] == "ok").sum())
    return info.status == "failed" or ok == 0


def _print_metrics(store: object, run_id: str) -> None:
    import pandas as pd

    metrics: pd.DataFrame = store.load_metrics(run_id)  # type: ignore[attr-defined]
    if metrics.empty:
        return
    cols = ["category", "status", "image_auroc", "pixel_auroc", "pixel_aupro", "n_images"]
    table = metrics[[c for c in cols if c in metrics]].copy()
    intervals = store.load_intervals(run_id)  # type: ignore[attr-defined]
    for metric in ("image_auroc", "pixel_auroc", "pixel_aupro"):
        ci = intervals[intervals["metric"] == metric].set_index("category")
        table[metric] = [_with_ci(v, ci, c) for c, v in zip(table["category"], table[metric])]
    with pd.option_context("display.width", 200, "display.max_colwidth", 120):
        print(table.to_string(index=False))
    mean = intervals[intervals["category"] == "mean"]
    for metric, est, low, high in zip(mean["metric"], mean["estimate"], mean["low"], mean["high"]):
        print(f"mean {metric}: {est:.3f} [95% CI {low:.3f}, {high:.3f}]")
    failed = metrics[metrics["status"] == "failed"]
    for category, error in zip(failed["category"], failed["error"]):
        print(f"failed {category}: {_one_line(error)}")
    defects = store.load_defects(run_id)  # type: ignore[attr-defined]
    if len(defects):
        print("per defect type (its images against all normals of the category):")
        shown = defects.astype(object).where(defects.notna(), "n/a")
        with pd.option_context("display.width", 200, "display.float_format", "{:.3f}".format):
            print(shown.to_string(index=False, float_format="{:.3f}".format))
    thresholds = store.load_thresholds(run_id)  # type: ignore[attr-defined]
    if len(thresholds):
        print("thresholds (flag score > value) and their operating points on the test set:")
        cols = ["category", "label", "value", "precision", "recall", "fpr", "tp", "fp", "tn", "fn"]
        shown = thresholds[cols].astype(object).where(thresholds[cols].notna(), "n/a")
        with pd.option_context("display.width", 200):
            print(shown.to_string(index=False, float_format="{:.4g}".format))
    skipped: pd.DataFrame = store.load_skipped(run_id)  # type: ignore[attr-defined]
    if len(skipped):
        print(f"{len(skipped)} unusable file(s) left out of this run:")
        for split, reason in list(zip(skipped["split"], skipped["reason"]))[:20]:
            print(f"  [{split}] {reason}")
        if len(skipped) > 20:
            print(f"  ... and {len(skipped) - 20} more (store.load_skipped({run_id!r}))")


def _with_ci(value: float, ci: "object", category: str) -> str:
    """``0.962 [0.94, 0.98]``, or ``n/a`` for a metric that is not available."""
    import math

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if category in ci.index:  # type: ignore[attr-defined]
        row = ci.loc[category]  # type: ignore[attr-defined]
        return f"{value:.3f} [{row['low']:.3f}, {row['high']:.3f}]"
    return f"{value:.3f}"


def cmd_runs(args: argparse.Namespace) -> int:
    import pandas as pd

    from harmoniad.store import ResultStore

    store = ResultStore(args.store)
    if args.action == "list":
        runs = store.list_runs(method=args.method, dataset=args.dataset, status=args.status)
        cols = ["id", "method", "dataset", "status", "random_weights", "created"]
        with pd.option_context("display.width", 200, "display.max_colwidth", 40):
            print("no runs" if runs.empty else runs[[c for c in cols if c in runs]].to_string(index=False))
    elif args.action == "show" and args.json:
        import json

        print(json.dumps(store.run_json(args.run_id), indent=2))
    elif args.action == "show":
        info = store.get_run(args.run_id)
        print(f"{info.id}: {info.method} on {info.dataset} ({info.root}), {info.status}")
        if info.error:
            print(f"error: {info.error}")
        fusion = (store.load_run_details(info.id).get("fitted") or {}).get("fusion")
        if fusion:
            from harmoniad.train.fusion import describe_fusion

            print("fusion of the z-scored maps: " + describe_fusion(fusion["map"], fusion["score"], fusion["learning"]))
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
            for path in ([*store.export_csv(run_id, args.out), *store.export_details_csv(run_id, args.out)]
                         if args.format == "csv" else [export_json(store, run_id, args.out)]):
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
    p.add_argument("--fusion-weights", choices=["learned", "fixed"], default="learned",
                   help="weights of the branch maps in the anomaly map and image score: learned after training on "
                        "pseudo-defects in the training normals (kept fixed unless clearly better), or fixed "
                        "(docs/design.md#fusion-weights)")
    p.add_argument("--cutoff", type=float, default=None,
                   help="low-pass radius as a fraction of Nyquist (default: ModelConfig's)")
    p.add_argument("--hidden-dim", type=int, default=None, help="width of the heads (default: ModelConfig's)")
    _model_choice_args(p)
    p.add_argument("--checkpoint-every", type=int, default=200,
                   help="save the training state every N steps; a killed run resumes from it (default: %(default)s)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("score", help="score a folder of images with a checkpoint; writes heatmap PNGs and scores.csv")
    p.add_argument("--checkpoint", required=True, type=Path)
    p.add_argument("--images", required=True, type=Path, help="an image file or a folder (searched recursively)")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--image-score", choices=["top_mean", "max"], default="top_mean")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per batch (default: from free GPU memory, 64-256; 16 on the CPU)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threshold", choices=["fpr", "max", "none"], default="fpr",
                   help="stored threshold to apply (fitted by evaluate on held-out training normals: "
                        "'fpr' for the target false-positive rate, 'max' for their maximum) (default: %(default)s)")
    p.add_argument("--threshold-value", type=float, default=None, help="apply this threshold instead")
    p.add_argument("--category", default=None, help="whose stored threshold (needed when there are several)")
    p.set_defaults(func=cmd_score)

    p = sub.add_parser("evaluate", help="evaluate methods on a dataset and store the runs")
    _dataset_args(p)
    _backbone_args(p)
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), choices=sorted(METHODS))
    p.add_argument("--resolution", type=int, default=256, help="evaluation resolution (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--store", type=Path, default=None, help="run store folder (default: $HARMONIAD_STORE or cache/runs)")
    p.add_argument("--name", default=None, help="folder dataset: stored as folder:<name> (default: the root's name)")
    p.add_argument("--threshold-holdout", type=float, default=0.1,
                   help="share of each category's training normals held out to fit thresholds on (default: %(default)s)")
    p.add_argument("--target-fpr", type=float, default=0.01,
                   help="false-positive rate the quantile threshold aims at (default: %(default)s)")
    p.add_argument("--resamples", type=int, default=1000,
                   help="bootstrap resamples for the 95%% intervals; 0 for none (default: %(default)s)")
    _model_choice_args(p)
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
    q.add_argument("--json", action="store_true", help="print one JSON object (schema in the README)")
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
    from harmoniad.store import StoreError

    args = build_parser().parse_args(argv)
    try:
        # Joins the process group when started by torchrun; a plain process runs alone.
        with distributed.session():
            return args.func(args)
    except (ValueError, LookupError, FileNotFoundError, StoreError, sqlite3.DatabaseError) as exc:
        # Input problems (DatasetError, BackboneWeightsError, ConfigError, a live or newer-schema
        # run store, a damaged index, ...) are one clear line.
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ImportError as exc:
        print(f"error: {exc}; the dashboard extras provide it: pip install 'harmoniad[dashboard]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; cached features, training state and finished categories are kept", file=sys.stderr)
        return 130
