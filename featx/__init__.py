"""featx: pretrained network layer features, cached in HDF5 shards, compared with probes (linear
SVM, logistic regression, k-NN, any registered probe) that stream the cache.

The Python API (imported lazily, so `featx --help` stays quick):

- `extract_features(dataset, model, layers, ...)` -> FeatureStore: cache layers in one forward pass
- `open_cache(cache, dataset, model, weights)` -> FeatureStore; `.read_layer(name)` reads it
- `evaluate(store, layers, ProbingOptions(...))` -> Report: the probes (ProbingOptions.probe) per layer
- `FeatureStore.for_arrays(root, name, labels, classes, {layer: dim})`: a cache for features made
  elsewhere, filled with `write_shard`, then probed like any other
- `run_table(dataset, model, ...)` -> (Report, written paths): the whole study
- `get_model(name, weights)` -> ModelSpec (weights, layer table); `load_model(...)` the network
- `FeatureExtractor(model, layer)`: a scikit-learn transformer over image paths
- `register_probe(Probe(...))`, `register_source(module)`: the two extension points
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_API = {
    "extract_features": ("featx.study", "extract"),
    "open_cache": ("featx.study", "find_store"),
    "evaluate": ("featx.study", "evaluate"),
    "run_table": ("featx.study", "run_table"),
    "ExtractOptions": ("featx.study", "ExtractOptions"),
    "ProbingOptions": ("featx.study", "ProbingOptions"),
    "Probe": ("featx.probes", "Probe"),
    "ProbeParam": ("featx.probes", "ProbeParam"),
    "register_probe": ("featx.probes", "register"),
    "register_source": ("featx.models", "register_source"),
    "FeatureStore": ("featx.cache.store", "FeatureStore"),
    "FeatureExtractor": ("featx.extract.transformer", "FeatureExtractor"),
    "get_model": ("featx.models", "get_model"),
    "load_model": ("featx.models", "load_model"),
    "model_names": ("featx.models", "model_names"),
    "Report": ("featx.report.tables", "Report"),
    "FeatxError": ("featx.errors", "FeatxError"),
}
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        module, attribute = _API[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'featx' has no attribute {name!r}")
