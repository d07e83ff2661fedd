"""Dataset readers: benchmark trees on disk -> validated lists of :class:`Sample`.

Each reader checks the tree as it goes and refuses a malformed one with a
:class:`DatasetError` naming the path and what was expected. Masks are paired to images
by file stem, never by sort order, and every defective image's mask is checked to have the
image's size (from the file headers, so loading a whole benchmark stays fast). A file whose
header cannot be read is not the tree's fault: it is returned as is, and screening
(:mod:`harmoniad.data.screening`) leaves it out and lists it. Pixel data is validated later,
by :func:`read_image` / :func:`read_mask`, when it is actually read.

Masks are optional (:class:`ReadOptions`): a tree without ``ground_truth/`` (or read with
``masks="none"``) gives defective samples without masks, for image-level metrics only. A tree
where only some defective images have masks is refused unless ``allow_missing_masks``. The
folder reader also reads the flat layout ``<root>/<category>/{good,<defect>...}``: a seeded
fraction of the normal images is held back as test normals.

The supported datasets are a small registry, :data:`DATASETS`, kept as data.
"""

from __future__ import annotations

import csv
import json
import os
import random
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from harmoniad.data.io import image_size
from harmoniad.data.records import GOOD, DatasetError, Sample

SYNTHETIC_MANIFEST = "synthetic.json"  # harmoniad.data.synthetic writes it; complete: true once done

IMAGE_EXTENSIONS = frozenset({".png", ".bmp", ".jpg", ".jpeg", ".tif", ".tiff"})
MASK_SUFFIX = "_mask"
SPLIT_CHOICES = ("train", "test", "all")
MASK_CHOICES = ("auto", "none")
GROUND_TRUTH = "ground_truth"


@dataclass(frozen=True)
class ReadOptions:
    """How to read a tree beyond its layout (the CLI's ``--masks``, ``--allow-missing-masks``,
    ``--normal-dir``, ``--test-normals``; ``seed`` draws the flat layout's test normals)."""

    masks: str = "auto"  # "auto": use ground_truth/ when the tree has one; "none": ignore masks
    allow_missing_masks: bool = False
    normal_dir: str | None = None  # folder reader: the normal images' folder (default "good")
    test_normals: float = 0.2  # flat layout: fraction of the normal images held back for testing
    seed: int = 0

    def __post_init__(self) -> None:
        if self.masks not in MASK_CHOICES:
            raise DatasetError(f"masks {self.masks!r}; expected one of {list(MASK_CHOICES)}")
        if not 0.0 < self.test_normals < 1.0:
            raise DatasetError(f"test_normals {self.test_normals!r}; expected a fraction in (0, 1)")
        if self.normal_dir is not None and (not self.normal_dir or "/" in self.normal_dir
                                            or self.normal_dir in (".", "..", GROUND_TRUTH)):
            raise DatasetError(f"normal_dir {self.normal_dir!r}; expected a plain folder name")


DEFAULT_OPTIONS = ReadOptions()


@dataclass(frozen=True)
class DatasetSpec:
    """One supported dataset: how to find its categories and how to read them."""

    name: str
    layout: str  # the expected tree, quoted in errors and docs
    list_categories: Callable[[Path, ReadOptions], list[str]]
    load: Callable[[Path, Sequence[str], tuple[str, ...], ReadOptions], list[Sample]]


# --------------------------------------------------------------------------- helpers


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".")


def _images_in(directory: Path) -> list[Path]:
    """Image files directly in ``directory``, by name; hidden and non-image files skipped.

    A link named like an image that leads nowhere (dangling, or a loop) is kept, so that
    reading it fails and it is reported, instead of vanishing from the dataset unnoticed.
    """
    return sorted(
        p
        for p in directory.iterdir()
        if (p.is_file() or (p.is_symlink() and not p.exists()))
        and not _is_hidden(p)
        and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _subdirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not _is_hidden(p))


def _check_same_size(image: Path, mask: Path) -> None:
    try:
        img_size, mask_size = image_size(image), image_size(mask)
    except (DatasetError, OSError):
        return  # one unreadable file: screening leaves the pair out and lists it
    if img_size != mask_size:
        raise DatasetError(
            f"{mask}: mask is {mask_size[0]}x{mask_size[1]} but its image {image} is "
            f"{img_size[0]}x{img_size[1]}; expected the same size"
        )


