"""The study, top to bottom: find images -> extract once to the cache (featx.extract.run) -> a probe
per layer on each split -> the Report that tables, figures and the page are drawn from."""

from __future__ import annotations

import gc
import json
import logging
import math
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import joblib
import numpy as np

from featx import __version__
from featx.cache.store import FeatureStore, default_cache_root, list_stores
from featx.data.images import ImageSet, Split, find_images, fixed_split, read_split_file, seeded_split
from featx.errors import FeatxError, OptionError
from featx.extract.ranks import Ranks
from featx.extract.run import ExtractOptions, Progress, extract_images, logged_progress
from featx.models import get_model
from featx.options import (
    DEFAULT_MEMORY,
    Scaling,
    Solver,
    describe_bytes,
    parse_device,
    parse_memory,
    resolve_device,
    writable_folder,
)
from featx.probes import ProbeOptions, ProbeResult, get_probe, parse_probe_params, parse_probes
from featx.probes.linear import train_gram
from featx.probes.stream import LayerStream
from featx.probes.threads import check_threads
from featx.report.similarity import Similarity, similarity
from featx.report.tables import LayerReport, ModelIdentity, ProbeScore, Report, write_table

__all__ = ["ExtractOptions", "ProbingOptions", "evaluate", "extract", "find_store", "run_table"]


log = logging.getLogger(__name__)
C_RANGE = (1e-6, 1e6)  # values of C a linear SVM on l2-scaled features can tell apart


