"""Top-k ImageNet classes of single images, through the same extractor as the feature cache."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from featx.errors import FeatxError
from featx.extract import LayerExtractor
from featx.models import load_model


def predict_images(paths: list[Path], model: str = "efficientnet_lite0", weights: str = "imagenet",
                   top: int = 3, device: str = "auto",
                   ) -> Iterator[tuple[Path, list[tuple[str, float]]]]:
    """Yield (path, [(class name, probability), ...]) for each image, best class first."""
    if top < 1:
        raise FeatxError("--top must be at least 1")
    loaded = load_model(model, weights)
    extractor = LayerExtractor(loaded, [loaded.backbone.layer("logits")], device, "fp32")
    for path in paths:
        logits = extractor(loaded.preprocess.load(path).unsqueeze(0))["logits"][0]
        probabilities = torch.softmax(logits, dim=0)
        values, indices = probabilities.topk(min(top, len(probabilities)))
        yield path, [(loaded.categories[i], float(v)) for v, i in zip(values, indices.tolist())]