def _unique_stems(images: Iterable[Path], directory: Path) -> None:
    """Refuse two images with one stem (``000.png`` and ``000.bmp``): their mask is ambiguous."""
    seen: dict[str, Path] = {}
    for p in images:
        if p.stem in seen:
            raise DatasetError(
                f"{directory}: images {seen[p.stem].name} and {p.name} share the stem "
                f"{p.stem!r}, so their mask cannot be paired; expected one image per stem"
            )
        seen[p.stem] = p


class _MaskIndex:
    """Masks of one ``ground_truth/<defect>`` folder, found by the image stem they belong to."""

    def __init__(self, directory: Path, strict_mvtec: bool) -> None:
        self.directory = directory
        self.strict_mvtec = strict_mvtec
        self._by_stem: dict[str, list[Path]] = {}
        if directory.is_dir():
            for p in _images_in(directory):
                key = p.stem[: -len(MASK_SUFFIX)] if p.stem.endswith(MASK_SUFFIX) else p.stem
                if strict_mvtec and (p.suffix.lower() != ".png" or not p.stem.endswith(MASK_SUFFIX)):
                    continue
                self._by_stem.setdefault(key, []).append(p)

    def expected(self, stem: str) -> str:
        if self.strict_mvtec:
            return f"{self.directory / (stem + MASK_SUFFIX + '.png')}"
        return f"{self.directory}/{stem}[{MASK_SUFFIX}].{{png,bmp,jpg,...}}"

    def find(self, image: Path, missing_ok: bool = False) -> Path | None:
        found = self._by_stem.get(image.stem, [])
        if not found:
            if missing_ok:
                return None
            raise DatasetError(
                f"{image}: defective image has no mask; expected {self.expected(image.stem)} "
                "(or pass --allow-missing-masks to compute pixel metrics on the images that have "
                "masks, or --masks none for image-level metrics only)"
            )
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise DatasetError(
                f"{image}: several masks match its stem ({names} in {self.directory}); expected exactly one"
            )
        return found[0]


# --------------------------------------------------------------------------- tree layouts


