"""One self-contained HTML report per run or per comparison of runs.

Why a module of the package (not the dashboard): ``python -m harmoniad runs export RUN_ID
--format html`` writes the same file the dashboard offers for download. The file works
offline: plotly.js is embedded once, images are inline PNG. It holds the runs and their
weights, per-category metrics, charts, bootstrap intervals, per-defect results, paired tests
and a critical-difference diagram (comparisons of >= 2 / >= 3 runs), and a gallery of the
worst false positives and false negatives with their anomaly maps.

Every report states each run's weights (pretrained tag, weight-file hash, or "random
weights: not a result") at the top, as every other export does (:mod:`harmoniad.store.export`).
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd

from harmoniad import charts
from harmoniad.operating import ORACLE, RULES, decision, fitted_thresholds
from harmoniad.runtime.atomic import atomic_write_text
from harmoniad.store import METRIC_COLUMNS, ResultStore, RunDataMissing, RunInfo
from harmoniad.store.export import RANDOM_WEIGHTS_STATEMENT, weights_statement

#: Worst false positives and false negatives shown per run.
GALLERY = 6
THUMB = 192


def _table(frame: pd.DataFrame, digits: int = 1) -> str:
    return frame.to_html(index=False, border=0, classes="t", float_format=lambda v: f"{v:.{digits}f}", na_rep="–",
                         escape=True)


def _figure(fig: object, first: list[bool]) -> str:
    """A plotly figure as an HTML fragment; plotly.js goes inline with the first one only."""
    include = first[0]
    first[0] = False
    fig.update_layout(template="plotly_white")  # type: ignore[attr-defined]
    return fig.to_html(full_html=False, include_plotlyjs=include, config={"displaylogo": False})  # type: ignore[attr-defined]


def _png(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _thumbnail(store: ResultStore, info: RunInfo, row: pd.Series, scale: tuple[float, float] | None) -> str | None:
    """The image with its anomaly map overlaid and the ground truth outlined, as a data URL."""
    from harmoniad.data import DatasetError, read_image
    from harmoniad.visualize import heatmap_rgb, overlay

    try:
        maps = store.load_maps(info.id, int(row["index"]))
    except (RunDataMissing, IndexError):
        return None
    if "anomaly" not in maps:
        return None
    lo, hi = scale or (None, None)
    values = charts.fit_map(maps["anomaly"], THUMB)
    try:
        base = charts.fit_image(read_image(str(row["image_path"])), THUMB)
        picture = overlay(base, values, 0.5, lo, hi)
    except (DatasetError, OSError):
        picture = heatmap_rgb(values, lo, hi)
    if "mask" in maps and maps["mask"].any():
        picture = charts.draw_outline(picture, charts.fit_map(maps["mask"].astype(np.float32), THUMB) > 0.5)
    return _png(picture)


def _gallery(store: ResultStore, info: RunInfo, images: pd.DataFrame) -> str:
    """Worst false positives and false negatives over all categories at each category's operating point."""
    fps, fns, rules = [], [], set()
    fitted = fitted_thresholds(store.load_thresholds(info.id))
    for category, rows in images.groupby("category", sort=False):
        dec = decision("fitted", rows, fitted=fitted.get(str(category)))
        if dec.threshold is None:
            continue
        rules.add(dec.rule)
        fp, fn = charts.misclassified(rows, dec.threshold)
        # How wrong, comparable across categories: the margin over the category's score spread.
        spread = float(rows["score"].std()) or 1.0
        fps.append(fp.assign(relative=fp["margin"] / spread, threshold=dec.threshold))
        fns.append(fn.assign(relative=fn["margin"] / spread, threshold=dec.threshold))
    note = ("thresholds fitted on normal training images" if rules == {"fitted"} else
            f"thresholds: {', '.join(RULES[r] for r in sorted(rules))}")
    parts = [f"<p class='note'>Worst errors first (distance from the threshold over the category's score spread); "
             f"{html.escape(note)}. Cyan outline: ground truth.</p>"]
    for title, frames in (("False positives (normal images flagged)", fps), ("False negatives (missed defects)", fns)):
        worst = (pd.concat(frames).sort_values("relative", ascending=False).head(GALLERY)
                 if frames and any(len(f) for f in frames) else pd.DataFrame())
        count = sum(len(f) for f in frames)
        parts.append(f"<h4>{title}: {count}</h4>")
        if worst.empty:
            parts.append("<p>None.</p>")
            continue
        cards = []
        for _, row in worst.iterrows():
            src = _thumbnail(store, info, row, None)
            picture = f"<img src='{src}' width='{THUMB}' height='{THUMB}' alt='map'>" if src else "<div>no map</div>"
            cards.append(f"<figure>{picture}<figcaption>{html.escape(charts.short_path(row['image_path']))}<br>"
                         f"{html.escape(str(row['category']))} · {html.escape(str(row['defect']))}<br>score "
                         f"{row['score']:.4g} (threshold {row['threshold']:.4g})</figcaption></figure>")
        parts.append("<div class='gallery'>" + "".join(cards) + "</div>")
    return "".join(parts)


