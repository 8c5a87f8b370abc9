"""Reading a cached layer: featx's read (every shard checked against its xxh3 checksum) against
the same shards read with h5py alone, in one run.

A layer of random float32 features is written to a temporary cache (shards of 512 rows, as
featx writes them) and read back --repeat times by each side, in turn. By default the reads come
from the page cache: the worst case for the check's share of the time, since no disk wait hides
it. With --cold (root only) the page cache is dropped before every read, as for a cache read for
the first time since it was written.

    python benchmarks/read.py --rows 4485 --dim 25088 [--cold]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import h5py
import numpy as np

from featx.cache.key import CacheKey
from featx.cache.store import FeatureStore
from featx.data.images import STATS, ImageSet
from featx.models import Layer, get_model

from machine import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"


def build(root: Path, rows: int, dim: int) -> FeatureStore:
    images = ImageSet(root / "images", tuple(f"c/{i}.jpg" for i in range(rows)),
                      np.zeros(rows, np.int64), ("c",), stats=np.zeros(rows, dtype=STATS))
    weights = get_model("efficientnet_lite0", "random").weights.with_checksum("0" * 16)
    store = FeatureStore.open_for(root / "cache", images, key=CacheKey.of(weights, precision="fp32",
                                                                          dtype="float32"),
                                  weights=weights, layer_names=["layer"])
    layer = Layer("layer", "node", (dim,))
    store.plan_layers([layer], batch_size=32, shard_size=512)
    rng = np.random.default_rng(0)
    for k, (start, stop) in enumerate(store.shard_ranges("layer")):
        store.write_shard("layer", k, np.arange(start, stop), features=rng.random((stop - start, dim),
                                                                                  np.float32), skipped={})
    return store


def plain_read(store: FeatureStore) -> np.ndarray:
    parts = []
    for k in range(len(store.shard_ranges("layer"))):
        with h5py.File(store.shard_path("layer", k), "r") as f:
            parts.append(f["features"][...])
            f["index"][...]
    return np.concatenate(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4485)
    parser.add_argument("--dim", type=int, default=25088)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="drop the page cache before each read")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = build(Path(tmp), args.rows, args.dim)
        times: dict[str, list[float]] = {"h5py": [], "featx": []}
        for _ in range(args.repeat):
            for side in ("h5py", "featx"):
                if args.cold:
                    os.sync()
                    Path("/proc/sys/vm/drop_caches").write_text("3\n")
                started = time.perf_counter()
                plain_read(store) if side == "h5py" else store.read_layer("layer")
                times[side].append(time.perf_counter() - started)
    plain, checked = (statistics.median(times[side]) for side in ("h5py", "featx"))
    size = args.rows * args.dim * 4 / 2**20
    print(f"{args.rows} x {args.dim} float32 ({size:.0f} MiB): h5py alone {plain:.3f} s, featx with "
          f"checksums {checked:.3f} s, {100 * (checked / plain - 1):+.1f}% (median of {args.repeat}, "
          f"{'cold' if args.cold else 'page cache'})")
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "read.jsonl", "a") as f:
        f.write(json.dumps({"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "machine": cpu_name(), "rows": args.rows, "dim": args.dim, "cold": args.cold,
                            "h5py_s": plain, "featx_s": checked, "runs": times}) + "\n")


if __name__ == "__main__":
    main()
