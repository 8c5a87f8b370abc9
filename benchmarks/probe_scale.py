"""Probes at scale: peak memory and time of featx's probes on a synthetic layer of N rows.

Writes a synthetic layer (class centres plus noise, float16) through the store's API, one shard
at a time (FeatureStore.for_arrays + write_shard), then probes it in the same process with the
default split (100 training rows per class, the rest for test) and the default memory budget.
Peak RSS is read after writing and after probing, so that runs at two sizes can be set side by
side: a probe's memory must not grow with the number of rows. (`scale.py` measures the same bound
at a budget smaller than the layer, with the cache's own costs beside it.)

    python benchmarks/probe_scale.py --rows 100000 --dim 2048 --classes 100 --folder /tmp/scale
    python benchmarks/probe_scale.py --rows 1000000 --dim 2048 --classes 100 --folder /tmp/scale

The layer is written once per size and reused (--rewrite writes it again).
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from featx import __version__
from featx.cache.store import FeatureStore
from featx.data.splits import seeded_split
from featx.options import parse_memory
from featx.probes import ProbeOptions, get_probe, parse_probes
from featx.probes.stream import LayerStream

from machine import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_layer(root: Path, rows: int, dim: int, classes: int, shard_size: int, seed: int) -> FeatureStore:
    """The synthetic layer `features`, shard by shard: rows of class c are centre_c * 0.15 plus
    unit noise, in float16."""
    rng = np.random.default_rng(seed)
    labels = np.arange(rows) % classes
    names = tuple(f"class{c:03d}" for c in range(classes))
    store = FeatureStore.for_arrays(root, f"synthetic-{rows}x{dim}", labels, classes=names,
                                    layers={"features": dim},
                                    dtype="float16", shard_size=shard_size)
    centres = rng.standard_normal((classes, dim), dtype=np.float32) * 0.15
    for k, (start, stop) in enumerate(store.shard_ranges("features")):
        if store.shard_path("features", k).is_file():
            continue
        index = np.arange(start, stop)
        block = rng.standard_normal((stop - start, dim), dtype=np.float32)
        block += centres[labels[index]]
        store.write_shard("features", k, index, features=block, skipped={})
    return FeatureStore(store.folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/featx-scale"))
    parser.add_argument("--shard-size", type=int, default=8192)
    parser.add_argument("--probe", default="svm,knn", help="comma-separated: svm, logreg, knn")
    parser.add_argument("--memory", default="2G")
    parser.add_argument("--device", default=None, help="default: cuda when there is one")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    started = time.perf_counter()
    store = write_layer(args.folder, args.rows, args.dim, args.classes, args.shard_size, args.seed)
    written_s, rss_written = time.perf_counter() - started, peak_rss_mib()
    on_disk = sum(p.stat().st_size for p in (store.folder / "features").glob("*.h5"))
    print(f"{args.rows} rows x {args.dim} values, {args.classes} classes: {on_disk / 2**30:.2f} GiB "
          f"in {written_s:.1f} s; peak RSS {rss_written:.0f} MiB", flush=True)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    split = seeded_split(store.labels, store.classes, 100, seed=args.seed)
    options = ProbeOptions(memory=parse_memory(args.memory), seed=args.seed)
    stream = LayerStream(store, "features", "l2", device=device)
    figures = []
    for probe in parse_probes(args.probe):
        result, _ = get_probe(probe).train(stream, split, options)
        figures.append({"probe": probe, "seconds": result.train_seconds, "accuracy": result.accuracy,
                        "balanced_accuracy": result.balanced_accuracy, "C": result.C,
                        "peak_rss_mib": peak_rss_mib()})
        print(f"{probe:<7} {result.train_seconds:7.1f} s  accuracy {result.accuracy:.4f}  "
              f"(train {result.n_train}, test {result.n_test})  peak RSS so far {peak_rss_mib():.0f} MiB",
              flush=True)
    RESULTS.mkdir(exist_ok=True)
    record = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": cpu_name(),
              "featx": __version__, "command": " ".join(["benchmarks/probe_scale.py", *sys.argv[1:]]),
              "device": device, "rows": args.rows, "dim": args.dim, "classes": args.classes,
              "memory": args.memory, "bytes_on_disk": on_disk, "write_s": written_s,
              "peak_rss_after_write_mib": rss_written, "probes": figures}
    with open(RESULTS / "probe_scale.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
