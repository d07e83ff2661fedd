"""One evaluation path for every method: fit, score each category, compute metrics, store.

``evaluate`` runs methods x dataset x categories. A failure in one category is recorded
in the store and the others go on; a failure in fitting fails that method's run only.

Under ``torchrun`` (:mod:`harmoniad.runtime.distributed`) every rank fits the method (HarmoniAD's
training is itself data-parallel), each category's test images are split across ranks,
the predictions are gathered on rank 0 in the original order, and only rank 0 computes
metrics, writes the store and reports progress.
"""

from __future__ import annotations

import random
import time
import traceback
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from harmoniad.runtime import distributed
from harmoniad.backbone import TINY_BACKBONE, BackboneConfig, resolve_spec
from harmoniad.runtime.serialization import to_dict
from harmoniad.data import DatasetError, Sample, read_mask
from harmoniad.methods import METHODS, build_method
from harmoniad.methods.base import Context, Method
from harmoniad.maps import Prediction
from harmoniad.analysis import CategoryReport, category_report, category_seed, image_part, mean_intervals, pixel_part
from harmoniad.data.loading import reuse_decode_workers
from harmoniad.data.readers import ReadOptions
from harmoniad.stats import LEVEL
from harmoniad.thresholds import save_checkpoint_thresholds
from harmoniad.runtime.progress import Cancelled, Progress, ProgressEvent, ProgressFn, print_progress, silent
from harmoniad.data.screening import Screen, SkippedFile, load_categories
from harmoniad.runtime.background import BackgroundWriter, writer_workers
from harmoniad.runtime.heap import keep_freed_memory
from harmoniad.store import ResultStore


@dataclass(frozen=True)
class EvalRequest:
    """What to evaluate; recorded with every run so it can be repeated."""

    dataset: str
    root: str
    methods: tuple[str, ...]
    categories: tuple[str, ...] | None = None
    backbone: BackboneConfig = field(default_factory=lambda: TINY_BACKBONE)
    resolution: int = 256
    seed: int = 0
    device: str = "auto"
    #: Per-method overrides, e.g. ``{"harmoniad": {"train": {"epochs": 5}}}``.
    options: dict[str, Any] = field(default_factory=dict)
    #: Folder datasets are stored as ``folder:<name>`` (default: the root folder's name).
    name: str | None = None
    #: Reading: ``"auto"`` (masks when the tree has ground_truth/) or ``"none"``.
    masks: str = "auto"
    allow_missing_masks: bool = False
    #: Flat folder layout: the normal images' folder and the share held back as test normals.
    normal_dir: str | None = None
    test_normals: float = 0.2
    #: Share of each category's training normals held out (seeded) to fit thresholds on; 0: none.
    threshold_holdout: float = 0.1
    #: The false-positive rate the quantile threshold aims at on the held-out normals.
    target_fpr: float = 0.01
    #: Bootstrap resamples for the 95% intervals; 0: no intervals.
    n_resamples: int = 1000

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold_holdout < 1.0:
            raise ValueError(f"threshold_holdout must be in [0, 1), got {self.threshold_holdout}")
        if not 0.0 <= self.target_fpr < 1.0:
            raise ValueError(f"target_fpr must be in [0, 1), got {self.target_fpr}")
        if self.n_resamples < 0:
            raise ValueError(f"n_resamples must be >= 0, got {self.n_resamples}")
        if self.name is not None and (not self.name.strip() or ":" in self.name):
            raise ValueError(f"name must be a non-empty name without ':', got {self.name!r}")

    @property
    def read_options(self) -> ReadOptions:
        return ReadOptions(masks=self.masks, allow_missing_masks=self.allow_missing_masks,
                           normal_dir=self.normal_dir, test_normals=self.test_normals, seed=self.seed)

    @property
    def dataset_label(self) -> str:
        """How the run names its dataset: ``folder:<name>`` for folder datasets."""
        if self.dataset != "folder":
            return self.dataset
        return f"folder:{self.name or Path(self.root).expanduser().absolute().name}"


