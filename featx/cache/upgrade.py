"""A cache of format 3 (every row's path, label and file identity in manifest.json) brought to
format 4 in place: its row table is written beside it, then the new manifest replaces the old one
in one rename. Shards are kept as they are (their layout did not change), so nothing extracted is
lost or computed again. A cache that cannot be written is read as it is, its rows held in a
temporary folder for the life of the process."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from filelock import FileLock

from featx.cache.key import CacheKey
from featx.cache.manifest import FORMAT, LayerPlan, Manifest, OlderFormat, Run, read_manifest, write_manifest
from featx.cache.rows import REMOVED, RowTable
from featx.data.images import STATS
from featx.models import Weights

log = logging.getLogger(__name__)


def upgrade(folder: Path, data: dict) -> tuple[Manifest, RowTable]:
    """The format-4 manifest and row table of a format-3 cache, written in place where it can be."""
    manifest = _manifest(data)
    try:
        with FileLock(folder / ".manifest.lock"):
            try:
                done = read_manifest(folder / "manifest.json")  # another process upgraded it meanwhile
                return done, RowTable(folder / "rows", done.rows)
            except OlderFormat:
                pass
            tmp = folder / f"rows.{os.getpid()}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            _write_rows(tmp, data)
            shutil.rmtree(folder / "rows", ignore_errors=True)  # left by an upgrade that was stopped
            os.replace(tmp, folder / "rows")
            write_manifest(folder / "manifest.json", manifest)
    except OSError:
        rows = Path(tempfile.mkdtemp(prefix="featx-rows-"))
        _write_rows(rows, data)
        log.info(f"note: the cache {folder} is of format 3 and cannot be written: it is read as it is "
                 f"(featx extract upgrades it to format {FORMAT} where it can write)")
        return manifest, RowTable(rows, manifest.rows)
    log.info(f"note: upgraded the cache {folder} to format {FORMAT} (a row table beside a small manifest); "
             "its features are kept")
    return manifest, RowTable(folder / "rows", manifest.rows)


def _manifest(data: dict) -> Manifest:
    return Manifest(
        key=CacheKey.from_dict(data), weights=Weights.from_dict(data["weights_info"]),
        dataset=data["dataset"], dataset_root=data["dataset_root"], classes=list(data["classes"]),
        model_layers=list(data["model_layers"]), rows=len(data["paths"]),
        fixed_split=data.get("fixed_split") is not None,
        verify="hash" if any(s[2] for s in data["stats"]) else "size",
        imagenet_default=bool(data.get("imagenet_default")), arrays=bool(data.get("arrays")),
        layers={name: LayerPlan.from_dict(plan) for name, plan in data["layers"].items()},
        runs=[Run.from_dict(run) for run in data["runs"]], skipped=dict(data["skipped"]),
        notes=dict(data.get("notes", {})), created=data.get("created", ""))


def _write_rows(folder: Path, data: dict) -> None:
    stats = np.array([(s[0], s[1], 0) for s in data["stats"]], dtype=STATS)
    split = data.get("fixed_split")
    codes = np.array([{"train": 1, "test": 2}.get(s, 0) for s in split], np.uint8) if split else \
        np.zeros(len(data["paths"]), np.uint8)
    rows = RowTable(folder, 0)
    count = rows.append(data["paths"], labels=np.asarray(data["labels"], dtype=np.int32), stats=stats,
                        split_codes=codes)
    rows = RowTable(folder, count)
    hashed = [(k, bytes.fromhex(s[2])) for k, s in enumerate(data["stats"]) if s[2]]
    if hashed:
        rows.write("hash", np.array([k for k, _ in hashed]), np.array([h for _, h in hashed], dtype="V16"))
    removed = np.asarray(data["removed"], dtype=np.int64)
    if len(removed):
        rows.write("flags", removed, rows.flags[removed] | np.uint8(REMOVED))
