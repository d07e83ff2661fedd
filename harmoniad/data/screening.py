"""Screening dataset files so one bad image costs that image, not the category or the run.

Real datasets hold the odd file that cannot be used: cut short by a copy, zero bytes, an
HTML error page saved as ``.png``, an absurd size, unreadable permissions, or a name that
is not valid UTF-8 (it could not be recorded in the run's UTF-8 tables, nor opened again
from them). The dataset readers refuse *structural* faults (a mask of the wrong size, a
missing mask, an empty category) with a :class:`~harmoniad.data.DatasetError`; faults of a
single file are handled here: the file is left out and listed, with the reason, in the
run's report.

Two levels of checking keep the common case cheap:

- every sample is screened up front from its name and file headers (no pixel decoding;
  about as costly as a ``stat``), which catches most bad files;
- truncated pixel data only shows when a file is decoded, so when the work itself fails
  with a read error, the samples it was given are fully decoded once, the bad ones are
  dropped and the work is retried once on the rest (:meth:`Screen.run`). Clean datasets
  never pay for a second decode.

Verdicts are remembered per :class:`Screen`, so the methods of one evaluation share them.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from harmoniad.data import (DatasetError, ReadOptions, Sample, image_size, list_categories, load_dataset,
                            read_image, read_mask)

T = TypeVar("T")

#: What reading a dataset file can raise: our own error, or the OS's (permissions, a file
#: deleted since the tree was listed, a symlink loop).
READ_ERRORS: tuple[type[BaseException], ...] = (DatasetError, OSError)


@dataclass(frozen=True)
class SkippedFile:
    """A sample left out of a run, and why (``path`` is printable even for non-UTF-8 names)."""

    path: str
    reason: str
    category: str
    split: str


def printable(text: str) -> str:
    """``text`` as valid UTF-8: bytes of a non-UTF-8 file name become ``\\xNN`` escapes (display only)."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def printable_path(path: str | os.PathLike[str]) -> str:
    """A path as valid UTF-8 text, for reports (see :func:`printable`)."""
    return printable(os.fsdecode(path))


def name_problem(path: str | os.PathLike[str]) -> str | None:
    """Why the file name cannot be recorded and reopened from a UTF-8 table, or None."""
    try:
        os.fspath(path).encode("utf-8")
    except UnicodeEncodeError:
        return (
            f"{printable_path(path)}: file name is not valid UTF-8, so the run's tables could not "
            "record it; rename the file (e.g. `convmv -f latin1 -t utf8`)"
        )
    return None


def link_problem(path: Path) -> str | None:
    """Why ``path`` is a link that leads to no file (a loop, or dangling), or None."""
    if not path.is_symlink() or path.exists():
        return None
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return f"{printable_path(path)}: symbolic link loop; expected an image file"
    return f"{printable_path(path)}: broken symbolic link to {printable(os.readlink(path))!r}; expected an image file"


def _header_problem(sample: Sample) -> str | None:
    """Name and header checks of the image and its mask (no pixel decoding)."""
    for path in (sample.image_path, sample.mask_path):
        if path is None:
            continue
        problem = name_problem(path) or link_problem(path)
        if problem is not None:
            return problem
        try:
            image_size(path)
        except READ_ERRORS as exc:
            return _reason(exc, path)
    return None


def _decode_problem(sample: Sample) -> str | None:
    """Full decode of the image and its mask: finds truncated pixel data."""
    problem = _header_problem(sample)
    if problem is not None:
        return problem
    for path, read in ((sample.image_path, read_image), (sample.mask_path, read_mask)):
        if path is None:
            continue
        try:
            read(path)
        except READ_ERRORS as exc:
            return _reason(exc, path)
    return None


def _reason(exc: BaseException, path: Path) -> str:
    """The error text, naming the file (DatasetError messages already start with it)."""
    text = printable(str(exc) or type(exc).__name__)
    if isinstance(exc, DatasetError):
        return text
    return f"{printable_path(path)}: {type(exc).__name__}: {text}"


@dataclass(frozen=True)
class LoadedDataset:
    """A dataset read category by category; ``broken`` maps a refused category to its error."""

    train: list[Sample]
    test: list[Sample]
    broken: dict[str, str]

    @property
    def categories(self) -> list[str]:
        """Every asked category that was found, readable or not, sorted."""
        return sorted({s.category for s in self.test} | set(self.broken))


