"""The study, top to bottom: find images -> load a model -> extract once to the cache ->
a linear SVM per layer -> the layer-comparison table. The CLI is a thin layer over these."""

from __future__ import annotations

import json
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import joblib
import numpy as np
import sklearn
import torch
import torchvision
from rich.console import Console

from featx import __version__
from featx.data import ImageSet, find_images, read_split_file, seeded_split
from featx.errors import FeatxError
from featx.extract import LayerExtractor
from featx.models import get_backbone, load_model
from featx.progress import extraction_progress
from featx.report import merge_reports, write_table
from featx.store import FeatureStore, default_cache_root, extract_to_cache, list_stores
from featx.svm import DEFAULT_SCALING, LayerResult, split_rows, train_layer

console = Console(stderr=True, soft_wrap=True)  # a long line stays one line in a log


@dataclass
class ExtractOptions:
    """How to run the network: device, precision, batching and the cache's dtype."""

    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 32
    workers: int | None = None
    shard_size: int = 512
    dtype: str = "float32"
    channels_last: bool = True


@dataclass
class SvmOptions:
    """How to train and test: C, scaling and the split."""

    C: float | str = "auto"
    scaling: str = DEFAULT_SCALING
    train_per_class: int = 100
    seed: int = 0
    split_file: str | None = None
    splits: int = 1


def check_split(images: ImageSet, svm: SvmOptions) -> None:
    """Fail before the long extraction when the split cannot work."""
    if svm.split_file:
        mapping = read_split_file(svm.split_file)
        if not set(mapping) & set(images.paths):
            raise FeatxError(f"no path of split file {svm.split_file} is an image of {images.root}")
    elif images.fixed_split is None:
        seeded_split(images.labels, images.classes, svm.train_per_class, svm.seed)


def extract(dataset: str | Path, model: str = "vgg16", layers: list[str] | None = None,
            weights: str = "imagenet", cache: str | Path | None = None, seed: int = 0,
            options: ExtractOptions | None = None, progress: bool = True) -> FeatureStore:
    """Cache the requested layers (default: the model's standard ones) for every image of
    `dataset` in one forward pass, resuming where an earlier run stopped."""
    options = options or ExtractOptions()
    images = find_images(dataset)
    return extract_images(images, model, layers, weights, cache, seed, options, progress)


def extract_images(images: ImageSet, model: str, layers: list[str] | None, weights: str,
                   cache: str | Path | None, seed: int, options: ExtractOptions,
                   progress: bool) -> FeatureStore:
    requested = get_backbone(model).resolve_layers(layers)  # bad names fail before any download
    loaded = load_model(model, weights, seed)
    if loaded.random:
        console.print(f"[yellow]note:[/] {model} with RANDOM weights ({loaded.weights_id}); "
                      "features are a baseline, not pretrained")
    extractor = LayerExtractor(loaded, requested, options.device, options.precision,
                               options.channels_last)
    store = FeatureStore.open_for(Path(cache) if cache else default_cache_root(), images,
                                  extractor, options.dtype)
    todo = {layer.name for layer in requested if store.missing_shards(layer.name)
            or layer.name not in store.manifest["layers"]}
    names = ", ".join(layer.name for layer in requested)
    if not todo:
        console.print(f"{store.label}: {names} already cached")
        return store
    description = f"{images.name} {model} [{names}] on {extractor.device} {extractor.precision}"
    with extraction_progress(console, description, progress) as advance:
        summary = extract_to_cache(store, extractor, images, options.batch_size,
                                   options.shard_size, options.workers, advance)
    for path, reason in summary["skipped"].items():
        console.print(f"[yellow]warning:[/] skipped unreadable image {path} ({reason})")
    if summary["skipped"]:
        console.print(f"[yellow]warning:[/] {len(summary['skipped'])} images skipped; "
                      f"listed in {store.manifest_path}")
    console.print(f"{store.label}: {summary['images']} images, {names} in "
                  f"{summary['seconds']:.1f} s -> {store.folder}")
    return store


def find_store(cache: str | Path | None = None, dataset: str | None = None,
               model: str | None = None, weights: str | None = None) -> FeatureStore:
    """The one cached dataset/model matching the filters; a clear error when none or several."""
    root = Path(cache) if cache else default_cache_root()
    stores = list_stores(root)
    if not stores:
        raise FeatxError(f"no features cached under {root}; run featx extract DATASET first "
                         "(or pass --cache)")
    matching = [s for s in stores
                if (dataset is None or s.manifest["dataset"] == Path(dataset).name)
                and (model is None or s.manifest["model"] == model.lower())
                and (weights is None or s.variant.startswith(_weights_tag(weights)))]
    if not matching:
        wanted = " ".join(f"{k} {v}" for k, v in
                          (("dataset", dataset), ("model", model), ("weights", weights)) if v)
        raise FeatxError(f"the cache {root} holds no features for {wanted}; it holds: "
                         + ", ".join(s.label for s in stores))
    if len(matching) > 1:
        raise FeatxError(f"the cache {root} holds several: " + ", ".join(s.label for s in matching)
                         + "; choose one with --dataset, --model or --weights")
    return matching[0]


def _weights_tag(weights: str) -> str:
    return "file-" if Path(weights).expanduser().is_file() else weights.split(":")[0]


def default_out_dir(store: FeatureStore) -> Path:
    return Path("featx-results") / store.manifest["dataset"] / store.folder.name


