"""How well each HarmoniAD map finds each kind of defect: anomaly, high-frequency and low-frequency map.

Trains HarmoniAD (ModelConfig's defaults, plus any extra variants) on the synthetic dataset
with the tiny random backbone, then prints per-category pixel AUROC of the anomaly map, the
high-frequency map (FSAM's distance to the high band) and the low-frequency map (GSCM's
distance to the low band), the same split by defect kind (structural: scratch/crack/pinhole;
semantic: stain/colour/missing/displaced; each kind scored on its defective images plus the
category's normal images) and by defect type. ``--json`` writes, per design,
``per_category``, ``per_kind -> kind -> category -> {anomaly, high, low}`` and ``per_defect``.

Tune on dev seeds, not on the benchmark's seed 0:

    python benchmarks/bench_branch_maps.py --seed 1 --variant hi_noise=feature_noise:1.0   # dev set
    python benchmarks/bench_branch_maps.py --seed 0                                        # the defaults
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch


from harmoniad.backbone import TINY_BACKBONE
from harmoniad.data import DEFECT_KINDS, load_dataset, make_synthetic
from harmoniad.evaluate import masks_at
from harmoniad.backbone.cache import FeatureCache
from harmoniad.maps import ScoreConfig
from harmoniad.methods.harmoniad import Scorer
from harmoniad.metrics import pixel_metrics
from harmoniad.model import ModelConfig
from harmoniad.train import TrainConfig, load_checkpoint, train
from harmoniad.backbone.sources import TensorSource

MAPS = ("anomaly", "high", "low")

# Extra named variants beyond the grid: "name=field:value,field:value".
VARIANT_HELP = "extra variants as name=field:value[,field:value], e.g. wide=cutoff:0.75,fusion:max"


def _parse_variant(text: str) -> tuple[str, dict[str, object]]:
    name, _, body = text.partition("=")
    fields: dict[str, object] = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition(":")
        fields[key] = json.loads(value) if value[:1].isdigit() or value in ("true", "false") else value
    if not name or not fields:
        raise SystemExit(f"--variant {text!r}: expected name=field:value[,field:value]")
    return name, fields


def _auroc(masks: np.ndarray, maps: np.ndarray | None) -> float:
    if maps is None or not masks.any() or masks.all():
        return float("nan")
    return float(pixel_metrics(masks, maps)["auroc"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=1, help="synthetic dataset seed (1 = dev set; 0 = benchmark)")
    parser.add_argument("--designs", nargs="*", default=["default"], choices=["default"],
                        help="'default' trains ModelConfig's defaults (pass no value to run only --variant)")
    parser.add_argument("--variant", action="append", default=[], help=VARIANT_HELP)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--hidden-dim", type=int, default=64)
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="data/features/checkpoints folder (default: temp)")
    parser.add_argument("--json", type=Path, default=None, help="also write all figures here")
    parser.add_argument("--report", type=Path, default=None, help="only print the tables of a saved --json file")
    args = parser.parse_args()
    if args.report:
        report(json.loads(args.report.read_text()))
        return
    torch.set_num_threads(1)

    work = args.work or Path(tempfile.mkdtemp(prefix="harmoniad-branch-maps-"))
    root = make_synthetic(work / f"synthetic-seed{args.seed}", seed=args.seed, n_train=40, n_test=30, size=256)
    train_samples = load_dataset("synthetic", root, split="train")
    test_samples = load_dataset("synthetic", root, split="test")
    cache = FeatureCache(TINY_BACKBONE, root=work / "features", device="cpu")
    cache.ensure([s.image_path for s in train_samples + test_samples])
    source = TensorSource(cache.load([s.image_path for s in train_samples]))
    categories = sorted({s.category for s in test_samples})
    by_cat = {c: [s for s in test_samples if s.category == c] for c in categories}
    test_feats = {c: cache.load([s.image_path for s in by_cat[c]]) for c in categories}
    masks = {c: masks_at(by_cat[c], 256) for c in categories}

    variants: list[tuple[str, dict[str, object]]] = [("default", {})] if "default" in args.designs else []
    variants += [_parse_variant(v) for v in args.variant]
    base = ModelConfig(hidden_dim=args.hidden_dim)
    results: dict[str, dict] = {}
    for name, fields in variants:
        cfg = replace(base, **fields)
        t0 = time.monotonic()
        out = train(source, TINY_BACKBONE, cfg, TrainConfig(epochs=args.epochs, seed=args.train_seed),
                    work / f"ckpt-seed{args.seed}-{name.replace('/', '-').replace(':', '-')}-t{args.train_seed}", device="cpu")
        model, _ = load_checkpoint(out)
        scorer = Scorer(model, None, ScoreConfig(resolution=256), device="cpu")
        wall = time.monotonic() - t0
        per_cat: dict[str, dict[str, float]] = {}
        per_kind: dict[str, dict[str, dict[str, float]]] = {}
        per_defect: dict[str, dict[str, dict[str, float]]] = {}
        for c in categories:
            arrays = scorer.score_features(test_feats[c]).numpy()
            maps = {"anomaly": arrays["maps"], "high": arrays["high_maps"], "low": arrays["low_maps"]}
            per_cat[c] = {k: _auroc(masks[c], m) for k, m in maps.items()}
            good = np.array([s.label == 0 for s in by_cat[c]])
            for kind in ("structural", "semantic"):
                keep = good | np.array([DEFECT_KINDS.get(s.defect) == kind for s in by_cat[c]])
                if keep.sum() > good.sum():
                    per_kind.setdefault(kind, {})[c] = {
                        k: _auroc(masks[c][keep], None if m is None else m[keep]) for k, m in maps.items()
                    }
            for defect in sorted({s.defect for s in by_cat[c]} - {"good"}):
                keep = good | np.array([s.defect == defect for s in by_cat[c]])
                per_defect.setdefault(defect, {})[c] = {
                    k: _auroc(masks[c][keep], None if m is None else m[keep]) for k, m in maps.items()
                }
        results[name] = {"config": fields, "train_wall_s": round(wall, 1), "fusion_mix": list(model.mix),
                         "score_mix": list(model.score_mix),
                         "per_category": per_cat, "per_kind": per_kind, "per_defect": per_defect}
        print(f"[{name}] trained + scored in {wall:.0f} s; weights of (z_high, z_joint, z_low): anomaly map "
              f"{model.mix}, image score {model.score_mix}", flush=True)

    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    report(results)


def _fmt(vals: dict[str, float]) -> str:
    return "/".join("  -  " if np.isnan(vals[k]) else f"{vals[k]:.3f}" for k in MAPS)


def _mean(rows: dict[str, dict[str, float]]) -> dict[str, float]:
    return {k: float(np.nanmean([r[k] for r in rows.values()])) if rows else float("nan") for k in MAPS}


def report(results: dict[str, dict]) -> None:
    """Print the two tables (also usable on a saved ``--json`` file: ``--report FILE``)."""
    categories = sorted(next(iter(results.values()))["per_category"])
    print("\nPixel AUROC per category (anomaly / high / low map):")
    print(f"{'design':<24}" + "".join(f"{c:>20}" for c in [*categories, "mean"]))
    for name, res in results.items():
        cells = [_fmt(res["per_category"][c]) for c in categories] + [_fmt(_mean(res["per_category"]))]
        print(f"{name:<24}" + "".join(f"{x:>20}" for x in cells))

    print("\nPixel AUROC by defect kind, each kind with the category's normal images, mean over categories")
    print("(anomaly / high / low map); the dashboard's story wants high >= low on structural, low >= high on"
          " semantic,\nthe high map better on structural than on semantic, the low map better on semantic than on structural:")
    print(f"{'design':<24}{'structural':>20}{'semantic':>20}{'hi>lo str':>11}{'lo>hi sem':>11}"
          f"{'hi str>sem':>12}{'lo sem>str':>12}")
    for name, res in results.items():
        st, se = _mean(res["per_kind"].get("structural", {})), _mean(res["per_kind"].get("semantic", {}))
        flags = [st["high"] > st["low"], se["low"] > se["high"], st["high"] > se["high"], se["low"] > st["low"]]
        print(f"{name:<24}{_fmt(st):>20}{_fmt(se):>20}" + "".join(f"{str(f):>11}" for f in flags[:2])
              + "".join(f"{str(f):>12}" for f in flags[2:]))

    print("\nPixel AUROC per defect type, mean over the categories that have it (anomaly / high / low map):")
    defects = sorted({d for res in results.values() for d in res.get("per_defect", {})},
                     key=lambda d: (DEFECT_KINDS.get(d, ""), d), reverse=True)
    print(f"{'design':<24}" + "".join(f"{d + ' (' + DEFECT_KINDS.get(d, '?')[:3] + ')':>20}" for d in defects))
    for name, res in results.items():
        if "per_defect" in res:
            print(f"{name:<24}" + "".join(f"{_fmt(_mean(res['per_defect'].get(d, {}))):>20}" for d in defects))


if __name__ == "__main__":
    main()
