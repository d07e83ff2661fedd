"""Figures and small tables for the dashboard pages and the HTML report, built from store data only.

Pure functions (no Streamlit), so each plot and number the pages and the report show can be
unit-tested; figures need plotly (the ``dashboard`` extra). Metrics arrive as fractions (the store's unit) and are
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
    # Runs of one method started in the same minute: the run id tells them apart (labels key
    # tables and legends, so two equal labels would merge or drop a run).
    repeated = pd.Series(labels).duplicated(keep=False)
    return {run: f"{label} [{run[:8]}]" if repeated[run] else label for run, label in labels.items()}


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
        yaxis=dict(title=f"{METRIC_LABELS[metric]} (%)", range=[0, 112]),
        xaxis=dict(title="category"),
        uniformtext=dict(minsize=9, mode="hide"),
    )
    return tidy(fig, title=title or f"{METRIC_LABELS[metric]} per category")


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
        yaxis=dict(title="difference (percentage points)", zeroline=True),
        xaxis=dict(title="category"),
        uniformtext=dict(minsize=9, mode="hide"),
    )
    return tidy(fig, title=f"{target_label} minus {baseline_label}: {METRIC_LABELS[metric]}", legend=False)


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
    roc.update_layout(xaxis=dict(title="false-positive rate", range=[0, 1]),
                      yaxis=dict(title="true-positive rate", range=[0, 1.02]))
    pr.update_layout(xaxis=dict(title="recall", range=[0, 1]), yaxis=dict(title="precision", range=[0, 1.02]))
    return (tidy(roc, title="Image ROC (image AUROC in brackets)"), tidy(pr, title="Image precision-recall"),
            skipped)


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
    threshold_label: str = "F1-max threshold",
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
                      annotation_text=threshold_label, annotation_position="bottom left")
    if marked is not None:
        fig.add_vline(x=marked, line_width=3, line_color="#000000",
                      annotation_text=marked_label, annotation_position="top right")
    fig.update_layout(barmode="overlay", xaxis=dict(title="image score"), yaxis=dict(title="images"))
    return tidy(fig, title=title or "Image scores of this category", height=380)


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


#: Ground truth is drawn as a cyan line everywhere (distinct from the inferno map colours and the red fill).
OUTLINE_RGB = (0, 229, 255)


def draw_outline(image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int] = OUTLINE_RGB) -> np.ndarray:
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


# ----------------------------------------------------------------------------- failures at a threshold


def misclassified(images: pd.DataFrame, threshold: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """False positives and false negatives of one category at ``threshold``, most wrong first.

    ``images`` holds per-image rows (``index``, ``label``, ``score``). An image is flagged when
    ``score > threshold`` (:func:`harmoniad.thresholds.decide`). False positives are normal
    images flagged, false negatives defective images not flagged; each gets ``margin``, how far
    its score is on the wrong side of the threshold, and both lists are sorted by it
    (largest first, ties by index) with a 1-based ``rank``.
    """
    from harmoniad.thresholds import decide

    flagged = decide(images["score"].to_numpy(dtype=float), threshold)
    labels = images["label"].to_numpy()
    margin = np.abs(images["score"].to_numpy(dtype=float) - threshold)
    out = []
    for wrong in ((labels == 0) & flagged, (labels == 1) & ~flagged):
        part = images[wrong].assign(margin=margin[wrong])
        part = part.sort_values(["margin", "index"], ascending=[False, True], kind="stable").reset_index(drop=True)
        part.insert(0, "rank", np.arange(1, len(part) + 1))
        out.append(part)
    return out[0], out[1]


def _check_metric(metric: str) -> None:
    if metric not in METRIC_LABELS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {list(METRIC_LABELS)}")


# ----------------------------------------------------------------------------- maps side by side

#: Plotly's name of the colour scale the maps use everywhere (as ``harmoniad.visualize``).
MAP_COLOURSCALE = "Inferno"
CONTOUR_COLOUR = "#00e5ff"  # cyan: distinct from every inferno colour
MAP_HEIGHT = 470


QUANTILES = 1001


def score_quantiles(maps: Sequence[np.ndarray]) -> np.ndarray:
    """``QUANTILES`` evenly spaced quantiles of all finite pixel scores of ``maps`` (for
    :func:`to_percentiles`)."""
    values = np.concatenate([np.asarray(m, dtype=np.float32).ravel() for m in maps])
    values = values[np.isfinite(values)]
    if not values.size:
        return np.zeros(QUANTILES)
    return np.quantile(values, np.linspace(0.0, 1.0, QUANTILES))


def to_percentiles(values: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """Each score's percentile (0-100) within the distribution ``quantiles`` describes: one
    scale for methods whose scores have different units."""
    levels = np.linspace(0.0, 100.0, len(quantiles))
    # Ties in the quantiles (constant stretches) get their mid level, so equal scores stay equal.
    unique, first = np.unique(quantiles, return_index=True)
    last = len(quantiles) - 1 - np.unique(quantiles[::-1], return_index=True)[1]
    mid = (levels[first] + levels[last]) / 2.0
    if len(unique) == 1:
        return np.where(np.asarray(values) >= unique[0], 100.0, 0.0).astype(np.float32)
    return np.interp(np.asarray(values, dtype=np.float64), unique, mid).astype(np.float32)


def map_figure(values: np.ndarray, *, base: np.ndarray | None, lo: float, hi: float, opacity: float,
               mask: np.ndarray | None, title: str, colourbar_title: str = "score",
               raw: np.ndarray | None = None) -> go.Figure:
    """One anomaly map over its image: heatmap at ``opacity`` on ``[lo, hi]``, the ground truth as
    a contour line, a horizontal colour bar with values; plotly's zoom and pan come with it.

    ``values`` are coloured (raw scores, or percentiles on a shared scale); hovering shows the
    pixel's raw score (``raw`` when given, else ``values``). The colour bar is labelled at five
    evenly spaced values including both ends of ``[lo, hi]``, so the range shown is explicit.
    """
    values = np.asarray(values, dtype=np.float32)
    h, w = values.shape
    fig = go.Figure()
    if base is not None:
        fig.add_trace(go.Image(z=fit_image(base, h) if base.shape[:2] != (h, w) else base, hoverinfo="skip"))
    ticks = np.linspace(lo, hi, 5)
    fig.add_trace(go.Heatmap(
        z=values, zmin=lo, zmax=hi, colorscale=MAP_COLOURSCALE, opacity=opacity if base is not None else 1.0,
        customdata=np.asarray(raw if raw is not None else values, dtype=np.float32),
        hovertemplate="x %{x}, y %{y}: score %{customdata:.4g}<extra></extra>",
        colorbar=dict(orientation="h", thickness=12, len=1.0, x=0.5, xanchor="center", y=-0.02, yanchor="top",
                      title=dict(text=colourbar_title, side="right"), tickvals=ticks,
                      ticktext=[f"{v:.3g}" for v in ticks], tickfont=dict(size=11)),
    ))
    if mask is not None and np.asarray(mask).any():
        fig.add_trace(go.Contour(
            z=np.asarray(mask, dtype=np.float32), showscale=False, hoverinfo="skip", name="ground truth",
            contours=dict(start=0.5, end=0.5, size=1, coloring="none"), line=dict(color=CONTOUR_COLOUR, width=2.5),
        ))
    fig.update_layout(
        title=dict(text=title, x=0, xanchor="left", font=dict(size=14)), height=MAP_HEIGHT,
        margin=dict(t=36, b=64, l=4, r=4), showlegend=False,
        xaxis=dict(visible=False, range=[-0.5, w - 0.5], constrain="domain"),
        yaxis=dict(visible=False, range=[h - 0.5, -0.5], scaleanchor="x", constrain="domain"),
        dragmode="zoom",
    )
    return fig


# ----------------------------------------------------------------------------- layout shared by every chart


def tidy(fig: go.Figure, *, title: str | None = None, height: int = 420, legend: bool = True) -> go.Figure:
    """One layout for every chart: title top-left, legend at the bottom of the figure below the
    axis title (never over the data or the title), margins sized for both, so no text overlaps
    at any window width (the browser tests check the rendered boxes)."""
    named = [t for t in fig.data if getattr(t, "showlegend", None) is not False and getattr(t, "name", None)]
    # Legend entries wrap on narrow charts: room for about two entries per row.
    rows = max(1, -(-len(named) // 2)) if legend else 0
    bottom = 64 + 22 * rows
    fig.update_layout(
        title=dict(text=title if title is not None else fig.layout.title.text, x=0, xanchor="left", xref="container",
                   y=1, yanchor="top", yref="container", pad=dict(t=10, l=8), font=dict(size=15)),
        height=height + (bottom - 64),
        margin=dict(t=48, b=bottom, l=64, r=16),
        showlegend=legend,
        legend=dict(orientation="h", x=0, xanchor="left", y=0, yanchor="bottom", yref="container",
                    font=dict(size=11), entrywidthmode="pixels", entrywidth=0),
    )
    fig.update_xaxes(automargin=True, title_standoff=8)
    fig.update_yaxes(automargin=True)
    return fig


# ----------------------------------------------------------------------------- pixel curves

FPR_LIMIT = 0.3  # AUPRO is integrated up to this false-positive rate (MVTec AD's convention)


def _thin(x: np.ndarray, y: np.ndarray, most: int = 1500) -> tuple[np.ndarray, np.ndarray]:
    """At most ``most`` points of a curve for drawing (every k-th, ends kept); exact curves can
    have a point per pixel score."""
    if len(x) <= most:
        return x, y
    keep = np.unique(np.r_[np.linspace(0, len(x) - 1, most).round().astype(int), len(x) - 1])
    return x[keep], y[keep]


def pixel_curve_figures(
    series: Mapping[str, tuple[np.ndarray, np.ndarray]], colours: Mapping[str, str] | None = None,
    fpr_limit: float = FPR_LIMIT,
) -> tuple[go.Figure, go.Figure, dict[str, str]]:
    """Pixel ROC and PRO figures from stored maps, one trace per series.

    ``series`` maps a legend label to (masks, maps) of one category, ``(N, H, W)`` each. The
    PRO figure is drawn up to a little past ``fpr_limit`` with the limit marked, because AUPRO
    integrates only that far. Returns the figures and, per series that could not be drawn, why.
    """
    from harmoniad.metrics import pixel_curves

    roc, pro = go.Figure(), go.Figure()
    skipped: dict[str, str] = {}
    for label, (masks, maps) in series.items():
        try:
            c = pixel_curves(masks, maps, fpr_limit)
        except MetricError as exc:
            skipped[label] = str(exc)
            continue
        line = dict(color=(colours or {}).get(label), width=2)
        x, y = _thin(c["fpr"], c["tpr"])
        roc.add_scatter(x=x, y=y, mode="lines", name=f"{label} ({c['auroc'] * 100:.1f})", line=line,
                        hovertemplate="FPR %{x:.4f}, TPR %{y:.3f}<extra>" + label + "</extra>")
        aupro = float(c["aupro"])
        inside = c["pro_fpr"] <= fpr_limit * 1.15
        x, y = _thin(c["pro_fpr"][inside], c["pro"][inside])
        pro.add_scatter(x=x, y=y, mode="lines", name=f"{label} ({aupro * 100:.1f})", line=line,
                        hovertemplate="FPR %{x:.4f}, PRO %{y:.3f}<extra>" + label + "</extra>")
    roc.add_scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance", line=dict(dash="dot", color="#9e9e9e"))
    roc.update_layout(xaxis=dict(title="false-positive rate (pixels)", range=[0, 1]),
                      yaxis=dict(title="true-positive rate (pixels)", range=[0, 1.02]))
    tidy(roc, title="Pixel ROC (pixel AUROC in brackets)")
    pro.add_vrect(x0=fpr_limit, x1=fpr_limit * 1.15, fillcolor="#9e9e9e", opacity=0.15, line_width=0)
    pro.add_vline(x=fpr_limit, line_dash="dash", line_color="#424242",
                  annotation_text=f"AUPRO limit, FPR {fpr_limit:g}", annotation_position="top left",
                  annotation_font_size=11)
    pro.update_layout(xaxis=dict(title="false-positive rate (pixels)", range=[0, fpr_limit * 1.15]),
                      yaxis=dict(title="per-region overlap", range=[0, 1.02]))
    tidy(pro, title="PRO curve (AUPRO to the limit in brackets)")
    return roc, pro, skipped


# ----------------------------------------------------------------------------- per defect type


DEFECT_COLUMNS = ["series", "category", "defect", "images", "image AUROC (%)", "pixel AUROC (%)", "AUPRO (%)",
                  "detected", "detected (%)"]


def defect_table(series: Mapping[str, tuple[pd.DataFrame, pd.DataFrame]],
                 thresholds: Mapping[tuple[str, str], float | None] | None = None) -> pd.DataFrame:
    """Results per defect type: one row per (series, category, defect), in percent.

    ``series`` maps a legend label to (``ResultStore.load_defects``, ``load_images``) of a run:
    the metrics are the ones the evaluation stored (that type's images against all normal
    images of the category); given ``thresholds`` ``{(label, category): threshold}``, the
    images of each type flagged (``score > threshold``) are counted from the per-image table.
    """
    from harmoniad.thresholds import decide

    rows = []
    for label, (defects, images) in series.items():
        for _, d in defects.iterrows():
            category, defect = str(d["category"]), str(d["defect"])
            bad = images[(images["category"] == category) & (images["defect"] == defect) & (images["label"] == 1)]
            threshold = (thresholds or {}).get((label, category))
            detected = (None if threshold is None or bad.empty
                        else int(decide(bad["score"].to_numpy(dtype=float), threshold).sum()))
            rows.append({"series": label, "category": category, "defect": defect, "images": int(d["n"]),
                         "image AUROC (%)": d["image_auroc"] * 100.0, "pixel AUROC (%)": d["pixel_auroc"] * 100.0,
                         "AUPRO (%)": d["aupro"] * 100.0, "detected": detected,
                         "detected (%)": np.nan if detected is None else 100.0 * detected / len(bad)})
    return pd.DataFrame(rows, columns=DEFECT_COLUMNS)


def defect_bars(table: pd.DataFrame, value: str = "image AUROC (%)",
                colours: Mapping[str, str] | None = None) -> go.Figure:
    """Horizontal grouped bars per defect type (``category / defect (images)``), one bar per series.

    Horizontal, so long defect names never need rotating or overlap at any width.
    """
    fig = go.Figure()
    keys = list(dict.fromkeys(zip(table["category"], table["defect"])))
    counts = table.drop_duplicates(["category", "defect"]).set_index(["category", "defect"])["images"]
    y = [f"{c} / {d} ({counts[(c, d)]})" for c, d in keys]
    for series, part in table.groupby("series", sort=False):
        values = part.set_index(["category", "defect"])[value].reindex(keys).to_numpy(dtype=float)
        fig.add_bar(name=str(series), y=y, x=values, orientation="h", marker_color=(colours or {}).get(str(series)),
                    hovertemplate="%{y}: %{x:.1f}<extra>" + str(series) + "</extra>")
    n_series = table["series"].nunique()
    fig.update_layout(barmode="group", xaxis=dict(title=value, range=[0, 105]),
                      yaxis=dict(title=None, autorange="reversed"), bargap=0.25)
    return tidy(fig, title=f"{value.replace(' (%)', '')} per defect type (defective images in brackets)",
                height=120 + len(keys) * max(18, 9 * n_series))


# ----------------------------------------------------------------------------- statistics


def interval_bars(intervals: Mapping[str, pd.DataFrame], colours: Mapping[str, str] | None = None,
                  metric: str = "image_auroc") -> go.Figure:
    """Grouped bars of ``metric`` per category (and the mean) with interval error bars, in percent.

    ``intervals`` maps a legend label to :func:`interval_table` (fractions).
    """
    title = f"{METRIC_LABELS.get(metric, metric)} with 95% bootstrap intervals"
    fig = go.Figure()
    categories = list(dict.fromkeys(c for t in intervals.values() for c in t["category"] if c != MEAN_LABEL))
    categories.append(MEAN_LABEL)
    for label, table in intervals.items():
        t = table.set_index("category").reindex(categories) * 100.0
        fig.add_bar(name=label, x=categories, y=t["estimate"], marker_color=(colours or {}).get(label),
                    error_y=dict(type="data", symmetric=False, array=(t["high"] - t["estimate"]).to_numpy(),
                                 arrayminus=(t["estimate"] - t["low"]).to_numpy(), thickness=1.5, width=3),
                    customdata=np.stack([t["low"], t["high"]], axis=1),
                    hovertemplate="%{x}: %{y:.1f} [%{customdata[0]:.1f}, %{customdata[1]:.1f}]<extra>"
                                  + label + "</extra>")
    fig.update_layout(barmode="group", yaxis=dict(title=f"{METRIC_LABELS.get(metric, metric)} (%)", range=[0, 105]),
                      xaxis=dict(title="category"))
    return tidy(fig, title=title)


ALPHA = 0.05  # significance level of the paired tests, matching the 95% intervals
MEAN_CATEGORY = "mean"


def interval_table(intervals: pd.DataFrame, metric: str) -> pd.DataFrame:
    """``category, estimate, low, high`` of one metric from ``ResultStore.load_intervals``."""
    part = intervals[intervals["metric"] == metric]
    return part[["category", "estimate", "low", "high"]].reset_index(drop=True)


def significance_bars(tests: pd.DataFrame, target_label: str, baseline_label: str, alpha: float = ALPHA) -> go.Figure:
    """Image AUROC difference per category (percentage points) from ``ResultStore.paired_test``,
    with a star on categories where DeLong's paired test is significant at ``alpha``."""
    categories = list(tests["category"]) if len(tests) else []
    values = (tests["image_auroc_diff"].to_numpy(dtype=float) * 100.0 if "image_auroc_diff" in tests
              else np.full(len(categories), np.nan))
    p_list = tests["delong_p"].to_numpy(dtype=float) if "delong_p" in tests else np.full(len(categories), np.nan)
    p_values = dict(zip(categories, p_list))
    significant = {c: bool(p < alpha) for c, p in p_values.items()}
    diff = pd.DataFrame({"category": categories, "difference": values})
    fig = go.Figure(go.Bar(
        x=diff["category"], y=values,
        marker_color=[POSITIVE_COLOUR if v > 0 else NEGATIVE_COLOUR if v < 0 else "#9e9e9e" for v in np.nan_to_num(values)],
        text=[("★ " if significant.get(c) else "") + ("n/a" if np.isnan(v) else f"{v:+.1f}")
              for c, v in zip(diff["category"], values)],
        textposition="outside", cliponaxis=False,
        customdata=[p_values.get(c, np.nan) for c in diff["category"]],
        hovertemplate="%{x}: %{y:+.2f} points, DeLong p = %{customdata:.3g}<extra></extra>",
    ))
    fig.add_hline(y=0, line_color="#616161", line_width=1)
    span = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    fig.update_layout(yaxis=dict(title="difference (percentage points)", range=[-span * 1.3 - 1, span * 1.3 + 1]),
                      xaxis=dict(title="category"))
    return tidy(fig, title=f"{target_label} minus {baseline_label}: image AUROC (★ = significant, paired test)",
                legend=False)


