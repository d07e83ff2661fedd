"""benchmarks/bench_end_to_end.py (and bench_decode_workers.py) run on a few images and end with their JSON line."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.paths import REPO


def test_quick_benchmark_on_a_handful_of_images_reports_every_figure(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_end_to_end.py"), "--quick", "--images", "12",
           "--per-category", "5", "--image-size", "64", "--device", "cpu", "--threads", "1", "--repeats", "1",
           "--data", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert {"images", "images_per_s", "backbone_images_per_s", "ratio", "peak_rss_mib"} <= last.keys()
    assert last["images"] == 12 and last["peak_device_mib"] is None
    assert last["images_per_s"] > 0 and last["backbone_images_per_s"] > 0 and last["peak_rss_mib"] > 100
    assert abs(last["ratio"] - last["backbone_images_per_s"] / last["images_per_s"]) < 0.01 * last["ratio"]
    # CPU time an image of each pipeline: both did work (decode at least), and no more than
    # all cores for the whole round could give.
    for key, per_s in (("cpu_ms_per_image", "images_per_s"), ("backbone_cpu_ms_per_image", "backbone_images_per_s")):
        assert 0 < last[key] <= 1e3 / last[per_s] * (os.cpu_count() or 1) * 1.05, (key, last)
    # Everything reached the store: 3 categories (5 + 5 + 2 images) recorded, warm-up excluded.
    from harmoniad.store import ResultStore

    runs = ResultStore(tmp_path / "runs").list_runs()
    assert len(runs) == 1 and runs["status"].tolist() == ["complete"]
    images = ResultStore(tmp_path / "runs").load_images(runs["id"].iloc[0])
    assert len(images) == 12 and images["category"].nunique() == 3


def test_decode_workers_benchmark_reports_the_cost_a_category(tmp_path):
    cmd = [sys.executable, str(REPO / "benchmarks" / "bench_decode_workers.py"), "--images", "12", "--per-category",
           "4", "--image-size", "32", "--workers", "2", "--batch", "4", "--repeats", "1"]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    last = json.loads(done.stdout.strip().splitlines()[-1])
    assert last["images"] == 12 and last["categories"] == 3 and last["workers"] == 2
    assert min(last["one_stream_s"], last["per_category_s"], last["reused_s"]) > 0
    for key, way in (("per_category_ms", "per_category_s"), ("reused_ms", "reused_s")):
        assert abs(last[key] - (last[way] - last["one_stream_s"]) / 3 * 1e3) < 1.0
