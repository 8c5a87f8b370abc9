"""The cache at scale: what opening a cache, a no-op `featx extract`, the table's planning and a probe
cost at 10k, 100k and 1M rows, and what scanning a folder costs per file.

Each size gets a synthetic cache as `featx extract` leaves it (a row table, a small manifest and
float16 shards of two narrow EfficientNet-Lite0 layers, stage2_pool and stage3_pool, 24 and 40
values a row) for a synthetic image list whose files' sizes and times match the cache's record.
Each measurement then runs in a process of its own, so that its peak RSS is its own:

- open: FeatureStore(folder) and every row's label;
- no-op extract: extract_images on the same image list (nothing changed, every shard present) —
  its time, peak RSS, the bytes it read through read() (rchar: shard files and the manifest; the
  row table's columns are memory-mapped and counted apart), and whether the network was built;
- plan: what `featx table` does before its first probe (the layer's rows, the split);
- probe, probe-knn: the svm probe (C 1) and the k-NN probe on stage3_pool with a budget smaller
  than the layer (--memory 4 MiB), each with its predictions file; peak RSS above the process's
  RSS before probing.

    python benchmarks/scale.py --rows 10000 100000 400000 1000000 --scan 100000 1000000

Results go to benchmarks/results/scale.jsonl (one record per size, with the CPU and command).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
MODEL, LAYERS, CLASSES = "efficientnet_lite0", ("stage2_pool", "stage3_pool"), 10
PROBE_BUDGET = 4 << 20  # smaller than the probed layer from 100k rows on (15 MiB there)


def images_of(folder: Path, rows: int):
    """The synthetic image list of `rows` images (the same in every process), a dataset of its own
    per size (one cache folder each)."""
    from featx.data.images import STATS, ImageSet

    labels = np.arange(rows) * CLASSES // rows
    paths = tuple(f"class{c:03d}/img_{i:07d}.jpg" for i, c in enumerate(labels))
    stats = np.zeros(rows, dtype=STATS)
    stats["size"] = 20_000 + np.arange(rows) % 5000
    stats["mtime_ns"] = stats["ctime_ns"] = 1_700_000_000_000_000_000 + np.arange(rows)
    return ImageSet(folder / f"images-{rows}", paths, labels, tuple(f"class{c:03d}" for c in range(CLASSES)),
                    stats=stats)


def key_and_spec():
    from featx.cache.key import CacheKey
    from featx.models import get_model

    spec = get_model(MODEL, "random")
    return CacheKey.of(spec.weights, precision="fp32", dtype="float16", decode="pil"), spec


def cache_folder(folder: Path, rows: int) -> Path:
    from featx.cache.store import FeatureStore

    key, _ = key_and_spec()
    return FeatureStore.folder_for(folder / "cache", images_of(folder, rows), key)


def build(folder: Path, rows: int) -> None:
    """The cache as featx extract leaves it: rows, manifest, every shard of both layers."""
    from featx.cache.store import FeatureStore

    if (cache_folder(folder, rows) / "manifest.json").is_file():
        return
    images = images_of(folder, rows)
    key, spec = key_and_spec()
    store = FeatureStore.open_for(folder / "cache", images, key=key, weights=spec.weights,
                                  layer_names=[layer.name for layer in spec.layers])
    store.plan_layers([spec.layer(name) for name in LAYERS], batch_size=32, shard_size=512)
    rng = np.random.default_rng(0)
    for name in LAYERS:
        centres = rng.standard_normal((CLASSES, store.manifest.layers[name].dim)).astype(np.float32)
        for k, (start, stop) in enumerate(store.shard_ranges(name)):
            index = np.arange(start, stop)
            noise = rng.standard_normal((stop - start, centres.shape[1])).astype(np.float32)
            store.write_shard(name, k, index, features=(centres[images.labels[index]] * 0.5 + noise).astype(
                np.float16), skipped={})


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def rss_mib() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(step: str, folder: Path, rows: int, cache: Path) -> dict:
    """One measurement, in this process: its time, and its peak RSS above the RSS the process had
    with every library imported (`above_mib`). `cache` is the cache's folder: opening it needs no
    image list (only the no-op extract builds one, as its dataset scan would)."""
    import sklearn.svm  # noqa: F401 - every library the steps use, imported before measuring
    import torch
    import torchvision  # noqa: F401 - the report names its version

    from featx.cache.store import FeatureStore
    from featx.extract.run import ExtractOptions, extract_images
    from featx.probes.stream import LayerStream
    from featx.study import ProbingOptions, evaluate, split_rows

    torch.zeros(1)
    base, read, started = rss_mib(), rchar(), time.perf_counter()
    record: dict = {}
    if step == "open":
        store = FeatureStore(cache)
        int(store.labels.sum())
    elif step == "noop-extract":
        extract_images(images_of(folder, rows), MODEL, list(LAYERS), weights="random", cache=folder / "cache",
                       options=ExtractOptions(device="cpu", dtype="float16", precision="fp32"), progress=None)
        store = FeatureStore(cache)
        columns = ("size", "mtime", "key", "flags")
        record = {"read_bytes": rchar() - read,
                  "mapped_bytes": sum(store.rows._file(name).stat().st_size for name in columns),
                  "feature_bytes": sum(p.stat().st_size for p in store.folder.rglob("shard-*.h5")),
                  "network_built": "featx.extract.forward" in sys.modules}
    else:
        store = FeatureStore(cache)
        probe = "knn" if step == "probe-knn" else "svm"
        probing = ProbingOptions(train_per_class=100, C=1.0, memory=PROBE_BUDGET, device="cpu",
                                 probe=(probe,))
        if step == "plan":
            stream = LayerStream(store, "stage3_pool", device="cpu")
            split_rows(store, stream.index, probing)
        else:
            out = folder / "out" / f"{rows}-{probe}"
            report = evaluate(store, ["stage3_pool"], probing, out_dir=out, checked=True)
            record = {"accuracy": report.layers[0].accuracy, "budget_mib": PROBE_BUDGET / 2**20,
                      "layer_mib": rows * 40 * 4 / 2**20}
    return {"seconds": time.perf_counter() - started, "base_mib": base, "above_mib": peak_mib() - base,
            **record}


def scan(folder: Path, files: int) -> dict:
    """Seconds to scan a folder of `files` image files (empty ones: a scan opens none)."""
    from featx.data.scan import find_images

    root = folder / f"scan-{files}"
    if not root.is_dir():
        for c in range(10):
            (root / f"c{c}").mkdir(parents=True, exist_ok=True)
        for i in range(files):
            (root / f"c{i % 10}" / f"img_{i:07d}.jpg").touch()
    started = time.perf_counter()
    images = find_images(root)
    return {"files": len(images), "seconds": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 400_000, 1_000_000])
    parser.add_argument("--scan", type=int, nargs="*", default=[10_000, 100_000])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/featx-scale"))
    parser.add_argument("--child", nargs=3, metavar=("STEP", "ROWS", "CACHE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], args.folder, int(args.child[1]), Path(args.child[2]))))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from featx import __version__

    from machine import cpu_name

    RESULTS.mkdir(exist_ok=True)
    for rows in args.rows:
        started = time.perf_counter()
        build(args.folder, rows)
        record = {"rows": rows, "built_s": time.perf_counter() - started}
        cache = cache_folder(args.folder, rows)
        for step in ("open", "noop-extract", "plan", "probe", "probe-knn"):
            out = subprocess.run([sys.executable, __file__, "--folder", str(args.folder), "--child", step,
                                  str(rows), str(cache)], check=True, capture_output=True, text=True).stdout
            record[step] = json.loads(out.strip().splitlines()[-1])
        record.update(cpu=cpu_name(), featx=__version__, command=" ".join(sys.argv),
                      when=datetime.now(timezone.utc).isoformat(timespec="seconds"))
        print(json.dumps(record))
        with open(RESULTS / "scale.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
    for files in args.scan:
        record = {"scan": scan(args.folder, files), "cpu": cpu_name(), "featx": __version__,
                  "command": " ".join(sys.argv),
                  "when": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        print(json.dumps(record))
        with open(RESULTS / "scale.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
