"""Find images, labels and splits; load and convert one image safely."""

from __future__ import annotations

import csv
import hashlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from featx.errors import FeatxError, OptionError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
FIXED_SPLITS = ("train", "test")


@dataclass(frozen=True)
class ImageSet:
    """The images of a dataset, in a fixed order: relative paths, integer labels and class names.

    `fixed_split` holds "train"/"test" per image for datasets laid out as train/ and test/;
    `skipped` the links the scan did not take, with the reason (see `find_images`).
    """

    root: Path
    paths: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]
    fixed_split: tuple[str, ...] | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.root.name

    def __len__(self) -> int:
        return len(self.paths)

    def fingerprint(self) -> str:
        """A hash of the image list (paths, labels, file sizes): a changed dataset gets a new one."""
        h = hashlib.sha256()
        for rel, label in zip(self.paths, self.labels):
            size = (self.root / rel).stat().st_size
            h.update(f"{rel}\t{self.classes[label]}\t{size}\n".encode())
        return h.hexdigest()[:16]


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _images_in(folder: Path, root: Path, seen: dict[Path, str], skipped: dict[str, str]) -> list[Path]:
    """The images below a class folder, by the link rule of `find_images`."""
    images = []
    for path in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        rel = path.relative_to(root).as_posix()
        if path.is_symlink() and path.is_dir():
            skipped[rel] = "a link to a folder inside a class folder is not followed"
        elif path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        elif path.is_symlink() and not path.exists():
            skipped[rel] = "a broken link"
        elif path.is_file():
            target = path.resolve()
            if target in seen:
                skipped[rel] = f"the same file as {seen[target]}"
            else:
                seen[target] = rel
                images.append(path)
    return images


def find_images(root: str | Path) -> ImageSet:
    """Scan a folder of class subfolders, or a folder with train/ and test/ of class subfolders.

    Links: a link to an image file is followed and a class folder may itself be a link; a broken
    link, a link to a folder inside a class folder, and a second path to a file already taken
    (through a link) are skipped, and each is named in `ImageSet.skipped`."""
    root = Path(root).expanduser()
    if not root.exists():
        raise FeatxError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise FeatxError(f"dataset path is not a folder: {root}")
    root = root.resolve()
    top = _class_dirs(root)
    has_fixed_split = {d.name for d in top} >= set(FIXED_SPLITS) and all(
        _class_dirs(root / s) for s in FIXED_SPLITS)
    parts = [(s, root / s) for s in FIXED_SPLITS] if has_fixed_split else [(None, root)]

    classes = sorted({d.name for _, folder in parts for d in _class_dirs(folder)})
    if not classes:
        loose = [p for p in root.iterdir() if _is_image(p)]
        hint = " (images must sit in one subfolder per class)" if loose else ""
        raise FeatxError(f"no class folders in {root}{hint}")
    if len(classes) < 2:
        raise FeatxError(f"{root} has one class ({classes[0]}); comparing layers needs at least two")
    paths: list[str] = []
    labels: list[int] = []
    splits: list[str] = []
    seen: dict[Path, str] = {}
    skipped: dict[str, str] = {}
    for split, folder in parts:
        for label, cls in enumerate(classes):
            class_dir = folder / cls
            images = _images_in(class_dir, root, seen, skipped) if class_dir.is_dir() else []
            if not images:
                where = f"{split}/{cls}" if split else cls
                raise FeatxError(f"class folder {where} in {root} has no images")
            paths += [p.relative_to(root).as_posix() for p in images]
            labels += [label] * len(images)
            splits += [split or ""] * len(images)
    return ImageSet(root, tuple(paths), np.asarray(labels, dtype=np.int64), tuple(classes),
                    tuple(splits) if has_fixed_split else None, skipped)


@dataclass(frozen=True)
class Split:
    """Which rows of a set of images train and which test, and how that was decided."""

    train: np.ndarray
    test: np.ndarray
    description: str


def seeded_split(labels: np.ndarray, classes: tuple[str, ...], train_per_class: int,
                 seed: int) -> Split:
    """The usual protocol: `train_per_class` random images of each class train, the rest test."""
    if train_per_class < 1:
        raise OptionError("train_per_class", f"must be at least 1, not {train_per_class}")
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    for label, cls in enumerate(classes):
        rows = np.flatnonzero(labels == label)
        if len(rows) <= train_per_class:
            raise OptionError("train_per_class", f"{train_per_class} leaves no test image in class "
                              f"{cls} ({len(rows)} images)")
        train.append(rng.choice(rows, train_per_class, replace=False))
    train_rows = np.sort(np.concatenate(train))
    test_rows = np.setdiff1d(np.arange(len(labels)), train_rows)
    return Split(train_rows, test_rows,
                 f"{train_per_class} training images per class, seed {seed}, the rest for test")


def fixed_split(split_names: tuple[str, ...] | list[str], description: str) -> Split:
    """A split given per row as "train"/"test"."""
    names = np.asarray(split_names)
    return Split(np.flatnonzero(names == "train"), np.flatnonzero(names == "test"), description)


def read_split_file(path: str | Path) -> dict[str, str]:
    """Read a CSV with columns path,label,split into {relative path: "train"/"test"}."""
    path = Path(path)
    if not path.is_file():
        raise FeatxError(f"split file not found: {path}")
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"path", "split"} <= set(reader.fieldnames):
            raise FeatxError(f"split file {path} needs the columns path,label,split")
        mapping = {row["path"]: row["split"].strip().lower() for row in reader}
    odd = {s for s in mapping.values() if s not in FIXED_SPLITS}
    if odd:
        raise FeatxError(f"split file {path}: split must be train or test, found {sorted(odd)}")
    return mapping


def load_image(path: str | Path) -> Image.Image:
    """Open one image as 8-bit RGB with its EXIF orientation applied.

    Grayscale, palette, RGBA, CMYK and 16-bit images are converted; raises OSError/ValueError
    for files that are not readable images.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as opened:
            opened.load()
            img = ImageOps.exif_transpose(opened)
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or array.max() > 255 else 255.0
        img = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img.convert("RGBA"), mask=img.convert("RGBA").getchannel("A"))
        return background
    return img.convert("RGB")
