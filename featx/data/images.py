"""Find images, labels and splits; load and convert one image safely."""

from __future__ import annotations

import csv
import io
import os
import re
import tarfile
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import xxhash
from PIL import Image, ImageOps

from featx.errors import FeatxError, OptionError
from featx.options import Verify

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
FIXED_SPLITS = ("train", "test")
LARGE_PIXELS = 40_000_000  # above this a JPEG is decoded at reduced size (draft mode)
MAX_PIXELS = 300_000_000  # about 900 MB as RGB: the most featx decodes
MULTI_FRAME = {".gif", ".tif", ".tiff", ".webp", ".png"}  # formats that may hold several frames
PROTOCOL_TRAIN_PER_CLASS = 100  # training images per class of the 15-Scene protocol


@dataclass(frozen=True)
class ImageSet:
    """The images of a dataset, in a fixed order: relative paths, integer labels and class names.

    `fixed_split` holds "train"/"test" per image for datasets laid out as train/ and test/;
    `skipped` the links the scan did not take, with the reason (see `find_images`); `notes` the
    images taken with a remark (a multi-frame file: its first frame is used).
    """

    root: Path
    paths: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]
    fixed_split: tuple[str, ...] | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The folder's name; for tar shards the pattern's stem without its range (train)."""
        if not self.in_tars:
            return self.root.name
        return re.sub(r"\{[^}]*\}", "", self.root.name.removesuffix(".tar")).strip("-_.") or "tars"

    @property
    def in_tars(self) -> bool:
        """Whether the images are members of tar shards: `root` is then the shards' pattern and
        each path is `<tar name>/<member name>`."""
        return self.root.name.endswith(".tar")

    def __len__(self) -> int:
        return len(self.paths)

    def source(self, index: int) -> Path | io.BytesIO:
        """Where image `index` is read from: its file, or its tar member's bytes."""
        if not self.in_tars:
            return self.root / self.paths[index]
        return io.BytesIO(self.read_bytes(index))

    def read_bytes(self, index: int) -> bytes:
        """The bytes of image `index`: a file's, or a tar member's (read at its offset)."""
        if not self.in_tars:
            return (self.root / self.paths[index]).read_bytes()
        shard, member = self.paths[index].split("/", 1)
        tar = self.root.parent / shard
        members = tar_index(tar).members
        if member not in members:
            raise OSError(f"{member} is no longer in {tar}")
        offset, size = members[member]
        with tar.open("rb") as f:
            f.seek(offset)
            return f.read(size)

    def file_stats(self, verify: str = "size") -> list[list]:
        """Per image [size, mtime_ns, content hash or None]: what tells a replaced image from the
        one that was extracted. `verify="hash"` adds an xxh3 of the file's bytes (reads them).
        A tar member's time is its tar's: a rewritten tar is extracted again, member by member."""
        verify = Verify.parse(verify, "verify")
        stats = []
        tars: dict[str, os.stat_result] = {}  # each tar looked at once
        for index, rel in enumerate(self.paths):
            try:
                if self.in_tars:
                    shard, member = rel.split("/", 1)
                    tar = self.root.parent / shard
                    if shard not in tars:
                        tars[shard] = tar.stat()
                    info = tars[shard]
                    size = _tar_index(str(tar), info.st_mtime_ns).members.get(member, (0, -1))[1]
                else:
                    info = (self.root / rel).stat()
                    size = info.st_size
                digest = xxhash.xxh3_128_hexdigest(self.read_bytes(index)) if verify == "hash" else None
                stats.append([size, info.st_mtime_ns, digest])
            except OSError:  # gone since the scan: it cannot match anything
                stats.append([-1, -1, None])
        return stats


def _is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _class_dirs(folder: Path) -> list[Path]:
    return sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _images_in(folder: Path, root: Path, seen: dict[Path, str], *, skipped: dict[str, str],
               notes: dict[str, str]) -> list[Path]:
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
        elif not path.is_file():
            skipped[rel] = "a folder, not an image file" if path.is_dir() else "not a regular file"
        elif path.is_file():
            target = path.resolve()
            if target in seen:
                skipped[rel] = f"the same file as {seen[target]}"
            else:
                seen[target] = rel
                images.append(path)
                if path.suffix.lower() in MULTI_FRAME and (frames := _frames(path)) > 1:
                    notes[rel] = f"{frames} frames: the first one is used"
    return images