def load_categories(
    dataset: str, root: str | os.PathLike[str], categories: Sequence[str] | None = None,
    options: ReadOptions | None = None,
) -> LoadedDataset:
    """Train and test samples of each category, a malformed category kept aside with its error.

    A structural fault (a mask of the wrong size, a missing mask, a category with no
    images) refuses that category with the reader's :class:`DatasetError`; the other
    categories are still evaluated. A bad root, an unknown category, or every category
    malformed, raises.
    """
    available = list_categories(dataset, root, options)
    chosen = list(dict.fromkeys(categories)) if categories else available
    unknown = [c for c in chosen if c not in available]
    if unknown:
        raise DatasetError(f"{root}: {dataset} categories {unknown} not found; available: {available}")
    train: list[Sample] = []
    test: list[Sample] = []
    broken: dict[str, str] = {}
    for category in chosen:
        try:
            samples = load_dataset(dataset, root, [category], split="all", options=options)  # one read
        except DatasetError as exc:
            broken[category] = printable(str(exc))
            if len(broken) == len(chosen):
                raise
            continue
        train.extend(s for s in samples if s.split == "train")
        test.extend(s for s in samples if s.split == "test")
    return LoadedDataset(train, test, broken)


class Screen:
    """Screens samples and remembers its verdicts; shared by the methods of one evaluation.

    ``decode=True`` decodes every file up front instead of retrying on failure: for
    torchrun jobs, where the ranks must agree on the samples without a second attempt.
    """

    def __init__(self, *, decode: bool = False, workers: int | None = None) -> None:
        self.decode = decode
        # Decoding is C code that releases the GIL: threads help there.
        self.workers = workers or max(1, min(8, os.cpu_count() or 1))
        self._verdicts: dict[tuple[Path, Path | None], tuple[bool, str | None]] = {}

    def keep(self, samples: Sequence[Sample], *, decode: bool | None = None) -> tuple[list[Sample], list[SkippedFile]]:
        """Split ``samples`` into usable ones and skipped files (order kept).

        ``decode`` (default: the screen's setting) fully decodes each image and mask,
        which finds truncated data, instead of reading headers only.
        """
        decode = self.decode if decode is None else decode
        todo = [s for s in samples if not self._known(s, decode)]
        check = _decode_problem if decode else _header_problem
        if todo:
            if decode and len(todo) > 1 and self.workers > 1:  # header reads are GIL-bound: no gain
                with ThreadPoolExecutor(max_workers=self.workers) as pool:
                    problems = list(pool.map(check, todo))
            else:
                problems = [check(s) for s in todo]
            for sample, problem in zip(todo, problems):
                self._verdicts[_key(sample)] = (decode, problem)
        kept = [s for s in samples if self._problem(s) is None]
        return kept, self.skipped(samples)

    def skipped(self, samples: Sequence[Sample]) -> list[SkippedFile]:
        """The files among ``samples`` found unusable so far, with their reasons."""
        out = []
        for s in samples:
            problem = self._problem(s)
            if problem is not None:
                out.append(SkippedFile(printable_path(s.image_path), problem, s.category, s.split))
        return out

    def run(self, work: Callable[[list[Sample]], T], samples: Sequence[Sample]) -> tuple[T, list[Sample]]:
        """``work(usable samples)``; on a read error, decode-check them, drop the bad ones, retry once.

        Returns the result and the samples it was computed on. An error that is not
        explained by a bad file is raised as is; so is :class:`DatasetError` when no sample
        is left. A screen that decodes up front never retries.
        """
        kept, _ = self.keep(samples)
        self._require_some(kept, samples)
        try:
            return work(kept), kept
        except READ_ERRORS:
            if self.decode:
                raise
            retry, _ = self.keep(kept, decode=True)
            if len(retry) == len(kept):
                raise  # every file decodes: the error is not a bad file
            self._require_some(retry, samples)
        return work(retry), retry

    def _require_some(self, kept: Sequence[Sample], samples: Sequence[Sample]) -> None:
        if samples and not kept:
            first = self.skipped(samples)[0]
            raise DatasetError(f"all {len(samples)} images were skipped as unusable; first: {first.reason}")

    def _known(self, sample: Sample, decode: bool) -> bool:
        verdict = self._verdicts.get(_key(sample))
        # A header verdict answers a decode question only when it already found a problem.
        return verdict is not None and (verdict[0] or not decode or verdict[1] is not None)

    def _problem(self, sample: Sample) -> str | None:
        verdict = self._verdicts.get(_key(sample))
        return None if verdict is None else verdict[1]


def _key(sample: Sample) -> tuple[Path, Path | None]:
    return (sample.image_path, sample.mask_path)


__all__ = [
    "READ_ERRORS",
    "LoadedDataset",
    "Screen",
    "SkippedFile",
    "link_problem",
    "load_categories",
    "name_problem",
    "printable",
    "printable_path",
]
