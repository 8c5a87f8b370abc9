"""Shard files: one HDF5 file per layer and range of rows, written whole under a temporary name and
renamed into place, with an xxh3 checksum of its features and rows; and the record of which shard
files were last read whole and found to match their checksum, by their size and time.

A shard holds `features` (rows x dim, in the cache's dtype), `index` (its dataset rows), `labels`,
`paths` (bytes) and attributes (checksum, layer, shard, the row range, featx version). A shard that
exists is whole. A shard is read in blocks; its checksum is checked as the blocks pass, so a
damaged shard is named before anything computed from it is used.
"""

from __future__ import annotations

import errno
import os
import queue
import shutil
import threading
from collections.abc import Callable, Generator
from pathlib import Path

import h5py
import numpy as np
import xxhash

from featx import __version__
from featx.errors import FeatxError

VERIFIED = "verified.log"  # per layer folder: lines "shard size mtime_ns checksum", the last one counts


class DamagedShard(FeatxError):
    """A shard that cannot be read or whose contents do not match its checksum."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path, self.reason = path, reason
        super().__init__(f"the shard {path} is damaged: {reason}; run the same featx extract again "
                         "to write it anew")


def _unreadable(path: Path, exc: Exception) -> DamagedShard:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return DamagedShard(path, f"unreadable ({reason})")


def shard_checksum(features: np.ndarray, index: np.ndarray) -> str:
    """xxh3 of a shard's features and rows (about 30 GB/s: cheap beside reading them)."""
    h = xxhash.xxh3_64()
    h.update(np.ascontiguousarray(features).data)
    h.update(np.ascontiguousarray(index, dtype=np.int64).data)
    return h.hexdigest()


def write_shard_file(path: Path, *, features: np.ndarray, index: np.ndarray, labels: np.ndarray,
                     paths: list[str], attrs: dict) -> str:
    """Write one whole shard under a temporary name, then rename it into place; returns its
    checksum. A full disk is asked about first (HDF5 fails badly on one) and leaves no file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    needed = features.nbytes + 64 * len(index) + (1 << 20)  # features, index, labels, paths, headers
    if shutil.disk_usage(path.parent).free < needed:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (a shard needs {needed >> 20} MiB)",
                      str(path.parent))
    checksum = shard_checksum(features, index)
    try:
        _write_h5(tmp, features=features, index=index, labels=labels, paths=paths,
                  attrs={**attrs, "checksum": checksum, "featx_version": __version__})
        os.replace(tmp, path)
    except OSError as exc:
        if exc.filename:
            raise
        code = exc.errno or errno.EIO
        raise OSError(code, f"{os.strerror(code)} ({exc})", str(tmp)) from None
    finally:
        tmp.unlink(missing_ok=True)  # a shard that failed (disk full) leaves no partial file
    return checksum


def _write_h5(tmp: Path, *, features: np.ndarray, index: np.ndarray, labels: np.ndarray, paths: list[str],
              attrs: dict) -> None:
    rows, dim = features.shape
    with h5py.File(tmp, "w") as f:
        chunk_rows = max(1, min(rows, (1 << 20) // max(1, dim * 4))) if rows else None
        f.create_dataset("features", data=features, chunks=(chunk_rows, dim) if rows else None)
        f.create_dataset("index", data=index.astype(np.int64))
        f.create_dataset("labels", data=labels)
        f.create_dataset("paths", data=np.array([os.fsencode(p) for p in paths], dtype=object),
                         dtype=h5py.vlen_dtype(bytes))
        f.attrs.update(attrs)


def shard_blocks(path: Path, dim: int, rows: int | None) -> Generator[tuple[np.ndarray, np.ndarray], None,
                                                                      str]:
    """(rows, features as stored) of one shard in blocks of at most `rows` (None: one block).
    The checksum is computed over the blocks as they pass and checked after the last one: a
    damaged shard raises DamagedShard before anything after it is read. Returns the checksum."""
    try:
        with h5py.File(path, "r") as f:
            data, index, expected = f["features"], f["index"][...], f.attrs["checksum"]
            if data.ndim != 2 or data.shape[1] != dim or len(index) != data.shape[0]:
                raise DamagedShard(path, f"shape {data.shape} where {dim} columns belong")
            digest = xxhash.xxh3_64()
            step = max(1, rows or len(index))
            for start in range(0, max(len(index), 1), step):  # an empty shard is one empty block
                block = data[start:start + step]
                digest.update(np.ascontiguousarray(block).data)
                yield index[start:start + step], block
    except (OSError, KeyError, ValueError) as exc:
        raise _unreadable(path, exc) from None
    digest.update(np.ascontiguousarray(index, dtype=np.int64).data)
    if digest.hexdigest() != expected:
        raise DamagedShard(path, "its checksum does not match its contents")
    return str(expected)


def read_index(path: Path) -> np.ndarray:
    """A shard's rows only (its checksum is checked when its features are read)."""
    try:
        with h5py.File(path, "r") as f:
            return f["index"][...].astype(np.int64)
    except (OSError, KeyError, ValueError) as exc:
        raise _unreadable(path, exc) from None


