"""featx: pretrained CNN layer features, cached in HDF5 shards, compared with probes (linear SVM,
logistic regression, k-NN) that stream the cache.

The Python API (imported lazily, so `featx --help` stays quick):

- `extract_features(dataset, model, layers, ...)` -> FeatureStore: cache layers in one forward pass
- `open_cache(cache, dataset, model, weights)` -> FeatureStore; `.read_layer(name)` reads it
- `evaluate(store, layers, SvmOptions(...))` -> Report: the probes (SvmOptions.probe) per cached layer
- `FeatureStore.for_arrays(root, name, labels, classes, {layer: dim})`: a cache for features made
  elsewhere, filled with `write_shard`, then probed like any other
- `run_table(dataset, model, ...)` -> (Report, written paths): the whole study
- `get_model(name, weights)` -> ModelSpec (weights, layer table); `load_model(...)` the network
- `FeatureExtractor(model, layer)`: a scikit-learn transformer over image paths
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "extract_features": ("featx.study", "extract"),
    "open_cache": ("featx.study", "find_store"),
    "evaluate": ("featx.study", "evaluate"),
    "run_table": ("featx.study", "run_table"),
    "ExtractOptions": ("featx.study", "ExtractOptions"),
    "SvmOptions": ("featx.study", "SvmOptions"),
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
