"""Image-level-only trees: no ground_truth/, --masks none, partial masks, the flat layout."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from harmoniad.data import DatasetError, ReadOptions, list_categories, load_dataset, read_image
from tests.unit.data.test_readers import _img, _mask, _mvtec_category


def test_a_tree_without_ground_truth_reads_defects_without_masks(tmp_path: Path) -> None:
    cat = _mvtec_category(tmp_path)
    shutil.rmtree(cat / "ground_truth")
    samples = load_dataset("folder", tmp_path, split="test")
    defective = [s for s in samples if s.label == 1]
    assert len(defective) == 4 and all(s.mask_path is None for s in defective)
    assert sorted({s.defect for s in defective}) == ["crack", "hole"]


def test_masks_none_ignores_the_masks_that_exist(tmp_path: Path) -> None:
    _mvtec_category(tmp_path)
    with_masks = load_dataset("mvtec", tmp_path)
    assert all(s.mask_path is not None for s in with_masks if s.label == 1)
    without = load_dataset("mvtec", tmp_path, options=ReadOptions(masks="none"))
    assert [s.image_path for s in without] == [s.image_path for s in with_masks]
    assert all(s.mask_path is None for s in without)


def test_partial_masks_are_a_named_error_unless_allowed(tmp_path: Path) -> None:
    cat = _mvtec_category(tmp_path)
    (cat / "ground_truth" / "crack" / "2_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"crack/2\.png: defective image has no mask.*--allow-missing-masks"):
        load_dataset("folder", tmp_path)
    samples = load_dataset("folder", tmp_path, options=ReadOptions(allow_missing_masks=True))
    masked = {s.image_path.name: s.mask_path is not None for s in samples if s.label == 1 and s.defect == "crack"}
    assert masked == {"1.png": True, "10.png": True, "2.png": False}
    _mask(cat / "ground_truth" / "crack" / "2_mask.png", 2)
    shutil.rmtree(cat / "ground_truth" / "hole")  # a whole defect type without masks
    with pytest.raises(DatasetError, match=r"hole/000\.png: defective image has no mask"):
        load_dataset("folder", tmp_path)


def _flat(root: Path, normal: str = "good", n_normal: int = 10) -> Path:
    """One flat category in several file formats and pixel types."""
    cat = root / "bolts"
    rng = np.random.default_rng(0)
    for i in range(n_normal):
        _img(cat / normal / f"{i:02d}.png", value=100 + i)
    crack = cat / "crack"
    crack.mkdir(parents=True)
    Image.fromarray(rng.integers(0, 256, (12, 16), np.uint8), "L").save(crack / "grey.jpg")
    Image.fromarray(rng.integers(0, 256, (12, 16, 4), np.uint8), "RGBA").save(crack / "alpha.png")
    Image.fromarray(rng.integers(0, 256, (12, 16, 3), np.uint8)).save(crack / "colour.bmp")
    Image.fromarray(rng.integers(0, 65535, (12, 16), np.uint16)).save(crack / "deep.tif")
    _img(cat / "dent" / "a.jpeg")
    return cat


def test_flat_layout_holds_back_a_seeded_fraction_of_normals(tmp_path: Path) -> None:
    _flat(tmp_path, normal="ok")
    options = ReadOptions(normal_dir="ok", test_normals=0.3, seed=1)
    assert list_categories("folder", tmp_path, options) == ["bolts"]
    samples = load_dataset("folder", tmp_path, split="all", options=options)
    train = [s for s in samples if s.split == "train"]
    test = [s for s in samples if s.split == "test"]
    assert len(train) == 7 and all(s.label == 0 for s in train)
    assert sum(s.label == 0 for s in test) == 3
    assert sorted(s.defect for s in test if s.label) == ["crack"] * 4 + ["dent"]
    assert {s.image_path for s in train}.isdisjoint(s.image_path for s in test)
    again = load_dataset("folder", tmp_path, split="all", options=options)
    assert again == samples  # seeded
    other = load_dataset("folder", tmp_path, split="all", options=ReadOptions(normal_dir="ok", test_normals=0.3, seed=2))
    assert {s.image_path for s in other if s.split == "train"} != {s.image_path for s in train}
    for s in test:  # grey JPEG, RGBA PNG, BMP, 16-bit TIFF: all read as RGB uint8
        assert read_image(s.image_path).shape == (12, 16, 3)
    # the root itself may be the flat category
    assert len(load_dataset("folder", tmp_path / "bolts", split="test", options=options)) == len(test)


def test_flat_layout_errors_name_the_folder(tmp_path: Path) -> None:
    cat = _flat(tmp_path, n_normal=1)
    with pytest.raises(DatasetError, match=r"bolts/good: 1 normal image\(s\); the flat layout needs at least 2"):
        load_dataset("folder", tmp_path)
    _img(cat / "good" / "extra.png")
    shutil.rmtree(cat / "crack")
    shutil.rmtree(cat / "dent")
    with pytest.raises(DatasetError, match=r"bolts: no defect folders"):
        load_dataset("folder", tmp_path)
    with pytest.raises(DatasetError, match="masks 'some'"):
        ReadOptions(masks="some")
    with pytest.raises(DatasetError, match="test_normals"):
        ReadOptions(test_normals=1.0)
