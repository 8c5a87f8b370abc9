"""The feature cache of one dataset and one model with its weights: shards, row table, manifest.

Layout (one folder per dataset and model/weights, one folder per layer, one file per shard):

    <cache>/<dataset>/<model>-<weights>[-float16]/manifest.json      the typed Manifest
    <cache>/<dataset>/<model>-<weights>[-float16]/rows/               the row table (featx.cache.rows)
    <cache>/<dataset>/<model>-<weights>[-float16]/<layer>/shard-00000.h5
    <cache>/<dataset>/<model>-<weights>[-float16]/<layer>/verified.log

Shard k of a layer holds rows [k * shard_size, (k + 1) * shard_size) of the row table, minus the
files that could not be read and the rows whose image is gone. A shard is written under a
temporary name and renamed when complete, so a shard that exists is whole; a run that stops loses
at most the shards in flight, and the next run redoes exactly those. What a run costs follows what
changed: the dataset is compared with the row table by each file's size and times (and, under
`--verify hash`, by the bytes of the files whose times moved), and a shard whose size and time
match its verification record is not read (see featx.cache.shards.VerifiedShards).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import xxhash
from filelock import FileLock, Timeout

from featx.cache.dtypes import DTYPES, as_stored
from featx.cache.key import CacheKey, dataset_folder
from featx.cache.manifest import LayerPlan, Manifest, OlderFormat, Run, now, read_manifest, write_manifest
from featx.cache.rows import NO_HASH, REMOVED, RowTable
from featx.cache.shards import (
    DamagedShard,
    VerifiedShards,
    check_whole,
    read_index,
    shard_blocks,
    write_shard_file,
)
from featx.data.images import STATS, ImageSet, shown
from featx.errors import FeatxError
from featx.models import Layer, Weights
from featx.options import Verify

log = logging.getLogger(__name__)
SHARD_BYTES = 256 << 20  # bound on one layer's shard in memory and on disk
UNREADABLE = xxhash.xxh3_128_digest(b"")  # the digest of a file whose bytes cannot be read


def default_cache_root() -> Path:
    return Path(os.environ.get("FEATX_CACHE", "featx-cache"))


def file_digest(images: ImageSet, index: int) -> bytes:
    """xxh3-128 of one image's bytes (UNREADABLE when they cannot be read)."""
    try:
        return xxhash.xxh3_128_digest(images.read_bytes(index))
    except OSError:
        return UNREADABLE


