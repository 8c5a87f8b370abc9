"""One side of benchmarks/extract.py's whole-table comparison, in a process of its own, so that
each side's time includes starting Python and importing what it needs. Only the standard library
is imported before the clock starts; the stages are timed and written as JSON.

    python benchmarks/table_run.py featx OUT.json -- table DATASET --model vgg16 ...
    python benchmarks/table_run.py usual OUT.json --dataset DATASET --model vgg16 --weights random \\
        --train-per-class 10

featx: the `featx table` command as a user runs it (featx.cli.main.main), its stages timed by
wrapping the functions that do them: imports, the dataset scan, building the network, tracing it,
extraction (decoding, forward pass and writing overlap there), the probes (with the models and
per-layer JSON they save) and the reports (tables; figures, matplotlib's import included).

usual: the reference study's way: for each layer one full float32 forward pass with a forward
hook, images decoded and preprocessed with PIL in the main process, batch 32, features in memory;
then scikit-learn's LinearSVC() (C = 1, fixed) per layer on the raw features, on the same seeded
split (`--train-per-class` images per class, seed 0) that featx's table uses.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

STARTED = time.time()  # as close to the process's start as Python lets a script be


class Clock:
    """Seconds spent in wrapped functions, by stage (a call inside another stage's call counts in
    both; the stages wrapped here do not nest)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def wrap(self, module, name: str, stage: str) -> None:
        function = getattr(module, name)

        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - started

        setattr(module, name, timed)


def run_featx(argv: list[str]) -> dict:
    """`featx ARGV` in this process, its stages timed."""
    clock = Clock()
    began = time.perf_counter()
    import featx.cli.app  # what `featx` imports before a command runs (typer, rich)
    import featx.study  # what the table command imports (torch, torchvision, scikit-learn, h5py)

    clock.seconds["imports"] = time.perf_counter() - began
    import featx.extract.forward as forward
    import featx.extract.run as run
    from featx.cli.main import main as featx_main

    clock.wrap(featx.study, "find_images", "dataset scan")
    clock.wrap(run, "load_model", "network built")
    clock.wrap(forward, "LayerExtractor", "graph traced")  # run.py imports it when it builds one
    clock.wrap(run, "extract_to_cache", "extraction")
    clock.wrap(featx.study, "evaluate", "probes")
    clock.wrap(featx.study, "write_table", "tables")
    clock.wrap(featx.cli.app, "_write_figures", "figures")
    code = featx_main(argv)
    clock.seconds["command"] = time.perf_counter() - began - clock.seconds["imports"]
    return {"code": code, "stages": clock.seconds}


def usual_features(images, model_name: str, weights: str, layers: list[str] | None = None,
                   device: str = "cpu") -> tuple[dict, float, float]:
    """The reference way's features: one full forward pass per layer with a hook, fp32, PIL in the
    main process, batch 32, on `device`, kept in memory. Returns them, the seconds to build the
    network and the seconds of the passes. A layer that is not a module's output (a pooled view)
    has no hook point: its node is traced alone, a pass that stops there (which can only make
    this side faster)."""
    import numpy as np
    import torch
    from torchvision.models.feature_extraction import create_feature_extractor

    from featx.data.images import load_image
    from featx.data.preprocess import normalize, prepare
    from featx.extract.forward import to_vectors
    from featx.models import load_model
    from featx.options import resolve_device

    started = time.perf_counter()
    model = load_model(model_name, weights)
    target = resolve_device(device)
    module, preprocess = model.module.eval().to(target), model.preprocess
    built = time.perf_counter() - started
    sync = torch.cuda.synchronize if target.type == "cuda" else (lambda: None)
    started = time.perf_counter()
    features = {}
    modules = dict(module.named_modules())
    for layer in model.spec.resolve_layers(layers):
        captured: list = []
        if layer.node in modules:
            def hook(_module, _inputs, output, layer=layer, captured=captured):
                captured.append(to_vectors(layer, output).float().cpu().numpy())

            handle = modules[layer.node].register_forward_hook(hook)
            forward = module
        else:
            handle = None
            traced = create_feature_extractor(module, return_nodes=[layer.node])

            def forward(x, layer=layer, captured=captured, traced=traced):
                captured.append(to_vectors(layer, traced(x)[layer.node]).float().cpu().numpy())
        try:
            for start in range(0, len(images), 32):
                paths = images.paths[start:start + 32]
                batch = torch.stack([prepare(preprocess, load_image(images.root / p)[0]) for p in paths])
                with torch.no_grad():
                    forward(normalize(preprocess, batch.to(target)))
        finally:
            if handle is not None:
                handle.remove()
        sync()
        features[layer.name] = np.concatenate(captured)
    return features, built, time.perf_counter() - started


def run_usual(args: argparse.Namespace) -> dict:
    """The reference way, end to end: imports, network, hooked passes, LinearSVC per layer."""
    began = time.perf_counter()
    import torch  # noqa: F401 - what the passes need, imported within this side's imports
    import torchvision.models.feature_extraction  # noqa: F401
    from sklearn.svm import LinearSVC

    import featx.models  # noqa: F401 - the network's definition and its preprocessing
    from featx.data.scan import find_images
    from featx.data.splits import seeded_split

    stages = {"imports": time.perf_counter() - began}
    images = find_images(args.dataset)
    features, stages["network built"], stages["extraction"] = usual_features(images, args.model, args.weights)
    split = seeded_split(images.labels, images.classes, args.train_per_class, seed=0)
    y = images.labels
    layers = {}
    for name, x in features.items():
        started = time.perf_counter()
        svm = LinearSVC().fit(x[split.train], y[split.train])
        accuracy = float((svm.predict(x[split.test]) == y[split.test]).mean())
        layers[name] = {"seconds": time.perf_counter() - started, "accuracy": accuracy, "dim": x.shape[1]}
        print(f"| {name} | {accuracy:.4f} | {x.shape[1]} | {layers[name]['seconds']:.2f} s |", flush=True)
    stages["probes"] = sum(layer["seconds"] for layer in layers.values())
    return {"code": 0, "stages": stages, "layers": layers, "precision": "fp32"}


def main() -> None:
    side, out, rest = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]
    if side == "featx":
        record = run_featx(rest[1:] if rest[:1] == ["--"] else rest)
    elif side == "usual":
        parser = argparse.ArgumentParser()
        parser.add_argument("--dataset", required=True)
        parser.add_argument("--model", default="vgg16")
        parser.add_argument("--weights", default="random")
        parser.add_argument("--train-per-class", type=int, default=10)
        record = run_usual(parser.parse_args(rest))
    else:
        raise SystemExit(f"usage: {sys.argv[0]} featx|usual OUT.json ...")
    record["started"] = STARTED
    record["ended"] = time.time()
    out.write_text(json.dumps(record))


if __name__ == "__main__":
    main()
