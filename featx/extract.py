"""Batches -> one forward pass -> the requested layers, on CPU or GPU.

The network is traced once (torchvision's feature extraction) so that one pass returns every
requested layer and stops at the deepest of them. Images are decoded and cropped to uint8 in
DataLoader workers; normalisation runs on the device.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.models.feature_extraction import create_feature_extractor

from featx.data import ImageSet, load_image
from featx.errors import FeatxError, OptionError
from featx.models import Layer, LoadedModel, Preprocess
from featx.preprocess import normalize, prepare

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
TTA = ("none", "flip")  # flip: each image's features averaged with its mirror's
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise FeatxError(f"unknown device {device!r}; use auto, cpu or cuda[:N]") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise FeatxError(f"device {device} asked for, but no CUDA GPU is available")
    return resolved


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX); otherwise bf16 is slow."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags for flag in ("avx512_bf16", "amx_bf16"))


def resolve_precision(precision: str, device: torch.device, cpu_bf16: bool = False) -> str:
    """`auto` is bf16 on a GPU that supports it (else fp16); on a CPU it is bf16 only for a
    model measured to gain from it (`cpu_bf16`) on a CPU with native bf16, else fp32."""
    if precision not in PRECISIONS:
        raise OptionError("precision", f"must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if cpu_bf16 and cpu_has_native_bf16() else "fp32"


class LayerExtractor:
    """One traced forward pass that returns the requested layers as float32 host tensors."""

    def __init__(self, model: LoadedModel, layers: Sequence[Layer], device: str = "auto",
                 precision: str = "auto", channels_last: bool = True, tta: str = "none") -> None:
        self.model = model
        self.layers = list(layers)
        self.device = resolve_device(device)
        self.precision = resolve_precision(precision, self.device, model.spec.cpu_bf16)
        self.channels_last = channels_last
        if tta not in TTA:
            raise OptionError("tta", f"must be one of {', '.join(TTA)}, not {tta!r}")
        self.tta = tta
        module = _without_inplace(model.module)
        nodes = {layer.node: layer.node for layer in self.layers}
        tracer_kwargs = None
        if model.spec.source == "timm":
            from featx.models.timm_zoo import tracer_kwargs as timm_tracer_kwargs

            tracer_kwargs = timm_tracer_kwargs()
        with warnings.catch_warnings():  # its train/eval node note does not apply: eval only
            warnings.simplefilter("ignore", UserWarning)
            graph = create_feature_extractor(module, return_nodes=nodes, tracer_kwargs=tracer_kwargs)
        self.graph = graph.eval().to(self.device)
        if channels_last:
            self.graph = self.graph.to(memory_format=torch.channels_last)

    @property
    def preprocess(self) -> Preprocess:
        return self.model.preprocess

    def autocast(self):
        """The autocast context of the chosen precision (none for fp32)."""
        dtype = _DTYPES[self.precision]
        return torch.autocast(self.device.type, dtype=dtype) if dtype else nullcontext()

    @torch.inference_mode()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 images (N, 3, H, W) -> {layer name: (N, dim)} on the device, in the compute
        precision, each layer reduced to a vector as its table says."""
        x = normalize(self.preprocess, images.to(self.device, non_blocking=True))
        if self.tta == "flip":  # each image and its mirror in one batch twice the size
            x = torch.cat([x, x.flip(-1)])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            out = self.graph(x)
        vectors = {layer.name: to_vectors(layer, out[layer.node]) for layer in self.layers}
        if self.tta == "flip":
            n = len(images)
            vectors = {name: (v[:n] + v[n:]) / 2 for name, v in vectors.items()}
        return vectors

    def __call__(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """uint8 images (N, 3, H, W) -> {layer name: float32 (N, dim) on the host}."""
        return {name: value.float().cpu() for name, value in self.forward(images).items()}


def to_vectors(layer: Layer, output: torch.Tensor) -> torch.Tensor:
    """A layer's output for a batch -> (N, dim), by the layer's reduction."""
    if layer.reduce == "avgpool":
        return F.adaptive_avg_pool2d(output, 1).flatten(1)
    if layer.reduce == "avgpool_nhwc":
        return output.mean(dim=(1, 2))
    if layer.reduce == "cls_token":
        return output[:, 0]
    if layer.reduce == "mean_tokens":
        return output[:, layer.prefix_tokens:].mean(dim=1)
    return output.flatten(1)


def _without_inplace(module: nn.Module) -> nn.Module:
    """Turn off in-place activations, so a cached layer is never changed by a later one."""
    for sub in module.modules():
        if getattr(sub, "inplace", False) is True:
            sub.inplace = False
    return module


class ImageFiles(Dataset):
    """Decode and crop images to uint8; a file that cannot be read yields zeros and its error."""

    def __init__(self, images: ImageSet, preprocess: Preprocess) -> None:
        self.images = images
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, str]:
        try:
            path = self.images.root / self.images.paths[index]
            pixels = prepare(self.preprocess, load_image(path, self.preprocess.resize))
            return index, pixels, ""
        except Exception as exc:  # noqa: BLE001 - corrupt, truncated, empty or not an image
            blank = torch.zeros(3, self.preprocess.crop, self.preprocess.crop, dtype=torch.uint8)
            return index, blank, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def default_workers() -> int:
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def image_batches(images: ImageSet, preprocess: Preprocess, batches: list[list[int]],
                  workers: int | None = None, pin_memory: bool = False,
                  ) -> Iterator[tuple[np.ndarray, torch.Tensor, list[str]]]:
    """Yield (indices, uint8 images, errors) for each batch of image indices, in order."""
    workers = default_workers() if workers is None else workers
    loader = DataLoader(ImageFiles(images, preprocess), batch_sampler=batches, num_workers=workers,
                        pin_memory=pin_memory, prefetch_factor=4 if workers else None,
                        persistent_workers=False)
    for indices, pixels, errors in loader:
        yield indices.numpy(), pixels, list(errors)


@dataclass
class ExtractedBatch:
    """Features of the readable images of one batch, and the files that could not be read."""

    indices: np.ndarray
    features: dict[str, np.ndarray]
    skipped: dict[int, str]


def extract_batches(extractor: LayerExtractor, images: ImageSet, batches: list[list[int]],
                    workers: int | None = None) -> Iterator[ExtractedBatch]:
    """Run the extractor over batches of image indices, dropping unreadable images."""
    pin = extractor.device.type == "cuda"
    for indices, pixels, errors in image_batches(images, extractor.preprocess, batches, workers, pin):
        ok = np.array([not e for e in errors], dtype=bool)
        skipped = {int(i): e for i, e in zip(indices, errors) if e}
        if ok.any():
            features = extractor(pixels[torch.from_numpy(ok)] if not ok.all() else pixels)
            arrays = {name: value.numpy() for name, value in features.items()}
        else:
            arrays = {layer.name: np.zeros((0, layer.dim), np.float32) for layer in extractor.layers}
        yield ExtractedBatch(indices[ok], arrays, skipped)


def batches_of(indices: Sequence[int], batch_size: int) -> list[list[int]]:
    if batch_size < 1:
        raise OptionError("batch_size", f"must be at least 1, not {batch_size}")
    return [list(indices[i:i + batch_size]) for i in range(0, len(indices), batch_size)]