def file_digests(images: ImageSet, positions: np.ndarray) -> np.ndarray:
    """The digests of these images' bytes, read in parallel threads (each file read once)."""
    threads = min(16, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(threads, thread_name_prefix="featx-hash") as pool:
        digests = list(pool.map(lambda k: file_digest(images, int(k)), positions))
    return np.array(digests, dtype="V16") if digests else np.zeros(0, dtype="V16")


@dataclass(frozen=True)
class ImageChanges:
    """How a dataset differs from the cache's record of it: relative paths for people, rows (and
    positions in the scan) for the cache."""

    changed: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    unverified: int = 0  # of `changed`: rows never recognised by their bytes (under --verify hash)
    changed_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    changed_at: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # positions in the scan
    added_at: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    removed_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    moved_rows: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # same bytes, new times
    moved_at: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    def __bool__(self) -> bool:
        return bool(self.changed or self.added or self.removed)

    def describe(self) -> str:
        kinds = (("changed", self.changed), ("added", self.added), ("removed", self.removed))
        parts = [f"{len(paths)} {what} ({', '.join(map(shown, paths[:3]))}"
                 + (", ...)" if len(paths) > 3 else ")") for what, paths in kinds if paths]
        if self.unverified:
            parts.append(f"{self.unverified} of the changed were recognised by size and time only until "
                         "now (under --verify hash their features are extracted again from the bytes "
                         "whose hash is recorded)")
        return "; ".join(parts)


@dataclass
class LayerFeatures:
    """One layer's cached features with the dataset rows they belong to."""

    name: str
    features: np.ndarray
    index: np.ndarray
    labels: np.ndarray

    @property
    def dim(self) -> int:
        return self.features.shape[1]


class FeatureStore:
    """The cache folder of one dataset and one model with its weights."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self.manifest_path = self.folder / "manifest.json"
        if not self.manifest_path.is_file():
            raise FeatxError(f"no featx cache at {self.folder} (manifest.json missing)")
        try:
            self.manifest = read_manifest(self.manifest_path)
            self.rows = RowTable(self.folder / "rows", self.manifest.rows)
        except OlderFormat as older:
            from featx.cache.upgrade import upgrade

            self.manifest, self.rows = upgrade(self.folder, older.data)

    # --- identity ----------------------------------------------------------------------------
    @property
    def key(self) -> CacheKey:
        return self.manifest.key

    @property
    def weights(self) -> Weights:
        return self.manifest.weights

    @property
    def model(self) -> str:
        return self.manifest.key.model

    @property
    def label(self) -> str:
        return f"{self.manifest.dataset}/{self.folder.name}"

    def holds_weights(self, query: str) -> bool:
        """Whether `query` names this cache's weights: its tag or full name, `imagenet` for a
        model's first pretrained set, `random`, or the path of the same state-dict file."""
        weights = self.weights
        if query.lower() in (weights.tag.lower(), weights.name.lower(), weights.folder.lower()):
            return True
        if query == "random":
            return weights.random
        if query == "imagenet":
            return self.manifest.imagenet_default
        path = Path(query).expanduser()
        return weights.source == "file" and path.exists() and str(path.resolve()) == weights.location

    # --- creation ----------------------------------------------------------------------------
    @staticmethod
    def folder_for(root: Path, images: ImageSet, key: CacheKey) -> Path:
        """The one place a cache's folder is named: <root>/<dataset>/<key folder>."""
        return Path(root) / dataset_folder(Path(root), images.name, str(images.root)) / key.folder

    @classmethod
    def open_for(cls, root: Path, images: ImageSet, *, key: CacheKey, weights: Weights,
                 layer_names: list[str], imagenet_default: bool = False, verify: str = "size",
                 ) -> FeatureStore:
        """Open (or create) the cache for these images and this key; refuse a cache made with
        another key, saying what differs (a changed image list is `sync_images`' business).
        `layer_names` is the model's whole layer table, recorded to check names later;
        `imagenet_default` says the weights are the ones `--weights imagenet` names."""
        if key.dtype not in DTYPES:
            raise FeatxError(f"unknown dtype {key.dtype!r}; use float32 or float16")
        folder = cls.folder_for(root, images, key)
        if not (folder / "manifest.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            with FileLock(folder / ".manifest.lock"):  # two runs starting together make it once
                if not (folder / "manifest.json").is_file():
                    cls._create(folder, images, key=key, weights=weights, layer_names=layer_names,
                                imagenet_default=imagenet_default, verify=verify)
        store = cls(folder)
        store.check_key(key)
        return store

    @staticmethod
    def _create(folder: Path, images: ImageSet, *, key: CacheKey, weights: Weights, layer_names: list[str],
                imagenet_default: bool, verify: str) -> None:
        rows = RowTable(folder / "rows", 0)
        codes = np.zeros(len(images), np.uint8)
        if images.fixed_split:
            from featx.data.splits import TEST, TRAIN

            codes = np.array([TRAIN if s == "train" else TEST for s in images.fixed_split], np.uint8)
        count = rows.append(images.paths, labels=images.labels, stats=images.file_stats(), split_codes=codes)
        manifest = Manifest(key=key, weights=weights, dataset=images.name, dataset_root=str(images.root),
                            classes=list(images.classes), model_layers=list(layer_names), rows=count,
                            fixed_split=images.fixed_split is not None,
                            verify=str(Verify.parse(verify, "verify")),
                            imagenet_default=imagenet_default, skipped=dict(images.skipped), created=now())
        write_manifest(folder / "manifest.json", manifest)

    def check_key(self, key: CacheKey) -> None:
        """Refuse to use this cache for features made with `key` if it was made with another."""
        changed = key.differences(self.key)
        if changed:
            raise FeatxError(f"the cache at {self.folder} was made with another "
                             + "; another ".join(changed) + "; it is not reused: delete that "
                             "folder or pass another cache folder")

    @classmethod
    def for_arrays(cls, root: Path, name: str, labels: np.ndarray, classes: tuple[str, ...],
                   layers: dict[str, int], *, dtype: str = "float32", shard_size: int = 512) -> FeatureStore:
        """A cache for features computed elsewhere (no image files behind them: rows are named
        row-N): fill it with `write_shard` per layer, shard by shard, then probe it like any cache.
        `layers` maps each layer name to its number of values."""
        from featx.models import Preprocess

        paths = tuple(f"row-{i:08d}" for i in range(len(labels)))
        origin = Path(root).resolve() / ".arrays" / name  # no folder: no images to check against
        images = ImageSet(origin, paths, np.asarray(labels, dtype=np.int64), tuple(classes),
                          stats=np.zeros(len(paths), dtype=STATS))
        weights = Weights(model="arrays", tag=name, source="file", preprocess=Preprocess(),
                          location=str(origin), categories=None, checksum="arrays")
        key = CacheKey.of(weights, precision="fp32", dtype=dtype)
        store = cls.open_for(root, images, key=key, weights=weights, layer_names=list(layers))
        store.update(lambda manifest: setattr(manifest, "arrays", True))
        store.plan_layers([Layer(layer, layer, (dim,)) for layer, dim in layers.items()], batch_size=1,
                          shard_size=shard_size)
        return store

    # --- the images ---------------------------------------------------------------------------
    @property
    def n_images(self) -> int:
        return self.rows.count

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.manifest.classes)

    @property
    def labels(self) -> np.ndarray:
        """Every row's class, int32 (a memory map: 4 bytes a row, read as used)."""
        return self.rows.labels

    @property
    def removed(self) -> np.ndarray:
        return self.rows.removed

    def images(self) -> ImageSet:
        """The cached rows as an image set, in row order (removed rows included, never read)."""
        codes = self.rows.split_codes()
        split = tuple(np.array(["", "train", "test"])[codes]) if self.manifest.fixed_split else None
        return ImageSet(Path(self.manifest.dataset_root), tuple(self.rows.paths()),
                        np.asarray(self.labels, dtype=np.int64), self.classes, split)

    def compare_images(self, images: ImageSet, verify: str | None = None, *, reread: bool = False,
                       ) -> ImageChanges:
        """What differs between the dataset as scanned now and the cache's record of it. By size
        and modification time; under `verify` hash (the cache's own by default) also by the bytes:
        a file whose change time moved (every file, with `reread`) is read and compared with the
        hash of the bytes its features came from, and a row with no such hash counts as changed."""
        verify = Verify.parse(verify or self.manifest.verify, "verify")
        rows = self.rows.find(images.paths)
        found = np.flatnonzero(rows >= 0)
        r = rows[found]
        now_stats, stored = images.file_stats()[found], self.rows.stats()[r]
        was_removed = (self.rows.flags[r] & REMOVED) != 0
        changed = ((stored["size"] != now_stats["size"]) | (stored["mtime_ns"] != now_stats["mtime_ns"])
                   | was_removed)
        moved = np.zeros(len(r), dtype=bool)
        unverified = 0
        if verify == Verify.HASH:
            hashes = self.rows.hashes()[r]
            never = (hashes == NO_HASH) & ~changed
            unverified = int(never.sum())
            moved_time = stored["ctime_ns"] != now_stats["ctime_ns"]
            look = np.flatnonzero(~changed & ~never & (moved_time | reread))
            same = file_digests(images, found[look]) == hashes[look]
            changed[look[~same]] = True
            moved[look[same & moved_time[look]]] = True
            changed |= never
        matched = np.zeros(self.rows.count, dtype=bool)
        matched[r] = True
        removed_rows = np.flatnonzero(~matched & ((self.rows.flags & REMOVED) == 0))
        added_at = np.flatnonzero(rows < 0)
        return ImageChanges(
            changed=tuple(images.paths[k] for k in found[changed]),
            added=tuple(images.paths[k] for k in added_at),
            removed=tuple(self.rows.paths(removed_rows)), unverified=unverified,
            changed_rows=r[changed], changed_at=found[changed], added_at=added_at,
            removed_rows=removed_rows, moved_rows=r[moved], moved_at=found[moved])

    def sync_images(self, images: ImageSet, verify: str | None = None) -> ImageChanges:
        """Bring the cache's record up to the dataset: a changed image's shards are deleted (to be
        extracted again), an added one becomes a new row at the end, a removed one is marked and no
        longer read. The images are recognised as `verify` says (the cache's own by default); hash
        makes the cache's verification hash from now on. The order (shards, then rows, then the
        manifest) leaves a cache that an interrupted sync redoes."""
        verify = Verify.parse(verify or self.manifest.verify, "verify")
        strongest = str(Verify.HASH if Verify.HASH in (verify, self.manifest.verify) else Verify.SIZE)
        changes = self.compare_images(images, verify)
        now_stats = images.file_stats()
        if not changes and strongest == self.manifest.verify:  # at most new times to record
            if len(changes.moved_rows):
                try:
                    with self._lock():
                        self._write_stats(changes.moved_rows, now_stats[changes.moved_at])
                except OSError:
                    pass  # a cache that cannot be written still serves: the times are read again next run
            return changes
        with self._lock():
            self.rows = RowTable(self.folder / "rows", read_manifest(self.manifest_path).rows)
            if len(changes.moved_rows):  # the same bytes, new times: only the record moves
                self._write_stats(changes.moved_rows, now_stats[changes.moved_at])
            if not changes and strongest == self.manifest.verify:
                return changes
            stale = set(changes.changed_rows.tolist())
            if len(changes.added_at) and self.rows.count:
                stale.add(self.rows.count - 1)  # the last shard's range grows
            for name, plan in self.manifest.layers.items():
                for shard in {row // plan.shard_size for row in stale}:
                    self.shard_path(name, shard).unlink(missing_ok=True)
            self._write_stats(changes.changed_rows, now_stats[changes.changed_at])
            self.rows.write("hash", changes.changed_rows, np.zeros(len(changes.changed_rows), "V16"))
            flags = self.rows.flags
            self.rows.write("flags", changes.changed_rows, flags[changes.changed_rows] & ~np.uint8(REMOVED))
            self.rows.write("flags", changes.removed_rows, flags[changes.removed_rows] | np.uint8(REMOVED))
            classes = list(self.manifest.classes)
            for name in (images.classes[images.labels[k]] for k in changes.added_at):
                if name not in classes:
                    classes.append(name)
            index = {name: k for k, name in enumerate(classes)}
            codes = np.zeros(len(changes.added_at), np.uint8)
            if images.fixed_split:
                codes = np.array([1 if images.fixed_split[k] == "train" else 2 for k in changes.added_at],
                                 np.uint8)
            count = self.rows.append([images.paths[k] for k in changes.added_at],
                                     labels=np.array([index[images.classes[images.labels[k]]]
                                                      for k in changes.added_at], dtype=np.int32),
                                     stats=now_stats[changes.added_at], split_codes=codes)

            def commit(manifest: Manifest) -> None:
                manifest.rows, manifest.classes, manifest.verify = count, classes, strongest
                for path in changes.changed:
                    manifest.skipped.pop(path, None)
                    manifest.notes.pop(path, None)

            self._update_locked(commit)
        return changes

    def _write_stats(self, rows: np.ndarray, stats: np.ndarray) -> None:
        for column, field_name in (("size", "size"), ("mtime", "mtime_ns"), ("ctime", "ctime_ns")):
            self.rows.write(column, rows, stats[field_name])

    def record_digests(self, digests: dict[int, bytes]) -> None:
        """The hashes of the bytes an extraction decoded, per row (see rows.hash)."""
        if digests:
            rows = np.fromiter(digests, dtype=np.int64, count=len(digests))
            self.rows.write("hash", rows, np.array(list(digests.values()), dtype="V16"))

    # --- description -------------------------------------------------------------------------
    def shard_path(self, layer: str, shard: int) -> Path:
        return self.folder / layer / f"shard-{shard:05d}.h5"

    def shard_ranges(self, layer: str) -> list[tuple[int, int]]:
        size = self.manifest.layers[layer].shard_size
        return [(start, min(start + size, self.n_images)) for start in range(0, self.n_images, size)]

    def missing_shards(self, layer: str) -> list[int]:
        if layer not in self.manifest.layers:
            return []
        present = {p.name for p in (self.folder / layer).glob("shard-*.h5")}
        return [k for k in range(len(self.shard_ranges(layer))) if f"shard-{k:05d}.h5" not in present]

    def complete_layers(self) -> list[str]:
        return [name for name in self.manifest.layers if not self.missing_shards(name)]

    def feature_time(self, layer: str) -> tuple[float, list[str]]:
        """Seconds of the extraction runs that produced `layer` (stopped and killed runs
        included: their shards are part of the layer), and the layers they shared."""
        seconds, shared = 0.0, set()
        for run in self.manifest.runs:
            if layer in run.layers:
                seconds += run.seconds
                shared.update(run.layers)
        order = list(self.manifest.layers)
        return seconds, sorted(shared, key=order.index)

    def summary(self) -> dict:
        """What `featx info` shows: images, layers with shards and bytes on disk, skips, runs."""
        layers = {}
        for name, plan in self.manifest.layers.items():
            files = sorted((self.folder / name).glob("shard-*.h5"))
            layers[name] = {"dim": plan.dim, "shards": len(files),
                            "shards_total": len(self.shard_ranges(name)),
                            "bytes": sum(f.stat().st_size for f in files)}
        return {"cache": self.label, "folder": str(self.folder), "images": self.n_images,
                "classes": len(self.classes), "weights": self.key.weights, "dtype": self.key.dtype,
                "created": self.manifest.created, "verify": self.manifest.verify,
                "skipped": self.manifest.skipped, "layers": layers,
                "runs": [run.to_dict() for run in self.manifest.runs]}

    # --- writing -----------------------------------------------------------------------------
    @contextmanager
    def extraction_lock(self, on_wait: Callable[[], None]) -> Iterator[None]:
        """One extraction at a time per cache folder: a second one calls `on_wait` and waits.
        A cache that cannot be written has nothing to lock (it only serves what it holds)."""
        lock = FileLock(self.folder / ".extract.lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            on_wait()
            lock.acquire()
        except OSError:
            yield
            return
        try:
            yield
        finally:
            lock.release()

    def _lock(self) -> FileLock:
        return FileLock(self.folder / ".manifest.lock")

    def update(self, change: Callable[[Manifest], None]) -> None:
        """Apply `change` to the manifest as it is on disk now, under the cache's lock, so that
        concurrent runs that add other layers or runs keep each other's entries."""
        with self._lock():
            self._update_locked(change)

    def _update_locked(self, change: Callable[[Manifest], None]) -> None:
        self.manifest = read_manifest(self.manifest_path)
        change(self.manifest)
        write_manifest(self.manifest_path, self.manifest)
        self.rows = RowTable(self.folder / "rows", self.manifest.rows)

    def plan_layers(self, layers: list[Layer], *, batch_size: int, shard_size: int) -> None:
        """Record new layers (dim, shard size) before their first shard is written; the manifest
        is not rewritten when every layer is planned already (a resumed run, every rank but one).

        A shard holds `shard_size` images (a multiple of the batch size), halved for a wide layer
        until it is within SHARD_BYTES, so that the smaller shard sizes divide the larger and ranks
        can share a run out by whole shards of every layer at once."""
        if all(layer.name in self.manifest.layers for layer in layers):
            return
        itemsize = np.dtype(self.key.dtype).itemsize

        def add(manifest: Manifest) -> None:
            for layer in layers:
                if layer.name in manifest.layers:
                    continue
                target = SHARD_BYTES // (layer.dim * itemsize)
                rows = max(batch_size, shard_size // batch_size * batch_size)
                while rows > target and rows % (2 * batch_size) == 0:
                    rows //= 2
                if rows > target:  # not halved evenly down to the bound: as near it as batches allow
                    rows = max(batch_size, target // batch_size * batch_size)
                manifest.layers[layer.name] = LayerPlan(layer, rows, batch_size, now())

        self.update(add)

    def write_shard(self, layer: str, shard: int, index: np.ndarray, *, features: np.ndarray,
                    skipped: dict[int, str], digests: dict[int, bytes] | None = None) -> Path:
        """Write one complete shard (under a temporary name, then renamed into place), record it
        as verified, and record the digests of the bytes its rows were computed from."""
        path = self.shard_path(layer, shard)
        stored = as_stored(layer, features, self.key.dtype)
        index = np.asarray(index, dtype=np.int64)
        start, stop = self.shard_ranges(layer)[shard]
        checksum = write_shard_file(
            path, features=stored, index=index, labels=self.labels[index], paths=self.rows.paths(index),
            attrs={"layer": layer, "shard": shard, "start": start, "stop": stop, "dim": stored.shape[1],
                   "model": self.model, "weights": self.key.weights,
                   "skipped": json.dumps({shown(self.rows.path(i)): e for i, e in skipped.items()})})
        VerifiedShards(path.parent).record(shard, path, checksum)
        self.record_digests(digests or {})
        return path

    def start_run(self, layers: list[str], n_images: int, settings: dict) -> str:
        """Record an extraction run as running; a run killed later keeps its last update."""
        run_id = f"{now()}-{os.getpid()}"
        self.update(lambda manifest: manifest.runs.append(
            Run(run_id, list(layers), n_images, now(), settings=dict(settings))))
        return run_id

    def update_run(self, run_id: str, seconds: float, n_images: int, *, status: str = "running",
                   skipped: dict[str, str] | None = None, notes: dict[str, str] | None = None) -> None:
        """The run's time and images so far; its status at the end (done or stopped), with the
        files it could not read and the remarks it made."""
        def change(manifest: Manifest) -> None:
            for run in manifest.runs:
                if run.id == run_id:
                    run.seconds, run.images, run.status = round(seconds, 3), n_images, status
            manifest.skipped.update(skipped or {})
            manifest.notes.update(notes or {})

        self.update(change)

    def bytes_to_write(self, layer: str, shards: list[int]) -> int:
        """About how many bytes these shards of a planned layer take on disk."""
        plan = self.manifest.layers[layer]
        rows = sum(stop - start for start, stop in (self.shard_ranges(layer)[k] for k in shards))
        return rows * (plan.dim * np.dtype(self.key.dtype).itemsize + 64)

    # --- reading -----------------------------------------------------------------------------
    def check_layers(self, names: list[str]) -> None:
        """Refuse, before any work starts, a name the model has no layer for or a layer the
        cache does not hold complete."""
        known = self.manifest.model_layers
        unknown = [name for name in names if name not in known]
        if unknown:
            raise FeatxError(f"{self.model} has no layer {', '.join(map(repr, unknown))}; "
                             f"its layers: {', '.join(known)}")
        for name in names:
            self._check_complete(name)

    def _check_complete(self, layer: str) -> None:
        if layer not in self.manifest.layers:
            have = ", ".join(self.manifest.layers) or "none"
            raise FeatxError(f"layer {layer!r} is not in the cache {self.label} (cached: {have}); "
                             "extract it first")
        missing = self.missing_shards(layer)
        if missing:
            raise FeatxError(f"layer {layer} in {self.label} is incomplete ({len(missing)} shards "
                             "missing): run the same featx extract again to resume")

    def read_shard(self, layer: str, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """One shard's features (as stored) and rows, checked against its checksum and the
        layer's width; a damaged or truncated shard is a DamagedShard naming it."""
        ((index, features),) = self._blocks(layer, shard, None)
        return features, index

    def _blocks(self, layer: str, shard: int, rows: int | None,
                records: dict | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """A shard's blocks, checked against its checksum; a shard read whole and found sound is
        recorded as verified, a damaged one as damaged (the next extract writes it anew)."""
        path, verified = self.shard_path(layer, shard), VerifiedShards(self.folder / layer)
        try:
            checksum = yield from shard_blocks(path, self.manifest.layers[layer].dim, rows)
        except DamagedShard:
            verified.forget(shard)
            raise
        if records is None or not verified.intact(shard, path, records):
            verified.record(shard, path, checksum)

    def layer_index(self, layer: str) -> np.ndarray:
        """The dataset rows one layer holds, in order (unreadable and removed images absent); reads
        only each shard's row list, which `iter_blocks` checks against the checksum later."""
        self._check_complete(layer)
        parts = [read_index(self.shard_path(layer, k)) for k in range(len(self.shard_ranges(layer)))]
        index = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        removed = self.removed
        return index[~np.isin(index, removed)] if len(removed) else index

    def iter_blocks(self, layer: str, rows: int, from_row: int = 0, *, stored: bool = False,
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(dataset rows, float32 features) of one layer in blocks of at most `rows` rows, shard by
        shard from the one holding dataset row `from_row`, holding one block at a time; removed
        images left out. `stored`: the features as stored (the cache's dtype), for an exact copy.
        A damaged shard raises DamagedShard at its end (a consumer discards what it computed from
        an unfinished pass)."""
        self._check_complete(layer)
        removed = self.removed
        records = VerifiedShards(self.folder / layer).load()
        for k, (_, stop) in enumerate(self.shard_ranges(layer)):
            if stop <= from_row:
                continue
            for index, block in self._blocks(layer, k, rows, records):
                keep = ~np.isin(index, removed) if len(removed) else slice(None)
                yield index[keep], block[keep] if stored else block[keep].astype(np.float32, copy=False)

    def damaged_shards(self, layer: str, *, thorough: bool = False) -> dict[int, str]:
        """{shard: why} for every present shard of `layer` that fails its check. A shard whose size
        and time match its verification record is taken as sound without reading it, unless
        `thorough`; any other is read whole (and recorded as verified when sound)."""
        damaged = {}
        verified = VerifiedShards(self.folder / layer)
        records = verified.load()
        dim = self.manifest.layers[layer].dim
        for k in range(len(self.shard_ranges(layer))):
            path = self.shard_path(layer, k)
            if not path.is_file() or (not thorough and verified.intact(k, path, records)):
                continue
            try:
                verified.record(k, path, check_whole(path, dim))
            except DamagedShard as exc:
                verified.forget(k)
                damaged[k] = exc.reason
        verified.compact(self._lock, len(self.shard_ranges(layer)))
        return damaged

    def read_layer(self, layer: str) -> LayerFeatures:
        """All rows of one layer, in dataset order (unreadable images are absent)."""
        self._check_complete(layer)
        parts, index = [], []
        records = VerifiedShards(self.folder / layer).load()
        for k in range(len(self.shard_ranges(layer))):
            ((rows, features),) = self._blocks(layer, k, None, records)
            parts.append(features.astype(np.float32, copy=False))
            index.append(rows)
        idx = np.concatenate(index)
        features = np.concatenate(parts)
        removed = self.removed
        if len(removed):  # images gone from the dataset are not read
            keep = ~np.isin(idx, removed)
            features, idx = features[keep], idx[keep]
        return LayerFeatures(layer, features, idx, np.asarray(self.labels[idx], dtype=np.int64))


def list_stores(root: str | Path) -> tuple[list[FeatureStore], dict[Path, str]]:
    """Every dataset/model cache under a cache root, and {folder: problem} for the ones whose
    manifest is broken: those are named and passed over, never fatal for the others."""
    stores, broken = [], {}
    for path in sorted(Path(root).glob("*/*/manifest.json")):
        try:
            stores.append(FeatureStore(path.parent))
        except FeatxError as exc:
            broken[path.parent] = str(exc)
    return stores, broken
