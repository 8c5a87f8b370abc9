"""Which images train and which test: a seeded per-class split, the dataset's own train/ and test/
folders, or a split file (CSV with path,label,split); each checked so that a probe can be trained
and scored on it."""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx.errors import FeatxError, OptionError

PROTOCOL_TRAIN_PER_CLASS = 100  # training images per class of the 15-Scene protocol
TRAIN, TEST = 1, 2  # split codes; 0: in neither part


@dataclass(frozen=True)
class Split:
    """Which rows of a set of images train and which test, and how that was decided."""

    train: np.ndarray
    test: np.ndarray
    description: str

    def check(self, labels: np.ndarray, classes: Sequence[str]) -> Split:
        """The split itself, if a probe can learn from its training part and be scored on its test
        part; else a FeatxError saying what is missing (no test image, a class that is tested but
        never trained on, fewer than two classes to train on)."""
        trained, tested = _classes_of(labels, self.train, classes), _classes_of(labels, self.test, classes)
        if not len(self.test):
            raise FeatxError(f"the split ({self.description}) leaves no test image")
        untrained = sorted(tested - trained)
        if untrained:
            names = ", ".join(classes[k] for k in untrained[:3]) + (", ..." if len(untrained) > 3 else "")
            raise FeatxError(f"the split ({self.description}) tests {len(untrained)} class"
                             f"{'' if len(untrained) == 1 else 'es'} it has no training image of ({names}); "
                             "give each tested class training images")
        if len(trained) < 2:
            raise FeatxError(f"the split ({self.description}) trains on {len(trained)} class"
                             f"{'' if len(trained) == 1 else 'es'}; a probe needs at least two")
        return self


def _classes_of(labels: np.ndarray, rows: np.ndarray, classes: Sequence[str]) -> set[int]:
    """The classes among `labels[rows]`, counted a block of rows at a time (no copy of them all)."""
    counts = np.zeros(len(classes), dtype=np.int64)
    for start in range(0, len(rows), 1 << 16):
        counts += np.bincount(labels[rows[start:start + (1 << 16)]], minlength=len(classes))
    return set(np.flatnonzero(counts).tolist())


