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

import json
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from featx import __version__
from featx.data import ImageSet
from featx.errors import FeatxError
from featx.extract import LayerExtractor, extract_batches
from featx.models import Layer, get_backbone

DTYPES = ("float32", "float16")
SHARD_BYTES = 256 << 20  # bound on one layer's shard in memory and on disk
KEY_FIELDS = ("model", "weights_id", "weights_checksum", "preprocess", "precision", "dtype",
              "images_fingerprint")


def default_cache_root() -> Path:
    return Path(os.environ.get("FEATX_CACHE", "featx-cache"))


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


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
    def variant(self) -> str:
        """The folder name after the model's: the weights tag, then -float16 for such a cache."""
        return self.folder.name.removeprefix(f"{self.manifest['model']}-")

    # --- creation ----------------------------------------------------------------------------
    @classmethod
    def open_for(cls, root: Path, images: ImageSet, extractor: LayerExtractor,
                 dtype: str = "float32") -> FeatureStore:
        """Open (or create) the cache for these images and this model; refuse a cache whose
        weights, preprocessing, dtype or image list differ."""
        if dtype not in DTYPES:
            raise FeatxError(f"unknown dtype {dtype!r}; use float32 or float16")
        model = extractor.model
        name = f"{model.backbone.name}-{model.weights_tag}" + ("-float16" if dtype == "float16" else "")
        folder = Path(root) / images.name / name
        key = {
            "model": model.backbone.name,
            "weights_id": model.weights_id,
            "weights_checksum": model.checksum,
            "preprocess": model.preprocess.to_dict(),
            "precision": extractor.precision,
            "dtype": dtype,
            "images_fingerprint": images.fingerprint(),
        }
        key = json.loads(json.dumps(key))  # compare as stored: tuples become lists
        if (folder / "manifest.json").is_file():
            store = cls(folder)
            for field in KEY_FIELDS:
                if store.manifest.get(field) != key[field]:
                    raise FeatxError(
                        f"the cache at {folder} was made with another {field.replace('_', ' ')} "
                        f"({store.manifest.get(field)} there, {key[field]} now); it is not reused: "
                        f"delete that folder or pass --cache with another folder")
            return store
        folder.mkdir(parents=True, exist_ok=True)
        manifest = {
            "featx_version": __version__,
            **key,
            "weights_random": model.random,
            "dataset": images.name,
            "dataset_root": str(images.root),
            "classes": list(images.classes),
            "paths": list(images.paths),
            "labels": images.labels.tolist(),
            "fixed_split": list(images.fixed_split) if images.fixed_split else None,
            "layers": {},
            "runs": [],
            "skipped": {},
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
                "classes": len(self.classes), "weights_id": self.manifest["weights_id"],
                "dtype": self.manifest["dtype"], "created": self.manifest["created"],
                "skipped": self.manifest["skipped"], "layers": layers, "runs": self.manifest["runs"]}

    # --- writing -----------------------------------------------------------------------------
    def plan_layers(self, layers: list[Layer], batch_size: int, shard_size: int) -> None:
        """Record new layers (dim, shard size) before their first shard is written."""
        for layer in layers:
            if layer.name in self.manifest["layers"]:
                continue
            itemsize = np.dtype(self.manifest["dtype"]).itemsize
            rows = min(shard_size, max(batch_size, SHARD_BYTES // (layer.dim * itemsize)))
            rows = max(batch_size, rows // batch_size * batch_size)
            self.manifest["layers"][layer.name] = {
                "dim": layer.dim, "shape": list(layer.shape), "node": layer.node,
                "pooled": layer.pooled, "shard_size": rows, "batch_size": batch_size,
                "created": _now(),
            }
        _write_json_atomic(self.manifest_path, self.manifest)

    def write_shard(self, layer: str, shard: int, index: np.ndarray, features: np.ndarray,
                    skipped: dict[int, str]) -> Path:
        """Write one complete shard under a temporary name, then rename it into place."""
        path = self.shard_path(layer, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        rows, dim = features.shape
        stored = _as_stored(layer, features, self.manifest["dtype"])
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
                "weights_id": self.manifest["weights_id"],
                "skipped": json.dumps({self.manifest["paths"][i]: e for i, e in skipped.items()}),
            })
        os.replace(tmp, path)
        return path

    def record_run(self, layers: list[str], seconds: float, n_images: int,
                   skipped: dict[str, str], settings: dict) -> None:
        self.manifest["runs"].append({"layers": layers, "seconds": round(seconds, 3),
                                      "images": n_images, "when": _now(), **settings})
        self.manifest["skipped"].update(skipped)
        _write_json_atomic(self.manifest_path, self.manifest)

    # --- reading -----------------------------------------------------------------------------
    def check_layers(self, names: list[str]) -> None:
        """Refuse, before any work starts, a name the model has no layer for or a layer the
        cache does not hold complete."""
        known = [layer.name for layer in get_backbone(self.manifest["model"]).layers]
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
                             f"run featx extract --layer {layer} first")
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
        raise FeatxError(f"layer {layer} has values beyond the float16 range; cache it with --dtype float32")
    error = np.linalg.norm(stored.astype(np.float32) - features, axis=1)
    if (error > 0.01 * np.linalg.norm(features, axis=1)).any():
        raise FeatxError(f"layer {layer} has values too small for float16 (its smallest normal number is "
                         f"{np.finfo(np.float16).tiny:.1e}); cache it with --dtype float32")
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


class _ShardBuffer:
    """Rows of one layer's shard gathered batch by batch until the shard's range is covered."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop, self.seen = start, stop, 0
        self.index: list[np.ndarray] = []
        self.features: list[np.ndarray] = []
        self.skipped: dict[int, str] = {}

    def add(self, index: np.ndarray, features: np.ndarray, skipped: dict[int, str], seen: int) -> None:
        self.index.append(index)
        self.features.append(features)
        self.skipped.update(skipped)
        self.seen += seen

    @property
    def complete(self) -> bool:
        return self.seen == self.stop - self.start


def extract_to_cache(store: FeatureStore, extractor: LayerExtractor, images: ImageSet,
                     batch_size: int = 32, shard_size: int = 512, workers: int | None = None,
                     on_batch: Callable[[int, int], None] | None = None) -> dict:
    """Extract the extractor's layers for every image whose shard is not cached yet.

    One forward pass serves all layers; finished shards are written by a background thread.
    Returns a summary: images run, seconds, skipped files (relative path -> reason).
    """
    layers = [layer.name for layer in extractor.layers]
    store.plan_layers(extractor.layers, batch_size, shard_size)
    batch_size = store.manifest["layers"][layers[0]]["batch_size"]  # a resumed run batches as before
    todo = {name: set(store.missing_shards(name)) for name in layers}
    needed = sorted({i for name in layers for k in todo[name]
                     for i in range(*store.shard_ranges(name)[k])})
    summary = {"layers": layers, "images": len(needed), "seconds": 0.0, "skipped": {}}
    if not needed:
        return summary
    # batches on the global grid of batch_size, so a resumed run batches exactly as a full run
    grid: dict[int, list[int]] = {}
    for i in needed:
        grid.setdefault(i // batch_size, []).append(i)
    batches = [grid[k] for k in sorted(grid)]

    sizes = {name: store.manifest["layers"][name]["shard_size"] for name in layers}
    buffers: dict[tuple[str, int], _ShardBuffer] = {}
    writer = ShardWriter(store)
    started = time.perf_counter()
    skipped_all: dict[int, str] = {}
    try:
        for batch, out in zip(batches, extract_batches(extractor, images, batches, workers)):
            skipped_all.update(out.skipped)
            batch_arr = np.asarray(batch)
            for name in layers:
                for k in np.unique(batch_arr // sizes[name]):
                    if k not in todo[name]:
                        continue
                    start, stop = store.shard_ranges(name)[k]
                    buf = buffers.setdefault((name, k), _ShardBuffer(start, stop))
                    rows = (out.indices >= start) & (out.indices < stop)
                    seen = int(((batch_arr >= start) & (batch_arr < stop)).sum())
                    buf.add(out.indices[rows], out.features[name][rows],
                            {i: e for i, e in out.skipped.items() if start <= i < stop}, seen)
                    if buf.complete:
                        del buffers[(name, k)]
                        feats = (np.concatenate(buf.features) if buf.features
                                 else np.zeros((0, store.manifest["layers"][name]["dim"]), np.float32))
                        writer.submit(name, int(k), np.concatenate(buf.index), feats, buf.skipped)
            if on_batch:
                on_batch(len(batch), len(needed))
    finally:
        writer.close()
        seconds = time.perf_counter() - started
        skipped = {store.manifest["paths"][i]: e for i, e in sorted(skipped_all.items())}
        done = [name for name in layers if not store.missing_shards(name)]
        if done:
            store.record_run(done, seconds, len(needed), skipped, {
                "device": str(extractor.device), "precision": extractor.precision,
                "batch_size": batch_size, "workers": workers})
    summary.update(seconds=seconds, skipped=skipped)
    return summary
