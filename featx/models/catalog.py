"""The catalog: every model of the sources that list their names (torchvision, EfficientNet-Lite)
with its weight sets and its layer table at each input size those weights use, derived once from
the traced graphs and shipped as catalog.json, so that `featx models` and `featx layers` answer
without importing torch.

`python -m featx.models.catalog` rebuilds it. Models it does not hold (timm's, or a source's whose
library differs from the version it was made with) are derived live once and remembered in a user
catalog per library version: $FEATX_HOME, else ~/.cache/featx.
"""

from __future__ import annotations

import json
import os
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from featx import __version__
from featx.models.layers import Layer
from featx.models.weights import Weights

if TYPE_CHECKING:
    from featx.models.source import ModelSource

CATALOG = Path(__file__).with_name("catalog.json")


@cache
def load() -> dict:
    try:
        data = json.loads(CATALOG.read_text())
    except (OSError, ValueError):
        return {"libraries": {}, "models": {}}
    if "libraries" not in data:  # the first layout: one torchvision version for every entry
        data["libraries"] = {source: ["torchvision", data.get("torchvision")]
                             for source in {m["source"] for m in data["models"].values()}}
    return data


@cache
def installed(library: str) -> str | None:
    """The installed version of a package, or None."""
    try:
        return metadata.version(library)
    except metadata.PackageNotFoundError:
        return None


def _current(source_name: str) -> bool:
    """Whether the shipped tables of a source were derived with the library installed now."""
    library, version = load()["libraries"].get(source_name, (None, None))
    return library is not None and installed(library) == version


def ships(source: ModelSource) -> bool:
    return _current(source.NAME)


def listed() -> list[str]:
    """The names of the shipped models whose tables are current."""
    return [name for name, found in load()["models"].items() if _current(found["source"])]


def entry(name: str) -> dict | None:
    """A model's shipped entry, when its source's shipped tables are current."""
    found = load()["models"].get(name)
    return found if found and _current(found["source"]) else None


def _user_path(source: ModelSource) -> Path | None:
    """The user catalog of one library version, or None when that library is not installed."""
    version = installed(source.LIBRARY)
    if version is None:
        return None
    cache_home = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    home = os.environ.get("FEATX_HOME") or cache_home / "featx"
    return Path(home) / f"catalog-featx{__version__}-{source.LIBRARY}-{version}.json"


def _remembered(source: ModelSource) -> dict:
    path = _user_path(source)
    try:
        return json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        return {}


def _entry(name: str, source: ModelSource) -> dict:
    return entry(name) or _remembered(source).get(name, {})


def weights_of(name: str, source: ModelSource) -> list[Weights] | None:
    found = _entry(name, source).get("weights")
    return None if found is None else [Weights.from_dict(w) for w in found]


def layers_of(name: str, source: ModelSource, size: int) -> tuple[list[Layer], list[str]] | None:
    table = _entry(name, source).get("layers", {}).get(str(size))
    if not table:
        return None
    return [Layer.from_dict(layer) for layer in table["layers"]], table["defaults"]


def remember(name: str, source: ModelSource, weights: list[Weights] | None = None, *, size: int | None = None,
             table: tuple[list[Layer], list[str]] | None = None) -> None:
    """Add what was derived live to the user catalog, so the next question is answered without
    torch; a place that cannot be written only means deriving again next time."""
    path = _user_path(source)
    if path is None:
        return
    data = _remembered(source)
    found = data.setdefault(name, {"source": source.NAME, "weights": None, "layers": {}})
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
    """Derive every listed model's tables (imports torch; about a minute)."""
    from featx.models.source import sources

    models, libraries = {}, {}
    # listed in this order: torchvision's classifiers, the other plain names, then prefixed sources
    for source in sorted(sources(), key=lambda s: (bool(s.PREFIX), s.NAME != "torchvision")):
        names = source.model_names()
        if names:
            libraries[source.NAME] = [source.LIBRARY, installed(source.LIBRARY)]
        for name in names:
            weights = source.weight_sets(name)
            tables = {}
            for w in weights or [None]:
                size = w.preprocess.crop if w else 224
                if str(size) in tables:
                    continue
                layers, defaults = source.layer_table(name, w.tag if w else None, size)
                tables[str(size)] = {"layers": [layer.to_dict() for layer in layers], "defaults": defaults}
            models[name] = {"source": source.NAME, "weights": [w.to_dict() for w in weights],
                            "layers": tables}
    return {"libraries": libraries, "models": models}


if __name__ == "__main__":
    CATALOG.write_text(json.dumps(build(), separators=(",", ":")))
    print(f"wrote {CATALOG}")
