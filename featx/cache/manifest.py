"""A cache's manifest as a typed value, with one reader and one writer.

The manifest is small whatever the dataset's size: what the features depend on (the key), the
layers with their shard plans, the extraction runs, the files featx skipped, and how many rows the
row table (featx.cache.rows) holds. Each image's path, label and file identity live in that table.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

from featx import __version__
from featx.cache.key import CacheKey
from featx.errors import FeatxError
from featx.models import Layer, Weights

FORMAT = 4  # 1: weights named by strings; 2: shards without checksums; 3: rows in the manifest


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class LayerPlan:
    """A cached layer: what it is (its Layer), and how its rows are cut into shards."""

    layer: Layer
    shard_size: int
    batch_size: int
    created: str = ""

    @property
    def dim(self) -> int:
        return self.layer.dim

    def to_dict(self) -> dict:
        return {**self.layer.to_dict(), "dim": self.dim, "shard_size": self.shard_size,
                "batch_size": self.batch_size, "created": self.created}

    @classmethod
    def from_dict(cls, data: dict) -> LayerPlan:
        layer = Layer.from_dict({f.name: data[f.name] for f in fields(Layer) if f.name in data})
        return cls(layer, data["shard_size"], data["batch_size"], data.get("created", ""))


@dataclass
class Run:
    """One extraction run (of one rank): its layers and images, how long it ran, how it ended
    (running: still running, or killed), and the settings it ran with."""

    id: str
    layers: list[str]
    planned_images: int
    when: str
    seconds: float = 0.0
    images: int = 0
    status: str = "running"
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        return {**data.pop("settings"), **data}

    @classmethod
    def from_dict(cls, data: dict) -> Run:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names},
                   settings={k: v for k, v in data.items() if k not in names})


@dataclass
class Manifest:
    """Everything about one cache (one dataset, one model with its weights, one way of running it)
    but the per-row data."""

    key: CacheKey
    weights: Weights
    dataset: str
    dataset_root: str
    classes: list[str]
    model_layers: list[str]  # the model's whole layer table, to check names later
    rows: int = 0  # rows committed in the row table
    fixed_split: bool = False  # the dataset has its own train/ and test/
    verify: str = "size"  # how every command recognises its images: size (and time) or hash
    imagenet_default: bool = False  # the weights `--weights imagenet` names
    arrays: bool = False  # features made elsewhere (FeatureStore.for_arrays): no image files
    layers: dict[str, LayerPlan] = field(default_factory=dict)
    runs: list[Run] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # path -> why it has no features
    notes: dict[str, str] = field(default_factory=dict)  # path -> a remark (a multi-frame file)
    created: str = ""
    featx_version: str = __version__

    @property
    def model(self) -> str:
        return self.key.model

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        return {"format": FORMAT, **data, "key": self.key.to_dict(), "weights": self.weights.to_dict(),
                "layers": {name: plan.to_dict() for name, plan in self.layers.items()},
                "runs": [run.to_dict() for run in self.runs]}

    @classmethod
    def from_dict(cls, data: dict) -> Manifest:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        return cls(**{**values, "key": CacheKey.from_dict(data["key"]),
                      "weights": Weights.from_dict(data["weights"]),
                      "layers": {name: LayerPlan.from_dict(plan) for name, plan in data["layers"].items()},
                      "runs": [Run.from_dict(run) for run in data["runs"]]})


class OlderFormat(Exception):
    """A manifest of an older cache format, with what it holds (for an upgrade)."""

    def __init__(self, data: dict) -> None:
        super().__init__(data.get("format"))
        self.data = data


def read_manifest(path: Path) -> Manifest:
    """A cache's manifest; OlderFormat for a format-3 one; else a FeatxError saying what is wrong."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise FeatxError(f"the cache manifest {path} cannot be read ({exc})") from None
    if not isinstance(data, dict) or "featx_version" not in data:
        raise FeatxError(f"the cache manifest {path} is not a featx manifest")
    if data.get("format") == 3:
        raise OlderFormat(data)
    if data.get("format") != FORMAT:
        raise FeatxError(f"the cache at {path.parent} was made by an older featx (cache format "
                         f"{data.get('format', 1)}); delete that folder or pass another cache folder")
    try:
        return Manifest.from_dict(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise FeatxError(f"the cache manifest {path} lacks or garbles {exc}") from None


def write_manifest(path: Path, manifest: Manifest) -> None:
    """Write under a name of this process's own, then rename: a reader sees the old or the new."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        tmp.write_text(json.dumps(manifest.to_dict(), indent=1))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
