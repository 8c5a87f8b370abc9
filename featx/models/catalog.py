"""The catalog: every torchvision and EfficientNet-Lite model with its weight sets and its layer
table at each input size those weights use, derived once from the traced graphs and shipped as
catalog.json, so that `featx models` and `featx layers` answer without importing torch.

`python -m featx.models.catalog` rebuilds it. Where the installed torchvision differs from the
one it was made with, tables are derived live instead (a second or two per model).
"""

from __future__ import annotations

import json
from functools import cache
from importlib import metadata
from pathlib import Path

from featx.models.layers import Layer
from featx.models.weights import Weights

CATALOG = Path(__file__).with_name("catalog.json")


@cache
def load() -> dict:
    try:
        return json.loads(CATALOG.read_text())
    except (OSError, ValueError):
        return {"torchvision": None, "models": {}}


def current() -> bool:
    """Whether the shipped tables were derived with the installed torchvision."""
    try:
        return load()["torchvision"] == metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        return False


def entry(name: str) -> dict | None:
    return load()["models"].get(name) if current() else None


def weights_of(name: str) -> list[Weights] | None:
    found = entry(name)
    return [Weights.from_dict(w) for w in found["weights"]] if found else None


def layers_of(name: str, size: int) -> tuple[list[Layer], list[str]] | None:
    found = entry(name)
    table = found and found["layers"].get(str(size))
    if not table:
        return None
    return [Layer.from_dict(layer) for layer in table["layers"]], table["defaults"]


def build() -> dict:
    """Derive every table (imports torch; about a minute)."""
    from featx.models import lite, torchvision_zoo

    models = {}
    sources = [(name, "torchvision") for name in torchvision_zoo.model_names()]
    sources += [(name, "lite") for name in lite.SIZES]
    for name, source in sources:
        zoo = torchvision_zoo if source == "torchvision" else lite
        weights = zoo.weight_sets(name)
        tables = {}
        for w in weights or [None]:
            size = w.preprocess.crop if w else 224
            if str(size) in tables:
                continue
            layers, defaults = (torchvision_zoo.layer_table(name, w.tag if w else None, size)
                                if source == "torchvision" else lite.layer_table(name, size))
            tables[str(size)] = {"layers": [layer.to_dict() for layer in layers], "defaults": defaults}
        models[name] = {"source": source, "weights": [w.to_dict() for w in weights], "layers": tables}
    return {"torchvision": metadata.version("torchvision"), "models": models}


if __name__ == "__main__":
    CATALOG.write_text(json.dumps(build(), separators=(",", ":")))
    print(f"wrote {CATALOG}")
