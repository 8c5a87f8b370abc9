"""What cached features depend on (`CacheKey`), and the one place a cache's folder is named."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import xxhash

from featx.models import Weights


@dataclass(frozen=True)
class CacheKey:
    """What cached features depend on: a cache made with any other value is not reused.
    `weights_checksum` is empty while the weights are not loaded (a cache found complete is then
    used without building the network; the checksum is compared whenever it is known)."""

    model: str
    weights: str
    weights_checksum: str
    preprocess: dict
    precision: str
    dtype: str
    tta: str = "none"
    decode: str = "pil"

    @classmethod
    def of(cls, weights: Weights, *, precision: str, dtype: str, tta: str = "none",
           decode: str = "pil") -> CacheKey:
        return cls(weights.model, weights.name, weights.checksum, weights.preprocess.to_dict(),
                   str(precision), str(dtype), str(tta), str(decode))

    @property
    def folder(self) -> str:
        """<model>-<weights tag>[-float16][-<tta>][-device-decode]: the cache folder's name."""
        tag = self.weights.removeprefix(self.model + ".")
        name = f"{self.model}-{tag}".replace(":", "-").replace("/", "-")
        dtype = "-float16" if self.dtype == "float16" else ""
        decode = "-device-decode" if self.decode == "device" else ""
        return name + dtype + (f"-{self.tta}" if self.tta != "none" else "") + decode

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))  # as stored: tuples become lists

    @classmethod
    def from_dict(cls, data: dict) -> CacheKey:
        """A key as a manifest holds it (fields an older featx did not write take their defaults)."""
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})

    def differences(self, made: CacheKey) -> list[str]:
        """What the key a cache was made with says differently, as 'field (there X, now Y)'; the
        checksum only where both sides know it."""
        now, there = self.to_dict(), made.to_dict()
        return [f"{name.replace('_', ' ')} ({there[name]} there, {now[name]} now)" for name in now
                if now[name] != there[name]
                and not (name == "weights_checksum" and not (now[name] and there[name]))]


def dataset_folder(root: Path, name: str, dataset_root: str) -> str:
    """The dataset's folder in a cache: its name, or name-<hash of its path> when another dataset
    of the same name is cached there already (a/test and b/test)."""
    for manifest in Path(root).glob(f"{name}/*/manifest.json"):
        try:
            other = json.loads(manifest.read_text()).get("dataset_root")
        except (OSError, ValueError):
            continue
        if other and other != dataset_root:
            return f"{name}-{xxhash.xxh3_64_hexdigest(dataset_root.encode('utf-8', 'surrogateescape'))[:8]}"
    return name