def check_whole(path: Path, dim: int) -> str:
    """Read a shard whole; its checksum if it matches, else DamagedShard."""
    blocks = shard_blocks(path, dim, 4096)
    while True:
        try:
            next(blocks)
        except StopIteration as end:
            return end.value


class VerifiedShards:
    """Which shard files of a layer were last found whole: each one's size, modification time and
    checksum when it was written or read whole. A shard whose size and time still match is taken
    as verified without reading it; any other is read whole before it is trusted. Lines are only
    appended (atomically, by any number of processes); the log is rewritten once it holds twice as
    many lines as shards."""

    def __init__(self, layer_folder: Path) -> None:
        self.path = layer_folder / VERIFIED

    def load(self) -> dict[int, tuple[int, int, str]]:
        """shard -> (size, mtime_ns, checksum); a shard whose last line says damaged is absent."""
        records: dict[int, tuple[int, int, str]] = {}
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            return records
        for line in lines:
            parts = line.split()
            if len(parts) != 4 or not parts[0].isdigit():
                continue  # a line cut short by a killed process
            shard, size, mtime, checksum = int(parts[0]), int(parts[1]), int(parts[2]), parts[3]
            if size < 0:
                records.pop(shard, None)
            else:
                records[shard] = (size, mtime, checksum)
        return records

    def intact(self, shard: int, path: Path, records: dict[int, tuple[int, int, str]]) -> bool:
        """Whether `path` is the file that was verified: the same size and modification time."""
        try:
            info = path.stat()
        except OSError:
            return False
        record = records.get(shard)
        return record is not None and record[:2] == (info.st_size, info.st_mtime_ns)

    def record(self, shard: int, path: Path, checksum: str) -> None:
        """Note that `path` was written or read whole and matches `checksum`."""
        try:
            info = path.stat()
        except OSError:
            return
        self._append(f"{shard} {info.st_size} {info.st_mtime_ns} {checksum}\n")

    def forget(self, shard: int) -> None:
        """Note that the shard is damaged: the next run reads it whole (and writes it anew)."""
        self._append(f"{shard} -1 -1 damaged\n")

    def _append(self, line: str) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError:
            return  # a read-only cache: the next run verifies by reading
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def compact(self, lock: Callable[[], object], shards: int) -> None:
        """Rewrite the log with one line per shard once it has grown past twice that (under the
        cache's lock, so that no line appended meanwhile is lost)."""
        try:
            if self.path.stat().st_size < 2 * max(shards, 1) * 48:
                return
        except OSError:
            return
        try:
            with lock():
                records = self.load()
                tmp = self.path.with_name(f"{VERIFIED}.{os.getpid()}.tmp")
                try:
                    tmp.write_text("".join(f"{k} {s} {m} {c}\n" for k, (s, m, c) in sorted(records.items())))
                    os.replace(tmp, self.path)
                finally:
                    tmp.unlink(missing_ok=True)
        except OSError:
            return  # a cache that cannot be written keeps its log as it is


class ShardWriter:
    """A background thread that writes finished shards while the next batches are computed;
    `write` is called with each submitted job's keywords."""

    def __init__(self, write: Callable[..., object], depth: int = 2) -> None:
        self.write = write
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.written: list[object] = []
        self.thread = threading.Thread(target=self._run, name="featx-shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.written.append(self.write(**job))
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                    self.error = exc

    def submit(self, **job) -> None:
        self._raise()
        self.queue.put(job)

    def close(self) -> None:
        """Finish every shard already handed over, then stop."""
        self.queue.put(None)
        self.thread.join()
        self._raise()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error

