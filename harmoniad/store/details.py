"""Views of a run's details (per-defect results, intervals, thresholds) as tables and JSON,
and the paired comparison of two stored runs.

Why apart from :mod:`.runs`: these only read what :class:`~harmoniad.store.ResultStore`
returns and reshape it for people (tables, ``runs show --json``); nothing here writes.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from harmoniad.store.schema import RunInfo

if TYPE_CHECKING:
    from harmoniad.store.runs import ResultStore

DEFECT_COLUMNS = ["category", "defect", "n", "n_masked", "image_auroc", "pixel_auroc", "aupro"]
INTERVAL_COLUMNS = ["category", "metric", "estimate", "low", "high", "level", "n_resamples"]
POINT_COLUMNS = ["tp", "fp", "tn", "fn", "precision", "recall", "fpr"]
THRESHOLD_COLUMNS = ["category", "rule", "label", "value", "target_fpr", "n_normals", *POINT_COLUMNS]
#: How each threshold rule is labelled wherever it is shown.
RULE_LABELS = {
    "fpr": "held-out normals, target FPR",
    "max": "held-out normals, max",
    "oracle": "oracle (uses test labels)",
}
#: Store metric column -> the name ``runs show --json`` uses.
JSON_METRICS = {
    "image_auroc": "image_auroc", "image_ap": "image_ap", "image_f1_max": "image_f1_max",
    "pixel_auroc": "pixel_auroc", "pixel_ap": "pixel_ap", "pixel_f1_max": "pixel_f1_max",
    "pixel_aupro": "aupro",
}


def _ordered(info: RunInfo, details: dict[str, dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    return [(c, details[c]) for c in info.categories if c in details]


def defects_frame(info: RunInfo, details: dict[str, dict[str, Any]]) -> pd.DataFrame:
    rows = [{"category": c, **{k: d.get(k) for k in DEFECT_COLUMNS[1:]}}
            for c, det in _ordered(info, details) for d in det.get("defects", [])]
    df = pd.DataFrame(rows, columns=DEFECT_COLUMNS)
    return df.astype({"n": "int64", "n_masked": "int64", "image_auroc": "float64",
                      "pixel_auroc": "float64", "aupro": "float64"})


def intervals_frame(info: RunInfo, metrics: pd.DataFrame, details: dict[str, dict[str, Any]],
                    run_details: dict[str, Any]) -> pd.DataFrame:
    rows = []
    by_category = metrics.set_index("category") if len(metrics) else None
    for category, det in _ordered(info, details):
        iv = det.get("intervals") or {}
        for metric in ("image_auroc", "pixel_auroc", "pixel_aupro"):
            if metric in iv:
                rows.append({"category": category, "metric": metric,
                             "estimate": float(by_category.loc[category, metric]),
                             "low": iv[metric][0], "high": iv[metric][1],
                             "level": iv.get("level"), "n_resamples": iv.get("n_resamples")})
    for metric, mean in (run_details.get("mean_intervals") or {}).items():
        rows.append({"category": "mean", "metric": metric, "estimate": mean["estimate"],
                     "low": mean["interval"][0], "high": mean["interval"][1],
                     "level": run_details.get("interval_level"), "n_resamples": run_details.get("n_resamples")})
    return pd.DataFrame(rows, columns=INTERVAL_COLUMNS)


def thresholds_frame(info: RunInfo, details: dict[str, dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for category, det in _ordered(info, details):
        for rule, th in (det.get("thresholds") or {}).items():
            rows.append({"category": category, "rule": rule, "label": RULE_LABELS.get(rule, rule),
                         "value": th.get("value"), "target_fpr": th.get("target_fpr"),
                         "n_normals": th.get("n_normals"), **{k: th["test"].get(k) for k in POINT_COLUMNS}})
    return pd.DataFrame(rows, columns=THRESHOLD_COLUMNS)


def _num(value: Any) -> float | None:
    if value is None or pd.isna(value):
        return None
    return float(value)


def _reason(error: Any) -> str | None:
    """The one-line reason of an error (its first non-empty line)."""
    if error is None or (isinstance(error, float) and math.isnan(error)):
        return None
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else None


def run_json(store: ResultStore, run_id: str) -> dict[str, Any]:
    """``runs show --json``: one JSON-safe object (documented in the README)."""
    info = store.get_run(run_id)
    metrics = store.load_metrics(run_id)
    details = store.load_details(run_id)
    run_details = store.load_run_details(run_id)
    skipped = store.load_skipped(run_id)
    results = []
    for _, row in metrics.iterrows():
        det = details.get(row["category"], {})
        iv = det.get("intervals") or {}
        values: dict[str, Any] = {JSON_METRICS[k]: _num(row[k]) for k in JSON_METRICS}
        values["image_auroc_ci"] = iv.get("image_auroc")
        values["pixel_auroc_ci"] = iv.get("pixel_auroc")
        values["aupro_ci"] = iv.get("pixel_aupro")
        results.append({
            "method": info.method,
            "category": row["category"],
            "status": row["status"],
            "reason": _reason(row["error"]),
            "n_images": None if pd.isna(row["n_images"]) else int(row["n_images"]),
            "n_masked": det.get("n_masked"),
            "n_skipped": int(((skipped["split"] == "test") & (skipped["category"] == row["category"])).sum()),
            "metrics": values,
            "defects": [{k: d.get(k) for k in DEFECT_COLUMNS[1:]} for d in det.get("defects", [])],
            "thresholds": det.get("thresholds") or {},
        })
    # Categories never recorded: failed with the run's reason (e.g. its fit failed), or pending.
    recorded = set(metrics["category"])
    for category in info.categories:
        if category not in recorded:
            results.append({
                "method": info.method, "category": category,
                "status": "failed" if info.status == "failed" else "pending",
                "reason": _reason(info.error) if info.status == "failed" else None,
                "n_images": None, "n_masked": None, "n_skipped": 0,
                "metrics": {**{v: None for v in JSON_METRICS.values()},
                            "image_auroc_ci": None, "pixel_auroc_ci": None, "aupro_ci": None},
                "defects": [], "thresholds": {},
            })
    order = {c: i for i, c in enumerate(info.categories)}
    results.sort(key=lambda r: order.get(r["category"], len(order)))
    ok = metrics[metrics["status"] == "ok"]
    mean: dict[str, Any] = {JSON_METRICS[k]: _num(ok[k].mean()) if len(ok) else None for k in JSON_METRICS}
    for metric, m in (run_details.get("mean_intervals") or {}).items():
        mean[f"{JSON_METRICS[metric]}_ci"] = m["interval"]
    return {
        "run_id": info.id,
        "status": info.status,
        "error": _reason(info.error),
        "method": info.method,
        "dataset": info.dataset,
        "root": info.root,
        "created": info.created,
        "finished": info.finished,
        "skipped": [{"path": r["path"], "reason": r["reason"], "split": r["split"], "category": r["category"]}
                    for r in skipped.to_dict("records")],
        "results": results,
        "mean": mean,
        "settings": {k: run_details[k] for k in ("n_resamples", "interval_level", "target_fpr",
                                                  "threshold_holdout", "seed") if k in run_details},
        "fitted": run_details.get("fitted") or {},
    }


def paired_test(store: ResultStore, run_a: str, run_b: str, *, pixel: bool, n_resamples: int,
                seed: int) -> pd.DataFrame:
    """Per category shared by both runs: DeLong on image scores (matched by image path) and,
    with ``pixel``, a paired bootstrap of pixel AUROC and AUPRO on the stored maps."""
    from harmoniad import stats
    from harmoniad.analysis import category_seed

    a, b = store.load_images(run_a), store.load_images(run_b)
    keys = ["category", "image_path"]
    both = a.merge(b[[*keys, "score", "index"]], on=keys, suffixes=("_a", "_b"))
    rows = []
    for category, part in both.groupby("category", sort=False):
        labels = part["label"].to_numpy()
        row: dict[str, Any] = {"category": category, "n_images": len(part)}
        if 0 < labels.sum() < len(labels):
            d = stats.delong_test(labels, part["score_a"].to_numpy(), part["score_b"].to_numpy())
            row.update(image_auroc_a=d.auroc_a, image_auroc_b=d.auroc_b, image_auroc_diff=d.difference,
                       delong_z=d.z, delong_p=d.p_value)
        if pixel:
            usable = part[(part["label"] == 0) | part["mask_path"].notna()]
            maps_a = [store.load_maps(run_a, int(i)) for i in usable["index_a"]]
            maps_b = [store.load_maps(run_b, int(i)) for i in usable["index_b"]]
            masks = np.stack([m["mask"] for m in maps_a])
            if masks.any() and not masks.all():
                ha = stats.pixel_histograms(masks, np.stack([m["anomaly"] for m in maps_a]))
                hb = stats.pixel_histograms(masks, np.stack([m["anomaly"] for m in maps_b]))
                rng_seed = category_seed(seed, str(category))
                for name, res in stats.paired_pixel_bootstrap(ha, hb, n_resamples, np.random.default_rng(rng_seed)).items():
                    row.update({f"{name}_diff": res.difference, f"{name}_diff_low": res.low,
                                f"{name}_diff_high": res.high, f"{name}_p": res.p_value})
        rows.append(row)
    return pd.DataFrame(rows)


def _same_but_seed(requests: list[dict[str, Any] | None]) -> bool:
    stripped = [{k: v for k, v in (r or {}).items() if k != "seed"} for r in requests]
    return all(r == stripped[0] for r in stripped)


def seed_summary(store: ResultStore, run_ids: list[str]) -> pd.DataFrame:
    """Mean ± sd over runs that differ only in their seed, per category and for the mean
    over categories: columns ``category, metric, mean, sd, n``."""
    from harmoniad import stats
    from harmoniad.store.schema import METRIC_COLUMNS

    infos = [store.get_run(r) for r in run_ids]
    if len(infos) < 2 or not _same_but_seed([i.request for i in infos]) \
            or len({(i.method, i.dataset) for i in infos}) != 1:
        raise ValueError(f"runs {run_ids} must be at least two runs of one method and dataset whose "
                         "requests differ only in the seed")
    tables = [store.load_metrics(r) for r in run_ids]
    rows = []
    categories = list(dict.fromkeys(c for t in tables for c in t["category"]))
    for category in [*categories, "mean"]:
        for metric in METRIC_COLUMNS:
            values = []
            for t in tables:
                ok = t[t["status"] == "ok"]
                values.append(ok[metric].mean() if category == "mean"
                              else next(iter(ok.loc[ok["category"] == category, metric]), float("nan")))
            try:
                mean, sd, n = stats.mean_sd(values)
            except ValueError:
                continue
            rows.append({"category": category, "metric": metric, "mean": mean, "sd": sd, "n": n})
    return pd.DataFrame(rows, columns=["category", "metric", "mean", "sd", "n"])


def friedman(store: ResultStore, run_ids: list[str], metric: str = "image_auroc",
             alpha: float = 0.05) -> dict[str, Any]:
    """Friedman test over the categories the runs share (one run per method, three or
    more), with average ranks and Nemenyi's critical difference (for a CD diagram)."""
    from harmoniad import stats

    infos = [store.get_run(r) for r in run_ids]
    labels = [f"{i.method} ({i.id})" for i in infos]
    tables = [store.load_metrics(r).set_index("category") for r in run_ids]
    categories = [c for c in tables[0].index if all(c in t.index for t in tables)]
    scores = np.array([[t.loc[c, metric] if t.loc[c, "status"] == "ok" else np.nan for t in tables]
                       for c in categories], dtype=float)
    result = stats.friedman_nemenyi(scores, alpha=alpha)
    return {"methods": labels, "metric": metric, "statistic": result.statistic, "p_value": result.p_value,
            "average_ranks": dict(zip(labels, result.average_ranks.tolist())),
            "critical_difference": result.critical_difference, "n_categories": result.n_datasets,
            "cliques": [[labels[i] for i in c] for c in result.cliques]}