def _frames(path: Path) -> int:
    try:
        with Image.open(path) as opened:
            return int(getattr(opened, "n_frames", 1))
    except (OSError, ValueError):
        return 1  # unreadable: extraction names it


def find_images(root: str | Path) -> ImageSet:
    """Scan a folder of class subfolders, or a folder with train/ and test/ of class subfolders,
    or tar shards in WebDataset's layout (`data/train-{000000..000127}.tar`, see `find_in_tars`).

    Links: a link to an image file is followed and a class folder may itself be a link; a broken
    link, a link to a folder inside a class folder, and a second path to a file already taken
    (through a link) are skipped, and each is named in `ImageSet.skipped`."""
    if str(root).endswith(".tar"):
        return find_in_tars(str(root))
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
    notes: dict[str, str] = {}
    for split, folder in parts:
        for label, cls in enumerate(classes):
            class_dir = folder / cls
            images = _images_in(class_dir, root, seen, skipped=skipped,
                                notes=notes) if class_dir.is_dir() else []
            if not images:
                where = f"{split}/{cls}" if split else cls
                raise FeatxError(f"class folder {where} in {root} has no images")
            paths += [p.relative_to(root).as_posix() for p in images]
            labels += [label] * len(images)
            splits += [split or ""] * len(images)
    return ImageSet(root, tuple(paths), np.asarray(labels, dtype=np.int64), tuple(classes),
                    tuple(splits) if has_fixed_split else None, skipped, notes)


@dataclass(frozen=True)
class TarIndex:
    """A tar's regular members -> (data offset, size), in tar order, from its headers; `damage`
    says why they stop early (a tar is read as far as it is sound), empty when it is whole."""

    members: dict[str, tuple[int, int]]
    damage: str = ""


@lru_cache(maxsize=256)
def _tar_index(tar: str, mtime_ns: int) -> TarIndex:
    members: dict[str, tuple[int, int]] = {}
    try:
        length = os.path.getsize(tar)
        with tarfile.open(tar, "r:") as opened:
            for info in opened:
                if not info.isfile():
                    continue
                if info.offset_data + info.size > length:
                    raise tarfile.ReadError(f"it ends inside {info.name}")
                members[info.name] = (info.offset_data, info.size)
            if opened.offset + 2 * tarfile.BLOCKSIZE > length:  # a whole tar ends in two zero blocks
                raise tarfile.ReadError("it ends without the end-of-archive blocks (cut short?)")
    except (tarfile.TarError, EOFError, OSError) as exc:
        return TarIndex(members, str(exc) or type(exc).__name__)
    return TarIndex(members)


def tar_index(tar: Path) -> TarIndex:
    """The tar's index, read once per tar and modification time."""
    return _tar_index(str(tar), tar.stat().st_mtime_ns)


def find_in_tars(pattern: str) -> ImageSet:
    """The images in tar shards in WebDataset's layout: `pattern` names the shards with a brace
    range (`train-{000000..000127}.tar`). A sample is the members that share a key (the path up
    to the first dot of its name); its image is its image member, its label the text of its
    `.cls` member (a class number), else of its `.txt` member (a class name), else the folder of
    its key. Images are in shard order, then member order: the order extraction streams them."""
    from webdataset.shardlists import expand_urls
    from webdataset.tariterators import base_plus_ext

    shards = [Path(p).expanduser() for p in expand_urls(pattern)]
    if not shards:
        raise FeatxError(f"no tar shards in {pattern}")
    folder = shards[0].parent.resolve()
    for shard in shards:
        if not shard.is_file():
            raise FeatxError(f"tar shard not found: {shard} (of {pattern})")
        if shard.parent.resolve() != folder:
            raise FeatxError(f"the tar shards of {pattern} must sit in one folder")
    paths: list[str] = []
    names: list[str] = []
    skipped: dict[str, str] = {}
    for shard in shards:
        index = tar_index(shard)
        if index.damage:
            skipped[shard.name] = f"damaged tar, read up to the damage: {index.damage}"
        samples: dict[str, dict[str, str]] = {}
        with shard.open("rb") as tar:
            for name, (offset, size) in index.members.items():
                key, ext = base_plus_ext(name)
                if key is None:
                    continue
                ext = ext.lower()
                sample = samples.setdefault(key, {})
                if ext in ("cls", "txt"):
                    tar.seek(offset)
                    sample[ext] = tar.read(size).decode("utf-8", "replace").strip()
                elif "." + ext in IMAGE_EXTENSIONS and "image" not in sample:
                    sample["image"] = name  # the first (not seg.png beside a jpg)
        for key, sample in samples.items():
            if "image" not in sample:
                continue
            label = sample.get("cls") or sample.get("txt") or key.rpartition("/")[0]
            if not label:
                skipped[f"{shard.name}/{sample['image']}"] = "no label (.cls, .txt or a folder in its key)"
                continue
            paths.append(f"{shard.name}/{sample['image']}")
            names.append(label)
    numbered = all(n.lstrip("-").isdigit() for n in names)
    classes = sorted(set(names), key=int if numbered else str)
    if len(classes) < 2:
        raise FeatxError(f"{pattern} has {len(classes)} class{'es' if not classes else ''}; "
                         "comparing layers needs at least two")
    index = {name: label for label, name in enumerate(classes)}
    return ImageSet(folder / Path(pattern).name, tuple(paths),
                    np.asarray([index[n] for n in names], dtype=np.int64), tuple(classes), skipped=skipped)


