"""A dataset's images as a value (`ImageSet`), and one image file read safely as 8-bit RGB."""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from featx.options import MAX_PIXELS

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
LARGE_PIXELS = 40_000_000  # above this a JPEG is decoded at reduced size (draft mode)
STATS = np.dtype([("size", "<i8"), ("mtime_ns", "<i8"), ("ctime_ns", "<i8")])  # a file's identity


@dataclass(frozen=True)
class ImageSet:
    """The images of a dataset, in a fixed order: relative paths, integer labels and class names.

    `stats` holds each file's size, modification and change time (STATS) as the scan saw them;
    `fixed_split` "train"/"test" per image for datasets laid out as train/ and test/; `skipped`
    what the scan did not take, with the reason (see `featx.data.scan`). Paths are `str` as the
    file system gives them (names that are not UTF-8 carry surrogate escapes: os.fsencode gives
    the original bytes back).
    """

    root: Path
    paths: tuple[str, ...]
    labels: np.ndarray
    classes: tuple[str, ...]
    fixed_split: tuple[str, ...] | None = None
    skipped: dict[str, str] = field(default_factory=dict)
    stats: np.ndarray | None = None  # STATS per image; None: not looked at yet (see file_stats)

    @property
    def name(self) -> str:
        """The folder's name; for tar shards the pattern's stem without its range (train)."""
        if not self.in_tars:
            return self.root.name
        from featx.data.tars import dataset_name

        return dataset_name(self.root)

    @property
    def in_tars(self) -> bool:
        """Whether the images are members of tar shards: `root` is then the shards' pattern and
        each path is `<tar name>/<member name>`."""
        return self.root.name.endswith(".tar")

    def __len__(self) -> int:
        return len(self.paths)

    def read_bytes(self, index: int) -> bytes:
        """The bytes of image `index`: a file's, or a tar member's (read at its offset)."""
        if not self.in_tars:
            return (self.root / self.paths[index]).read_bytes()
        from featx.data.tars import read_member

        return read_member(self.root.parent, self.paths[index])

    def file_stats(self) -> np.ndarray:
        """STATS per image: as the scan saw them, else looked at now (a file gone since: -1)."""
        if self.stats is not None:
            return self.stats
        stats = np.full(len(self), -1, dtype=STATS)
        if self.in_tars:
            from featx.data.tars import member_stats

            return member_stats(self.root.parent, self.paths)
        for k, rel in enumerate(self.paths):
            try:
                info = os.stat(self.root / rel)
            except OSError:
                continue
            stats[k] = (info.st_size, info.st_mtime_ns, info.st_ctime_ns)
        return stats


def load_image(source: str | Path | bytes, min_side: int | None = None,
               max_pixels: int = MAX_PIXELS) -> tuple[Image.Image, int]:
    """One image as 8-bit RGB with its EXIF orientation applied, and how many frames its file
    holds (a GIF or TIFF: the first is used).

    Grayscale, palette, RGBA, CMYK and 16-bit images are converted; raises OSError/ValueError
    for files that are not readable images. Memory stays bounded: an image of more than
    `max_pixels` is refused (ValueError naming its size and the limit) before it is decoded, and
    a JPEG over LARGE_PIXELS is decoded at a reduced scale that keeps its shorter side at least
    `min_side`.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # max_pixels rules here
        limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as opened:
                width, height = opened.size
                if width * height > max_pixels:
                    raise ValueError(f"{width}x{height} pixels, over the limit of {max_pixels / 1e6:g} "
                                     "megapixels (--max-pixels)")
                if width * height > LARGE_PIXELS and min_side and opened.format == "JPEG":
                    scale = min_side / min(width, height)
                    opened.draft("RGB", (int(width * scale) + 1, int(height * scale) + 1))
                frames = int(getattr(opened, "n_frames", 1) or 1)
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
        return background, frames
    return img.convert("RGB"), frames


def shown(path: str) -> str:
    """A path as reports show it: a name that is not UTF-8 with its odd bytes as \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")
