"""The synthetic dataset: deterministic bytes, exact non-empty masks, readable MVTec layout."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import harmoniad.data.synthetic as synthetic
from harmoniad.data import (
    DEFECT_KINDS,
    SYNTHETIC_CATEGORIES,
    SYNTHETIC_CATEGORY_KINDS,
    SYNTHETIC_DEFECTS,
    DatasetError,
    ensure_synthetic,
    list_categories,
    load_dataset,
    make_synthetic,
    read_image,
    read_mask,
    render_sample,
)
from harmoniad.runtime.progress import silent

SMALL = {"n_train": 3, "n_test": 6, "size": 64}


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("syn") / "a", seed=3, progress=silent, **SMALL)


def test_categories_cover_textures_objects_and_both_defect_kinds() -> None:
    assert len(SYNTHETIC_CATEGORIES) >= 4
    kinds = Counter(SYNTHETIC_CATEGORY_KINDS[c] for c in SYNTHETIC_CATEGORIES)
    assert kinds["texture"] >= 2 and kinds["object"] >= 2
    used = {d for c in SYNTHETIC_CATEGORIES for d in SYNTHETIC_DEFECTS[c]}
    assert {"scratch", "crack", "pinhole"} <= used and {"stain", "color", "missing", "displaced"} <= used
    for c in SYNTHETIC_CATEGORIES:  # every category has both kinds
        assert {DEFECT_KINDS[d] for d in SYNTHETIC_DEFECTS[c]} == {"structural", "semantic"}


def test_same_seed_same_bytes_other_seed_other_bytes(small_root: Path, tmp_path: Path) -> None:
    again = make_synthetic(tmp_path / "b", seed=3, progress=silent, **SMALL)
    first, second = _files(small_root), _files(again)
    assert first == second and len(first) > 4 * 9
    other = _files(make_synthetic(tmp_path / "c", seed=4, categories=["weave"], progress=silent, **SMALL))
    assert other["weave/train/good/000.png"] != first["weave/train/good/000.png"]


def test_a_subset_of_categories_gives_the_same_bytes(small_root: Path, tmp_path: Path) -> None:
    subset = _files(make_synthetic(tmp_path / "s", seed=3, categories=["circuit"], progress=silent, **SMALL))
    full = _files(small_root)
    images = [k for k in subset if k.startswith("circuit/")]
    assert images and all(subset[k] == full[k] for k in images)


def test_layout_reads_as_mvtec_with_the_planned_counts(small_root: Path) -> None:
    assert list_categories("synthetic", small_root) == sorted(SYNTHETIC_CATEGORIES)
    samples = load_dataset("synthetic", small_root, split="all")
    assert samples == load_dataset("mvtec", small_root, split="all")
    for cat in SYNTHETIC_CATEGORIES:
        mine = [s for s in samples if s.category == cat]
        assert sum(s.split == "train" for s in mine) == SMALL["n_train"]
        test = [s for s in mine if s.split == "test"]
        assert len(test) == SMALL["n_test"] and sum(s.label for s in test) == SMALL["n_test"] // 2
        assert {s.defect for s in test if s.label} <= set(SYNTHETIC_DEFECTS[cat])
    manifest = json.loads((small_root / "synthetic.json").read_text())
    assert manifest["complete"] is True and manifest["seed"] == 3


def test_every_defective_mask_is_binary_nonempty_and_inside_the_image(small_root: Path) -> None:
    for s in load_dataset("synthetic", small_root):
        img = read_image(s.image_path)
        assert img.shape == (64, 64, 3)
        if s.label == 0:
            continue
        mask = read_mask(s.mask_path)
        assert mask.shape == img.shape[:2] and mask.any()
        assert set(np.unique(np.asarray(Image.open(s.mask_path)))) == {0, 255}


@pytest.mark.parametrize("category", SYNTHETIC_CATEGORIES)
def test_defects_change_exactly_the_masked_pixels_and_visibly(category: str) -> None:
    for defect in SYNTHETIC_DEFECTS[category]:
        out = render_sample(category, defect, 64, np.random.default_rng(11))
        assert out.mask is not None and out.mask.sum() >= 4
        changed = (out.image != out.reference).any(axis=2)
        assert not (changed & ~out.mask).any(), f"{category}/{defect} paints outside its mask"
        assert changed[out.mask].mean() > 0.9, f"{category}/{defect} mask covers unchanged pixels"
        diff = np.abs(out.image.astype(int) - out.reference.astype(int)).max(axis=2)
        assert diff[out.mask].mean() > 25, f"{category}/{defect} is too faint to learn"
    good = render_sample(category, "good", 64, np.random.default_rng(11))
    assert good.mask is None and good.image is good.reference


def test_fine_defects_are_thin_and_global_ones_are_large() -> None:
    rng = np.random.default_rng(5)
    scratch = render_sample("weave", "scratch", 256, rng).mask
    colour = render_sample("weave", "color", 256, rng).mask
    assert scratch is not None and colour is not None
    assert scratch.sum() < 0.01 * scratch.size < colour.sum()


def test_normal_images_vary(small_root: Path) -> None:
    imgs = [read_image(p) for p in sorted((small_root / "flange" / "train" / "good").glob("*.png"))]
    assert not np.array_equal(imgs[0], imgs[1])


def test_bad_arguments_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="seed"):
        make_synthetic(tmp_path / "x", seed=-1)
    with pytest.raises(ValueError, match="synthetic categories"):
        make_synthetic(tmp_path / "x", categories=["carpet"])
    with pytest.raises(ValueError, match="size"):
        make_synthetic(tmp_path / "x", size=8)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "important.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not a synthetic dataset"):
        make_synthetic(foreign, **SMALL)
    assert (foreign / "important.txt").read_text() == "keep me"


def test_other_settings_leave_no_stale_files(tmp_path: Path) -> None:
    root = make_synthetic(tmp_path / "r", categories=["grain"], progress=silent, n_train=4, n_test=4, size=32)
    assert (root / "grain/train/good/003.png").exists()
    make_synthetic(root, categories=["grain"], progress=silent, n_train=2, n_test=4, size=32)
    assert sorted(p.name for p in (root / "grain/train/good").iterdir()) == ["000.png", "001.png"]


def test_ensure_synthetic_generates_once_and_redoes_an_interrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HARMONIAD_CACHE", str(tmp_path / "cache"))
    settings = {"categories": ["weave"], "n_train": 2, "n_test": 2, "size": 32}
    root = ensure_synthetic(progress=silent, **settings)
    assert root == tmp_path / "cache" / "datasets" / "synthetic"
    assert len(load_dataset("synthetic", root, split="all")) == 4

    calls: list[Path] = []
    real = synthetic.make_synthetic
    monkeypatch.setattr(synthetic, "make_synthetic", lambda r, **kw: calls.append(Path(r)) or real(r, **kw))
    assert ensure_synthetic(progress=silent, **settings) == root and calls == []  # complete: reused

    # An interrupted run: a file lost, the manifest not marked complete.
    (root / "weave/train/good/001.png").unlink()
    manifest = root / "synthetic.json"
    manifest.write_text(manifest.read_text().replace('"complete": true', '"complete": false'))
    with pytest.raises(DatasetError, match="generation did not finish"):
        load_dataset("synthetic", root)
    ensure_synthetic(progress=silent, **settings)
    assert calls == [root] and (root / "weave/train/good/001.png").exists()
    assert json.loads(manifest.read_text())["complete"] is True


def test_synthetic_reader_needs_the_manifest(small_root: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(small_root, copy)
    (copy / "synthetic.json").unlink()
    with pytest.raises(DatasetError, match=r"no synthetic\.json"):
        list_categories("synthetic", copy)
    assert len(load_dataset("mvtec", copy)) == 4 * SMALL["n_test"]  # still a valid MVTec tree