@dataclass(frozen=True)
class _TreeLayout:
    """``<category>/{train/<normal>, test/<normal>, test/<defect>, ground_truth/<defect>}``."""

    name: str
    normal_dir: str  # "good" (MVTec, folder) or "ok" (BTAD)
    strict_mvtec_masks: bool  # masks exactly <stem>_mask.png, as MVTec publishes them
    single_tree_root: bool  # the root itself may be one category's tree (folder reader)

    @property
    def layout(self) -> str:
        n = self.normal_dir
        masks = "<stem>_mask.png" if self.strict_mvtec_masks else "<stem>[_mask].{png,bmp,jpg}"
        where = "<root>[/<category>]" if self.single_tree_root else "<root>/<category>"
        tree = f"{where}/{{train/{n}, test/{n}, test/<defect>, [ground_truth/<defect>/{masks}]}}"
        if self.single_tree_root:
            tree += f" or, flat, {where}/{{{n}, <defect>...}}"
        return tree

    def _normal(self, options: ReadOptions) -> str:
        return (options.normal_dir or self.normal_dir) if self.single_tree_root else self.normal_dir

    def _is_tree(self, directory: Path, options: ReadOptions = DEFAULT_OPTIONS) -> bool:
        """A category holds normal images in ``train/<normal>`` or ``test/<normal>``."""
        n = self._normal(options)
        return (directory / "train" / n).is_dir() or (directory / "test" / n).is_dir()

    def _is_flat(self, directory: Path, options: ReadOptions) -> bool:
        """Folder reader only: ``<category>/{<normal>, <defect>...}`` without train/ or test/."""
        return (self.single_tree_root and (directory / self._normal(options)).is_dir()
                and not (directory / "train").is_dir() and not (directory / "test").is_dir())

    def _is_category(self, directory: Path, options: ReadOptions) -> bool:
        return self._is_tree(directory, options) or self._is_flat(directory, options)

    def _root_is_tree(self, root: Path, options: ReadOptions = DEFAULT_OPTIONS) -> bool:
        return self.single_tree_root and self._is_category(root, options)

    def list_categories(self, root: Path, options: ReadOptions = DEFAULT_OPTIONS) -> list[str]:
        if self._root_is_tree(root, options):
            return [root.name]
        return [d.name for d in _subdirs(root) if self._is_category(d, options)]

    def category_dir(self, root: Path, category: str, options: ReadOptions = DEFAULT_OPTIONS) -> Path:
        return root if self._root_is_tree(root, options) else root / category

    def load(self, root: Path, categories: Sequence[str], splits: tuple[str, ...],
             options: ReadOptions = DEFAULT_OPTIONS) -> list[Sample]:
        samples: list[Sample] = []
        for category in categories:
            cat_dir = self.category_dir(root, category, options)
            if self._is_flat(cat_dir, options):
                samples.extend(s for s in self._load_flat(cat_dir, category, options) if s.split in splits)
                continue
            if "train" in splits:
                samples.extend(self._load_train(cat_dir, category, options))
            if "test" in splits:
                samples.extend(self._load_test(cat_dir, category, options))
        return samples

    def _load_flat(self, cat_dir: Path, category: str, options: ReadOptions) -> list[Sample]:
        """Normals in ``<normal>/``, a seeded ``test_normals`` fraction of them held back for
        testing (at least one each way); every other folder is a defect type."""
        n = self._normal(options)
        normal = cat_dir / n
        images = _images_in(normal)
        if len(images) < 2:
            raise DatasetError(
                f"{normal}: {len(images)} normal image(s); the flat layout needs at least 2 "
                "(some to train on, some held back as test normals)"
            )
        n_test = min(len(images) - 1, max(1, round(options.test_normals * len(images))))
        held = set(random.Random(f"{options.seed}:{category}").sample(range(len(images)), n_test))
        samples = [Sample(p, None, category, GOOD, 0, "test" if i in held else "train")
                   for i, p in enumerate(images)]
        train = [s for s in samples if s.split == "train"]
        test = [s for s in samples if s.split == "test"]
        for defect_dir in _subdirs(cat_dir):
            if defect_dir.name in (n, GROUND_TRUTH):
                continue
            test.extend(self._defect_samples(cat_dir, defect_dir, category, options))
        if len(test) == n_test:
            raise DatasetError(f"{cat_dir}: no defect folders; expected {n}/ and <defect>/ folders of images")
        return train + test

    def _defect_samples(self, cat_dir: Path, defect_dir: Path, category: str,
                        options: ReadOptions) -> list[Sample]:
        """Test samples of one defect folder, with masks from ``ground_truth/<defect>`` when
        the category has masks and they are wanted."""
        images = _images_in(defect_dir)
        gt_root = cat_dir / GROUND_TRUTH
        if options.masks == "none" or not gt_root.is_dir():
            return [Sample(image, None, category, defect_dir.name, 1, "test") for image in images]
        _unique_stems(images, defect_dir)
        masks = _MaskIndex(gt_root / defect_dir.name, self.strict_mvtec_masks)
        samples = []
        for image in images:
            mask = masks.find(image, missing_ok=options.allow_missing_masks)
            if mask is not None:
                _check_same_size(image, mask)
            samples.append(Sample(image, mask, category, defect_dir.name, 1, "test"))
        return samples

    def _load_train(self, cat_dir: Path, category: str, options: ReadOptions = DEFAULT_OPTIONS) -> list[Sample]:
        train = cat_dir / "train"
        n = self._normal(options)
        normal = train / n
        if not normal.is_dir():
            raise DatasetError(f"{normal}: missing; expected normal training images there ({self.layout})")
        extra = [d.name for d in _subdirs(train) if d.name != n]
        if extra:
            raise DatasetError(
                f"{train}: unexpected folders {extra}; training images must be normal, "
                f"expected only {n}/"
            )
        images = _images_in(normal)
        if not images:
            raise DatasetError(f"{normal}: no images (expected {sorted(IMAGE_EXTENSIONS)})")
        return [Sample(p, None, category, GOOD, 0, "train") for p in images]

    def _load_test(self, cat_dir: Path, category: str, options: ReadOptions = DEFAULT_OPTIONS) -> list[Sample]:
        test = cat_dir / "test"
        n = self._normal(options)
        if not test.is_dir():
            raise DatasetError(
                f"{test}: missing; expected test/{n} and test/<defect> ({self.layout})"
            )
        samples: list[Sample] = []
        for defect_dir in _subdirs(test):
            if defect_dir.name == n:
                samples.extend(Sample(p, None, category, GOOD, 0, "test") for p in _images_in(defect_dir))
                continue
            if defect_dir.name == GOOD:
                raise DatasetError(
                    f"{defect_dir}: {GOOD!r} is not a defect name in this layout; "
                    f"normal test images go in test/{n}"
                )
            samples.extend(self._defect_samples(cat_dir, defect_dir, category, options))
        if not samples:
            raise DatasetError(f"{test}: no test images; expected them in test/<defect>/ ({self.layout})")
        return samples


