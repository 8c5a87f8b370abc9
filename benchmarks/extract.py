"""Extraction speed: featx against the reference way of working, measured in one run.

featx: one traced forward pass for all layers (stopping at the deepest), channels_last, the
`auto` precision, DataLoader workers decoding in parallel, shards written to HDF5 by a
background thread.

Baseline, written the way the reference study worked: for each layer, one full forward pass with a
forward hook, float32, images decoded with PIL in the main process, batch 32, features kept in
memory; on the device given (--device). A layer that is not a module's output (a pooled view)
has no hook point: the baseline traces that one node instead, a pass that stops there, which can
only make the baseline faster.

With --table, the whole layer-comparison table is timed end to end, each side in a process of its
own (benchmarks/table_run.py), on the same images (a temporary folder of links to them): featx is
the `featx table` command with its defaults (C by cross-validation, its solver choice, tables and
figures written), the usual way is the baseline above followed by scikit-learn's LinearSVC() (C = 1,
fixed) per layer on the raw features, on the same seeded split. Both start Python and import what
they need within their time. The script prints the ratio, where featx's time goes (start-up,
imports, building and tracing the network, extraction, probes, tables and figures; and each
extraction stage timed alone) and both sides' accuracies, and which precision each side used.
The usual way runs in float32; featx in its `auto` precision (float32 on a CPU), and with
--also-precision once more in another (bf16: not like for like, said so).

    python benchmarks/extract.py --dataset ../shared/data/15scene --images 300 --table
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torchvision
from table_run import usual_features

from featx.cache.key import CacheKey
from featx.cache.store import FeatureStore
from featx.data.decode import pil_batches
from featx.data.images import ImageSet
from featx.data.scan import find_images
from featx.extract.forward import LayerExtractor, batches_of
from featx.extract.run import extract_to_cache
from featx.models import load_model

from machine import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"



def subset(images: ImageSet, count: int) -> ImageSet:
    """`count` images spread evenly over the dataset (the same for both sides)."""
    rows = np.linspace(0, len(images) - 1, min(count, len(images))).round().astype(int)
    return ImageSet(images.root, tuple(images.paths[i] for i in rows), images.labels[rows],
                    images.classes)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def open_store(root: Path, images: ImageSet, extractor: LayerExtractor) -> FeatureStore:
    weights = extractor.model.weights
    key = CacheKey.of(weights, precision=extractor.precision, dtype=extractor.dtype)
    return FeatureStore.open_for(root, images, key=key, weights=weights,
                                 layer_names=[layer.name for layer in extractor.model.spec.layers])


def run_featx(images: ImageSet, args, cache: Path) -> tuple[dict[str, np.ndarray], dict]:
    model = load_model(args.model, args.weights)
    extractor = LayerExtractor(model, model.spec.resolve_layers(args.layers), args.device,
                               precision=args.precision, channels_last=not args.no_channels_last)
    started = time.perf_counter()
    store = open_store(cache, images, extractor)
    extract_to_cache(store, extractor, images, batch_size=args.batch_size, workers=args.workers)
    seconds = time.perf_counter() - started
    features = {layer.name: store.read_layer(layer.name).features for layer in extractor.layers}
    return features, {"seconds": seconds, "precision": extractor.precision,
                      "device": str(extractor.device), "peak_rss_mib": peak_rss_mib(),
                      "channels_last": extractor.channels_last,
                      "breakdown": None if args.no_breakdown else breakdown(images, extractor, args)}


def breakdown(images: ImageSet, extractor: LayerExtractor, args) -> dict:
    """Each stage of featx timed alone over the same images: decode (workers), forward, copy to
    host, HDF5 write. In the real run they overlap."""
    batches = batches_of(range(len(images)), args.batch_size)
    started = time.perf_counter()
    decoded = [pixels for _, pixels, _ in
               pil_batches(images, extractor.preprocess, batches, workers=args.workers)]
    decode = time.perf_counter() - started
    forward = copy = 0.0
    outputs = []
    sync = torch.cuda.synchronize if extractor.device.type == "cuda" else (lambda: None)
    with torch.inference_mode():
        for pixels in decoded:
            t0 = time.perf_counter()
            out = extractor.forward(pixels)
            sync()
            t1 = time.perf_counter()
            outputs.append({k: v.float().cpu().numpy() for k, v in out.items()})
            copy += time.perf_counter() - t1
            forward += t1 - t0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        probe = open_store(Path(tmp), images, extractor)
        probe.plan_layers(extractor.layers, args.batch_size, 10**9)
        for name in outputs[0]:
            rows = np.concatenate([o[name] for o in outputs])
            probe.write_shard(name, 0, np.arange(len(rows)), features=rows, skipped={})
    write = time.perf_counter() - started
    return {"decode_s": decode, "forward_s": forward, "copy_to_host_s": copy, "write_s": write}


def link_subset(images: ImageSet, folder: Path) -> Path:
    """A folder of links to `images` (class folders as in the dataset), so that a command given a
    folder sees exactly these images, in the same order."""
    for path in images.paths:
        target = folder / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to((images.root / path).resolve())
    return folder


def run_side(side: str, arguments: list[str], out: Path) -> dict:
    """One side of the table in a process of its own (benchmarks/table_run.py): its record, with
    the process's whole wall time and the time before its script began (start-up)."""
    script = Path(__file__).resolve().parent / "table_run.py"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]))}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.time()
    subprocess.run([sys.executable, str(script), side, str(out), *arguments], check=True, env=env)
    wall = time.time() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    record = json.loads(out.read_text())
    record["wall_s"] = wall
    record["cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    record["stages"] = {"start-up": record["started"] - began, **record["stages"]}
    return record


def featx_table(folder: Path, args, precision: str, tmp: Path) -> dict:
    """featx's side: `featx table` on the folder, in a process of its own, with `precision`."""
    out, cache = tmp / f"out-{precision}", tmp / f"cache-{precision}"
    command = ["table", str(folder), "--model", args.model, "--weights", args.weights,
               "--train-per-class", str(args.train_per_class), "--cache", str(cache), "--out", str(out),
               "--precision", precision, "--device", args.device,
               *(["--workers", str(args.workers)] if args.workers is not None else [])]
    featx = run_side("featx", ["--", *command], tmp / f"featx-{precision}.json")
    report = json.loads((out / "table.json").read_text())
    featx["layers"] = {row["layer"]: {"seconds": row["train_seconds"], "accuracy": row["accuracy"],
                                      "solver": row["solver"], "dim": row["dim"]} for row in report["layers"]}
    featx["precision"] = report["models"][0]["extraction_runs"][-1]["precision"]
    stages = featx["stages"]
    accounted = sum(v for k, v in stages.items() if k not in ("command", "start-up", "imports"))
    stages["other"] = stages.pop("command") - accounted
    return featx


def whole_table(images: ImageSet, args) -> dict:
    """Both sides' whole table, end to end, on the same images and split; featx with `--precision`
    (like for like: the usual way is fp32) and, with --also-precision, once more in another."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = link_subset(images, Path(tmp) / images.root.name)
        featx = featx_table(folder, args, args.precision, Path(tmp))
        also = featx_table(folder, args, args.also_precision, Path(tmp)) if args.also_precision else None
        usual = run_side("usual", ["--dataset", str(folder), "--model", args.model, "--weights", args.weights,
                                   "--train-per-class", str(args.train_per_class)], Path(tmp) / "usual.json")
    table = {"featx": featx, "usual": usual, "ratio": usual["wall_s"] / featx["wall_s"],
             "cpu_ratio": usual["cpu_s"] / featx["cpu_s"]}
    if also:
        table["also"] = {**also, "ratio": usual["wall_s"] / also["wall_s"],
                         "cpu_ratio": usual["cpu_s"] / also["cpu_s"]}
    return table


def print_table(table: dict, alone: dict | None) -> None:
    featx, usual = table["featx"], table["usual"]
    print(f"whole table, end to end: featx {featx['wall_s']:.1f} s ({featx['precision']}), usual way "
          f"{usual['wall_s']:.1f} s ({usual['precision']}): ratio {table['ratio']:.1f}x; CPU time (every "
          f"process and thread) {featx['cpu_s']:.1f} s against {usual['cpu_s']:.1f} s: "
          f"{table['cpu_ratio']:.1f}x")
    sides = [("featx", featx), ("usual", usual)]
    if "also" in table:
        also = table["also"]
        print(f"  featx in {also['precision']} against the usual way in fp32 (not like for like): "
              f"{also['wall_s']:.1f} s, ratio {also['ratio']:.1f}x; CPU time {also['cpu_s']:.1f} s, "
              f"{also['cpu_ratio']:.1f}x")
        sides.insert(1, (f"featx {also['precision']}", also))
    for name, side in sides:
        print(f"  {name}'s time: " + ", ".join(f"{k} {v:.1f} s" for k, v in side["stages"].items()))
    if alone:
        print("  featx's extraction stages, each alone: " + ", ".join(
            f"{k[:-2].replace('_', ' ')} {v:.1f} s" for k, v in alone.items()))
    print(f"  extraction alone: {usual['stages']['extraction'] / featx['stages']['extraction']:.1f}x")
    for name, row in featx["layers"].items():
        theirs = usual["layers"][name]
        print(f"  {name:<12} {row['dim']:>7}  featx svm ({row['solver']}) {row['seconds']:6.2f} s acc "
              f"{row['accuracy']:.4f} | LinearSVC() {theirs['seconds']:6.2f} s acc {theirs['accuracy']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="data/demo")
    parser.add_argument("--model", default="vgg16")
    parser.add_argument("--layers", nargs="*", default=None, help="default: the model's standard layers")
    parser.add_argument("--weights", default="random", help="speed does not depend on the weights")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--no-baseline", action="store_true", help="featx alone (e.g. for memory)")
    parser.add_argument("--no-breakdown", action="store_true", help="skip timing each stage alone")
    parser.add_argument("--no-channels-last", action="store_true", help="featx in the default layout")
    parser.add_argument("--table", action="store_true",
                        help="the whole table end to end on both sides (extraction, SVMs, reports)")
    parser.add_argument("--train-per-class", type=int, default=10)
    parser.add_argument("--also-precision", default=None,
                        help="with --table: featx's side once more in this precision (such as bf16)")
    args = parser.parse_args()

    images = subset(find_images(args.dataset), args.images)
    n = len(images)
    record = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": cpu_name(),
              "load": os.getloadavg()[0], "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
              "torchvision": torchvision.__version__, "model": args.model, "weights": args.weights,
              "images": n, "batch_size": args.batch_size, "workers": args.workers}
    if args.table:
        print(f"{args.model} on {n} images of {images.root.name}; the whole table end to end; "
              f"load {record['load']:.1f}", flush=True)
        record["table"] = whole_table(images, args)
        alone = None
        if not args.no_breakdown:
            model = load_model(args.model, args.weights)
            extractor = LayerExtractor(model, model.spec.resolve_layers(args.layers), args.device,
                                       precision=args.precision, channels_last=not args.no_channels_last)
            alone = record["table"]["alone"] = breakdown(images, extractor, args)
        print_table(record["table"], alone)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            ours, info = run_featx(images, args, Path(tmp))
        record.update(device_name=torch.cuda.get_device_name() if info["device"].startswith("cuda")
                      else cpu_name(), layers=list(ours), featx=info)
        layout = "channels_last" if info["channels_last"] else "default layout"
        print(f"{args.model} [{', '.join(ours)}] on {n} images, {info['device']} {info['precision']}, "
              f"{layout}")
        print(f"featx:    {info['seconds']:8.1f} s  {n / info['seconds']:8.1f} images/s  "
              f"(peak RSS {info['peak_rss_mib']:.0f} MiB)")
        if info["breakdown"]:
            print("  where the time goes (each stage alone): " + ", ".join(
                f"{k[:-2].replace('_', ' ')} {v:.1f} s" for k, v in info["breakdown"].items()))
        if not args.no_baseline:
            _, _, baseline_s = usual_features(images, args.model, args.weights, args.layers, args.device)
            record["baseline"] = {"seconds": baseline_s}
            print(f"baseline: {baseline_s:8.1f} s  {n / baseline_s:8.1f} images/s")
            print(f"extraction ratio: {baseline_s / info['seconds']:.1f}x")
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "extract.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"record appended to {RESULTS / 'extract.jsonl'}", file=sys.stderr)


if __name__ == "__main__":
    main()