def hold_out_normals(train: Sequence[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split each category's training normals into (fit, held out for thresholds), seeded.

    A category with n >= 2 normals holds out ``round(fraction * n)`` of them, at least one
    and at most n - 1; with fewer, or ``fraction`` 0, nothing is held out.
    """
    fit: list[Sample] = []
    held: list[Sample] = []
    for category in dict.fromkeys(s.category for s in train):
        samples = [s for s in train if s.category == category]
        k = 0 if fraction <= 0 or len(samples) < 2 else min(len(samples) - 1, max(1, round(fraction * len(samples))))
        chosen = set(random.Random(f"{seed}:{category}:thresholds").sample(range(len(samples)), k))
        for i, s in enumerate(samples):
            (held if i in chosen else fit).append(s)
    return fit, held


def masks_at(samples: Sequence[Sample], resolution: int) -> np.ndarray:
    """Ground-truth masks resized (nearest) to ``resolution``; zeros for normal images."""
    out = np.zeros((len(samples), resolution, resolution), dtype=bool)
    for i, sample in enumerate(samples):
        if sample.mask_path is not None:
            mask = Image.fromarray(read_mask(sample.mask_path))
            out[i] = np.asarray(mask.resize((resolution, resolution), Image.NEAREST), dtype=bool)
    return out


def category_metrics(labels: np.ndarray, pred: Prediction, masks: np.ndarray) -> dict[str, float]:
    """Image- and pixel-level metrics of one category (docs/design.md#metrics).

    A metric that is undefined for this category (a test set with one label only, or no
    anomalous pixel) is NaN, so a mean over categories skips it instead of inventing it.
    Evaluation itself uses :func:`harmoniad.analysis.category_report`, which adds
    per-defect results, intervals and thresholds.
    """
    return {**image_part(labels, pred.scores), **pixel_part(masks, pred.maps)}


def record_category(
    store: ResultStore,
    run_id: str,
    category: str,
    samples: Sequence[Sample],
    pred: Prediction,
    *,
    t0: float,
    masks: np.ndarray | None = None,
    normal_scores: np.ndarray | None = None,
    target_fpr: float = 0.01,
    n_resamples: int = 1000,
    seed: int | np.random.SeedSequence = 0,
    skipped: Sequence[tuple[str, str]] = (),
) -> CategoryReport:
    """Metrics of one scored category and its record in the store (tables, maps, details).

    What evaluation runs on its background writer after a category is scored (and the
    end-to-end benchmark too). ``masks`` are read at the run's resolution when not given;
    ``t0`` is when the category's work started (for the recorded seconds).
    """
    if masks is None:
        masks = masks_at(samples, store.get_run(run_id).resolution)
    labels = np.array([s.label for s in samples])
    report = category_report(
        labels, pred.scores, [s.defect for s in samples], [s.mask_path is not None for s in samples],
        masks, pred.maps, normal_scores=normal_scores, target_fpr=target_fpr, n_resamples=n_resamples, seed=seed,
    )
    maps = {"anomaly": pred.maps, "high": pred.high_maps, "low": pred.low_maps}
    store.add_category(
        run_id,
        category,
        metrics=report.metrics,
        images=_images_table(samples, pred.scores),
        maps={k: v for k, v in maps.items() if v is not None},
        masks=masks,
        seconds=time.perf_counter() - t0,
        skipped=list(skipped),
        details=report.details,
    )
    return report


def _images_table(samples: Sequence[Sample], scores: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "image_path": [str(s.image_path) for s in samples],
            "mask_path": [None if s.mask_path is None else str(s.mask_path) for s in samples],
            "category": [s.category for s in samples],
            "defect": [s.defect for s in samples],
            "label": np.array([s.label for s in samples], dtype=np.int8),
            "score": np.asarray(scores, dtype=np.float32),
        }
    )


def evaluate(
    request: EvalRequest,
    store: ResultStore | None = None,
    progress: ProgressFn | None = None,
) -> list[str]:
    """Run every requested method and return the ids of the runs written to ``store``."""
    unknown = [m for m in [*request.methods, *request.options] if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {sorted(METHODS)}")
    # Built once, before any work starts: bad options are refused up front.
    methods = [build_method(name, request.options.get(name)) for name in request.methods]
    keep_freed_memory()  # batches and categories reuse freed host memory (harmoniad.runtime.heap)
    main = distributed.is_main()
    # Under torchrun only rank 0 writes results and reports; the other ranks compute only.
    store = (store or ResultStore()) if main else None
    report = (progress or print_progress) if main else silent
    cats = list(request.categories) if request.categories else None
    # A malformed category is recorded as failed and the others go on; a bad file is left
    # out and listed in the run (harmoniad.data.screening). Verdicts are shared by every method.
    loaded = load_categories(request.dataset, request.root, cats, request.read_options)
    train, test, categories = loaded.train, loaded.test, loaded.categories
    fit_train, held = hold_out_normals(train, request.threshold_holdout, request.seed)
    screen = Screen(decode=distributed.active())  # ranks must agree up front: no retries
    device = distributed.device(request.device)
    # On CUDA the decode worker processes start once for the whole request, not for every
    # category's test images and again for its held-out normals (data.loading.reuse_decode_workers).
    with reuse_decode_workers():
        if distributed.active():
            _prefetch_features(request, screen.keep(fit_train)[0], methods, device, report)
        outer = Progress("evaluate", len(request.methods) * (len(categories) + 1), report, min_interval_s=0)
        run_ids = []
        mask_memo: dict[tuple[Path | None, ...], np.ndarray] = {}  # ground truth, read once for all methods
        for name, method in zip(request.methods, methods):
            ctx = Context(
                resolution=request.resolution,
                device=device,
                backbone=request.backbone if method.uses_backbone else None,
                seed=request.seed,
                progress=_nested(report, name),
            )
            # Weights that cannot be loaded fail this method's run (reported, exit 1 in the CLI),
            # not the whole request: the other methods still run. Every rank sees the same files.
            provenance, weights_error = None, None
            if method.uses_backbone:
                try:
                    provenance = _provenance(request.backbone)
                except (ValueError, OSError) as exc:
                    weights_error = f"cannot load the backbone weights: {exc}"
            if weights_error is not None:
                if store is not None:
                    run_id = store.create_run(method=name, method_config=method.config(), dataset=request.dataset_label,
                                              root=str(Path(request.root)), categories=categories,
                                              backbone={"error": weights_error}, resolution=request.resolution,
                                              request=to_dict(request))
                    run_ids.append(run_id)
                    store.fail_run(run_id, weights_error)
                outer.update(len(categories) + 1, method=name)
                continue
            if not main:  # a compute-only rank: its share of the work goes to rank 0's run
                _run_method(method, ctx, "", None, fit_train, test, categories, outer,
                            screen=screen, broken=loaded.broken, mask_memo=mask_memo, held=held, request=request)
                continue
            run_id = store.create_run(
                method=name,
                method_config=method.config(),
                dataset=request.dataset_label,
                root=str(Path(request.root)),
                categories=categories,
                backbone=provenance,
                resolution=request.resolution,
                request=to_dict(request),
            )
            run_ids.append(run_id)
            try:
                _run_method(method, ctx, run_id, store, fit_train, test, categories, outer,
                            screen=screen, broken=loaded.broken, mask_memo=mask_memo, held=held, request=request)
            except BaseException as exc:
                # Cancelled, KeyboardInterrupt or a bug: the run must never be left "running"
                # by a live process (the dashboard's thread), and never shown complete.
                reason = "cancelled" if isinstance(exc, (Cancelled, KeyboardInterrupt)) else f"{exc!r}"
                store.fail_run(run_id, f"{reason}\n{traceback.format_exc()}")
                raise
    return distributed.broadcast_object(run_ids)


def _run_method(
    method: Method,
    ctx: Context,
    run_id: str,
    record_to: ResultStore | None,
    train: list[Sample],
    test: list[Sample],
    categories: list[str],
    outer: Progress,
    *,
    screen: Screen,
    broken: Mapping[str, str],
    mask_memo: dict[tuple[Path | None, ...], np.ndarray],
    held: Sequence[Sample] = (),
    request: EvalRequest | None = None,
) -> None:
    """Fit once, then score and store each category; a failing category doesn't stop the rest.

    ``held`` are the training normals held out of the fit: each category's are scored after
    the fit and its thresholds fitted on them (:mod:`harmoniad.thresholds`); ``request``
    gives the target FPR, the bootstrap resamples and the seed (defaults without one).

    Unusable files are left out (``screen``) and listed with the run; ``broken`` categories
    (refused by the dataset reader) are recorded as failed with the reader's error.
    ``mask_memo`` memoises ground-truth masks by the kept samples' mask paths, shared by methods
    (normal images have no mask path; equal keys then mean equal all-zero masks).

    ``record_to`` is the store on the recording process and None on a compute-only one (a
    non-main rank of a torchrun job): compute-only ranks fit and predict their
    share, rank 0 records everything. Every rank takes the same branches (failures are
    agreed on collectively), so none waits forever at a collective.
    """
    try:
        error = None
        try:
            screen.run(lambda kept: method.fit(kept, ctx), train)
        except Cancelled:
            raise
        except Exception as exc:  # noqa: BLE001 - agreed on below, then recorded
            error = f"{exc!r}\n{traceback.format_exc()}"
        error = _first_error(error)
        if record_to is not None:
            record_to.add_skipped(run_id, [(f.category, f.path, f.reason) for f in screen.skipped(train)], split="train")
            # Held-out normals are screened now, so their unusable files are listed too.
            screen.keep(held)
            record_to.add_skipped(run_id, [(f.category, f.path, f.reason) for f in screen.skipped(held)], split="train")
        if error is not None:
            raise _FitFailed(error)
    except _FitFailed as failed:  # recorded, the next method goes on
        if record_to is not None:
            record_to.fail_run(run_id, f"fit failed: {failed}")
        outer.update(len(categories) + 1, method=method.name)
        return
    outer.update(method=method.name, step="fit")
    fitted_facts = method.fitted()
    if record_to is not None and fitted_facts:
        record_to.set_run_details(run_id, {"fitted": fitted_facts})
    request = request or EvalRequest("", "", (method.name,))
    reports: dict[str, CategoryReport] = {}
    fitted: dict[str, dict[str, Any]] = {}
    def record(category: str, samples: list[Sample], pred: Prediction, masks: np.ndarray,
               normal_scores: np.ndarray | None, t0: float, skipped: list[tuple[str, str]]) -> None:
        """Metrics and store writes of a scored category (on the writer thread); a failure is recorded."""
        assert record_to is not None
        try:
            report = record_category(
                record_to, run_id, category, samples, pred, masks=masks, t0=t0, normal_scores=normal_scores,
                target_fpr=request.target_fpr, n_resamples=request.n_resamples,
                seed=category_seed(request.seed, category), skipped=skipped,
            )
            reports[category] = report
            # The checkpoint keeps what was fitted on normals only (no test-set operating points).
            fitted[category] = {k: {f: x for f, x in v.items() if f != "test"}
                                for k, v in report.details["thresholds"].items() if k != "oracle"}
        except Exception as exc:  # noqa: BLE001 - recorded, the other categories go on
            record_to.fail_category(run_id, category, f"{exc!r}\n{traceback.format_exc()}", skipped=skipped)

    # Ground-truth masks are read on their own thread while the category is scored: a 1024 px
    # MVTec mask takes ~3 ms, ~0.3 s a category, on the order of a GPU's whole scoring of it.
    with (
        BackgroundWriter(workers=writer_workers(ctx.device)) as writer,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="harmoniad-masks") as mask_reader,
    ):
        for category in categories:
            if category in broken:
                if record_to is not None:
                    record_to.fail_category(run_id, category, broken[category])
                outer.update(method=method.name, category=category)
                continue
            listed = [s for s in test if s.category == category]
            t0 = time.perf_counter()

            def score(kept: list[Sample]) -> tuple[Prediction | None, np.ndarray | None]:
                key = tuple(s.mask_path for s in kept)
                reading = (mask_reader.submit(masks_at, kept, ctx.resolution)
                           if record_to is not None and key not in mask_memo else None)
                pred = _predict(method, kept, ctx)
                if record_to is None:
                    return pred, None
                if reading is not None:  # a bad mask file raises here, as the screening expects
                    mask_memo[key] = reading.result()
                return pred, mask_memo[key]

            try:
                normal_scores = _held_out_scores(method, [s for s in held if s.category == category], ctx, screen)
                (pred, masks), samples = screen.run(score, listed)
                if record_to is None:  # a non-main rank: its share was gathered to rank 0
                    continue
                # Metrics and store writes run on the writer thread while the next category is scored.
                writer.submit(record, category, samples, pred, masks, normal_scores, t0,
                              _pairs(screen.skipped(listed)))
            except Cancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - recorded, the other categories go on
                if record_to is not None:
                    record_to.fail_category(run_id, category, f"{exc!r}\n{traceback.format_exc()}",
                                        skipped=_pairs(screen.skipped(listed)))
            outer.update(method=method.name, category=category)
        writer.drain()
    if record_to is not None:
        record_to.set_run_details(run_id, {
            "mean_intervals": mean_intervals(reports), "n_resamples": request.n_resamples,
            "interval_level": LEVEL, "target_fpr": request.target_fpr,
            "threshold_holdout": request.threshold_holdout, "seed": request.seed,
        })
        checkpoint = getattr(method, "checkpoint", None)
        if checkpoint is not None and any(fitted.values()):
            save_checkpoint_thresholds(Path(checkpoint), fitted, _score_settings(method, ctx))
        record_to.finish_run(run_id)


def _held_out_scores(method: Method, held: list[Sample], ctx: Context, screen: Screen) -> np.ndarray | None:
    """Scores of a category's held-out training normals (None when it has none left)."""
    if not held or not screen.keep(held)[0]:
        return None
    try:
        pred, _ = screen.run(lambda kept: _predict(method, kept, ctx), held)
    except DatasetError:  # every held-out file unusable: listed as skipped, no thresholds
        return None
    return None if pred is None else np.asarray(pred.scores, dtype=np.float64)


def _score_settings(method: Method, ctx: Context) -> dict[str, Any]:
    """The scoring settings a stored threshold is valid for (checked by ``score``): the
    method's score config at the evaluation resolution."""
    score = method.config().get("score")
    return {**(dict(score) if isinstance(score, Mapping) else {}), "resolution": ctx.resolution}


def _pairs(files: Sequence[SkippedFile]) -> list[tuple[str, str]]:
    """``(path, reason)`` of skipped files, as the store records a category's."""
    return [(f.path, f.reason) for f in files]


class _FitFailed(Exception):
    """A method's fit failed on some rank (the message is that rank's error and traceback)."""


def _first_error(error: str | None) -> str | None:
    """The first rank's error, agreed on by every rank (the error itself in one process)."""
    if not distributed.active():
        return error
    reports = distributed.all_gather_object(error)
    failed = [(r, e) for r, e in enumerate(reports) if e is not None]
    if not failed:
        return None
    r, first = failed[0]
    return first if r == distributed.rank() else f"on rank {r}: {first}"


def _predict(method: Method, samples: list[Sample], ctx: Context) -> Prediction | None:
    """``method.predict(samples)``; under torchrun each rank scores its shard and rank 0 gets all.

    Returns the whole category's prediction in ``samples`` order on rank 0 and None on the
    other ranks. If any rank fails, rank 0 raises (so the category is recorded as failed)
    and the others return None.
    """
    if not distributed.active():
        return method.predict(samples, ctx)
    local = distributed.shard(samples)
    part: Prediction | None = None
    error: BaseException | None = None
    try:
        part = method.predict(local, ctx) if local else None
    except Cancelled:
        raise
    except Exception as exc:  # noqa: BLE001 - handed to rank 0, which records it
        error = exc
    parts = distributed.gather_object((part, None if error is None else f"{error!r}"))
    if parts is None:
        return None
    if error is not None:
        raise error
    failed = [(r, e) for r, (_, e) in enumerate(parts) if e is not None]
    if failed:
        raise distributed.DistributedError(f"predict failed on rank {failed[0][0]}: {failed[0][1]}")
    return merge_predictions([p for p, _ in parts], len(samples))


def merge_predictions(parts: Sequence[Prediction | None], n: int) -> Prediction:
    """Per-rank predictions of :func:`harmoniad.runtime.distributed.shard` slices -> one, in the original order."""
    world = len(parts)
    present = [p for p in parts if p is not None]
    if not present:
        raise ValueError("merge_predictions: no rank returned a prediction")

    def merge(name: str) -> np.ndarray | None:
        if getattr(present[0], name) is None:
            return None
        first = getattr(present[0], name)
        out = np.empty((n, *first.shape[1:]), dtype=first.dtype)
        for r, part in enumerate(parts):
            idx = distributed.shard_indices(n, rank_=r, world=world)
            if part is None:
                if idx:
                    raise ValueError(f"merge_predictions: rank {r} returned nothing for its {len(idx)} images")
                continue
            out[idx] = getattr(part, name)
        return out

    return Prediction(scores=merge("scores"), maps=merge("maps"), high_maps=merge("high_maps"), low_maps=merge("low_maps"))


def _prefetch_features(
    request: EvalRequest, train: list[Sample], methods: list[Method], device: Any, report: ProgressFn
) -> None:
    """Under torchrun, extract the training images' features once, split across ranks.

    Every rank fits every method on all training images; without this each rank would
    extract the same missing features. Test images need no prefetch: they are split
    across ranks already when predicted.
    """
    if not any(m.uses_backbone for m in methods):
        return
    from harmoniad.backbone.cache import FeatureCache

    cache = FeatureCache(request.backbone, device=device)
    cache.ensure([s.image_path for s in train], _nested(report, "prefetch"), distributed=True)


def _provenance(cfg: BackboneConfig) -> dict:
    """Backbone provenance from its config alone (the model is not built)."""
    return resolve_spec(cfg).provenance()


def _nested(report: ProgressFn, method: str) -> ProgressFn:
    """Prefix a method's own progress events with its name."""

    def callback(event: ProgressEvent) -> None:
        report(replace(event, task=f"{method}: {event.task}"))

    return callback
