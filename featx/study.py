"""The study, top to bottom: find images -> extract once to the cache (featx.extract.run) -> a probe
per layer on each split -> the Report that tables, figures and the page are drawn from."""

from __future__ import annotations

import gc
import json
import logging
import math
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import joblib
import numpy as np

from featx import __version__
from featx.cache.store import FeatureStore, default_cache_root, list_stores
from featx.data.images import ImageSet
from featx.data.scan import find_images
from featx.data.splits import Split, fixed_split, nested_subsets, parse_sizes, read_split_file, seeded_split
from featx.errors import FeatxError, OptionError
from featx.extract.ranks import Ranks
from featx.extract.run import ExtractOptions, Progress, extract_images, logged_progress
from featx.models import get_model
from featx.options import (
    C_RANGE,
    DEFAULT_MEMORY,
    MAX_PER_CLASS,
    MAX_SEED,
    MAX_SPLITS,
    Scaling,
    Solver,
    Verify,
    check_count,
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
from featx.report.tables import (
    CurvePoint,
    LayerReport,
    ModelIdentity,
    ProbeScore,
    Report,
    write_predictions,
    write_table,
)

__all__ = ["ExtractOptions", "ProbingOptions", "evaluate", "extract", "find_store", "run_table"]


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProbingOptions:
    """How to train and test: the probes and their parameters, C, scaling, the split, the solver,
    the memory budget and the device; checked once when made. `probe_params` takes
    `PROBE.PARAM=VALUE` items (or a mapping) and holds, once made, every probe's parameters.
    `train_per_class` takes one size or several (`5,10,25`: a learning curve, `curve` once made,
    the table's own split training on the largest)."""

    C: float | str = "auto"
    scaling: Scaling = Scaling.L2
    train_per_class: int | str | Sequence[int] | None = None  # None: 100, or half of the smallest class
    seed: int = 0
    split_file: str | None = None
    splits: int = 1
    probe: str | tuple[str, ...] = "svm"  # one or several, comma-separated: a column each
    solver: Solver = Solver.AUTO
    memory: str | int = DEFAULT_MEMORY
    device: str = "auto"
    probe_params: Sequence[str] | Mapping[str, object] = ()
    verify: Verify | None = None  # how the cache's images are recognised; None: as the cache says
    threads: int | None = None  # at most this many threads per probe (None: torch's own count)
    curve: tuple[int, ...] = ()  # the sizes of the learning curve (from train_per_class)

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
        sizes = parse_sizes(self.train_per_class, MAX_PER_CLASS)
        object.__setattr__(self, "train_per_class", sizes[-1] if sizes else None)
        object.__setattr__(self, "curve", sizes if len(sizes) > 1 else ())
        check_count("splits", self.splits, MAX_SPLITS)
        check_count("seed", self.seed, MAX_SEED, least=0)
        object.__setattr__(self, "probe", parse_probes(self.probe))
        if not (isinstance(self.probe_params, Mapping) and set(self.probe_params) == set(self.probe)):
            object.__setattr__(self, "probe_params", parse_probe_params(self.probe_params, self.probe))
        object.__setattr__(self, "memory", parse_memory(self.memory))
        object.__setattr__(self, "threads", check_threads(self.threads))
        object.__setattr__(self, "device", parse_device(self.device))
        resolve_device(self.device)  # a GPU asked for where there is none: said before any work
        if self.verify is not None:
            object.__setattr__(self, "verify", Verify.parse(self.verify, "verify"))
        if self.split_file:
            read_split_file(self.split_file)  # exists, is a CSV of path,label,split: checked now

    def probe_options(self, probe: str) -> ProbeOptions:
        """What the probe `probe` is given: the shared settings and its own parameters."""
        return ProbeOptions(C=self.C, seed=self.seed, solver=self.solver, memory=self.memory,
                            params=self.probe_params.get(probe, {}), threads=self.threads)


def check_split(images: ImageSet, probing: ProbingOptions) -> None:
    """Fail before the long extraction when the split cannot work."""
    labels = images.labels
    if probing.split_file:
        split_file = read_split_file(probing.split_file)
        codes = split_file.codes_for(images.paths)
        if not codes.any():
            raise FeatxError(f"no path of split file {probing.split_file} is an image of {images.root}")
        fixed_split(codes, f"split file {probing.split_file}").check(labels, images.classes)
    elif images.fixed_split is not None:
        codes = np.array([1 if s == "train" else 2 for s in images.fixed_split], dtype=np.uint8)
        fixed_split(codes, "the dataset's own train/ and test/ folders").check(labels, images.classes)
    else:
        seeded_split(labels, images.classes, probing.train_per_class, seed=probing.seed)


def extract(dataset: str | Path, model: str = "vgg16", layers: list[str] | None = None, *,
            weights: str = "imagenet", cache: str | Path | None = None, seed: int = 0,
            options: ExtractOptions | None = None, progress: Progress | None = logged_progress,
            ) -> FeatureStore:
    """Cache the requested layers (default: the model's standard ones) for every image of
    `dataset` in one forward pass, resuming where a previous extraction stopped."""
    return extract_images(find_images(dataset), model, layers, weights=weights, cache=cache, seed=seed,
                          options=options, progress=progress)


def find_store(cache: str | Path | None = None, dataset: str | None = None,
               model: str | None = None, *, weights: str | None = None,
               tta: str | None = None, dtype: str | None = None, decode: str | None = None,
               ) -> FeatureStore:
    """The one cached dataset/model/weights matching the filters; a clear error when none or
    several. `weights` is matched as `imagenet`, `random`, a tag, a full name or a file; `tta`,
    `dtype` and `decode` as the cache was made (caches differing only there sit side by side).
    An option left out means its default: where the caches left differ only in options left out,
    the one made with their defaults (imagenet weights, no tta, this device's dtype and decoder)
    is chosen."""
    root = Path(cache) if cache else default_cache_root()
    if root.exists() and not root.is_dir():
        raise FeatxError(f"the cache {root} is a file, not a folder")
    stores, broken = list_stores(root)
    for reason in broken.values():
        log.warning(f"{reason}; passed over")
    if not stores:
        raise FeatxError(f"no features cached under {root}; run featx extract DATASET first")
    folder = Path(dataset).expanduser().resolve() if dataset and Path(dataset).expanduser().is_dir() else None
    chosen = {"tta": tta, "dtype": dtype, "decode": decode}
    matching = [s for s in stores
                if (dataset is None or (s.manifest.dataset_root == str(folder) if folder
                                        else s.manifest.dataset == dataset))
                and (model is None or s.model == model.strip())
                and all(value is None or getattr(s.key, name) == value for name, value in chosen.items())
                and (weights is None or s.holds_weights(weights))]
    if not matching:
        asked = (("dataset", dataset), ("model", model), ("weights", weights), *chosen.items())
        wanted = " ".join(f"{k} {v}" for k, v in asked if v)
        raise FeatxError(f"the cache {root} holds no features for {wanted}; it holds: "
                         + ", ".join(s.label for s in stores))
    for is_default in _default_variant(weights is None, chosen):  # an option left out means its default
        if len(matching) > 1 and any(map(is_default, matching)):
            matching = [s for s in matching if is_default(s)]
    if len(matching) > 1:
        differ = [flag for flag, value in (("--dataset", lambda s: s.manifest.dataset_root),
                                           ("--model", lambda s: s.model),
                                           ("--weights", lambda s: s.key.weights),
                                           ("--tta", lambda s: s.key.tta), ("--dtype", lambda s: s.key.dtype),
                                           ("--decode", lambda s: s.key.decode))
                  if len({value(s) for s in matching}) > 1]
        raise FeatxError(f"the cache {root} holds several: " + ", ".join(s.label for s in matching)
                         + f"; choose one with {' or '.join(differ)}")
    return matching[0]


def _default_variant(weights_left_out: bool, chosen: dict[str, str | None]) -> list[Callable]:
    """For each option left out, whether a cache was made with its default."""
    tests: list[Callable] = []
    if weights_left_out:
        tests.append(lambda s: s.manifest.imagenet_default)
    device = resolve_device("auto")
    auto = {"tta": "none", "dtype": "float16" if device.type == "cuda" else "float32",
            "decode": "device" if device.type == "cuda" else "pil"}
    for name, value in chosen.items():
        if value is None:
            tests.append(lambda s, name=name: getattr(s.key, name) == auto[name])
    return tests


def check_dataset(store: FeatureStore, images: ImageSet | None = None, verify: str | None = None) -> None:
    """Refuse to score a cache whose dataset changed since extraction, saying what changed, by the
    cache's own verification (or `verify`, for this run); a dataset folder that is not there (a
    cache moved alone) is said, then scored as extracted. `images` is a scan made already in this
    run (the dataset is scanned here otherwise)."""
    root = Path(store.manifest.dataset_root)
    if store.manifest.arrays:  # features made elsewhere (FeatureStore.for_arrays): no images
        return
    if not (root.parent if root.name.endswith(".tar") else root).is_dir():  # tar shards: their folder
        log.warning(f"the dataset folder {root} is not there: {store.label} is "
                    "scored as it was extracted, unchecked")
        return
    changes = store.compare_images(images or find_images(root), verify)
    if changes:
        raise FeatxError(f"the dataset {root} changed since {store.label} was extracted: "
                         f"{changes.describe()}; run featx extract on it again (only the shards "
                         "concerned are redone)")


@dataclass(frozen=True)
class Verification:
    """What `featx verify` found in one cache: per layer its shard count and {shard: why} for the
    damaged ones, and how the dataset differs from the record ("" when it does not)."""

    layers: dict[str, tuple[int, dict[int, str]]]
    images: str


def verify_cache(store: FeatureStore, verify: str | None = None) -> Verification:
    """Read every shard of every layer whole against its checksum (noting the damaged ones, so that
    the next extraction writes them anew), and compare the dataset with the cache's record,
    reading every image under hash verification."""
    verify = Verify.parse(verify, "verify") if verify is not None else None  # before any work
    layers = {name: (len(store.shard_ranges(name)) - len(store.missing_shards(name)),
                     store.damaged_shards(name, thorough=True)) for name in store.manifest.layers}
    root = Path(store.manifest.dataset_root)
    images = ""
    if not store.manifest.arrays:
        if (root.parent if root.name.endswith(".tar") else root).is_dir():
            images = store.compare_images(find_images(root), verify, reread=True).describe()
        else:
            images = f"the dataset folder {root} is not there"
    return Verification(layers, images)


def default_out_dir(store: FeatureStore) -> Path:
    return Path("featx-results") / store.manifest.dataset / store.folder.name


def split_rows(store: FeatureStore, index: np.ndarray, probing: ProbingOptions) -> list[Split]:
    """Train/test rows (positions in `index`) for the cached images: one split from a split file
    or the dataset's own train/ and test/ folders, else `splits` seeded per-class splits; each
    checked so that a probe can learn from it and be scored on it."""
    once = "; one fixed split, so more splits were not drawn" if probing.splits > 1 else ""
    labels = store.labels[index]
    if probing.split_file:
        split_file = read_split_file(probing.split_file)
        rows = store.rows.find(split_file.paths)
        if (rows < 0).any():  # a name as reports show it
            from featx.data.splits import unshown

            retry = np.flatnonzero(rows < 0)
            rows[retry] = store.rows.find([unshown(split_file.paths[k]) for k in retry])
        by_row = np.zeros(store.n_images, dtype=np.uint8)
        by_row[rows[rows >= 0]] = split_file.codes[rows >= 0]
        codes = by_row[index]
        if not codes.any():
            raise FeatxError(f"no path of split file {probing.split_file} is among the cached images of "
                             f"{store.label} (paths must be relative to the dataset folder)")
        unknown = int((rows < 0).sum() + (by_row.astype(bool).sum() - codes.astype(bool).sum()))
        note = f"; {unknown} listed images not in the cache" if unknown else ""
        split = fixed_split(codes, f"split file {probing.split_file}{note}{once}")
        return [split.check(labels, store.classes)]
    if store.manifest.fixed_split:
        codes = store.rows.split_codes(index)
        split = fixed_split(codes, f"the dataset's own train/ and test/ folders{once}")
        return [split.check(labels, store.classes)]
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
             images: ImageSet | None = None, checked: bool = False) -> Report:
    """Train and test the probe on each cached layer (on each split when several); save each
    layer's model (first split) with joblib beside its JSON in `out_dir`; return the report.
    The cache is checked against the dataset first (`images`: the dataset as scanned already in
    this run), unless `checked` says this run has just brought it up to date."""
    probing = probing or ProbingOptions()
    names = list(dict.fromkeys(layers)) if layers else store.complete_layers()
    if not names:
        raise FeatxError(f"no complete layer in the cache {store.label}; run featx extract first")
    store.check_layers(layer_parts(names))
    if not checked:
        check_dataset(store, images, probing.verify)
    out = writable_folder(Path(out_dir) if out_dir else default_out_dir(store), "out")
    lead = Ranks.from_env().lead  # under torchrun every rank probes, rank 0 writes
    entries, description = [], ""
    for name in names:
        stream = LayerStream(store, name, probing.scaling, device=probing.device)
        splits = split_rows(store, stream.index, probing)
        description = splits[0].description
        results: dict[str, list[ProbeResult]] = {probe: [] for probe in probing.probe}
        curve: dict[str, dict[int, list[ProbeResult]]] = {probe: {} for probe in probing.probe}
        for k, split in enumerate(splits):
            points = nested_subsets(split, stream.labels, probing.curve, seed=probing.seed + k)
            test_rows = stream.index[split.test]  # one array for every probe of this split
            for probe in probing.probe:
                result, model = run_probe(probe, stream, split, options=probing.probe_options(probe))
                result.test_rows = test_rows
                results[probe].append(result)
                if k == 0 and model is not None and lead:
                    joblib.dump(model, out / (f"{name}.joblib" if probe == probing.probe[0]
                                              else f"{name}.{probe}.joblib"))
                if on_layer:
                    on_layer(result)
                for size, subset in points.items():  # the learning curve: the same test rows
                    point, _ = run_probe(probe, stream, subset.check(stream.labels, store.classes),
                                         options=probing.probe_options(probe))
                    curve[probe].setdefault(size, []).append(point)
                    if on_layer:
                        on_layer(point)
                if probing.curve and not probing.split_file and not store.manifest.fixed_split:
                    curve[probe].setdefault(probing.train_per_class, []).append(result)
        seconds, shared = combined_feature_time(store, name)
        first, *others = probing.probe
        entry = LayerReport.from_results(results[first], store.model, store.key.weights,
                                         feature_seconds=seconds, shared=shared, n_classes=len(store.classes))
        entry.other_probes = [ProbeScore.from_results(results[probe]) for probe in others]
        entry.curve = {probe: [CurvePoint.from_results(size, points) for size,
                               points in sorted(by_size.items())]
                       for probe, by_size in curve.items() if by_size}
        entries.append(entry)
        if lead:
            (out / f"{name}.json").write_text(json.dumps(entry.to_dict(), indent=1))
            write_predictions(out / f"{name}.predictions.csv", results, store.classes, store.rows.paths)
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
    roots = {store.manifest.dataset_root for store in stores}
    if len(roots) > 1:
        raise FeatxError("layer similarity compares layers on the same images; these caches hold "
                         f"{len(roots)} datasets: {', '.join(sorted(roots))}")
    streams: dict[str, LayerStream] = {}
    for store in stores:
        names = layers or store.complete_layers()
        store.check_layers(names)
        check_dataset(store)
        for name in names:
            label = f"{store.model}/{name}" if len(stores) > 1 else name
            streams[label] = LayerStream(store, name, "none", device=device)
    paths = {label: s.store.rows.paths(s.index) for label, s in streams.items()}
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

    m, key = store.manifest, store.key
    identity = ModelIdentity(key.model, key.weights, m.weights.random, key.weights_checksum,
                             key.preprocess, str(store.folder), [run.to_dict() for run in m.runs])
    weights = f"RANDOM weights {key.weights}" if m.weights.random else key.weights
    return Report(
        title=f"{key.model} on {m.dataset} ({weights})", dataset=m.dataset,
        dataset_root=m.dataset_root, classes=list(m.classes), models=[identity], layers=entries,
        split=split, seed=probing.seed, train_per_class=probing.train_per_class,
        train_sizes=list(probing.curve),
        split_file=probing.split_file, splits=probing.splits, scaling=str(probing.scaling),
        C_option=str(probing.C), probes=list(probing.probe), solver=str(probing.solver),
        probe_params={name: dict(values) for name, values in probing.probe_params.items() if values},
        featx_version=__version__,
        probe_info={name: get_probe(name).describe() for name in probing.probe},
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), skipped=dict(m.skipped),
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
    stores = [extract_images(images, spec.name, parts, weights=weights, cache=cache, seed=probing.seed,
                             options=extract_options, progress=progress) for spec in specs]
    del images  # each cache was brought up to date with this scan: the probes need none of it
    gc.collect()  # the traced networks hold reference cycles: free them before the probes run
    reports = []
    for spec, store in zip(specs, stores):
        singles = [name for name in layers or [] if "+" not in name]
        names = [layer.name for layer in spec.resolve_layers(singles)] if singles or not layers else []
        names += [name for name in layers or [] if "+" in name]  # combinations after the layers
        if len(specs) == 1:
            out = model_dir = Path(out_dir) if out_dir else default_out_dir(store)
        else:
            joined = "+".join(s.weights.folder for s in specs)
            out = Path(out_dir) if out_dir else default_out_dir(store).parent / joined
            model_dir = out / spec.weights.folder
        reports.append(evaluate(store, names, probing, out_dir=model_dir, on_layer=on_layer, checked=True))
    report = reports[0] if len(reports) == 1 else Report.merge(reports)
    return report, write_table(report, out) if Ranks.from_env().lead else {}
