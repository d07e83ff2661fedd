"""The results store: every evaluation run, reproducible and quick to reload.

Layout under ``root`` (default ``harmoniad.runtime.paths.store_dir()``)::

    index.sqlite                         runs + per-category metrics (SQLite, WAL)
    <run_id>/images/<category>-<tok>.parquet   per-image table of one category
    <run_id>/maps/<category>-<tok>.maps        per-image maps + ground-truth mask

Why this shape:

- The index is SQLite in WAL mode with a busy timeout and one connection per call, so
  the dashboard can read while runs are written from other threads or processes, and
  two writers serialise on short ``BEGIN IMMEDIATE`` transactions instead of corrupting
  each other. The schema version lives in ``PRAGMA user_version``.
- Bulk data is written *before* the index row that points at it, each file atomically
  (temp file + rename) under a fresh name; the index commit is the moment it becomes
  visible. A process killed mid-way therefore leaves at worst unreferenced files, and a
  run becomes ``complete`` only when :meth:`ResultStore.finish_run` commits.
- A run left ``running`` by a process that died is detected (pid, its start time and
  the host are recorded) and marked ``failed`` with an ``interrupted:`` error, so the
  dashboard never shows zombies.
- Maps are stored per category in one file of per-image compressed (zstd) blobs with an offset
  table, so loading one image's maps reads only that image (three small reads). Maps
  keep float16 precision with a per-map power-of-two scale (exact, no overflow whatever
  the value range), or, with ``map_precision="uint8"``, 8 bits over each map's own range
  (about 2.4x smaller; enough to look at, not to recompute pixel metrics). Codes are
  delta-coded losslessly before deflate. Masks are bit-packed.

Units: every metric here is a fraction in [0, 1] (``harmoniad.store.published`` converts the
published percentages to the same convention). Metric values that are undefined for a
category (NaN) are stored as NULL and come back as NaN.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import socket
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from harmoniad.runtime.paths import store_dir
from harmoniad.store.images import (
    empty_images_frame,
    flatten_metrics,
    images_table,
    metrics_frame,
    write_parquet,
)
from harmoniad.store.mapfiles import MapPrecision, check_maps, read_maps, write_maps
from harmoniad.store.schema import (
    INTERRUPTED,
    METRIC_COLUMNS,
    RUN_FIELDS,
    RUN_STATUSES,
    SCHEMA,
    SCHEMA_VERSION,
    RunDataMissing,
    RunInfo,
    RunNotFound,
    RunStateError,
    StoreError,
    decode_run,
    detect_code_version,
    immediate_transaction,
    is_random,
    now_iso,
    to_json,
)


#: ``(run_id, new status)``, see ``ResultStore(on_status=...)``.
RunObserver = Callable[[str, str], None]


class ResultStore:
    """Evaluation runs: an SQLite index plus per-run parquet tables and compressed maps.

    Safe to share between threads (no connection is kept) and to use from several
    processes at once.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        map_precision: MapPrecision = "float16",
        timeout_s: float = 30.0,
        on_status: RunObserver | None = None,
    ) -> None:
        """``on_status(run_id, status)`` is called after this store object creates (``running``),
        finishes (``complete``) or fails (``failed``) a run: a caller running work in the
        background (the dashboard's jobs) learns which runs the work opened and closed."""
        if map_precision not in ("float16", "uint8"):
            raise ValueError(f"map_precision must be 'float16' or 'uint8', got {map_precision!r}")
        self.root = Path(path) if path is not None else store_dir()
        self.db_path = self.root / "index.sqlite"
        self.map_precision: MapPrecision = map_precision
        self.timeout_s = timeout_s
        self.on_status = on_status
        self.root.mkdir(parents=True, exist_ok=True)
        self._init_schema()

    def __repr__(self) -> str:
        return f"ResultStore({str(self.root)!r})"

    def _notify(self, run_id: str, status: str) -> None:
        if self.on_status is not None:
            self.on_status(run_id, status)

    # ------------------------------------------------------------------ connections
    @contextlib.contextmanager
    def _connect(self, write: bool = False) -> Iterator[sqlite3.Connection]:
        """A fresh connection; with ``write`` the body runs in one IMMEDIATE transaction."""
        con = sqlite3.connect(self.db_path, timeout=self.timeout_s, isolation_level=None)
        try:
            con.row_factory = sqlite3.Row
            con.execute("PRAGMA foreign_keys = ON")
            if write:
                with immediate_transaction(con):
                    yield con
            else:
                yield con
        finally:
            con.close()

    def _init_schema(self) -> None:
        con = sqlite3.connect(self.db_path, timeout=self.timeout_s, isolation_level=None)
        try:
            if con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
                return  # ready (and already WAL, set before the schema): no write lock needed
            mode = con.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"{self.db_path}: could not switch the index to WAL journal mode (got {mode!r})")
            with immediate_transaction(con):
                version = con.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"{self.db_path}: index schema version {version} is newer than this "
                        f"harmoniad reads ({SCHEMA_VERSION}); upgrade harmoniad or use another store path"
                    )
                if version < SCHEMA_VERSION:
                    for statement in SCHEMA.split(";"):
                        if statement.strip():
                            con.execute(statement)
                    con.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        finally:
            con.close()

    # ------------------------------------------------------------------ writing
    def create_run(
        self,
        *,
        method: str,
        dataset: str,
        root: str | os.PathLike[str],
        categories: Sequence[str],
        resolution: int,
        method_config: Mapping[str, Any] | None = None,
        backbone: Mapping[str, Any] | None = None,
        random_weights: bool | None = None,
        request: Mapping[str, Any] | None = None,
        code_version: str | None = None,
    ) -> str:
        """Record a new ``running`` run and return its id.

        ``backbone`` is the backbone's provenance (pretrained tag, weight-file hash or
        random), None for methods without a backbone; ``random_weights`` defaults to what
        the provenance says. ``request`` is the full evaluation request, for repeating it.
        """
        cats = [str(c) for c in categories]
        if len(set(cats)) != len(cats):
            raise ValueError(f"categories must be unique, got {cats}")
        if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution <= 0:
            raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
        if random_weights is None:
            random_weights = is_random(backbone)
        now = now_iso()
        pid = os.getpid()
        row = {
            "created": now,
            "updated": now,
            "finished": None,
            "method": str(method),
            "method_config": to_json(dict(method_config or {}), "method_config"),
            "dataset": str(dataset),
            "root": str(root),
            "categories": to_json(cats, "categories"),
            "backbone": None if backbone is None else to_json(dict(backbone), "backbone"),
            "random_weights": int(bool(random_weights)),
            "resolution": resolution,
            "code_version": code_version or detect_code_version(),
            "request": None if request is None else to_json(dict(request), "request"),
            "status": "running",
            "error": None,
            "pid": pid,
            "pid_start": _process_start(pid),
            "hostname": socket.gethostname(),
        }
        for _ in range(5):
            run_id = f"{datetime.now(timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"
            try:
                with self._connect(write=True) as con:
                    cols = ["id", *row]
                    con.execute(
                        f"INSERT INTO runs ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                        [run_id, *row.values()],
                    )
                self._notify(run_id, "running")
                return run_id
            except sqlite3.IntegrityError:
                continue  # id collision within the same second: draw another
        raise StoreError(f"{self.db_path}: could not allocate a unique run id")

    def add_category(
        self,
        run_id: str,
        category: str,
        *,
        metrics: Mapping[str, Any],
        images: pd.DataFrame,
        maps: Mapping[str, np.ndarray] | None = None,
        masks: np.ndarray | None = None,
        seconds: float | None = None,
        skipped: Iterable[tuple[str, str]] = (),
        details: Mapping[str, Any] | None = None,
    ) -> None:
        """Store one category's metrics, per-image table and maps (replacing an earlier record).

        ``metrics`` is flat (``image_auroc``, ..., ``pixel_aupro``) or nested
        (``{"image": {"auroc": ...}, "pixel": {...}}``); missing metrics are NaN.
        ``images`` has one row per test image with at least ``image_path``, ``label`` and
        ``score`` (optional ``mask_path``, ``defect``, ``category``; other columns are kept).
        ``maps`` are ``name -> (N, R, R)`` at the run's resolution (e.g. ``anomaly``,
        ``high``, ``low``); ``masks`` is ``(N, R, R)`` bool ground truth. ``skipped`` lists
        the category's test files left out as unusable, as ``(path, reason)`` pairs.
        ``details`` (JSON-safe) holds what is not one number per category: per-defect-type
        results, bootstrap intervals, thresholds (:mod:`harmoniad.analysis`; read back with
        :meth:`load_details`, :meth:`load_defects`, :meth:`load_intervals`, :meth:`load_thresholds`).
        """
        info = self._require_running(run_id)
        category = _check_category(info, category)
        flat = flatten_metrics(metrics)
        details_json = None if details is None else to_json(dict(details), "details")
        table = images_table(images, category)
        n = len(table)
        arrays = check_maps(maps or {}, masks, n, info.resolution, where=f"run {run_id} category {category!r}")

        run_dir = self.root / run_id
        stem = f"{_safe_name(category)}-{secrets.token_hex(4)}"
        images_rel = f"images/{stem}.parquet"
        maps_rel = f"maps/{stem}.maps"
        write_parquet(table, run_dir / images_rel)
        write_maps(run_dir / maps_rel, n, info.resolution, arrays, masks, self.map_precision)

        old_files: list[str] = []
        try:
            with self._connect(write=True) as con:
                self._require_running(run_id, con)  # re-check inside the lock
                old = con.execute(
                    "SELECT images_file, maps_file FROM category_metrics WHERE run_id = ? AND category = ?",
                    (run_id, category),
                ).fetchone()
                if old is not None:
                    old_files = [f for f in (old["images_file"], old["maps_file"]) if f]
                end = con.execute(
                    "SELECT COALESCE(MAX(index_start + n_images), 0) FROM category_metrics "
                    "WHERE run_id = ? AND status = 'ok' AND category != ?",
                    (run_id, category),
                ).fetchone()[0]
                self._upsert_category(
                    con,
                    run_id,
                    category,
                    status="ok",
                    error=None,
                    metrics=flat,
                    n_images=n,
                    seconds=None if seconds is None else float(seconds),
                    index_start=int(end),
                    images_file=images_rel,
                    maps_file=maps_rel,
                )
                self._replace_skipped(con, run_id, category, skipped)
                self._replace_details(con, run_id, category, details_json)
        except BaseException:
            for rel in (images_rel, maps_rel):
                with contextlib.suppress(FileNotFoundError):
                    (run_dir / rel).unlink()
            raise
        for rel in old_files:
            with contextlib.suppress(FileNotFoundError):
                (run_dir / rel).unlink()

    def fail_category(
        self,
        run_id: str,
        category: str,
        error: str,
        *,
        seconds: float | None = None,
        skipped: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Record that one category failed (the run goes on with the others); ``skipped`` as in :meth:`add_category`."""
        info = self._require_running(run_id)
        category = _check_category(info, category)
        old_files: list[str] = []
        with self._connect(write=True) as con:
            self._require_running(run_id, con)
            old = con.execute(
                "SELECT images_file, maps_file FROM category_metrics WHERE run_id = ? AND category = ?",
                (run_id, category),
            ).fetchone()
            if old is not None:
                old_files = [f for f in (old["images_file"], old["maps_file"]) if f]
            self._upsert_category(
                con,
                run_id,
                category,
                status="failed",
                error=str(error),
                metrics={},
                n_images=None,
                seconds=None if seconds is None else float(seconds),
                index_start=None,
                images_file=None,
                maps_file=None,
            )
            self._replace_skipped(con, run_id, category, skipped)
            self._replace_details(con, run_id, category, None)
        for rel in old_files:
            with contextlib.suppress(FileNotFoundError):
                (self.root / run_id / rel).unlink()

    def add_skipped(self, run_id: str, files: Iterable[tuple[str, str, str]], *, split: str = "train") -> None:
        """Record files of ``split`` left out of the run as unusable: ``(category, path, reason)`` each.

        For files outside one category's test set, typically the training images; a file
        recorded again keeps its latest reason.
        """
        rows = [(run_id, str(split), str(c), str(p), str(r)) for c, p, r in files]
        if not rows:
            return
        with self._connect(write=True) as con:
            self._require_running(run_id, con)
            con.executemany(
                "INSERT OR REPLACE INTO skipped_files (run_id, split, category, path, reason) VALUES (?, ?, ?, ?, ?)",
                rows,
            )

    def set_run_details(self, run_id: str, details: Mapping[str, Any]) -> None:
        """Merge run-level results (JSON-safe, e.g. intervals of the mean) into the run's details."""
        with self._connect(write=True) as con:
            self._require_running(run_id, con)
            row = con.execute("SELECT details FROM run_details WHERE run_id = ?", (run_id,)).fetchone()
            merged = {**({} if row is None else json.loads(row["details"])), **dict(details)}
            con.execute("INSERT OR REPLACE INTO run_details (run_id, details) VALUES (?, ?)",
                        (run_id, to_json(merged, "run details")))

    def finish_run(self, run_id: str) -> None:
        """Close the run: ``complete``, or ``failed`` when every category failed (the error
        names the first failure). Every category must have been added or failed."""
        with self._connect(write=True) as con:
            info = self._require_running(run_id, con)
            done = {
                r[0]: (r[1], r[2])
                for r in con.execute("SELECT category, status, error FROM category_metrics WHERE run_id = ?", (run_id,))
            }
            missing = [c for c in info.categories if c not in done]
            if missing:
                raise RunStateError(
                    f"run {run_id}: cannot finish, categories {missing} were neither added nor failed "
                    "(record them, or call fail_run)"
                )
            now = now_iso()
            failed = [c for c in info.categories if done[c][0] == "failed"]
            every_failed = bool(info.categories) and len(failed) == len(info.categories)
            if every_failed:
                first = (done[failed[0]][1] or "no reason recorded").strip().splitlines()[0]
                con.execute(
                    "UPDATE runs SET status = 'failed', error = ?, finished = ?, updated = ? WHERE id = ?",
                    (f"every category failed; {failed[0]}: {first}", now, now, run_id),
                )
            else:
                con.execute(
                    "UPDATE runs SET status = 'complete', finished = ?, updated = ? WHERE id = ?",
                    (now, now, run_id),
                )
        # Observers (the dashboard's jobs) learn the run closed either way.
        self._notify(run_id, "failed" if every_failed else "complete")

    def fail_run(self, run_id: str, error: str) -> None:
        """Mark the run ``failed`` with ``error`` (categories already stored are kept)."""
        with self._connect(write=True) as con:
            self._require_running(run_id, con)
            now = now_iso()
            con.execute(
                "UPDATE runs SET status = 'failed', error = ?, finished = ?, updated = ? WHERE id = ?",
                (str(error), now, now, run_id),
            )
        self._notify(run_id, "failed")

    def delete_run(self, run_id: str, *, force: bool = False) -> None:
        """Remove a run from the index, then its files.

        A run still being written by a live process is refused unless ``force``.
        """
        with self._connect(write=True) as con:
            info = self._get(con, run_id)
            if info.status == "running" and not force and not self._is_dead(con, run_id):
                raise RunStateError(
                    f"run {run_id} is still running (pid {info.pid} on {info.hostname}); "
                    "pass force=True to delete it anyway"
                )
            con.execute("DELETE FROM runs WHERE id = ?", (run_id,))
        shutil.rmtree(self.root / run_id, ignore_errors=True)

    # ------------------------------------------------------------------ reading
    def get_run(self, run_id: str) -> RunInfo:
        """The run's index row (a run whose writer died is reported interrupted)."""
        with self._connect() as con:
            info = self._get(con, run_id)
            if info.status != "running" or not self._is_dead(con, run_id):
                return info
        self.reap_interrupted()
        with self._connect() as con:
            return self._get(con, run_id)

    def list_runs(
        self,
        *,
        method: str | Iterable[str] | None = None,
        dataset: str | Iterable[str] | None = None,
        status: str | Iterable[str] | None = None,
        random_weights: bool | None = None,
        limit: int | None = None,
        check_stale: bool = True,
    ) -> pd.DataFrame:
        """Runs, newest first, as a DataFrame (RunInfo columns plus ``n_ok``/``n_failed`` categories).

        With ``check_stale`` runs left ``running`` by a dead process on this host are first
        marked failed (``interrupted: ...``).
        """
        if check_stale:
            self.reap_interrupted()
        where, params = [], []
        for column, value in (("method", method), ("dataset", dataset), ("status", status)):
            values = _as_list(value)
            if values is not None:
                if column == "status":
                    bad = [v for v in values if v not in RUN_STATUSES]
                    if bad:
                        raise ValueError(f"unknown run status {bad}; expected some of {list(RUN_STATUSES)}")
                where.append(f"r.{column} IN ({', '.join('?' * len(values))})")
                params.extend(values)
        if random_weights is not None:
            where.append("r.random_weights = ?")
            params.append(int(random_weights))
        sql = (
            f"SELECT {', '.join('r.' + f for f in RUN_FIELDS)}, "
            "COALESCE(SUM(c.status = 'ok'), 0) AS n_ok, COALESCE(SUM(c.status = 'failed'), 0) AS n_failed "
            "FROM runs r LEFT JOIN category_metrics c ON c.run_id = r.id "
            + (f"WHERE {' AND '.join(where)} " if where else "")
            + "GROUP BY r.id ORDER BY r.created DESC, r.id DESC"
        )
        if limit is not None:
            sql += " LIMIT ?"
            params.append(int(limit))
        with self._connect() as con:
            rows = con.execute(sql, params).fetchall()
        records = []
        for row in rows:
            record = decode_run(row).__dict__.copy()
            record["n_ok"] = int(row["n_ok"])
            record["n_failed"] = int(row["n_failed"])
            records.append(record)
        columns = [*RUN_FIELDS, "n_ok", "n_failed"]
        df = pd.DataFrame.from_records(records, columns=columns)
        return df.astype({"random_weights": bool, "resolution": "int64", "n_ok": "int64", "n_failed": "int64"})

    def load_metrics(self, run_id: str) -> pd.DataFrame:
        """Per-category metrics of one run (fractions), in the run's category order.

        Columns: ``kind`` ("measured"), ``run_id``, ``category``, ``status``, ``error``, the
        :data:`METRIC_COLUMNS`, ``n_images``, ``seconds``. Categories not yet recorded are absent.
        """
        with self._connect() as con:
            info = self._get(con, run_id)
            rows = con.execute(
                f"SELECT category, status, error, {', '.join(METRIC_COLUMNS)}, n_images, seconds "
                "FROM category_metrics WHERE run_id = ?",
                (run_id,),
            ).fetchall()
        return metrics_frame(rows, {run_id: info})

    def load_skipped(self, run_id: str) -> pd.DataFrame:
        """Files left out of a run as unusable: columns ``split``, ``category``, ``path``, ``reason``."""
        with self._connect() as con:
            self._get(con, run_id)
            rows = con.execute(
                "SELECT split, category, path, reason FROM skipped_files WHERE run_id = ? "
                "ORDER BY split DESC, category, path",
                (run_id,),
            ).fetchall()
        return pd.DataFrame([tuple(r) for r in rows], columns=["split", "category", "path", "reason"])

    def load_report(self, run_id: str) -> dict[str, Any]:
        """What happened in a run, JSON-safe: status, error, per-category outcome, skipped files."""
        info = self.get_run(run_id)
        metrics = self.load_metrics(run_id)
        skipped = self.load_skipped(run_id)
        per_category: dict[str, dict[str, Any]] = {}
        for category in info.categories:
            row = metrics[metrics["category"] == category]
            n_images = None if row.empty or pd.isna(row["n_images"].iloc[0]) else int(row["n_images"].iloc[0])
            per_category[category] = {
                "status": "pending" if row.empty else str(row["status"].iloc[0]),
                "error": None if row.empty or pd.isna(row["error"].iloc[0]) else str(row["error"].iloc[0]),
                "n_images": n_images,
                "n_skipped": int(((skipped["split"] == "test") & (skipped["category"] == category)).sum()),
            }
        return {
            "run_id": info.id,
            "status": info.status,
            "interrupted": info.interrupted,
            "error": info.error,
            "categories": per_category,
            "skipped": skipped.to_dict("records"),
        }

    # ------------------------------------------------------------------ details (issue 12)
    def load_details(self, run_id: str) -> dict[str, dict[str, Any]]:
        """``category -> details`` of the run's ``ok`` categories (empty for runs stored without)."""
        with self._connect() as con:
            self._get(con, run_id)
            rows = con.execute("SELECT category, details FROM category_details WHERE run_id = ?", (run_id,)).fetchall()
        return {r["category"]: json.loads(r["details"]) for r in rows}

    def load_run_details(self, run_id: str) -> dict[str, Any]:
        """Run-level results (e.g. ``mean_intervals``, ``thresholds_from``); {} if none."""
        with self._connect() as con:
            self._get(con, run_id)
            row = con.execute("SELECT details FROM run_details WHERE run_id = ?", (run_id,)).fetchone()
        return {} if row is None else json.loads(row["details"])

    def load_defects(self, run_id: str) -> pd.DataFrame:
        """Per-defect-type results: ``category, defect, n, n_masked, image_auroc, pixel_auroc,
        aupro`` (that type's images against all normals of the category; NaN: not available)."""
        from harmoniad.store.details import defects_frame

        return defects_frame(self.get_run(run_id), self.load_details(run_id))

    def load_intervals(self, run_id: str) -> pd.DataFrame:
        """Bootstrap intervals: ``category`` (``"mean"`` for the mean over categories),
        ``metric``, ``estimate``, ``low``, ``high``, ``level``, ``n_resamples``."""
        from harmoniad.store.details import intervals_frame

        return intervals_frame(self.get_run(run_id), self.load_metrics(run_id), self.load_details(run_id),
                               self.load_run_details(run_id))

    def load_thresholds(self, run_id: str) -> pd.DataFrame:
        """Operating points per category: ``rule`` (``fpr``, ``max``: fitted on held-out
        training normals; ``oracle``: F1-max on the test labels), ``label``, ``value``,
        ``target_fpr``, ``n_normals``, ``tp, fp, tn, fn, precision, recall, fpr`` on the test set."""
        from harmoniad.store.details import thresholds_frame

        return thresholds_frame(self.get_run(run_id), self.load_details(run_id))

    def run_json(self, run_id: str) -> dict[str, Any]:
        """The machine-readable view of a run (``runs show --json``; schema in the README)."""
        from harmoniad.store.details import run_json

        return run_json(self, run_id)

    def paired_test(self, run_a: str, run_b: str, *, pixel: bool = False, n_resamples: int = 1000,
                    seed: int = 0) -> pd.DataFrame:
        """Compare two runs on the images they share, per category: DeLong's test of image
        AUROC from the stored scores, and with ``pixel`` a paired bootstrap of pixel AUROC
        and AUPRO from the stored maps (float16 maps: use float16 map precision)."""
        from harmoniad.store.details import paired_test

        return paired_test(self, run_a, run_b, pixel=pixel, n_resamples=n_resamples, seed=seed)

    def seed_summary(self, run_ids: Sequence[str]) -> pd.DataFrame:
        """Mean ± sd of every metric over runs that differ only in their seed (same method,
        dataset and request otherwise): ``category`` (and ``"mean"``), ``metric``, ``mean``,
        ``sd``, ``n``."""
        from harmoniad.store.details import seed_summary

        return seed_summary(self, list(run_ids))

    def friedman(self, run_ids: Sequence[str], metric: str = "image_auroc", alpha: float = 0.05) -> dict[str, Any]:
        """Friedman test over shared categories for three or more runs (one per method), with
        average ranks, Nemenyi's critical difference and the cliques of a CD diagram."""
        from harmoniad.store.details import friedman

        return friedman(self, list(run_ids), metric, alpha)

    def metrics_table(
        self,
        *,
        method: str | Iterable[str] | None = None,
        dataset: str | Iterable[str] | None = None,
        status: str | Iterable[str] | None = "complete",
    ) -> pd.DataFrame:
        """Per-category metrics of many runs with their method/dataset/backbone, ``kind`` "measured"."""
        runs = self.list_runs(method=method, dataset=dataset, status=status)
        if runs.empty:
            return metrics_frame([], {}, with_run_columns=True)
        ids = list(runs["id"])
        infos: dict[str, RunInfo] = {}
        rows: list[sqlite3.Row] = []
        with self._connect() as con:
            for chunk in _chunks(ids, 500):
                for row in con.execute(f"SELECT * FROM runs WHERE id IN ({', '.join('?' * len(chunk))})", chunk):
                    infos[row["id"]] = decode_run(row)
            for chunk in _chunks(ids, 500):
                rows.extend(
                    con.execute(
                        f"SELECT run_id, category, status, error, {', '.join(METRIC_COLUMNS)}, n_images, seconds "
                        f"FROM category_metrics WHERE run_id IN ({', '.join('?' * len(chunk))})",
                        chunk,
                    ).fetchall()
                )
        return metrics_frame(rows, infos, with_run_columns=True)

    def leaderboard(
        self,
        *,
        method: str | Iterable[str] | None = None,
        dataset: str | Iterable[str] | None = None,
    ) -> pd.DataFrame:
        """One row per complete run: the mean of each metric over its ``ok`` categories.

        Columns match ``harmoniad.store.published.published_results()`` where they can (``kind``
        "measured", ``method``, ``dataset``, ``backbone``, ``resolution``, metric columns),
        plus ``run_id``, ``created``, ``random_weights``, ``n_categories``, ``n_failed``.
        """
        table = self.metrics_table(method=method, dataset=dataset, status="complete")
        columns = [
            "kind", "run_id", "created", "method", "dataset", "backbone", "random_weights",
            "resolution", *METRIC_COLUMNS, "n_categories", "n_failed",
        ]  # fmt: skip
        if table.empty:
            return pd.DataFrame(columns=columns)
        keys = ["run_id", "created", "method", "dataset", "backbone", "random_weights", "resolution"]
        ok = table[table["status"] == "ok"]
        means = ok.groupby("run_id")[list(METRIC_COLUMNS)].mean()
        counts = table.groupby("run_id")["status"].agg(
            n_categories=lambda s: int((s == "ok").sum()), n_failed=lambda s: int((s == "failed").sum())
        )
        runs = table[keys].drop_duplicates("run_id").set_index("run_id")
        out = runs.join(means).join(counts).reset_index()
        out.insert(0, "kind", "measured")
        return out[columns].sort_values("created", ascending=False, ignore_index=True)

    def load_images(self, run_id: str) -> pd.DataFrame:
        """Per-image table of a run (all ``ok`` categories so far), ordered by ``index``.

        ``index`` is the image's number within the run, the key of :meth:`load_maps`.
        """
        with self._connect() as con:
            self._get(con, run_id)
            parts = con.execute(
                "SELECT category, index_start, images_file FROM category_metrics "
                "WHERE run_id = ? AND status = 'ok' ORDER BY index_start",
                (run_id,),
            ).fetchall()
        tables = []
        for part in parts:
            path = self.root / run_id / part["images_file"]
            try:
                table = pq.read_table(path)
            except FileNotFoundError as exc:
                raise RunDataMissing(
                    f"run {run_id}: per-image table of category {part['category']!r} is missing: {path} "
                    "(run files deleted? delete the run or re-run it)"
                ) from exc
            except (pa.ArrowInvalid, OSError) as exc:
                raise RunDataMissing(f"run {run_id}: per-image table {path} is unreadable: {exc}") from exc
            start = int(part["index_start"])
            index = pa.array(np.arange(start, start + table.num_rows, dtype=np.int64))
            tables.append(table.add_column(0, "index", index))
        if not tables:
            return empty_images_frame()
        combined = pa.concat_tables(tables, promote_options="permissive")
        return combined.to_pandas()

    def load_maps(self, run_id: str, image_index: int) -> dict[str, np.ndarray]:
        """Maps of one image (``name -> (R, R) float32``) and its ``"mask"`` ((R, R) bool).

        Only that image's bytes are read from the category's maps file.
        """
        image_index = int(image_index)
        with self._connect() as con:
            self._get(con, run_id)
            part = con.execute(
                "SELECT category, index_start, maps_file FROM category_metrics WHERE run_id = ? AND status = 'ok' "
                "AND index_start <= ? AND ? < index_start + n_images",
                (run_id, image_index, image_index),
            ).fetchone()
        if part is None:
            raise IndexError(f"run {run_id}: no stored image with index {image_index}")
        path = self.root / run_id / part["maps_file"]
        return read_maps(path, image_index - int(part["index_start"]), where=f"run {run_id}")

    def export_csv(self, run_id: str, directory: str | os.PathLike[str]) -> list[Path]:
        """Write the run's metrics, per-image scores and record as files (:func:`.export.export_csv`)."""
        from harmoniad.store.export import export_csv

        return export_csv(self, run_id, directory)

    def export_details_csv(self, run_id: str, directory: str | os.PathLike[str]) -> list[Path]:
        """Write the run's per-defect results, thresholds and skipped files as CSV
        (:func:`.export.export_details_csv`)."""
        from harmoniad.store.export import export_details_csv

        return export_details_csv(self, run_id, directory)

    # ------------------------------------------------------------------ stale runs
    def reap_interrupted(self) -> list[str]:
        """Mark ``running`` runs whose writer process died (on this host) as failed; return their ids."""
        host = socket.gethostname()
        with self._connect() as con:
            candidates = con.execute(
                "SELECT id, pid, pid_start FROM runs WHERE status = 'running' AND hostname = ?", (host,)
            ).fetchall()
        dead = [r for r in candidates if not _process_alive(r["pid"], r["pid_start"])]
        if not dead:
            return []
        reaped = []
        try:
            with self._connect(write=True) as con:
                now = now_iso()
                for r in dead:
                    cur = con.execute(
                        "UPDATE runs SET status = 'failed', error = ?, finished = ?, updated = ? "
                        "WHERE id = ? AND status = 'running' AND pid = ?",
                        (
                            f"{INTERRUPTED}process {r['pid']} on {host} ended before the run finished",
                            *(now, now, r["id"], r["pid"]),
                        ),
                    )
                    if cur.rowcount:
                        reaped.append(r["id"])
        except sqlite3.OperationalError:
            return []  # read-only store: report runs as stored
        return reaped

    # ------------------------------------------------------------------ helpers
    def _get(self, con: sqlite3.Connection, run_id: str) -> RunInfo:
        row = con.execute("SELECT * FROM runs WHERE id = ?", (run_id,)).fetchone()
        if row is None:
            raise RunNotFound(f"no run {run_id!r} in {self.db_path}")
        return decode_run(row)

    def _require_running(self, run_id: str, con: sqlite3.Connection | None = None) -> RunInfo:
        if con is None:
            with self._connect() as fresh:
                return self._require_running(run_id, fresh)
        info = self._get(con, run_id)
        if info.status != "running":
            raise RunStateError(f"run {run_id} is {info.status}, not running; it can no longer be written")
        return info

    def _is_dead(self, con: sqlite3.Connection, run_id: str) -> bool:
        row = con.execute("SELECT pid, pid_start, hostname FROM runs WHERE id = ?", (run_id,)).fetchone()
        return row["hostname"] == socket.gethostname() and not _process_alive(row["pid"], row["pid_start"])

    @staticmethod
    def _replace_skipped(con: sqlite3.Connection, run_id: str, category: str, files: Iterable[tuple[str, str]]) -> None:
        """The category's skipped test files become ``files`` (inside the caller's transaction)."""
        con.execute("DELETE FROM skipped_files WHERE run_id = ? AND split = 'test' AND category = ?", (run_id, category))
        con.executemany(
            "INSERT OR REPLACE INTO skipped_files (run_id, split, category, path, reason) VALUES (?, 'test', ?, ?, ?)",
            [(run_id, category, str(path), str(reason)) for path, reason in files],
        )

    @staticmethod
    def _replace_details(con: sqlite3.Connection, run_id: str, category: str, details_json: str | None) -> None:
        con.execute("DELETE FROM category_details WHERE run_id = ? AND category = ?", (run_id, category))
        if details_json is not None:
            con.execute("INSERT INTO category_details (run_id, category, details) VALUES (?, ?, ?)",
                        (run_id, category, details_json))

    @staticmethod
    def _upsert_category(
        con: sqlite3.Connection, run_id: str, category: str, *, metrics: dict[str, float], **values: Any
    ) -> None:
        row = {"run_id": run_id, "category": category, **values, "recorded": now_iso()}
        row.update({m: metrics.get(m) for m in METRIC_COLUMNS})
        cols = list(row)
        con.execute(
            f"INSERT OR REPLACE INTO category_metrics ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            [row[c] for c in cols],
        )
        con.execute("UPDATE runs SET updated = ? WHERE id = ?", (row["recorded"], run_id))


# ---------------------------------------------------------------------- module helpers
def _check_category(info: RunInfo, category: str) -> str:
    category = str(category)
    if category not in info.categories:
        raise ValueError(f"run {info.id}: category {category!r} is not one of its categories {list(info.categories)}")
    return category


def _safe_name(category: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", category)[:64] or "category"


def _as_list(value: str | Iterable[str] | None) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (Linux), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()


def _process_start(pid: int) -> str | None:
    """The process's start time (Linux), to tell a live writer from a reused pid."""
    stat = _proc_stat(pid)
    return None if stat is None else stat[19]


def _process_alive(pid: int | None, start: str | None) -> bool:
    if pid is None:
        return True  # unknown writer: never declare it dead
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    stat = _proc_stat(pid)
    if stat is not None:
        if stat[0] == "Z":
            return False  # exited, not yet reaped by its parent
        if start is not None and stat[19] != start:
            return False  # pid reused by another process
    return True