@dataclass(frozen=True)
class ProbingOptions:
    """How to train and test: the probes and their parameters, C, scaling, the split, the solver,
    the memory budget and the device; checked once when made. `probe_params` takes
    `PROBE.PARAM=VALUE` items (or a mapping) and holds, once made, every probe's parameters."""

    C: float | str = "auto"
    scaling: Scaling = Scaling.L2
    train_per_class: int | None = None  # None: 100, or half of the smallest class (see seeded_split)
    seed: int = 0
    split_file: str | None = None
    splits: int = 1
    probe: str | tuple[str, ...] = "svm"  # one or several, comma-separated: a column each
    solver: Solver = Solver.AUTO
    memory: str | int = DEFAULT_MEMORY
    device: str = "auto"
    probe_params: Sequence[str] | Mapping[str, object] = ()
    threads: int | None = None  # at most this many threads per probe (None: torch's own count)

    def __post_init__(self) -> None:
        if self.C != "auto":
            try:
                value = float(self.C)
            except (TypeError, ValueError):
                raise OptionError("C", f"must be a positive number or auto, not {self.C!r}") from None
            if not math.isfinite(value) or value <= 0:
                raise OptionError("C", f"must be a positive finite number or auto, not {self.C!r}")
            if not C_RANGE[0] <= value <= C_RANGE[1]:
                raise OptionError("C", f"must lie between {C_RANGE[0]:g} and {C_RANGE[1]:g} (or be auto), "
                                  f"not {value:g}: beyond that the solver only runs longer")
            object.__setattr__(self, "C", value)
        object.__setattr__(self, "scaling", Scaling.parse(self.scaling, "scaling"))
        object.__setattr__(self, "solver", Solver.parse(self.solver, "solver"))
        for name in ("train_per_class", "splits"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise OptionError(name, f"must be at least 1, not {getattr(self, name)}")
        object.__setattr__(self, "probe", parse_probes(self.probe))
        if not (isinstance(self.probe_params, Mapping) and set(self.probe_params) == set(self.probe)):
            object.__setattr__(self, "probe_params", parse_probe_params(self.probe_params, self.probe))
        object.__setattr__(self, "memory", parse_memory(self.memory))
        object.__setattr__(self, "threads", check_threads(self.threads))
        object.__setattr__(self, "device", parse_device(self.device))
        resolve_device(self.device)  # a GPU asked for where there is none: said before any work
        if self.split_file:
            read_split_file(self.split_file)  # exists, is a CSV of path,label,split: checked now

    def probe_options(self, probe: str) -> ProbeOptions:
        """What the probe `probe` is given: the shared settings and its own parameters."""
        return ProbeOptions(C=self.C, seed=self.seed, solver=self.solver, memory=self.memory,
                            params=self.probe_params.get(probe, {}), threads=self.threads)


def check_split(images: ImageSet, probing: ProbingOptions) -> None:
    """Fail before the long extraction when the split cannot work."""
    if probing.split_file:
        mapping = read_split_file(probing.split_file)
        if not set(mapping) & set(images.paths):
            raise FeatxError(f"no path of split file {probing.split_file} is an image of {images.root}")
    elif images.fixed_split is None:
        seeded_split(images.labels, images.classes, probing.train_per_class, seed=probing.seed)


def extract(dataset: str | Path, model: str = "vgg16", layers: list[str] | None = None, *,
            weights: str = "imagenet", cache: str | Path | None = None, seed: int = 0,
            options: ExtractOptions | None = None, progress: Progress | None = logged_progress,
            ) -> FeatureStore:
    """Cache the requested layers (default: the model's standard ones) for every image of
    `dataset` in one forward pass, resuming where an earlier run stopped."""
    return extract_images(find_images(dataset), model, layers, weights=weights, cache=cache, seed=seed,
                          options=options, progress=progress)


def find_store(cache: str | Path | None = None, dataset: str | None = None,
               model: str | None = None, *, weights: str | None = None,
               tta: str | None = None, dtype: str | None = None, decode: str | None = None,
               ) -> FeatureStore:
    """The one cached dataset/model/weights matching the filters; a clear error when none or
    several. `weights` is matched as `imagenet`, `random`, a tag, a full name or a file; `tta`,
    `dtype` and `decode` as the cache was made (caches differing only there sit side by side)."""
    root = Path(cache) if cache else default_cache_root()
    if root.exists() and not root.is_dir():
        raise FeatxError(f"the cache {root} is a file, not a folder")
    stores, broken = list_stores(root)
    for reason in broken.values():
        log.warning(f"{reason}; passed over")
    if not stores:
        raise FeatxError(f"no features cached under {root}; run featx extract DATASET first")
    folder = Path(dataset).expanduser().resolve() if dataset and Path(dataset).expanduser().is_dir() else None
    matching = [s for s in stores
                if (dataset is None or (s.manifest["dataset_root"] == str(folder) if folder
                                        else s.manifest["dataset"] == dataset))
                and (model is None or s.manifest["model"] == model.strip())
                and (tta is None or s.manifest.get("tta", "none") == tta)
                and (dtype is None or s.manifest["dtype"] == dtype)
                and (decode is None or s.manifest.get("decode", "pil") == decode)
                and (weights is None or s.holds_weights(weights))]
    if not matching:
        asked = (("dataset", dataset), ("model", model), ("weights", weights), ("tta", tta), ("dtype", dtype),
                 ("decode", decode))
        wanted = " ".join(f"{k} {v}" for k, v in asked if v)
        raise FeatxError(f"the cache {root} holds no features for {wanted}; it holds: "
                         + ", ".join(s.label for s in stores))
    if len(matching) > 1:
        raise FeatxError(f"the cache {root} holds several: " + ", ".join(s.label for s in matching)
                         + "; choose one with --dataset, --model, --weights, --tta, --dtype or --decode")
    return matching[0]


def check_dataset(store: FeatureStore, images: ImageSet | None = None) -> None:
    """Refuse to score a cache whose dataset changed since extraction, saying what changed; a
    dataset folder that is not there (a cache moved alone) is said, then scored as extracted.
    `images` is a scan made already in this run (the dataset is scanned here otherwise)."""
    root = Path(store.manifest["dataset_root"])
    if store.manifest.get("arrays"):  # features made elsewhere (FeatureStore.for_arrays): no images
        return
    if not (root.parent if root.name.endswith(".tar") else root).is_dir():  # tar shards: their folder
        log.warning(f"the dataset folder {root} is not there: {store.label} is "
                      "scored as it was extracted, unchecked")
        return
    changes = store.compare_images(images or find_images(root))
    if changes:
        raise FeatxError(f"the dataset {root} changed since {store.label} was extracted: "
                         f"{changes.describe()}; run featx extract on it again (only the shards "
                         "concerned are redone)")


def default_out_dir(store: FeatureStore) -> Path:
    return Path("featx-results") / store.manifest["dataset"] / store.folder.name


def split_rows(store: FeatureStore, index: np.ndarray, probing: ProbingOptions) -> list[Split]:
    """Train/test rows (positions in `index`) for the cached images: one split from a split file
    or the dataset's own train/ and test/ folders, else `splits` seeded per-class splits."""
    once = "; one fixed split, so more splits were not drawn" if probing.splits > 1 else ""
    paths = [store.manifest["paths"][i] for i in index]
    if probing.split_file:
        mapping = read_split_file(probing.split_file)
        names = [mapping.get(p, "") for p in paths]
        unknown = len(set(mapping) - set(paths))
        if not any(names):
            raise FeatxError(f"no path of split file {probing.split_file} is among the cached images of "
                             f"{store.label} (paths must be relative to the dataset folder)")
        note = f"; {unknown} listed images not in the cache" if unknown else ""
        return [fixed_split(names, f"split file {probing.split_file}{note}{once}")]
    if store.manifest.get("fixed_split"):
        names = [store.manifest["fixed_split"][i] for i in index]
        return [fixed_split(names, f"the dataset's own train/ and test/ folders{once}")]
    labels = store.labels[index]
    seeds = range(probing.seed, probing.seed + probing.splits)
    parts = [seeded_split(labels, store.classes, probing.train_per_class, seed=s) for s in seeds]
    if probing.splits == 1:
        return parts
    per_class = parts[0].description.split(", seed ")[0]
    last = probing.seed + probing.splits - 1
    description = (f"{probing.splits} random splits (seeds {probing.seed}..{last}) of {per_class}, the "
                   "rest for test")
    return [Split(p.train, p.test, description) for p in parts]


def evaluate(store: FeatureStore, layers: list[str] | None = None, probing: ProbingOptions | None = None,
             *, out_dir: str | Path | None = None,
             on_layer: Callable[[ProbeResult], None] | None = None,
             images: ImageSet | None = None) -> Report:
    """Train and test the probe on each cached layer (on each split when several); save each
    layer's model (first split) with joblib beside its JSON in `out_dir`; return the report.
    `images` is the dataset as scanned already in this run, to check the cache against."""
    probing = probing or ProbingOptions()
    names = list(dict.fromkeys(layers)) if layers else store.complete_layers()
    if not names:
        raise FeatxError(f"no complete layer in the cache {store.label}; run featx extract first")
    store.check_layers(layer_parts(names))
    check_dataset(store, images)
    out = writable_folder(Path(out_dir) if out_dir else default_out_dir(store), "out")
    lead = Ranks.from_env().lead  # under torchrun every rank probes, rank 0 writes
    entries, description = [], ""
    for name in names:
        stream = LayerStream(store, name, probing.scaling, device=probing.device)
        splits = split_rows(store, stream.index, probing)
        description = splits[0].description
        paths = [store.manifest["paths"][i] for i in stream.index]
        results: dict[str, list[ProbeResult]] = {probe: [] for probe in probing.probe}
        for k, split in enumerate(splits):
            for probe in probing.probe:
                result, model = run_probe(probe, stream, split, options=probing.probe_options(probe))
                result.test_paths = [paths[i] for i in split.test]
                results[probe].append(result)
                if k == 0 and model is not None and lead:
                    joblib.dump(model, out / (f"{name}.joblib" if probe == probing.probe[0]
                                              else f"{name}.{probe}.joblib"))
                if on_layer:
                    on_layer(result)
        seconds, shared = combined_feature_time(store, name)
        first, *others = probing.probe
        entry = LayerReport.from_results(results[first], store.manifest["model"], store.manifest["weights"],
                                         feature_seconds=seconds, shared=shared)
        entry.other_probes = [ProbeScore.from_results(results[probe]) for probe in others]
        entries.append(entry)
        if lead:
            (out / f"{name}.json").write_text(json.dumps(asdict(entry), indent=1))
    return build_report(store, entries, probing, split=description)


def run_probe(probe: str, stream: LayerStream, split: Split, *, options: ProbeOptions):
    """One probe on one layer; a device out of memory is a clear error naming a budget that fits."""
    import torch

    try:
        return get_probe(probe).train(stream, split, options)
    except torch.OutOfMemoryError:
        on_gpu = stream.device.startswith("cuda")
        free = torch.cuda.mem_get_info(torch.device(stream.device))[0] if on_gpu else 0
        fits = (f"--memory {describe_bytes(int(free * 0.5))} would fit the {describe_bytes(free)} it has "
                "free") if free else "a smaller --memory would fit"
        raise FeatxError(f"{stream.device} ran out of memory for the {probe} probe on layer {stream.name} "
                         f"with --memory {describe_bytes(options.memory)}; {fits}") from None


def layer_parts(names: list[str]) -> list[str]:
    """The cached layers that `names` need: a combination `pool5+relu7` needs both."""
    return list(dict.fromkeys(part for name in names for part in name.split("+")))


def combined_feature_time(store: FeatureStore, name: str) -> tuple[float, list[str]]:
    """Extraction time of a layer, or of every pass a combination's layers came from."""
    times = [store.feature_time(part) for part in name.split("+")]
    seconds = {tuple(shared): s for s, shared in times}  # a pass shared by two parts counts once
    shared = list(dict.fromkeys(layer for _, group in times for layer in group))
    return sum(seconds.values()), shared


def layer_similarity(stores: list[FeatureStore], layers: list[str] | None = None,
                     memory: str | int = DEFAULT_MEMORY, *, device: str = "auto") -> Similarity:
    """Linear CKA between every pair of cached layers of these caches (one dataset), on the
    images all of them hold; names are `model/layer` when there are several models. Each layer
    is streamed into its n x n Gram matrix within `memory`."""
    budget, device = parse_memory(memory), parse_device(device)
    roots = {store.manifest["dataset_root"] for store in stores}
    if len(roots) > 1:
        raise FeatxError("layer similarity compares layers on the same images; these caches hold "
                         f"{len(roots)} datasets: {', '.join(sorted(roots))}")
    streams: dict[str, LayerStream] = {}
    for store in stores:
        names = layers or store.complete_layers()
        store.check_layers(names)
        check_dataset(store)
        for name in names:
            label = f"{store.manifest['model']}/{name}" if len(stores) > 1 else name
            streams[label] = LayerStream(store, name, "none", device=device)
    paths = {label: [s.store.manifest["paths"][i] for i in s.index] for label, s in streams.items()}
    common = sorted(set.intersection(*(set(p) for p in paths.values())))
    grams = {}
    for label, stream in streams.items():  # each layer's Gram matrix on the common images, streamed
        position = {path: i for i, path in enumerate(paths[label])}
        rows = np.array(sorted(position[path] for path in common), dtype=np.int64)
        to_common = np.argsort([paths[label][i] for i in rows])  # the stream's order -> common's
        gram = train_gram(stream, rows, budget)[0].cpu().numpy()
        grams[label] = gram[np.ix_(to_common, to_common)]
    return similarity(grams, grams=True)


def build_report(store: FeatureStore, entries: list[LayerReport], probing: ProbingOptions,
                 *, split: str) -> Report:
    """Everything the table is made of: settings, versions, split and per-layer predictions."""
    import sklearn
    import torch
    import torchvision

    m = store.manifest
    identity = ModelIdentity(m["model"], m["weights"], m["weights_random"], m["weights_checksum"],
                             m["preprocess"], str(store.folder), m["runs"])
    weights = f"RANDOM weights {m['weights']}" if m["weights_random"] else m["weights"]
    return Report(
        title=f"{m['model']} on {m['dataset']} ({weights})", dataset=m["dataset"],
        dataset_root=m["dataset_root"], classes=m["classes"], models=[identity], layers=entries,
        split=split, seed=probing.seed, train_per_class=probing.train_per_class,
        split_file=probing.split_file, splits=probing.splits, scaling=probing.scaling,
        C_option=str(probing.C), probes=list(probing.probe), solver=probing.solver,
        probe_params={name: dict(values) for name, values in probing.probe_params.items() if values},
        featx_version=__version__,
        probe_info={name: get_probe(name).describe() for name in probing.probe},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), skipped=m["skipped"],
        versions={"featx": __version__, "python": platform.python_version(),
                  "torch": torch.__version__, "torchvision": torchvision.__version__,
                  "scikit-learn": sklearn.__version__, "numpy": np.__version__})


