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
from typing import TYPE_CHECKING

import numpy as np

from featx.cache.key import CacheKey
from featx.cache.shards import ShardWriter
from featx.cache.store import FeatureStore, default_cache_root
from featx.data.images import ImageSet, shown
from featx.errors import OptionError
from featx.extract.ranks import ALONE, Ranks
from featx.models import ModelSpec, get_model, load_model
from featx.options import (
    MAX_BATCH,
    MAX_PIXELS,
    MAX_SHARD,
    Decode,
    Dtype,
    Precision,
    Tta,
    Verify,
    check_count,
    describe,
    max_workers,
    parse_device,
    resolve_decode,
    resolve_device,
    resolve_dtype,
    resolve_precision,
    writable_folder,
)

if TYPE_CHECKING:  # the network's modules are imported when a run has something to write
    from featx.extract.forward import ExtractedBatch, LayerExtractor

log = logging.getLogger(__name__)
SPACE_MARGIN = 16 << 20  # room for the manifest and HDF5 headers beside the features
RUN_NOTE_SECONDS = 1.0  # at most this often a running extraction records its time in the manifest
RUN_NOTE_SHARE = 0.05  # and less often when the manifest is large: at most 5% of the run's time


@dataclass(frozen=True)
class ExtractOptions:
    """How to run the network: device, precision, decoder, batching and the cache's dtype;
    checked once when made. `batch_size` None is chosen for the device (LayerExtractor.batch_size);
    `dtype` and `decode` `auto` follow the device (float16 and device decoding on a GPU); `verify`
    None is the cache's own (size for a new cache), hash makes it hash from then on."""

    device: str = "auto"
    precision: Precision = Precision.AUTO
    batch_size: int | None = None
    workers: int | None = None
    shard_size: int = 512
    dtype: Dtype = Dtype.AUTO
    channels_last: bool = True
    verify: Verify | None = None
    tta: Tta = Tta.NONE
    decode: Decode = Decode.AUTO
    max_pixels: int = MAX_PIXELS

    def __post_init__(self) -> None:
        check_count("batch_size", self.batch_size, MAX_BATCH, optional=True)
        check_count("shard_size", self.shard_size, MAX_SHARD)
        check_count("workers", self.workers, max_workers(), optional=True, least=0,
                    why="the cores and memory of this machine allow")
        check_count("max_pixels", self.max_pixels, 10**10, least=10**4)
        object.__setattr__(self, "device", parse_device(self.device))
        for name, kind in (("precision", Precision), ("dtype", Dtype), ("decode", Decode), ("tta", Tta)):
            object.__setattr__(self, name, kind.parse(getattr(self, name), name))
        if self.verify is not None:
            object.__setattr__(self, "verify", Verify.parse(self.verify, "verify"))


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
    forward pass, resuming where a previous extraction stopped; `progress` is told of each batch.

    What it costs follows what changed: the dataset is compared with the cache's row table, each
    requested layer's shards are checked by their size and time, and only when something is left
    to write is the network built."""
    options = options or ExtractOptions()
    spec = get_model(model, weights, seed)
    requested = spec.resolve_layers(layers)  # bad names fail before any download
    ranks = Ranks.from_env()
    for path, reason in images.skipped.items() if ranks.lead else ():
        log.warning(f"skipped {shown(path)}: {reason}")
    root = Path(cache).expanduser() if cache else default_cache_root()
    if root.exists() and not root.is_dir():
        raise OptionError("cache", f"{root} is a file, not a folder")
    device = resolve_device(ranks.device(options.device))
    key = CacheKey.of(spec.weights, precision=resolve_precision(options.precision, device),
                      dtype=resolve_dtype(options.dtype, device), tta=options.tta,
                      decode=resolve_decode(options.decode, device))
    folder = FeatureStore.folder_for(root, images, key)
    run = _Run(spec, requested, options, ranks, model=model, weights=weights, seed=seed)
    if not (folder / "manifest.json").is_file():
        run.load()  # a new cache: its key holds the weights' checksum
        store = run.open_store(root, images) if ranks.lead else None  # rank 0 makes it, the others open it
        ranks.wait_for_all()
        store = store or run.open_store(root, images)
    else:
        store = FeatureStore(folder)
        store.check_key(key)
    names = ", ".join(layer.name for layer in requested)

    def wait() -> None:
        log.info(f"another featx extract is writing {store.folder}; waiting for it to finish "
                 "(Ctrl-C stops this one, nothing is lost)")

    with store.extraction_lock(wait) if ranks.lead else nullcontext():
        if ranks.lead:  # the cache as the run before this one left it, brought up to date
            store = FeatureStore(store.folder)
            try:
                changes = store.sync_images(images, options.verify)
            except OSError as exc:
                raise OptionError("cache", f"cannot write in {store.folder}: {describe(exc)}") from None
            if changes:
                log.info(f"note: {images.root} changed since {store.label} was made: "
                         f"{changes.describe()}; only the shards concerned are extracted again")
            if layers_to_write(store, requested):
                writable_folder(store.folder, "cache")  # a read-only cache serves what it holds
                run.load()
                store.check_key(run.key())
                store.plan_layers(run.extractor.layers, shard_size=options.shard_size,
                                  batch_size=options.batch_size or run.extractor.batch_size())
        ranks.wait_for_all()
        store = FeatureStore(store.folder)
        if not any(store.missing_shards(layer.name) for layer in requested):  # all planned by now
            if ranks.lead:
                log.info(f"{store.label}: {names} already cached")
            return store
        run.load()
        extractor = run.extractor
        description = (f"{images.name} {spec.name} [{names}] on {extractor.device} {extractor.precision}, "
                       f"{extractor.decode} decoding" + (f", {ranks.world} ranks" if ranks.several else ""))
        with (progress or _silent)(description) if ranks.lead else _silent(description) as advance:
            planned = store.manifest.layers[requested[0].name].batch_size
            summary = extract_to_cache(store, extractor, store.images(), batch_size=planned,
                                       shard_size=options.shard_size, workers=options.workers,
                                       on_batch=advance, ranks=ranks)
        ranks.wait_for_all()
    for path, reason in summary["skipped"].items():
        log.warning(f"skipped unreadable image {shown(path)} ({reason})")
    for path, note in summary["notes"].items():
        log.info(f"note: {shown(path)}: {note}")
    count, size = ranks.total(summary["images"]), ranks.total(summary.get("bytes", 0))
    skipped = ranks.total(len(summary["skipped"]))
    if ranks.lead:
        if skipped:
            log.warning(f"{skipped} images skipped; listed in {store.manifest_path}")
        log.info(f"{store.label}: {count} images, {names} in {summary['seconds']:.1f} s, "
                 f"{size / 2**20:.1f} MiB -> {store.folder}")
    return FeatureStore(store.folder)


class _Run:
    """What an extraction builds only when it has something to write: the network and its
    extractor (loaded once, by the first step that needs them)."""

    def __init__(self, spec: ModelSpec, requested: list, options: ExtractOptions, ranks: Ranks, *,
                 model: str, weights: str, seed: int) -> None:
        self.spec, self.requested, self.options, self.ranks = spec, requested, options, ranks
        self.model, self.weights, self.seed = model, weights, seed
        self.extractor: LayerExtractor | None = None

    def load(self) -> None:
        if self.extractor is not None:
            return
        from featx.extract.forward import LayerExtractor

        loaded = load_model(self.model, self.weights, self.seed)
        if loaded.weights.random and self.ranks.lead:
            log.info(f"note: {self.spec.name} with RANDOM weights ({loaded.weights.name}); "
                     "features are a baseline, not pretrained")
        options = self.options
        self.extractor = LayerExtractor(
            loaded, self.requested, self.ranks.device(options.device), precision=options.precision,
            channels_last=options.channels_last, tta=options.tta, dtype=options.dtype, decode=options.decode,
            max_pixels=options.max_pixels)
        self.ranks.join(self.extractor.device)

    def key(self) -> CacheKey:
        extractor = self.extractor
        return CacheKey.of(extractor.model.weights, precision=extractor.precision, dtype=extractor.dtype,
                           tta=self.options.tta, decode=extractor.decode)

    def open_store(self, root: Path, images: ImageSet) -> FeatureStore:
        loaded = self.extractor.model
        pretrained = loaded.weights.source not in ("random", "file")
        try:
            return FeatureStore.open_for(
                root, images, key=self.key(), weights=loaded.weights,
                layer_names=[layer.name for layer in self.spec.layers],
                imagenet_default=pretrained and get_model(self.spec.name).weights.tag == loaded.weights.tag,
                verify=self.options.verify or Verify.SIZE)
        except OSError as exc:
            raise OptionError("cache", f"cannot write in {exc.filename or root}: {describe(exc)}") from None


@contextmanager
def _silent(description: str) -> Iterator[Advance]:
    yield lambda n, total: None


def layers_to_write(store: FeatureStore, requested: list) -> set[str]:
    """The requested layers with shards to write: new layers, missing shards, and damaged ones
    (a shard whose size or time differs from its verification record is read whole; a damaged
    one is named and deleted, to be written anew)."""
    todo = set()
    for layer in requested:
        if layer.name not in store.manifest.layers:
            todo.add(layer.name)
            continue
        for shard, reason in store.damaged_shards(layer.name).items():
            log.warning(f"{store.shard_path(layer.name, shard)} is damaged ({reason}); it is written again")
            store.shard_path(layer.name, shard).unlink(missing_ok=True)
        if store.missing_shards(layer.name):
            todo.add(layer.name)
    return todo


class _ShardBuffer:
    """Rows of one layer's shard gathered batch by batch until the shard's range is covered."""

    def __init__(self, expected: int) -> None:
        self.seen, self.expected = 0, expected
        self.index: list[np.ndarray] = []
        self.features: list[np.ndarray] = []
        self.skipped: dict[int, str] = {}
        self.digests: dict[int, bytes] = {}

    def add(self, out: ExtractedBatch, layer: str, *, start: int, stop: int, seen: int) -> None:
        rows = (out.indices >= start) & (out.indices < stop)
        self.index.append(out.indices[rows])
        self.features.append(out.features[layer][rows])
        self.skipped.update({i: e for i, e in out.skipped.items() if start <= i < stop})
        self.digests.update({i: d for i, d in out.digests.items() if start <= i < stop})
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
    images run, seconds, skipped files and remarks (relative path -> reason).
    """
    from featx.extract.forward import extract_batches

    layers = [layer.name for layer in extractor.layers]
    store.plan_layers(extractor.layers, batch_size=batch_size, shard_size=shard_size)
    plans = store.manifest.layers
    batch_size = plans[layers[0]].batch_size  # a resumed run batches as before
    sizes = {name: plans[name].shard_size for name in layers}
    todo = rank_shards({name: store.missing_shards(name) for name in layers}, sizes, ranks)
    removed = set(store.removed.tolist())  # images gone from the dataset: not extracted again
    ranges = {name: store.shard_ranges(name) for name in layers}
    needed = sorted({i for name in layers for k in todo[name] for i in range(*ranges[name][k])} - removed)
    summary = {"layers": layers, "images": len(needed), "seconds": 0.0, "skipped": {}, "notes": {}}
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
    writer = ShardWriter(store.write_shard)
    for name in layers:  # a shard all of whose images are gone is written empty
        for k in sorted(todo[name]):
            if all(i in removed for i in range(*ranges[name][k])):
                writer.submit(layer=name, shard=k, index=np.zeros(0, np.int64),
                              features=np.zeros((0, plans[name].dim), np.float32), skipped={})
    settings = {"device": str(extractor.device), "precision": str(extractor.precision),
                "decode": str(extractor.decode), "batch_size": batch_size, "workers": workers,
                "rank": ranks.rank, "ranks": ranks.world}
    run = store.start_run([name for name in layers if todo[name]], len(needed), settings)
    started = noted = time.perf_counter()
    note_every = RUN_NOTE_SECONDS
    skipped_all: dict[int, str] = {}
    notes_all: dict[int, str] = {}
    done_images = shown_images = 0
    try:
        for batch, out in zip(batches, extract_batches(extractor, images, batches, workers=workers)):
            skipped_all.update(out.skipped)
            notes_all.update(out.notes)
            batch_arr = np.asarray(batch)
            for name in layers:
                for k in np.unique(batch_arr // sizes[name]).tolist():
                    if k not in todo[name]:
                        continue
                    start, stop = ranges[name][k]
                    if (name, k) not in buffers:
                        buffers[(name, k)] = _ShardBuffer(sum(1 for i in range(start,
                                                                               stop) if i not in removed))
                    buf = buffers[(name, k)]
                    buf.add(out, name, start=start, stop=stop,
                            seen=int(((batch_arr >= start) & (batch_arr < stop)).sum()))
                    if buf.complete:
                        del buffers[(name, k)]
                        features = np.concatenate(buf.features) if buf.features else \
                            np.zeros((0, plans[name].dim), np.float32)
                        writer.submit(layer=name, shard=k, index=np.concatenate(buf.index), features=features,
                                      skipped=buf.skipped, digests=buf.digests)
            done_images += len(batch)
            if on_batch:
                every_rank = ranks.count_done(done_key, len(batch)) if ranks.several else done_images
                on_batch(every_rank - shown_images, total_needed)
                shown_images = every_rank
            if time.perf_counter() - noted > note_every:  # a killed run keeps its time
                noted = time.perf_counter()
                store.update_run(run, noted - started, done_images)
                note_every = max(RUN_NOTE_SECONDS, (time.perf_counter() - noted) / RUN_NOTE_SHARE)
    finally:
        try:
            writer.close()
        finally:
            seconds = time.perf_counter() - started
            paths = dict(zip(sorted({*skipped_all, *notes_all}),
                             store.rows.paths(sorted({*skipped_all, *notes_all}))))
            skipped = {paths[i]: e for i, e in sorted(skipped_all.items())}
            notes = {paths[i]: e for i, e in sorted(notes_all.items())}
            complete = not any(k in todo[name] for name in layers for k in store.missing_shards(name))
            store.update_run(run, seconds, done_images, status="done" if complete else "stopped",
                             skipped=skipped, notes=notes)
    summary.update(seconds=seconds, skipped=skipped, notes=notes)
    return summary
