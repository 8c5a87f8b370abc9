"""Drives an extraction run: what the cache lacks -> one forward pass -> shards in the store.

`extract_images` is the whole run for one model (load, open the cache, extract what is
missing, report skipped files); `extract_to_cache` is its loop over batches, which one pass
serves for every requested layer while a background thread writes finished shards.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from featx.cache.store import FeatureStore, ShardWriter, default_cache_root
from featx.data.images import ImageSet
from featx.errors import OptionError
from featx.extract.forward import LayerExtractor, extract_batches
from featx.extract.ranks import ALONE, Ranks
from featx.models import get_model, load_model
from featx.options import Decode, Dtype, Precision, Tta, Verify, describe, parse_device, writable_folder

log = logging.getLogger(__name__)
SPACE_MARGIN = 16 << 20  # room for the manifest and HDF5 headers beside the features
RUN_NOTE_SECONDS = 1.0  # at most this often a running extraction records its time in the manifest
RUN_NOTE_SHARE = 0.05  # and less often when the manifest is large: at most 5% of the run's time


@dataclass(frozen=True)
class ExtractOptions:
    """How to run the network: device, precision, decoder, batching and the cache's dtype;
    checked once when made. `batch_size` None is chosen for the device (LayerExtractor.batch_size);
    `dtype` and `decode` `auto` follow the device (float16 and device decoding on a GPU)."""

    device: str = "auto"
    precision: Precision = Precision.AUTO
    batch_size: int | None = None
    workers: int | None = None
    shard_size: int = 512
    dtype: Dtype = Dtype.AUTO
    channels_last: bool = True
    verify: Verify = Verify.SIZE
    tta: Tta = Tta.NONE
    decode: Decode = Decode.AUTO

    def __post_init__(self) -> None:
        for name in ("batch_size", "shard_size"):
            value = getattr(self, name)
            if name == "batch_size" and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OptionError(name, f"must be a whole number of at least 1, not {value!r}")
        if self.workers is not None and (not isinstance(self.workers, int) or self.workers < 0):
            raise OptionError("workers", f"must be 0 or more, not {self.workers!r}")
        object.__setattr__(self, "device", parse_device(self.device))
        for name, kind in (("precision", Precision), ("dtype", Dtype), ("decode", Decode), ("tta", Tta),
                           ("verify", Verify)):
            object.__setattr__(self, name, kind.parse(getattr(self, name), name))


Advance = Callable[[int, int], None]  # (images just done, images in all), after each batch
Progress = Callable[[str], AbstractContextManager[Advance]]  # a run's description -> its Advance


@contextmanager
def logged_progress(description: str, every: float = 30.0) -> Iterator[Advance]:
    """Progress as log lines: one every `every` seconds and one at the end, with the rate and the
    time left (the CLI draws a bar instead where it writes to a terminal)."""
    started = last = time.monotonic()
    done = 0

    def advance(n: int, total: int) -> None:
        nonlocal done, last
        done += n
        now = time.monotonic()
        if now - last < every and done < total:
            return
        last = now
        rate = done / max(now - started, 1e-9)
        left = (total - done) / rate if rate else 0.0
        log.info(f"{description}: {done}/{total} images, {rate:.1f} images/s, {left:.0f} s left")

    yield advance


def extract_images(images: ImageSet, model: str, layers: list[str] | None, *, weights: str = "imagenet",
                   cache: str | Path | None = None, seed: int = 0, options: ExtractOptions | None = None,
                   progress: Progress | None = logged_progress) -> FeatureStore:
    """Cache the requested layers (default: the model's standard ones) of every image in one
    forward pass, resuming where an earlier run stopped; `progress` is told of each batch."""
    options = options or ExtractOptions()
    spec = get_model(model, weights, seed)
    requested = spec.resolve_layers(layers)  # bad names fail before any download
    ranks = Ranks.from_env()
    for path, reason in images.skipped.items() if ranks.lead else ():
        log.warning(f"skipped {path}: {reason}")
    for path, note in images.notes.items() if ranks.lead else ():
        log.info(f"note: {path}: {note}")
    root = Path(cache).expanduser() if cache else default_cache_root()
    if root.exists() and not root.is_dir():
        raise OptionError("cache", f"{root} is a file, not a folder")
    loaded = load_model(model, weights, seed)
    if loaded.weights.random and ranks.lead:
        log.info(f"note: {spec.name} with RANDOM weights ({loaded.weights.name}); "
                 "features are a baseline, not pretrained")
    extractor = LayerExtractor(loaded, requested, ranks.device(options.device), precision=options.precision,
                               channels_last=options.channels_last, tta=options.tta, dtype=options.dtype,
                               decode=options.decode)
    ranks.join(extractor.device)
    pretrained = loaded.weights.source not in ("random", "file")

    def open_store() -> FeatureStore:
        try:
            return FeatureStore.open_for(
                root, images, loaded.weights, precision=extractor.precision,
                layer_names=[layer.name for layer in spec.layers], dtype=extractor.dtype,
                imagenet_default=pretrained and get_model(model).weights.tag == loaded.weights.tag,
                verify=options.verify, tta=options.tta, decode=extractor.decode)
        except OSError as exc:
            raise OptionError("cache", f"cannot write in {exc.filename or root}: {describe(exc)}") from None

    store = open_store() if ranks.lead else None  # rank 0 makes a new cache, the others open it
    ranks.wait_for_all()
    store = store or open_store()
    names = ", ".join(layer.name for layer in requested)

    def wait() -> None:
        log.info(f"another featx extract is writing {store.folder}; waiting for it to finish "
                      "(Ctrl-C stops this one, nothing is lost)")

    with store.extraction_lock(wait) if ranks.lead else nullcontext():
        if ranks.lead:  # the cache as the run before this one left it, brought up to date
            store = FeatureStore(store.folder)
            changes = store.sync_images(images, options.verify)
            if changes:
                log.info(f"note: {images.root} changed since {store.label} was made: "
                              f"{changes.describe()}; only the shards concerned are extracted again")
            if _layers_to_write(store, requested):
                writable_folder(store.folder, "cache")  # a read-only cache serves what it holds
                store.plan_layers(extractor.layers, options.batch_size or extractor.batch_size(),
                                  options.shard_size)
        ranks.wait_for_all()
        store = FeatureStore(store.folder)
        if not any(store.missing_shards(layer.name) for layer in requested):  # all planned by now
            if ranks.lead:
                log.info(f"{store.label}: {names} already cached")
            return store
        description = (f"{images.name} {spec.name} [{names}] on {extractor.device} {extractor.precision}, "
                       f"{extractor.decode} decoding" + (f", {ranks.world} ranks" if ranks.several else ""))
        with (progress or _silent)(description) if ranks.lead else _silent(description) as advance:
            planned = store.manifest["layers"][requested[0].name]["batch_size"]
            summary = extract_to_cache(store, extractor, store.images(), batch_size=planned,
                                       shard_size=options.shard_size,
                                       workers=options.workers, on_batch=advance, ranks=ranks)
        ranks.wait_for_all()
    for path, reason in summary["skipped"].items():
        log.warning(f"skipped unreadable image {path} ({reason})")
    count, size = ranks.total(summary["images"]), ranks.total(summary.get("bytes", 0))
    skipped = ranks.total(len(summary["skipped"]))
    if ranks.lead:
        if skipped:
            log.warning(f"{skipped} images skipped; listed in {store.manifest_path}")
        log.info(f"{store.label}: {count} images, {names} in {summary['seconds']:.1f} s, "
                      f"{size / 2**20:.1f} MiB -> {store.folder}")
    return FeatureStore(store.folder)


@contextmanager
def _silent(description: str) -> Iterator[Advance]:
    yield lambda n, total: None


def _layers_to_write(store: FeatureStore, requested: list) -> set[str]:
    """The requested layers with shards to write: new layers, missing shards, and damaged ones
    (checked against their checksums, named, and deleted to be written anew)."""
    todo = set()
    for layer in requested:
        if layer.name not in store.manifest["layers"]:
            todo.add(layer.name)
            continue
        for shard, reason in store.damaged_shards(layer.name).items():
            log.warning(f"{store.shard_path(layer.name, shard)} is damaged "
                          f"({reason}); it is written again")
            store.shard_path(layer.name, shard).unlink()
        if store.missing_shards(layer.name):
            todo.add(layer.name)
    return todo


class _ShardBuffer:
    """Rows of one layer's shard gathered batch by batch until the shard's range is covered."""

    def __init__(self, start: int, stop: int, expected: int) -> None:
        self.start, self.stop, self.seen, self.expected = start, stop, 0, expected
        self.index: list[np.ndarray] = []
        self.features: list[np.ndarray] = []
        self.skipped: dict[int, str] = {}

    def add(self, index: np.ndarray, features: np.ndarray, skipped: dict[int, str], *, seen: int) -> None:
        self.index.append(index)
        self.features.append(features)
        self.skipped.update(skipped)
        self.seen += seen

    @property
    def complete(self) -> bool:
        return self.seen == self.expected


def rank_shards(missing: dict[str, list[int]], sizes: dict[str, int], ranks: Ranks) -> dict[str, set[int]]:
    """This rank's shards of each layer, of the shards still to write. The images are cut into
    units of the largest shard size, and the rank takes every N-th unit that has a shard to write
    (the same list on every rank); a shard goes with the unit of its first image. A cache's shard
    sizes divide the largest (`FeatureStore.plan_layers`), so no image is extracted by two ranks."""
    unit = max(sizes.values())
    units = sorted({k * sizes[name] // unit for name, shards in missing.items() for k in shards})
    mine = set(ranks.mine(units))
    return {name: {k for k in shards if k * sizes[name] // unit in mine} for name, shards in missing.items()}


def extract_to_cache(store: FeatureStore, extractor: LayerExtractor, images: ImageSet,
                     *, batch_size: int = 32, shard_size: int = 512, workers: int | None = None,
                     on_batch: Callable[[int, int], None] | None = None, ranks: Ranks = ALONE) -> dict:
    """Extract the extractor's layers for every image whose shard is not cached yet (of this
    rank's shards, when several ranks share the run; every rank calls this).

    One forward pass serves all layers; finished shards are written by a background thread.
    `on_batch(images, total)` counts the images of every rank. Returns this rank's summary:
    images run, seconds, skipped files (relative path -> reason).
    """
    layers = [layer.name for layer in extractor.layers]
    store.plan_layers(extractor.layers, batch_size, shard_size)
    batch_size = store.manifest["layers"][layers[0]]["batch_size"]  # a resumed run batches as before
    sizes = {name: store.manifest["layers"][name]["shard_size"] for name in layers}
    todo = rank_shards({name: store.missing_shards(name) for name in layers}, sizes, ranks)
    removed = store.removed  # images gone from the dataset: not extracted again
    needed = sorted({i for name in layers for k in todo[name]
                     for i in range(*store.shard_ranges(name)[k]) if i not in removed})
    summary = {"layers": layers, "images": len(needed), "seconds": 0.0, "skipped": {}}
    total_needed = ranks.total(len(needed))  # also: every rank has its share before any writes
    done_key = ranks.counter_key()
    if not needed:
        return summary
    needed_bytes = sum(store.bytes_to_write(name, sorted(todo[name])) for name in layers)
    free = shutil.disk_usage(store.folder).free
    if free < needed_bytes + SPACE_MARGIN:
        raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: this run writes about "
                      f"{needed_bytes / 2**20:.0f} MiB and {free / 2**20:.0f} MiB are free",
                      str(store.folder))
    summary["bytes"] = needed_bytes
    # batches on the global grid of batch_size, so a resumed run batches exactly as a full run
    grid: dict[int, list[int]] = {}
    for i in needed:
        grid.setdefault(i // batch_size, []).append(i)
    batches = [grid[k] for k in sorted(grid)]

    buffers: dict[tuple[str, int], _ShardBuffer] = {}
    writer = ShardWriter(store)
    for name in layers:  # a shard all of whose images are gone is written empty
        dim = store.manifest["layers"][name]["dim"]
        for k in sorted(todo[name]):
            if all(i in removed for i in range(*store.shard_ranges(name)[k])):
                writer.submit(layer=name, shard=k, index=np.zeros(0, np.int64), features=np.zeros((0, dim),
                                                                                                  np.float32),
                              skipped={})
    settings = {"device": str(extractor.device), "precision": extractor.precision, "decode": extractor.decode,
                "batch_size": batch_size, "workers": workers, "rank": ranks.rank, "ranks": ranks.world}
    run = store.start_run([name for name in layers if todo[name]], len(needed), settings)
    started = noted = time.perf_counter()
    note_every = RUN_NOTE_SECONDS
    skipped_all: dict[int, str] = {}
    done_images = shown = 0
    try:
        for batch, out in zip(batches, extract_batches(extractor, images, batches, workers=workers)):
            skipped_all.update(out.skipped)
            batch_arr = np.asarray(batch)
            for name in layers:
                for k in np.unique(batch_arr // sizes[name]):
                    if k not in todo[name]:
                        continue
                    start, stop = store.shard_ranges(name)[k]
                    if (name, k) not in buffers:
                        expected = sum(1 for i in range(start, stop) if i not in removed)
                        buffers[(name, k)] = _ShardBuffer(start, stop, expected)
                    buf = buffers[(name, k)]
                    rows = (out.indices >= start) & (out.indices < stop)
                    seen = int(((batch_arr >= start) & (batch_arr < stop)).sum())
                    buf.add(out.indices[rows], out.features[name][rows],
                            {i: e for i, e in out.skipped.items() if start <= i < stop}, seen=seen)
                    if buf.complete:
                        del buffers[(name, k)]
                        feats = (np.concatenate(buf.features) if buf.features
                                 else np.zeros((0, store.manifest["layers"][name]["dim"]), np.float32))
                        writer.submit(layer=name, shard=int(k), index=np.concatenate(buf.index),
                                      features=feats,
                                      skipped=buf.skipped)
            done_images += len(batch)
            if on_batch:
                every_rank = ranks.count_done(done_key, len(batch)) if ranks.several else done_images
                on_batch(every_rank - shown, total_needed)
                shown = every_rank
            if time.perf_counter() - noted > note_every:  # a killed run keeps its time
                noted = time.perf_counter()
                store.update_run(run, noted - started, done_images)
                note_every = max(RUN_NOTE_SECONDS, (time.perf_counter() - noted) / RUN_NOTE_SHARE)
    finally:
        try:
            writer.close()
        finally:
            seconds = time.perf_counter() - started
            skipped = {store.manifest["paths"][i]: e for i, e in sorted(skipped_all.items())}
            complete = not any(k in todo[name] for name in layers for k in store.missing_shards(name))
            store.update_run(run, seconds, done_images, status="done" if complete else "stopped",
                             skipped=skipped)
    summary.update(seconds=seconds, skipped=skipped)
    return summary
