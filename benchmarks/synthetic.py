"""A synthetic layer in a featx cache, shaped like a network's pooled features: class structure in
a few directions, mixed into many values, noise, then a ReLU (non-negative, with a strong common
direction, as average-pooled activations are). The default is 15-Scene's size with a 1280-wide
layer: 15 classes, 100 training rows each (1,500) and 2,985 test rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from featx.cache.store import FeatureStore
from featx.data.splits import Split


def synthetic_store(folder: Path, *, dim: int = 1280, classes: int = 15, train_per_class: int = 100,
                    test: int = 2985, seed: int = 0) -> tuple[FeatureStore, Split]:
    """A cache holding one layer `layer` of `dim` values, and its split: `train_per_class` rows of
    each class to train on, `test` rows to test on."""
    rng = np.random.default_rng(seed)
    rows = classes * train_per_class + test
    labels = np.arange(rows) % classes
    spread = np.arange(1, 129) ** -0.5  # directions of decreasing variance
    latent = (rng.normal(0, 1, (classes, 128))[labels] * 0.5 + rng.normal(0, 1, (rows, 128))) * spread
    scale = rng.lognormal(0, 0.8, dim)  # values of unequal size, as channels are
    mix = rng.normal(0, 1, (128, dim)) / 4
    x = (np.maximum(latent @ mix + rng.normal(0, 0.3, (rows, dim)), 0) * scale).astype(np.float32)
    store = FeatureStore.for_arrays(Path(folder), "synthetic", labels,
                                    classes=tuple(f"c{i}" for i in range(classes)), layers={"layer": dim})
    for k, (start, stop) in enumerate(store.shard_ranges("layer")):
        store.write_shard("layer", k, np.arange(start, stop), features=x[start:stop], skipped={})
    train = np.sort(np.concatenate([np.flatnonzero(labels == c)[:train_per_class] for c in range(classes)]))
    return store, Split(train, np.setdiff1d(np.arange(rows), train), f"{train_per_class} per class")
