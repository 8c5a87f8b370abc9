"""Weights as values: where a weight set comes from, the preprocessing it was trained with, its
categories and checksum. Cache identity, cache folder names and report headers derive from it."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SOURCES = ("torchvision", "pypi", "timm", "openclip", "hf", "file", "random")
RESIZE_MODES = ("shortest", "squash")
LOCAL_TAG = "local-"  # the tag of a local checkpoint that the model's source reads (see Weights)


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side (`squash`: both sides, the aspect ratio not kept), centre-crop,
    then scale to [0, 1] and normalise with mean/std (the weights' own transforms)."""

    resize: int = 256
    crop: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bilinear"
    resize_mode: str = "shortest"

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ValueError(f"unknown resize mode {self.resize_mode!r}; known: {', '.join(RESIZE_MODES)}")

    def to_dict(self) -> dict:
        """As recorded in caches and catalogs; the resize mode only when it is not the shorter
        side, so that the records made before squashing existed still read the same."""
        data = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if self.resize_mode == "shortest":
            del data["resize_mode"]
        return data

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
        resize = (f"resize {self.resize} ({self.interpolation})" if self.resize_mode == "shortest" else
                  f"resize to {self.resize}x{self.resize} ({self.interpolation}, aspect ratio not kept)")
        return f"{resize}, crop {self.crop}, mean ({mean}), std ({std})"


@dataclass(frozen=True)
class Weights:
    """One weight set of one model. `tag` names it within the model (IMAGENET1K_V2, imagenet,
    random-seed0, file-<sha256 prefix>); `location` is its URL, package file or path; `checksum`
    is the sha256 prefix of the file (or of a random state dict) once known.

    Local weights have the source `file`: a plain state dict that featx reads (tag file-...), or
    a checkpoint file or folder in the layout of the model source's library (tag local-...),
    which that source reads, and whose own config may define the architecture."""

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
    def local_checkpoint(self) -> bool:
        """Whether these are a local checkpoint that the model's source reads itself."""
        return self.source == "file" and self.tag.startswith(LOCAL_TAG)

    @property
    def build_tag(self) -> str | None:
        """What a model source builds the architecture and layer table for: a pretrained set's
        tag, a local checkpoint's path, or None (random weights, a plain state dict: the model's
        default architecture)."""
        if self.local_checkpoint:
            return self.location
        return None if self.source in ("random", "file") else self.tag

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
