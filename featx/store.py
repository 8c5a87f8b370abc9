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
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np
from filelock import FileLock

from featx import __version__
from featx.data import ImageSet
from featx.errors import FeatxError
from featx.models import Layer, Weights

DTYPES = ("float32", "float16")
SHARD_BYTES = 256 << 20  # bound on one layer's shard in memory and on disk
CACHE_FORMAT = 2  # format 1 (featx before the model registry) named weights by strings


@dataclass(frozen=True)
class CacheKey:
    """What cached features depend on: a cache made with any other value is not reused."""

    model: str
    weights: str
    weights_checksum: str
    preprocess: dict
    precision: str
    dtype: str
    images_fingerprint: str

    @classmethod
    def of(cls, images: ImageSet, weights: Weights, precision: str, dtype: str) -> CacheKey:
        return cls(weights.model, weights.name, weights.checksum, weights.preprocess.to_dict(),
                   precision, dtype, images.fingerprint())

    @property
    def folder(self) -> str:
        """<model>-<weights tag>[-float16], as Weights.folder names it."""
        tag = self.weights.removeprefix(self.model + ".")
        name = f"{self.model}-{tag}".replace(":", "-").replace("/", "-")
        return name + ("-float16" if self.dtype == "float16" else "")

    def differences(self, manifest: dict) -> list[str]:
        """What a cache's manifest says differently, as 'field (there X, now Y)'."""
        stored = json.loads(json.dumps(asdict(self)))  # compare as stored: tuples become lists
        return [f"{f.name.replace('_', ' ')} ({manifest.get(f.name)} there, {stored[f.name]} now)"
                for f in fields(self) if manifest.get(f.name) != stored[f.name]]


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
        self.manifest = json.loads(self.manifest_path.read_text())

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
    def open_for(cls, root: Path, images: ImageSet, weights: Weights, precision: str,
                 layer_names: list[str], dtype: str = "float32",
                 imagenet_default: bool = False) -> FeatureStore:
        """Open (or create) the cache for these images and these weights; refuse a cache whose
        weights, preprocessing, precision, dtype or image list differ, saying what differs.
        `layer_names` is the model's whole layer table, recorded to check names later;
        `imagenet_default` says the weights are the ones `--weights imagenet` names."""
        if dtype not in DTYPES:
            raise FeatxError(f"unknown dtype {dtype!r}; use float32 or float16")
        key = CacheKey.of(images, weights, precision, dtype)
        folder = Path(root) / images.name / key.folder
        if (folder / "manifest.json").is_file():
            store = cls(folder)
            if store.manifest.get("format") != CACHE_FORMAT:
                raise FeatxError(f"the cache at {folder} was made by an older featx (cache format "
                                 f"{store.manifest.get('format', 1)}); delete that folder or pass "
                                 "another cache folder")
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
            "layers": {},
            "runs": [],
            "skipped": dict(images.skipped),
            "created": _now(),
        }
        _write_json_atomic(folder / "manifest.json", manifest)
        return cls(folder)

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
        """Seconds of the extraction runs that produced `layer`, and the layers they shared."""
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
    def update_manifest(self, change: Callable[[dict], None]) -> None:
        """Apply `change` to the manifest as it is on disk now, under the cache's lock, so that
        concurrent runs that add other layers or runs keep each other's entries."""
        with FileLock(self.folder / ".manifest.lock"):
            self.manifest = json.loads(self.manifest_path.read_text())
            change(self.manifest)
            _write_json_atomic(self.manifest_path, self.manifest)

    def plan_layers(self, layers: list[Layer], batch_size: int, shard_size: int) -> None:
        """Record new layers (dim, shard size) before their first shard is written."""
        itemsize = np.dtype(self.manifest["dtype"]).itemsize

        def add(manifest: dict) -> None:
            for layer in layers:
                if layer.name in manifest["layers"]:
                    continue
                rows = min(shard_size, max(batch_size, SHARD_BYTES // (layer.dim * itemsize)))
                rows = max(batch_size, rows // batch_size * batch_size)
                manifest["layers"][layer.name] = {
                    **layer.to_dict(), "dim": layer.dim, "shard_size": rows, "batch_size": batch_size,
                    "created": _now(),
                }

        self.update_manifest(add)

    def write_shard(self, layer: str, shard: int, index: np.ndarray, features: np.ndarray,
                    skipped: dict[int, str]) -> Path:
        """Write one complete shard under a temporary name, then rename it into place."""
        path = self.shard_path(layer, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        stored = _as_stored(layer, features, self.manifest["dtype"])
        needed = stored.nbytes + 64 * len(index) + (1 << 20)  # features, index, labels, paths, headers
        if shutil.disk_usage(path.parent).free < needed:  # HDF5 fails badly on a full disk: ask first
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (a shard needs {needed >> 20} MiB)",
                          str(path.parent))
        try:
            self._write_h5(tmp, layer, shard, index, stored, skipped)
            os.replace(tmp, path)
        except OSError as exc:
            if exc.filename:
                raise
            code = exc.errno or errno.EIO
            raise OSError(code, f"{os.strerror(code)} ({exc})", str(tmp)) from None
        finally:
            tmp.unlink(missing_ok=True)  # a shard that failed (disk full) leaves no partial file
        return path

    def _write_h5(self, tmp: Path, layer: str, shard: int, index: np.ndarray, stored: np.ndarray,
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
                "layer": layer, "shard": shard, "start": start, "stop": stop, "dim": dim,
                "featx_version": __version__, "model": self.manifest["model"],
                "weights": self.manifest["weights"],
                "skipped": json.dumps({self.manifest["paths"][i]: e for i, e in skipped.items()}),
            })

    def record_run(self, layers: list[str], seconds: float, n_images: int,
                   skipped: dict[str, str], settings: dict) -> None:
        def add(manifest: dict) -> None:
            manifest["runs"].append({"layers": layers, "seconds": round(seconds, 3),
                                     "images": n_images, "when": _now(), **settings})
            manifest["skipped"].update(skipped)

        self.update_manifest(add)

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

    def read_layer(self, layer: str) -> LayerFeatures:
        """All rows of one layer, in dataset order (unreadable images are absent)."""
        self._check_complete(layer)
        parts, index = [], []
        for k in range(len(self.shard_ranges(layer))):
            with h5py.File(self.shard_path(layer, k), "r") as f:
                parts.append(f["features"][...].astype(np.float32, copy=False))
                index.append(f["index"][...])
        idx = np.concatenate(index)
        return LayerFeatures(layer, np.concatenate(parts), idx, self.labels[idx])


def _as_stored(layer: str, features: np.ndarray, dtype: str) -> np.ndarray:
    """Features in the cache's dtype; float16 is refused where it would misrepresent an image's
    features: values beyond its range, or rows so small that rounding changes them by over 1%."""
    with np.errstate(over="ignore"):
        stored = features.astype(dtype, copy=False)
    if dtype != "float16" or not len(features):
        return stored
    if not np.isfinite(stored).all():
        raise FeatxError(f"layer {layer} has values beyond the float16 range; cache it as float32")
    error = np.linalg.norm(stored.astype(np.float32) - features, axis=1)
    if (error > 0.01 * np.linalg.norm(features, axis=1)).any():
        raise FeatxError(f"layer {layer} has values too small for float16 (its smallest normal number is "
                         f"{np.finfo(np.float16).tiny:.1e}); cache it as float32")
    return stored


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def list_stores(root: str | Path) -> list[FeatureStore]:
    """Every dataset/model cache under a cache root."""
    return [FeatureStore(p.parent) for p in sorted(Path(root).glob("*/*/manifest.json"))]


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
                    self.written.append(self.store.write_shard(*job))
                except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                    self.error = exc

    def submit(self, *job) -> None:
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
