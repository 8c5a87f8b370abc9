"""Extraction speed: featx against the reference way of working, measured in one run.

featx: one traced forward pass for all layers (stopping at the deepest), channels_last, the
`auto` precision, DataLoader workers decoding in parallel, shards written to HDF5 by a
background thread.

Baseline, written the way the reference study worked: for each layer, one full forward pass with a
forward hook, float32, images decoded with PIL in the main process, batch 32, features kept in
memory; on the device given (--device). A layer that is not a module's output (a pooled view)
has no hook point: the baseline traces that one node instead, a pass that stops there, which can
only make the baseline faster.

With --table, both sides also train a linear SVM per layer on a seeded split (featx: its defaults;
baseline: sklearn's LinearSVC() on the raw features), which gives the end-to-end ratio of the whole
layer-comparison table and both sides' accuracies.

    python benchmarks/extract.py --dataset ../shared/data/15scene --images 300 --table
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torchvision
from sklearn.svm import LinearSVC
from torchvision.models.feature_extraction import create_feature_extractor

from featx.cache.store import FeatureStore
from featx.data.decode import pil_batches
from featx.data.images import ImageSet, load_image
from featx.data.preprocess import normalize, prepare
from featx.data.scan import find_images
from featx.data.splits import seeded_split
from featx.extract.forward import LayerExtractor, batches_of, resolve_device, to_vectors
from featx.extract.run import extract_to_cache
from featx.models import load_model
from featx.probes import ProbeOptions, get_probe
from featx.probes.stream import LayerStream

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
    return FeatureStore.open_for(root, images, extractor.model.weights, precision=extractor.precision,
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
                      "breakdown": None if args.no_breakdown else breakdown(images, extractor, args, store)}


def breakdown(images: ImageSet, extractor: LayerExtractor, args, store: FeatureStore) -> dict:
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


def run_baseline(images: ImageSet, model_name: str, weights: str, layers: list[str] | None,
                 device: str = "cpu") -> tuple[dict[str, np.ndarray], float]:
    """One full forward pass per layer with a hook, fp32, PIL in the main process, batch 32, on
    `device`; features kept in memory."""
    model = load_model(model_name, weights)
    target_device = resolve_device(device)
    module, preprocess = model.module.eval().to(target_device), model.preprocess
    sync = torch.cuda.synchronize if target_device.type == "cuda" else (lambda: None)
    started = time.perf_counter()
    features = {}
    modules = dict(module.named_modules())
    for layer in model.spec.resolve_layers(layers):
        captured: list[np.ndarray] = []
        if layer.node in modules:
            def hook(_module, _inputs, output, layer=layer, captured=captured):
                captured.append(to_vectors(layer, output).float().cpu().numpy())

            handle = modules[layer.node].register_forward_hook(hook)
            run = module
        else:  # a pooled view, not a module: its node traced alone
            handle = None
            traced = create_feature_extractor(module, return_nodes=[layer.node])

            def run(x, layer=layer, captured=captured, traced=traced):
                captured.append(to_vectors(layer, traced(x)[layer.node]).float().cpu().numpy())
        try:
            for start in range(0, len(images), 32):
                paths = images.paths[start:start + 32]
                batch = torch.stack([prepare(preprocess, load_image(images.root / p)) for p in paths])
                with torch.no_grad():
                    run(normalize(preprocess, batch.to(target_device)))
        finally:
            if handle is not None:
                handle.remove()
        sync()
        features[layer.name] = np.concatenate(captured)
    return features, time.perf_counter() - started


def svm_both(images: ImageSet, featx_features: dict, baseline_features: dict, per_class: int,
             seed: int) -> dict:
    """A linear SVM per layer on both sides' features, on one seeded split: featx's probe streams
    its features from a cache (written here from featx's side), the baseline fits LinearSVC()."""
    split = seeded_split(images.labels, images.classes, per_class, seed=seed)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        store = FeatureStore.for_arrays(Path(tmp), "features", images.labels, classes=images.classes,
                                        layers={name: x.shape[1] for name, x in featx_features.items()})
        for name, x in featx_features.items():
            for k, (start, stop) in enumerate(store.shard_ranges(name)):
                store.write_shard(name, k, np.arange(start, stop), features=x[start:stop], skipped={})
        for name in featx_features:
            result, _ = get_probe("svm").train(LayerStream(store, name), split, ProbeOptions(seed=seed))
            xb, y = baseline_features[name], images.labels
            started = time.perf_counter()
            reference = LinearSVC().fit(xb[split.train], y[split.train])
            baseline_s = time.perf_counter() - started
            rows[name] = {"featx_s": result.train_seconds, "featx_accuracy": result.accuracy,
                          "baseline_s": baseline_s, "baseline_accuracy":
                          float((reference.predict(xb[split.test]) == y[split.test]).mean())}
    return rows


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
    parser.add_argument("--table", action="store_true", help="also train an SVM per layer on both sides")
    parser.add_argument("--train-per-class", type=int, default=10)
    args = parser.parse_args()

    images = subset(find_images(args.dataset), args.images)
    n = len(images)
    with tempfile.TemporaryDirectory() as tmp:
        ours, info = run_featx(images, args, Path(tmp))
    record = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device_name": torch.cuda.get_device_name() if info["device"].startswith("cuda")
              else cpu_name(),
              "cpu_threads": torch.get_num_threads(), "torch": torch.__version__,
              "torchvision": torchvision.__version__, "model": args.model, "weights": args.weights,
              "layers": list(ours), "images": n, "batch_size": args.batch_size,
              "workers": args.workers, "featx": info}
    layout = "channels_last" if info["channels_last"] else "default layout"
    print(f"{args.model} [{', '.join(ours)}] on {n} images, {info['device']} {info['precision']}, "
          f"{layout}")
    print(f"featx:    {info['seconds']:8.1f} s  {n / info['seconds']:8.1f} images/s  "
          f"(peak RSS {info['peak_rss_mib']:.0f} MiB)")
    if info["breakdown"]:
        print("  where the time goes (each stage alone): " + ", ".join(
            f"{k[:-2].replace('_', ' ')} {v:.1f} s" for k, v in info["breakdown"].items()))
    if not args.no_baseline:
        theirs, baseline_s = run_baseline(images, args.model, args.weights, args.layers, args.device)
        record["baseline"] = {"seconds": baseline_s}
        print(f"baseline: {baseline_s:8.1f} s  {n / baseline_s:8.1f} images/s")
        print(f"extraction ratio: {baseline_s / info['seconds']:.1f}x")
        if args.table:
            rows = svm_both(images, ours, theirs, args.train_per_class, 0)
            record["svm"] = rows
            for name, row in rows.items():
                print(f"  {name:<12} svm featx {row['featx_s']:6.2f} s acc {row['featx_accuracy']:.4f} | "
                      f"LinearSVC() {row['baseline_s']:6.2f} s acc {row['baseline_accuracy']:.4f}")
            featx_total = info["seconds"] + sum(r["featx_s"] for r in rows.values())
            baseline_total = baseline_s + sum(r["baseline_s"] for r in rows.values())
            record["table"] = {"featx_s": featx_total, "baseline_s": baseline_total}
            print(f"whole table: featx {featx_total:.1f} s, baseline {baseline_total:.1f} s, "
                  f"ratio {baseline_total / featx_total:.1f}x")
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "extract.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"record appended to {RESULTS / 'extract.jsonl'}", file=sys.stderr)


if __name__ == "__main__":
    main()
