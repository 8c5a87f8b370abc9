"""A scikit-learn transformer: image paths -> one layer's features, for Pipeline and GridSearchCV."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from featx.data.images import ImageSet
from featx.errors import FeatxError
from featx.extract.forward import LayerExtractor, batches_of, extract_batches
from featx.models import load_model


class FeatureExtractor(TransformerMixin, BaseEstimator):
    """Features of one layer of a pretrained network for a list of image paths.

    No work happens in __init__; `fit` loads the network (it learns nothing from the images),
    `transform` runs it. Example: Pipeline([("features", FeatureExtractor("vgg16",
    layer="pool5")), ("svm", LinearSVC())]).
    """

    def __init__(self, model: str = "vgg16", layer: str = "pool5", weights: str = "imagenet",
                 *, device: str = "auto", precision: str = "auto", batch_size: int = 32,
                 workers: int = 0) -> None:
        self.model = model
        self.layer = layer
        self.weights = weights
        self.device = device
        self.precision = precision
        self.batch_size = batch_size
        self.workers = workers

    def fit(self, X: Sequence[str | Path], y=None) -> FeatureExtractor:
        loaded = load_model(self.model, self.weights)
        self.extractor_ = LayerExtractor(loaded, [loaded.spec.layer(self.layer)], self.device,
                                         precision=self.precision)
        self.n_features_out_ = self.extractor_.layers[0].dim
        return self

    def transform(self, X: Sequence[str | Path]) -> np.ndarray:
        """(len(X), dim) float32 features; an unreadable image is an error naming the file."""
        check_is_fitted(self, "extractor_")
        paths = tuple(str(p) for p in X)
        images = ImageSet(Path(), paths, np.zeros(len(paths), np.int64), ("",))
        out = np.empty((len(paths), self.n_features_out_), np.float32)
        batches = batches_of(range(len(paths)), self.batch_size)
        for batch in extract_batches(self.extractor_, images, batches, workers=self.workers):
            if batch.skipped:
                index, reason = next(iter(batch.skipped.items()))
                raise FeatxError(f"cannot read image {paths[index]}: {reason}")
            out[batch.indices] = batch.features[self.layer]
        return out
