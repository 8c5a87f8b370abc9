"""The engine's overhead: one extraction run by 2 ranks of one thread each (torchrun, gloo) and
by one process with two threads, on the same images, in one run.

    python benchmarks/ranks.py --dataset ../shared/data/15scene --images 600 --model resnet50

Both are the `featx extract` command as a user runs it (a fresh cache each, random weights, on
the CPU), with shards of --shard-size images (64): ranks take whole shards, so a run of few
shards cannot be shared evenly (600 images in shards of 512 give one rank 512 and the other 88).
The figures are the command's wall time and the extraction time its manifest records (for two
ranks: the slower rank's). The ratio is two ranks over one process: 1.0 means the
engine costs nothing, and the target is at most 1.15.

With --probes, the probes are timed the same way on the cache the one process made: `featx svm
--probe svm,logreg` run by one process with two threads and by 2 ranks of one thread. The passes
over the layer are shared between the ranks; the solve runs whole on every rank while the training
rows fit its budget (primal form: layers no wider than their training rows), and in kernel form
on the Gram matrix the ranks built together.

    python benchmarks/ranks.py --dataset ../shared/data/15scene --images 600 \
        --model efficientnet_lite0 --layers stage4_pool,stage6_pool,pool --probes
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from featx.data.scan import find_images

from machine import cpu_name

TWO_RANKS = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]  # python's arguments

RESULTS = Path(__file__).resolve().parent / "results"


def linked_subset(dataset: str, count: int, folder: Path) -> Path:
    """`count` images spread evenly over the dataset, linked into class folders under `folder`."""
    images = find_images(dataset)
    rows = np.linspace(0, len(images) - 1, min(count, len(images))).round().astype(int)
    for i in rows:
        target = folder / images.paths[i]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(images.root / images.paths[i])
    return folder


def timed(command: list[str], threads: int, cache: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    manifest = json.loads(next(cache.rglob("manifest.json")).read_text())
    return {"wall_s": wall, "extraction_s": max(run["seconds"] for run in manifest["runs"]),
            "ranks": len(manifest["runs"])}


def timed_probes(tmp: Path, layers: str | None) -> dict:
    """`featx svm --probe svm,logreg` on the one process's cache, by one process of two threads and
    by 2 ranks of one thread; wall times, and the largest difference in accuracy between the two
    (in test images: the solves agree to floating-point tolerance, not bit for bit)."""
    svm = ["svm", "--cache", str(tmp / "one"), "--probe", "svm,logreg", "--device", "cpu"]
    svm += ["--layer", layers] if layers else []
    record, scores = {}, {}
    for name, launch, threads in (("one", [], 2), ("two", TWO_RANKS, 1)):
        started = time.perf_counter()
        subprocess.run([sys.executable, *launch, "-m", "featx", *svm, "--out", str(tmp / f"svm-{name}")],
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)}, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        record[f"{name}_wall_s"] = time.perf_counter() - started
        rows = json.loads((tmp / f"svm-{name}" / "svm.json").read_text())["layers"]
        scores[name] = {(row["layer"], probe["probe"]): probe["accuracy"]
                        for row in rows for probe in [row, *row["other_probes"]]}
        record["kernel_form"] = {row["layer"]: row["kernel_form"] for row in rows}
        record["test_images"] = rows[0]["n_test"]
    record["ratio"] = record["two_wall_s"] / record["one_wall_s"]
    record["accuracy_difference"] = max(abs(scores["one"][key] - scores["two"][key]) for key in scores["one"])
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="data/demo")
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--layers", default=None, help="comma-separated; default: the model's own")
    parser.add_argument("--workers", type=int, default=None, help="decoding processes per rank")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--probes", action="store_true", help="also time featx svm both ways")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        data = linked_subset(args.dataset, args.images, Path(tmp) / "data")
        n = len(find_images(data))
        extract = ["extract", str(data), "--model", args.model, "--weights", "random", "--device", "cpu",
                   "--shard-size", str(args.shard_size)]
        extract += ["--layer", args.layers] if args.layers else []
        extract += ["--workers", str(args.workers)] if args.workers is not None else []
        one = timed([sys.executable, "-m", "featx", *extract, "--cache", f"{tmp}/one"], 2, Path(tmp) / "one")
        two = timed([sys.executable, *TWO_RANKS, "-m", "featx", *extract, "--cache", f"{tmp}/two"], 1,
                    Path(tmp) / "two")
        probes = timed_probes(Path(tmp), args.layers) if args.probes else None
    record = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": cpu_name(),
              "torch": torch.__version__, "model": args.model, "images": n, "workers": args.workers,
              "shard_size": args.shard_size,
              "one_process_two_threads": one, "two_ranks_one_thread": two,
              "ratio_wall": two["wall_s"] / one["wall_s"],
              "ratio_extraction": two["extraction_s"] / one["extraction_s"], "probes": probes}
    print(f"{args.model}, {n} images on {record['machine']}")
    for name, r in (("1 process x 2 threads", one), ("2 ranks x 1 thread", two)):
        print(f"  {name:<22} wall {r['wall_s']:6.1f} s  extraction {r['extraction_s']:6.1f} s "
              f"({n / r['extraction_s']:.1f} images/s)")
    print(f"  two ranks / one process: wall {record['ratio_wall']:.2f}x, "
          f"extraction {record['ratio_extraction']:.2f}x")
    if probes:
        print(f"featx svm --probe svm,logreg, kernel form: {probes['kernel_form']}")
        print(f"  1 process x 2 threads  wall {probes['one_wall_s']:6.1f} s")
        print(f"  2 ranks x 1 thread     wall {probes['two_wall_s']:6.1f} s")
        differ = probes["accuracy_difference"]
        print(f"  two ranks / one process: {probes['ratio']:.2f}x; accuracies differ by at most "
              f"{100 * differ:.2f} points ({differ * probes['test_images']:.0f} of {probes['test_images']} "
              "test images)")
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "ranks.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