def seeded_split(labels: np.ndarray, classes: Sequence[str], train_per_class: int | None,
                 *, seed: int) -> Split:
    """The usual protocol: `train_per_class` random images of each class train, the rest test
    (checked like any split: fewer than two classes is an error).
    None means the 15-Scene protocol's 100 where every class has more images, else half of the
    smallest class (the description says so)."""
    counts = np.bincount(labels, minlength=len(classes))
    present = [label for label in range(len(classes)) if counts[label]]
    how = ""
    if train_per_class is None:
        smallest, label_min = min((int(counts[label]), classes[label]) for label in present)
        train_per_class = PROTOCOL_TRAIN_PER_CLASS
        if smallest <= PROTOCOL_TRAIN_PER_CLASS:
            train_per_class = max(1, smallest // 2)
            how = (f" (half of the smallest class, {label_min} with {smallest} images; the usual "
                   f"{PROTOCOL_TRAIN_PER_CLASS} needs more in every class)")
    if train_per_class < 1:
        raise OptionError("train_per_class", f"must be at least 1, not {train_per_class}")
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")  # each class's rows, ascending, side by side
    starts = np.concatenate([[0], np.cumsum(counts)])
    train: list[np.ndarray] = []
    for label in present:
        rows = order[starts[label]:starts[label + 1]]
        if len(rows) <= train_per_class:
            raise OptionError("train_per_class", f"{train_per_class} leaves no test image in class "
                              f"{classes[label]} ({len(rows)} images)")
        train.append(rng.choice(rows, train_per_class, replace=False))
    train_rows = np.sort(np.concatenate(train))
    in_train = np.zeros(len(labels), dtype=bool)
    in_train[train_rows] = True
    test_rows = np.flatnonzero(~in_train)
    return Split(train_rows, test_rows,
                 f"{train_per_class} training images per class{how}, seed {seed}, the rest for test",
                 ).check(labels, classes)


MAX_SIZES = 20  # training sizes of one learning curve


def parse_sizes(value: int | str | Sequence[int] | None, most: int) -> tuple[int, ...]:
    """`--train-per-class`: one size, or several (`5,10,25` or a list) for a learning curve;
    sorted, each from 1 to `most`. None: no size given (the default rule applies)."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else [value] if isinstance(value, int) else list(value)
    try:
        sizes = sorted({int(str(item).strip()) for item in items if str(item).strip()})
    except ValueError:
        raise OptionError("train_per_class", f"must be a whole number or several, comma-separated, not "
                          f"{value!r}") from None
    if not sizes or len(sizes) > MAX_SIZES or not 1 <= sizes[0] <= sizes[-1] <= most:
        raise OptionError("train_per_class", f"must be 1 to {MAX_SIZES} whole numbers from 1 to {most}, not "
                          f"{value!r}")
    return tuple(sizes)


def nested_subsets(split: Split, labels: np.ndarray, sizes: Sequence[int], *, seed: int) -> dict[int, Split]:
    """For a learning curve: per size k, the split that trains on k images of each class, drawn in
    one seeded order so that a smaller training part lies within every larger one, and tests on
    the split's own test rows (the same for every size). A size reaching a class's whole training
    part is left out (the split itself is that point)."""
    rng = np.random.default_rng(seed)
    orders = {label: rng.permutation(split.train[labels[split.train] == label])
              for label in np.unique(labels[split.train])}
    smallest = min(len(rows) for rows in orders.values())
    return {k: Split(np.sort(np.concatenate([rows[:k] for rows in orders.values()])), split.test,
                     f"{k} of its training images per class") for k in sizes if k < smallest}


def fixed_split(codes: np.ndarray, description: str) -> Split:
    """A split given per row as a code: TRAIN, TEST, or 0 for a row in neither part."""
    codes = np.asarray(codes)
    return Split(np.flatnonzero(codes == TRAIN), np.flatnonzero(codes == TEST), description)


@dataclass(frozen=True)
class SplitFile:
    """A split file's rows: each listed path with its code (TRAIN or TEST)."""

    path: Path
    paths: tuple[str, ...]
    codes: np.ndarray

    def codes_for(self, paths: Sequence[str]) -> np.ndarray:
        """The code of each of `paths` (0 where the file does not list it). A listed name may
        also be written as reports show it, with \\xNN for bytes that are not UTF-8."""
        listed = dict(zip(self.paths, self.codes.tolist()))
        listed.update({unshown(p): c for p, c in listed.items() if "\\x" in p})
        return np.array([listed.get(p, 0) for p in paths], dtype=np.uint8)


def read_split_file(path: str | Path) -> SplitFile:
    """Read a CSV with columns path,label,split (train or test), UTF-8; any problem with the file
    is one FeatxError naming it (and the line, where there is one)."""
    path = Path(path)
    if not path.is_file():
        raise FeatxError(f"split file not found: {path}")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise FeatxError(f"split file {path} is not UTF-8 text: line {line} has bytes that are not "
                         "UTF-8; save it as UTF-8") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if not reader.fieldnames or not {"path", "split"} <= set(reader.fieldnames):
        raise FeatxError(f"split file {path} needs the columns path,label,split")
    given: dict[str, int] = {}
    for row in reader:
        listed, split = row["path"] or "", (row["split"] or "").strip().lower()
        code = {"train": TRAIN, "test": TEST}.get(split)
        if code is None:
            raise FeatxError(f"split file {path}, line {reader.line_num}: split must be train or test, "
                             f"found {split!r}")
        if given.get(listed, code) != code:
            raise FeatxError(f"split file {path}, line {reader.line_num}: {listed} is listed for train "
                             "and for test")
        given[listed] = code
    if not given:
        raise FeatxError(f"split file {path} lists no image")
    return SplitFile(path, tuple(given), np.array(list(given.values()), dtype=np.uint8))


def unshown(text: str) -> str:
    """A name as reports show it (\\xNN for a byte that is not UTF-8) back to the file system's."""
    raw = re.sub(rb"\\x([0-9a-fA-F]{2})", lambda m: bytes([int(m.group(1), 16)]), text.encode("utf-8"))
    return os.fsdecode(raw)
