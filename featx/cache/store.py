"""HDF5 shard cache: layout, metadata, atomic shard writes, resume, reading back.

Layout (one folder per dataset and model/weights, one folder per layer, one file per shard):

    <cache>/<dataset>/<model>-<weights>[-float16]/manifest.json
    <cache>/<dataset>/<model>-<weights>[-float16]/<layer>/shard-00000.h5

Shard k of a layer holds images [k * shard_size, (k + 1) * shard_size) of the dataset's image
list, minus the files that could not be read. A shard is written under a temporary name and
renamed when complete, so a shard that exists is whole; a run that stops loses at most the
shards in flight, and the next run redoes exactly those.
"""

from __future__ import annotations

import errno
import json
import os
import queue
import shutil
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
import xxhash
from filelock import FileLock, Timeout

from featx import __version__
from featx.cache.dtypes import DTYPES, as_stored
from featx.data.images import ImageSet
from featx.errors import FeatxError
from featx.models import Layer, Weights

SHARD_BYTES = 256 << 20  # bound on one layer's shard in memory and on disk
CACHE_FORMAT = 3  # 1: weights named by strings; 2: shards without checksums


@dataclass(frozen=True)
class CacheKey:
    """What cached features depend on: a cache made with any other value is not reused."""

    model: str
    weights: str
    weights_checksum: str
    preprocess: dict
    precision: str
    dtype: str
    tta: str = "none"
    decode: str = "pil"

    @classmethod
    def of(cls, weights: Weights, precision: str, dtype: str, *, tta: str = "none",
           decode: str = "pil") -> CacheKey:
        return cls(weights.model, weights.name, weights.checksum, weights.preprocess.to_dict(),
                   precision, dtype, tta, decode)

    @property
    def folder(self) -> str:
        """<model>-<weights tag>[-float16][-<tta>][-device-decode], as Weights.folder names it."""
        tag = self.weights.removeprefix(self.model + ".")
        name = f"{self.model}-{tag}".replace(":", "-").replace("/", "-")
        dtype = "-float16" if self.dtype == "float16" else ""
        decode = "-device-decode" if self.decode == "device" else ""
        return name + dtype + (f"-{self.tta}" if self.tta != "none" else "") + decode

    def differences(self, manifest: dict) -> list[str]:
        """What a cache's manifest says differently, as 'field (there X, now Y)'."""
        stored = json.loads(json.dumps(asdict(self)))  # compare as stored: tuples become lists
        made = {f.name: manifest.get(f.name, f.default) for f in fields(self)}  # older caches: defaults
        return [f"{f.name.replace('_', ' ')} ({made[f.name]} there, {stored[f.name]} now)"
                for f in fields(self) if made[f.name] != stored[f.name]]


@dataclass(frozen=True)
class ImageChanges:
    """How a dataset differs from the cache's record of it, as relative paths."""

    changed: tuple[str, ...] = ()
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.changed or self.added or self.removed)

    def describe(self) -> str:
        parts = [f"{len(paths)} {what} ({', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''})"
                 for what, paths in (("changed", self.changed), ("added", self.added),
                                     ("removed", self.removed)) if paths]
        return "; ".join(parts)


def dataset_folder(root: Path, images: ImageSet) -> str:
    """The dataset's folder in a cache: its name, or name-<hash of its path> when another dataset
    of the same name is cached there already (a/test and b/test)."""
    for manifest in Path(root).glob(f"{images.name}/*/manifest.json"):
        try:
            other = json.loads(manifest.read_text()).get("dataset_root")
        except (OSError, ValueError):
            continue
        if other and other != str(images.root):
            return f"{images.name}-{xxhash.xxh3_64_hexdigest(str(images.root).encode())[:8]}"
    return images.name


def default_cache_root() -> Path:
    return Path(os.environ.get("FEATX_CACHE", "featx-cache"))


