"""The catalog: every torchvision and EfficientNet-Lite model with its weight sets and its layer
table at each input size those weights use, derived once from the traced graphs and shipped as
catalog.json, so that `featx models` and `featx layers` answer without importing torch.

`python -m featx.models.catalog` rebuilds it. Models it does not hold (timm's, or all of them
when the installed torchvision differs from the one it was made with) are derived live once and
remembered in a user catalog per library version: $FEATX_HOME, else ~/.cache/featx.
"""

from __future__ import annotations

import json
import os
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
    """A model's shipped entry, when the shipped catalog is current."""
    return load()["models"].get(name) if current() else None


def _user_path(source: str) -> Path | None:
    """The user catalog of one library version, or None when that library is not installed."""
    library = "timm" if source == "timm" else "torchvision"
    try:
        version = metadata.version(library)
    except metadata.PackageNotFoundError:
        return None
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    home = os.environ.get("FEATX_HOME") or cache / "featx"
    return Path(home) / f"catalog-{library}-{version}.json"


def _remembered(source: str) -> dict:
    path = _user_path(source)
    try:
        return json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        return {}


def _entry(name: str, source: str) -> dict:
    return entry(name) or _remembered(source).get(name, {})


def weights_of(name: str, source: str) -> list[Weights] | None:
    found = _entry(name, source).get("weights")
    return None if found is None else [Weights.from_dict(w) for w in found]


def layers_of(name: str, source: str, size: int) -> tuple[list[Layer], list[str]] | None:
    table = _entry(name, source).get("layers", {}).get(str(size))
    if not table:
        return None
    return [Layer.from_dict(layer) for layer in table["layers"]], table["defaults"]


def remember(name: str, source: str, weights: list[Weights] | None = None, size: int | None = None,
             table: tuple[list[Layer], list[str]] | None = None) -> None:
    """Add what was derived live to the user catalog, so the next question is answered without
    torch; a place that cannot be written only means deriving again next time."""
    path = _user_path(source)
    if path is None:
        return
    data = _remembered(source)
    found = data.setdefault(name, {"source": source, "weights": None, "layers": {}})
    if weights is not None:
        found["weights"] = [w.to_dict() for w in weights]
    if table is not None:
        found["layers"][str(size)] = {"layers": [layer.to_dict() for layer in table[0]],
                                      "defaults": table[1]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, separators=(",", ":")))
        os.replace(tmp, path)
    except OSError:
        pass


def build() -> dict:
    """Derive every table (imports torch; about a minute)."""
    from featx.models import lite, torchvision_zoo, zoo

    models = {}
    sources = [(name, "torchvision") for name in torchvision_zoo.model_names()]
    sources += [(name, "lite") for name in lite.SIZES]
    for name, source in sources:
        weights = zoo(source).weight_sets(name)
        tables = {}
        for w in weights or [None]:
            size = w.preprocess.crop if w else 224
            if str(size) in tables:
                continue
            layers, defaults = zoo(source).layer_table(name, w.tag if w else None, size)
            tables[str(size)] = {"layers": [layer.to_dict() for layer in layers], "defaults": defaults}
        models[name] = {"source": source, "weights": [w.to_dict() for w in weights], "layers": tables}
    return {"torchvision": metadata.version("torchvision"), "models": models}


if __name__ == "__main__":
    CATALOG.write_text(json.dumps(build(), separators=(",", ":")))
    print(f"wrote {CATALOG}")
