"""The weights' preprocessing applied to images: resize and crop to uint8 (in decoding workers),
then scale and normalise on the device."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from featx.data import load_image
from featx.errors import FeatxError
from featx.models.weights import Preprocess


def prepare(preprocess: Preprocess, image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> uint8 tensor (3, crop, crop), resized as torchvision's transforms do."""
    mode = TF.InterpolationMode(preprocess.interpolation)
    image = TF.resize(image, [preprocess.resize], interpolation=mode, antialias=True)
    image = TF.center_crop(image, [preprocess.crop])
    return TF.pil_to_tensor(image)


def load(preprocess: Preprocess, path: str | Path) -> torch.Tensor:
    """Read one image file and prepare it; an unreadable file is a FeatxError naming it."""
    try:
        return prepare(preprocess, load_image(path))
    except (OSError, ValueError) as exc:
        raise FeatxError(f"cannot read image {path}: {exc}") from None


def normalize(preprocess: Preprocess, batch: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 normalised, on the batch's device."""
    mean = torch.tensor(preprocess.mean, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, device=batch.device).view(1, 3, 1, 1)
    return (batch.float().div_(255.0) - mean) / std
