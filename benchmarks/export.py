"""`featx export`: each format's time and peak memory against saving the same layer the plain
way, in one run.

A layer of random features (float16 by default, as a GPU caches them) is written to a temporary
cache in shards of 512 rows, then each side runs in a fresh process (so that its peak resident
memory is its own): `read` passes over the layer block by block as the export does, writing
nothing; `save` is the plain way, the whole layer read into one array and written with np.save;
each format exports it with the default --memory (2G). The page cache is warm for every side after
the first.

    python benchmarks/export.py --rows 4485 --dim 25088 [--dtype float16] [--format npy ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from featx import __version__

from machine import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"
FORMATS = {"npy": ".npy", "npz": ".npz", "parquet": ".parquet", "mat5": ".mat", "mat73": ".mat",
           "csv": ".csv"}


def build(root: Path, rows: int, dim: int, dtype: str) -> Path:
    from featx.cache.store import FeatureStore

    rng = np.random.default_rng(0)
    store = FeatureStore.for_arrays(root, "bench", np.arange(rows) % 15, tuple(f"c{k}" for k in range(15)),
                                    {"layer": dim}, dtype=dtype, shard_size=512)
    for k, (start, stop) in enumerate(store.shard_ranges("layer")):
        values = rng.random((stop - start, dim), np.float32).astype(dtype)
        store.write_shard("layer", k, np.arange(start, stop), features=values, skipped={})
    return store.folder


def child(side: str, folder: Path, out: Path) -> dict:
    """One side in this process: seconds and peak resident memory."""
    from featx.cache.store import FeatureStore
    from featx.export import BLOCK_BYTES, EXPANSION, ExportOptions, export_layers
    from featx.options import DEFAULT_MEMORY
    from featx.study import find_store  # noqa: F401 - imported by every side, as the command does

    store = FeatureStore(folder)
    started = time.perf_counter()
    if side == "read":
        rows = min(BLOCK_BYTES, DEFAULT_MEMORY // EXPANSION) // (4 * store.manifest.layers["layer"].dim)
        for index, _ in store.iter_blocks("layer", rows, stored=True):
            store.rows.paths(index)
    elif side == "save":
        parts = [block for _, block in store.iter_blocks("layer", store.n_images, stored=True)]
        np.save(out / "layer.npy", np.concatenate(parts))
    else:
        export_layers(store, ["layer"], out / f"layer{FORMATS[side]}", ExportOptions(format=side))
    seconds = time.perf_counter() - started
    written = sum(p.stat().st_size for p in out.iterdir())
    for p in out.iterdir():
        p.unlink()
    return {"seconds": seconds, "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "written_mib": written / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4485)
    parser.add_argument("--dim", type=int, default=25088)
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--format", action="append", choices=list(FORMATS), help="default: all but csv")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], Path(args.child[1]), Path(args.child[2]))))
        return
    formats = args.format or [f for f in FORMATS if f != "csv"]
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = build(Path(tmp) / "cache", args.rows, args.dim, args.dtype)
        out = Path(tmp) / "out"
        out.mkdir()
        for side in ["read", "save", *formats]:
            run = subprocess.run([sys.executable, __file__, "--child", side, str(folder), str(out)],
                                 capture_output=True, text=True, check=True)
            figures[side] = json.loads(run.stdout.splitlines()[-1])
    save, read = figures["save"], figures["read"]
    layer_mib = args.rows * args.dim * np.dtype(args.dtype).itemsize / 2**20
    print(f"layer {args.rows} x {args.dim} {args.dtype} ({layer_mib:.0f} MiB), {cpu_name()}, "
          f"featx {__version__}")
    print(f"{'side':<8} {'seconds':>8} {'x save':>7} {'peak MiB':>9} {'+ read':>7} {'written MiB':>12}")
    for side, f in figures.items():
        print(f"{side:<8} {f['seconds']:8.2f} {f['seconds'] / save['seconds']:7.2f} {f['peak_mib']:9.0f} "
              f"{f['peak_mib'] - read['peak_mib']:7.0f} {f['written_mib']:12.0f}")
    RESULTS.mkdir(exist_ok=True)
    record = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": cpu_name(),
              "featx": __version__, "rows": args.rows, "dim": args.dim, "dtype": args.dtype,
              "figures": figures}
    with open(RESULTS / "export.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