def _write_json_atomic(path: Path, data: dict) -> None:
    """Write under a name of this process's own, then rename: a reader sees the old or the new."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
        self.manifest = read_manifest(self.manifest_path)

    @property
    def weights(self) -> Weights:
        return Weights.from_dict(self.manifest["weights_info"])

    def holds_weights(self, query: str) -> bool:
        """Whether `query` names this cache's weights: its tag or full name, `imagenet` for a
        model's first pretrained set, `random`, or the path of the same state-dict file."""
        weights = self.weights
        if query.lower() in (weights.tag.lower(), weights.name.lower(), weights.folder.lower()):
            return True
        if query == "random":
            return weights.random
        if query == "imagenet":
            return bool(self.manifest.get("imagenet_default"))
        path = Path(query).expanduser()
        return weights.source == "file" and path.is_file() and \
            str(path.resolve()) == weights.location

    # --- creation ----------------------------------------------------------------------------
    @classmethod
    def open_for(cls, root: Path, images: ImageSet, weights: Weights, *, precision: str,
                 layer_names: list[str], dtype: str = "float32", imagenet_default: bool = False,
                 verify: str = "size", tta: str = "none", decode: str = "pil") -> FeatureStore:
        """Open (or create) the cache for these images and these weights; refuse a cache whose
        weights, preprocessing, precision or dtype differ, saying what differs (a changed image
        list is `sync_images`' business). `layer_names` is the model's whole layer table,
        recorded to check names later; `imagenet_default` says the weights are the ones
        `--weights imagenet` names; `verify` how images are recognised (see ImageSet.file_stats)."""
        if dtype not in DTYPES:
            raise FeatxError(f"unknown dtype {dtype!r}; use float32 or float16")
        key = CacheKey.of(weights, precision, dtype, tta=tta, decode=decode)
        folder = Path(root) / dataset_folder(Path(root), images) / key.folder
        if (folder / "manifest.json").is_file():
            store = cls(folder)
            changed = key.differences(store.manifest)
            if changed:
                raise FeatxError(f"the cache at {folder} was made with another "
                                 + "; another ".join(changed) + "; it is not reused: delete that "
                                 "folder or pass another cache folder")
            return store
        folder.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": CACHE_FORMAT,
            "featx_version": __version__,
            **asdict(key),
            "weights_info": weights.to_dict(),
            "weights_random": weights.random,
            "imagenet_default": imagenet_default,
            "model_layers": list(layer_names),
            "dataset": images.name,
            "dataset_root": str(images.root),
            "classes": list(images.classes),
            "paths": list(images.paths),
            "labels": images.labels.tolist(),
            "fixed_split": list(images.fixed_split) if images.fixed_split else None,
            "stats": images.file_stats(verify),
            "removed": [],
            "layers": {},
            "runs": [],
            "skipped": dict(images.skipped),
            "notes": dict(images.notes),
            "created": _now(),
        }
        _write_json_atomic(folder / "manifest.json", manifest)
        return cls(folder)

    @classmethod
    def for_arrays(cls, root: Path, name: str, labels: np.ndarray, *, classes: tuple[str, ...],
                   layers: dict[str, int], dtype: str = "float32", shard_size: int = 512) -> FeatureStore:
        """A cache for features computed elsewhere (no image files behind them: rows are named
        row-N): fill it with `write_shard` per layer, shard by shard, then probe it like any cache.
        `layers` maps each layer name to its number of values."""
        from featx.models import Layer, Preprocess

        paths = tuple(f"row-{i:08d}" for i in range(len(labels)))
        origin = Path(root).resolve() / ".arrays" / name  # no folder: no images to check against
        images = ImageSet(origin, paths, np.asarray(labels, dtype=np.int64), tuple(classes))
        weights = Weights(model="arrays", tag=name, source="file", preprocess=Preprocess(),
                          location=str(origin), categories=None, checksum="arrays")
        store = cls.open_for(root, images, weights, precision="fp32", layer_names=list(layers), dtype=dtype)
        store.update_manifest(lambda manifest: manifest.update(arrays=True))
        store.plan_layers([Layer(layer, layer, (dim,)) for layer, dim in layers.items()], 1, shard_size)
        return store

    # --- the images ---------------------------------------------------------------------------
    def images(self) -> ImageSet:
        """The cached rows as an image set (row order; removed rows included, never read)."""
        m = self.manifest
        return ImageSet(Path(m["dataset_root"]), tuple(m["paths"]), self.labels, self.classes,
                        tuple(m["fixed_split"]) if m["fixed_split"] else None)

    @property
    def removed(self) -> set[int]:
        return set(self.manifest["removed"])

    def compare_images(self, images: ImageSet, verify: str = "size") -> ImageChanges:
        """What differs between the dataset as scanned now and the cache's record of it."""
        m, gone = self.manifest, self.removed
        now = dict(zip(images.paths, images.file_stats(verify)))
        rows = {path: i for i, path in enumerate(m["paths"])}
        changed = [p for p, i in rows.items() if p in now and
                   (i in gone or not _same_file(m["stats"][i], now[p]))]
        added = [p for p in images.paths if p not in rows]
        removed = [p for p, i in rows.items() if p not in now and i not in gone]
        return ImageChanges(tuple(changed), tuple(added), tuple(removed))

    def sync_images(self, images: ImageSet, verify: str = "size") -> ImageChanges:
        """Bring the cache's record up to the dataset: a changed image invalidates its shards
        (deleted, to be extracted again), an added one becomes a new row at the end, a removed
        one is marked and no longer read. Nothing else is touched."""
        changes = self.compare_images(images, verify)
        now = dict(zip(images.paths, images.file_stats(verify)))
        if not changes:
            if verify == "hash" and any(stats[2] is None for stats in self.manifest["stats"]):
                self.update_manifest(lambda m: m.update(stats=[now.get(path, stats) for path, stats
                                                               in zip(m["paths"], m["stats"])]))
            return changes
        split = dict(zip(images.paths, images.fixed_split or [None] * len(images)))

        def apply(m: dict) -> None:
            rows = {path: i for i, path in enumerate(m["paths"])}
            stale = {rows[p] for p in changes.changed}
            if changes.added:
                stale.add(len(m["paths"]) - 1)  # the last shard's range grows
            for path in changes.added:
                label = images.classes[images.labels[images.paths.index(path)]]
                if label not in m["classes"]:
                    m["classes"].append(label)
                m["paths"].append(path)
                m["labels"].append(m["classes"].index(label))
                m["stats"].append(now[path])
                if m["fixed_split"] is not None:
                    m["fixed_split"].append(split[path])
            for path in changes.changed:
                m["stats"][rows[path]] = now[path]
                m["skipped"].pop(path, None)
            m["removed"] = sorted((set(m["removed"]) - stale) | {rows[p] for p in changes.removed})
            for name, meta in m["layers"].items():
                for shard in {row // meta["shard_size"] for row in stale if row >= 0}:
                    self.shard_path(name, shard).unlink(missing_ok=True)

        self.update_manifest(apply)
        return changes

    # --- description -------------------------------------------------------------------------
    @property
    def n_images(self) -> int:
        return len(self.manifest["paths"])

    @property
    def classes(self) -> tuple[str, ...]:
        return tuple(self.manifest["classes"])

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self.manifest["labels"], dtype=np.int64)

    @property
    def label(self) -> str:
        return f"{self.manifest['dataset']}/{self.folder.name}"

    def shard_path(self, layer: str, shard: int) -> Path:
        return self.folder / layer / f"shard-{shard:05d}.h5"

    def shard_ranges(self, layer: str) -> list[tuple[int, int]]:
        size = self.manifest["layers"][layer]["shard_size"]
        return [(start, min(start + size, self.n_images)) for start in range(0, self.n_images, size)]

    def missing_shards(self, layer: str) -> list[int]:
        if layer not in self.manifest["layers"]:
            return []
        return [k for k in range(len(self.shard_ranges(layer)))
                if not self.shard_path(layer, k).is_file()]

    def complete_layers(self) -> list[str]:
        return [name for name in self.manifest["layers"] if not self.missing_shards(name)]

    def feature_time(self, layer: str) -> tuple[float, list[str]]:
        """Seconds of the extraction runs that produced `layer` (stopped and killed runs
        included: their shards are part of the layer), and the layers they shared."""
        seconds, shared = 0.0, set()
        for run in self.manifest["runs"]:
            if layer in run["layers"]:
                seconds += run["seconds"]
                shared.update(run["layers"])
        order = list(self.manifest["layers"])
        return seconds, sorted(shared, key=order.index)

    def summary(self) -> dict:
        """What `featx info` shows: images, layers with shards and bytes on disk, skips, runs."""
        layers = {}
        for name, meta in self.manifest["layers"].items():
            files = sorted((self.folder / name).glob("shard-*.h5"))
            layers[name] = {"dim": meta["dim"], "shards": len(files),
                            "shards_total": len(self.shard_ranges(name)),
                            "bytes": sum(f.stat().st_size for f in files)}
        return {"cache": self.label, "folder": str(self.folder), "images": self.n_images,
                "classes": len(self.classes), "weights": self.manifest["weights"],
                "dtype": self.manifest["dtype"], "created": self.manifest["created"],
                "skipped": self.manifest["skipped"], "layers": layers, "runs": self.manifest["runs"]}

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

    def update_manifest(self, change: Callable[[dict], None]) -> None:
        """Apply `change` to the manifest as it is on disk now, under the cache's lock, so that
        concurrent runs that add other layers or runs keep each other's entries."""
        with FileLock(self.folder / ".manifest.lock"):
            self.manifest = json.loads(self.manifest_path.read_text())
            change(self.manifest)
            _write_json_atomic(self.manifest_path, self.manifest)

    def plan_layers(self, layers: list[Layer], batch_size: int, shard_size: int) -> None:
        """Record new layers (dim, shard size) before their first shard is written; the manifest
        is not rewritten when every layer is planned already (a resumed run, every rank but one).

        A shard holds `shard_size` images (a multiple of the batch size), halved for a wide layer
        until it is within SHARD_BYTES, so that the smaller shard sizes divide the larger and ranks
        can share a run out by whole shards of every layer at once."""
        if all(layer.name in self.manifest["layers"] for layer in layers):
            return
        itemsize = np.dtype(self.manifest["dtype"]).itemsize

        def add(manifest: dict) -> None:
            for layer in layers:
                if layer.name in manifest["layers"]:
                    continue
                target = SHARD_BYTES // (layer.dim * itemsize)
                rows = max(batch_size, shard_size // batch_size * batch_size)
                while rows > target and rows % (2 * batch_size) == 0:
                    rows //= 2
                if rows > target:  # not halved evenly down to the bound: as near it as batches allow
                    rows = max(batch_size, target // batch_size * batch_size)
                manifest["layers"][layer.name] = {
                    **layer.to_dict(), "dim": layer.dim, "shard_size": rows, "batch_size": batch_size,
                    "created": _now(),
                }

        self.update_manifest(add)

    def write_shard(self, layer: str, shard: int, index: np.ndarray, *, features: np.ndarray,
                    skipped: dict[int, str]) -> Path:
        """Write one complete shard under a temporary name, then rename it into place."""
        path = self.shard_path(layer, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        stored = as_stored(layer, features, self.manifest["dtype"])
        needed = stored.nbytes + 64 * len(index) + (1 << 20)  # features, index, labels, paths, headers
        if shutil.disk_usage(path.parent).free < needed:  # HDF5 fails badly on a full disk: ask first
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (a shard needs {needed >> 20} MiB)",
                          str(path.parent))
        try:
            self._write_h5(tmp, layer, shard, index=index, stored=stored, skipped=skipped)
            os.replace(tmp, path)
        except OSError as exc:
            if exc.filename:
                raise
            code = exc.errno or errno.EIO
            raise OSError(code, f"{os.strerror(code)} ({exc})", str(tmp)) from None
        finally:
            tmp.unlink(missing_ok=True)  # a shard that failed (disk full) leaves no partial file
        return path

    def _write_h5(self, tmp: Path, layer: str, shard: int, *, index: np.ndarray, stored: np.ndarray,
                  skipped: dict[int, str]) -> None:
        rows, dim = stored.shape
        with h5py.File(tmp, "w") as f:
            chunk_rows = max(1, min(rows, (1 << 20) // max(1, dim * 4))) if rows else None
            f.create_dataset("features", data=stored,
                             chunks=(chunk_rows, dim) if rows else None)
            f.create_dataset("index", data=index.astype(np.int64))
            f.create_dataset("labels", data=self.labels[index])
            f.create_dataset("paths", data=[self.manifest["paths"][i] for i in index],
                             dtype=h5py.string_dtype())
            start, stop = self.shard_ranges(layer)[shard]
            f.attrs.update({
                "checksum": shard_checksum(stored, index.astype(np.int64)),
                "layer": layer, "shard": shard, "start": start, "stop": stop, "dim": dim,
                "featx_version": __version__, "model": self.manifest["model"],
                "weights": self.manifest["weights"],
                "skipped": json.dumps({self.manifest["paths"][i]: e for i, e in skipped.items()}),
            })

    def start_run(self, layers: list[str], n_images: int, settings: dict) -> str:
        """Record an extraction run as running; a run killed later keeps its last update."""
        run_id = f"{_now()}-{os.getpid()}"

        def add(manifest: dict) -> None:
            manifest["runs"].append({"id": run_id, "layers": layers, "seconds": 0.0, "images": 0,
                                     "planned_images": n_images, "status": "running",
                                     "when": _now(), **settings})

        self.update_manifest(add)
        return run_id

    def update_run(self, run_id: str, seconds: float, n_images: int, *, status: str = "running",
                   skipped: dict[str, str] | None = None) -> None:
        """The run's time and images so far; its status at the end (done or stopped)."""
        def change(manifest: dict) -> None:
            for run in manifest["runs"]:
                if run.get("id") == run_id:
                    run.update(seconds=round(seconds, 3), images=n_images, status=status)
            manifest["skipped"].update(skipped or {})

        self.update_manifest(change)

    def bytes_to_write(self, layer: str, shards: list[int]) -> int:
        """About how many bytes these shards of a planned layer take on disk."""
        meta = self.manifest["layers"][layer]
        rows = sum(stop - start for start, stop in (self.shard_ranges(layer)[k] for k in shards))
        return rows * (meta["dim"] * np.dtype(self.manifest["dtype"]).itemsize + 64)

    # --- reading -----------------------------------------------------------------------------
    def check_layers(self, names: list[str]) -> None:
        """Refuse, before any work starts, a name the model has no layer for or a layer the
        cache does not hold complete."""
        known = self.manifest["model_layers"]
        unknown = [name for name in names if name not in known]
        if unknown:
            raise FeatxError(f"{self.manifest['model']} has no layer {', '.join(map(repr, unknown))}; "
                             f"its layers: {', '.join(known)}")
        for name in names:
            self._check_complete(name)

    def _check_complete(self, layer: str) -> None:
        if layer not in self.manifest["layers"]:
            have = ", ".join(self.manifest["layers"]) or "none"
            raise FeatxError(f"layer {layer!r} is not in the cache {self.label} (cached: {have}); "
                             "extract it first")
        missing = self.missing_shards(layer)
        if missing:
            raise FeatxError(f"layer {layer} in {self.label} is incomplete ({len(missing)} shards "
                             "missing): run the same featx extract again to resume")

    def read_shard(self, layer: str, shard: int) -> tuple[np.ndarray, np.ndarray]:
        """One shard's features (as stored) and rows, checked against its checksum and the
        layer's width; a damaged or truncated shard is a DamagedShard naming it."""
        ((index, features),) = self._shard_blocks(layer, shard, None)
        return features, index

    def _shard_blocks(self, layer: str, shard: int, rows: int | None,
                      ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rows, features as stored) of one shard in blocks of at most `rows` (None: one block).
        The checksum is computed over the blocks as they pass and checked after the last one: a
        damaged shard raises DamagedShard before anything after it is read."""
        path = self.shard_path(layer, shard)
        dim = self.manifest["layers"][layer]["dim"]
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

    def layer_index(self, layer: str) -> np.ndarray:
        """The dataset rows one layer holds, in order (unreadable and removed images absent); reads
        only each shard's row list, which `iter_blocks` checks against the checksum later."""
        self._check_complete(layer)
        parts = []
        for k in range(len(self.shard_ranges(layer))):
            path = self.shard_path(layer, k)
            try:
                with h5py.File(path, "r") as f:
                    parts.append(f["index"][...].astype(np.int64))
            except (OSError, KeyError, ValueError) as exc:
                raise _unreadable(path, exc) from None
        index = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return index[~np.isin(index, list(self.removed))] if self.removed else index

    def iter_blocks(self, layer: str, rows: int, from_row: int = 0,
                    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(dataset rows, float32 features) of one layer in blocks of at most `rows` rows, shard by
        shard from the one holding dataset row `from_row`, holding one block at a time; removed
        images left out. A damaged shard raises DamagedShard at its end (a consumer discards what
        it computed from an unfinished pass)."""
        self._check_complete(layer)
        removed = list(self.removed)
        for k, (_, stop) in enumerate(self.shard_ranges(layer)):
            if stop <= from_row:
                continue
            for index, block in self._shard_blocks(layer, k, rows):
                keep = ~np.isin(index, removed) if removed else slice(None)
                yield index[keep], block[keep].astype(np.float32, copy=False)

    def damaged_shards(self, layer: str) -> dict[int, str]:
        """{shard: why} for every present shard of `layer` that fails its check (reads them all,
        a block at a time)."""
        damaged = {}
        for k in range(len(self.shard_ranges(layer))):
            if self.shard_path(layer, k).is_file():
                try:
                    for _ in self._shard_blocks(layer, k, 1024):
                        pass
                except DamagedShard as exc:
                    damaged[k] = exc.reason
        return damaged

    def read_layer(self, layer: str) -> LayerFeatures:
        """All rows of one layer, in dataset order (unreadable images are absent)."""
        self._check_complete(layer)
        parts, index = [], []
        for k in range(len(self.shard_ranges(layer))):
            features, rows = self.read_shard(layer, k)
            parts.append(features.astype(np.float32, copy=False))
            index.append(rows)
        idx = np.concatenate(index)
        features = np.concatenate(parts)
        if self.removed:  # images gone from the dataset are not read
            keep = ~np.isin(idx, list(self.removed))
            features, idx = features[keep], idx[keep]
        return LayerFeatures(layer, features, idx, self.labels[idx])


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


def _same_file(stored: list, now: list) -> bool:
    """Size and mtime equal, and the content hash too where both sides have one."""
    if stored[:2] != now[:2]:
        return False
    return stored[2] is None or now[2] is None or stored[2] == now[2]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


MANIFEST_KEYS = ("format", "model", "weights", "weights_info", "dataset", "dataset_root", "classes",
                 "paths", "labels", "stats", "removed", "layers", "runs", "skipped", "dtype",
                 "model_layers")


def read_manifest(path: Path) -> dict:
    """A cache's manifest, or a FeatxError saying what is wrong with it."""
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FeatxError(f"the cache manifest {path} cannot be read ({exc})") from None
    if not isinstance(manifest, dict) or "featx_version" not in manifest:
        raise FeatxError(f"the cache manifest {path} is not a featx manifest")
    if manifest.get("format") != CACHE_FORMAT:
        raise FeatxError(f"the cache at {path.parent} was made by an older featx (cache format "
                         f"{manifest.get('format', 1)}); delete that folder or pass another cache folder")
    missing = [key for key in MANIFEST_KEYS if key not in manifest]
    if missing:
        raise FeatxError(f"the cache manifest {path} lacks {', '.join(missing)}")
    return manifest


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


class ShardWriter:
    """A background thread that writes finished shards while the next batches are computed."""

    def __init__(self, store: FeatureStore, depth: int = 2) -> None:
        self.store = store
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.written: list[Path] = []
        self.thread = threading.Thread(target=self._run, name="featx-shard-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (job := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.written.append(self.store.write_shard(**job))
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
