"""The row table: one row per image of a cached dataset, in columns of its own files.

    rows/label.i4      int32     the class (an index into the manifest's classes)
    rows/size.i8       int64     file identity: size in bytes,
    rows/mtime.i8      int64       modification time (ns),
    rows/ctime.i8      int64       change time (ns; nobody can set it, so a swapped file shows)
    rows/hash.v16      16 bytes  xxh3-128 of the bytes extraction decoded (zero: not known)
    rows/flags.u1      uint8     REMOVED, and the dataset's own split (TRAIN or TEST << 1)
    rows/key.u8        uint64    xxh3-64 of the path's bytes, to find a path's row
    rows/path.end.i8   int64     where each path ends in rows/path.bytes
    rows/path.bytes              the paths' bytes (os.fsencode: any name, UTF-8 or not)

Each column is a plain array of fixed-width values, read through a memory map: nothing is parsed
and a reader touches only the columns and rows it uses (labels: 4 bytes a row). Rows are only ever
appended; a file's identity and hash and a row's flags are written in place. The manifest says how
many rows are committed: bytes past them (an append that was interrupted) are never read, and the
next append writes over them. Row numbers never change: they are the rows of the shards.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import xxhash

from featx.data.images import STATS

COLUMNS = {"label": "<i4", "size": "<i8", "mtime": "<i8", "ctime": "<i8", "hash": "V16", "flags": "u1",
           "key": "<u8", "path.end": "<i8"}
SUFFIX = {"<i4": "i4", "<i8": "i8", "V16": "v16", "u1": "u1", "<u8": "u8"}
REMOVED = 1
SPLIT_SHIFT = 1  # (flags >> SPLIT_SHIFT) & 3: 0 none, 1 train, 2 test (featx.data.splits codes)
NO_HASH = np.zeros(1, dtype="V16")[0]


def path_keys(paths: Sequence[str]) -> np.ndarray:
    """The lookup key of each path: xxh3-64 of its bytes."""
    return np.fromiter((xxhash.xxh3_64_intdigest(os.fsencode(p)) for p in paths), dtype=np.uint64,
                       count=len(paths))


class RowTable:
    """The committed rows of one cache (see the module docstring), read lazily."""

    def __init__(self, folder: Path, count: int) -> None:
        self.folder, self.count = Path(folder), count

    def _file(self, column: str) -> Path:
        if column == "path.bytes":
            return self.folder / "path.bytes"
        return self.folder / f"{column}.{SUFFIX[COLUMNS[column]]}"

    def column(self, name: str) -> np.ndarray:
        """A column's committed values, memory-mapped read-only (an empty table: an empty array)."""
        dtype = np.dtype(COLUMNS[name])
        if self.count == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(self._file(name), dtype=dtype, mode="r", shape=(self.count,))

    @property
    def labels(self) -> np.ndarray:
        return self.column("label")

    @property
    def flags(self) -> np.ndarray:
        return self.column("flags")

    @property
    def removed(self) -> np.ndarray:
        """The rows whose image is gone from the dataset (never read)."""
        return np.flatnonzero(self.flags & REMOVED)

    def split_codes(self, rows: np.ndarray | None = None) -> np.ndarray:
        flags = self.flags if rows is None else self.flags[rows]
        return (flags >> SPLIT_SHIFT) & 3

    def stats(self) -> np.ndarray:
        stats = np.empty(self.count, dtype=STATS)
        stats["size"], stats["mtime_ns"], stats["ctime_ns"] = (
            self.column("size"), self.column("mtime"), self.column("ctime"))
        return stats

    def hashes(self) -> np.ndarray:
        return self.column("hash")

    def paths(self, rows: Sequence[int] | np.ndarray | None = None) -> list[str]:
        """The paths of these rows (all rows by default), as the file system names them."""
        rows = np.arange(self.count) if rows is None else np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return []
        ends = self.column("path.end")
        blob = np.memmap(self._file("path.bytes"), dtype=np.uint8, mode="r", shape=(int(ends[-1]),))
        stops = ends[rows]
        starts = np.where(rows > 0, ends[np.maximum(rows - 1, 0)], 0)
        return [os.fsdecode(blob[start:stop].tobytes())
                for start, stop in zip(starts.tolist(), stops.tolist(), strict=True)]

    def path(self, row: int) -> str:
        return self.paths([row])[0]

    def find(self, paths: Sequence[str]) -> np.ndarray:
        """Each path's row, -1 where the table has none (matched by the 64-bit key of its bytes)."""
        wanted = path_keys(paths)
        stored = self.column("key")
        if not len(stored):
            return np.full(len(wanted), -1, dtype=np.int64)
        order = np.argsort(stored, kind="stable")
        ordered = stored[order]
        at = np.minimum(np.searchsorted(ordered, wanted), len(ordered) - 1)
        return np.where(ordered[at] == wanted, order[at], -1).astype(np.int64)

    # --- writing (under the cache's manifest lock; the caller commits the new count) ----------
    def append(self, paths: Sequence[str], *, labels: np.ndarray, stats: np.ndarray,
               split_codes: np.ndarray) -> int:
        """Write rows after the committed ones (over anything an interrupted append left there);
        returns the count to commit."""
        self.folder.mkdir(parents=True, exist_ok=True)
        encoded = [os.fsencode(p) for p in paths]
        start = int(self.column("path.end")[-1]) if self.count else 0
        values = {
            "label": np.asarray(labels, dtype="<i4"), "size": stats["size"], "mtime": stats["mtime_ns"],
            "ctime": stats["ctime_ns"], "hash": np.zeros(len(paths), dtype="V16"),
            "flags": (np.asarray(split_codes, dtype=np.uint8) << SPLIT_SHIFT).astype("u1"),
            "key": path_keys(paths), "path.end": start + np.cumsum([len(b) for b in encoded], dtype=np.int64),
        }
        for name, given in values.items():
            array = np.asarray(given, dtype=COLUMNS[name])
            self._pwrite(name, [(self.count * array.dtype.itemsize, array.tobytes())])
        self._pwrite("path.bytes", [(start, b"".join(encoded))])
        return self.count + len(paths)

    def write(self, name: str, rows: np.ndarray, values: np.ndarray) -> None:
        """Write `values` of one column at these committed rows, in place."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return
        values = np.asarray(values, dtype=COLUMNS[name])
        order = np.argsort(rows)
        rows, values = rows[order], values[order]
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1  # runs of consecutive rows: one write each
        self._pwrite(name, [(int(run[0]) * values.dtype.itemsize, part.tobytes())
                            for run, part in zip(np.split(rows, breaks), np.split(values, breaks))])

    def _pwrite(self, name: str, pieces: list[tuple[int, bytes]]) -> None:
        """Write each (offset, bytes) into a column's file, then make them durable (the manifest
        that commits them is written after)."""
        fd = os.open(self._file(name), os.O_RDWR | os.O_CREAT, 0o666)
        try:
            for offset, data in pieces:
                os.pwrite(fd, data, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