def run_table(dataset: str | Path, model: str | list[str] = "vgg16",
              layers: list[str] | None = None, *, weights: str = "imagenet",
              cache: str | Path | None = None, out_dir: str | Path | None = None,
              extract_options: ExtractOptions | None = None, probing: ProbingOptions | None = None,
              progress: Progress | None = logged_progress,
              on_layer: Callable[[ProbeResult], None] | None = None,
              ) -> tuple[Report, dict[str, Path]]:
    """The whole study: for each model, extract every requested layer in one pass (or reuse
    the cache) and probe each layer; one table written as Markdown, CSV and JSON."""
    probing = probing or ProbingOptions()
    models = [model] if isinstance(model, str) else list(dict.fromkeys(model))
    images = find_images(dataset)
    check_split(images, probing)
    specs = [get_model(name, weights, probing.seed) for name in models]  # bad names fail before any work
    parts = layer_parts(layers) if layers else None
    for spec in specs:
        spec.resolve_layers(parts)
    if out_dir:
        writable_folder(out_dir, "out")
    reports = []
    for spec in specs:
        store = extract_images(images, spec.name, parts, weights=weights, cache=cache, seed=probing.seed,
                               options=extract_options, progress=progress)
        gc.collect()  # the traced network holds reference cycles: free it before the probes run
        singles = [name for name in layers or [] if "+" not in name]
        names = [layer.name for layer in spec.resolve_layers(singles)] if singles or not layers else []
        names += [name for name in layers or [] if "+" in name]  # combinations after the layers
        if len(specs) == 1:
            out = model_dir = Path(out_dir) if out_dir else default_out_dir(store)
        else:
            joined = "+".join(s.weights.folder for s in specs)
            out = Path(out_dir) if out_dir else default_out_dir(store).parent / joined
            model_dir = out / spec.weights.folder
        reports.append(evaluate(store, names, probing, out_dir=model_dir, on_layer=on_layer, images=images))
    report = reports[0] if len(reports) == 1 else Report.merge(reports)
    return report, write_table(report, out) if Ranks.from_env().lead else {}
