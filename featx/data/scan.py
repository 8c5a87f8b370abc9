"""Find a dataset's images: a folder of class subfolders, a folder with train/ and test/ of class
subfolders, or tar shards. One pass over the folders with os.scandir, one stat per file (its size,
modification and change time travel with the ImageSet, so nothing is looked at twice); no image
is opened here."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from featx.data.images import IMAGE_EXTENSIONS, STATS, ImageSet
from featx.errors import FeatxError

FIXED_SPLITS = ("train", "test")


def find_images(root: str | Path) -> ImageSet:
    """Scan a folder of class subfolders, or a folder with train/ and test/ of class subfolders,
    or tar shards in WebDataset's layout (`data/train-{000000..000127}.tar`, see featx.data.tars).

    Links: a link to an image file is followed and a class folder may itself be a link; a broken
    link, a link to a folder inside a class folder, and a second path to a file already taken
    (through a link, or a hard link) are skipped, and each is named in `ImageSet.skipped`."""
    if str(root).endswith(".tar"):
        from featx.data.tars import find_in_tars

        return find_in_tars(str(root))
    root = Path(root).expanduser()
    if not root.exists():
        raise FeatxError(f"dataset folder not found: {root}")
    if not root.is_dir():
        raise FeatxError(f"dataset path is not a folder: {root}")
    root = root.resolve()
    top = _class_dirs(root)
    has_fixed_split = set(FIXED_SPLITS) <= set(top) and all(_class_dirs(root / s) for s in FIXED_SPLITS)
    parts = [(s, root / s) for s in FIXED_SPLITS] if has_fixed_split else [("", root)]
    classes = sorted({name for _, folder in parts for name in _class_dirs(folder)})
    if not classes:
        loose = any(Path(root, name).suffix.lower() in IMAGE_EXTENSIONS for name in os.listdir(root))
        hint = " (images must sit in one subfolder per class)" if loose else ""
        raise FeatxError(f"no class folders in {root}{hint}")
    if len(classes) < 2:
        raise FeatxError(f"{root} has one class ({classes[0]}); comparing layers needs at least two")
    walk = _Walk(root)
    labels: list[int] = []
    splits: list[str] = []
    for split, folder in parts:
        for label, cls in enumerate(classes):
            before = len(walk.paths)
            if (folder / cls).is_dir():
                walk.folder(folder / cls, f"{split}/{cls}" if split else cls)
            if len(walk.paths) == before:
                where = f"{split}/{cls}" if split else cls
                raise FeatxError(f"class folder {where} in {root} has no images")
            labels += [label] * (len(walk.paths) - before)
            splits += [split] * (len(walk.paths) - before)
    return ImageSet(root, tuple(walk.paths), np.asarray(labels, dtype=np.int64), tuple(classes),
                    tuple(splits) if has_fixed_split else None, walk.skipped,
                    np.array(walk.stats, dtype=STATS))


def _class_dirs(folder: Path) -> list[str]:
    """The names of a folder's visible subfolders (links to folders included), sorted."""
    with os.scandir(folder) as entries:
        return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())


class _Walk:
    """The images below class folders, in name order at every level, each stat'ed once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.paths: list[str] = []
        self.stats: list[tuple[int, int, int]] = []
        self.skipped: dict[str, str] = {}
        self.seen: dict[tuple[int, int], str] = {}  # (device, inode) -> the path that took it

    def folder(self, folder: Path, rel: str) -> None:
        try:
            with os.scandir(folder) as scanned:
                entries = sorted(scanned, key=lambda e: e.name)
        except OSError as exc:
            self.skipped[rel] = f"a folder that cannot be read ({exc.strerror})"
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = f"{rel}/{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                if os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                    self.skipped[path] = "a folder, not an image file"
                self.folder(Path(entry.path), path)
            elif entry.is_symlink() and entry.is_dir():
                self.skipped[path] = "a link to a folder inside a class folder is not followed"
            elif os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS:
                self._file(entry, path)

    def _file(self, entry: os.DirEntry, path: str) -> None:
        try:
            info = entry.stat()
        except OSError:
            self.skipped[path] = "a broken link" if entry.is_symlink() else "a file that cannot be looked at"
            return
        if not entry.is_file():
            self.skipped[path] = "not a regular file"
            return
        identity = (info.st_dev, info.st_ino)
        if identity in self.seen:
            self.skipped[path] = f"the same file as {self.seen[identity]}"
            return
        self.seen[identity] = path
        self.paths.append(path)
        self.stats.append((info.st_size, info.st_mtime_ns, info.st_ctime_ns))
