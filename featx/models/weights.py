"""Weights as values: where a weight set comes from, the preprocessing it was trained with, its
categories and checksum. Cache identity, cache folder names and report headers derive from it."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SOURCES = ("torchvision", "pypi", "timm", "file", "random")


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side, centre-crop, then scale to [0, 1] and normalise with mean/std
    (the weights' own transforms)."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> Preprocess:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    @classmethod
    def from_transforms(cls, transforms) -> Preprocess:
        """torchvision's ImageClassification transforms of a weights enum member."""
        return cls(resize=int(transforms.resize_size[0]), crop=int(transforms.crop_size[0]),
                   mean=tuple(float(m) for m in transforms.mean),
                   std=tuple(float(s) for s in transforms.std),
                   interpolation=transforms.interpolation.value)

    def describe(self) -> str:
        mean = ", ".join(f"{m:.3f}" for m in self.mean)
        std = ", ".join(f"{s:.4g}" for s in self.std)
        return (f"resize {self.resize} ({self.interpolation}), crop {self.crop}, "
                f"mean ({mean}), std ({std})")


@dataclass(frozen=True)
class Weights:
    """One weight set of one model. `tag` names it within the model (IMAGENET1K_V2, imagenet,
    random-seed0, file-<sha256 prefix>); `location` is its URL, package file or path; `checksum`
    is the sha256 prefix of the file (or of a random state dict) once known."""

    model: str
    tag: str
    source: str
    preprocess: Preprocess
    location: str = ""
    categories: str | None = "imagenet"  # "imagenet" for the 1000 ImageNet classes, None if unusable
    checksum: str = ""
    note: str = ""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"unknown weights source {self.source!r}")

    @property
    def name(self) -> str:
        """The full name, e.g. resnet50.IMAGENET1K_V2."""
        return f"{self.model}.{self.tag}"

    @property
    def random(self) -> bool:
        return self.source == "random"

    @property
    def folder(self) -> str:
        """The cache and results folder name: model-tag, safe on every filesystem."""
        return f"{self.model}-{self.tag}".replace(":", "-").replace("/", "-")

    def with_checksum(self, checksum: str) -> Weights:
        return replace(self, checksum=checksum[:16])

    def to_dict(self) -> dict:
        return {**asdict(self), "preprocess": self.preprocess.to_dict(), "name": self.name}

    @classmethod
    def from_dict(cls, data: dict) -> Weights:
        fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**{**fields, "preprocess": Preprocess.from_dict(data["preprocess"])})

    def describe(self) -> str:
        if self.random:
            return f"RANDOM ({self.name}), not pretrained: a baseline only"
        return self.name + (f" ({self.note})" if self.note else "")


def file_checksum(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def state_dict_checksum(state: dict) -> str:
    h = hashlib.sha256()
    for key in sorted(state):
        h.update(key.encode())
        h.update(state[key].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet class names bundled with torchvision (no network)."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES

    return tuple(_IMAGENET_CATEGORIES)