# --------------------------------------------------------------------------- VisA

VISA_CSV = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
VISA_LABELS = {"normal": 0, "anomaly": 1}
VISA_DEFECT = "anomaly"  # VisA's 1cls split does not name defect types
VISA_LAYOUT = f"<root>/{VISA_CSV.as_posix()} with columns {','.join(VISA_COLUMNS)}, paths relative to <root>"


def _visa_rows(root: Path) -> list[tuple[int, dict[str, str]]]:
    csv_path = root / VISA_CSV
    if not csv_path.is_file():
        raise DatasetError(f"{root}: no VisA layout; expected {csv_path} ({VISA_LAYOUT})")
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [c for c in VISA_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{csv_path}: missing columns {missing}; expected {list(VISA_COLUMNS)}")
        # Line numbers count the header as line 1, as an editor shows them.
        rows = [
            (i + 2, {k: (row.get(k) or "").strip() for k in VISA_COLUMNS}) for i, row in enumerate(reader)
        ]
    if not rows:
        raise DatasetError(f"{csv_path}: no rows; expected one row per image")
    return rows


def _inside_root(root: Path, rel: str, csv_line: str) -> Path:
    """``root/rel`` if it stays inside ``root`` (after resolving ``..`` and links), else refuse."""
    if not rel:
        raise DatasetError(f"{csv_line}: empty path; expected a path relative to {root}")
    if Path(rel).is_absolute() or os.path.splitdrive(rel)[0]:
        raise DatasetError(f"{csv_line}: path {rel!r} is absolute; expected a path relative to {root}")
    candidate = root / rel
    if not candidate.resolve().is_relative_to(root.resolve()):
        raise DatasetError(f"{csv_line}: path {rel!r} leaves the dataset root {root}; refused")
    return Path(os.path.normpath(candidate))


def _visa_list_categories(root: Path, options: ReadOptions = DEFAULT_OPTIONS) -> list[str]:
    return sorted({row["object"] for _, row in _visa_rows(root) if row["object"]})


def _visa_load(root: Path, categories: Sequence[str], splits: tuple[str, ...],
               options: ReadOptions = DEFAULT_OPTIONS) -> list[Sample]:
    csv_path = root / VISA_CSV
    wanted = set(categories)
    samples: list[Sample] = []
    for line, row in _visa_rows(root):
        where = f"{csv_path}:{line}"
        if row["object"] not in wanted:
            continue
        if row["split"] not in ("train", "test"):
            raise DatasetError(f"{where}: split {row['split']!r}; expected 'train' or 'test'")
        if row["split"] not in splits:
            continue
        if row["label"] not in VISA_LABELS:
            raise DatasetError(f"{where}: label {row['label']!r}; expected one of {sorted(VISA_LABELS)}")
        label = VISA_LABELS[row["label"]]
        image = _inside_root(root, row["image"], where)
        if not image.is_file():
            raise DatasetError(f"{where}: image {image} does not exist")
        mask: Path | None = None
        if label == 1 and options.masks != "none":
            if not row["mask"]:
                if not options.allow_missing_masks:
                    raise DatasetError(f"{where}: anomalous image {image} has no mask; expected a mask path "
                                       "(or --allow-missing-masks, or --masks none)")
            else:
                mask = _inside_root(root, row["mask"], where)
                if not mask.is_file():
                    raise DatasetError(f"{where}: mask {mask} of image {image} does not exist")
                _check_same_size(image, mask)
        defect = VISA_DEFECT if label else GOOD
        samples.append(Sample(image, mask, row["object"], defect, label, row["split"]))
    # One category after another, train before test, as the tree readers return them.
    order = {c: i for i, c in enumerate(categories)}
    samples.sort(key=lambda s: (order[s.category], s.split != "train"))
    return samples


# --------------------------------------------------------------------------- registry


def _tree_spec(layout: _TreeLayout) -> DatasetSpec:
    return DatasetSpec(layout.name, layout.layout, layout.list_categories, layout.load)


def _require_finished_synthetic(root: Path) -> None:
    """Refuse a synthetic tree whose generation has not finished (or never started there)."""
    manifest = root / SYNTHETIC_MANIFEST
    try:
        finished = json.loads(manifest.read_text(encoding="utf-8")).get("complete") is True
    except FileNotFoundError:
        raise DatasetError(
            f"{root}: no {SYNTHETIC_MANIFEST}; expected a dataset written by make_synthetic"
        ) from None
    except (OSError, ValueError, AttributeError) as exc:
        raise DatasetError(f"{manifest}: unreadable ({exc}); regenerate the synthetic dataset") from exc
    if not finished:
        raise DatasetError(
            f"{manifest}: generation did not finish; run make_synthetic / ensure_synthetic again"
        )


def _synthetic_spec() -> DatasetSpec:
    """The synthetic dataset is written in the MVTec layout, with a manifest written last."""
    tree = _TreeLayout("synthetic", GOOD, strict_mvtec_masks=True, single_tree_root=False)

    def list_categories(root: Path, options: ReadOptions = DEFAULT_OPTIONS) -> list[str]:
        _require_finished_synthetic(root)
        return tree.list_categories(root, options)

    def load(root: Path, categories: Sequence[str], splits: tuple[str, ...],
             options: ReadOptions = DEFAULT_OPTIONS) -> list[Sample]:
        _require_finished_synthetic(root)
        return tree.load(root, categories, splits, options)

    return DatasetSpec("synthetic", f"{tree.layout} plus {SYNTHETIC_MANIFEST}", list_categories, load)


DATASETS: Mapping[str, DatasetSpec] = MappingProxyType(
    {
        "mvtec": _tree_spec(_TreeLayout("mvtec", GOOD, strict_mvtec_masks=True, single_tree_root=False)),
        "visa": DatasetSpec("visa", VISA_LAYOUT, _visa_list_categories, _visa_load),
        "btad": _tree_spec(_TreeLayout("btad", "ok", strict_mvtec_masks=False, single_tree_root=False)),
        "folder": _tree_spec(_TreeLayout("folder", GOOD, strict_mvtec_masks=False, single_tree_root=True)),
        "synthetic": _synthetic_spec(),
    }
)


def _spec(name: str) -> DatasetSpec:
    try:
        return DATASETS[name]
    except KeyError:
        raise DatasetError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}") from None


