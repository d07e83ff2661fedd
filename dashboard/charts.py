"""Figures and small tables for the analysis pages, built from store data only.

Pure functions (no Streamlit), so each plot and number the Compare, Inspect and Failure
pages show can be unit-tested. Metrics arrive as fractions (the store's unit) and are
shown in percent; curves and histograms come from the per-image table (scores and labels),
never from the maps, so they stay fast on large runs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from harmoniad.methods import METHODS
from harmoniad.metrics import MetricError, image_curves
from harmoniad.store import METRIC_COLUMNS

#: Human names of the store's metric columns.
METRIC_LABELS: dict[str, str] = {
    "image_auroc": "Image AUROC",
    "image_ap": "Image AP",
    "image_f1_max": "Image F1-max",
    "pixel_auroc": "Pixel AUROC",
    "pixel_ap": "Pixel AP",
    "pixel_f1_max": "Pixel F1-max",
    "pixel_aupro": "Pixel AUPRO",
}
#: One line per metric, shown as a caption under the plots that use it.
METRIC_HELP: dict[str, str] = {
    "image_auroc": "Image AUROC: chance that a defective image scores above a normal one (50% = guessing).",
    "image_ap": "Image AP: average precision of flagging defective images, ranked by score.",
    "image_f1_max": "Image F1-max: the best F1 over all image-score thresholds.",
    "pixel_auroc": "Pixel AUROC: chance that a defective pixel scores above a normal pixel.",
    "pixel_ap": "Pixel AP: average precision over all pixels; hard when defects are small.",
    "pixel_f1_max": "Pixel F1-max: the best pixel F1 over all map thresholds.",
    "pixel_aupro": "Pixel AUPRO: mean overlap with each defect region, up to 30% false-positive rate.",
}
MEAN_LABEL = "mean"
POSITIVE_COLOUR = "#2e7d32"
NEGATIVE_COLOUR = "#c62828"
NORMAL_COLOUR = "#1f77b4"
DEFECTIVE_COLOUR = "#d62728"
#: One colour per method everywhere (HarmoniAD and its ablations in blues and purples).
METHOD_COLOURS: dict[str, str] = {
    "harmoniad": "#1f4e9c",
    "harmoniad_nosplit": "#7b9fd9",
    "harmoniad_high": "#1a9ba8",
    "harmoniad_low": "#8e6cc0",
    "patchcore": "#e8793a",
    "patchcore_multiclass": "#c9a227",
    "winclip": "#4c9a4c",
    "freqfilter": "#b5485d",
}
_SPARE_COLOURS = ("#6d4c41", "#546e7a", "#ad1457", "#00838f", "#9e9d24")


def method_label(method: str) -> str:
    """The registry's human label of a method (the raw name for unregistered ones)."""
    spec = METHODS.get(method)
    return spec.label if spec is not None else method


def method_kind(method: str) -> str:
    """``harmoniad``, ``ablation`` or ``baseline`` (``baseline`` for unregistered methods)."""
    spec = METHODS.get(method)
    return spec.kind if spec is not None else "baseline"


# ----------------------------------------------------------------------------- run choice


def latest_runs(runs: pd.DataFrame, dataset: str | None = None, methods: Sequence[str] | None = None) -> list[str]:
    """Ids of the newest complete run of each method (on ``dataset``), in registry order.

    ``runs`` is ``ResultStore.list_runs()`` (newest first). Registry order puts HarmoniAD
    first, then its ablations, then the baselines, so legends read the same everywhere.
    """
    if runs.empty:
        return []
    pick = runs[runs["status"] == "complete"]
    if dataset is not None:
        pick = pick[pick["dataset"] == dataset]
    if methods is not None:
        pick = pick[pick["method"].isin(list(methods))]
    newest = pick.sort_values("created", ascending=False, kind="stable").drop_duplicates("method")
    order = {name: i for i, name in enumerate(METHODS)}
    newest = newest.assign(_o=[order.get(m, len(order)) for m in newest["method"]])
    return list(newest.sort_values(["_o", "method"], kind="stable")["id"])


