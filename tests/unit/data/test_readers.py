"""Dataset readers on trees built in tmp_path: every layout, stem pairing, every bad input."""

from __future__ import annotations

import csv
import os
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harmoniad.data import (
    DATASETS,
    DatasetError,
    Sample,
    list_categories,
    load_dataset,
    read_image,
    read_mask,
)
from tests.unit.data.test_io import _png_with_header
from tests.paths import SHARED_DATA

SIZE = (16, 12)  # width, height


def _img(path: Path, size: tuple[int, int] = SIZE, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)
    return path


def _mask(path: Path, n_pixels: int, size: tuple[int, int] = SIZE, on: int = 255) -> Path:
    """A mask with exactly ``n_pixels`` anomalous pixels: the count identifies the mask."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros(size[0] * size[1], np.uint8)
    arr[:n_pixels] = on
    Image.fromarray(arr.reshape(size[1], size[0]), mode="L").save(path)
    return path


def _mvtec_category(root: Path, name: str = "widget") -> Path:
    """Stems 1, 2, 10: name order ('1', '10', '2') differs from mask order ('10_mask', '1_mask', ...)."""
    cat = root / name
    for i in range(3):
        _img(cat / "train" / "good" / f"{i:03d}.png")
    _img(cat / "test" / "good" / "000.png")
    for stem in ("1", "2", "10"):
        _img(cat / "test" / "crack" / f"{stem}.png")
        _mask(cat / "ground_truth" / "crack" / f"{stem}_mask.png", int(stem))
    _img(cat / "test" / "hole" / "000.png")
    _mask(cat / "ground_truth" / "hole" / "000_mask.png", 5)
    return cat


def _check_stem_pairing(samples: list[Sample]) -> None:
    for s in samples:
        if s.mask_path is not None and s.image_path.stem.isdigit() and s.defect == "crack":
            assert read_mask(s.mask_path).sum() == int(s.image_path.stem)


# --------------------------------------------------------------------------- MVTec


def test_mvtec_reads_every_split_and_pairs_masks_by_stem(tmp_path: Path) -> None:
    _mvtec_category(tmp_path, "widget")
    _mvtec_category(tmp_path, "gadget")
    (tmp_path / "README.txt").write_text("not a category")
    assert list_categories("mvtec", tmp_path) == ["gadget", "widget"]

    test = load_dataset("mvtec", tmp_path, categories=["widget"])
    assert all(s.split == "test" and s.category == "widget" for s in test)
    assert Counter((s.defect, s.label) for s in test) == {("good", 0): 1, ("crack", 1): 3, ("hole", 1): 1}
    assert all((s.mask_path is None) == (s.label == 0) for s in test)
    _check_stem_pairing(test)

    train = load_dataset("mvtec", tmp_path, categories="widget", split="train")
    assert [s.image_path.name for s in train] == ["000.png", "001.png", "002.png"]
    assert all(s.label == 0 and s.mask_path is None and s.split == "train" for s in train)

    everything = load_dataset("mvtec", tmp_path, split="all")
    assert len(everything) == 2 * (3 + 5)
    assert [s.category for s in everything][:8] == ["gadget"] * 8  # categories in order, train first
    assert everything[0].split == "train" and everything[7].split == "test"
    assert all(s.image_path.is_absolute() for s in everything)


def test_mvtec_ignores_hidden_and_non_image_files(tmp_path: Path) -> None:
    cat = _mvtec_category(tmp_path)
    (cat / "train" / "good" / "notes.txt").write_text("x")
    _img(cat / "train" / "good" / ".000.png.tmp.png")
    (cat / "train" / "good" / ".DS_Store").write_bytes(b"\0")
    assert len(load_dataset("mvtec", tmp_path, split="train")) == 3


def test_mvtec_grayscale_images_are_read_as_rgb(tmp_path: Path) -> None:
    cat = _mvtec_category(tmp_path)
    Image.new("L", SIZE, 77).save(cat / "test" / "good" / "000.png")
    sample = next(s for s in load_dataset("mvtec", tmp_path) if s.label == 0)
    img = read_image(sample.image_path)
    assert img.shape == (SIZE[1], SIZE[0], 3) and (img == 77).all()


def test_defective_image_without_mask_is_refused(tmp_path: Path) -> None:
    cat = _mvtec_category(tmp_path)
    (cat / "ground_truth" / "crack" / "2_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"crack/2\.png.*no mask.*2_mask\.png"):
        load_dataset("mvtec", tmp_path)


def test_mvtec_mask_must_be_named_stem_mask_png(tmp_path: Path) -> None:
    cat = _mvtec_category(tmp_path)
    (cat / "ground_truth" / "hole" / "000_mask.png").rename(cat / "ground_truth" / "hole" / "000.png")
    with pytest.raises(DatasetError, match=r"hole/000\.png.*no mask.*000_mask\.png"):
        load_dataset("mvtec", tmp_path)


def test_missing_ground_truth_folder_is_refused(tmp_path: Path) -> None:
    cat = _mvtec_category(tmp_path)
    shutil.rmtree(cat / "ground_truth" / "hole")
    with pytest.raises(DatasetError, match="no mask"):
        load_dataset("mvtec", tmp_path)


def test_mask_of_another_size_is_refused(tmp_path: Path) -> None:
    cat = _mvtec_category(tmp_path)
    _mask(cat / "ground_truth" / "crack" / "10_mask.png", 3, size=(SIZE[0] + 1, SIZE[1]))
    with pytest.raises(DatasetError, match=r"10_mask\.png.*17x12.*10\.png.*16x12"):
        load_dataset("mvtec", tmp_path)


def test_bad_roots_and_categories(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nowhere.*does not exist"):
        load_dataset("mvtec", tmp_path / "nowhere")
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    with pytest.raises(DatasetError, match="not a directory"):
        list_categories("mvtec", afile)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetError, match=r"empty.*no known mvtec layout.*<category>"):
        load_dataset("mvtec", empty)
    root = tmp_path / "data"
    _mvtec_category(root, "widget")
    with pytest.raises(DatasetError, match=r"\['bolt'\] not found; available: \['widget'\]"):
        load_dataset("mvtec", root, categories=["widget", "bolt"])
    with pytest.raises(DatasetError, match="unknown dataset 'kitti'"):
        load_dataset("kitti", root)
    with pytest.raises(DatasetError, match="split 'val'"):
        load_dataset("mvtec", root, split="val")
    with pytest.raises(DatasetError, match="single category"):
        load_dataset("mvtec", root / "widget")  # one category's folder given as the root


def test_broken_category_trees_are_refused(tmp_path: Path) -> None:
    cat = _mvtec_category(tmp_path)
    shutil.rmtree(cat / "train")
    with pytest.raises(DatasetError, match=r"train/good: missing"):
        load_dataset("mvtec", tmp_path, split="train")
    _img(cat / "train" / "good" / "000.png")
    _img(cat / "train" / "bad" / "000.png")
    with pytest.raises(DatasetError, match=r"train: unexpected folders \['bad'\]"):
        load_dataset("mvtec", tmp_path, split="train")
    shutil.rmtree(cat / "train" / "bad")
    (cat / "train" / "good" / "000.png").unlink()
    with pytest.raises(DatasetError, match=r"train/good: no images"):
        load_dataset("mvtec", tmp_path, split="train")


def test_two_images_with_one_stem_are_ambiguous(tmp_path: Path) -> None:
    cat = _mvtec_category(tmp_path)
    _img(cat / "test" / "hole" / "000.bmp")
    with pytest.raises(DatasetError, match=r"hole.*000\.bmp.*000\.png.*share the stem"):
        load_dataset("mvtec", tmp_path)


def test_unreadable_or_oversized_defective_image_is_left_to_screening(tmp_path: Path) -> None:
    """One bad defective image is that file's fault, not the tree's: the reader returns it
    and screening leaves it out with the reason (it used to refuse the whole category)."""
    from harmoniad.data.screening import Screen

    cat = _mvtec_category(tmp_path)
    bad = cat / "test" / "hole" / "000.png"
    for write, reason in ((lambda: bad.write_bytes(b"garbage"), r"hole/000\.png.*not a readable image"),
                          (lambda: bad.write_bytes(b""), r"hole/000\.png.*not a readable image"),
                          (lambda: _png_with_header(bad, 9000, 9000), r"hole/000\.png.*over the limit")):
        write()
        samples = load_dataset("mvtec", tmp_path)
        assert len(samples) == 5 and bad in [s.image_path for s in samples]
        kept, [skipped] = Screen().keep(samples)
        assert len(kept) == 4 and re.search(reason, skipped.reason)


def test_truncated_image_is_refused_when_read(tmp_path: Path) -> None:
    cat = _mvtec_category(tmp_path)
    good = cat / "test" / "good" / "000.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), np.uint8)).save(good)
    good.write_bytes(good.read_bytes()[:-60])
    sample = next(s for s in load_dataset("mvtec", tmp_path) if s.image_path == good)
    with pytest.raises(DatasetError, match=r"good/000\.png.*truncated"):
        read_image(sample.image_path)


# --------------------------------------------------------------------------- BTAD


def _btad(root: Path) -> None:
    """Real BTAD mixes extensions: 01 bmp images + png masks, 02 png + png, 03 bmp + bmp."""
    for cat, img_ext, mask_ext in (("01", "bmp", "png"), ("02", "png", "png"), ("03", "bmp", "bmp")):
        for i in range(2):
            _img(root / cat / "train" / "ok" / f"{i:04d}.{img_ext}")
        _img(root / cat / "test" / "ok" / f"0000.{img_ext}")
        for stem in ("1", "2", "10"):
            _img(root / cat / "test" / "ko" / f"{stem}.{img_ext}")
            suffix = "_mask" if cat == "02" else ""
            _mask(root / cat / "ground_truth" / "ko" / f"{stem}{suffix}.{mask_ext}", int(stem))


def test_btad_mixed_extensions_pair_by_stem(tmp_path: Path) -> None:
    _btad(tmp_path)
    assert list_categories("btad", tmp_path) == ["01", "02", "03"]
    samples = load_dataset("btad", tmp_path, split="all")
    assert len(samples) == 3 * (2 + 1 + 3)
    for s in samples:
        if s.label:
            assert s.defect == "ko" and s.mask_path is not None
            assert read_mask(s.mask_path).sum() == int(s.image_path.stem)
        else:
            assert s.defect == "good" and s.mask_path is None
    by_cat = {s.category: s for s in samples if s.label}
    assert by_cat["01"].image_path.suffix == ".bmp" and by_cat["01"].mask_path.suffix == ".png"
    assert by_cat["03"].mask_path.suffix == ".bmp"


def test_btad_two_masks_for_one_stem_are_ambiguous(tmp_path: Path) -> None:
    _btad(tmp_path)
    _mask(tmp_path / "01" / "ground_truth" / "ko" / "2_mask.bmp", 2)
    with pytest.raises(DatasetError, match=r"2\.bmp.*several masks.*2\.png"):
        load_dataset("btad", tmp_path, categories=["01"])


def test_btad_missing_mask_and_wrong_layout(tmp_path: Path) -> None:
    _btad(tmp_path)
    (tmp_path / "03" / "ground_truth" / "ko" / "10.bmp").unlink()
    with pytest.raises(DatasetError, match=r"ko/10\.bmp.*no mask"):
        load_dataset("btad", tmp_path, categories=["03"])
    mvtec = tmp_path / "mvtec"
    _mvtec_category(mvtec)
    with pytest.raises(DatasetError, match="no known btad layout"):
        load_dataset("btad", mvtec)


# --------------------------------------------------------------------------- folder


def test_folder_single_tree_masks_with_or_without_suffix(tmp_path: Path) -> None:
    tree = tmp_path / "my_parts"
    _img(tree / "train" / "good" / "a.png")
    _img(tree / "test" / "good" / "b.jpg")
    _img(tree / "test" / "dent" / "1.png")
    _img(tree / "test" / "dent" / "2.png")
    _img(tree / "test" / "dent" / "10.png")
    _mask(tree / "ground_truth" / "dent" / "1.png", 1)
    _mask(tree / "ground_truth" / "dent" / "2_mask.bmp", 2)
    _mask(tree / "ground_truth" / "dent" / "10_mask.png", 10)
    assert list_categories("folder", tree) == ["my_parts"]
    samples = load_dataset("folder", tree, split="all")
    counts = Counter((s.split, s.defect) for s in samples)
    assert counts == {("train", "good"): 1, ("test", "good"): 1, ("test", "dent"): 3}
    for s in samples:
        if s.label:
            assert read_mask(s.mask_path).sum() == int(s.image_path.stem)
    assert {s.category for s in samples} == {"my_parts"}


def test_folder_root_with_several_categories(tmp_path: Path) -> None:
    _mvtec_category(tmp_path, "a")
    _mvtec_category(tmp_path, "b")
    assert list_categories("folder", tmp_path) == ["a", "b"]
    samples = load_dataset("folder", tmp_path, categories=["b"])
    assert {s.category for s in samples} == {"b"}
    _check_stem_pairing(samples)


# --------------------------------------------------------------------------- VisA


def _visa(root: Path, rows: list[dict[str, str]] | None = None) -> Path:
    """VisA: a CSV of relative paths; masks hold small class values, not 0/255."""
    default: list[dict[str, str]] = []
    for obj in ("candle", "pcb1"):
        for i in range(2):
            rel = f"{obj}/Data/Images/Normal/{i:03d}.JPG"
            _img(root / rel)
            default.append({"object": obj, "split": "train", "label": "normal", "image": rel, "mask": ""})
        rel = f"{obj}/Data/Images/Normal/100.JPG"
        _img(root / rel)
        default.append({"object": obj, "split": "test", "label": "normal", "image": rel, "mask": ""})
        for stem, n in (("000", 3), ("001", 7)):
            rel = f"{obj}/Data/Images/Anomaly/{stem}.JPG"
            mrel = f"{obj}/Data/Masks/Anomaly/{stem}.png"
            _img(root / rel)
            _mask(root / mrel, n, on=1 if stem == "000" else 38)
            default.append({"object": obj, "split": "test", "label": "anomaly", "image": rel, "mask": mrel})
    csv_path = root / "split_csv" / "1cls.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["object", "split", "label", "image", "mask"])
        writer.writeheader()
        writer.writerows(default + (rows or []))
    return csv_path


def test_visa_reads_csv_and_non_binary_masks(tmp_path: Path) -> None:
    _visa(tmp_path)
    assert list_categories("visa", tmp_path) == ["candle", "pcb1"]
    test = load_dataset("visa", tmp_path, categories=["pcb1"])
    assert Counter((s.defect, s.label) for s in test) == {("good", 0): 1, ("anomaly", 1): 2}
    areas = {s.image_path.stem: int(read_mask(s.mask_path).sum()) for s in test if s.label}
    assert areas == {"000": 3, "001": 7}  # mask values 1 and 38 both count as anomalous
    train = load_dataset("visa", tmp_path, split="train")
    assert len(train) == 4 and all(s.label == 0 and s.split == "train" for s in train)
    both = load_dataset("visa", tmp_path, categories=["pcb1", "candle"], split="all")
    assert [s.category for s in both] == ["pcb1"] * 5 + ["candle"] * 5
    assert all(s.image_path.is_file() for s in both)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"image": "../outside.JPG"}, r"1cls\.csv:\d+: path '\.\./outside\.JPG' leaves the dataset root"),
        ({"image": "candle/../../outside.JPG"}, "leaves the dataset root"),
        ({"mask": "../outside_mask.png"}, "outside_mask.png' leaves the dataset root"),
        ({"image": "/etc/passwd"}, "is absolute"),
        ({"mask": ""}, r"1cls\.csv:\d+: anomalous image .* has no mask"),
        ({"label": "bad"}, r"label 'bad'; expected one of \['anomaly', 'normal'\]"),
        ({"split": "val"}, "split 'val'"),
        ({"image": "candle/Data/Images/Anomaly/999.JPG"}, r"999\.JPG does not exist"),
        ({"mask": "candle/Data/Masks/Anomaly/small.png"}, r"small\.png.*4x4.*expected the same size"),
    ],
)
def test_visa_bad_rows_are_refused(tmp_path: Path, row: dict[str, str], message: str) -> None:
    _img(tmp_path / "outside.JPG")  # exists, but outside the root
    root = tmp_path / "visa"
    _mask(root / "candle" / "Data" / "Masks" / "Anomaly" / "small.png", 1, size=(4, 4))
    base = {
        "object": "candle",
        "split": "test",
        "label": "anomaly",
        "image": "candle/Data/Images/Anomaly/000.JPG",
        "mask": "candle/Data/Masks/Anomaly/000.png",
    }
    _visa(root)
    _visa(root, [{**base, **row}])
    with pytest.raises(DatasetError, match=message):
        load_dataset("visa", root, categories=["candle"])


def test_visa_path_escaping_through_a_symlink_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "visa"
    _img(tmp_path / "secret" / "x.JPG")
    _visa(root, [])
    os.symlink(tmp_path / "secret", root / "link")
    _visa(root, [{"object": "candle", "split": "test", "label": "normal", "image": "link/x.JPG", "mask": ""}])
    with pytest.raises(DatasetError, match="leaves the dataset root"):
        load_dataset("visa", root)


def test_visa_missing_csv_or_columns(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"no VisA layout; expected .*split_csv/1cls\.csv"):
        load_dataset("visa", tmp_path)
    csv_path = tmp_path / "split_csv" / "1cls.csv"
    csv_path.parent.mkdir()
    csv_path.write_text("object,split,image\ncandle,train,a.JPG\n")
    with pytest.raises(DatasetError, match=r"1cls\.csv: missing columns \['label', 'mask'\]"):
        list_categories("visa", tmp_path)


# --------------------------------------------------------------------------- registry and records


def test_registry_names_every_dataset() -> None:
    assert set(DATASETS) == {"mvtec", "visa", "btad", "folder", "synthetic"}
    with pytest.raises(TypeError):
        DATASETS["x"] = DATASETS["mvtec"]  # type: ignore[index]


def test_sample_refuses_contradictions(tmp_path: Path) -> None:
    p = tmp_path / "a.png"
    Sample(p, None, "c", "good", 0, "train")
    with pytest.raises(DatasetError, match="contradicts"):
        Sample(p, tmp_path / "m.png", "c", "good", 1, "test")
    with pytest.raises(DatasetError, match="split"):
        Sample(p, None, "c", "good", 0, "val")
    with pytest.raises(DatasetError, match="carries no mask"):
        Sample(p, tmp_path / "m.png", "c", "good", 0, "test")


# --------------------------------------------------------------------------- the real MVTec slice

SLICE = SHARED_DATA / "mvtec_grid_slice"


@pytest.mark.skipif(not SLICE.is_dir(), reason="the shared MVTec grid slice is not present")
def test_real_mvtec_grid_slice() -> None:
    samples = load_dataset("mvtec", SLICE.parent, categories=["mvtec_grid_slice"], split="all")
    counts = Counter((s.split, s.label) for s in samples)
    assert counts == {("train", 0): 25, ("test", 0): 3, ("test", 1): 11}
    for s in samples:
        if s.label:
            assert s.mask_path.name == f"{s.image_path.stem}_mask.png"
            assert s.mask_path.parent.name == s.image_path.parent.name == s.defect
    first = next(s for s in samples if s.label)
    img, mask = read_image(first.image_path), read_mask(first.mask_path)
    assert img.shape == (1024, 1024, 3) and mask.shape == (1024, 1024) and mask.any()
    assert load_dataset("folder", SLICE, split="all") == [
        Sample(s.image_path, s.mask_path, "mvtec_grid_slice", s.defect, s.label, s.split) for s in samples
    ]