def relabel_ranks(result: Mapping[str, object], names: Sequence[str]) -> dict:
    """``ResultStore.friedman``'s result with its methods renamed to ``names`` (legend labels,
    in the order of the run ids it was given), as :func:`cd_diagram` draws it."""
    rename = dict(zip(result["methods"], names))  # type: ignore[arg-type]
    ranks = result["average_ranks"]
    return {"methods": list(names), "average_ranks": [float(ranks[m]) for m in result["methods"]],  # type: ignore
            "critical_difference": float(result["critical_difference"]),  # type: ignore[arg-type]
            "n_datasets": int(result["n_categories"]),  # type: ignore[call-overload]
            "cliques": [[rename[m] for m in clique] for clique in result["cliques"]],  # type: ignore[union-attr]
            "p_value": float(result["p_value"])}  # type: ignore[arg-type]


def cd_diagram(result: Mapping[str, object], colours: Mapping[str, str] | None = None) -> go.Figure:
    """Critical-difference diagram: average ranks on a line (1 = best, left), methods whose ranks
    lie within the critical difference joined by a bar (not significantly different)."""
    methods = list(result["methods"])  # type: ignore[arg-type]
    ranks = np.asarray(result["average_ranks"], dtype=float)
    cd = float(result["critical_difference"])  # type: ignore[arg-type]
    k = len(methods)
    order = np.argsort(ranks, kind="stable")
    fig = go.Figure()
    fig.add_scatter(x=[1, k], y=[0, 0], mode="lines", line=dict(color="#424242", width=1.5), hoverinfo="skip",
                    showlegend=False)
    for position, i in enumerate(order):
        # Labels alternate above and below the axis and step outwards, so none overlaps another.
        side = 1 if position % 2 == 0 else -1
        level = side * (1 + position // 2)
        fig.add_scatter(x=[ranks[i], ranks[i]], y=[0, level * 0.8], mode="lines", hoverinfo="skip", showlegend=False,
                        line=dict(color=(colours or {}).get(methods[i], "#616161"), width=1))
        fig.add_scatter(x=[ranks[i]], y=[0], mode="markers", showlegend=False,
                        marker=dict(size=9, color=(colours or {}).get(methods[i], "#616161")),
                        hovertemplate=f"{methods[i]}: average rank {ranks[i]:.2f}<extra></extra>")
        fig.add_annotation(x=ranks[i], y=level * 0.8, text=f"{methods[i]} ({ranks[i]:.2f})", showarrow=False,
                           yanchor="bottom" if side > 0 else "top", font=dict(size=12))
    for n, clique in enumerate(result["cliques"]):  # type: ignore[union-attr]
        members = [methods.index(m) for m in clique]
        lo, hi = float(ranks[members].min()), float(ranks[members].max())
        y = -0.25 - 0.2 * n
        fig.add_scatter(x=[lo, hi], y=[y, y], mode="lines", line=dict(color="#212121", width=5), showlegend=False,
                        hovertemplate="not significantly different<extra></extra>")
    fig.add_scatter(x=[1, 1 + cd], y=[2.9, 2.9], mode="lines+markers", line=dict(color="#c62828", width=2),
                    marker=dict(symbol="line-ns-open", size=10), showlegend=False,
                    hovertemplate=f"critical difference {cd:.2f}<extra></extra>")
    fig.add_annotation(x=1 + cd / 2, y=2.9, text=f"CD = {cd:.2f}", showarrow=False, yanchor="bottom",
                       font=dict(size=12, color="#c62828"))
    depth = 1 + (k + 1) // 2
    fig.update_layout(xaxis=dict(title="average rank over categories (1 = best)", range=[0.6, k + 0.4], dtick=1),
                      yaxis=dict(visible=False, range=[-depth * 0.8 - 0.4, max(depth * 0.8, 3.4) + 0.2]))
    return tidy(fig, title=f"Critical-difference diagram (Friedman p = {float(result['p_value']):.3g})",  # type: ignore[arg-type]
                height=260 + 40 * k, legend=False)