def series_colours(runs: pd.DataFrame) -> dict[str, str]:
    """Legend label (as :func:`series_labels`) -> colour of its method, so charts agree."""
    labels = series_labels(runs)
    spare = iter(_SPARE_COLOURS * (1 + len(runs) // len(_SPARE_COLOURS)))
    colours: dict[str, str] = {}
    by_method: dict[str, str] = {}
    for run_id, method in zip(runs["id"], runs["method"]):
        method = str(method)
        if method not in by_method:
            by_method[method] = METHOD_COLOURS.get(method) or next(spare)
        colours[labels[str(run_id)]] = by_method[method]
    return colours


def short_path(path: str) -> str:
    """``<folder>/<file>`` of an image path: MVTec-style trees repeat file names per defect folder."""
    parts = Path(str(path)).parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else str(path)


def series_labels(runs: pd.DataFrame) -> dict[str, str]:
    """Run id -> legend label: the method's label, plus the start time when a method repeats."""
    counts = runs["method"].value_counts()
    labels = {}
    for _, row in runs.iterrows():
        label = method_label(str(row["method"]))
        if counts[row["method"]] > 1:
            label += f" ({str(row['created'])[:16].replace('T', ' ')})"
        labels[str(row["id"])] = label
    return labels


# ----------------------------------------------------------------------------- metrics


def comparison_table(metrics: Mapping[str, pd.DataFrame], labels: Mapping[str, str]) -> pd.DataFrame:
    """Per-category metrics of several runs as one long table, in percent.

    ``metrics`` maps run id -> ``ResultStore.load_metrics``; the result has columns
    ``run_id``, ``series`` (legend label), ``category``, ``status`` and the metric columns
    (percent; NaN where undefined or failed), plus one ``mean`` row per run over its ``ok``
    categories.
    """
    parts = []
    for run_id, frame in metrics.items():
        if frame.empty:
            continue
        part = frame[["category", "status", *METRIC_COLUMNS]].copy()
        part[list(METRIC_COLUMNS)] = part[list(METRIC_COLUMNS)] * 100.0
        ok = part[part["status"] == "ok"]
        mean = {"category": MEAN_LABEL, "status": "mean", **{m: ok[m].mean() for m in METRIC_COLUMNS}}
        part = pd.concat([part, pd.DataFrame([mean])], ignore_index=True)
        part.insert(0, "series", labels.get(run_id, run_id))
        part.insert(0, "run_id", run_id)
        parts.append(part)
    columns = ["run_id", "series", "category", "status", *METRIC_COLUMNS]
    if not parts:
        return pd.DataFrame(columns=columns)
    return pd.concat(parts, ignore_index=True)[columns]


def category_bars(
    table: pd.DataFrame, metric: str, *, title: str | None = None, colours: Mapping[str, str] | None = None
) -> go.Figure:
    """Grouped bars: one group per category (and the mean), one bar per series, in percent."""
    _check_metric(metric)
    fig = go.Figure()
    categories = list(dict.fromkeys(c for c in table["category"] if c != MEAN_LABEL)) + [MEAN_LABEL]
    for series, part in table.groupby("series", sort=False):
        values = part.set_index("category")[metric].reindex(categories)
        fig.add_bar(
            name=str(series),
            marker_color=(colours or {}).get(str(series)),
            x=categories,
            y=values.to_numpy(dtype=float),
            text=[("" if np.isnan(v) else f"{v:.1f}") for v in values.to_numpy(dtype=float)],
            textposition="outside",
            hovertemplate="%{x}: %{y:.2f}%<extra>" + str(series) + "</extra>",
        )
    fig.update_layout(
        barmode="group",
        title=title or f"{METRIC_LABELS[metric]} per category",
        yaxis=dict(title=f"{METRIC_LABELS[metric]} (%)", range=[0, 105]),
        xaxis=dict(title="category"),
        legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0),
        margin=dict(t=80, b=40, l=50, r=10),
        uniformtext=dict(minsize=8, mode="hide"),
    )
    return fig


def _wide(table: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """Categories (rows, first-seen order, without the mean) x (metric, run id) columns."""
    rows = table[table["category"] != MEAN_LABEL]
    order = list(dict.fromkeys(rows["category"]))
    wide = rows.pivot(index="category", columns="run_id", values=list(metrics))
    return wide.reindex(order)


def difference_table(table: pd.DataFrame, metric: str, target: str, baseline: str) -> pd.DataFrame:
    """``target - baseline`` per category (and the mean) in percentage points.

    ``table`` is :func:`comparison_table`; ``target`` and ``baseline`` are run ids.
    Positive means the target (HarmoniAD) is better: every metric here is higher-is-better.
    Categories missing from either run, or undefined in either, are NaN; the mean is over
    the categories both runs have (not a difference of the two means).
    """
    _check_metric(metric)
    wide = _wide(table[table["run_id"].isin([target, baseline])], [metric])[metric]
    a = wide[target] if target in wide else pd.Series(np.nan, index=wide.index)
    b = wide[baseline] if baseline in wide else pd.Series(np.nan, index=wide.index)
    diff = (a - b).to_numpy(dtype=float)
    mean = float(np.nanmean(diff)) if np.isfinite(diff).any() else float("nan")
    return pd.DataFrame({
        "category": [*wide.index, MEAN_LABEL],
        "target": [*a.to_numpy(dtype=float), float(np.nanmean(a)) if a.notna().any() else np.nan],
        "baseline": [*b.to_numpy(dtype=float), float(np.nanmean(b)) if b.notna().any() else np.nan],
        "difference": [*diff, mean],
    })


def difference_bars(diff: pd.DataFrame, metric: str, target_label: str, baseline_label: str) -> go.Figure:
    """Bars of :func:`difference_table`: green where the target is better, red where worse."""
    values = diff["difference"].to_numpy(dtype=float)
    colours = [POSITIVE_COLOUR if v > 0 else NEGATIVE_COLOUR if v < 0 else "#9e9e9e" for v in np.nan_to_num(values)]
    fig = go.Figure(
        go.Bar(
            x=diff["category"],
            y=values,
            marker_color=colours,
            marker_pattern_shape=["/" if c == MEAN_LABEL else "" for c in diff["category"]],
            text=[("n/a" if np.isnan(v) else f"{v:+.1f}") for v in values],
            textposition="outside",
            hovertemplate="%{x}: %{y:+.2f} points<extra></extra>",
        )
    )
    fig.add_hline(y=0, line_color="#616161", line_width=1)
    fig.update_layout(
        title=f"{target_label} minus {baseline_label}: {METRIC_LABELS[metric]}",
        yaxis=dict(title="difference (percentage points)", zeroline=True),
        xaxis=dict(title="category"),
        margin=dict(t=60, b=40, l=50, r=10),
        showlegend=False,
    )
    return fig


def mean_differences(table: pd.DataFrame, target: str, baselines: Mapping[str, str]) -> pd.DataFrame:
    """Mean over shared categories of ``target - baseline`` for every metric (rows: baselines)."""
    columns = [METRIC_LABELS[m] for m in METRIC_COLUMNS]
    wide = _wide(table, METRIC_COLUMNS)
    rows = {}
    for run_id, label in baselines.items():
        values = []
        for metric in METRIC_COLUMNS:
            if (metric, target) in wide and (metric, run_id) in wide:
                diff = (wide[(metric, target)] - wide[(metric, run_id)]).to_numpy(dtype=float)
                values.append(float(np.nanmean(diff)) if np.isfinite(diff).any() else float("nan"))
            else:
                values.append(float("nan"))
        rows[label] = values
    return pd.DataFrame.from_dict(rows, orient="index", columns=columns)


# ----------------------------------------------------------------------------- curves


def curve_figures(
    series: Mapping[str, pd.DataFrame], colours: Mapping[str, str] | None = None
) -> tuple[go.Figure, go.Figure, dict[str, str]]:
    """Image-level ROC and precision-recall figures, one trace per series.

    ``series`` maps a legend label to that run's per-image rows of one category (``label``,
    ``score``). Returns the two figures and, per series that could not be drawn, why (a
    category with only normal or only defective images has no curve).
    """
    roc, pr = go.Figure(), go.Figure()
    skipped: dict[str, str] = {}
    for label, rows in series.items():
        try:
            c = image_curves(rows["label"].to_numpy(), rows["score"].to_numpy())
        except MetricError as exc:
            skipped[label] = str(exc)
            continue
        auc = float(np.trapezoid(c["tpr"], c["fpr"]))
        line = dict(color=(colours or {}).get(label), width=2)
        roc.add_scatter(x=c["fpr"], y=c["tpr"], mode="lines", name=f"{label} ({auc * 100:.1f})", line=line,
                        hovertemplate="FPR %{x:.3f}, TPR %{y:.3f}<extra>" + label + "</extra>")
        pr.add_scatter(x=c["recall"], y=c["precision"], mode="lines", name=label, line=dict(line, shape="hv"),
                       hovertemplate="recall %{x:.3f}, precision %{y:.3f}<extra>" + label + "</extra>")
    roc.add_scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance", line=dict(dash="dot", color="#9e9e9e"))
    roc.update_layout(title="ROC (image level; AUROC in brackets)",
                      xaxis=dict(title="false-positive rate", range=[0, 1]),
                      yaxis=dict(title="true-positive rate", range=[0, 1.02]), margin=dict(t=50, b=40, l=50, r=10),
                      legend=dict(yanchor="bottom", y=0.02, xanchor="right", x=0.98))
    pr.update_layout(title="Precision-recall (image level)", xaxis=dict(title="recall", range=[0, 1]),
                     yaxis=dict(title="precision", range=[0, 1.02]), margin=dict(t=50, b=40, l=50, r=10),
                     legend=dict(yanchor="bottom", y=0.02, xanchor="left", x=0.02))
    return roc, pr, skipped


def f1_max_threshold(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    """The score threshold (flag when ``score >= t``) with the best F1; None without both classes.

    Ties on F1 go to the highest threshold (fewest flagged images). It works for pixels too:
    pass flattened masks and maps.
    """
    try:
        c = image_curves(np.asarray(labels), np.asarray(scores))
    except MetricError:
        return None
    best = int(np.argmax(c["f1"]))  # first maximum = highest threshold; never 0 (nothing flagged, F1 0)
    return float(c["thresholds"][best])


# ----------------------------------------------------------------------------- one image


def score_histogram(
    scores: np.ndarray, labels: np.ndarray, *, marked: float | None = None, threshold: float | None = None,
    marked_label: str = "this image", bins: int = 40, title: str | None = None,
) -> go.Figure:
    """Overlaid histograms of normal and defective image scores, the image's score marked."""
    scores = np.asarray(scores, dtype=float)
    labels = np.asarray(labels).astype(bool)
    lo, hi = (float(scores.min()), float(scores.max())) if scores.size else (0.0, 1.0)
    size = (hi - lo) / bins if hi > lo else 1.0
    xbins = dict(start=lo, end=hi + size * 1e-6, size=size)
    fig = go.Figure()
    fig.add_histogram(x=scores[~labels], name=f"normal ({int((~labels).sum())})", marker_color=NORMAL_COLOUR,
                      opacity=0.6, xbins=xbins)
    fig.add_histogram(x=scores[labels], name=f"defective ({int(labels.sum())})", marker_color=DEFECTIVE_COLOUR,
                      opacity=0.6, xbins=xbins)
    if threshold is not None:
        fig.add_vline(x=threshold, line_dash="dash", line_color="#616161",
                      annotation_text="F1-max threshold", annotation_position="bottom left")
    if marked is not None:
        fig.add_vline(x=marked, line_width=3, line_color="#000000",
                      annotation_text=marked_label, annotation_position="top right")
    fig.update_layout(barmode="overlay", title=title, xaxis=dict(title="image score"),
                      yaxis=dict(title="images"), margin=dict(t=60, b=40, l=50, r=10),
                      legend=dict(orientation="h", yanchor="bottom", y=1.02, x=0))
    return fig


def confusion_counts(mask: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Pixel TP/FP/FN/TN of a predicted mask against the ground truth, with IoU, precision, recall.

    IoU, precision and recall are NaN when undefined (e.g. IoU with an empty union).
    """
    mask = np.asarray(mask, dtype=bool)
    predicted = np.asarray(predicted, dtype=bool)
    if mask.shape != predicted.shape:
        raise ValueError(f"mask shape {mask.shape} differs from predicted mask shape {predicted.shape}")
    tp = int(np.count_nonzero(mask & predicted))
    fp = int(np.count_nonzero(~mask & predicted))
    fn = int(np.count_nonzero(mask & ~predicted))
    tn = int(mask.size - tp - fp - fn)

    def ratio(a: int, b: int) -> float:
        return a / b if b else float("nan")

    return {"tp": tp, "fp": fp, "fn": fn, "tn": tn, "iou": ratio(tp, tp + fp + fn),
            "precision": ratio(tp, tp + fp), "recall": ratio(tp, tp + fn)}


def map_range(maps: Sequence[np.ndarray]) -> tuple[float, float]:
    """Finite min and max over several maps (for a threshold slider); (0, 1) if none is finite."""
    finite = [m[np.isfinite(m)] for m in maps]
    finite = [f for f in finite if f.size]
    if not finite:
        return 0.0, 1.0
    lo = float(min(f.min() for f in finite))
    hi = float(max(f.max() for f in finite))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def draw_outline(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (0, 255, 0)) -> np.ndarray:
    """A copy of ``image`` (H x W x 3 uint8) with the boundary of ``mask`` painted in ``colour``.

    The outline is two pixels wide so it stays visible when a small map is shown enlarged.
    """
    from harmoniad.visualize import mask_outline

    mask = np.asarray(mask, dtype=bool)
    if mask.shape != image.shape[:2]:
        raise ValueError(f"mask shape {mask.shape} differs from image size {image.shape[:2]}")
    edge = mask_outline(mask)
    thick = edge.copy()
    thick[1:, :] |= edge[:-1, :]
    thick[:, 1:] |= edge[:, :-1]
    thick &= mask  # keep it inside the region so the region's size reads right
    out = image.copy()
    out[thick] = colour
    return out


def fit_image(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` resized (bilinear) to ``size x size``: the maps' resolution, or a thumbnail."""
    from PIL import Image

    if image.shape[:2] == (size, size):
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR), dtype=np.uint8)


def fit_map(values: np.ndarray, size: int) -> np.ndarray:
    """A 2-D float map resized (bilinear) to ``size x size``, e.g. for a thumbnail overlay."""
    from PIL import Image

    values = np.asarray(values, dtype=np.float32)
    if values.shape == (size, size):
        return values
    return np.asarray(Image.fromarray(values, mode="F").resize((size, size), Image.BILINEAR), dtype=np.float32)


def paint_mask(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = (255, 0, 0),
               alpha: float = 0.45) -> np.ndarray:
    """``image`` with ``mask`` filled in ``colour`` at opacity ``alpha`` (for predicted masks)."""
    mask = np.asarray(mask, dtype=bool)
    out = image.astype(np.float32)
    out[mask] = out[mask] * (1.0 - alpha) + np.asarray(colour, dtype=np.float32) * alpha
    return out.round().astype(np.uint8)


# ----------------------------------------------------------------------------- failure cases


def failure_cases(images: pd.DataFrame, k: int, threshold: float | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ``k`` highest-scoring normal images and the ``k`` lowest-scoring defective ones.

    ``images`` holds one category's per-image rows. Each result has a 1-based ``rank`` and,
    given the image-level ``threshold``, ``failed``: whether the image is misclassified at it
    (a normal image at or above it is a false alarm; a defective one below it is a miss).
    """
    normal = images[images["label"] == 0].sort_values(["score", "index"], ascending=[False, True], kind="stable")
    defective = images[images["label"] == 1].sort_values(["score", "index"], ascending=[True, True], kind="stable")
    alarms = normal.head(k).copy()
    misses = defective.head(k).copy()
    alarms.insert(0, "rank", np.arange(1, len(alarms) + 1))
    misses.insert(0, "rank", np.arange(1, len(misses) + 1))
    if threshold is not None:
        alarms["failed"] = alarms["score"] >= threshold
        misses["failed"] = misses["score"] < threshold
    else:
        alarms["failed"] = pd.Series(pd.NA, index=alarms.index, dtype="boolean")
        misses["failed"] = pd.Series(pd.NA, index=misses.index, dtype="boolean")
    return alarms.reset_index(drop=True), misses.reset_index(drop=True)


def _check_metric(metric: str) -> None:
    if metric not in METRIC_LABELS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {list(METRIC_LABELS)}")