def _runs_table(infos: Sequence[RunInfo]) -> pd.DataFrame:
    return pd.DataFrame({
        "Method": [charts.method_label(i.method) for i in infos],
        "Dataset": [i.dataset for i in infos],
        "Run id": [i.id for i in infos],
        "Status": [i.status for i in infos],
        "Weights": [weights_statement(i) for i in infos],
        "Resolution": [i.resolution for i in infos],
        "Started": [i.created[:16].replace("T", " ") for i in infos],
        "Code": [i.code_version for i in infos],
    })


def render_report(store: ResultStore, run_ids: Sequence[str]) -> str:
    """The HTML report of ``run_ids`` (one run, or a comparison on one dataset) as a string."""
    if not run_ids:
        raise ValueError("render_report needs at least one run id")
    infos = [store.get_run(r) for r in run_ids]
    runs = pd.DataFrame({"id": [i.id for i in infos], "method": [i.method for i in infos],
                         "created": [i.created for i in infos]})
    labels = charts.series_labels(runs)
    colours = charts.series_colours(runs)
    metrics = {i.id: store.load_metrics(i.id) for i in infos}
    images: dict[str, pd.DataFrame] = {}
    for i in infos:
        try:
            images[i.id] = store.load_images(i.id)
        except RunDataMissing:
            continue
    first = [True]
    body: list[str] = []
    random = [i for i in infos if i.random_weights]
    if random:
        names = ", ".join(labels[i.id] for i in random)
        body.append(f"<div class='warn'><b>{RANDOM_WEIGHTS_STATEMENT.capitalize()}.</b> {html.escape(names)} used a "
                    "backbone with random weights: the numbers only show that the pipeline works; they say nothing "
                    "about how well a method detects anomalies.</div>")
    body.append("<h2>Runs</h2>" + _table(_runs_table(infos)))

    table = charts.comparison_table(metrics, labels)
    body.append("<h2>Metrics per category</h2><p class='note'>Percent; mean over the categories that ran; – = "
                "undefined or failed.</p>")
    for metric in METRIC_COLUMNS:
        wide = table.pivot(index="series", columns="category", values=metric)
        wide = wide.reindex(index=list(dict.fromkeys(table["series"])), columns=list(dict.fromkeys(table["category"])))
        wide.columns.name = None
        body.append(f"<h4>{html.escape(charts.METRIC_LABELS[metric])}</h4>" + _table(wide.reset_index()))
    for metric in ("image_auroc", "pixel_aupro"):
        body.append(_figure(charts.category_bars(table, metric, colours=colours), first))

    intervals = {labels[i.id]: store.load_intervals(i.id) for i in infos}
    rows = [t.assign(series=label) for label, t in intervals.items() if len(t)]
    if rows:
        body.append("<h2>Intervals</h2><p class='note'>95% stratified bootstrap intervals stored with each run "
                    "(test images resampled, normal and defective separately), percent.</p>")
        shown = pd.concat(rows)[["series", "category", "metric", "estimate", "low", "high"]]
        shown[["estimate", "low", "high"]] *= 100.0
        body.append(_table(shown))
        image = {label: charts.interval_table(t, "image_auroc") for label, t in intervals.items()}
        body.append(_figure(charts.interval_bars({k: v for k, v in image.items() if len(v)}, colours), first))
    if images:
        body.append("<h2>Per defect type</h2>")
        cuts, rules = {}, set()
        for r, t in images.items():
            fitted = fitted_thresholds(store.load_thresholds(r))
            for category, part in t.groupby("category", sort=False):
                dec = decision("fitted", part, fitted=fitted.get(str(category)))
                cuts[(labels[r], str(category))] = dec.threshold
                rules.add(dec.rule)
        if ORACLE in rules:
            body.append("<p class='note'>Detected counts use the oracle F1-max threshold (it uses test labels) where "
                        "a run stored no threshold fitted on normal images; elsewhere the threshold fitted on "
                        "held-out normal training images.</p>")
        defects = charts.defect_table({labels[r]: (store.load_defects(r), t) for r, t in images.items()}, cuts)
        if len(defects):
            body.append(_table(defects) + _figure(charts.defect_bars(defects, colours=colours), first))
        ids = list(images)
        if len(ids) >= 2:
            body.append("<h2>Paired tests</h2><p class='note'>DeLong's test of image AUROC on the images both runs "
                        "scored, per category; significant at the 5% level, no multiple-testing correction.</p>")
            tests = []
            for n, a in enumerate(ids):
                for b in ids[n + 1:]:
                    t = store.paired_test(a, b)
                    if len(t):
                        tests.append(t.assign(a=labels[a], b=labels[b],
                                              significant=t.get("delong_p", pd.Series(np.nan)) < charts.ALPHA))
            if tests:
                columns = ["a", "b", "category", "n_images", "image_auroc_diff", "delong_p", "significant"]
                both = pd.concat(tests)
                body.append(both[[c for c in columns if c in both]].to_html(
                    index=False, border=0, classes="t", float_format=lambda v: f"{v:.3g}"))
        ranks = None
        if len(infos) >= 3:
            try:
                ranks = charts.relabel_ranks(store.friedman([i.id for i in infos]), [labels[i.id] for i in infos])
            except ValueError:  # fewer than two categories every run scored
                ranks = None
        if ranks is not None:
            body.append("<h2>Critical-difference diagram</h2><p class='note'>Image AUROC ranks over categories.</p>"
                        + _figure(charts.cd_diagram(ranks, colours), first))
        body.append("<h2>Worst failures</h2>")
        for r, t in images.items():
            info = next(i for i in infos if i.id == r)
            body.append(f"<h3>{html.escape(labels[r])}</h3>" + _gallery(store, info, t))
    title = ("HarmoniAD report: " + ", ".join(labels[i.id] for i in infos)
             + f" on {', '.join(sorted({i.dataset for i in infos}))}")
    created = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    weights_line = "; ".join(f"{labels[i.id]}: {weights_statement(i)}" for i in infos)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<meta name="harmoniad-weights" content="{html.escape(weights_line)}">
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1200px; color: #212121; }}
table.t {{ border-collapse: collapse; margin: .5rem 0 1rem; font-size: 13px; }}
table.t th, table.t td {{ border-bottom: 1px solid #e0e0e0; padding: 3px 8px; text-align: right; }}
table.t th {{ background: #f5f5f5; }}
.warn {{ background: #fff8e1; border-left: 4px solid #f9a825; padding: .75rem 1rem; margin: 1rem 0; }}
.note {{ color: #616161; font-size: 13px; }}
.gallery {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; width: {THUMB}px; font-size: 12px; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="note">Written {created} by harmoniad. Weights: {html.escape(weights_line)}.</p>
{"".join(body)}
</body></html>
"""


def write_report(store: ResultStore, run_ids: Sequence[str], path: str | os.PathLike[str]) -> Path:
    """Write :func:`render_report` to ``path`` atomically and return it."""
    out = Path(path)
    atomic_write_text(out, render_report(store, run_ids))
    return out
