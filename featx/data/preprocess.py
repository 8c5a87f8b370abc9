"""The weights' preprocessing applied to images: resize and crop to uint8 (a PIL image in
decoding workers, or a decoded tensor on the device), then scale and normalise on the device."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from featx.data.images import load_image
from featx.errors import FeatxError
from featx.models.weights import Preprocess

ASPECT_LIMIT = 4  # a longer side beyond 4x the shorter one is cut before the resize


def prepare(preprocess: Preprocess, image: Image.Image | torch.Tensor) -> torch.Tensor:
    """RGB image (PIL, or uint8 tensor (3, H, W) on any device) -> uint8 tensor (3, crop, crop),
    resized as torchvision's transforms do: the shorter side, or (`squash`) both sides.

    An image more than ASPECT_LIMIT times as long as it is wide (a 20000x1 strip) has its long
    side cut around the centre before the shorter side is resized: the centre crop never reaches
    that far, and the resize would otherwise make billions of pixels."""
    mode = TF.InterpolationMode(preprocess.interpolation)
    if preprocess.resize_mode == "squash":
        image = TF.resize(image, [preprocess.resize, preprocess.resize], interpolation=mode, antialias=True)
    else:
        image = TF.resize(_cut_long_side(image), [preprocess.resize], interpolation=mode, antialias=True)
    image = TF.center_crop(image, [preprocess.crop])
    return TF.pil_to_tensor(image) if isinstance(image, Image.Image) else image


def _cut_long_side(image: Image.Image | torch.Tensor) -> Image.Image | torch.Tensor:
    """The image, its long side cut to ASPECT_LIMIT times the short one around the centre."""
    height, width = TF.get_size(image)
    short, long = min(width, height), max(width, height)
    if long <= ASPECT_LIMIT * short:
        return image
    keep = ASPECT_LIMIT * short
    cut = (long - keep) // 2
    top, left, rows, cols = (0, cut, height, keep) if width > height else (cut, 0, keep, width)
    return TF.crop(image, top, left, rows, cols)


def load(preprocess: Preprocess, path: str | Path) -> torch.Tensor:
    """Read one image file and prepare it; an unreadable file is a FeatxError naming it."""
    try:
        return prepare(preprocess, load_image(path, preprocess.resize)[0])
    except (OSError, ValueError) as exc:
        raise FeatxError(f"cannot read image {path}: {exc}") from None


def normalize(preprocess: Preprocess, batch: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float32 normalised, on the batch's device."""
    mean, std = _mean_std(tuple(preprocess.mean), tuple(preprocess.std), batch.device)
    return (batch.float().div_(255.0) - mean) / std


@functools.lru_cache(maxsize=16)
def _mean_std(mean: tuple[float, ...], std: tuple[float, ...],
              device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (1, 3, 1, 1) mean and std on `device`, made once: made per batch, their copy from host
    memory to a GPU would wait for all the work queued there before it."""
    with torch.inference_mode(False):  # usable in and out of inference mode
        return (torch.tensor(mean, device=device).view(1, 3, 1, 1),
                torch.tensor(std, device=device).view(1, 3, 1, 1))
