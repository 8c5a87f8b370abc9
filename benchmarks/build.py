"""Model start-up: building a network with pretrained weights, featx against the usual way.

Usual way (featx before the registry): build the architecture on the CPU, which runs its random
initialisation, then copy the weights over it with load_state_dict.
featx: build the architecture on the meta device (no memory, no initialisation), then assign the
state dict's tensors to it (load_state_dict(assign=True)).

Both read the same state dict, written under the official file name into a temporary torch hub
cache (random values: the time does not depend on them). Each side runs --repeat times, in turn.

    python benchmarks/build.py --model vgg16 --model resnet50 --model vit_b_16
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

import torch
import torchvision

from machine import cpu_name

RESULTS = Path(__file__).resolve().parent / "results"


def usual(name: str, path: Path) -> torch.nn.Module:
    module = torchvision.models.get_model(name, weights=None)
    module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return module.eval()


def featx_way(name: str) -> torch.nn.Module:
    from featx.models import load_model

    return load_model(name, "imagenet").module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as home:
        os.environ["TORCH_HOME"] = home
        folder = Path(home) / "hub" / "checkpoints"
        folder.mkdir(parents=True)
        for name in args.model or ["vgg16", "resnet50"]:
            from featx.models import get_model

            weights = get_model(name).weights
            path = folder / Path(weights.location).name
            torch.save(torchvision.models.get_model(name, weights=None).state_dict(), path)
            times: dict[str, list[float]] = {"usual": [], "featx": []}
            for _ in range(args.repeat):
                for side in ("usual", "featx"):
                    started = time.perf_counter()
                    usual(name, path) if side == "usual" else featx_way(name)
                    times[side].append(time.perf_counter() - started)
            usual_s, featx_s = (statistics.median(times[side]) for side in ("usual", "featx"))
            print(f"{name:<12} usual {usual_s:6.2f} s   featx {featx_s:6.2f} s   {usual_s / featx_s:4.1f}x "
                  f"(median of {args.repeat}; featx includes the file's sha256)", flush=True)
            rows.append({"model": name, "usual_s": usual_s, "featx_s": featx_s, "runs": times})
    RESULTS.mkdir(exist_ok=True)
    with open(RESULTS / "build.jsonl", "a") as f:
        f.write(json.dumps({"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                            "machine": cpu_name(), "torch": torch.__version__, "models": rows}) + "\n")


if __name__ == "__main__":
    main()