@dataclass(frozen=True)
class Split:
    """Which rows of a set of images train and which test, and how that was decided."""

    train: np.ndarray
    test: np.ndarray
    description: str


def seeded_split(labels: np.ndarray, classes: tuple[str, ...], train_per_class: int | None,
                 *, seed: int) -> Split:
    """The usual protocol: `train_per_class` random images of each class train, the rest test.
    None means the 15-Scene protocol's 100 where every class has more images, else half of the
    smallest class (the description says so)."""
    present = [(label, cls) for label, cls in enumerate(classes) if (labels == label).any()]
    how = ""
    if train_per_class is None:
        smallest, label_min = min((int((labels == label).sum()), cls) for label, cls in present)
        train_per_class = PROTOCOL_TRAIN_PER_CLASS
        if smallest <= PROTOCOL_TRAIN_PER_CLASS:
            train_per_class = max(1, smallest // 2)
            how = (f" (half of the smallest class, {label_min} with {smallest} images; the usual "
                   f"{PROTOCOL_TRAIN_PER_CLASS} needs more in every class)")
    if train_per_class < 1:
        raise OptionError("train_per_class", f"must be at least 1, not {train_per_class}")
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    for label, cls in present:
        rows = np.flatnonzero(labels == label)
        if len(rows) <= train_per_class:
            raise OptionError("train_per_class", f"{train_per_class} leaves no test image in class "
                              f"{cls} ({len(rows)} images)")
        train.append(rng.choice(rows, train_per_class, replace=False))
    train_rows = np.sort(np.concatenate(train))
    test_rows = np.setdiff1d(np.arange(len(labels)), train_rows)
    return Split(train_rows, test_rows,
                 f"{train_per_class} training images per class{how}, seed {seed}, the rest for test")


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


def load_image(path: str | Path | io.BytesIO, min_side: int | None = None) -> Image.Image:
    """Open one image as 8-bit RGB with its EXIF orientation applied.

    Grayscale, palette, RGBA, CMYK and 16-bit images are converted; raises OSError/ValueError
    for files that are not readable images. Memory stays bounded: a JPEG over LARGE_PIXELS is
    decoded at a reduced scale that keeps its shorter side at least `min_side`, and an image
    that would still be over MAX_PIXELS is refused (ValueError) instead of decoded.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # MAX_PIXELS rules here
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(path) as opened:
                width, height = opened.size
                if width * height > LARGE_PIXELS and min_side and opened.format == "JPEG":
                    scale = min_side / min(width, height)
                    opened.draft("RGB", (int(width * scale) + 1, int(height * scale) + 1))
                if opened.size[0] * opened.size[1] > MAX_PIXELS:
                    raise ValueError(f"{width}x{height} pixels, more than the {MAX_PIXELS // 10**6} "
                                     "megapixels featx decodes")
                opened.load()
                img = ImageOps.exif_transpose(opened)
        finally:
            Image.MAX_IMAGE_PIXELS = limit
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