def evaluate(store: FeatureStore, layers: list[str] | None = None, svm: SvmOptions | None = None,
             out_dir: str | Path | None = None,
             on_layer: Callable[[LayerResult], None] | None = None) -> dict:
    """Train and test an SVM on each cached layer (on each split when several); save each
    layer's model (first split) with joblib beside its JSON in `out_dir`; return the report."""
    svm = svm or SvmOptions()
    names = list(dict.fromkeys(layers)) if layers else store.complete_layers()
    if not names:
        raise FeatxError(f"no complete layer in the cache {store.label}; run featx extract first")
    store.check_layers(names)
    out = Path(out_dir) if out_dir else default_out_dir(store)
    out.mkdir(parents=True, exist_ok=True)
    entries, description = [], ""
    for name in names:
        data = store.read_layer(name)
        splits = split_rows(store, data.index, svm.train_per_class, svm.seed, svm.split_file,
                            svm.splits)
        description = splits[0].description
        paths = [store.manifest["paths"][i] for i in data.index]
        results = []
        for k, split in enumerate(splits):
            # scaling works in place: every split but the last gets its own copy
            part = data if k == len(splits) - 1 else replace(data, features=data.features.copy())
            result, model = train_layer(part, split, svm.C, svm.scaling, svm.seed, paths)
            results.append(result)
            if k == 0:
                joblib.dump(model, out / f"{name}.joblib")
            if on_layer:
                on_layer(result)
        seconds, shared = store.feature_time(name)
        entry = {**_combine(results), "model": store.manifest["model"],
                 "weights_id": store.manifest["weights_id"], "feature_seconds": seconds,
                 "feature_shared_with": shared}
        entries.append(entry)
        (out / f"{name}.json").write_text(json.dumps(entry, indent=1))
    return build_report(store, entries, svm, description)


def _combine(results: list[LayerResult]) -> dict:
    """One entry for a layer: the mean (and spread) over splits, predictions of all splits."""
    entry = asdict(results[0])
    if len(results) > 1:
        accuracies = [r.accuracy for r in results]
        entry.update(
            accuracy=float(np.mean(accuracies)), accuracy_std=float(np.std(accuracies)),
            split_accuracies=accuracies, svm_seconds=float(np.mean([r.svm_seconds for r in results])),
            C_per_split=[r.C for r in results], converged=all(r.converged for r in results),
            test_paths=[p for r in results for p in r.test_paths],
            y_true=[y for r in results for y in r.y_true],
            y_pred=[y for r in results for y in r.y_pred])
    return entry


def build_report(store: FeatureStore, entries: list[dict], svm: SvmOptions, split: str) -> dict:
    """Everything the table is made of: settings, versions, split and per-layer predictions."""
    m = store.manifest
    weights = "RANDOM weights" if m["weights_random"] else m["weights_id"]
    return {
        "title": f"{m['model']} on {m['dataset']} ({weights})",
        "featx_version": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "dataset": m["dataset"], "dataset_root": m["dataset_root"], "classes": m["classes"],
        "model": m["model"], "weights_id": m["weights_id"], "weights_random": m["weights_random"],
        "weights_checksum": m["weights_checksum"], "preprocess": m["preprocess"],
        "cache": str(store.folder), "extraction_runs": m["runs"],
        "split": split, "seed": svm.seed, "train_per_class": svm.train_per_class,
        "split_file": svm.split_file, "splits": svm.splits, "scaling": svm.scaling,
        "C_option": str(svm.C), "skipped": m["skipped"],
        "versions": {"featx": __version__, "python": platform.python_version(),
                     "torch": torch.__version__, "torchvision": torchvision.__version__,
                     "scikit-learn": sklearn.__version__, "numpy": np.__version__},
        "layers": entries,
    }


def run_table(dataset: str | Path, model: str | list[str] = "vgg16",
              layers: list[str] | None = None, weights: str = "imagenet",
              cache: str | Path | None = None, out_dir: str | Path | None = None,
              extract_options: ExtractOptions | None = None, svm: SvmOptions | None = None,
              progress: bool = True, on_layer: Callable[[LayerResult], None] | None = None,
              ) -> tuple[dict, dict[str, Path]]:
    """The whole study: for each model, extract every requested layer in one pass (or reuse
    the cache) and train an SVM per layer; one table written as Markdown, CSV and JSON."""
    svm = svm or SvmOptions()
    models = [model] if isinstance(model, str) else list(dict.fromkeys(model))
    images = find_images(dataset)
    check_split(images, svm)
    backbones = [get_backbone(name) for name in models]  # unknown names fail before any work
    for backbone in backbones:
        backbone.resolve_layers(layers)
    reports = []
    for backbone in backbones:
        store = extract_images(images, backbone.name, layers, weights, cache, svm.seed,
                               extract_options or ExtractOptions(), progress)
        names = [layer.name for layer in backbone.resolve_layers(layers)]
        if len(models) == 1:
            out = Path(out_dir) if out_dir else default_out_dir(store)
            model_dir = out
        else:
            out = Path(out_dir) if out_dir else (default_out_dir(store).parent /
                                                 f"{'+'.join(models)}-{store.variant}")
            model_dir = out / backbone.name
        reports.append(evaluate(store, names, svm, model_dir, on_layer))
    report = reports[0] if len(reports) == 1 else merge_reports(reports)
    return report, write_table(report, out)