def _checked_root(root: str | os.PathLike[str]) -> Path:
    path = Path(root).expanduser().absolute()
    if not path.exists():
        raise DatasetError(f"{path}: dataset root does not exist")
    if not path.is_dir():
        raise DatasetError(f"{path}: dataset root is not a directory")
    return path


def _categories_of(spec: DatasetSpec, root: Path, options: ReadOptions) -> list[str]:
    found = spec.list_categories(root, options)
    if not found:
        hint = ""
        if (root / "train").is_dir() or (root / "test").is_dir():
            hint = (
                f"; {root} looks like a single category's folder: pass its parent as the root, "
                "or read it with the 'folder' dataset"
            )
        raise DatasetError(f"{root}: no known {spec.name} layout; expected {spec.layout}{hint}")
    return found


def list_categories(name: str, root: str | os.PathLike[str], options: ReadOptions | None = None) -> list[str]:
    """The categories of dataset ``name`` found under ``root``, sorted."""
    spec = _spec(name)
    return sorted(_categories_of(spec, _checked_root(root), options or DEFAULT_OPTIONS))


def load_dataset(
    name: str,
    root: str | os.PathLike[str],
    categories: str | Sequence[str] | None = None,
    split: str = "test",
    options: ReadOptions | None = None,
) -> list[Sample]:
    """Read dataset ``name`` (``mvtec``, ``visa``, ``btad``, ``folder``, ``synthetic``) at ``root``.

    ``categories`` defaults to all found; ``split`` is ``"train"``, ``"test"`` or ``"all"``.
    Samples come category by category (in the order asked), train before test, files by
    name. ``options``: masks, missing masks, the flat layout (:class:`ReadOptions`). Raises
    :class:`DatasetError` for any malformed tree, naming the path.
    """
    spec = _spec(name)
    options = options or DEFAULT_OPTIONS
    if split not in SPLIT_CHOICES:
        raise DatasetError(f"split {split!r}; expected one of {list(SPLIT_CHOICES)}")
    splits = ("train", "test") if split == "all" else (split,)
    path = _checked_root(root)
    available = _categories_of(spec, path, options)
    if categories is None:
        chosen = sorted(available)
    else:
        asked = [categories] if isinstance(categories, str) else list(categories)
        chosen = list(dict.fromkeys(asked))  # drop repeats, keep the order asked
        unknown = [c for c in chosen if c not in available]
        if unknown:
            raise DatasetError(
                f"{path}: {spec.name} categories {unknown} not found; available: {sorted(available)}"
            )
        if not chosen:
            raise DatasetError(f"{path}: no categories asked; available: {sorted(available)}")
    return spec.load(path, chosen, splits, options)
