"""Top-k classes of single images, through the same extractor as the feature cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from featx.data.preprocess import load
from featx.errors import FeatxError
from featx.extract.forward import LayerExtractor
from featx.models import get_model, load_model
from featx.options import check_count


def predict_images(paths: list[Path], model: str = "efficientnet_lite0", weights: str = "imagenet",
                   *, top: int = 3, device: str = "auto",
                   ) -> Iterator[tuple[Path, list[tuple[str, float]]]]:
    """Yield (path, [(class name, probability), ...]) for each image, best class first."""
    check_count("top", top, 1000, why="the classes a model scores")
    spec = get_model(model, weights)
    if not spec.weights.categories:
        raise FeatxError(f"the weights {spec.weights.name} carry no class names (they are for "
                         "features only), so they cannot name classes")
    images = [(path, load(spec.preprocess, path)) for path in paths]  # every file read before the model
    loaded = load_model(model, weights)
    extractor = LayerExtractor(loaded, [loaded.spec.layer("logits")], device, precision="fp32")
    for path, pixels in images:
        logits = extractor(pixels.unsqueeze(0))["logits"][0]
        probabilities = torch.softmax(logits, dim=0)
        values, indices = probabilities.topk(min(top, len(probabilities)))
        yield path, [(loaded.categories[i], float(v)) for v, i in zip(values, indices.tolist())]
