"""Dataset faults: every bad file is either refused with a named error or skipped and listed.

The rule (harmoniad.data.screening): a *structural* fault (a mask of the wrong size, a missing
mask, a category without images) refuses that category with the reader's DatasetError,
which the run records as the category's error while the other categories complete; a fault
of *one file* (cut short, empty, not an image, too large, unreadable, a link loop, a name
that is not UTF-8) leaves that file out and lists it, with the reason, in the run's report.
"""

from __future__ import annotations

import json
import os
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harmoniad import cli
from harmoniad.backbone import TINY_BACKBONE
from harmoniad.data import DatasetError, Sample, load_dataset, read_image
from harmoniad.evaluate import EvalRequest, evaluate
from harmoniad.runtime.progress import silent
from harmoniad.data.screening import Screen, load_categories
from harmoniad.store import ResultStore
from tests.integration.robustness import faults

GOOD_DIR = ("weave", "test", "good")


def _good(root: Path, name: str = "000.png") -> Path:
    return root.joinpath(*GOOD_DIR, name)


# ------------------------------------------------------------------ one file, read directly


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d, src: faults.truncated_png(src, d / "cut.png"), r"cut\.png: image data is truncated"),
        (lambda d, src: faults.zero_byte(d / "empty.png"), r"empty\.png: not a readable image"),
        (lambda d, src: faults.huge_png(d / "huge.png"), r"huge\.png: refused as a possible decompression bomb"),
        (lambda d, src: faults.huge_png(d / "big.png", 9000, 8000), r"big\.png: 9000x8000 = 72000000 pixels is over"),
        (lambda d, src: faults.symlink_loop(d)[0], r"loop_a\.png: no such image file"),
    ],
    ids=["truncated", "zero-byte", "20000x20000", "over-limit", "symlink-loop"],
)
def test_a_bad_file_raises_a_dataset_error_naming_it(clean_dataset: Path, tmp_path: Path, make, message) -> None:
    path = make(tmp_path, _good(clean_dataset))
    with pytest.raises(DatasetError, match=message):
        read_image(path)


def test_the_huge_image_is_refused_from_its_header_without_allocating_it(tmp_path: Path) -> None:
    path = faults.huge_png(tmp_path / "huge.png")
    assert path.stat().st_size < 200_000  # a real, valid 20000 x 20000 PNG
    tracemalloc.start()
    try:
        with pytest.raises(DatasetError, match="decompression bomb"):
            read_image(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000, f"refusing the bomb allocated {peak} bytes"


def test_jpeg_named_png_and_one_pixel_images_are_read_by_content(clean_dataset: Path, tmp_path: Path) -> None:
    jpeg = read_image(faults.jpeg_named_png(tmp_path / "photo.png"))
    assert jpeg.shape == (64, 64, 3) and jpeg.dtype == np.uint8
    assert read_image(faults.one_pixel(tmp_path / "dot.png")).tolist() == [[[128, 64, 32]]]


def test_a_non_utf8_name_is_readable_but_not_recordable(clean_dataset: Path, tmp_path: Path) -> None:
    path = faults.non_utf8_copy(_good(clean_dataset), tmp_path)
    assert read_image(path).shape == (64, 64, 3)  # the OS and Pillow cope ...
    with pytest.raises(UnicodeEncodeError):
        str(path).encode("utf-8")  # ... but a UTF-8 table (parquet, SQLite, JSON) cannot hold it
    [skipped] = Screen().keep([Sample(path, None, "weave", "good", 0, "test")])[1]
    assert "not valid UTF-8" in skipped.reason and "\\xe8" in skipped.path  # printable, still recognisable
    skipped.path.encode("utf-8")


def test_permission_denied_is_a_reported_reason(clean_dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _good(clean_dataset)
    sample = Sample(path, None, "weave", "good", 0, "test")
    with faults.unreadable(monkeypatch, path):  # root ignores chmod 000: open() is patched
        kept, [skipped] = Screen().keep([sample])
    assert kept == [] and "Permission denied" in skipped.reason and str(path) in skipped.reason


def test_header_screen_is_cheap_and_decode_screen_finds_truncation(clean_dataset: Path, tmp_path: Path) -> None:
    cut = faults.truncated_png(_good(clean_dataset), tmp_path / "cut.png")
    sample = Sample(cut, None, "weave", "good", 0, "test")
    screen = Screen()
    assert screen.keep([sample])[0] == [sample]  # the header is intact: not found without decoding
    kept, [skipped] = screen.keep([sample], decode=True)
    assert kept == [] and "truncated" in skipped.reason


# ------------------------------------------------------------------ a whole run


@pytest.fixture
def damaged(dataset: Path) -> dict[str, object]:
    """The weave category with one of every per-file fault; flange left clean."""
    good = dataset.joinpath(*GOOD_DIR)
    src = good / "000.png"
    bad_test = {
        faults.truncated_png(src, good / "cut.png").name: "truncated",
        faults.zero_byte(good / "empty.png").name: "not a readable image",
        faults.huge_png(good / "huge.png").name: "decompression bomb",
        faults.symlink_loop(good)[0].name: "symbolic link loop",
        "loop_b.png": "symbolic link loop",
        faults.non_utf8_copy(src, good).name: "not valid UTF-8",
        "001.png": "Permission denied",  # made unreadable while evaluating
    }
    fine_test = [faults.jpeg_named_png(good / "photo.png").name, faults.one_pixel(good / "dot.png").name]
    # A defective image whose mask is cut short: the pair is left out.
    defect = next(d for d in sorted((dataset / "weave" / "test").iterdir()) if d.name != "good")
    image = min(defect.iterdir())
    mask = dataset / "weave" / "ground_truth" / defect.name / f"{image.stem}_mask.png"
    faults.truncated_png(mask, mask.with_name("tmp"), keep=0.5).replace(mask)
    bad_test[image.name] = "truncated"
    train = dataset / "weave" / "train" / "good"
    bad_train = {
        faults.truncated_png(train / "000.png", train / "cut.png").name: "truncated",
        faults.zero_byte(train / "empty.png").name: "not a readable image",
    }
    # A directory cycle and a bare folder that is no category: neither may hang or break the run.
    os.symlink("..", dataset / "weave" / "test" / "cycle")
    (dataset / "leftover").mkdir()
    return {
        "root": dataset,
        "bad_test": bad_test,
        "fine_test": fine_test,
        "bad_train": bad_train,
        "unreadable": good / "001.png",
        "defect_image": image,
        "mask": mask,
    }


def test_bad_files_are_skipped_and_listed_and_the_run_completes(
    damaged: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root: Path = damaged["root"]
    monkeypatch.setenv("HARMONIAD_CACHE", str(tmp_path / "cache"))
    store = ResultStore(tmp_path / "runs")
    request = EvalRequest("synthetic", str(root), ("freqfilter", "patchcore"), backbone=TINY_BACKBONE, resolution=32)
    listed = {s.image_path.name for s in load_dataset("synthetic", root, ["weave"]) if s.label == 0}
    with faults.unreadable(monkeypatch, damaged["unreadable"]):
        ids = evaluate(request, store, silent)

    for run_id in ids:  # freqfilter reads pixels itself, patchcore goes through the feature cache
        info = store.get_run(run_id)
        assert info.status == "complete", info.error
        metrics = store.load_metrics(run_id).set_index("category")
        assert list(metrics["status"]) == ["ok", "ok"], metrics["error"].tolist()
        skipped = store.load_skipped(run_id)
        test_skips = skipped[skipped["split"] == "test"]
        assert set(test_skips["category"]) == {"weave"}
        names = {Path(p).name: r for p, r in zip(test_skips["path"], test_skips["reason"])}
        assert set(names) == {_printable(n) for n in damaged["bad_test"]}
        for name, why in damaged["bad_test"].items():
            reason = names[_printable(name)]
            culprit = damaged["mask"].name if name == damaged["defect_image"].name else _printable(name)
            assert why in reason and culprit in reason, reason  # the reason names the bad file
        train_skips = skipped[skipped["split"] == "train"]
        train_names = {Path(p).name: r for p, r in zip(train_skips["path"], train_skips["reason"])}
        assert set(train_names) == set(damaged["bad_train"])
        for name, why in damaged["bad_train"].items():
            assert why in train_names[name]
        # Everything else was scored, including the JPEG named .png and the 1x1 image.
        images = store.load_images(run_id)
        weave = images[images["category"] == "weave"]
        assert metrics.loc["weave", "n_images"] == len(weave)
        scored = {Path(p).name for p in weave["image_path"]}
        assert set(damaged["fine_test"]) <= scored
        assert not scored & {n for n in damaged["bad_test"] if n != damaged["defect_image"].name}
        assert np.isfinite(weave["score"]).all()
        assert len(images[images["category"] == "flange"]) == metrics.loc["flange", "n_images"] > 0
        report = store.load_report(run_id)
        assert report["categories"]["weave"]["n_skipped"] == len(damaged["bad_test"])
        assert report["categories"]["flange"]["n_skipped"] == 0
    assert set(damaged["fine_test"]) <= listed
    # The command line shows the list with the run.
    capsys.readouterr()
    assert cli.main(["runs", "--store", str(tmp_path / "runs"), "show", ids[0]]) == 0
    shown = capsys.readouterr().out
    assert f"{len(damaged['bad_test']) + len(damaged['bad_train'])} unusable file(s) left out" in shown
    assert "[train]" in shown and "symbolic link loop" in shown


def _printable(name: str) -> str:
    """A file name as the report shows it (non-UTF-8 bytes as \\xNN escapes)."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


# ------------------------------------------------------------------ structural faults


def _wrong_size_mask(root: Path) -> str:
    mask = next((root / "flange" / "ground_truth").rglob("*_mask.png"))
    Image.new("L", (10, 12), 255).save(mask)
    return rf"{mask.name}: mask is 10x12 but its image .* is 64x64"


def _missing_mask(root: Path) -> str:
    mask = next((root / "flange" / "ground_truth").rglob("*_mask.png"))
    mask.unlink()
    return rf"{mask.name[: -len('_mask.png')]}\.png: defective image has no mask"


def _empty_category(root: Path) -> str:
    for p in (root / "flange" / "train" / "good").iterdir():
        p.unlink()
    return r"flange/train/good: no images"


@pytest.mark.parametrize(
    "damage",
    [_wrong_size_mask, _missing_mask, _empty_category],
    ids=["mask-wrong-size", "missing-mask", "category-without-images"],
)
def test_a_structural_fault_refuses_its_category_and_the_rest_completes(dataset: Path, tmp_path: Path, damage) -> None:
    message = damage(dataset)
    with pytest.raises(DatasetError, match=message):
        load_dataset("synthetic", dataset, ["flange"], split="all")
    assert load_categories("synthetic", dataset).broken.keys() == {"flange"}

    store = ResultStore(tmp_path / "runs")
    [run_id] = evaluate(EvalRequest("synthetic", str(dataset), ("freqfilter",), resolution=32), store, silent)
    info = store.get_run(run_id)
    assert info.status == "complete" and info.categories == ("flange", "weave")
    metrics = store.load_metrics(run_id).set_index("category")
    assert metrics.loc["weave", "status"] == "ok"
    assert metrics.loc["flange", "status"] == "failed"
    assert re.search(message, metrics.loc["flange", "error"])


def test_when_every_category_is_malformed_the_error_is_raised(dataset: Path, tmp_path: Path) -> None:
    _empty_category(dataset)
    store = ResultStore(tmp_path / "runs")
    request = EvalRequest("synthetic", str(dataset), ("freqfilter",), categories=("flange",), resolution=32)
    with pytest.raises(DatasetError, match="flange/train/good: no images"):
        evaluate(request, store, silent)
    assert store.list_runs().empty


def test_command_line_training_skips_and_lists_unreadable_images(
    dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("HARMONIAD_CACHE", str(tmp_path / "cache"))
    train_dir = dataset / "weave" / "train" / "good"
    faults.truncated_png(train_dir / "000.png", train_dir / "cut.png")
    faults.zero_byte(train_dir / "empty.png")
    out = tmp_path / "ckpt"
    rc = cli.main(
        [
            "train",
            "--dataset",
            "synthetic",
            "--root",
            str(dataset),
            "--model",
            "harmoniad-tiny",
            "--weights",
            "random",
            "--image-size",
            "128",
            "--hidden-dim",
            "16",
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    err = capsys.readouterr().err
    assert rc == 0, err
    assert re.search(r"skipped: .*cut\.png: image data is truncated", err)
    assert re.search(r"skipped: .*empty\.png: not a readable image", err)
    config = json.loads((out / "config.json").read_text())
    assert config["data"]["images"] == 8  # 4 clean images in each of the two categories


def test_a_category_whose_every_image_is_unusable_fails_and_lists_them(dataset: Path, tmp_path: Path) -> None:
    test_images = sorted((dataset / "flange" / "test").rglob("*.png"))
    for path in test_images:  # headers intact, pixel data cut: found only when decoded
        faults.truncated_png(path, path.with_name("tmp"), keep=0.5).replace(path)
    store = ResultStore(tmp_path / "runs")
    [run_id] = evaluate(EvalRequest("synthetic", str(dataset), ("freqfilter",), resolution=32), store, silent)
    assert store.get_run(run_id).status == "complete"
    metrics = store.load_metrics(run_id).set_index("category")
    assert metrics.loc["weave", "status"] == "ok"
    assert metrics.loc["flange", "status"] == "failed"
    assert f"all {len(test_images)} images were skipped as unusable" in metrics.loc["flange", "error"]
    skipped = store.load_skipped(run_id)
    assert sorted(skipped["path"]) == sorted(str(p) for p in test_images)
    assert skipped["reason"].str.contains("truncated").all()
